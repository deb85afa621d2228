"""Paths in the spec that name folders of the repository (`gitops.path`, `gitops.public_keys`, `models.<m>.path`).

They are joined to the repository root: render writes and deletes manifests under `<gitops.path>/<env>/`, and the
model's code is imported from `models.<m>.path`. An absolute path or one whose `..` climbs above the root would
point those writes and imports at any folder of the machine, so the spec refuses them when it is loaded. The check
is on the text, as Argo CD and the import machinery read it: a symbolic link committed into the repository is the
repository's own choice.
"""

from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath
from typing import Annotated

from pydantic import AfterValidator


def inside_repository(value: str) -> str:
    """`value` unchanged if it is a relative path that stays inside the repository; else ValueError saying why
    (the spec's error adds the key and the value).

    Backslashes count as separators, so `..\\x` and `C:\\x` are refused on every platform.
    """
    if PurePosixPath(value).is_absolute() or PureWindowsPath(value).anchor:
        raise ValueError("is absolute: write a path relative to the repository root")
    depth = 0
    for part in PurePosixPath(value.replace("\\", "/")).parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                raise ValueError("leaves the repository: its '..' climbs above the root; name a folder inside it")
        elif part != ".":
            depth += 1
    return value


RepoPath = Annotated[str, AfterValidator(inside_repository)]
"""A spec field that names a folder of the repository: relative, and never above the root."""
