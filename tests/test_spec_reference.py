"""The spec reference: generated from the schema, committed current, every key described, every key a stack
uses documented, and defaults as a stack gets them.

After an intended change to loopform/spec.py: `LOOPFORM_REGENERATE_GOLDEN=1 pytest tests/test_spec_reference.py`
and review the diff of docs/spec-reference.md; CI never sets it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from loopform.spec import CONFIG_KEY, FORMATS
from loopform.spec_reference import PLACEHOLDER, Key, leaf_keys, markdown, sections

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "spec-reference.md"


def _keys() -> dict[tuple[str, str | None], Key]:
    return {(key.path, section.kind): key for section in sections() for key in section.keys}


def test_golden_reference_is_current() -> None:
    text = markdown()
    if os.environ.get("LOOPFORM_REGENERATE_GOLDEN") == "1":
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(text)
    assert DOC.read_text() == text, (
        "docs/spec-reference.md differs from loopform/spec.py: regenerate with "
        "`LOOPFORM_REGENERATE_GOLDEN=1 pytest tests/test_spec_reference.py` and review the diff"
    )


def test_every_leaf_key_has_a_description() -> None:
    missing = sorted({key.path for key in leaf_keys() if not key.description.strip()})
    assert not missing, f"spec keys without a description (Field(description=...)): {missing}"


def test_every_key_of_every_model_is_in_the_reference() -> None:
    """Leaves and sections together cover each field of each section model exactly where it sits."""
    documented = {key.path for key in leaf_keys()} | {section.path for section in sections()}
    for path in ("environment", "registry.backend.host", "gpu.pools.<name>.node_class.role", "local.drift"):
        assert path in documented
    assert "models.<name>.release.staging.signature" in documented
    assert "gpu.pools.<name>.taints[].effect" in documented
    assert len(leaf_keys()) > 150


def _stack_paths(node: Any, path: str, leaves: set[str]) -> Iterator[str]:
    """Dotted paths of the leaves of a stack's spec, with chosen names as <name> and list entries as []."""
    if path in leaves or not isinstance(node, dict | list):
        yield path
    elif isinstance(node, list):
        for item in node:
            yield from _stack_paths(item, f"{path}[]", leaves)
    else:
        for name, value in node.items():
            named = path.endswith((".models", ".pools")) or path == "models"
            child = f"{path}.{PLACEHOLDER if named else name}" if path else str(name)
            yield from _stack_paths(value, child, leaves)


def test_every_key_the_stacks_use_is_documented() -> None:
    leaves = {key.path for key in leaf_keys()}
    for stack in sorted((ROOT / "stacks").glob("Pulumi.*.yaml")):
        platform = yaml.safe_load(stack.read_text())["config"][CONFIG_KEY]
        used = set(_stack_paths(platform, "", leaves))
        assert used, stack
        assert used <= leaves, f"{stack.name} uses keys the reference lacks: {sorted(used - leaves)}"


def test_defaults_are_the_ones_a_stack_gets() -> None:
    keys = _keys()
    # A section's own default, not its model's: the tracking server asks for more than Resources() does.
    assert keys["registry.resources.cpu", None].default == "`500m`"
    assert keys["models.<name>.training.resources.memory", None].default == "`4Gi`"
    assert keys["feature_store.online_store.resources.cpu", "in-cluster"].default == "`100m`"
    assert keys["cluster.namespaces.platform", None].default == "`loopform-<environment>-system`"
    # A union's kind must be written, even where the section has a default variant.
    assert keys["registry.backend.kind", "external"].default == "required"
    assert keys["registry.backend.host", "external"].default == "required"
    assert keys["gpu.pools.<name>.instance_families", "karpenter"].default == '`["g5", "g6"]`'
    assert keys["gpu.pools.<name>.taints[].value", "existing"].default == '`""`'
    assert keys["gates.max_rmse", None].default == "`null`"


def test_types_and_allowed_values() -> None:
    keys = _keys()
    replicas = keys["registry.replicas", None]
    assert (replicas.type, replicas.allowed) == ("integer", "1 to 20")
    assert (keys["gates.min_auc", None].type, keys["gates.min_auc", None].allowed) == ("number", "0.0 to 1.0")
    assert keys["gates.confidence", None].allowed == "> 0.5; < 1"
    assert keys["registry.backend.sslmode", "external"].allowed.startswith("`disable`, `allow`")
    assert keys["gpu.pools.<name>.capacity_types", "karpenter"].allowed == "at least 1; each: `spot`, `on-demand`"
    assert keys["gitops.signature_keys", None].allowed == "each: matches `^[0-9A-F]{16}$`"
    assert keys["registry.resources.cpu_limit", None].type == "quantity or null"
    assert keys["models.<name>.training.schedule", None].type == "cron or null"
    text = markdown()
    for name, meaning in FORMATS.items():
        assert f"- `{name}`: {meaning.replace('<', '&lt;')}." in text


def test_union_sections_list_each_variant() -> None:
    variants = {(section.path, section.kind) for section in sections() if section.kind}
    assert {
        ("cluster.identity", "irsa"),
        ("cluster.identity", "pod-identity"),
        ("cluster.identity", "static-keys"),
        ("cluster.identity.roles", "irsa"),
        ("registry.backend", "in-cluster"),
        ("registry.backend", "external"),
        ("feature_store.online_store", "external"),
        ("gpu.pools.<name>", "karpenter"),
        ("gpu.pools.<name>.node_class", "karpenter"),
        ("gpu.pools.<name>.taints[]", "existing"),
    } <= variants
    assert "## `registry.backend` (kind: `external`)" in markdown()


def test_module_prints_and_writes_the_reference(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "loopform.spec_reference"]
    printed = subprocess.run(command, capture_output=True, text=True, check=True, cwd=tmp_path)
    assert printed.stdout == markdown()
    out = tmp_path / "docs" / "reference.md"
    subprocess.run([*command, "--out", str(out)], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.read_text() == markdown()
