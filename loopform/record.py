"""Signed release records: the compact statement, signed with Ed25519, that a version may serve in an environment.

`loopform promote` writes one record per model into the stack file (about 30 lines); the
full evidence stays in the MLflow run as an artifact whose digest the record carries. The
policy pack verifies the signature against the public keys its config trusts, then judges
the few numbers the record carries. A record with any field edited by hand, or signed by a
key the environment does not trust, fails verification.

    model, version, run_id, image     what serves
    artifacts                         sha256 over the model's files (the service refuses others)
    evidence                          digest of the full evidence artifact in the MLflow run
    created_at, released_at           when the evidence was sealed, when this release was signed
    gates                             each gate's verdict and the numbers the rules judge, with the
                                      evaluation's task (`gate_summary`)
    staging                           for a production release: the signed staging release
                                      (image, released_at, key_id, signature) of the same version
    key_id, signature                 who signed, and the Ed25519 signature

The environment is signed but not stored: the verifier supplies the environment it judges,
so a staging record pasted into the prod stack file does not verify.

Stdlib plus `cryptography` (imported where keys are used): the policy pack imports this module.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loopform import evidence as ev

KEY_ENV = "LOOPFORM_SIGNING_KEY"
"""The signing key as PEM text (a CI secret)."""
KEY_FILE_ENV = "LOOPFORM_SIGNING_KEY_FILE"
"""A path to the signing key's PEM file."""
STAGING = "staging"
SIGNATURE_POLICY = "release-signed"
"""The pack's rule whose config holds the trusted keys and the environment."""
MODELS = "models"
"""The key of a gate rule's config that holds per-model thresholds: `{"delivery": {"max_rmse": 12}}`."""
CLOCK_SKEW_DAYS = 5 / (24 * 60)
"""Clocks of the machines that seal evidence and sign releases may differ a little (5 minutes)."""
DIGEST_PREFIX = "sha256:"
#: Record fields every record has (staging is only on records that need one).
FIELDS = ("model", "version", "run_id", "image", "artifacts", "evidence", "created_at", "released_at", "gates")
#: Fields the staging proof of a production record repeats from the staging record.
STAGING_FIELDS = ("image", "released_at", "key_id", "signature")


class RecordError(Exception):
    """A record that cannot be built or signed (bad key, incomplete evidence)."""


@dataclass(frozen=True)
class TrustedKey:
    """A public key the policy config trusts, and the environments it may sign releases for."""

    key_id: str
    public_key: str  # base64 of the raw 32-byte Ed25519 public key
    environments: tuple[str, ...]

    @classmethod
    def parse(cls, entry: Mapping[str, Any]) -> TrustedKey:
        return cls(
            key_id=str(entry["key_id"]),
            public_key=str(entry["public_key"]),
            environments=tuple(str(e) for e in entry.get("environments", ())),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"key_id": self.key_id, "public_key": self.public_key, "environments": list(self.environments)}


# --- keys --------------------------------------------------------------------------------------------


def key_id_of(public_raw: bytes) -> str:
    """A short, stable id of a public key: the first 16 hex digits of its sha256."""
    return hashlib.sha256(public_raw).hexdigest()[:16]


def _public_raw(private_key: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def trusted_key(private_key: Any, environments: Iterable[str]) -> TrustedKey:
    """The policy-config entry that trusts `private_key`'s signatures for `environments`."""
    raw = _public_raw(private_key)
    return TrustedKey(key_id_of(raw), base64.b64encode(raw).decode("ascii"), tuple(environments))


def generate_key() -> tuple[Any, bytes]:
    """A new Ed25519 key and its PKCS#8 PEM (unencrypted: keep it in a secret store, never in the repository)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    key = Ed25519PrivateKey.generate()
    return key, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())


def write_key(path: Path, pem: bytes) -> None:
    """Write a private key readable by its owner only; never overwrite one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)


def load_key(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Any:
    """The signing key from `path`, else $LOOPFORM_SIGNING_KEY (PEM text), else $LOOPFORM_SIGNING_KEY_FILE."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    environ = os.environ if environ is None else environ
    if path is not None:
        source, pem = str(path), Path(path).read_bytes()
    elif environ.get(KEY_ENV):
        source, pem = f"${KEY_ENV}", environ[KEY_ENV].encode("utf-8")
    elif environ.get(KEY_FILE_ENV):
        source, pem = environ[KEY_FILE_ENV], Path(environ[KEY_FILE_ENV]).read_bytes()
    else:
        raise RecordError(
            f"no signing key: pass --signing-key PATH or set {KEY_ENV} (PEM) or {KEY_FILE_ENV} "
            "(create one with `loopform keygen`)"
        )
    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as error:
        raise RecordError(f"signing key {source} is not an unencrypted PEM private key: {error}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise RecordError(f"signing key {source} is a {type(key).__name__}, not an Ed25519 key")
    return key


def read_policy_config(path: Path) -> tuple[str, list[TrustedKey]]:
    """The environment and trusted keys of a policy config file (the `release-signed` entry)."""
    import json

    entry = json.loads(Path(path).read_text()).get(SIGNATURE_POLICY)
    if not isinstance(entry, Mapping):
        raise RecordError(f"{path} configures no {SIGNATURE_POLICY!r} policy: it trusts no release keys")
    return str(entry.get("environment", "")), [TrustedKey.parse(k) for k in entry.get("trusted_keys", [])]


# --- artifacts --------------------------------------------------------------------------------------


def file_digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by its POSIX path relative to it."""
    digests = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        digests[path.relative_to(folder).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def artifacts_digest(digests: Mapping[str, str]) -> str:
    """One digest over a model's files: sha256 of `path\\0sha256\\n` lines in path order."""
    lines = "".join(f"{path}\0{digests[path]}\n" for path in sorted(digests))
    return DIGEST_PREFIX + hashlib.sha256(lines.encode("utf-8")).hexdigest()


# --- records ----------------------------------------------------------------------------------------


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


#: The evaluation numbers a record carries per task: what the pack's rules judge, and the bound of the main
#: metric's interval on the worse side (auc_low, rmse_high) to show its uncertainty.
EVALUATION_NUMBERS: dict[str, tuple[str, ...]] = {
    "classification": ("auc", "auc_low", "auc_delta_low", "brier_skill", "positives"),
    "regression": ("rmse", "rmse_high", "r2", "rows", "rmse_ratio_high"),
}
#: Counts among them, carried as integers.
COUNTS = frozenset({"positives", "rows"})


def gate_summary(evidence: Mapping[str, Any]) -> dict[str, Any]:
    """Each gate's verdict and the numbers the pack's rules judge, from the full evidence.

    The evaluation carries its task and that task's numbers: AUC, holdout positives, Brier skill and
    the paired lower bound of challenger minus champion AUC for a classifier; RMSE, R², holdout rows
    and the paired upper bound of challenger / champion RMSE - 1 for a regressor (a comparison's
    bound is None when there was no champion).
    """
    gates = evidence.get("gates") or {}
    evaluation = evidence.get("evaluation") or {}

    def gate(name: str, *metrics: str) -> dict[str, Any]:
        result = gates.get(name) or {}
        values = result.get("metrics") or {}
        return {"passed": result.get("passed") is True, **{m: _number(values.get(m)) for m in metrics}}

    task = evaluation.get("task") if isinstance(evaluation.get("task"), str) else None
    numbers = {key: _number(evaluation.get(key)) for key in EVALUATION_NUMBERS.get(task or "", ())}
    return {
        "validation": gate("validation", "worst_missing_share", "worst_out_of_range_share"),
        "drift": gate("drift", "drift_share"),
        "ood": gate("ood", "ood_rate"),
        "evaluation": {
            "task": task,
            **{key: int(value) if key in COUNTS and value is not None else value for key, value in numbers.items()},
        },
    }


def build(evidence: Mapping[str, Any], *, image: str, released_at: str) -> dict[str, Any]:
    """An unsigned record of a version's sealed evidence (which must carry its artifacts digest)."""
    artifacts = (evidence.get("artifacts") or {}).get("digest")
    if not artifacts:
        raise RecordError(f"evidence of {evidence.get('model')} v{evidence.get('version')} has no artifacts digest")
    return {
        "model": evidence["model"],
        "version": int(evidence["version"]),
        "run_id": evidence["run_id"],
        "image": image,
        "artifacts": artifacts,
        "evidence": DIGEST_PREFIX + str(evidence["digest"]),
        "created_at": evidence["created_at"],
        "released_at": released_at,
        "gates": gate_summary(evidence),
    }


def payload(record: Mapping[str, Any], environment: str) -> bytes:
    """The signed bytes: canonical JSON of every field but the signature, plus the environment."""
    body = {key: value for key, value in record.items() if key != "signature"}
    return ev.canonical({**body, "environment": environment})


def sign(record: Mapping[str, Any], environment: str, private_key: Any) -> dict[str, Any]:
    """The record with `key_id` and an Ed25519 `signature` for `environment`."""
    body = {key: value for key, value in ev.jsonable(dict(record)).items() if key not in ("key_id", "signature")}
    body["key_id"] = key_id_of(_public_raw(private_key))
    signature = private_key.sign(payload(body, environment))
    return {**body, "signature": base64.b64encode(signature).decode("ascii")}


def staging_proof(staging_record: Mapping[str, Any]) -> dict[str, Any]:
    """What a production record carries of the signed staging record of the same version."""
    return {key: staging_record[key] for key in STAGING_FIELDS}


def staging_record(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """The staging record a production record's proof stands for (None when it carries none)."""
    proof = record.get("staging")
    if not isinstance(proof, Mapping):
        return None
    core = {key: value for key, value in record.items() if key not in ("staging", "key_id", "signature")}
    return {**core, **{key: proof.get(key) for key in STAGING_FIELDS}}


def _verify_one(record: Mapping[str, Any], environment: str, trusted: Iterable[TrustedKey], what: str) -> list[str]:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    key_id, signature = record.get("key_id"), record.get("signature")
    if not key_id or not signature:
        return [f"{what} is not signed (no key_id or signature)"]
    matches = [key for key in trusted if key.key_id == key_id]
    if not matches:
        return [f"{what} is signed by key {key_id}, which the {environment} policy config does not trust"]
    key = matches[0]
    if environment not in key.environments:
        allowed = ", ".join(key.environments) or "none"
        return [f"{what} is signed by key {key_id}, trusted for {allowed} but not for {environment}"]
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(key.public_key))
        public.verify(base64.b64decode(str(signature), validate=True), payload(record, environment))
    except (InvalidSignature, ValueError, TypeError):
        return [
            f"{what} signature does not verify with key {key_id} for {environment}: "
            "a field was changed after signing, or it was signed for another environment"
        ]
    return []


def verify(record: Mapping[str, Any], environment: str, trusted: Iterable[Mapping[str, Any] | TrustedKey]) -> list[str]:
    """Every reason the record's signatures fail for `environment`; empty means they verify.

    A record with a staging proof must also verify as a staging record of the same version.
    """
    keys = [k if isinstance(k, TrustedKey) else TrustedKey.parse(k) for k in trusted]
    name = f"release record of {record.get('model')} v{record.get('version')}"
    missing = [field for field in FIELDS if record.get(field) in (None, "")]
    if missing:
        return [f"{name} lacks {', '.join(missing)}"]
    reasons = _verify_one(record, environment, keys, name)
    staged = staging_record(record)
    if staged is not None:
        reasons += _verify_one(staged, STAGING, keys, f"staging proof of {name}")
    return reasons


def release_env(record: Mapping[str, Any]) -> dict[str, str]:
    """What a service needs to load exactly the released files: the pinned version and the artifacts digest."""
    return {
        "LOOPFORM_MODEL_URI": f"models:/{record['model']}/{record['version']}",
        "LOOPFORM_ARTIFACTS_DIGEST": str(record["artifacts"]),
    }
