"""Generic code never imports a model, and nothing stores or loads a model with pickle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERIC = ("loopform", "components", "bentos")


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_generic_module_imports_a_model_package() -> None:
    """Only a model's own bento (bentos/<m>/) may import its model (models.<m>); the rest reads a Contract."""
    offenders = []
    for folder in GENERIC:
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT)
            own = f"models.{relative.parts[1]}" if relative.parts[0] == "bentos" and len(relative.parts) > 2 else None
            for name in _imported(path):
                if (name == "models" or name.startswith("models.")) and not (
                    own and (name == own or name.startswith(own + "."))
                ):
                    offenders.append(f"{relative} imports {name}")
    assert offenders == []


def test_the_boundary_check_sees_an_import(tmp_path: Path) -> None:
    """The scan above finds both import forms (so its empty result means something)."""
    module = tmp_path / "m.py"
    module.write_text("import models.fraud.data\nfrom models.fraud import contract\nfrom . import x\n")
    assert _imported(module) == {"models.fraud.data", "models.fraud"}


PICKLE = re.compile(r"\b(import pickle|from pickle|cloudpickle|joblib|dill)\b|serialization_format=[\"']pickle")


def test_no_pickle_serialization_in_the_code_base() -> None:
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for folder in (*GENERIC, "models", "policies", "bench")
        for path in sorted((ROOT / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if PICKLE.search(line)
    ]
    assert found == []
