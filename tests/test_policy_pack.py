"""The real policy pack, as Pulumi runs it: over the analyzer protocol, on the shipped stacks and on releases.

Every case here goes through `loopform check` (the pack in its own process, gRPC, config validated and
defaulted as the CLI does), so a rule that works on plain data but not on what the analyzer hands it fails.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from loopform import check, policy_config
from loopform import evidence as ev
from loopform.cli import main
from loopform.record import SIGNATURE_POLICY, TrustedKey
from loopform.spec import CONFIG_KEY, load_stack, stack_file
from policies.core import Resource, ResourceRule, with_defaults
from policies.pack import rules
from tests import records

ROOT = Path(__file__).resolve().parent.parent
STACKS = ("dev", "staging", "prod")


@pytest.mark.parametrize("stack", STACKS)
def test_shipped_configs_hold_the_stacks_gate_thresholds(stack: str) -> None:
    config = json.loads((ROOT / "policies" / "config" / f"{stack}.json").read_text())
    assert policy_config.disagreements(config, load_stack(stack_file(stack)).gates) == []
    assert config[SIGNATURE_POLICY]["environment"] == stack
    if stack != "dev":  # advisory is allowed in dev only
        assert config["all"] == "mandatory"
        assert all(
            not isinstance(v, dict) or v.get("enforcementLevel") != "advisory"
            for k, v in config.items()
            if k in policy_config.gate_thresholds(load_stack(stack_file(stack)).gates) or k == SIGNATURE_POLICY
        )


@pytest.mark.parametrize("stack", STACKS)
def test_the_shipped_stacks_pass(stack: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["check", "--stack", stack])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.splitlines()[-1].startswith("0 mandatory")


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
    if stack == "prod":  # not vacuous: prod requires digests (advisory until images are built)
        assert direct and all(policy == "images-pinned-by-digest" for policy, _ in direct)


# --- releases through `loopform check --file`: the direct road, with a config that trusts the test key ----------


def _stack(tmp_path: Path, record: dict[str, Any]) -> tuple[Path, Path]:
    """A prod stack file serving `record` (GitOps off: the service is declared, the pack sees its Deployment)."""
    document = yaml.safe_load(stack_file("prod").read_text())
    platform = document["config"][CONFIG_KEY]
    platform["gitops"] = {"enabled": False}
    platform["models"]["fraud"]["release"] = record
    stacks = tmp_path / "stacks"
    stacks.mkdir(exist_ok=True)
    path = stacks / "Pulumi.prod.yaml"
    path.write_text(yaml.safe_dump(document))
    base = json.loads((ROOT / "policies" / "config" / "prod.json").read_text())
    trusted = [TrustedKey.parse(k) for k in records.TRUSTED]
    config = policy_config.for_environment(base, "prod", load_stack(path).gates, trusted)
    policy_config.write(tmp_path / "policy" / "prod.json", config)
    return path, tmp_path / "policy" / "prod.json"


def _check(tmp_path: Path, record: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    path, _ = _stack(tmp_path, record)
    code = main(["check", "--stack", "prod", "--file", str(path)])  # finds <dir>/policy/prod.json beside it
    lines = capsys.readouterr().out.splitlines()
    return code, [line for line in lines if line.startswith("mandatory")]


def test_a_signed_prod_release_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _check(tmp_path, records.release("prod"), capsys) == (0, [])


def _edited(*path: str, value: Any) -> dict[str, Any]:
    record = copy.deepcopy(records.release("prod"))
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
    return records.release("prod", sealed=ev.seal(body, now=records.NOW - timedelta(days=1)))


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
            records.release("prod", key=records.OTHER_KEY),
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
            records.release("prod", staged=False),
            ["released-to-staging-first", "fraud v3 was never released to staging"],
        ),
        (
            "stale evidence",
            records.release("prod", sealed=records.evidence(created=records.NOW - timedelta(days=45))),
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
