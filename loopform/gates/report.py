"""Evidently's data summary as the HTML report of the validation and OOD gates.

The drift gate writes Evidently's DataDriftPreset report itself (loopform.gates.drift); the
other two gates' numbers are loopform's, and this report lets a reviewer see the data they
judged: per-column statistics of the current data, beside the reference where there is one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from loopform.contract import Contract


def write_summary_report(
    current: pd.DataFrame,
    reference: pd.DataFrame | None,
    contract: Contract,
    path: Path,
    columns: Sequence[str] | None = None,
) -> Path:
    """Write Evidently's DataSummaryPreset report of `current` (against `reference` if given) to `path`."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataSummaryPreset

    wanted = list(columns or contract.feature_names)
    kinds = contract.kinds
    definition = DataDefinition(
        numerical_columns=[c for c in wanted if kinds.get(c) == "numeric"],
        categorical_columns=[c for c in wanted if kinds.get(c) == "categorical"],
    )
    snapshot = Report([DataSummaryPreset(columns=wanted)]).run(
        Dataset.from_pandas(current[wanted], data_definition=definition),
        None if reference is None else Dataset.from_pandas(reference[wanted], data_definition=definition),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    snapshot.save_html(str(path))
    return path
