"""A user's copy of the repository, and the CLI run in it as the user runs it (tests of the scaffold and loop)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: What a user's repository holds that the CLI reads (the runtime itself is the installed package).
PROJECT = ("Pulumi.yaml", "__main__.py", "stacks", "models", "bentos", "policies", "deploy")


def copy_project(folder: Path) -> Path:
    """The project's files copied into `folder` (which may exist); returns `folder`."""
    for name in PROJECT:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(source, folder / name)
    return folder


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`loopform ARGS` run in `root` as a user runs it: a new process that finds its project from the directory."""
    return subprocess.run([sys.executable, "-m", "loopform.cli", *args], capture_output=True, text=True, cwd=root)
