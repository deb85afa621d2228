"""Pipeline steps as an Argo pod runs them: the platform's offline store and registry, env from the template."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from loopform.cli import main
from loopform.features import EVENTS_FILE, OFFLINE_URI_ENV, REGISTRY_URL_ENV, FeatureRepo, cluster_config
from loopform.spec import CONFIG_KEY, load_stack
from loopform.steps import LABELS_FILE, StepContext, ingest
from models.fraud import data
from models.fraud.contract import CONTRACT

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def platform(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, str]:
    """A dev stack whose Feast registry and offline store are folders; the apply Job already ran."""
    offline = f"file://{tmp_path / 'offline'}"
    document = yaml.safe_load((ROOT / "stacks" / "Pulumi.dev.yaml").read_text())
    feature_store = document["config"][CONFIG_KEY]["feature_store"]
    feature_store["offline_store"]["data_uri"] = offline
    stack = tmp_path / "Pulumi.dev.yaml"
    stack.write_text(yaml.safe_dump(document))
    # What the WorkflowTemplate's step container and the FeatureStore component set.
    monkeypatch.setenv(OFFLINE_URI_ENV, offline)
    monkeypatch.setenv("REDIS_CONNECTION_STRING", "localhost:6379")
    # The SQL registry (PostgreSQL on the cluster) on SQLite here; Feast reads its URL from the registry Secret.
    monkeypatch.setenv(REGISTRY_URL_ENV, f"sqlite:///{tmp_path / 'registry.db'}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    spec = load_stack(stack)
    # The `feast apply` Job of the FeatureStore component, with the ConfigMap's feature_store.yaml.
    FeatureRepo(tmp_path / "apply-job", CONTRACT, config=cluster_config(spec.feature_store)).apply()
    # Upstream ETL lands labelled transactions in the offline store.
    context = StepContext(
        model="fraud",
        spec=spec,
        run_dir=tmp_path / "etl",
        tracking_uri="unused",
        feature_repo=tmp_path / "etl-feast",
        root=ROOT,
        stack_files=tmp_path,
        offline_uri=offline,
    )
    ingest(context, data.generate(5000, 11))
    return stack, offline


def _step(name: str, stack: Path, run_dir: Path) -> int:
    return main(["step", name, "--stack", "dev", "--file", str(stack), "--model", "fraud", "--run-dir", str(run_dir)])


def test_steps_read_the_platform_offline_store(platform: tuple[Path, str], tmp_path: Path) -> None:
    stack, offline = platform
    folder = Path(offline.removeprefix("file://")) / "fraud"
    assert sorted(p.name for p in folder.iterdir()) == sorted([LABELS_FILE, EVENTS_FILE])
    run_dir = tmp_path / "work" / "run"
    assert _step("validate-data", stack, run_dir) == 0
    assert _step("get-features", stack, run_dir) == 0
    training = pd.read_parquet(run_dir / "training.parquet")
    labels = pd.read_parquet(folder / LABELS_FILE)
    assert len(training) == len(labels) and data.LABEL in training
    feature_store = yaml.safe_load((tmp_path / "work" / "feast" / "feature_store.yaml").read_text())
    assert feature_store["online_store"]["type"] == "redis"
    assert feature_store["registry"] == {
        "registry_type": "sql",
        "path": f"${{{REGISTRY_URL_ENV}}}",
        "cache_ttl_seconds": 60,
    }
