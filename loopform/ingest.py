"""Admit a batch of labelled events into the offline store only after it passes its own checks: `loopform ingest`.

Every way data enters the offline store goes through `admit`: `loopform ingest` (by hand, from CI or
on the cluster with `--offline-uri s3://...`), the pipeline's `steps.ingest` and the local loop. The
batch is judged on its own, before anything is written or read from it:

- structure: the model's contract: schema, types, missing values (gates.max_missing_share; none in ids,
  entity ids, times and labels), values outside the contract's ranges (gates.max_out_of_range_share),
  duplicate ids;
- conflicts: ids already stored are refused, never replaced (count and examples reported);
- against the reference, the store's newest training window (`training.window_days` back from its
  newest event): one-class labels, label shift (a classifier's: a two-sided Fisher exact test of the
  positive rate, gates.drift.label_shift_ratio and label_shift_p_value; a regressor's: the calibrated
  test of the label's distribution), drift (the drift gate) and OOD (the OOD gate,
  gates.max_ood_rate). An empty store (or one under MIN_REFERENCE_ROWS rows) has no reference: the
  first batch gets structural checks only, and the report says so.

Each model has its own folder of the offline store, `<offline store>/<model>/`. A refused batch is
quarantined under `<model folder>/quarantine/<batch id>/` (its rows and report.json with every check
and its numbers; report.html, a data summary beside the reference, on request) and nothing else is written:
the event table and the labels stay byte-identical. Feast's file source is
`<model folder>/events.parquet` alone, so materialisation and training only ever read
admitted batches; nothing under quarantine/ is read by anything.

A shift of the world fails the checks against the reference as a broken batch does. `accept_shift`
(`loopform ingest --accept-shift REASON`) lets failed label-shift, drift and OOD checks pass, with the
reason in the report: the decision of an operator who looked at the drift, or of a retraining trigger
that saw it in served traffic. Structural checks, conflicts and one-class labels are never waived. An
accepted shift starts a new regime (`regimes.json` beside the labels): from then on the reference of
later batches and the training window begin at the batch's first event, so a retrained model learns
the world as it now is and is judged on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from loopform.steps import (
    StepContext,
    StepFailed,
    _exists,
    _write_parquet,
    labels_uri,
    load_table,
    record_regime,
    source_uri,
    window_start,
)

if TYPE_CHECKING:
    import pandas as pd

    from loopform.contract import Contract
    from loopform.gates.validation import BatchReport
    from loopform.model_code import ModelCode
    from loopform.spec import PlatformSpec

QUARANTINE = "quarantine"


class BatchRefused(StepFailed):
    """A batch failed its checks: it is quarantined with its report and nothing else was written."""

    def __init__(self, report: BatchReport, quarantine_uri: str) -> None:
        self.report = report
        self.quarantine_uri = quarantine_uri
        lines = "\n  ".join(report.failure_lines())
        super().__init__(
            f"refused batch {report.batch_id} ({report.rows} rows): {len(report.failed)} check(s) failed, "
            f"quarantined in {quarantine_uri}; the offline store is unchanged\n  {lines}"
        )


@dataclass(frozen=True)
class Ingested:
    rows: int
    total: int
    source_uri: str
    labels_uri: str
    report: BatchReport


def read_batch(path: Path, contract: Contract) -> pd.DataFrame:
    """Labelled events from Parquet or CSV: the model's columns that are there (the checks name missing ones)."""
    import pandas as pd

    if not path.is_file():
        raise StepFailed(f"{path}: no such file")
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif path.suffix == ".csv":
        frame = pd.read_csv(path)
    else:
        raise StepFailed(f"{path}: use a .parquet or .csv file")
    if contract.timestamp in frame.columns:
        with contextlib.suppress(ValueError, TypeError):  # else left as it is: the types check names the column
            frame[contract.timestamp] = pd.to_datetime(frame[contract.timestamp], utc=True)
    return frame[[column for column in contract.columns if column in frame.columns]]


def synthetic_batch(code: ModelCode, rows: int, seed: int) -> pd.DataFrame:
    """A demo batch from the model's generator: 30 days of labelled events ending now."""
    return code.generate(rows, seed, start=datetime.now(UTC) - timedelta(days=30), days=30)


def store_uri(ctx: StepContext) -> str:
    """The model's folder of the offline store: the labels and (on the cluster) the event table live in it."""
    return labels_uri(ctx).rsplit("/", 1)[0]


def batch_id(frame: pd.DataFrame, now: datetime | None = None) -> str:
    """`<UTC time>-<content hash>`: when it arrived and what it held."""
    from loopform.contract import fingerprint

    try:
        digest = fingerprint(frame)
    except (TypeError, ValueError):  # columns of mixed types
        digest = hashlib.sha256(frame.to_csv(index=False).encode()).hexdigest()
    return f"{(now or datetime.now(UTC)):%Y%m%dT%H%M%SZ}-{digest[:12]}"


def read_store(ctx: StepContext) -> tuple[pd.DataFrame | None, pd.DataFrame | None]:
    """(id, time and label of every stored row, the reference window of labelled rows); (None, None) when empty."""
    import pandas as pd

    contract = ctx.contract
    if not _exists(labels_uri(ctx)):
        return None, None
    stored = pd.read_parquet(labels_uri(ctx), columns=[contract.id, contract.timestamp, contract.label])
    if stored.empty:
        return stored, None
    return stored, load_table(ctx, since=window_start(ctx, stored[contract.timestamp].max()))


def admit(
    ctx: StepContext, frame: pd.DataFrame, *, accept_shift: str | None = None, html_report: bool = False
) -> BatchReport:
    """Check `frame` on its own; append it to the offline store, or quarantine it and raise BatchRefused."""
    from loopform.gates.validation import validate_batch

    stored, reference = read_store(ctx)
    contract = ctx.contract
    report = validate_batch(
        frame,
        ctx.gates,
        contract,
        reference=reference,
        stored=stored,
        accept_shift=accept_shift,
        min_drift_rows=ctx.spec.monitoring.min_rows,
        batch_id=batch_id(frame),
    )
    if not report.passed:
        raise BatchRefused(report, quarantine(ctx, frame, report, reference if html_report else None, html_report))
    _append(ctx, _conform(frame, contract), stored is not None)
    if report.accepted:
        checks = [check.name for check in report.accepted]
        record_regime(ctx, frame[contract.timestamp].min(), report.batch_id, str(report.accept_shift), checks)
    return report


def _conform(frame: pd.DataFrame, contract: Contract) -> pd.DataFrame:
    """The batch in the store's column order and types (whole-number floats of integer features as int64)."""
    import numpy as np
    import pandas as pd

    out = frame[list(contract.columns)].copy()
    for feature in contract.features:
        column = out[feature.name]
        if feature.kind == "categorical" and not pd.api.types.is_object_dtype(column.dtype):
            out[feature.name] = column.astype(object).where(column.notna(), None)
        elif feature.dtype == "int64" and pd.api.types.is_float_dtype(column.dtype) and column.notna().all():
            out[feature.name] = column.to_numpy(dtype=np.float64).astype(np.int64)
    return out


def _append(ctx: StepContext, batch: pd.DataFrame, has_store: bool) -> None:
    """Write the store with the batch appended: both tables are converted before either file is written."""
    import pandas as pd
    import pyarrow as pa

    contract = ctx.contract
    table = pd.concat([load_table(ctx)[list(contract.columns)], batch], ignore_index=True) if has_store else batch
    features = table.drop(columns=[contract.label])
    labels = table[list(contract.keys)]
    try:
        pa.Table.from_pandas(features, preserve_index=False)
        pa.Table.from_pandas(labels, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise StepFailed(f"cannot store this batch beside the table: {error} (check the column types)") from None
    if ctx.offline_uri:
        _write_parquet(features, source_uri(ctx))
    else:
        ctx.repo().write(table)
    _write_parquet(labels, labels_uri(ctx))


def quarantine(
    ctx: StepContext,
    frame: pd.DataFrame,
    report: BatchReport,
    reference: pd.DataFrame | None = None,
    html_report: bool = False,
) -> str:
    """Write the refused batch and its report under `<offline store>/quarantine/<batch id>/`; returns that folder."""
    import pyarrow as pa
    from fsspec.core import url_to_fs

    folder = f"{store_uri(ctx)}/{QUARANTINE}/{report.batch_id}"
    fs, path = url_to_fs(folder)
    fs.makedirs(path, exist_ok=True)
    try:
        frame.to_parquet(f"{folder}/rows.parquet", index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError, TypeError):  # columns Parquet cannot hold as they are
        if fs.exists(f"{path}/rows.parquet"):
            fs.rm(f"{path}/rows.parquet")
        with fs.open(f"{path}/rows.csv", "w") as out:
            frame.to_csv(out, index=False)
    with fs.open(f"{path}/report.json", "w") as out:
        out.write(json.dumps(report.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n")
    if html_report:
        _html_report(frame, reference, ctx.contract, fs, f"{path}/report.html")
    return folder


def _html_report(
    frame: pd.DataFrame, reference: pd.DataFrame | None, contract: Contract, fs: object, path: str
) -> None:
    """The data summary report of the batch beside the reference (loopform.gates.report)."""
    from loopform.gates.report import write_summary_report

    usable = [c for c in contract.feature_names if c in frame.columns]
    with tempfile.TemporaryDirectory(prefix="loopform-quarantine-") as scratch:
        local = Path(scratch) / "report.html"
        try:
            write_summary_report(frame, reference, contract, local, columns=usable)
        except Exception as error:  # a summary of broken data may itself break: the JSON report stands
            local.write_text(f"<html><body>no data summary for this batch: {error}</body></html>\n")
        fs.put(str(local), path)  # type: ignore[attr-defined]


def ingest_batch(
    spec: PlatformSpec,
    model: str,
    frame: pd.DataFrame,
    root: Path,
    offline_uri: str | None = None,
    *,
    feature_repo: Path | None = None,
    accept_shift: str | None = None,
    html_report: bool = False,
) -> Ingested:
    """Admit `frame` into the offline store at `offline_uri` (or the local Feast repo `feature_repo`)."""
    import pandas as pd

    if model not in spec.models:
        raise StepFailed(f"stack {spec.environment} declares no model {model!r} (declared: {', '.join(spec.models)})")
    if (offline_uri is None) == (feature_repo is None):
        raise ValueError("give the offline store as offline_uri or as the local feature_repo, one of them")
    with tempfile.TemporaryDirectory(prefix="loopform-ingest-") as scratch:
        context = StepContext(
            model=model,
            spec=spec,
            run_dir=Path(scratch) / "run",
            tracking_uri=None,
            feature_repo=feature_repo or Path(scratch) / "feast",
            root=root,
            stack_files=root / "stacks",
            offline_uri=offline_uri,
        )
        report = admit(context, frame, accept_shift=accept_shift, html_report=html_report)
        total = len(pd.read_parquet(labels_uri(context), columns=[context.contract.id]))
        return Ingested(len(frame), total, source_uri(context), labels_uri(context), report)
