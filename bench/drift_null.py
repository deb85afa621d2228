"""Null simulation: how often clean traffic triggers retraining, and how often drifted traffic does.

    python bench/drift_null.py                      # 200 seeds, windows of 200, 500 and 1000 rows
    python bench/drift_null.py --seeds 1000 --windows 200

Each seed draws clean windows of served traffic (`models.fraud.data.generate`, one day, as the local
loop sends) and compares them with a 30-day reference of `--reference-rows` rows, under two rules:

- old: Evidently's fixed thresholds (distance >= 0.1 above 1000 reference rows), drift share above
  gates.drift.max_drift_share; label: Evidently's own drift of the label column.
- calibrated: `compute_drift(..., calibrate=True)`, the decision `drift_gate` and the monitor use
  (false-alarm rate gates.drift.false_alarm_rate); label: `label_shift`'s Fisher exact test.

It also draws, per seed and window size, covariate-drifted windows (strength --drift, 0.8 as the
local loop injects) and label-shifted windows (fraud rate x2 and x3), and reports the share that
each rule flags (power). References are shared by `--seeds / --references` seeds each (each new
reference costs one null simulation per window size); every window is fresh. The false-trigger
rates come with a one-sided 95% Clopper-Pearson upper bound. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loopform.gates.drift import compute_drift, decision_rule, label_shift, profile
from loopform.spec import GatesSpec
from models.fraud.contract import CONTRACT
from models.fraud.data import BASE_FRAUD_RATE, FEATURE_NAMES, LABEL, generate

GATES = GatesSpec()
KINDS = CONTRACT.kinds


def upper_bound(hits: int, trials: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound of a rate."""
    from scipy.stats import beta

    return 1.0 if hits >= trials else float(beta.ppf(confidence, hits + 1, trials - hits))


def pct(hits: int, trials: int) -> str:
    return f"{100 * hits / trials:.1f}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=200)
    parser.add_argument("--windows", type=int, nargs="+", default=[200, 500, 1000])
    parser.add_argument("--reference-rows", type=int, default=20_000, help="30-day reference (local stack: 20000)")
    parser.add_argument("--references", type=int, default=20, help="distinct references, shared round-robin")
    parser.add_argument("--drift", type=float, default=0.8, help="covariate drift strength of the drifted windows")
    parser.add_argument("--label-ratios", type=float, nargs="+", default=[2.0, 3.0])
    args = parser.parse_args(argv)
    columns = list(FEATURE_NAMES)
    needed, level = decision_rule(GATES, len(columns))
    drift = GATES.drift
    print(
        f"reference {args.reference_rows:,} rows x 30 days ({args.references} references), {args.seeds} seeds; "
        f"max_drift_share {drift.max_drift_share} (>= {needed} of {len(columns)} features), false_alarm_rate "
        f"{drift.false_alarm_rate} -> per-feature level {level:.4g}; label: ratio {drift.label_shift_ratio}, "
        f"p < {drift.label_shift_p_value}"
    )
    started = time.perf_counter()
    references: dict[int, tuple] = {}
    hits: dict[tuple[str, int, str], int] = defaultdict(int)
    feature_hits: dict[int, int] = defaultdict(int)  # clean windows: features with p <= level (any effect size)
    for seed in range(args.seeds):
        slot = seed % args.references
        if slot not in references:
            reference = generate(args.reference_rows, 10_000 + slot, days=30)
            references[slot] = (
                profile(reference, columns, kinds=KINDS),
                profile(reference, [LABEL], kinds={LABEL: "categorical"}),
                reference[LABEL],
            )
        ref_profile, label_profile, ref_labels = references[slot]
        for n in args.windows:
            base = 1_000_000 + seed * 1_000 + n  # a fresh window per seed and size
            windows = {
                "clean": generate(n, base, days=1),
                "covariate": generate(n, base + 1, days=1, covariate_drift=args.drift),
                **{
                    f"label x{r:g}": generate(n, base + 2 + i, days=1, label_shift=BASE_FRAUD_RATE * (r - 1))
                    for i, r in enumerate(args.label_ratios)
                },
            }
            for name, window in windows.items():
                stats = compute_drift(ref_profile, window, columns, GATES, calibrate=True, workers=1)
                assert stats.calibrated is not None
                hits[(name, n, "old")] += stats.drift_share > drift.max_drift_share
                hits[(name, n, "new")] += stats.calibrated.detected
                old_label = compute_drift(label_profile, window, [LABEL], GATES)
                hits[(name, n, "old label")] += old_label.features[LABEL].drifted
                hits[(name, n, "new label")] += label_shift(ref_labels, window[LABEL], GATES, LABEL).shifted
                if name == "clean":
                    feature_hits[n] += sum(f.p_value <= level for f in stats.calibrated.features.values())
    seconds = time.perf_counter() - started
    seeds = args.seeds

    print()
    print("Retraining triggers (features), share of windows:")
    print()
    print(
        "| window rows | clean: old rule | clean: calibrated (95% upper bound) | covariate "
        f"{args.drift:g}: old rule | covariate {args.drift:g}: calibrated |"
        + "".join(f" label x{r:g} windows: calibrated |" for r in args.label_ratios)
    )
    print("|---:|---:|---:|---:|---:|" + "---:|" * len(args.label_ratios))
    for n in args.windows:
        new_clean = hits[("clean", n, "new")]
        print(
            f"| {n} | {pct(hits[('clean', n, 'old')], seeds)} | {pct(new_clean, seeds)} "
            f"({100 * upper_bound(new_clean, seeds):.1f}%) | {pct(hits[('covariate', n, 'old')], seeds)} | "
            f"{pct(hits[('covariate', n, 'new')], seeds)} |"
            + "".join(f" {pct(hits[(f'label x{r:g}', n, 'new')], seeds)} |" for r in args.label_ratios)
        )
    print()
    print("Label-shift check (labelled windows), share of windows flagged:")
    print()
    print(
        "| window rows | no shift: old (Evidently label drift) | no shift: proportion test |"
        + "".join(f" x{r:g}: old | x{r:g}: proportion test |" for r in args.label_ratios)
    )
    print("|---:|---:|---:|" + "---:|---:|" * len(args.label_ratios))
    for n in args.windows:
        print(
            f"| {n} | {pct(hits[('clean', n, 'old label')], seeds)} | {pct(hits[('clean', n, 'new label')], seeds)} |"
            + "".join(
                f" {pct(hits[(f'label x{r:g}', n, 'old label')], seeds)} |"
                f" {pct(hits[(f'label x{r:g}', n, 'new label')], seeds)} |"
                for r in args.label_ratios
            )
        )
    print()
    for n in args.windows:
        trials = seeds * len(columns)
        print(
            f"clean windows of {n} rows: features with bootstrap p <= {level:.4g}: {feature_hits[n]}/{trials} "
            f"= {100 * feature_hits[n] / trials:.2f}% (nominal {100 * level:.2f}%)"
        )
    print(f"{seeds} seeds x {len(args.windows)} window sizes x {2 + len(args.label_ratios)} windows in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
