"""ModelRegistry, FeatureStore and Platform under Pulumi mocks: inputs, names, parents, outputs."""

from __future__ import annotations

from pathlib import Path

import pulumi
import pytest
from pulumi.runtime.rpc import is_rpc_secret

from components.feature_store import FeatureStore, FeatureStoreArgs, feature_files, redis_connection_string
from components.registry import (
    AUTH_SCRIPT,
    SCRIPTS_DIR,
    UPGRADE_SCRIPT,
    DatabaseEndpoint,
    ModelRegistry,
    ModelRegistryArgs,
)
from loopform.model_code import ModelCodeError
from loopform.render import REDACTED, RenderedResource, render_components
from loopform.spec import ExternalDatabase, ExternalRedis, FeatureStoreSpec, RegistrySpec

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


def _init_container(resource: RenderedResource, name: str) -> dict:
    (found,) = [c for c in resource.inputs["spec"]["template"]["spec"]["initContainers"] if c["name"] == name]
    return found


def test_registry_in_cluster_postgres() -> None:
    resources, outputs = _render(
        lambda: ModelRegistry(
            "reg", ModelRegistryArgs(environment="dev", spec=RegistrySpec(replicas=2), namespace="ml", db_password="pw")
        )
    )
    by_name = _by_name(resources)
    assert set(by_name) == {
        "reg",
        "reg-db",
        "reg-sa",
        "reg-postgres",
        "reg-postgres-data",
        "reg-postgres-service",
        "reg-scripts",
        "reg-auth",
        "reg-server",
        "reg-service",
    }
    component = by_name["reg"]
    assert component.type_ == "loopform:registry:ModelRegistry" and not component.custom
    assert all(r.parent == component.urn for r in resources if r.name != "reg")
    assert outputs["tracking_uri"] == "http://reg.ml.svc.cluster.local:5000"

    server = by_name["reg-server"]
    assert server.inputs["spec"]["replicas"] == 2
    # No old server writes while the new pods' init container migrates.
    assert server.inputs["spec"]["strategy"] == {"type": "Recreate"}
    container = _container(server)
    assert container["image"] == "ghcr.io/loopform/mlflow:v3.17.2"
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert {
        "name": "MLFLOW_BACKEND_STORE_URI",
        "valueFrom": {"secretKeyRef": {"name": "reg-db", "key": "url"}},
    } in container["env"]

    # The server waits for its database and the upgrade script, which its init container runs first.
    assert {by_name["reg-postgres"].urn, by_name["reg-scripts"].urn} <= set(server.dependencies)
    upgrade = _init_container(server, "upgrade-schema")
    assert upgrade["command"] == ["python", f"{SCRIPTS_DIR}/{UPGRADE_SCRIPT.name}"]
    assert by_name["reg-scripts"].inputs["data"] == {
        UPGRADE_SCRIPT.name: UPGRADE_SCRIPT.read_text(),
        AUTH_SCRIPT.name: AUTH_SCRIPT.read_text(),
    }
    # Backups go to the bucket, outside the artifact root MLflow's proxy serves to any client.
    backups = {"name": "LOOPFORM_BACKUP_URI", "value": "s3://loopform-mlflow/loopform-backups/mlflow"}
    assert backups in upgrade["env"]
    assert server.inputs["spec"]["progressDeadlineSeconds"] == 3600

    secret = by_name["reg-db"].manifest()
    libpq = {"PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE"}  # in-cluster: no TLS, no PGSSLMODE
    assert secret["stringData"] == dict.fromkeys({"POSTGRES_PASSWORD", "url", *libpq}, REDACTED)


def _secret_value(resource: RenderedResource, key: str) -> str:
    data = resource.inputs["stringData"]
    data = data["value"] if is_rpc_secret(data) else data  # a secret value wraps the whole property
    value = data[key]
    return value["value"] if is_rpc_secret(value) else value


PASSWORD = "p@ss:w/rd%1?"
#: The platform's PostgreSQL, where the Feast SQL registry lives.
REGISTRY_DATABASE = {"registry_database": DatabaseEndpoint("db", 5432, None, "reg-db"), "registry_password": "pw"}


def test_registry_external_database_gets_its_url_secret_built_and_escaped() -> None:
    from sqlalchemy.engine import make_url

    spec = RegistrySpec(backend=ExternalDatabase(host="db.example.internal", user="ml", database="tracking"))
    resources, _ = _render(
        lambda: ModelRegistry(
            "reg", ModelRegistryArgs(environment="dev", spec=spec, namespace="ml", db_password=PASSWORD)
        )
    )
    by_name = _by_name(resources)
    assert "reg-postgres" not in by_name
    # The URL for MLflow, the same connection as libpq variables for psql and pg_dump; no POSTGRES_PASSWORD.
    libpq = {"PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "PGSSLMODE"}
    assert set(by_name["reg-db"].manifest()["stringData"]) == {"url", *libpq}
    assert _secret_value(by_name["reg-db"], "PGPASSWORD") == PASSWORD
    url = make_url(_secret_value(by_name["reg-db"], "url"))
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "ml",
        PASSWORD,
        "db.example.internal",
        5432,
        "tracking",
    )
    assert url.query["sslmode"] == "require"
    env = _container(by_name["reg-server"])["env"]
    assert env[0]["valueFrom"]["secretKeyRef"] == {"name": "reg-db", "key": "url"}


def test_the_database_url_is_in_no_command_line() -> None:
    resources, _ = _render(lambda: ModelRegistry("reg", ModelRegistryArgs(environment="dev", db_password=PASSWORD)))
    by_name = _by_name(resources)
    pod = by_name["reg-server"].inputs["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "loopform-mlflow"
    for container in [*pod["initContainers"], *pod["containers"]]:
        command = " ".join([*container["command"], *container.get("args", [])])
        assert "MLFLOW_BACKEND_STORE_URI)" not in command and "backend-store-uri" not in command, command
    url = make_url_of(by_name["reg-db"])
    assert url.password == PASSWORD and url.host == "reg-postgres.loopform-system.svc.cluster.local"
    # SQLAlchemy 2.1 reads plain postgresql:// as psycopg 3, which the images do not install.
    assert url.drivername == "postgresql+psycopg2"


def test_mlflow_users_passwords_differ_per_environment_and_roll_the_server() -> None:
    """Two environments given the same root secret get different MLflow user passwords, and the server's pods
    carry a checksum of them: a password that changes without the database password still restarts the server,
    whose init container then applies it before any client uses the new one."""

    def render(environment: str) -> tuple[str, str]:
        resources, _ = _render(
            lambda: ModelRegistry("reg", ModelRegistryArgs(db_password=PASSWORD, environment=environment))
        )
        by_name = _by_name(resources)
        annotations = by_name["reg-server"].inputs["spec"]["template"]["metadata"]["annotations"]
        return _secret_value(by_name["reg-auth"], "users.json"), annotations["loopform.dev/auth-checksum"]

    dev, prod = render("dev"), render("prod")
    assert dev[0] != prod[0] and dev[1] != prod[1]
    assert render("prod") == prod


def make_url_of(secret: RenderedResource):
    from sqlalchemy.engine import make_url

    return make_url(_secret_value(secret, "url"))


@pytest.mark.slow
def test_the_rendered_init_container_migrates_from_the_environment(tmp_path: Path) -> None:
    """The init container as rendered (command, mounted script, env), run here against SQLite."""
    import sqlite3
    import subprocess
    import sys

    resources, _ = _render(lambda: ModelRegistry("reg", ModelRegistryArgs(environment="dev", db_password="pw")))
    by_name = _by_name(resources)
    upgrade = _init_container(by_name["reg-server"], "upgrade-schema")
    scripts = tmp_path / "scripts"  # the ConfigMap volume at SCRIPTS_DIR
    scripts.mkdir()
    for file, text in by_name["reg-scripts"].inputs["data"].items():
        (scripts / file).write_text(text)
    command = [sys.executable, *(part.replace(SCRIPTS_DIR, str(scripts)) for part in upgrade["command"][1:])]
    env = {e["name"]: e["value"] for e in upgrade["env"] if "value" in e}
    env |= {"PATH": "/usr/bin:/bin", "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env["LOOPFORM_BACKUP_URI"] = f"file://{tmp_path / 'backups'}"  # the artifact bucket on the cluster
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    tables = {row[0] for row in sqlite3.connect(tmp_path / "mlflow.db").execute("select name from sqlite_master")}
    assert {"experiments", "runs", "registered_models", "alembic_version"} <= tables


@pytest.mark.parametrize("backend", [None, ExternalDatabase(host="db")])
def test_registry_needs_a_password(backend) -> None:
    spec = RegistrySpec(backend=backend) if backend else RegistrySpec()
    with pytest.raises(Exception, match="registryDbPassword"):
        render_components(lambda: ModelRegistry("reg", ModelRegistryArgs(environment="dev", spec=spec)))


def test_an_mlflow_version_change_upgrades_with_the_new_image() -> None:
    def images(version: str) -> set[str]:
        spec = RegistrySpec(mlflow_version=version)
        resources, _ = _render(
            lambda: ModelRegistry("reg", ModelRegistryArgs(environment="dev", spec=spec, db_password="pw"))
        )
        pod = _by_name(resources)["reg-server"].inputs["spec"]["template"]["spec"]
        return {c["image"] for c in [*pod["initContainers"], *pod["containers"]]}

    assert images("3.18.0") == {"ghcr.io/loopform/mlflow:v3.18.0"}


def test_feature_store_in_cluster_redis() -> None:
    files = feature_files(ROOT, {"fraud": "models/fraud"})
    resources, outputs = _render(
        lambda: FeatureStore(
            "fs",
            FeatureStoreArgs(
                spec=FeatureStoreSpec(),
                feature_files=files,
                namespace="ml",
                image="img:1",
                redis_password="in-cluster-token",
                client_namespaces=["serving"],
                **REGISTRY_DATABASE,
            ),
        )
    )
    by_name = _by_name(resources)
    assert {
        "fs-repo",
        "fs-redis",
        "fs-redis-auth",
        "fs-redis-service",
        "fs-apply",
        "fs-server",
        "fs-server-service",
        "fs-materialize",
    } <= set(by_name)
    # Children of the component, or of its SharedSecrets (the registry's and the online store's, per namespace).
    shared = {by_name["fs-registry"].urn, by_name["fs-online-store"].urn}
    assert all(r.parent in {by_name["fs"].urn, *shared} for r in resources if r.name != "fs")
    assert by_name["fs-registry"].parent == by_name["fs"].urn
    assert outputs["feature_server_url"] == "http://fs-server.ml.svc.cluster.local:6566"
    assert outputs["online_store"] == "fs-redis.ml.svc.cluster.local:6379"
    # Its clients read a connection string with the password, from the online-store Secret in their namespaces.
    for namespace in ("ml", "serving"):
        connection = _secret_value(by_name[f"fs-online-store-{namespace}"], "connection_string")
        assert connection == "fs-redis.ml.svc.cluster.local:6379,password=in-cluster-token"
    assert _secret_value(by_name["fs-redis-auth"], "redis.conf") == "requirepass in-cluster-token\n"
    with pytest.raises(ValueError, match="needs a password"):
        _render(
            lambda: FeatureStore("fs", FeatureStoreArgs(spec=FeatureStoreSpec(), namespace="ml", **REGISTRY_DATABASE))
        )

    repo = by_name["fs-repo"].inputs["data"]
    assert "fraud_features.py" in repo
    assert "type: redis" in repo["feature_store.yaml"] and "${REDIS_CONNECTION_STRING}" in repo["feature_store.yaml"]
    cron = by_name["fs-materialize"].inputs["spec"]
    assert cron["schedule"] == "*/30 * * * *" and cron["concurrencyPolicy"] == "Forbid"
    assert "materialize-incremental" in _container(by_name["fs-materialize"])["command"][-1]
    assert by_name["fs-apply"].urn in by_name["fs-server"].dependencies
    assert _container(by_name["fs-server"])["image"] == "img:1"


def test_feature_store_external_redis_gets_its_connection_secret_where_it_is_read() -> None:
    spec = FeatureStoreSpec(online_store=ExternalRedis(host="redis.example", port=6380))
    resources, outputs = _render(
        lambda: FeatureStore(
            "fs",
            FeatureStoreArgs(
                spec=spec, namespace="ml", redis_password="tok", client_namespaces=["serving"], **REGISTRY_DATABASE
            ),
        )
    )
    by_name = _by_name(resources)
    assert "fs-redis" not in by_name
    for namespace in ("ml", "serving"):
        secret = by_name[f"fs-online-store-{namespace}"]
        assert secret.inputs["metadata"] == {
            **secret.inputs["metadata"],
            "name": "fs-online-store",
            "namespace": namespace,
        }
        assert _secret_value(secret, "connection_string") == "redis.example:6380,ssl=true,password=tok"
    env = _container(by_name["fs-server"])["env"]
    assert env[0] == {
        "name": "REDIS_CONNECTION_STRING",
        "valueFrom": {"secretKeyRef": {"name": "fs-online-store", "key": "connection_string"}},
    }
    assert outputs["online_store"] == "redis.example:6380"


def test_redis_connection_string_refuses_what_feast_cannot_parse() -> None:
    online = ExternalRedis(host="r", auth=True)
    with pytest.raises(ValueError, match="redisPassword"):
        redis_connection_string(online, None)
    with pytest.raises(ValueError, match="','"):
        redis_connection_string(online, "a,b")
    assert redis_connection_string(ExternalRedis(host="r", ssl=False, auth=False), None) == "r:6379"


def test_feature_files_names_the_missing_model(tmp_path: Path) -> None:
    with pytest.raises(ModelCodeError, match=r"models\.ghost\.path"):
        feature_files(tmp_path, {"ghost": "models/ghost"})
