"""A release's reference profile, computed once at registration and stored as an npz artifact.

The monitor compares every window of traffic with the release's training data. Re-reading and
re-sorting that data on each run costs more than the comparison itself (a sort of every column);
the register step stores the sorted columns instead (`save_profile`), their sha256 goes into the
sealed evidence, and the monitor loads them (`load_profile`) only when the bytes hash to that digest.

The form is exact, not a sketch: a numeric column is its sorted finite values, stored as distinct
values with run lengths when that is smaller (np.repeat restores the sorted column bit for bit); a
categorical column is its distinct values and counts. Drift, label shift and the OOD envelope from a
loaded profile equal those from the data it was made of. No pickle: np.load(allow_pickle=False).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from loopform.gates.drift import ColumnProfile, Profile, numeric_profile

PROFILE_FILE = "reference-profile.npz"
FORMAT = 1
_KEY_TYPES = {"str": str, "int": int, "float": float, "bool": bool}


class ProfileDigestError(ValueError):
    """The stored profile's bytes do not hash to the digest its release recorded."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _key_type(keys: list[Any]) -> str:
    """The one Python type of a categorical column's values (bool before int: bool is an int)."""
    for name in ("bool", "int", "float", "str"):
        if all(isinstance(k, _KEY_TYPES[name]) and (name == "bool" or not isinstance(k, bool)) for k in keys):
            return name
    return "str"  # a mix is compared as its text


def save_profile(profile: Profile, path: Path) -> str:
    """Write the profile to `path` (npz, no pickle); returns the file's sha256."""
    arrays: dict[str, np.ndarray] = {}
    columns = []
    for i, (name, column) in enumerate(profile.columns.items()):
        entry: dict[str, Any] = {"name": name, "kind": column.kind, "n": column.n}
        if column.kind == "numeric":
            assert column.sorted is not None
            values = column.sorted
            if 2 * column.n_unique <= column.n:  # runs of equal values: distinct values and run lengths
                starts = np.concatenate(([0], np.flatnonzero(values[1:] != values[:-1]) + 1))
                arrays[f"{i}.values"] = values[starts]
                arrays[f"{i}.counts"] = np.diff(np.concatenate((starts, [values.size])))
                entry["layout"] = "runs"
            else:
                arrays[f"{i}.values"] = values
                entry["layout"] = "sorted"
        else:
            assert column.keys is not None and column.counts is not None
            keys = column.keys.tolist()
            entry["layout"], entry["key_type"] = "counts", _key_type(keys)
            arrays[f"{i}.values"] = np.array(keys if entry["key_type"] != "str" else [str(k) for k in keys])
            arrays[f"{i}.counts"] = np.asarray(column.counts, dtype=np.int64)
        columns.append(entry)
    meta = {"format": FORMAT, "rows": profile.rows, "columns": columns}
    arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as stream:
        np.savez(stream, **arrays)
    return sha256_of(path)


def load_profile(path: Path, sha256: str) -> Profile:
    """The profile stored at `path`, once its bytes hash to `sha256` (the digest its evidence recorded)."""
    data = Path(path).read_bytes()
    found = hashlib.sha256(data).hexdigest()
    if found != sha256:
        raise ProfileDigestError(
            f"reference profile {path} hashes to sha256 {found[:12]}..., its release recorded {sha256[:12]}...: "
            "refusing a profile that is not the one registered"
        )
    with np.load(io.BytesIO(data), allow_pickle=False) as stored:
        meta = json.loads(str(stored["meta"]))
        if meta.get("format") != FORMAT:
            raise ValueError(
                f"reference profile {path} has format {meta.get('format')!r}, this loopform reads {FORMAT}"
            )
        columns: dict[str, ColumnProfile] = {}
        for i, entry in enumerate(meta["columns"]):
            name, values = entry["name"], stored[f"{i}.values"]
            if entry["layout"] == "sorted":
                columns[name] = numeric_profile(name, values)
            elif entry["layout"] == "runs":
                columns[name] = numeric_profile(name, np.repeat(values, stored[f"{i}.counts"]))
            else:
                cast = _KEY_TYPES[entry["key_type"]]
                keys = np.array([cast(k) for k in values.tolist()], dtype=object)
                counts = stored[f"{i}.counts"]
                columns[name] = ColumnProfile(
                    name, "categorical", int(counts.sum()), None, keys, counts, keys.size, 0.0
                )
    return Profile(int(meta["rows"]), columns)
