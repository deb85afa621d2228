"""The real policy pack, as Pulumi runs it: over the analyzer protocol, on the shipped stacks and on releases.

Every case here goes through `loopform check` (the pack in its own process, gRPC, config validated and
defaulted as the CLI does), so a rule that works on plain data but not on what the analyzer hands it fails.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from loopform import check, policy_config
from loopform import evidence as ev
from loopform.cli import main
from loopform.images import unpinned
from loopform.record import SIGNATURE_POLICY, TrustedKey
from loopform.spec import CONFIG_KEY, PlatformSpec, load_stack, parse_spec, stack_file
from policies.core import Resource, ResourceRule, with_defaults
from policies.pack import rules
from tests import pins, records

ROOT = Path(__file__).resolve().parent.parent
STACKS = ("dev", "staging", "prod")


@pytest.mark.parametrize("stack", STACKS)
def test_shipped_configs_hold_the_stacks_gate_thresholds(stack: str) -> None:
    config = json.loads((ROOT / "policies" / "config" / f"{stack}.json").read_text())
    spec = load_stack(stack_file(stack))
    assert policy_config.disagreements(config, spec) == []
    assert config[SIGNATURE_POLICY]["environment"] == stack
    if stack != "dev":  # advisory is allowed in dev only
        assert config["all"] == "mandatory"
        assert all(
            not isinstance(v, dict) or v.get("enforcementLevel") != "advisory"
            for k, v in config.items()
            if k in policy_config.gate_thresholds(spec) or k == SIGNATURE_POLICY
        )


@pytest.mark.parametrize("stack", ["dev", "staging"])
def test_the_shipped_stacks_pass(stack: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check", "--stack", stack])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[-1].startswith("0 mandatory")


def test_shipped_prod_is_refused_until_its_images_are_pinned(capsys: pytest.CaptureFixture[str]) -> None:
    """Prod requires digests: the shipped stack names images by tag (none is published yet), so the pack refuses
    every image, and only that; the release's `pin-images` pull request is what lets prod deploy."""
    code = main(["check", "--stack", "prod"])
    out = capsys.readouterr().out
    assert code == 1, out
    mandatory = [line for line in out.splitlines() if line.startswith("mandatory")]
    assert mandatory and all("images-pinned-by-digest" in line for line in mandatory), out
    refused = {re.search(r"image (\S+) is not pinned by digest", line)[1] for line in mandatory}
    spec = load_stack(stack_file("prod"))
    # Each image the stack runs, Argo's included; the serving image runs once a model is released.
    assert refused == set(unpinned(spec)) - {spec.services.image}


def test_pinned_prod_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = pins.write_pinned(tmp_path)
    code = main(["check", "--stack", "prod", "--file", str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[-1].startswith("0 mandatory, 0 advisory")


@pytest.mark.parametrize("stack", STACKS)
def test_the_pack_over_grpc_reports_exactly_what_the_rules_report(stack: str, rendered) -> None:
    """The analyzer hands rules read-only proxies, not dicts: the pack must judge them as the pure rules do."""
    resources = rendered(stack)
    run = check.run_pack(resources, ROOT / "policies" / "config" / f"{stack}.json", ROOT / "policies", stack)
    direct: Counter[tuple[str, str]] = Counter()
    stack_view = [Resource(r.type_, r.name, r.inputs, r.urn) for r in resources]
    for rule in rules():
        config = run.policies[rule.name]
        if config.level == "disabled":
            continue
        settings = with_defaults(rule, config.properties)
        if isinstance(rule, ResourceRule):
            for r in resources:
                if rule.types is None or r.type_ in rule.types:
                    direct.update((rule.name, m) for m in rule.check(r.type_, r.inputs, settings))
        else:
            direct.update((rule.name, m) for _, m in rule.check(stack_view, settings))
    assert Counter((v.policy, v.message) for v in run.violations) == direct
    if stack == "prod":  # not vacuous: prod requires digests, and the shipped stack names tags
        assert direct and all(policy == "images-pinned-by-digest" for policy, _ in direct)


# --- releases through `loopform check --file`: the direct road, with a config that trusts the test key ----------


def _stack(tmp_path: Path, record: dict[str, Any], gates: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """A prod stack file serving `record` (GitOps off: the service is declared, the pack sees its Deployment).

    The record's model is declared if the stack lacks it; `gates` are then its own `models.<m>.gates`.
    """
    document = yaml.safe_load(pins.pinned_text())
    platform = document["config"][CONFIG_KEY]
    platform["gitops"] = {"enabled": False}
    model = platform["models"].setdefault(record["model"], {"path": f"models/{record['model']}"})
    model["release"] = record
    if gates is not None:
        model["gates"] = gates
    stacks = tmp_path / "stacks"
    stacks.mkdir(exist_ok=True)
    path = stacks / "Pulumi.prod.yaml"
    path.write_text(yaml.safe_dump(document))
    base = json.loads((ROOT / "policies" / "config" / "prod.json").read_text())
    trusted = [TrustedKey.parse(k) for k in records.TRUSTED]
    config = policy_config.for_environment(base, load_stack(path), trusted)
    policy_config.write(tmp_path / "policy" / "prod.json", config)
    return path, tmp_path / "policy" / "prod.json"


def _check(
    tmp_path: Path, record: dict[str, Any], capsys: pytest.CaptureFixture[str], gates: dict[str, Any] | None = None
) -> tuple[int, list[str]]:
    path, _ = _stack(tmp_path, record, gates)
    code = main(["check", "--stack", "prod", "--file", str(path)])  # finds <dir>/policy/prod.json beside it
    lines = capsys.readouterr().out.splitlines()
    return code, [line for line in lines if line.startswith("mandatory")]


def _release(**changes: Any) -> dict[str, Any]:
    """A prod record of the service image by digest, as `loopform promote` records it from a pinned prod."""
    return records.release("prod", **{"image": pins.SERVING_IMAGE, **changes})


def test_a_signed_prod_release_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _check(tmp_path, _release(), capsys) == (0, [])


def _edited(*path: str, value: Any) -> dict[str, Any]:
    record = copy.deepcopy(_release())
    target = record
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return record


def _resealed(**evaluation: Any) -> dict[str, Any]:
    sealed = records.evidence()
    body = {k: v for k, v in sealed.items() if k != "digest"}
    body["evaluation"].update(evaluation.get("evaluation", {}))
    body["gates"].update(evaluation.get("gates", {}))
    return _release(sealed=ev.seal(body, now=records.NOW - timedelta(days=1)))


@pytest.mark.parametrize(
    ("case", "record", "expected"),
    [
        (
            "edited metric",
            _edited("gates", "evaluation", "auc", value=0.99),
            ["release-signed", "signature does not verify"],
        ),
        ("swapped version", _edited("version", value=2), ["release-signed", "signature does not verify"]),
        (
            "untrusted key",
            _release(key=records.OTHER_KEY),
            ["release-signed", "which the prod policy config does not trust"],
        ),
        (
            "failed gate",
            _resealed(gates={"drift": {"passed": False, "metrics": {"drift_share": 0.41}, "failures": []}}),
            ["drift-within-threshold", "drift share 0.4100 > 0.3 (prod, max_drift_share)"],
        ),
        (
            "base-rate model",
            _resealed(evaluation={"auc": 0.5, "auc_low": 0.5, "brier_skill": 0.0}),
            ["metrics-meet-minimums", "Brier skill 0.000 < 0.05 (prod, min_brier_skill)"],
        ),
        (
            "too few positives",
            _resealed(evaluation={"positives": 40}),
            ["metrics-meet-minimums", "holdout positives 40 < 100 (prod, min_positives)"],
        ),
        (
            "not non-inferior",
            _resealed(evaluation={"auc_delta": 0.003, "auc_delta_low": -0.012}),
            ["no-champion-regression", "lower bound -0.0120 <= -0.005 (prod, max_auc_drop)"],
        ),
        (
            "never released to staging",
            _release(staged=False),
            ["released-to-staging-first", "fraud v3 was never released to staging"],
        ),
        (
            "stale evidence",
            _release(sealed=records.evidence(created=records.NOW - timedelta(days=45))),
            ["evidence-fresh", "was 45.0 days old when released > 30 (prod, max_evidence_age_days)"],
        ),
    ],
)
def test_a_bad_release_is_refused_naming_what_is_wrong(
    case: str, record: dict, expected: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, mandatory = _check(tmp_path, record, capsys)
    assert code == 1, case
    policy, text = expected
    assert any(policy in line and text in line for line in mandatory), mandatory


def _regressor(**evaluation: Any) -> dict[str, Any]:
    return _release(sealed=records.regression_evidence(**evaluation))


@pytest.mark.parametrize(
    ("case", "record", "gates", "expected"),
    [
        ("a good regressor", _regressor(), {"max_rmse": 12}, []),
        (
            "RMSE above the model's own max_rmse",
            _regressor(rmse=14.2),
            {"max_rmse": 12},
            ["metrics-meet-minimums", "RMSE 14.2000 > 12 (prod, models.delivery.max_rmse)"],
        ),
        (
            "too few holdout rows",
            _regressor(rows=120),
            {"max_rmse": 12, "min_holdout_rows": 500},
            ["metrics-meet-minimums", "holdout rows 120 < 500 (prod, models.delivery.min_holdout_rows)"],
        ),
        (
            "RMSE not non-inferior to the champion's",
            _regressor(rmse_ratio_high=0.03),
            {"max_rmse": 12},
            ["no-champion-regression", "upper bound 0.0300 >= 0.02 (prod, max_rmse_increase)"],
        ),
    ],
)
def test_a_regressor_is_judged_by_its_own_gates(
    case: str, record: dict, gates: dict, expected: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A regressor declared with its own models.<m>.gates: the derived policy config carries them to the pack."""
    code, mandatory = _check(tmp_path, record, capsys, gates)
    if not expected:
        assert (code, mandatory) == (0, []), case
        return
    assert code == 1, case
    policy, text = expected
    assert any(policy in line and text in line for line in mandatory), mandatory


def _courier(**gates: Any) -> PlatformSpec:
    """The prod stack with one more model, `courier` (a regressor's folder), that has gates of its own."""
    platform = yaml.safe_load(stack_file("prod").read_text())["config"][CONFIG_KEY]
    platform["models"]["courier"] = {"path": "models/delivery", "gates": gates}
    return parse_spec(platform, "courier")


def test_a_models_own_gates_reach_the_policy_config() -> None:
    prod_min_auc = load_stack(stack_file("prod")).gates.min_auc
    spec = _courier(max_rmse=12, drift={"max_drift_share": 0.4}, min_auc=prod_min_auc)
    thresholds = policy_config.gate_thresholds(spec)
    assert thresholds["metrics-meet-minimums"]["models"]["courier"] == {"max_rmse": 12}  # min_auc: as prod's
    assert thresholds["drift-within-threshold"]["models"]["courier"] == {"max_drift_share": 0.4}
    assert "courier" not in thresholds["ood-within-threshold"].get("models", {})
    shipped = json.loads((ROOT / "policies" / "config" / "prod.json").read_text())
    assert policy_config.disagreements(shipped, spec) == [
        "drift-within-threshold.models.courier.max_drift_share is None in the policy config, 0.4 in the stack's gates",
        "metrics-meet-minimums.models.courier.max_rmse is None in the policy config, 12.0 in the stack's gates",
    ]
    config = policy_config.for_environment(shipped, spec, [])
    assert policy_config.disagreements(config, spec) == []
    assert config["metrics-meet-minimums"]["models"]["courier"] == {"max_rmse": 12}
    config["ood-within-threshold"].setdefault("models", {})["gone"] = {"max_ood_rate": 0.5}  # a model the stack lost
    assert policy_config.disagreements(config, spec) == [
        "ood-within-threshold.models.gone.max_ood_rate is 0.5 in the policy config, None in the stack's gates"
    ]


def test_per_model_thresholds_are_checked_against_the_rules_schema() -> None:
    policies = [check.PolicyInfo(rule.name, "mandatory", {"properties": dict(rule.config)}) for rule in rules()]
    config = policy_config.for_environment({}, _courier(max_rmse=12), [])
    assert check.reconcile_config(policies, config)["metrics-meet-minimums"].properties["models"]["courier"] == {
        "max_rmse": 12
    }
    config["metrics-meet-minimums"]["models"]["courier"] = {"max_rmes": 12, "min_r2": 2}
    with pytest.raises(check.PolicyConfigError) as error:
        check.reconcile_config(policies, config)
    assert "Additional properties are not allowed ('max_rmes' was unexpected)" in str(error.value)
    assert "2 is greater than or equal to the maximum of 1" in str(error.value)
