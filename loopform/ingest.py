"""Seed (or extend) a cluster's offline store with labelled events: `loopform ingest`.

The first pipeline run on a new platform reads `<offline data_uri>/transactions.parquet` and
`labels.parquet`, and materialisation reads the same table: until something writes them,
`validate-data` fails with "no data" and the CronJob fails. This is the documented way to
write them, from a Parquet or CSV file of labelled events (or from the model's synthetic
generator for a demo), through the same `ingest` the pipeline and the local loop use.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loopform.steps import StepContext, StepFailed, ingest, labels_uri, source_uri

if TYPE_CHECKING:
    import pandas as pd

    from loopform.spec import PlatformSpec


@dataclass(frozen=True)
class Ingested:
    rows: int
    total: int
    source_uri: str
    labels_uri: str


def read_batch(path: Path) -> pd.DataFrame:
    """Labelled events from Parquet or CSV, event times as timezone-aware UTC."""
    import pandas as pd

    from loopform import data

    if not path.is_file():
        raise StepFailed(f"{path}: no such file")
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif path.suffix == ".csv":
        frame = pd.read_csv(path)
    else:
        raise StepFailed(f"{path}: use a .parquet or .csv file")
    missing = [column for column in data.COLUMNS if column not in frame.columns]
    if missing:
        raise StepFailed(f"{path} lacks column(s) {', '.join(missing)} (needed: {', '.join(data.COLUMNS)})")
    try:
        frame[data.TIMESTAMP] = pd.to_datetime(frame[data.TIMESTAMP], utc=True)
    except (ValueError, TypeError) as error:
        raise StepFailed(f"{path}: column {data.TIMESTAMP} is not a time: {error}") from None
    return frame[list(data.COLUMNS)]


def synthetic_batch(rows: int, seed: int) -> pd.DataFrame:
    """A demo batch from the model's generator: 30 days of labelled events ending now."""
    from datetime import UTC, datetime, timedelta

    from loopform import data

    return data.generate(rows=rows, seed=seed, start=datetime.now(UTC) - timedelta(days=30), days=30)


def ingest_batch(spec: PlatformSpec, model: str, frame: pd.DataFrame, root: Path, offline_uri: str) -> Ingested:
    """Append `frame` to the offline store at `offline_uri` (features beside labels), as the pipeline would."""
    import pandas as pd

    if model not in spec.models:
        raise StepFailed(f"stack {spec.environment} declares no model {model!r} (declared: {', '.join(spec.models)})")
    with tempfile.TemporaryDirectory(prefix="loopform-ingest-") as scratch:
        context = StepContext(
            model=model,
            spec=spec,
            run_dir=Path(scratch) / "run",
            tracking_uri=None,
            feature_repo=Path(scratch) / "feast",
            root=root,
            stack_files=root / "stacks",
            offline_uri=offline_uri,
        )
        ingest(context, frame)
        total = len(pd.read_parquet(labels_uri(context)))
        return Ingested(len(frame), total, source_uri(context), labels_uri(context))
