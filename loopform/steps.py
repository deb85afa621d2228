"""The pipeline's step functions: typed inputs (a StepContext) and outputs, state in the run directory.

Each is what `loopform step NAME` runs in an Argo pod, and what the local runner calls
in-process. A step that finds bad data or a failed gate raises StepFailed, so its pod exits
non-zero and the DAG stops (Argo retries only infrastructure errors).

Run directory layout:
  window.json            the training window the run covers
  gates/<gate>.json      validation, drift and ood results; reports/<gate>.html
  training.parquet       point-in-time-correct features + label, from Feast
  model/                 the trained model as an MLflow model folder (pt2 network + preprocessing.json, no pickle)
  evaluation.json        holdout metrics and the champion comparison
  reference.parquet      the training part of the data, the monitor's reference (logged to the run)
  reference-profile.npz  its sorted columns, computed once: the monitor loads them (digest in the evidence)
  release.json           the registered version and its sealed evidence
  promotion.json         the staging promotion's outcome
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopform.evaluation import time_split
from loopform.features import EVENTS_FILE
from loopform.model_code import ModelCode
from loopform.spec import GatesSpec, PlatformSpec

if TYPE_CHECKING:
    import pandas as pd

    from loopform.contract import Contract
    from loopform.gates.result import GateResult

REFERENCE_FILE = "reference.parquet"
LABELS_FILE = "labels.parquet"
MODEL_FOLDER = "model"  # the train step's output: an MLflow model folder (registry.save_model_folder)
REGIMES_FILE = "regimes.json"  # accepted shifts of the world (see window_start)
STAGING = "staging"
OUT_OF_CORE_ENV = "LOOPFORM_OUT_OF_CORE"  # 1: validate-data runs out of core, 0: in memory, unset: by size
IN_MEMORY_BUDGET_ENV = "LOOPFORM_IN_MEMORY_BUDGET"  # bytes of Parquet above which it runs out of core
IN_MEMORY_BUDGET = 512 * 2**20  # pandas needs several times this, more than a small pod has
MEMORY_LIMIT_ENV = "LOOPFORM_DUCKDB_MEMORY_LIMIT"  # DuckDB's memory_limit out of core (default 1GB)


class StepFailed(Exception):
    """A step refused to go on (failed gate, bad input); the message says why."""


@dataclass
class StepContext:
    """Everything a step needs: which model, which environment, where things are."""

    model: str
    spec: PlatformSpec
    run_dir: Path
    tracking_uri: str | None
    """MLflow tracking URI; None where no step that runs needs MLflow."""
    feature_repo: Path
    """Folder of the model's Feast repository (source table, registry, online store)."""
    root: Path
    """Repository root: model code lives at root / spec.models[model].path."""
    stack_files: Path
    """Folder of the stack files promotions check gates against and record releases in."""
    seed: int = 7
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    offline_uri: str | None = None
    """The platform's offline store (on Kubernetes, from LOOPFORM_FEAST_OFFLINE_URI): the model's event
    table and labels live in its folder there (`<offline>/<model>/`) and the Feast repo is a client of
    the platform's registry. None: the self-contained local repo under `feature_repo`."""
    signer: Any = None
    """`loopform.promotion.Signer` that signs the staging record; None reads the key from the environment."""

    @property
    def code(self) -> ModelCode:
        """The model's own code (`models/<m>/`: contract, model, train, data)."""
        return ModelCode(self.model, self.root, self.spec.models[self.model].path)

    @property
    def contract(self) -> Contract:
        return self.code.contract

    @property
    def gates(self) -> GatesSpec:
        """The gates this model is judged by: the environment's with the model's own over them."""
        return self.spec.gates_for(self.model)

    def repo(self) -> Any:
        from loopform.features import FeatureRepo, cluster_config

        return FeatureRepo(
            self.feature_repo,
            self.contract,
            project=self.spec.feature_store.project,
            config=cluster_config(self.spec.feature_store) if self.offline_uri else None,
        )

    def write_json(self, name: str, value: Any) -> Path:
        path = self.run_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
        return path

    def mlflow(self) -> str:
        """The tracking URI, or StepFailed saying how to give one (only some steps need it)."""
        if not self.tracking_uri:
            raise StepFailed("this step uses MLflow: set --tracking-uri or MLFLOW_TRACKING_URI")
        return self.tracking_uri

    def input(self, name: str) -> Path:
        """A file an earlier step wrote into the run directory, or StepFailed naming it."""
        path = self.run_dir / name
        if not path.exists():
            raise StepFailed(f"{path} is missing: run the step that writes it first")
        return path

    def read_json(self, name: str) -> Any:
        return json.loads(self.input(name).read_text())


def model_folder_uri(ctx: StepContext) -> str:
    """The model's own folder of the platform's offline store."""
    return f"{(ctx.offline_uri or '').rstrip('/')}/{ctx.model}"


def source_uri(ctx: StepContext) -> str:
    """The Feast source table of the model: one row of features per event."""
    return f"{model_folder_uri(ctx)}/{EVENTS_FILE}" if ctx.offline_uri else str(ctx.repo().data_path)


def labels_uri(ctx: StepContext) -> str:
    """Labelled events (id, entity, time, label): the entity frame of training. Features live in Feast."""
    if ctx.offline_uri:
        return f"{model_folder_uri(ctx)}/{LABELS_FILE}"
    return str(ctx.feature_repo / "data" / LABELS_FILE)


def _exists(uri: str) -> bool:
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(uri)
    return bool(fs.exists(path))


def _write_parquet(frame: pd.DataFrame, uri: str) -> None:
    from fsspec.core import url_to_fs

    fs, path = url_to_fs(uri)
    fs.makedirs(fs._parent(path), exist_ok=True)
    frame.to_parquet(uri, index=False)


def regimes_uri(ctx: StepContext) -> str:
    """Where the store records accepted shifts of the world (beside the labels)."""
    return f"{labels_uri(ctx).rsplit('/', 1)[0]}/{REGIMES_FILE}"


def regimes(ctx: StepContext) -> list[dict[str, Any]]:
    """Every accepted shift: since (first event time of the batch), batch id, reason and the checks it waived."""
    from fsspec.core import url_to_fs

    uri = regimes_uri(ctx)
    if not _exists(uri):
        return []
    fs, path = url_to_fs(uri)
    return json.loads(fs.cat_file(path))


def record_regime(ctx: StepContext, since: Any, batch_id: str, reason: str, checks: list[str]) -> None:
    """A batch admitted with an accepted shift starts a new regime: reference and training window begin there."""
    from fsspec.core import url_to_fs

    entries = [*regimes(ctx), {"since": str(since), "batch": batch_id, "reason": reason, "waived": checks}]
    fs, path = url_to_fs(regimes_uri(ctx))
    with fs.open(path, "w") as out:
        out.write(json.dumps(entries, indent=2) + "\n")


def window_start(ctx: StepContext, end: Any) -> Any:
    """Start of the window ending at `end`: `training.window_days` back, but never before the newest accepted
    shift at or before `end`: data of a world that no longer holds is neither trained on nor a reference."""
    import pandas as pd

    start = end - timedelta(days=ctx.spec.models[ctx.model].training.window_days)
    shifts = [pd.Timestamp(entry["since"]) for entry in regimes(ctx)]
    shifts = [since for since in shifts if since <= end]
    return max([start, *[since - pd.Timedelta(microseconds=1) for since in shifts]])


def ingest(
    ctx: StepContext,
    frame: pd.DataFrame,
    *,
    accept_shift: str | None = None,
    html_report: bool = False,
) -> Any:
    """Check a batch of labelled transactions on its own, then append it (features to the Feast source
    table, labels beside it), or quarantine it and raise `loopform.ingest.BatchRefused` (a StepFailed).

    The one way into the offline store (`loopform.ingest.admit`); returns its BatchReport. accept_shift
    lets failed checks against the stored reference (label shift, drift, OOD) pass with that reason
    (the retraining trigger's: it ingests the very shift its monitor saw); None refuses them.
    """
    from loopform.ingest import admit

    return admit(ctx, frame, accept_shift=accept_shift, html_report=html_report)


def load_table(ctx: StepContext, since: pd.Timestamp | None = None) -> pd.DataFrame:
    """Features and labels of every ingested event (with event time after `since`), as one frame."""
    import pandas as pd

    contract = ctx.contract
    for uri in (labels_uri(ctx), source_uri(ctx)):
        if not _exists(uri):
            raise StepFailed(f"no data at {uri}: ingest labelled events first")
    newer = None if since is None else [(contract.timestamp, ">", since)]
    features = pd.read_parquet(source_uri(ctx), filters=newer)
    labels = pd.read_parquet(labels_uri(ctx), filters=newer)
    return labels.merge(features, on=[contract.id, contract.entity, contract.timestamp], how="inner")


def training_window_of(table: pd.DataFrame, ctx: StepContext) -> pd.DataFrame:
    """The rows of the model's training window: the last `training.window_days` of event time, from the
    newest accepted shift on (`window_start`)."""
    timestamp = ctx.contract.timestamp
    end = table[timestamp].max()
    return table[table[timestamp] > window_start(ctx, end)].reset_index(drop=True)


def validate_data(ctx: StepContext, *, out_of_core: bool | None = None) -> dict[str, GateResult]:
    """Validation, drift and OOD gates on the training window; StepFailed when any fails.

    Each batch was checked on its own when it was ingested (`loopform.ingest`: a bad batch is
    quarantined there, never stored), so these gates judge the window as training data, not new
    data: validation checks the whole table's structure, then the window's. Drift and OOD compare
    the window's newest rows (the holdout the model is evaluated on, and closest to what it will
    serve) with the older part it trains on.

    out_of_core: run the gates with DuckDB over the Parquet files (`loopform.gates.out_of_core`: same
    statistics and decisions, memory bounded by $LOOPFORM_DUCKDB_MEMORY_LIMIT) instead of in pandas.
    None decides by `runs_out_of_core`.
    """
    if runs_out_of_core(ctx) if out_of_core is None else out_of_core:
        return _record_gates(ctx, _validate_out_of_core(ctx))
    from loopform.gates import drift_gate, ood_gate
    from loopform.gates.report import write_summary_report

    gates, contract = ctx.gates, ctx.contract
    timestamp = contract.timestamp
    table = load_table(ctx)
    results = {"validation": validate_table(table, ctx)}
    if results["validation"].passed:
        window = training_window_of(table, ctx)
        older, newest = time_split(window, timestamp)
        results["validation"] = _validate_window(window, ctx)
        reports = ctx.run_dir / "reports"
        reports.mkdir(parents=True, exist_ok=True)
        results["drift"] = drift_gate(older, newest, gates, contract, reports / "drift.html")
        results["ood"] = ood_gate(older, newest, gates, contract)
        results["validation"].report = str(write_summary_report(window, None, contract, reports / "validation.html"))
        results["ood"].report = str(write_summary_report(newest, older, contract, reports / "ood.html"))
        ctx.write_json(
            "window.json",
            {"rows": len(window), "start": str(window[timestamp].min()), "end": str(window[timestamp].max())},
        )
    return _record_gates(ctx, results)


def _record_gates(ctx: StepContext, results: dict[str, GateResult]) -> dict[str, GateResult]:
    """Write each gate's result to the run directory; StepFailed when any failed."""
    for name, result in results.items():
        result.write_json(ctx.run_dir / "gates" / f"{name}.json")
    failed = [f"{name}: {'; '.join(r.failures)}" for name, r in results.items() if not r.passed]
    if failed:
        raise StepFailed("data gates failed, training stops here:\n  " + "\n  ".join(failed))
    return results


def runs_out_of_core(ctx: StepContext) -> bool:
    """Whether validate-data runs out of core: $LOOPFORM_OUT_OF_CORE=1 always, =0 never; unset, when the
    model's Parquet (labels and features, local files) exceeds $LOOPFORM_IN_MEMORY_BUDGET bytes (default
    IN_MEMORY_BUDGET): pandas holds several times a Parquet file's size, which a pod may not have."""
    setting = os.environ.get(OUT_OF_CORE_ENV, "").strip()
    if setting in ("0", "1"):
        return setting == "1"
    if setting:
        raise StepFailed(
            f"${OUT_OF_CORE_ENV} is {setting!r}: set it to 1 (out of core), 0 (in memory) or leave it unset"
        )
    uris = (labels_uri(ctx), source_uri(ctx))
    if any("://" in uri and not uri.startswith("file://") for uri in uris) or not all(map(_exists, uris)):
        return False  # DuckDB reads local Parquet here; object stores need its httpfs extension
    from loopform.gates.out_of_core import parquet_bytes

    budget = int(os.environ.get(IN_MEMORY_BUDGET_ENV, IN_MEMORY_BUDGET))
    return sum(parquet_bytes(uri.removeprefix("file://")) for uri in uris) > budget


def _validate_out_of_core(ctx: StepContext) -> dict[str, GateResult]:
    """`validate_data`'s gates with DuckDB over the Parquet files: the same window, split and decisions.

    The labels joined with the features (as `load_table`), the training window (as `training_window_of`) and
    its time split (as `time_split`: by event time, ties in the labels' row order) are written once to the
    connection's scratch folder, which the gates then read. The drift report holds every statistic and
    decision; the summary pages of validation and OOD (pictures of all rows in memory) are not written."""
    import pandas as pd

    from loopform.evaluation import HOLDOUT_SHARE
    from loopform.gates import out_of_core as ooc

    gates, contract = ctx.gates, ctx.contract
    for uri in (labels_uri(ctx), source_uri(ctx)):
        if not _exists(uri):
            raise StepFailed(f"no data at {uri}: ingest labelled events first")
    time_column = _sql_name(contract.timestamp)
    memory_limit = os.environ.get(MEMORY_LIMIT_ENV, ooc.MEMORY_LIMIT)
    with ooc.connect(memory_limit) as con:
        table = _joined(ctx)
        results = {"validation": ooc.validate_data(table, gates, contract, require_label=True, con=con)}
        if not results["validation"].passed:
            return results
        end = pd.Timestamp(con.execute(f"SELECT max({time_column}) FROM {table.relation}").fetchall()[0][0])
        start = window_start(ctx, end.tz_convert("UTC"))
        window = table.where(f"{time_column} > '{start.isoformat()}'::TIMESTAMPTZ")
        results["validation"] = ooc.validate_data(window, gates, contract, require_label=True, con=con)
        results["validation"].failures = [f"training window: {f}" for f in results["validation"].failures]
        split = ooc.scratch_folder(con) / "window.parquet"
        hidden = ", ".join(_sql_name(c) for c in window.hidden)
        con.execute(
            f"COPY (SELECT * EXCLUDE ({hidden}), row_number() OVER (ORDER BY {time_column}, {window.order}) AS __row "
            f"FROM {window.relation}) TO '{split}' (FORMAT parquet)"
        )
        rows, first, last = con.execute(
            f"SELECT count(*), min({time_column}), max({time_column}) FROM read_parquet('{split}')"
        ).fetchall()[0]
        stored = ooc.Table(f"SELECT * FROM read_parquet('{split}')", "__row", ("__row",))
        cut = round(rows * (1 - HOLDOUT_SHARE))
        older, newest = stored.where(f"__row <= {cut}"), stored.where(f"__row > {cut}")
        reports = ctx.run_dir / "reports"
        reports.mkdir(parents=True, exist_ok=True)
        results["drift"] = ooc.drift_gate(older, newest, gates, contract, reports / "drift.html", con=con)
        results["ood"] = ooc.ood_gate(older, newest, gates, contract, con=con)
    utc = [str(pd.Timestamp(t).tz_convert("UTC")) for t in (first, last)]
    ctx.write_json("window.json", {"rows": int(rows), "start": utc[0], "end": utc[1], "out_of_core": True})
    return results


def _sql_name(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _joined(ctx: StepContext) -> Any:
    """`load_table` as a DuckDB table: each labelled event with its features, in the labels' row order."""
    from loopform.gates.out_of_core import Table

    contract = ctx.contract
    labels = Table.parquet(labels_uri(ctx).removeprefix("file://"))
    features = Table.parquet(source_uri(ctx).removeprefix("file://"))
    keys = [contract.id, contract.entity, contract.timestamp]
    on = " AND ".join(f"l.{_sql_name(k)} = f.{_sql_name(k)}" for k in keys)
    dropped = ", ".join(_sql_name(c) for c in (*keys, *features.hidden))
    sql = f"SELECT l.*, f.* EXCLUDE ({dropped}) FROM {labels.relation} l JOIN {features.relation} f ON {on}"
    return Table(sql, labels.order, labels.hidden)


def validate_table(table: pd.DataFrame, ctx: StepContext) -> GateResult:
    from loopform.gates import validate_data as validation_gate

    return validation_gate(table, ctx.gates, ctx.contract, require_label=True)


def _validate_window(window: pd.DataFrame, ctx: StepContext) -> GateResult:
    """The training window's validation. Its newest rows are not judged apart: a bad batch would be
    diluted in them (a day in the newest 20% of 30 days), and batches are checked alone at ingest."""
    result = validate_table(window, ctx)
    result.failures = [f"training window: {failure}" for failure in result.failures]
    return result


def get_features(ctx: StepContext) -> Path:
    """Point-in-time-correct training set: each labelled event with its own fields, and Feast joins the
    entity's features as of the event (computed from the entity's earlier events only)."""
    contract = ctx.contract
    if not _exists(labels_uri(ctx)):
        raise StepFailed(f"no labelled events at {labels_uri(ctx)}: ingest data first")
    events = load_table(ctx)  # labels beside each event's own fields
    columns = [*contract.keys, *contract.event_features]
    entities = training_window_of(events, ctx)[columns]
    frame = ctx.repo().training_frame(entities)
    if len(frame) < 0.9 * len(entities):
        raise StepFailed(f"Feast returned features for {len(frame)} of {len(entities)} labelled events")
    path = ctx.run_dir / "training.parquet"
    frame.to_parquet(path, index=False)
    return path


def training_device(ctx: StepContext) -> str:
    """`cuda` where the model's spec requests GPUs (`training.gpus`), else `cpu`: the spec decides, not what the
    machine happens to have, so the same spec trains the same way everywhere.

    A step that requests GPUs and finds no CUDA device (the CPU image, or a node without a working driver)
    fails instead of training on the CPU of a GPU node.
    """
    import torch

    gpus = ctx.spec.models[ctx.model].training.gpus
    if not gpus:
        return "cpu"
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU build: torch.version.cuda is None"
        raise StepFailed(
            f"models.{ctx.model}.training.gpus requests {gpus} GPU(s), but torch {torch.__version__} ({build}) "
            "sees no CUDA device: run the step in the CUDA pipeline image (orchestrator.gpu_pipeline_image) on a "
            f"node with GPUs, or set models.{ctx.model}.training.gpus to 0 to train on the CPU"
        )
    return "cuda"


def train(ctx: StepContext) -> Path:
    """Train on the older part of the training set (the newest part is the holdout), on `training_device`.

    The model records the device in its training facts (`info`), which registration seals into the evidence.
    """
    import pandas as pd

    from loopform import registry

    device = training_device(ctx)
    frame = pd.read_parquet(ctx.input("training.parquet"))
    older, _ = time_split(frame, ctx.contract.timestamp)
    model = ctx.code.train(older, seed=ctx.seed, device=device)
    path = ctx.run_dir / MODEL_FOLDER
    if path.exists():
        shutil.rmtree(path)
    registry.save_model_folder(model, path)
    return path


def _load_trained(ctx: StepContext) -> Any:
    """The model the train step wrote, loaded as a registered version is: no pickle, the class from the image."""
    from loopform import registry

    return registry.load_model_folder(ctx.input(MODEL_FOLDER))


def evaluate(ctx: StepContext) -> dict[str, Any]:
    """Holdout metrics of the model's task with bootstrap intervals at the gates' confidence, and the champion
    compared on the same rows (`loopform.evaluation`).

    The training part goes along: its base rate (mean) is what the Brier skill (R²) is measured
    against, and a classifier's validation rows give the operating threshold's interval.
    """
    import pandas as pd

    from loopform import registry
    from loopform.evaluation import evaluate as evaluate_model

    frame = pd.read_parquet(ctx.input("training.parquet"))
    older, holdout = time_split(frame, ctx.contract.timestamp)
    champion = registry.champion(ctx.mlflow(), ctx.model)
    champion_model, champion_version = champion if champion else (None, None)
    gates = ctx.gates
    metrics = evaluate_model(
        _load_trained(ctx),
        holdout,
        ctx.contract,
        champion_model,
        champion_version=champion_version,
        training=older,
        confidence=gates.confidence,
        bootstrap_samples=gates.bootstrap_samples,
        alert_rate=gates.alert_rate,
        seed=ctx.seed,
    )
    ctx.write_json("evaluation.json", metrics)
    return metrics


def register(ctx: StepContext) -> dict[str, Any]:
    """Log the run (gates, reports, metrics, model, reference data and profile) and register a version with its
    evidence, which seals the reference profile's sha256 (`registry.reference_profile`)."""
    import pandas as pd

    from loopform import registry
    from loopform.contract import fingerprint
    from loopform.gates.result import GateResult

    frame = pd.read_parquet(ctx.input("training.parquet"))
    older, _ = time_split(frame, ctx.contract.timestamp)
    gate_results = {}
    for path in sorted((ctx.run_dir / "gates").glob("*.json")):
        result = GateResult.from_dict(json.loads(path.read_text()))
        report = ctx.run_dir / "reports" / f"{result.gate}.html"
        gate_results[path.stem] = GateResult(
            result.gate, result.passed, result.metrics, result.failures, str(report) if report.exists() else None
        )
    run = registry.log_training_run(
        ctx.mlflow(),
        ctx.model,
        _load_trained(ctx),
        gate_results=gate_results,
        training_data_fingerprint=fingerprint(older),
        params={"seed": ctx.seed, "rows": len(older), "stack": ctx.spec.environment},
        evaluation=ctx.read_json("evaluation.json"),
    )
    reference = ctx.run_dir / REFERENCE_FILE
    older.to_parquet(reference, index=False)
    registry.client(ctx.mlflow()).log_artifact(run.run_id, str(reference), registry.REFERENCE_DIR)
    stored = reference_profile(older, ctx.contract, ctx.run_dir)
    if stored is not None:
        registry.client(ctx.mlflow()).log_artifact(run.run_id, str(stored), registry.REFERENCE_DIR)
    record = registry.register_version(ctx.mlflow(), ctx.model, run.run_id, model_uri=run.model_uri, now=ctx.now)
    ctx.write_json("release.json", record.to_dict())
    return record.to_dict()


def reference_profile(older: pd.DataFrame, contract: Contract, run_dir: Path) -> Path | None:
    """The monitor's reference, computed once: the sorted feature and label columns of the training part,
    written to `run_dir` (`loopform.gates.stored_profile.PROFILE_FILE`).

    None when a column cannot be profiled (e.g. all missing): the monitor then falls back to the
    training data and says so."""
    from loopform.gates.drift import DriftInputError, profile
    from loopform.gates.stored_profile import PROFILE_FILE, save_profile

    columns = [*contract.feature_names, contract.label]
    try:
        profiled = profile(older, columns, kinds={**contract.kinds, contract.label: "numeric"})
    except DriftInputError:
        return None
    path = run_dir / PROFILE_FILE
    save_profile(profiled, path)
    return path


def promote_to_staging(ctx: StepContext) -> dict[str, Any]:
    """Gate the new version against staging's thresholds, sign its staging record and move the staging alias.

    Signing needs the staging key: `ctx.signer`, or $LOOPFORM_SIGNING_KEY(_FILE) with the
    repository's staging policy config. A pipeline without it (the cluster's, where any pod
    could read a mounted key) stops at a gated candidate: the release is `loopform promote`,
    run where the key is (CI).
    """
    from loopform import record
    from loopform.promotion import PromotionError, Signer, promote

    release = ctx.read_json("release.json")
    source = ctx.stack_files / f"Pulumi.{STAGING}.yaml"
    if not source.exists():
        raise StepFailed(f"no staging stack file at {source}")
    signer = ctx.signer
    if signer is None and (os.environ.get(record.KEY_ENV) or os.environ.get(record.KEY_FILE_ENV)):
        signer = Signer(record.load_key(), ctx.root / "policies" / "config" / f"{STAGING}.json")
    if signer is None:
        outcome = {
            "promoted": False,
            "version": release["version"],
            "reason": f"no signing key ({record.KEY_ENV} or {record.KEY_FILE_ENV}): release it with "
            f"`loopform promote {ctx.model} {release['version']} --to {STAGING}` where the staging key is",
        }
        ctx.write_json("promotion.json", outcome)
        return outcome
    # The step records the release in a copy: the reviewed change to the real stack file is `loopform promote`.
    copy = ctx.run_dir / source.name
    shutil.copyfile(source, copy)
    try:
        result = promote(
            ctx.model,
            release["version"],
            STAGING,
            tracking_uri=ctx.mlflow(),
            stack_path=copy,
            signer=signer,
            now=ctx.now,
        )
    except PromotionError as error:
        ctx.write_json("promotion.json", {"promoted": False, "reasons": error.reasons})
        raise StepFailed(str(error)) from None
    outcome = {"promoted": True, "env": STAGING, "version": result.version, "image": result.image}
    ctx.write_json("promotion.json", outcome)
    return outcome
