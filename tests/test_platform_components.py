"""ModelRegistry, FeatureStore and Platform under Pulumi mocks: inputs, names, parents, outputs."""

from __future__ import annotations

from pathlib import Path

import pulumi
import pytest

from components.feature_store import FeatureStore, FeatureStoreArgs, feature_files
from components.registry import ModelRegistry, ModelRegistryArgs
from loopform.render import REDACTED, RenderedResource, render_components
from loopform.spec import ExternalDatabase, ExternalRedis, FeatureStoreSpec, RegistrySpec, SecretRef

ROOT = Path(__file__).resolve().parent.parent


def _render(build) -> tuple[list[RenderedResource], dict[str, object]]:
    """Render a component and capture its outputs."""
    outputs: dict[str, object] = {}

    def run():
        component = build()
        names = [
            n for n in ("tracking_uri", "feature_server_url", "online_store", "service_name") if hasattr(component, n)
        ]
        return pulumi.Output.all(*[getattr(component, n) for n in names]).apply(
            lambda values: outputs.update(zip(names, values, strict=True))
        )

    return render_components(run), outputs


def _by_name(resources: list[RenderedResource]) -> dict[str, RenderedResource]:
    return {r.name: r for r in resources}


def _container(resource: RenderedResource) -> dict:
    spec = resource.inputs["spec"]
    template = spec["jobTemplate"]["spec"]["template"] if "jobTemplate" in spec else spec["template"]
    return template["spec"]["containers"][0]


def test_registry_in_cluster_postgres() -> None:
    resources, outputs = _render(
        lambda: ModelRegistry("reg", ModelRegistryArgs(spec=RegistrySpec(replicas=2), namespace="ml", db_password="pw"))
    )
    by_name = _by_name(resources)
    assert set(by_name) == {
        "reg",
        "reg-db",
        "reg-postgres",
        "reg-postgres-service",
        "reg-migrate",
        "reg-server",
        "reg-service",
    }
    component = by_name["reg"]
    assert component.type_ == "loopform:registry:ModelRegistry" and not component.custom
    assert all(r.parent == component.urn for r in resources if r.name != "reg")
    assert outputs["tracking_uri"] == "http://reg.ml.svc.cluster.local:5000"

    server = by_name["reg-server"]
    assert server.inputs["spec"]["replicas"] == 2
    assert server.inputs["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    container = _container(server)
    assert container["image"] == "ghcr.io/loopform/mlflow:v3.17.0"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {
        "name": "MLFLOW_BACKEND_STORE_URI",
        "valueFrom": {"secretKeyRef": {"name": "reg-db", "key": "url"}},
    } in container["env"]

    # The server waits for the migration Job, which waits for the database.
    migrate = by_name["reg-migrate"]
    assert migrate.urn in server.dependencies
    assert by_name["reg-postgres"].urn in migrate.dependencies
    assert _container(migrate)["command"][:3] == ["mlflow", "db", "upgrade"]

    secret = by_name["reg-db"].manifest()
    assert secret["stringData"] == {"POSTGRES_PASSWORD": REDACTED, "url": REDACTED}


def test_registry_external_database_creates_no_database() -> None:
    spec = RegistrySpec(backend=ExternalDatabase(url_secret=SecretRef(name="db", key="dsn")))
    resources, _ = _render(lambda: ModelRegistry("reg", ModelRegistryArgs(spec=spec, namespace="ml")))
    names = {r.name for r in resources}
    assert "reg-postgres" not in names and "reg-db" not in names
    env = _container(_by_name(resources)["reg-server"])["env"]
    assert env[0]["valueFrom"]["secretKeyRef"] == {"name": "db", "key": "dsn"}


def test_registry_in_cluster_needs_password() -> None:
    with pytest.raises(Exception, match="registryDbPassword"):
        render_components(lambda: ModelRegistry("reg", ModelRegistryArgs()))


def test_migration_job_name_follows_the_mlflow_version() -> None:
    def job_name(version: str) -> str:
        spec = RegistrySpec(mlflow_version=version)
        resources, _ = _render(lambda: ModelRegistry("reg", ModelRegistryArgs(spec=spec, db_password="pw")))
        return _by_name(resources)["reg-migrate"].inputs["metadata"]["name"]

    assert job_name("3.17.0") != job_name("3.18.0")


def test_feature_store_in_cluster_redis() -> None:
    files = feature_files(ROOT, {"fraud": "models/fraud"})
    resources, outputs = _render(
        lambda: FeatureStore(
            "fs", FeatureStoreArgs(spec=FeatureStoreSpec(), feature_files=files, namespace="ml", image="img:1")
        )
    )
    by_name = _by_name(resources)
    assert {
        "fs-repo",
        "fs-redis",
        "fs-redis-service",
        "fs-apply",
        "fs-server",
        "fs-server-service",
        "fs-materialize",
    } <= set(by_name)
    assert all(r.parent == by_name["fs"].urn for r in resources if r.name != "fs")
    assert outputs["feature_server_url"] == "http://fs-server.ml.svc.cluster.local:6566"
    assert outputs["online_store"] == "fs-redis.ml.svc.cluster.local:6379"

    repo = by_name["fs-repo"].inputs["data"]
    assert "fraud_features.py" in repo
    assert "type: redis" in repo["feature_store.yaml"] and "${REDIS_CONNECTION_STRING}" in repo["feature_store.yaml"]
    cron = by_name["fs-materialize"].inputs["spec"]
    assert cron["schedule"] == "*/30 * * * *" and cron["concurrencyPolicy"] == "Forbid"
    assert "materialize-incremental" in _container(by_name["fs-materialize"])["command"][-1]
    assert by_name["fs-apply"].urn in by_name["fs-server"].dependencies
    assert _container(by_name["fs-server"])["image"] == "img:1"


def test_feature_store_external_redis_reads_secret() -> None:
    spec = FeatureStoreSpec(online_store=ExternalRedis(connection_secret=SecretRef(name="redis", key="conn")))
    resources, outputs = _render(lambda: FeatureStore("fs", FeatureStoreArgs(spec=spec)))
    names = {r.name for r in resources}
    assert "fs-redis" not in names
    env = _container(_by_name(resources)["fs-server"])["env"]
    assert env[0] == {
        "name": "REDIS_CONNECTION_STRING",
        "valueFrom": {"secretKeyRef": {"name": "redis", "key": "conn"}},
    }
    assert outputs["online_store"] == "secret/redis#conn"


def test_feature_files_names_the_missing_model(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"models\.ghost\.path"):
        feature_files(tmp_path, {"ghost": "models/ghost"})
