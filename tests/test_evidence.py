"""Evidence: canonical JSON, digest, tamper detection and the one refusal check (pure, fast)."""

from __future__ import annotations

import ast
import copy
import json
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from loopform import evidence as ev
from loopform.gates.result import GateResult
from loopform.spec import GatesSpec, load_stack
from tests import records

ROOT = Path(__file__).resolve().parent.parent
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
GATES = GatesSpec().model_dump()


def make_evidence(**changes) -> dict:
    """Evidence sealed a day before NOW that passes every default gate."""
    return records.evidence(created=NOW - timedelta(days=1), **changes)


def test_evidence_module_is_stdlib_only():
    """The policy pack imports it: only standard-library imports allowed."""
    tree = ast.parse((ROOT / "loopform" / "evidence.py").read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported - {"__future__"} <= set(sys.stdlib_module_names), imported


def test_canonical_is_independent_of_key_order_and_numpy_types():
    a = {"b": [1, 2.5], "a": {"y": np.float64(0.25), "x": np.int64(3)}, "c": (True, None)}
    b = {"c": [True, None], "a": {"x": 3, "y": 0.25}, "b": [1, 2.5]}
    assert ev.canonical(a) == ev.canonical(b) == b'{"a":{"x":3,"y":0.25},"b":[1,2.5],"c":[true,null]}'
    assert ev.canonical({"v": float("nan"), "w": np.array([1.0, np.inf])}) == b'{"v":null,"w":[1.0,null]}'
    with pytest.raises(TypeError, match="not JSON data"):
        ev.canonical({"x": object()})


def test_seal_and_verify_and_every_kind_of_tamper():
    sealed = make_evidence()
    assert sealed["created_at"] == "2025-02-28T12:00:00+00:00"
    assert ev.verify(sealed)
    assert sealed["digest"] == ev.digest({k: v for k, v in sealed.items() if k != "digest"})
    # The digest survives a JSON round trip (MLflow tag, Pulumi config).
    assert ev.verify(json.loads(json.dumps(sealed)))

    for path, value in [
        (("evaluation", "auc"), 0.99),
        (("gates", "drift", "passed"), False),
        (("gates", "drift", "metrics", "drift_share"), 0.0),
        (("training_data_fingerprint",), "0" * 64),
        (("created_at",), "2099-01-01T00:00:00+00:00"),
    ]:
        tampered = copy.deepcopy(sealed)
        target = tampered
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        assert not ev.verify(tampered), path
        reasons = ev.check_evidence(tampered, GATES, now=NOW)
        assert any(r.startswith("tampered evidence: digest mismatch") for r in reasons), (path, reasons)

    unsealed = {k: v for k, v in sealed.items() if k != "digest"}
    assert not ev.verify(unsealed)
    assert "missing evidence digest: the evidence was never sealed" in ev.check_evidence(unsealed, GATES, now=NOW)


def test_good_evidence_passes():
    assert ev.check_evidence(make_evidence(), GATES, now=NOW) == []


@pytest.mark.parametrize("value", [None, {}])
def test_missing_evidence(value):
    assert ev.check_evidence(value, GATES, now=NOW) == ["missing evidence: the version carries no release evidence"]


def test_missing_section_and_gate():
    gates = make_evidence()["gates"]
    del gates["ood"]
    reasons = ev.check_evidence(make_evidence(gates=gates), GATES, now=NOW)
    assert reasons == ["missing gate result 'ood'"]
    body = make_evidence()
    del body["evaluation"]
    reasons = ev.check_evidence(ev.seal(body), GATES, now=NOW)
    assert reasons == ["missing evidence field 'evaluation'"]


def test_failed_gate_is_refused_with_its_failures():
    gates = make_evidence()["gates"]
    gates["validation"] = GateResult("validation", False, {}, ["column amount: 8% out of range"]).to_dict()
    reasons = ev.check_evidence(make_evidence(gates=gates), GATES, now=NOW)
    assert reasons == ["gate 'validation' did not pass: column amount: 8% out of range"]


def test_metrics_are_rejudged_against_the_target_gates():
    evaluation = {**make_evidence()["evaluation"], "auc": 0.74, "brier_skill": 0.02, "auc_delta_low": -0.03}
    gates = make_evidence()["gates"]
    gates["drift"]["metrics"]["drift_share"] = 0.5
    gates["ood"]["metrics"]["ood_rate"] = 0.07
    gates["validation"]["metrics"]["worst_out_of_range_share"] = 0.02
    reasons = ev.check_evidence(make_evidence(evaluation=evaluation, gates=gates), GATES, now=NOW)
    assert reasons == [
        "validation worst_out_of_range_share 0.0200 is above gates.max_out_of_range_share=0.01",
        "drift share 0.500 is above gates.drift.max_drift_share=0.3",
        "out-of-distribution rate 0.0700 is above gates.max_ood_rate=0.05",
        "AUC 0.7400 < 0.75 (gates.min_auc)",
        "Brier skill 0.020 < 0.05 (gates.min_brier_skill)",
        "AUC minus the champion version 2's: lower bound -0.0300 at 95% <= -0.01 (gates.max_auc_drop): "
        "not shown to be non-inferior",
    ]


def test_too_few_positives_cannot_judge_a_model():
    evaluation = {**make_evidence()["evaluation"], "positives": 36}
    assert ev.check_evidence(make_evidence(evaluation=evaluation), GATES, now=NOW) == [
        "holdout positives 36 < 100 (gates.min_positives): too few to judge the model"
    ]
    assert ev.check_evidence(make_evidence(evaluation=evaluation), {**GATES, "min_positives": 30}, now=NOW) == []


@pytest.mark.parametrize(
    ("low", "passes"),
    [(0.002, True), (-0.009, True), (-0.01, False), (-0.02, False)],
)
def test_non_inferiority_judges_the_paired_lower_bound_not_the_point_estimate(low: float, passes: bool):
    """A challenger ahead on the point estimate still fails when the interval allows a loss beyond the margin."""
    evaluation = {**make_evidence()["evaluation"], "auc_delta": 0.02, "auc_delta_low": low}
    reasons = ev.check_evidence(make_evidence(evaluation=evaluation), GATES, now=NOW)
    assert (reasons == []) is passes, reasons
    if not passes:
        assert reasons == [
            f"AUC minus the champion version 2's: lower bound {low:.4f} at 95% <= -0.01 (gates.max_auc_drop): "
            "not shown to be non-inferior"
        ]


def test_first_release_has_no_champion_to_compare_and_a_missing_comparison_is_refused():
    no_champion = {
        **make_evidence()["evaluation"],
        **dict.fromkeys(("champion_version", "champion_auc", "auc_delta", "auc_delta_low", "auc_delta_high")),
    }
    assert ev.check_evidence(make_evidence(evaluation=no_champion), GATES, now=NOW) == []
    unpaired = {**make_evidence()["evaluation"], "auc_delta_low": None}
    assert ev.check_evidence(make_evidence(evaluation=unpaired), GATES, now=NOW) == [
        "evaluation.auc_delta_low is missing or not a number: no paired comparison with the champion version 2"
    ]


def test_a_base_rate_model_fails_and_ece_is_no_longer_a_gate():
    """Always predicting the base rate: perfectly calibrated (tiny ECE), AUC 0.5, Brier skill 0."""
    evaluation = {
        **make_evidence()["evaluation"],
        "auc": 0.5,
        "auc_low": 0.5,
        "brier_skill": 0.0,
        "ece": 0.005,
        **dict.fromkeys(("champion_version", "champion_auc", "auc_delta", "auc_delta_low", "auc_delta_high")),
    }
    assert ev.check_evidence(make_evidence(evaluation=evaluation), GATES, now=NOW) == [
        "AUC 0.5000 < 0.75 (gates.min_auc)",
        "Brier skill 0.000 < 0.05 (gates.min_brier_skill)",
    ]
    badly_calibrated = {**make_evidence()["evaluation"], "ece": 0.3}  # reported, not judged: Brier skill judges
    assert ev.check_evidence(make_evidence(evaluation=badly_calibrated), GATES, now=NOW) == []


def test_same_evidence_passes_dev_and_fails_prod():
    evaluation = {
        **make_evidence()["evaluation"],
        "auc": 0.76,
        **dict.fromkeys(("champion_version", "champion_auc", "auc_delta", "auc_delta_low", "auc_delta_high")),
    }
    evidence = make_evidence(evaluation=evaluation)
    dev = load_stack(ROOT / "stacks" / "Pulumi.dev.yaml").gates.model_dump()
    prod = load_stack(ROOT / "stacks" / "Pulumi.prod.yaml").gates.model_dump()
    assert ev.check_evidence(evidence, dev, now=NOW) == []
    assert ev.check_evidence(evidence, prod, now=NOW) == ["AUC 0.7600 < 0.8 (gates.min_auc)"]


def test_stale_and_future_evidence():
    evidence = make_evidence()
    later = NOW + timedelta(days=40)
    assert ev.check_evidence(evidence, GATES, now=later) == [
        "stale evidence: created 2025-02-28T12:00:00+00:00 is 41 days old, more than gates.max_evidence_age_days=30"
    ]
    assert ev.check_evidence(evidence, {**GATES, "max_evidence_age_days": 60}, now=later) == []
    early = NOW - timedelta(days=2)
    assert ev.check_evidence(evidence, GATES, now=early) == [
        "evidence created_at 2025-02-28T12:00:00+00:00 lies in the future"
    ]


def test_malformed_values_are_reasons_not_crashes():
    evaluation = {**make_evidence()["evaluation"], "auc": "high"}
    gates = make_evidence()["gates"]
    gates["drift"] = "ok"
    reasons = ev.check_evidence(
        make_evidence(evaluation=evaluation, gates=gates, created_at="yesterday"), GATES, now=NOW
    )
    assert "evaluation.auc is missing or not a number" in reasons
    assert "missing gate result 'drift'" in reasons
    assert "malformed created_at 'yesterday': expected an ISO-8601 time" in reasons
    assert ev.check_evidence(["not", "a", "dict"], GATES, now=NOW) == [  # type: ignore[arg-type]
        "malformed evidence: expected a mapping, got list"
    ]
    body = make_evidence()
    for field in ("positives", "brier_skill"):
        del body["evaluation"][field]
    reasons = ev.check_evidence(ev.seal(body), GATES, now=NOW)
    assert reasons == [
        "evaluation.positives is missing or not a number",
        "evaluation.brier_skill is missing or not a number",
    ]
