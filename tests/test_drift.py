"""The calibrated drift decision and the label-shift test: false alarms bounded at small windows, drift caught.

Statistical checks use fixed seeds and bounds a correct implementation meets with a wide margin (never
wall-clock times). Evidently agreement of the fixed-threshold statistics lives in test_gates.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import distance

from loopform.gates import drift
from loopform.gates.drift import (
    CALIBRATION_MAX_ROWS,
    DriftInputError,
    compute_drift,
    decision_rule,
    drift_gate,
    label_shift,
    null_draws,
    null_scores,
    profile,
    wasserstein_sorted,
)
from loopform.spec import DriftGate, GatesSpec
from models.fraud.contract import CONTRACT
from models.fraud.data import BASE_FRAUD_RATE, FEATURE_NAMES, LABEL, generate

GATES = GatesSpec()
COLUMNS = list(FEATURE_NAMES)
KINDS = CONTRACT.kinds


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return generate(20_000, 21, days=30)  # the local stack's 30 days of history


@pytest.fixture(scope="module")
def ref_profile(reference: pd.DataFrame) -> drift.Profile:
    return profile(reference, COLUMNS, kinds=KINDS)


def test_decision_rule_bounds_the_false_alarm_rate() -> None:
    # 0.3 of 9 features: a window drifts with 3 drifted features, each tested at 0.01 * 3 / 9.
    assert decision_rule(GATES, 9) == (3, pytest.approx(0.01 / 3))
    assert decision_rule(GatesSpec(drift=DriftGate(max_drift_share=0.5)), 4) == (3, pytest.approx(0.0075))
    assert decision_rule(GatesSpec(drift=DriftGate(max_drift_share=1.0)), 9)[0] == 10  # never
    assert decision_rule(GatesSpec(drift=DriftGate(false_alarm_rate=0.05, max_drift_share=0.0)), 5) == (
        1,
        pytest.approx(0.01),
    )
    # Enough draws that NULL_TAIL of them lie beyond each threshold; p = 1 / (draws + 1) is reachable.
    level = decision_rule(GATES, 9)[1]
    assert null_draws(level) >= drift.NULL_TAIL / level - 1 and 1 / (null_draws(level) + 1) <= level


def test_bootstrap_distances_are_exact(ref_profile: drift.Profile) -> None:
    """The O(window) bootstrap equals the plain distance on the same bootstrap windows."""
    rows, draws = 150, 4
    for column in ("amount", "card_age_days", "hour_of_day"):  # continuous, many values, few values
        ref = ref_profile.columns[column]
        assert ref.sorted is not None
        got = drift._null_wasserstein(ref, rows, draws, np.random.default_rng(3))
        rng = np.random.default_rng(3)
        values, counts = np.unique(ref.sorted, return_counts=True)
        if values.size <= drift._DISCRETE_VALUES:
            windows = [np.repeat(values, c) for c in rng.multinomial(rows, counts / ref.n, size=draws)]
        else:
            index = rng.integers(0, ref.n, (draws, rows), dtype=np.int32)
            index.sort(axis=1)
            windows = [ref.sorted[i] for i in index]
        expected = [wasserstein_sorted(ref.sorted, w) / ref.std for w in windows]
        assert got == pytest.approx(expected, rel=1e-9), column
    ref = ref_profile.columns["channel"]
    got = drift._null_jensenshannon(ref, rows, draws, np.random.default_rng(4))
    shares = ref.counts / ref.n
    drawn = np.random.default_rng(4).multinomial(rows, shares, size=draws)
    assert got == pytest.approx([distance.jensenshannon(shares, d / rows) for d in drawn], rel=1e-12)


def test_null_is_cached_per_reference_and_window_size(ref_profile: drift.Profile) -> None:
    ref = ref_profile.columns["amount"]
    first = null_scores(ref, "wasserstein", 222, 999)
    assert null_scores(ref, "wasserstein", 222, 999) is first  # cached
    assert not first.flags.writeable and np.all(np.diff(first) >= 0)
    assert null_scores(ref, "wasserstein", 223, 999) is not first
    # A copy of the same reference (another DataFrame read from the same file) hits the same entry.
    copy = profile(pd.DataFrame({"amount": ref.sorted[::-1].copy()}), ["amount"]).columns["amount"]
    assert null_scores(copy, "wasserstein", 222, 999) is first
    # Large windows reuse the null at CALIBRATION_MAX_ROWS, rescaled: thresholds shrink like sqrt(1/n + 1/m).
    big = compute_drift(ref_profile, generate(3_000, 5, days=1), COLUMNS, GATES, calibrate=True).calibrated
    bigger = compute_drift(ref_profile, generate(6_000, 6, days=1), COLUMNS, GATES, calibrate=True).calibrated
    assert big is not None and bigger is not None
    assert {f.null_rows for f in (*big.features.values(), *bigger.features.values())} == {CALIBRATION_MAX_ROWS}
    ratio = bigger.features["amount"].null_threshold / big.features["amount"].null_threshold
    m = ref.n
    assert ratio == pytest.approx(math.sqrt((1 / 6_000 + 1 / m) / (1 / 3_000 + 1 / m)), rel=1e-9)


def test_calibrated_decision_rarely_fires_on_clean_windows_of_200_rows(ref_profile: drift.Profile) -> None:
    """100 clean one-day windows of 200 rows, the local stack's monitoring.min_rows.

    At a false-alarm rate of 1%, 3 or more triggers in 100 windows has probability 8%; the old rule
    (Evidently's fixed 0.1 thresholds) fires on a large share of these same windows.
    """
    new = old = 0
    for seed in range(100):
        stats = compute_drift(ref_profile, generate(200, 40_000 + seed, days=1), COLUMNS, GATES, calibrate=True)
        assert stats.calibrated is not None
        new += stats.calibrated.detected
        old += stats.drift_share > GATES.drift.max_drift_share
    assert new <= 2
    assert old >= 10


def test_calibrated_decision_detects_the_injected_drift(ref_profile: drift.Profile) -> None:
    """Covariate drift 0.8 (what the local loop injects) is caught in every window of 200 rows."""
    for seed in range(20):
        stats = compute_drift(
            ref_profile, generate(200, 50_000 + seed, days=1, covariate_drift=0.8), COLUMNS, GATES, calibrate=True
        )
        calibrated = stats.calibrated
        assert calibrated is not None and calibrated.detected, calibrated.to_dict()
        # The calibrated decision is never looser than Evidently's threshold: drifted implies distance >= 0.1.
        assert all(f.score >= GATES.drift.feature_threshold for f in calibrated.features.values() if f.drifted)


def test_calibrated_thresholds_follow_the_window_size(ref_profile: drift.Profile) -> None:
    thresholds = {}
    for rows in (200, 1_000):
        stats = compute_drift(ref_profile, generate(rows, 7, days=1), COLUMNS, GATES, calibrate=True)
        assert stats.calibrated is not None
        thresholds[rows] = stats.calibrated.features["amount"]
        feature = stats.calibrated.features["amount"]
        assert feature.threshold == max(feature.null_threshold, feature.effect_threshold)
        assert feature.n_current == rows and feature.null_draws == null_draws(stats.calibrated.feature_level)
        # The Evidently view of the same feature is untouched: same score for the same method.
        assert stats.features["amount"].method == "wasserstein" and stats.features["amount"].score == feature.score
    # Sampling noise shrinks with the window: the 200-row threshold is about sqrt(5) times the 1000-row one.
    assert thresholds[200].null_threshold > 1.8 * thresholds[1_000].null_threshold
    assert thresholds[200].null_threshold > GATES.drift.feature_threshold  # 0.1 is within noise at 200 rows


def test_drift_gate_decides_on_the_calibrated_share(reference: pd.DataFrame) -> None:
    clean = drift_gate(reference, generate(200, 8, days=1), GATES, CONTRACT, labels=False)
    metrics = clean.metrics
    assert clean.passed and metrics["decision"] == "calibrated"
    assert metrics["drift_share"] == len(metrics["drifted"]) / len(COLUMNS)
    assert metrics["calibration"]["false_alarm_rate"] == GATES.drift.false_alarm_rate
    assert metrics["calibration"]["features_needed"] == 3
    assert "clean traffic triggers with probability <= 0.01" in metrics["calibration"]["rule"]
    for name, feature in metrics["features"].items():  # Evidently's view and the decision, side by side
        assert {"method", "score", "threshold", "drifted"} <= set(feature), name
        assert {"statistic", "score", "p_value", "threshold", "drifted"} <= set(feature["calibrated"]), name
    assert set(metrics["evidently"]["drifted"]) == {n for n, f in metrics["features"].items() if f["drifted"]}
    drifted = drift_gate(reference, generate(200, 9, days=1, covariate_drift=0.8), GATES, CONTRACT, labels=False)
    assert not drifted.passed and "false_alarm_rate=0.01" in drifted.failures[0]
    assert "max_drift_share=0.3" in drifted.failures[0]


def test_label_shift_doubling_is_detected_and_no_shift_is_not(reference: pd.DataFrame) -> None:
    doubled = generate(3_000, 60, days=1, label_shift=BASE_FRAUD_RATE)  # fraud rate x2
    shift = label_shift(reference[LABEL], doubled[LABEL], GATES, LABEL)
    assert shift.shifted and shift.p_value < GATES.drift.label_shift_p_value
    assert shift.ratio is not None and 1.6 < shift.ratio < 2.5
    assert shift.current_rate == pytest.approx(doubled[LABEL].mean())
    assert shift.reference_rate == pytest.approx(reference[LABEL].mean())
    assert shift.positives_current == int(doubled[LABEL].sum()) and shift.n_current == 3_000
    halved = label_shift(reference[LABEL], pd.Series(np.r_[np.ones(40), np.zeros(9_960)]), GATES, LABEL)
    assert halved.shifted and halved.ratio is not None and halved.ratio < 0.5  # down counts too

    # No shift: 100 windows of 1000 labelled rows; at p < 0.01, 3 or more alarms has probability 8%.
    alarms = sum(
        label_shift(reference[LABEL], generate(1_000, 70_000 + s, days=1)[LABEL], GATES, LABEL).shifted
        for s in range(100)
    )
    assert alarms <= 2


def test_label_shift_needs_a_large_enough_change() -> None:
    """A significant but small change in a large window is not a label shift (ratio < sqrt(2))."""
    reference = pd.Series(np.r_[np.ones(3_000), np.zeros(97_000)])  # 3%
    current = pd.Series(np.r_[np.ones(3_600), np.zeros(96_400)])  # 3.6%: x1.2, p ~ 1e-13
    shift = label_shift(reference, current, GATES, LABEL)
    assert shift.p_value < 1e-6 and not shift.shifted
    assert shift.decision_ratio == pytest.approx(math.sqrt(2))
    assert label_shift(reference, current, GATES, LABEL, decision_ratio=2.0).decision_ratio == 2
    strict = GatesSpec(drift=DriftGate(label_shift_ratio=1.2))
    assert label_shift(reference, current, strict, LABEL).shifted


def test_label_shift_input() -> None:
    with_missing = pd.Series([1.0, 0.0, np.nan, 0.0])
    shift = label_shift(pd.Series([0, 1, 0, 0]), with_missing, GATES, LABEL)
    assert shift.n_current == 3 and shift.positives_current == 1
    with pytest.raises(DriftInputError, match="not binary"):
        label_shift(pd.Series([0, 1]), pd.Series([0, 2]), GATES, LABEL)
    with pytest.raises(DriftInputError, match="no values"):
        label_shift(pd.Series([0, 1]), pd.Series([np.nan, np.nan]), GATES, LABEL)
    no_positives = label_shift(pd.Series([0] * 100), pd.Series([1] * 20 + [0] * 80), GATES, LABEL)
    assert no_positives.ratio == math.inf and no_positives.shifted
    # Positives in bursts (dispersion 4: variance four times the binomial's) need stronger evidence.
    reference = pd.Series(np.r_[np.ones(300), np.zeros(9_700)])
    current = pd.Series(np.r_[np.ones(40), np.zeros(960)])  # 4% against 3%: x1.33
    doubled = pd.Series(np.r_[np.ones(60), np.zeros(940)])  # x2
    assert label_shift(reference, doubled, GATES, LABEL).shifted
    bursty = label_shift(reference, doubled, GATES, LABEL, dispersion=4.0)
    assert bursty.p_value > label_shift(reference, doubled, GATES, LABEL).p_value and not bursty.shifted
    assert not label_shift(reference, current, GATES, LABEL).shifted
    with pytest.raises(ValueError, match="dispersion"):
        label_shift(reference, current, GATES, LABEL, dispersion=0.5)


def test_drift_gate_reports_label_shift(reference: pd.DataFrame) -> None:
    shifted = generate(3_000, 61, days=1, label_shift=2 * BASE_FRAUD_RATE)  # x3
    labels_only = GatesSpec(drift=DriftGate(max_drift_share=1.0))
    result = drift_gate(reference, shifted, labels_only, CONTRACT)
    assert not result.passed
    label = result.metrics["label"]
    assert label["shifted"] and label["test"].startswith("Fisher")
    assert {"reference_rate", "current_rate", "ratio", "p_value"} <= set(label)
    assert any("label shift" in f and "Fisher exact" in f for f in result.failures)
    unlabelled = generate(3_000, 62, days=1)
    unlabelled[LABEL] = np.nan  # payloads before their labels arrive
    assert drift_gate(reference, unlabelled, GATES, CONTRACT).metrics["label"] is None
    # A Profile reference (profiled once, with the label) gives the same label test.
    with_label = profile(reference, [*COLUMNS, LABEL], kinds=KINDS)
    assert drift_gate(with_label, shifted, labels_only, CONTRACT).metrics["label"] == label


def test_stored_profile_round_trip_is_exact(tmp_path: Path, reference: pd.DataFrame) -> None:
    """A release's stored profile gives the statistics, decisions and label check its data gives; a
    changed byte is refused."""
    from loopform.gates.stored_profile import ProfileDigestError, load_profile, save_profile

    columns = [*COLUMNS, LABEL]
    made = profile(reference, columns, kinds={**KINDS, LABEL: "numeric"})
    path = tmp_path / "reference-profile.npz"
    digest = save_profile(made, path)
    loaded = load_profile(path, digest)
    assert loaded.rows == made.rows and list(loaded.columns) == columns
    for name, column in made.columns.items():
        other = loaded.columns[name]
        assert (other.kind, other.n, other.n_unique, other.std) == (column.kind, column.n, column.n_unique, column.std)
        if column.sorted is not None:
            assert other.sorted is not None and np.array_equal(other.sorted, column.sorted), name
        else:
            assert other.keys is not None and other.keys.tolist() == column.keys.tolist(), name
    assert path.stat().st_size < 8 * sum(c.n for c in made.columns.values())  # runs of repeated values are compact
    current = generate(2_000, 5, days=1, covariate_drift=0.5, label_shift=2 * BASE_FRAUD_RATE)
    direct = drift_gate(reference, current, GATES, CONTRACT)
    assert drift_gate(loaded, current, GATES, CONTRACT).to_dict() == direct.to_dict()
    assert direct.metrics["label"]["shifted"] and direct.metrics["drifted"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ProfileDigestError, match="not the one registered"):
        load_profile(path, digest)
