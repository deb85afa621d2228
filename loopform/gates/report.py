"""The gates' HTML reports, drawn from the numbers the gates computed, at a small part of their cost.

Evidently's reports recompute everything on the full data and build a plotly figure per column:
its DataDriftPreset takes 10-150x the drift statistics themselves, and even on a 500-row sample
about 0.11 s per column of fixed plotly cost (bench/README.md), more than the statistics at 200,000
rows. So the reports are written here, as one self-contained HTML page without scripts:

- the drift report (`write_drift_report`) shows loopform's exact statistics over all rows: per
  feature Evidently's method, score, threshold and decision (tested to equal Evidently's DataDriftPreset,
  tests/test_gates.py) beside the calibrated decision, and each feature's distributions drawn from the
  sorted columns the statistics were computed from (no sample, no second pass over the data);
- the data summary (`write_summary_report`) of the validation and OOD gates: per column missing share,
  range, mean and tail quantiles or the commonest categories, with histograms, without sorting a column.

Each page says so in a visible note.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from loopform.gates.ood import tail_quantiles

if TYPE_CHECKING:
    import pandas as pd

    from loopform.contract import Contract
    from loopform.gates.drift import ColumnProfile, DriftStats

BINS = 30
TOP_CATEGORIES = 15
TAIL = 0.005  # histograms span the [TAIL, 1 - TAIL] quantiles of both sides; the rest is counted as tails
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)  # of the drift report's sorted columns: free to read
SUMMARY_TAIL = 0.01  # the summary's quantiles: its tails, found without sorting (loopform.gates.ood.tail_quantiles)
REFERENCE_COLOUR, CURRENT_COLOUR = "#8a9bb0", "#e8743b"
_DRIFT_NUMBERS = (
    "Every number and decision in this report is loopform's exact statistic over all rows "
    "(loopform.gates.drift): Evidently 0.7.23's default method per column with its thresholds and comparisons, "
    "tested to equal Evidently's DataDriftPreset."
)
DRIFT_NOTE = _DRIFT_NUMBERS + (
    " The distributions are drawn from the same sorted columns (all rows, no sample). Evidently's own report is "
    "not run: it would recompute everything on the full data."
)
#: The out-of-core gate (loopform.gates.out_of_core) sorts its columns on disk and keeps none in memory.
DRIFT_NOTE_OUT_OF_CORE = _DRIFT_NUMBERS + (
    " Computed out of core (DuckDB over the window's Parquet): the columns were sorted on disk, so this report "
    "has no distribution pictures."
)
SUMMARY_NOTE = (
    "Computed by loopform over all rows, without sorting a column (loopform.gates.report): missing share, "
    "range, mean, 1% and 99% quantiles and histogram of numeric columns, the commonest values of categorical "
    "ones. The gate's decision and its numbers are in the gate's JSON result."
)
_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
.note{background:#fff7e0;border-left:4px solid #e8b43b;padding:.6em 1em;margin:1em 0}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f2f2f2}td.l,th.l{text-align:left}.drift{color:#b00020;font-weight:600}
section{margin:1.5em 0;border-top:1px solid #ddd;padding-top:.5em}.legend span{margin-right:1em}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return _e(value)
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        return f"{float(value):.4g}"
    return _e(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    head = "".join(f"<th{' class=l' if i < left else ''}>{_e(h)}</th>" for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f"<td{' class=l' if i < left else ''}>{cell}</td>" for i, cell in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _bars(labels: Sequence[str], reference: np.ndarray | None, current: np.ndarray) -> str:
    """Inline SVG of shares per bin or category: reference and current bars side by side."""
    width, height, pad = 640, 150, 18
    n = max(len(labels), 1)
    slot = (width - 2 * pad) / n
    top = float(max(current.max(initial=0.0), 0.0 if reference is None else reference.max(initial=0.0))) or 1.0
    sides = (
        [(current, CURRENT_COLOUR)] if reference is None else [(reference, REFERENCE_COLOUR), (current, CURRENT_COLOUR)]
    )
    bar = slot / len(sides) * 0.9
    shapes = []
    for k, (shares, colour) in enumerate(sides):
        for i, share in enumerate(shares):
            h = (height - 2 * pad) * float(share) / top
            x = pad + i * slot + k * bar
            shapes.append(
                f'<rect x="{x:.1f}" y="{height - pad - h:.1f}" width="{bar:.1f}" height="{h:.1f}" fill="{colour}">'
                f"<title>{_e(labels[i])}: {float(share):.2%}</title></rect>"
            )
    ticks = [0, n // 2, n - 1] if n > 3 else list(range(n))
    text = "".join(
        f'<text x="{pad + i * slot:.1f}" y="{height - 3}" font-size="10">{_e(labels[i])[:18]}</text>' for i in ticks
    )
    return f'<svg width="{width}" height="{height}" role="img">{"".join(shapes)}{text}</svg>'


def _legend(with_reference: bool) -> str:
    reference = f'<span style="color:{REFERENCE_COLOUR}">&#9632; reference</span>' if with_reference else ""
    return f'<div class="legend">{reference}<span style="color:{CURRENT_COLOUR}">&#9632; current</span></div>'


def _page(title: str, note: str, sections: Sequence[str]) -> str:
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_e(title)}</title><style>{_STYLE}</style></head>"
        f"<body><h1>{_e(title)}</h1><p class='note'><b>How this report was made.</b> {_e(note)}</p>"
        + "".join(sections)
        + "</body></html>\n"
    )


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- distributions from sorted columns ------------------------------------------------------------


def _edges(sides: Sequence[np.ndarray]) -> np.ndarray:
    """BINS equal bins over the [TAIL, 1 - TAIL] quantiles of the sorted sides together."""
    low = min(float(s[int(TAIL * (s.size - 1))]) for s in sides)
    high = max(float(s[int(np.ceil((1 - TAIL) * (s.size - 1)))]) for s in sides)
    if high <= low:
        high = low + 1.0
    return np.linspace(low, high, BINS + 1)


def _sorted_shares(values: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(share per bin, share below, share above) of a sorted array: a binary search per edge, no pass."""
    cut = np.searchsorted(values, edges, side="left")
    cut[-1] = np.searchsorted(values, edges[-1], side="right")
    n = max(values.size, 1)
    return np.diff(cut) / n, cut[0] / n, (values.size - cut[-1]) / n


def _quantile_rows(sides: Sequence[tuple[str, np.ndarray]]) -> list[list[str]]:
    """Exact quantiles (linear interpolation, as numpy's) of sorted arrays, and their means."""
    rows = []
    for name, values in sides:
        position = np.asarray(QUANTILES) * (values.size - 1)
        low = np.floor(position).astype(np.int64)
        high = np.minimum(low + 1, values.size - 1)
        quantiles = values[low] + (values[high] - values[low]) * (position - low)
        rows.append([_e(name), *(_number(float(q)) for q in quantiles), _number(float(values.mean()))])
    return rows


def _category_shares(
    reference: tuple[np.ndarray, np.ndarray] | None, current: tuple[np.ndarray, np.ndarray]
) -> tuple[list[str], np.ndarray | None, np.ndarray]:
    """The TOP_CATEGORIES commonest values of both sides (by the larger share), the rest as 'other'."""
    shares: dict[str, list[float]] = {}
    for side, (keys, counts) in enumerate([current] if reference is None else [reference, current]):
        total = max(int(counts.sum()), 1)
        for key, count in zip(keys.tolist(), counts.tolist(), strict=True):
            shares.setdefault(str(key), [0.0, 0.0])[side] += count / total
    ranked = sorted(shares, key=lambda k: (-max(shares[k]), k))
    labels = ranked[:TOP_CATEGORIES]
    table = np.array([shares[k] for k in labels]).reshape(-1, 2)
    if len(ranked) > TOP_CATEGORIES:
        labels.append(f"other ({len(ranked) - TOP_CATEGORIES})")
        table = np.vstack([table, 1.0 - table.sum(axis=0)])
    if reference is None:
        return labels, None, table[:, 0]
    return labels, table[:, 0], table[:, 1]


def _profile_picture(ref: ColumnProfile, cur: ColumnProfile) -> str:
    """Distribution of one feature, reference against current, from its two column profiles."""
    if ref.sorted is not None and cur.sorted is not None and (ref.keys is None or cur.keys is None):
        edges = _edges([ref.sorted, cur.sorted])
        ref_shares, ref_low, ref_high = _sorted_shares(ref.sorted, edges)
        cur_shares, cur_low, cur_high = _sorted_shares(cur.sorted, edges)
        labels = [f"{edges[i]:.4g} to {edges[i + 1]:.4g}" for i in range(BINS)]
        tails = (
            f"<p>Outside the plotted range [{edges[0]:.4g}, {edges[-1]:.4g}]: reference {ref_low:.2%} below, "
            f"{ref_high:.2%} above; current {cur_low:.2%} below, {cur_high:.2%} above.</p>"
        )
        quantiles = _table(
            ["side", *(f"q{q:g}" for q in QUANTILES), "mean"],
            _quantile_rows([("reference", ref.sorted), ("current", cur.sorted)]),
        )
        return _bars(labels, ref_shares, cur_shares) + tails + quantiles
    assert ref.keys is not None and ref.counts is not None and cur.keys is not None and cur.counts is not None
    labels, ref_shares, cur_shares = _category_shares((ref.keys, ref.counts), (cur.keys, cur.counts))
    return _bars(labels, ref_shares, cur_shares)


# --- the drift report -------------------------------------------------------------------------------


def write_drift_report(stats: DriftStats, path: Path, label: Mapping[str, Any] | None = None) -> Path:
    """The drift gate's report: its decision, every feature's statistics and distributions, the label check.

    `stats` must carry its column profiles (`compute_drift(..., keep_profiles=True)`).
    """
    if stats.profiles is None:
        raise ValueError("the drift report draws from the column profiles: compute_drift(..., keep_profiles=True)")
    calibrated = stats.calibrated
    sections = []
    if calibrated is not None:
        verdict = "DRIFT" if calibrated.detected else "no drift"
        sections.append(
            f"<h2>Decision: <span class='{'drift' if calibrated.detected else ''}'>{verdict}</span></h2>"
            f"<p>Calibrated drift share {calibrated.drift_share:.3f} ({len(calibrated.drifted)} of "
            f"{len(calibrated.features)} features: {_e(', '.join(calibrated.drifted) or 'none')}), "
            f"max_drift_share {calibrated.max_drift_share}. Rule: {_e(calibrated.rule())}.</p>"
        )
    sections.append(
        f"<p>Reference {stats.rows_reference:,} rows, current {stats.rows_current:,} rows. Evidently's fixed-threshold "
        f"view: drift share {stats.drift_share:.3f} ({_e(', '.join(stats.drifted) or 'none')}), for reading; "
        "the decision above is the one calibrated to the window's size.</p>"
    )
    rows = []
    for name, feature in stats.features.items():
        own = calibrated.features[name] if calibrated is not None else None
        mark = "<span class=drift>drifted</span>" if feature.drifted else "no"
        row = [
            f"<a href='#f-{_e(name)}'>{_e(name)}</a>",
            _e(feature.kind),
            _e(feature.method_display),
            _number(feature.score),
            _number(feature.threshold),
            mark,
        ]
        if own is not None:
            row += [
                _e(own.statistic),
                _number(own.p_value),
                _number(own.threshold),
                "<span class=drift>drifted</span>" if own.drifted else "no",
            ]
        rows.append(row)
    header = ["feature", "kind", "Evidently method", "score", "threshold", "Evidently decision"]
    if calibrated is not None:
        header += ["calibrated statistic", "p-value", "distance threshold", "calibrated decision"]
    sections.append("<h2>Features</h2>" + _table(header, rows, left=3))
    if label:
        shown = {k: v for k, v in label.items() if not isinstance(v, Mapping | list)}
        sections.append("<h2>Label</h2>" + _table(["field", "value"], [[_e(k), _number(v)] for k, v in shown.items()]))
    for name, (ref, cur) in stats.profiles.items():
        feature = stats.features[name]
        sections.append(
            f"<section id='f-{_e(name)}'><h3>{_e(name)}</h3><p>{_e(feature.method_display)} {feature.score:.4g} "
            f"(threshold {feature.threshold:g}); {ref.n:,} reference and {cur.n:,} current values after dropping "
            f"missing and infinite ones.</p>{_legend(True)}{_profile_picture(ref, cur)}</section>"
        )
    title = f"Drift report: {len(stats.features)} features"
    return _write(path, _page(title, DRIFT_NOTE if stats.profiles else DRIFT_NOTE_OUT_OF_CORE, sections))


# --- the data summary -------------------------------------------------------------------------------


def _numeric_summary(series: pd.Series) -> tuple[np.ndarray, int]:
    """(finite values, count of infinite ones) of a numeric column."""
    values = series.to_numpy(dtype=np.float64, na_value=np.nan)
    finite = np.isfinite(values)
    return values[finite], int(np.count_nonzero(~finite & ~np.isnan(values)))


def _summary_section(name: str, kind: str, current: pd.Series, reference: pd.Series | None) -> str:
    import pandas as pd

    sides = [("current", current)] + ([] if reference is None else [("reference", reference)])
    numbers = all(pd.api.types.is_numeric_dtype(s.dtype) and not pd.api.types.is_bool_dtype(s.dtype) for _, s in sides)
    if kind == "numeric" and numbers:  # a column of the wrong type is summarised by its values
        finite = {side: _numeric_summary(series) for side, series in sides}
        rows = []
        for side, series in sides:
            values, infinite = finite[side]
            stats = ["-"] * 5
            if values.size:
                tails = tail_quantiles(values, SUMMARY_TAIL)
                numbers = (values.min(), tails[0], values.mean(), tails[1], values.max())
                stats = [_number(float(v)) for v in numbers]
            rows.append(
                [_e(side), _number(len(series)), f"{float(series.isna().mean()):.2%}", _number(infinite), *stats]
            )
        header = ["side", "rows", "missing", "infinite", "min", f"q{SUMMARY_TAIL:g}", "mean", f"q{1 - SUMMARY_TAIL:g}"]
        table = _table([*header, "max"], rows)
        present = [v for v, _ in finite.values() if v.size]
        if not present:
            return f"<section><h3>{_e(name)}</h3>{table}</section>"
        ranges = [tail_quantiles(v, TAIL) for v in present]
        low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
        span = (low, high if high > low else low + 1.0)
        shares = {side: np.histogram(v, BINS, span)[0] / max(v.size, 1) for side, (v, _) in finite.items()}
        edges = np.linspace(*span, BINS + 1)
        labels = [f"{edges[i]:.4g} to {edges[i + 1]:.4g}" for i in range(BINS)]
        picture = _bars(labels, shares.get("reference"), shares["current"])
    else:
        counted, rows = {}, []
        for side, series in sides:  # one hash pass counts the values and the missing ones
            every = series.value_counts(dropna=False)
            absent = every.index.isna()
            counted[side] = every[~absent]
            share = float(every[absent].sum()) / max(len(series), 1)
            rows.append([_e(side), _number(len(series)), f"{share:.2%}", _number(len(counted[side]))])
        table = _table(["side", "rows", "missing", "distinct values"], rows)
        as_arrays = {side: (c.index.to_numpy(dtype=object), c.to_numpy()) for side, c in counted.items()}
        labels, ref_shares, cur_shares = _category_shares(as_arrays.get("reference"), as_arrays["current"])
        picture = _bars(labels, ref_shares, cur_shares)
    return f"<section><h3>{_e(name)}</h3>{_legend(reference is not None)}{picture}{table}</section>"


def write_summary_report(
    current: pd.DataFrame,
    reference: pd.DataFrame | None,
    contract: Contract,
    path: Path,
    columns: Sequence[str] | None = None,
) -> Path:
    """Per-column summary of `current` (beside `reference` if given) for the validation and OOD gates."""
    wanted = [c for c in (columns or contract.feature_names) if c in current.columns]
    kinds = contract.kinds
    sections = [
        f"<p>Current {len(current):,} rows"
        + ("" if reference is None else f", reference {len(reference):,} rows")
        + f"; {len(wanted)} columns.</p>"
    ]
    for name in wanted:
        other = None if reference is None or name not in reference.columns else reference[name]
        sections.append(_summary_section(name, kinds.get(name, "categorical"), current[name], other))
    return _write(Path(path), _page(f"Data summary: {len(wanted)} columns", SUMMARY_NOTE, sections))
