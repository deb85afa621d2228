"""Gates: clean data passes, each injected fault fails the gate that owns it, and drift equals Evidently.

Which gate catches which fault:
    covariate drift      drift gate (drift share above gates.drift.max_drift_share)
    out-of-range values  validation (range/category share) and OOD (outside the reference envelope)
    missing values       validation (missing share)
    missing column       all three (validation: required column; drift and OOD: cannot compare)
    wrong types          all three (validation: dtype; drift and OOD: not numeric)
    label shift          drift gate, when both sides are labelled (a proportion test of the
                         positive rate); the prior shift also drags label-correlated features along
    regression labels    validation (numbers inside the contract's label_range), a batch's "labels"
                         (one value where the reference varies) and "label shift" (the calibrated
                         distance test of the label's distribution), and the drift gate
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wasserstein_distance

from loopform.contract import Contract, Feature
from loopform.gates import (
    DriftInputError,
    GateResult,
    compute_drift,
    drift_gate,
    fit_envelope,
    ood_gate,
    profile,
    validate_data,
)
from loopform.gates.drift import evidently_decisions, wasserstein_sorted
from loopform.gates.ood import tail_quantiles
from loopform.gates.report import write_summary_report
from loopform.gates.validation import validate_batch
from loopform.spec import DriftGate, GatesSpec
from models.fraud.contract import CONTRACT
from models.fraud.data import FEATURE_NAMES, LABEL, NUMERIC, generate

GATES = GatesSpec()
COLUMNS = list(FEATURE_NAMES)
KINDS = CONTRACT.kinds


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    return generate(20_000, 7)


@pytest.fixture(scope="module")
def clean() -> pd.DataFrame:
    return generate(5_000, 11)


# --- result ------------------------------------------------------------------------------------------


def test_gate_result_json_round_trip(tmp_path: Path) -> None:
    result = GateResult(
        "drift",
        False,
        {"drift_share": np.float64(0.5), "n": np.int64(3), "nan": float("nan"), "per": {"a": (1, 2)}},
        ["too much"],
        None,
    )
    path = result.write_json(tmp_path / "sub" / "drift.json")
    raw = json.loads(path.read_text())
    assert raw == {
        "gate": "drift",
        "passed": False,
        "metrics": {"drift_share": 0.5, "n": 3, "nan": None, "per": {"a": [1, 2]}},
        "failures": ["too much"],
        "report": None,
    }
    back = GateResult.read_json(path)
    assert back.to_dict() == raw
    assert "too much" in back.summary()
    with pytest.raises(ValueError, match="passed"):
        GateResult.from_dict({"gate": "x", "passed": "yes"})
    with pytest.raises(ValueError, match="unknown"):
        GateResult.from_dict({"gate": "x", "passed": True, "extra": 1})


# --- validation ---------------------------------------------------------------------------------------


def test_validation_passes_clean(clean: pd.DataFrame) -> None:
    result = validate_data(clean, GATES, CONTRACT, require_label=True)
    assert result.passed, result.failures
    assert result.metrics["worst_out_of_range_share"] == 0.0
    assert 0.01 < result.metrics["label_rate"] < 0.06


@pytest.mark.parametrize("dtype", ["category", "string"])
def test_validation_accepts_other_string_storage(clean: pd.DataFrame, dtype: str) -> None:
    assert validate_data(clean.astype({"channel": dtype, "merchant_category": dtype}), GATES, CONTRACT).passed
    assert validate_data(clean.astype({"hour_of_day": "Int64"}), GATES, CONTRACT).passed


def test_validation_unlabelled_serving_data(clean: pd.DataFrame) -> None:
    assert validate_data(clean.drop(columns=[LABEL]), GATES, CONTRACT).passed
    result = validate_data(clean.drop(columns=[LABEL]), GATES, CONTRACT, require_label=True)
    assert not result.passed and result.failures == [f"missing column {LABEL!r}"]


@pytest.mark.parametrize(
    ("fault", "needle"),
    [
        ({"out_of_range": 0.05}, "outside its range"),
        ({"out_of_range": 0.05}, "outside its categories"),
        ({"missing_column": "distance_from_home_km"}, "missing column 'distance_from_home_km'"),
        ({"wrong_types": "amount"}, "column 'amount' has dtype object, expected float64"),
        ({"wrong_types": "channel"}, "column 'channel' has dtype int64, expected strings"),
        ({"wrong_types": "event_timestamp"}, "expected timezone-aware datetimes"),
        ({"missing_values": 0.1}, "missing values, above gates.max_missing_share"),
    ],
)
def test_validation_fails_each_fault(fault: dict, needle: str) -> None:
    result = validate_data(generate(3_000, 5, **fault), GATES, CONTRACT, require_label=True)
    assert not result.passed
    assert any(needle in f for f in result.failures), result.failures


def test_validation_thresholds_come_from_the_spec() -> None:
    data = generate(3_000, 5, out_of_range=0.005)
    assert not validate_data(data, GatesSpec(max_out_of_range_share=0.001), CONTRACT).passed
    assert validate_data(data, GatesSpec(max_out_of_range_share=0.02), CONTRACT).passed


def test_validation_other_breakage(clean: pd.DataFrame) -> None:
    assert validate_data(clean.iloc[:0], GATES, CONTRACT).failures == ["data set is empty"]
    dup = pd.concat([clean, clean.iloc[:3]])
    assert any("duplicate" in f for f in validate_data(dup, GATES, CONTRACT).failures)
    bad_label = clean.assign(**{LABEL: clean[LABEL] * 2})
    assert any("other than 0/1" in f for f in validate_data(bad_label, GATES, CONTRACT).failures)
    fractional = clean.assign(hour_of_day=clean["hour_of_day"] + 0.5)
    assert any("fractional" in f for f in validate_data(fractional, GATES, CONTRACT).failures)


# --- drift -----------------------------------------------------------------------------------------


def test_drift_gate_passes_clean(reference: pd.DataFrame, clean: pd.DataFrame) -> None:
    result = drift_gate(reference, clean, GATES, CONTRACT)
    assert result.passed, result.failures
    assert result.metrics["drift_share"] <= GATES.drift.max_drift_share
    assert set(result.metrics["features"]) == set(FEATURE_NAMES)
    assert result.metrics["label"]["shifted"] is False


def test_drift_gate_fails_covariate_drift(reference: pd.DataFrame) -> None:
    result = drift_gate(reference, generate(5_000, 11, covariate_drift=0.5), GATES, CONTRACT)
    assert not result.passed
    assert result.metrics["drift_share"] > GATES.drift.max_drift_share
    assert {"amount", "distance_from_home_km", "txn_count_24h"} <= set(result.metrics["drifted"])
    assert "max_drift_share=0.3" in result.failures[0]
    # A looser environment lets the same data through.
    loose = GatesSpec(drift=DriftGate(max_drift_share=0.9))
    assert drift_gate(reference, generate(5_000, 11, covariate_drift=0.5), loose, CONTRACT).passed


def test_drift_gate_catches_label_shift(reference: pd.DataFrame) -> None:
    shifted = generate(5_000, 11, label_shift=0.2)
    result = drift_gate(reference, shifted, GatesSpec(drift=DriftGate(max_drift_share=0.9)), CONTRACT)
    assert not result.passed
    assert result.metrics["label"]["shifted"] is True
    assert any("label shift" in f for f in result.failures)
    # Unlabelled traffic: the label is simply not compared.
    assert drift_gate(reference, generate(5_000, 11).drop(columns=[LABEL]), GATES, CONTRACT).metrics["label"] is None


@pytest.mark.parametrize(
    ("fault", "needle"),
    [
        ({"missing_column": "amount"}, "current data lacks column(s) 'amount'"),
        ({"wrong_types": "amount"}, "column 'amount' in current data should be numeric"),
    ],
)
def test_drift_gate_fails_broken_input(reference: pd.DataFrame, fault: dict, needle: str) -> None:
    result = drift_gate(reference, generate(2_000, 3, **fault), GATES, CONTRACT)
    assert not result.passed and needle in result.failures[0]
    with pytest.raises(DriftInputError):
        compute_drift(reference, generate(2_000, 3, **fault), COLUMNS, kinds=KINDS)


def test_drift_thresholds_come_from_the_spec(reference: pd.DataFrame) -> None:
    current = generate(5_000, 11, covariate_drift=0.1)
    strict = compute_drift(reference, current, COLUMNS, GatesSpec(drift=DriftGate(feature_threshold=0.01)), kinds=KINDS)
    loose = compute_drift(reference, current, COLUMNS, GatesSpec(drift=DriftGate(feature_threshold=0.5)), kinds=KINDS)
    assert strict.drift_share == 1.0 and loose.drift_share == 0.0
    assert {f.threshold for f in strict.features.values()} == {0.01}
    small = compute_drift(reference.iloc[:500], current, COLUMNS, GatesSpec(drift=DriftGate(p_value=0.2)), kinds=KINDS)
    assert {f.threshold for f in small.features.values()} == {0.2}


def test_profile_reuse_gives_the_same_stats(reference: pd.DataFrame, clean: pd.DataFrame) -> None:
    direct = compute_drift(reference, clean, COLUMNS, kinds=KINDS)
    reused = compute_drift(profile(reference, COLUMNS, kinds=KINDS), clean, COLUMNS, workers=1)
    assert direct.to_dict() == reused.to_dict()


@pytest.mark.parametrize(("n", "m"), [(1, 1), (1, 7), (9, 2), (50, 50), (300, 1_001), (4_000, 1_500)])
def test_wasserstein_equals_scipy(n: int, m: int) -> None:
    rng = np.random.default_rng(n * 31 + m)
    u, v = rng.normal(size=n), rng.gamma(2.0, size=m)
    assert wasserstein_sorted(np.sort(u), np.sort(v)) == pytest.approx(wasserstein_distance(u, v), rel=1e-12)
    u, v = np.round(u * 2), np.round(v * 2)  # heavy ties
    assert wasserstein_sorted(np.sort(u), np.sort(v)) == pytest.approx(wasserstein_distance(u, v), rel=1e-12, abs=1e-15)


def _evidently(reference: pd.DataFrame, current: pd.DataFrame, columns: list[str]) -> tuple[dict, float]:
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    numeric = [c for c in columns if c in NUMERIC or pd.api.types.is_float_dtype(reference[c])]
    definition = DataDefinition(numerical_columns=numeric, categorical_columns=[c for c in columns if c not in numeric])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        snapshot = Report([DataDriftPreset(columns=columns)]).run(
            Dataset.from_pandas(current[columns], data_definition=definition),
            Dataset.from_pandas(reference[columns], data_definition=definition),
        )
    raw = snapshot.dict()
    share = next(m["value"]["share"] for m in raw["metrics"] if m["config"]["type"].endswith(":DriftedColumnsCount"))
    return evidently_decisions(raw), share


def _assert_same(ours, theirs: dict, share: float) -> None:
    assert set(theirs) == set(ours.features)
    for name, feature in ours.features.items():
        assert feature.method == theirs[name]["method"], name
        assert feature.threshold == theirs[name]["threshold"], name
        assert feature.drifted == theirs[name]["drifted"], name
        assert feature.score == pytest.approx(theirs[name]["score"], rel=1e-9, abs=1e-12), name
    assert ours.drift_share == pytest.approx(share)


@pytest.mark.parametrize(
    ("ref_rows", "cur_rows", "drift", "missing"),
    [
        (300, 5_000, 0.0, 0.0),  # small reference: ks, z and chi-square
        (300, 5_000, 0.5, 0.0),
        (1_000, 700, 0.2, 0.05),  # boundary: still tests; NaN dropped on both sides
        (1_001, 700, 0.2, 0.05),  # just above: distances
        (5_000, 5_000, 0.0, 0.0),  # Wasserstein and Jensen-Shannon
        (5_000, 5_000, 0.5, 0.0),
    ],
)
def test_same_decisions_as_evidently(ref_rows: int, cur_rows: int, drift: float, missing: float) -> None:
    reference = generate(ref_rows, 1, missing_values=missing)
    current = generate(cur_rows, 2, covariate_drift=drift, missing_values=missing)
    theirs, share = _evidently(reference, current, COLUMNS)
    ours = compute_drift(reference, current, COLUMNS, kinds=KINDS)
    _assert_same(ours, theirs, share)
    if drift:
        assert ours.drifted  # the comparison is not trivially all-clean


def test_same_decisions_as_evidently_edge_columns() -> None:
    """Few distinct values, unseen categories, constants and infinities, on both sides of 1000 rows."""
    rng = np.random.default_rng(5)
    for ref_rows in (400, 3_000):
        frames = []
        for rows, shift in ((ref_rows, 0), (600, 1)):
            frames.append(
                pd.DataFrame(
                    {
                        "three": rng.integers(0, 3, rows).astype(float) + (rng.random(rows) < 0.2 * shift),
                        "binary": (rng.random(rows) < 0.3 + 0.2 * shift).astype(float),
                        "constant": np.full(rows, 2.0),
                        "skewed": np.where(rng.random(rows) < 0.01, np.inf, rng.lognormal(shift * 0.2, 1, rows)),
                        "colour": rng.choice(["red", "green", "blue"] + ["violet"] * shift, rows),
                        "flag": rng.choice(["yes", "no"], rows, p=[0.5 + 0.1 * shift, 0.5 - 0.1 * shift]),
                    }
                )
            )
        columns = list(frames[0].columns)
        theirs, _ = _evidently(frames[0], frames[1], columns)
        ours = compute_drift(frames[0], frames[1], columns, kinds={"colour": "categorical", "flag": "categorical"})
        # Evidently's DriftedColumnsCount (legacy path) drops NaN but keeps +-inf when a column has no
        # NaN, so its count can disagree with its own ValueDrift metrics; we follow ValueDrift.
        _assert_same(ours, theirs, sum(t["drifted"] for t in theirs.values()) / len(theirs))
        assert {f.method for f in ours.features.values()} >= (
            {"chisquare", "z", "ks"} if ref_rows <= 1000 else {"jensenshannon", "wasserstein"}
        )


def test_drift_gate_report_shows_the_exact_statistics(tmp_path: Path, reference: pd.DataFrame) -> None:
    """The report carries every feature's Evidently method, score and decision and the calibrated one, says how
    it was made, and draws the distributions from the sorted columns: a Profile reference gives the same page."""
    current = generate(1_500, 12, covariate_drift=0.5)
    path = tmp_path / "reports" / "drift.html"
    result = drift_gate(reference.iloc[:3_000], current, GATES, CONTRACT, report_path=path)
    assert result.report == str(path)
    html = path.read_text()
    assert "<html" in html.lower() and "How this report was made" in html and "all rows, no sample" in html
    for name, feature in result.metrics["features"].items():
        section = html[html.index(f"<section id='f-{name}'>") :]
        assert f"{feature['method_display']} {feature['score']:.4g}" in section[:400], name
        assert "<svg" in section[: section.index("</section>")], name
    drifted = html.count("<span class=drift>drifted</span>")
    calibrated = result.metrics["features"].values()
    assert drifted == sum(f["drifted"] + f["calibrated"]["drifted"] for f in calibrated) > 0
    assert "Decision: <span class='drift'>DRIFT</span>" in html
    again = tmp_path / "again.html"
    drift_gate(profile(reference.iloc[:3_000], [*COLUMNS, LABEL], kinds=KINDS), current, GATES, CONTRACT, again)
    assert again.read_text() == html
    saved = GateResult.read_json(result.write_json(tmp_path / "drift.json"))
    assert saved.metrics["drift_share"] == result.metrics["drift_share"] and not saved.passed


def test_summary_report_of_broken_and_clean_data(tmp_path: Path, reference: pd.DataFrame, clean: pd.DataFrame) -> None:
    path = write_summary_report(clean, reference, CONTRACT, tmp_path / "ood.html")
    html = path.read_text()
    assert "How this report was made" in html and html.count("<section>") == len(COLUMNS)
    assert f"{clean['merchant_category'].nunique():,}" in html
    broken = generate(500, 3, wrong_types="txn_count_24h", missing_values=0.3)
    html = write_summary_report(broken, None, CONTRACT, tmp_path / "validation.html").read_text()
    assert "txn_count_24h" in html and "reference" not in html.split("</h1>", 1)[1].split("<section>", 2)[1]


# --- OOD -------------------------------------------------------------------------------------------


def test_ood_gate_passes_clean(reference: pd.DataFrame, clean: pd.DataFrame) -> None:
    result = ood_gate(reference, clean, GATES, CONTRACT)
    assert result.passed, result.failures
    assert result.metrics["ood_rate"] < 0.01


@pytest.mark.parametrize(
    ("fault", "needle"),
    [
        ({"out_of_range": 0.05}, "out of distribution"),
        ({"missing_column": "card_age_days"}, "lacks column 'card_age_days'"),
        ({"wrong_types": "txn_count_24h"}, "'txn_count_24h' should be numeric"),
    ],
)
def test_ood_gate_fails_each_fault(reference: pd.DataFrame, fault: dict, needle: str) -> None:
    result = ood_gate(reference, generate(3_000, 9, **fault), GATES, CONTRACT)
    assert not result.passed
    assert any(needle in f for f in result.failures), result.failures


@pytest.mark.parametrize("quantile", [0.0, 0.001, 0.01, 0.37, 0.4999])
def test_tail_quantiles_equal_numpy_bit_for_bit(quantile: float) -> None:
    """The envelope's quantiles partition only the tails, yet equal np.quantile's exactly (ties, constants, order)."""
    rng = np.random.default_rng(int(quantile * 1e4))
    for values in (
        rng.lognormal(size=50_003),
        np.round(rng.normal(size=120_000), 1),
        rng.integers(0, 4, 30_000).astype(float),
        np.sort(rng.normal(size=40_000))[::-1].copy(),
        np.full(25_000, 2.5),
    ):
        expected = np.quantile(values, [quantile, 1 - quantile])
        assert tail_quantiles(values, quantile) == (float(expected[0]), float(expected[1]))


def test_ood_envelope_from_a_profile_equals_the_data(reference: pd.DataFrame) -> None:
    """The stored reference of a release (sorted columns) gives the envelope the data gives."""
    stored = profile(reference, COLUMNS, kinds=KINDS)
    assert fit_envelope(stored, COLUMNS, kinds=KINDS) == fit_envelope(reference, COLUMNS, kinds=KINDS)
    current = generate(3_000, 9, out_of_range=0.05)
    assert (
        ood_gate(stored, current, GATES, CONTRACT).to_dict() == ood_gate(reference, current, GATES, CONTRACT).to_dict()
    )


def test_ood_counts_unseen_categories_and_extremes(reference: pd.DataFrame, clean: pd.DataFrame) -> None:
    envelope = fit_envelope(reference, COLUMNS, kinds=KINDS)
    current = clean.copy()
    current.loc[current.index[:400], "merchant_category"] = "casino"
    current.loc[current.index[200:600], "amount"] = 10 * envelope.bounds["amount"][1]
    current.loc[current.index[600:700], "amount"] = np.nan  # missing is not OOD
    result = ood_gate(envelope, current, GATES, CONTRACT)
    assert not result.passed
    assert result.metrics["ood_rows"] >= 600
    assert result.metrics["per_feature"]["merchant_category"] == pytest.approx(400 / len(current))
    assert GatesSpec(max_ood_rate=0.2).max_ood_rate > result.metrics["ood_rate"]
    assert ood_gate(envelope, current, GatesSpec(max_ood_rate=0.2), CONTRACT).passed


# --- a regression contract ----------------------------------------------------------------------------

TRIPS = Contract(
    model="trips",
    task="regression",
    id="trip_id",
    entity="driver_id",
    entity_description="A driver.",
    timestamp="event_timestamp",
    label="minutes",
    label_description="Minutes from pick-up to drop-off.",
    label_range=(1.0, 180.0),
    feature_service="trips_v1",
    entity_view="driver_stats",
    features=(
        Feature("distance_km", "numeric", "float64", 0.0, 100.0, None, "Trip distance."),
        Feature("zone", "categorical", "string", None, None, ("north", "south", "centre"), "Pick-up zone."),
        Feature("trips_7d", "numeric", "int64", 0.0, 500.0, None, "The driver's trips in the 7 days before.", "entity"),
    ),
)
START = pd.Timestamp("2024-01-01", tz="UTC")


def trips(rows: int, seed: int, *, day: int = 0, days: int = 30, scale: float = 1.0) -> pd.DataFrame:
    """Labelled trips from `day` on: minutes grow with distance, times `scale` (1.3: a 30% longer label)."""
    rng = np.random.default_rng(seed)
    distance = rng.gamma(2.0, 4.0, rows)
    seconds = np.sort(rng.integers(0, days * 86_400, rows))
    return pd.DataFrame(
        {
            "trip_id": [f"trip-{seed}-{i}" for i in range(rows)],
            "driver_id": rng.integers(1, 200, rows).astype(np.int64),
            "event_timestamp": START + pd.to_timedelta(day * 86_400 + seconds, unit="s"),
            "distance_km": distance,
            "zone": rng.choice(["north", "south", "centre"], rows),
            "trips_7d": rng.poisson(40, rows).astype(np.int64),
            "minutes": np.clip(5 + 2.5 * distance + rng.normal(0, 5, rows), 1, 120) * scale,
        }
    )


@pytest.fixture(scope="module")
def trip_history() -> pd.DataFrame:
    return trips(5_000, 1)


def test_regression_validation_checks_the_label_range() -> None:
    clean = trips(2_000, 2)
    result = validate_data(clean, GATES, TRIPS, require_label=True)
    assert result.passed, result.failures
    assert result.metrics["label_mean"] == pytest.approx(clean["minutes"].mean())
    outside = clean.assign(minutes=clean["minutes"].where(clean.index >= 5, 500.0))
    failures = validate_data(outside, GATES, TRIPS, require_label=True).failures
    assert any("column 'minutes' has 5 values outside its range [1, 180] (e.g. 500.0)" in f for f in failures), failures
    text = validate_data(clean.assign(minutes=clean["minutes"].astype(str)), GATES, TRIPS).failures
    assert any(
        f.startswith("column 'minutes' has dtype") and "expected numbers in its range [1, 180]" in f for f in text
    ), text


def test_regression_batch_of_one_label_value_is_refused(trip_history: pd.DataFrame) -> None:
    batch = trips(400, 3, day=30, days=1).assign(minutes=30.0)
    report = validate_batch(batch, GATES, TRIPS, reference=trip_history, stored=trip_history, accept_shift="waived")
    labels = next(c for c in report.checks if c.name == "labels")
    assert not labels.passed and not labels.against_reference  # a broken labeller: never waived
    assert "labels" in [c.name for c in report.failed]
    assert "distinct labels 1 of 400 rows (all 30) where the reference has" in labels.failures[0]


def test_regression_label_shift_of_a_batch(trip_history: pd.DataFrame) -> None:
    clean = validate_batch(trips(400, 4, day=30, days=1), GATES, TRIPS, reference=trip_history, stored=trip_history)
    assert clean.passed, clean.failure_lines()
    assert {c.name for c in clean.checks} >= {"labels", "label shift", "drift", "ood"}
    longer = trips(400, 4, day=30, days=1, scale=1.3)  # the same trips, 30% longer
    report = validate_batch(longer, GATES, TRIPS, reference=trip_history, stored=trip_history)
    assert [c.name for c in report.failed] == ["label shift"]
    shift = report.failed[0]
    assert shift.metrics["mean"] == pytest.approx(1.3 * shift.metrics["reference_mean"], rel=0.1)
    assert "(gates.drift.label_shift_p_value)" in shift.failures[0], shift.failures
    accepted = validate_batch(longer, GATES, TRIPS, reference=trip_history, stored=trip_history, accept_shift="new")
    assert accepted.passed and [c.name for c in accepted.accepted] == ["label shift"]


def test_drift_gate_reports_a_regression_label_shift(trip_history: pd.DataFrame) -> None:
    assert drift_gate(trip_history, trips(1_000, 5), GATES, TRIPS).metrics["label"]["drifted"] is False
    longer = trips(1_000, 5, scale=1.3)
    result = drift_gate(trip_history, longer, GATES, TRIPS)
    assert not result.passed and result.metrics["drifted"] == []  # the features did not move, the label did
    label = result.metrics["label"]
    assert label["drifted"] and label["test"] == "calibrated normed Wasserstein"
    assert any("label 'minutes' shifted" in f and "gates.drift.label_shift_p_value=0.01" in f for f in result.failures)
    # A Profile reference (profiled once, with the label) gives the same label test.
    with_label = profile(trip_history, [*TRIPS.feature_names, TRIPS.label], kinds={"zone": "categorical"})
    assert drift_gate(with_label, longer, GATES, TRIPS).metrics["label"] == label
