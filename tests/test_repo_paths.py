"""Repository paths in the spec stay inside the repository: absolute paths and `..` escapes fail at load time."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loopform.repo_paths import inside_repository
from loopform.spec import CONFIG_KEY, SpecError, load_stack

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "path", ["deploy", "deploy/keys", "models/fraud", "./deploy", "models/../deploy", "a/b/../../c", "."]
)
def test_relative_paths_inside_the_repository_pass_unchanged(path: str) -> None:
    assert inside_repository(path) == path


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/etc", "is absolute"),
        ("/work/main/deploy", "is absolute"),
        ("C:\\deploy", "is absolute"),
        ("\\\\server\\share", "is absolute"),
        ("..", "leaves the repository"),
        ("../elsewhere", "leaves the repository"),
        ("deploy/../../elsewhere", "leaves the repository"),
        ("models/../../../etc", "leaves the repository"),
        ("..\\elsewhere", "leaves the repository"),
        ("./../x", "leaves the repository"),
    ],
)
def test_absolute_paths_and_escapes_are_refused(path: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        inside_repository(path)


def _stack_with(tmp_path: Path, section: str, key: str, value: str) -> Path:
    """A copy of the dev stack file with `<section>...<key>` set to `value`."""
    document = yaml.safe_load((ROOT / "stacks" / "Pulumi.dev.yaml").read_text())
    node = document["config"][CONFIG_KEY]
    for part in section.split("."):
        node = node.setdefault(part, {})
    node[key] = value
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.mark.parametrize(
    ("section", "key", "value", "why"),
    [
        ("gitops", "path", "/tmp/elsewhere", "is absolute"),
        ("gitops", "path", "deploy/../..", "leaves the repository"),
        ("gitops", "public_keys", "../keys", "leaves the repository"),
        ("models.fraud", "path", "../../models/fraud", "leaves the repository"),
        ("models.fraud", "path", "/opt/models/fraud", "is absolute"),
    ],
)
def test_the_spec_refuses_them_at_load_time_naming_the_key(
    tmp_path: Path, section: str, key: str, value: str, why: str
) -> None:
    with pytest.raises(SpecError) as info:
        load_stack(_stack_with(tmp_path, section, key, value))
    (problem,) = info.value.problems
    assert problem.startswith(f"{CONFIG_KEY}.{section}.{key}: ") and why in problem and repr(value) in problem


def test_the_repositorys_own_stacks_pass() -> None:
    for path in sorted((ROOT / "stacks").glob("Pulumi.*.yaml")):
        spec = load_stack(path)
        inside_repository(spec.gitops.path)
        inside_repository(spec.gitops.public_keys)
        for model in spec.models.values():
            inside_repository(model.path)
