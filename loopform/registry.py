"""MLflow helpers: training runs, model versions with their evidence, aliases, loading.

A training run records params, metrics, every gate result (JSON artifact `gates/<gate>.json`),
the gates' HTML reports (`reports/`), the evaluation (`evaluation.json`), the model's training
facts (`training.json`: the model's `info`, the device it trained on among them) and the model.
Registration turns what the run recorded into sealed evidence (see loopform.evidence):
the version's tags hold it (`loopform.evidence` as one canonical JSON tag, plus key tags
such as `loopform.digest` and `loopform.auc` for the UI and for search), and a release
record JSON with the same content is written next to the registry and logged to the run.

Aliases, not the deprecated stages: an environment's release is the alias named after the
environment (`staging`, `prod`, ...); a production release also holds `production` and
`champion` (what the next run is compared with); `archived=true` marks a version that lost
`champion` (loopform.promotion sets them).
mlflow is imported inside the functions: it takes seconds.
"""

from __future__ import annotations

import importlib
import json
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loopform import evidence as ev
from loopform import record as rec

if TYPE_CHECKING:
    from mlflow import MlflowClient

EVIDENCE_TAG = "loopform.evidence"
DIGEST_TAG = "loopform.digest"
ARCHIVED_TAG = "archived"
FINGERPRINT_TAG = "loopform.training_data_fingerprint"
GATES_DIR = "gates"
REPORTS_DIR = "reports"
EVALUATION_FILE = "evaluation.json"
TRAINING_FILE = "training.json"
RELEASE_DIR = "release"
MODEL_ARTIFACT = "model"
REFERENCE_DIR = "reference"
REFERENCE_DATA = f"{REFERENCE_DIR}/reference.parquet"  # the training data the register step logs
REFERENCE_PROFILE = f"{REFERENCE_DIR}/reference-profile.npz"  # its sorted columns (loopform.gates.stored_profile)
PREPROCESSING_FILE = "preprocessing.json"  # in the model folder's extra_files/
# A model class named by preprocessing.json must be one of the image's model packages.
_MODEL_CLASS = re.compile(r"(models\.[A-Za-z_][A-Za-z0-9_]*\.model):([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True)
class TrainingRun:
    """What a logged training run is known by."""

    run_id: str
    model_uri: str  # models:/m-<id>, the logged model
    experiment_id: str


@dataclass(frozen=True)
class ReleaseRecord:
    """A registered model version and its sealed evidence (also written as JSON)."""

    model: str
    version: int
    run_id: str
    model_uri: str
    evidence: dict[str, Any]
    path: str | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def client(tracking_uri: str) -> MlflowClient:
    """A client bound to one store for tracking and registry alike."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def artifact_root(tracking_uri: str) -> str | None:
    """For a SQLite store, artifacts live beside the database (not in ./mlruns of the cwd)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def experiment_id(tracking_uri: str, name: str) -> str:
    """The experiment's id, creating it (with artifacts beside a SQLite store) if needed."""
    mlflow_client = client(tracking_uri)
    existing = mlflow_client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    root = artifact_root(tracking_uri)
    location = f"{root}/{name}" if root else None
    return mlflow_client.create_experiment(name, artifact_location=location)


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("torch", "numpy", "pandas", "mlflow")]


def _write_model(model: Any, write: Any) -> Any:
    """Call MLflow's `log_model`/`save_model` (`write`) with the pickle-free layout.

    The network goes through torch.export (`pt2`, traced on an encoded example batch in eval
    mode); preprocessing, threshold and training facts go to `extra_files/preprocessing.json`.
    The model supplies `preprocessing()` (JSON data) and `example_input()` (an encoded batch).
    """
    was_training = model.training
    model.eval()  # export the inference graph (no dropout)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / PREPROCESSING_FILE
            config.write_text(json.dumps(ev.jsonable(model.preprocessing()), indent=2, sort_keys=True))
            return write(
                serialization_format="pt2",
                input_example=model.example_input(),
                extra_files=[str(config)],
                pip_requirements=_pip_requirements(),
            )
    finally:
        model.train(was_training)


def save_model_folder(model: Any, path: Path) -> Path:
    """Write the model to a local MLflow model folder (same layout as a logged model, no pickle)."""
    import mlflow.pytorch

    _write_model(model, lambda **kw: mlflow.pytorch.save_model(model, str(path), **kw))
    return path


def load_model_folder(folder: Path) -> Any:
    """Rebuild a model from a downloaded model folder: the image's model class + JSON + exported network.

    No unpickling: the class comes from the image (a `models.<m>.model` module, never from the
    artifact store), its parameters from `extra_files/preprocessing.json`, and the weights from
    `data/model.pt2` through `mlflow.pytorch.load_model`, which first checks that every record in
    the archive is JSON, raw tensor bytes or a tensor `torch.load(weights_only=True)` accepts,
    then calls `torch.export.load`.
    """
    import mlflow.pytorch

    folder = Path(folder)
    config_path = folder / "extra_files" / PREPROCESSING_FILE
    if not config_path.is_file():
        raise ValueError(f"{folder} has no extra_files/{PREPROCESSING_FILE}: not a pickle-free loopform model")
    config = json.loads(config_path.read_text())
    match = _MODEL_CLASS.fullmatch(str(config.get("class", "")))
    if match is None:
        raise ValueError(f"{config_path} names model class {config.get('class')!r}, not models.<m>.model:<Class>")
    cls = getattr(importlib.import_module(match.group(1)), match.group(2))
    network = mlflow.pytorch.load_model(str(folder), map_location="cpu")
    return cls.from_exported(config, network)


def _gate_dict(result: Any) -> dict[str, Any]:
    if hasattr(result, "to_dict"):
        return dict(result.to_dict())
    if isinstance(result, Mapping):
        return dict(result)
    raise TypeError(f"gate result must be a GateResult or a dict, got {type(result).__name__}")


def log_training_run(
    tracking_uri: str,
    model_name: str,
    model: Any,
    *,
    gate_results: Mapping[str, Any],
    training_data_fingerprint: str,
    params: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    experiment: str | None = None,
) -> TrainingRun:
    """Log one training run: params, gate results (+ their HTML reports), evaluation, training facts and the model.

    Gate results are GateResult objects or their dicts; a result's `report` (a local HTML
    path) is uploaded to `reports/` and the recorded result points at the artifact instead.
    The model is stored without pickle (see `save_model_folder`): MLflow's `pt2` format for
    the network and `extra_files/preprocessing.json` for the rest; no code goes with it.
    """
    import mlflow
    import mlflow.pytorch

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    exp_id = experiment_id(tracking_uri, experiment or f"loopform-{model_name}")
    with mlflow.start_run(experiment_id=exp_id) as run:
        run_id = run.info.run_id
        mlflow.set_tags({FINGERPRINT_TAG: training_data_fingerprint, "loopform.model": model_name})
        info = getattr(model, "info", None) or {}
        if info:
            mlflow.log_dict(ev.jsonable(info), TRAINING_FILE)
        all_params = {**info, **(params or {})}
        if all_params:
            mlflow.log_params({k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in all_params.items()})
        with tempfile.TemporaryDirectory() as tmp:
            for name, result in gate_results.items():
                record = _gate_dict(result)
                report = record.get("report")
                if report and Path(report).is_file():
                    mlflow.log_artifact(str(report), artifact_path=REPORTS_DIR)
                    record["report"] = f"runs:/{run_id}/{REPORTS_DIR}/{Path(report).name}"
                path = Path(tmp) / f"{name}.json"
                path.write_text(json.dumps(ev.jsonable(record), indent=2, sort_keys=True))
                mlflow.log_artifact(str(path), artifact_path=GATES_DIR)
                mlflow.log_metric(f"gate.{name}.passed", float(bool(record.get("passed"))))
        if evaluation is not None:
            _log_evaluation(mlflow, evaluation)
        logged = _write_model(model, lambda **kw: mlflow.pytorch.log_model(model, name=MODEL_ARTIFACT, **kw))
    return TrainingRun(run_id=run_id, model_uri=logged.model_uri, experiment_id=exp_id)


def _log_evaluation(mlflow: Any, evaluation: Mapping[str, Any]) -> None:
    metrics = {
        f"eval.{k}": float(v) for k, v in evaluation.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    mlflow.log_metrics(metrics)
    mlflow.log_dict(ev.jsonable(dict(evaluation)), EVALUATION_FILE)


def log_evaluation(tracking_uri: str, run_id: str, evaluation: Mapping[str, Any]) -> None:
    """Add the evaluation (metrics `eval.*` and evaluation.json) to an existing run."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        _log_evaluation(mlflow, evaluation)


def _read_json_artifact(tracking_uri: str, run_id: str, path: str) -> Any:
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=path, dst_path=tmp, tracking_uri=tracking_uri
        )
        return json.loads(Path(local).read_text())


def run_record(tracking_uri: str, run_id: str) -> dict[str, Any]:
    """Gate results, evaluation, training facts and fingerprint exactly as the run recorded them."""
    mlflow_client = client(tracking_uri)
    run = mlflow_client.get_run(run_id)
    gates = {}
    for item in mlflow_client.list_artifacts(run_id, GATES_DIR):
        if item.path.endswith(".json"):
            gates[Path(item.path).stem] = _read_json_artifact(tracking_uri, run_id, item.path)
    names = {Path(item.path).name for item in mlflow_client.list_artifacts(run_id)}
    evaluation = _read_json_artifact(tracking_uri, run_id, EVALUATION_FILE) if EVALUATION_FILE in names else None
    training = _read_json_artifact(tracking_uri, run_id, TRAINING_FILE) if TRAINING_FILE in names else None
    return {
        "gates": gates,
        "evaluation": evaluation,
        "training": training,
        "training_data_fingerprint": run.data.tags.get(FINGERPRINT_TAG),
    }


def reference_profile(tracking_uri: str, run_id: str) -> dict[str, str] | None:
    """The run's stored reference profile as the evidence names it (artifact path and the sha256 of its bytes
    as stored), or None for a run that logged none."""
    import mlflow

    from loopform.gates.stored_profile import sha256_of

    if REFERENCE_PROFILE not in {item.path for item in client(tracking_uri).list_artifacts(run_id, REFERENCE_DIR)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=REFERENCE_PROFILE, dst_path=tmp, tracking_uri=tracking_uri
        )
        return {"artifact": REFERENCE_PROFILE, "sha256": sha256_of(Path(local))}


def evidence_tags(evidence: Mapping[str, Any]) -> dict[str, str]:
    """Version tags: the whole evidence as one canonical JSON tag, plus key fields for people and search."""
    tags = {
        EVIDENCE_TAG: ev.canonical(evidence).decode("utf-8"),
        DIGEST_TAG: str(evidence.get("digest", "")),
        "loopform.run_id": str(evidence.get("run_id", "")),
        "loopform.created_at": str(evidence.get("created_at", "")),
        FINGERPRINT_TAG: str(evidence.get("training_data_fingerprint", "")),
    }
    for key, value in (evidence.get("evaluation") or {}).items():
        if value is not None:
            tags[f"loopform.{key}"] = str(value)
    for name, result in (evidence.get("gates") or {}).items():
        tags[f"loopform.gate.{name}"] = "passed" if result.get("passed") else "failed"
    return tags


def register_version(
    tracking_uri: str,
    model_name: str,
    run_id: str,
    *,
    model_uri: str | None = None,
    record_dir: Path | None = None,
    now: datetime | None = None,
) -> ReleaseRecord:
    """Register the run's model as a new version whose tags hold the run's sealed evidence.

    The evidence is built from what the run recorded (gate JSONs, evaluation.json, training.json
    with the device it trained on, data fingerprint, and the reference profile's digest when the run
    stored one), so it cannot say more than the run proved.
    The release record JSON goes to `record_dir/<model>-v<version>.json` (when given) and to the
    run's `release/` artifacts.
    """
    import mlflow

    mlflow_client = client(tracking_uri)
    recorded = run_record(tracking_uri, run_id)
    if model_uri is None:
        outputs = mlflow_client.get_run(run_id).outputs
        logged = outputs.model_outputs if outputs else []
        if not logged:
            raise ValueError(f"run {run_id} logged no model; pass model_uri")
        model_uri = f"models:/{logged[-1].model_id}"
    if model_name not in {m.name for m in mlflow_client.search_registered_models(f"name = '{model_name}'")}:
        mlflow_client.create_registered_model(model_name)
    version = mlflow_client.create_model_version(model_name, source=model_uri, run_id=run_id)
    files = model_file_digests(tracking_uri, f"models:/{model_name}/{version.version}")
    profile = reference_profile(tracking_uri, run_id)
    sealed = ev.seal(
        {
            "model": model_name,
            "version": int(version.version),
            "run_id": run_id,
            "training_data_fingerprint": recorded["training_data_fingerprint"],
            "gates": recorded["gates"],
            "evaluation": recorded["evaluation"],
            "training": recorded["training"],
            "artifacts": {"digest": rec.artifacts_digest(files), "files": files},
            **({"reference_profile": profile} if profile else {}),
        },
        now=now,
    )
    for key, value in evidence_tags(sealed).items():
        mlflow_client.set_model_version_tag(model_name, version.version, key, value)
    record = ReleaseRecord(
        model=model_name,
        version=int(version.version),
        run_id=run_id,
        model_uri=f"models:/{model_name}/{version.version}",
        evidence=sealed,
    )
    path = None
    if record_dir is not None:
        record_dir.mkdir(parents=True, exist_ok=True)
        path = record_dir / f"{model_name}-v{version.version}.json"
        path.write_text(json.dumps(record.to_dict() | {"path": str(path)}, indent=2, sort_keys=True))
    mlflow.set_tracking_uri(tracking_uri)
    mlflow_client.log_dict(run_id, record.to_dict(), f"{RELEASE_DIR}/{model_name}-v{version.version}.json")
    return ReleaseRecord(**{**record.to_dict(), "path": str(path) if path else None})


def download_model(tracking_uri: str, model_uri: str, dst: Path) -> Path:
    """The model's files (MLmodel, weights, environment) in a local folder."""
    import os

    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in logs

    return Path(
        mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst), tracking_uri=tracking_uri)
    )


def model_file_digests(tracking_uri: str, model_uri: str) -> dict[str, str]:
    """sha256 of each of the model's files, as the registry serves them now."""
    with tempfile.TemporaryDirectory() as tmp:
        return rec.file_digests(download_model(tracking_uri, model_uri, Path(tmp)))


def read_evidence(tracking_uri: str, model_name: str, version: int | str) -> dict[str, Any] | None:
    """The evidence a version's tags hold, or None when it has none (or it is not JSON)."""
    tags = client(tracking_uri).get_model_version(model_name, str(version)).tags
    raw = tags.get(EVIDENCE_TAG)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def alias_version(tracking_uri: str, model_name: str, alias: str) -> int | None:
    """The version an alias points at, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return int(client(tracking_uri).get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None


def set_alias(tracking_uri: str, model_name: str, alias: str, version: int | str) -> None:
    """Point `alias` at `version` (last writer wins, as MLflow aliases do)."""
    client(tracking_uri).set_registered_model_alias(model_name, alias, str(version))


def load_model(tracking_uri: str, name: str, alias_or_version: int | str) -> Any:
    """The model object of a version (`3`) or an alias (`staging`, `prod`), rebuilt without unpickling."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    ref = str(alias_or_version)
    uri = f"models:/{name}/{ref}" if ref.isdigit() else f"models:/{name}@{ref}"
    with tempfile.TemporaryDirectory(prefix="loopform-model-") as tmp:
        return load_model_folder(download_model(tracking_uri, uri, Path(tmp)))


def champion(tracking_uri: str, name: str, alias: str = "champion") -> tuple[Any, int] | None:
    """(model, version) holding `alias`, or None when no version holds it (first training)."""
    version = alias_version(tracking_uri, name, alias)
    if version is None:
        return None
    return load_model(tracking_uri, name, version), version
