"""MLflow registry on a temporary SQLite store: runs, versions with evidence tags, release records, loading."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from loopform import evidence as ev
from loopform import registry
from models.fraud import data
from models.fraud.contract import CONTRACT
from tests.helpers_registry import gate_results, make_version, small_model, stored_weights


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store per module: the first migration costs seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def trained():
    return small_model()


@pytest.fixture(scope="module")
def released(store, trained, tmp_path_factory):
    model, train_df, _, evaluation = trained
    base = tmp_path_factory.mktemp("registry")
    run = registry.log_training_run(
        store,
        "fraud",
        model,
        gate_results=gate_results(base / "reports"),
        training_data_fingerprint=data.fingerprint(train_df),
        evaluation=evaluation,
        params={"data_rows": len(train_df)},
    )
    record = registry.register_version(store, "fraud", run.run_id, record_dir=base / "releases")
    return run, record


def test_run_records_params_metrics_gates_and_reports(store, trained, released):
    model, train_df, _, evaluation = trained
    run, _ = released
    client = registry.client(store)
    logged = client.get_run(run.run_id)
    assert logged.data.params["data_rows"] == str(len(train_df))
    assert logged.data.params["patience"] == str(model.info["patience"])
    assert logged.data.metrics["eval.auc"] == pytest.approx(evaluation["auc"])
    assert logged.data.metrics["gate.drift.passed"] == 1.0
    gates = sorted(item.path for item in client.list_artifacts(run.run_id, "gates"))
    assert gates == ["gates/drift.json", "gates/ood.json", "gates/validation.json"]
    assert [item.path for item in client.list_artifacts(run.run_id, "reports")] == ["reports/drift.html"]
    recorded = registry.run_record(store, run.run_id)
    assert recorded["evaluation"] == ev.jsonable(evaluation)
    assert recorded["gates"]["drift"]["report"] == f"runs:/{run.run_id}/reports/drift.html"


def test_version_tags_hold_sealed_evidence(store, trained, released):
    _, train_df, _, evaluation = trained
    run, record = released
    assert record.version == 1 and record.run_id == run.run_id
    evidence = record.evidence
    assert ev.verify(evidence)
    assert evidence["model"] == "fraud" and evidence["version"] == 1 and evidence["run_id"] == run.run_id
    assert evidence["training_data_fingerprint"] == data.fingerprint(train_df)
    assert evidence["evaluation"] == ev.jsonable(evaluation)
    assert set(evidence["gates"]) == {"validation", "drift", "ood"}
    assert ev.check_evidence(evidence, {"min_auc": 0.75}, now=datetime.fromisoformat(evidence["created_at"])) == []

    tags = registry.client(store).get_model_version("fraud", "1").tags
    assert json.loads(tags[registry.EVIDENCE_TAG]) == evidence
    assert registry.read_evidence(store, "fraud", 1) == evidence
    assert tags[registry.DIGEST_TAG] == evidence["digest"]
    assert tags["loopform.auc"] == str(evaluation["auc"])
    assert tags["loopform.gate.drift"] == "passed"
    assert tags[registry.FINGERPRINT_TAG] == data.fingerprint(train_df)


def test_release_record_json_has_the_same_content(store, released):
    run, record = released
    written = json.loads(Path(record.path).read_text())
    assert written["evidence"] == record.evidence
    assert written["version"] == 1 and written["model_uri"] == "models:/fraud/1"
    logged = registry.client(store).list_artifacts(run.run_id, "release")
    assert [item.path for item in logged] == ["release/fraud-v1.json"]


def test_load_by_version_and_alias(store, trained, released):
    model, _, holdout, _ = trained
    expected = model.predict_proba(holdout)
    assert registry.champion(store, "fraud") is None
    assert registry.alias_version(store, "fraud", "staging") is None
    loaded = registry.load_model(store, "fraud", 1)
    assert np.array_equal(loaded.predict_proba(holdout), expected)
    assert loaded.threshold == model.threshold

    registry.set_alias(store, "fraud", "champion", 1)
    found = registry.champion(store, "fraud")
    assert found is not None and found[1] == 1
    assert np.array_equal(found[0].predict_proba(holdout), expected)
    assert np.array_equal(registry.load_model(store, "fraud", "champion").predict_proba(holdout), expected)


def test_versions_count_up_and_untagged_versions_have_no_evidence(store, trained, released):
    model, _, _, evaluation = trained
    second = make_version(store, "fraud", model, evaluation)
    assert second.version == 2 and second.run_id != released[0].run_id
    assert second.evidence["digest"] != released[1].evidence["digest"]
    client = registry.client(store)
    bare = client.create_model_version("fraud", source=client.get_model_version("fraud", "2").source)
    assert registry.read_evidence(store, "fraud", bare.version) is None


def test_register_needs_a_logged_model(store):
    import mlflow

    mlflow.set_tracking_uri(store)
    with mlflow.start_run(experiment_id=registry.experiment_id(store, "loopform-fraud")) as run:
        pass
    with pytest.raises(ValueError, match="logged no model"):
        registry.register_version(store, "fraud", run.info.run_id)


def test_evidence_from_the_real_gates(store, trained):
    """The gates' own results (loopform.gates) make evidence that check_evidence accepts, or refuses on drift."""
    from datetime import UTC, datetime

    from loopform.gates.drift import drift_gate
    from loopform.gates.ood import ood_gate
    from loopform.gates.validation import validate_data
    from loopform.spec import GatesSpec

    model, train_df, _, evaluation = trained
    gates = GatesSpec()
    verdicts = {}
    for drift in (0.0, 1.0):
        current = data.generate(1500, seed=21, covariate_drift=drift)
        results = [
            validate_data(current, gates, CONTRACT, require_label=True),
            drift_gate(train_df, current, gates, CONTRACT),
            ood_gate(train_df, current, gates, CONTRACT),
        ]
        run = registry.log_training_run(
            store,
            "fraud-gated",
            model,
            gate_results={r.gate: r for r in results},
            training_data_fingerprint=data.fingerprint(train_df),
            evaluation=evaluation,
        )
        record = registry.register_version(store, "fraud-gated", run.run_id)
        assert set(record.evidence["gates"]) == {"validation", "drift", "ood"}
        verdicts[drift] = ev.check_evidence(record.evidence, gates.model_dump(), now=datetime.now(UTC))
    assert verdicts[0.0] == []
    assert any(r.startswith("gate 'drift' did not pass") for r in verdicts[1.0])


def test_the_service_loads_only_the_files_the_record_names(store, trained, released, tmp_path):
    """The evidence seals each model file's digest; a weights file swapped in the store is refused at load."""
    from loopform import record as rec
    from loopform.serving.release import ArtifactDigestError, load_release

    model, _, holdout, _ = trained
    _, record = released
    artifacts = record.evidence["artifacts"]
    assert artifacts["digest"] == rec.artifacts_digest(artifacts["files"])
    assert "MLmodel" in artifacts["files"] and len(artifacts["files"]) >= 3
    loaded = load_release(store, "models:/fraud/1", artifacts["digest"])
    assert loaded.version == 1
    assert np.array_equal(loaded.model.predict_proba(holdout), model.predict_proba(holdout))

    stored, _ = stored_weights(store, "fraud", 1)
    original = stored.read_bytes()
    try:
        stored.write_bytes(original + b"swapped")
        with pytest.raises(ArtifactDigestError, match="the signed release record names " + artifacts["digest"]):
            load_release(store, "models:/fraud/1", artifacts["digest"])
        assert load_release(store, "models:/fraud/1").version == 1  # without a record nothing is checked
    finally:
        stored.write_bytes(original)


def test_a_version_is_stored_without_pickle_or_code(store, released):
    """The model folder holds the exported network (pt2), the preprocessing JSON and no code or pickle."""
    import zipfile

    _, record = released
    files = set(record.evidence["artifacts"]["files"])
    assert {"MLmodel", "data/model.pt2", f"extra_files/{registry.PREPROCESSING_FILE}"} <= files
    assert not [f for f in files if f.startswith("code/") or f.endswith((".pth", ".pkl", "pickle_module_info.txt"))]
    with zipfile.ZipFile(
        registry.download_model(store, "models:/fraud/1", Path(store.removeprefix("sqlite:///")).parent / "pt2")
        / "data/model.pt2"
    ) as archive:
        configs = [json.loads(archive.read(n)) for n in archive.namelist() if n.endswith("_config.json")]
    payloads = [entry for config in configs for entry in config["config"].values()]
    assert payloads and all(entry["use_pickle"] is False for entry in payloads)  # raw tensor bytes


def test_loading_unpickles_no_python_object(store, trained, released, monkeypatch):
    """Loading rebuilds the model with pickle disabled; torch.load only ever runs weights_only (tensors)."""
    import pickle

    import torch

    model, _, holdout, _ = trained

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading a model")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    calls = []
    real_load = torch.load

    def checked_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        if kwargs.get("weights_only") is not True:
            raise AssertionError("torch.load without weights_only=True while loading a model")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", checked_load)
    loaded = registry.load_model(store, "fraud", 1)
    assert type(loaded).__name__ == "FraudModel"
    assert np.array_equal(loaded.predict_proba(holdout), model.predict_proba(holdout))
    assert loaded.threshold == model.threshold and loaded.info == model.info
    assert loaded.features == model.features


def test_mlflow_pyfunc_scores_the_production_alias(store, trained, released):
    """A user of MLflow scores a batch through the standard pyfunc loader; the input is the model's encoding."""
    import mlflow.pyfunc
    import torch

    model, _, holdout, _ = trained
    registry.set_alias(store, "fraud", "production", 1)
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    scorer = mlflow.pyfunc.load_model("models:/fraud@production")
    batch = holdout.head(500)
    logits = np.asarray(scorer.predict(model.encode(batch))).ravel()
    assert logits.shape == (len(batch),)
    scores = torch.sigmoid(torch.as_tensor(logits)).numpy().astype(np.float64)
    np.testing.assert_allclose(scores, model.predict_proba(batch), rtol=1e-6, atol=1e-7)


def test_a_model_class_outside_the_model_packages_is_refused(tmp_path, trained):
    """preprocessing.json cannot make the loader import arbitrary code."""
    model = trained[0]
    folder = registry.save_model_folder(model, tmp_path / "m")
    config_path = folder / "extra_files" / registry.PREPROCESSING_FILE
    config = json.loads(config_path.read_text())
    assert config["class"] == "models.fraud.model:FraudModel"
    assert registry.load_model_folder(folder).threshold == model.threshold
    config_path.write_text(json.dumps(config | {"class": "os:system"}))
    with pytest.raises(ValueError, match=r"names model class 'os:system'"):
        registry.load_model_folder(folder)
