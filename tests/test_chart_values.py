"""Each Helm chart's values use only keys its pinned version documents (loopform/chart_values.py).

Helm ignores keys a chart does not read: a misspelt or moved key deploys without error and without effect. The values
are captured as the program passes them: the Chart resources of each rendered stack, and of a variant of it that sets
monitoring.install_prometheus_stack, which adds kube-prometheus-stack and the retraining route's argo-events.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from loopform import spec as spec_module
from loopform.chart_values import ARGO_CD, ARGO_WORKFLOWS, CHARTS, check_values, unknown_keys
from loopform.render import render_stack
from loopform.spec import stack_file

ROOT = Path(__file__).resolve().parent.parent
COMPONENTS = ROOT / "components"
STACKS = ("dev", "staging", "prod")

ChartValues = dict[tuple[str, str], list[dict[str, Any]]]


def _charts(stack: str, path: Path | None = None) -> ChartValues:
    """(chart, version) -> the values of each Chart resource the program declares for `stack`."""
    found: ChartValues = {}
    for resource in render_stack(stack, ROOT, path):
        if resource.is_chart:
            key = (resource.inputs["chart"], resource.inputs["version"])
            found.setdefault(key, []).append(resource.inputs.get("values") or {})
    return found


def _with_prometheus_stack(stack: str, tmp_path: Path) -> Path:
    """A copy of the stack file that installs kube-prometheus-stack (so its values and argo-events' are rendered)."""
    variant = yaml.safe_load(stack_file(stack, ROOT).read_text())
    monitoring = variant["config"]["loopform:platform"].setdefault("monitoring", {})
    monitoring["install_prometheus_stack"] = True
    path = tmp_path / f"Pulumi.{stack}.yaml"
    path.write_text(yaml.safe_dump(variant, sort_keys=False))
    return path


@pytest.fixture(scope="module", params=STACKS)
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, ChartValues]:
    stack = request.param
    found = _charts(stack)
    variant = _charts(stack, _with_prometheus_stack(stack, tmp_path_factory.mktemp(stack)))
    for key, values in variant.items():
        found.setdefault(key, []).extend(values)
    return stack, found


def test_every_chart_value_is_a_key_the_pinned_chart_documents(rendered: tuple[str, ChartValues]) -> None:
    stack, found = rendered
    assert {"argo-cd", "argo-workflows", "kube-prometheus-stack", "argo-events"} <= {chart for chart, _ in found}
    problems = []
    for (chart, version), all_values in sorted(found.items()):
        assert (chart, version) in CHARTS, f"{stack}: {chart} {version} has no entry in loopform/chart_values.py"
        entry = CHARTS[(chart, version)]
        for values in all_values:
            for path in check_values(chart, version, values):
                problems.append(
                    f"{stack}: {chart} {version}: `{path}` is not a key of the chart "
                    f"(keys from {entry.source}, chart version {entry.source_version}; {entry.note or 'exact'})"
                )
    assert not problems, "\n".join(problems)


def test_a_misspelt_key_is_reported_with_its_path() -> None:
    values = {
        "controler": {"replicas": 1},
        "controller": {"serviceMonitor": {"enabeld": True}},
        "singleNamespace": True,
    }
    assert check_values("argo-workflows", "0.47.5", values) == ["controler", "controller.serviceMonitor.enabeld"]
    # Misspelt at each depth the argo-cd list names: top level, second and third.
    argocd = {"global": {"networkPolicy": {"craete": True}, "imag": {}}, "confgs": {}, "configs": {"gpg": {"keys": {}}}}
    assert check_values("argo-cd", "10.1.3", argocd) == ["global.networkPolicy.craete", "global.imag", "confgs"]


def test_free_form_maps_take_any_key() -> None:
    """GnuPG key ids, selectors and Kubernetes objects are the user's keys, not the chart's."""
    values = {
        "configs": {"gpg": {"keys": {"72A9A46405AFD43D": "..."}}},
        "global": {"nodeSelector": {"anything.example/label": "x"}},
        "server": {"containerSecurityContext": {"readOnlyRootFilesystem": True}},
    }
    assert unknown_keys(values, ARGO_CD.keys) == []
    assert (
        unknown_keys({"controller": {"workflowRestrictions": {"templateReferencing": "Strict"}}}, ARGO_WORKFLOWS.keys)
        == []
    )


def test_an_unpinned_version_has_no_entry() -> None:
    with pytest.raises(KeyError):
        check_values("argo-cd", "0.0.1", {})


def _module_constants(tree: ast.Module) -> dict[str, str]:
    """Module-level `NAME = "literal"` (annotated or not) of a components module."""
    constants: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            constants.update({target.id: node.value.value for target in targets if isinstance(target, ast.Name)})
    return constants


def _spec_default(field: str, chart: str) -> str:
    """The default of the spec field `field` that pins `chart`'s version (its description names the chart)."""
    candidates = {
        info.default
        for model in vars(spec_module).values()
        if isinstance(model, type) and issubclass(model, BaseModel) and field in model.model_fields
        for info in [model.model_fields[field]]
        if isinstance(info.default, str) and (info.description or "").startswith(f"{chart} chart version")
    }
    assert len(candidates) == 1, f"cannot tell which spec field `{field}` pins {chart}: {candidates}"
    return candidates.pop()


def _resolve(node: ast.expr, constants: dict[str, str], chart: str | None = None) -> str:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    if isinstance(node, ast.Attribute) and chart is not None:
        return _spec_default(node.attr, chart)
    raise AssertionError(f"cannot resolve {ast.unparse(node)} at line {node.lineno}")


def _declared_charts() -> set[tuple[str, str]]:
    """(chart, version) of every `Chart(..., ChartArgs(chart=..., version=...))` in components/, defaults resolved."""
    declared = set()
    for module in sorted(COMPONENTS.glob("*.py")):
        tree = ast.parse(module.read_text())
        constants = _module_constants(tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            if name == "ChartArgs":
                arguments = {keyword.arg: keyword.value for keyword in node.keywords}
                chart = _resolve(arguments["chart"], constants)
                declared.add((chart, _resolve(arguments["version"], constants, chart)))
    return declared


def test_every_chart_declared_in_components_has_an_entry() -> None:
    """Bumping a chart version (in components/ or a spec default) without updating chart_values.py fails here."""
    declared = _declared_charts()
    assert {chart for chart, _ in declared} >= {
        "argo-cd", "argo-workflows", "argo-events", "kube-prometheus-stack", "nvidia-device-plugin", "dcgm-exporter",
    }  # fmt: skip
    assert declared - set(CHARTS) == set()
    assert set(CHARTS) - declared == set(), "entries for versions nothing pins any more"
