"""MLflow's writes are authenticated: a real `mlflow server --app-name basic-auth` on localhost, configured and
bootstrapped by the same functions and script as the cluster's server pods (components/registry.py,
components/scripts/mlflow_auth.py), refuses anonymous writes and lets each identity do only its part."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from components import registry

slow = pytest.mark.slow

PASSWORDS = {
    registry.PIPELINE_USER: "pipeline-secret-1",
    registry.PROMOTION_USER: "promotion%secret",  # a `%` must survive configparser's interpolation
    registry.SERVING_USER: "serving-secret-1",
    registry.MONITOR_USER: "monitor-secret-1",
}
ADMIN_PASSWORD = "admin-secret-1"
MODEL = "fraud"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bootstrap(config: Path, users: Path) -> list[str]:
    """Run the pods' init script, as the init container does; its per-user lines."""
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(config), "LOOPFORM_AUTH_USERS": str(users)}
    done = subprocess.run(
        [sys.executable, str(registry.AUTH_SCRIPT)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.splitlines()


@dataclass
class Server:
    url: str
    config: Path
    users: Path

    def api(self, path: str) -> str:
        return f"{self.url}/api/2.0/mlflow/{path}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("mlflow-auth")
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    config = root / registry.AUTH_CONFIG_KEY
    config.write_text(registry.auth_config(registry.auth_database_url(tracking), ADMIN_PASSWORD))
    users = root / registry.AUTH_USERS_KEY
    users.write_text(registry.auth_users(PASSWORDS))
    _bootstrap(config, users)
    port = _free_port()
    env = {
        **os.environ,
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        registry.FLASK_SECRET_ENV: "csrf-key",
        "HOME": str(root),
    }
    for variable in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(variable, None)
    log = (root / "server.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            f"--app-name={registry.AUTH_APP}",
            "--host=127.0.0.1",
            f"--port={port}",
            "--workers=1",
            f"--backend-store-uri={tracking}",
            "--serve-artifacts",
            f"--artifacts-destination={(root / 'artifacts').as_uri()}",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            if process.poll() is not None:
                pytest.fail(f"mlflow server exited: {(root / 'server.log').read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"mlflow server did not come up: {(root / 'server.log').read_text()[-3000:]}")
        yield Server(url, config, users)
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def _as(user: str) -> tuple[str, str]:
    return user, PASSWORDS[user]


@pytest.fixture(scope="module")
def version(server: Server, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A run and a registered version made by the pipeline identity through MLflow's own client, which reads the
    credentials file the pods mount (`~/.mlflow/credentials`, written by registry.credentials_file)."""
    home = tmp_path_factory.mktemp("pipeline-home")
    (home / ".mlflow").mkdir()
    (home / ".mlflow" / registry.CREDENTIALS_KEY).write_text(registry.credentials_file(*_as(registry.PIPELINE_USER)))
    script = f"""
import mlflow
from mlflow import MlflowClient
client = MlflowClient({server.url!r}, {server.url!r})
experiment = client.create_experiment("training")
run = client.create_run(experiment)
client.log_metric(run.info.run_id, "auc", 0.9)
client.log_text(run.info.run_id, "weights", "model/weights.txt")
client.create_registered_model({MODEL!r})
version = client.create_model_version({MODEL!r}, source=f"runs:/{{run.info.run_id}}/model", run_id=run.info.run_id)
client.set_model_version_tag({MODEL!r}, version.version, "loopform.evidence", "sealed")
print(version.version)
"""
    env = {**os.environ, "HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true"}
    for variable in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(variable, None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()[-1]


def _release_writes(version: str) -> list[tuple[str, str, dict[str, str]]]:
    """(method, path, body) of what a release moves: the production alias and the staging tag."""
    return [
        ("POST", "registered-models/alias", {"name": MODEL, "alias": "production", "version": version}),
        (
            "POST",
            "model-versions/set-tag",
            {"name": MODEL, "version": version, "key": "loopform.released.staging", "value": "1"},
        ),
    ]


def _delete(version: str) -> tuple[str, str, dict[str, str]]:
    return ("DELETE", "model-versions/delete", {"name": MODEL, "version": version})


@slow
def test_anonymous_writes_are_refused(server: Server, version: str) -> None:
    experiment = requests.get(
        server.api("experiments/get-by-name"), params={"experiment_name": "training"}, auth=_as(registry.SERVING_USER)
    ).json()["experiment"]["experiment_id"]
    writes = [("POST", "runs/create", {"experiment_id": experiment}), *_release_writes(version), _delete(version)]
    for method, path, body in writes:
        response = requests.request(method, server.api(path), json=body, timeout=10)
        assert response.status_code == 401, (path, response.status_code, response.text)
    assert requests.get(server.api("model-versions/get"), params={"name": MODEL, "version": version}).status_code == 401
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200


@slow
def test_serving_reads_but_cannot_write(server: Server, version: str) -> None:
    serving = _as(registry.SERVING_USER)
    read = requests.get(server.api("model-versions/get"), params={"name": MODEL, "version": version}, auth=serving)
    assert read.status_code == 200, read.text
    assert read.json()["model_version"]["version"] == version
    for method, path, body in [*_release_writes(version), _delete(version)]:
        response = requests.request(method, server.api(path), json=body, auth=serving, timeout=10)
        assert response.status_code == 403, (path, response.status_code, response.text)


@slow
def test_a_wrong_password_is_refused(server: Server, version: str) -> None:
    response = requests.get(
        server.api("model-versions/get"),
        params={"name": MODEL, "version": version},
        auth=(registry.PROMOTION_USER, "x"),
    )
    assert response.status_code == 401


@slow
def test_promotion_moves_aliases_and_no_writer_administers_users(server: Server, version: str) -> None:
    promotion = _as(registry.PROMOTION_USER)
    for method, path, body in _release_writes(version):
        response = requests.request(method, server.api(path), json=body, auth=promotion, timeout=10)
        assert response.status_code == 200, (path, response.status_code, response.text)
    by_alias = requests.get(
        server.api("registered-models/alias"),
        params={"name": MODEL, "alias": "production"},
        auth=_as(registry.SERVING_USER),
    )
    assert by_alias.json()["model_version"]["version"] == version
    # Undoing a promotion deletes the alias again (a first release had none).
    undo = requests.delete(
        server.api("registered-models/alias"), json={"name": MODEL, "alias": "production"}, auth=promotion
    )
    assert undo.status_code == 200, undo.text
    # No workload is an admin: neither writer can add users or grant itself more.
    pipeline = _as(registry.PIPELINE_USER)
    create_user = requests.post(server.api("users/create"), json={"username": "x", "password": "y" * 12}, auth=pipeline)
    assert create_user.status_code == 403, create_user.text


@slow
def test_the_bootstrap_is_rerun_safe_and_rotates_passwords(server: Server, version: str) -> None:
    assert all(line.endswith(": current") for line in _bootstrap(server.config, server.users))
    rotated = {**PASSWORDS, registry.SERVING_USER: "serving-secret-2"}
    server.users.write_text(registry.auth_users(rotated))
    lines = _bootstrap(server.config, server.users)
    assert f"user {registry.SERVING_USER}: updated" in lines
    params = {"name": MODEL, "version": version}
    old = requests.get(server.api("model-versions/get"), params=params, auth=_as(registry.SERVING_USER))
    new = requests.get(
        server.api("model-versions/get"), params=params, auth=(registry.SERVING_USER, "serving-secret-2")
    )
    assert (old.status_code, new.status_code) == (401, 200)
    server.users.write_text(registry.auth_users(PASSWORDS))
    _bootstrap(server.config, server.users)


@slow
def test_promote_says_which_identity_it_needs(server: Server, version: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`loopform promote` without the promotion user's credentials names the variables and the Secret to read."""
    from mlflow.exceptions import MlflowException

    from loopform import registry as runtime
    from loopform.promotion import access_denied

    monkeypatch.setenv("HOME", str(server.config.parent))  # no ~/.mlflow/credentials there
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    with pytest.raises(MlflowException) as anonymous:
        runtime.client(server.url).get_model_version(MODEL, version)
    assert "HTTP 401" in access_denied(anonymous.value, server.url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", registry.SERVING_USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORDS[registry.SERVING_USER])
    with pytest.raises(MlflowException) as serving:
        runtime.set_alias(server.url, MODEL, "production", version)
    hint = access_denied(serving.value, server.url)
    assert "HTTP 403" in hint and "mlflow-promotion-credentials" in hint
    assert access_denied(MlflowException("no such version", error_code="RESOURCE_DOES_NOT_EXIST"), server.url) is None


def test_the_credentials_file_is_what_mlflow_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.utils.credentials import read_mlflow_creds

    (tmp_path / ".mlflow").mkdir()
    (tmp_path / ".mlflow" / "credentials").write_text(registry.credentials_file("promotion", "p%ss:w@rd"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    assert tuple(read_mlflow_creds()) == ("promotion", "p%ss:w@rd")


def test_the_auth_config_is_what_the_auth_app_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.server.auth.config import read_auth_config

    tracking = "postgresql+psycopg2://mlflow:p%40ss@db:5432/mlflow"
    path = tmp_path / "auth.ini"
    path.write_text(registry.auth_config(registry.auth_database_url(tracking), "a%b"))
    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(path))
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_PASSWORD", raising=False)
    monkeypatch.delenv("MLFLOW_AUTH_ADMIN_USERNAME", raising=False)
    config = read_auth_config()
    assert config.database_uri == "postgresql+psycopg2://mlflow:p%40ss@db:5432/mlflow_auth"
    assert (config.admin_username, config.admin_password, config.default_permission) == ("admin", "a%b", "READ")
    users = json.loads(registry.auth_users(PASSWORDS))
    assert users[registry.SERVING_USER]["grants"] == [] and users[registry.MONITOR_USER]["grants"] == []


# The cluster side, as rendered: the server runs the auth app, its users come from the init container, and every
# client reads its identity from a mounted credentials file.


def _by_name(resources) -> dict:
    return {r.name: r for r in resources}


def _pod_spec(manifest: dict) -> dict:
    spec = manifest["spec"]
    template = spec["jobTemplate"]["spec"]["template"] if "jobTemplate" in spec else spec["template"]
    return template["spec"]


def _secret_env(container: dict) -> set[str]:
    return {e["name"] for e in container.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}


def test_the_server_runs_the_auth_app_with_its_users_bootstrapped_first(rendered) -> None:
    resources = _by_name(rendered("dev"))
    pod = _pod_spec(resources["dev-registry-server"].manifest())
    (server,) = pod["containers"]
    command = server["command"]
    assert command[: len(registry.FLASK_SECRET_FROM_FILE)] == registry.FLASK_SECRET_FROM_FILE
    assert command[len(registry.FLASK_SECRET_FROM_FILE) :][:3] == ["mlflow", "server", "--app-name=basic-auth"]
    assert [c["name"] for c in pod["initContainers"]] == ["upgrade-schema", "bootstrap-auth"]
    bootstrap = pod["initContainers"][1]
    assert bootstrap["command"] == ["python", f"{registry.SCRIPTS_DIR}/{registry.AUTH_SCRIPT.name}"]
    assert resources["dev-registry-scripts"].manifest()["data"][registry.AUTH_SCRIPT.name] == (
        registry.AUTH_SCRIPT.read_text()
    )
    # The auth config, users and CSRF key are files of one Secret; only the database URL stays a variable.
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in (server, bootstrap):
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == registry.AUTH_DIR]
        assert volumes[mount["name"]]["secret"]["secretName"] == "dev-registry-auth" and mount["readOnly"]
        assert _secret_env(container) == {"MLFLOW_BACKEND_STORE_URI"}
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["MLFLOW_AUTH_CONFIG_PATH"] == f"{registry.AUTH_DIR}/{registry.AUTH_CONFIG_KEY}"
    auth = resources["dev-registry-auth"].manifest()
    assert set(auth["stringData"]) == {registry.AUTH_CONFIG_KEY, registry.AUTH_USERS_KEY, registry.FLASK_SECRET_KEY}


def test_the_flask_key_reaches_mlflow_from_its_file(tmp_path: Path) -> None:
    (tmp_path / registry.FLASK_SECRET_KEY).write_text("k3y")
    wrapper = [part.replace(registry.AUTH_DIR, str(tmp_path)) for part in registry.FLASK_SECRET_FROM_FILE]
    program = f"import os; print(os.environ[{registry.FLASK_SECRET_ENV!r}])"
    done = subprocess.run([*wrapper, sys.executable, "-c", program], capture_output=True, text=True, timeout=30)
    assert done.stdout.strip() == "k3y"


def test_each_workload_reads_its_own_identity_from_a_file(rendered) -> None:
    resources = rendered("dev")
    by_name = _by_name(resources)
    secrets = {
        (r.manifest()["metadata"]["name"], r.manifest()["metadata"]["namespace"])
        for r in resources
        if r.kind == "Secret" and r.manifest()["metadata"]["name"].startswith("mlflow-")
    }
    assert secrets == {
        ("mlflow-pipeline-credentials", "loopform-dev-pipelines"),
        ("mlflow-serving-credentials", "loopform-dev-serving"),
        ("mlflow-monitor-credentials", "loopform-dev-monitoring"),
        ("mlflow-promotion-credentials", "loopform-dev-system"),
    } | ({("mlflow-monitor-credentials", "loopform-dev-system")} if "dev-registry-servicemonitor" in by_name else set())

    # The drift monitor: ~/.mlflow under its scratch HOME, the monitor user's Secret.
    monitor = _pod_spec(by_name["dev-fraud-monitor-cronjob"].manifest())
    (container,) = monitor["containers"]
    home = {e["name"]: e.get("value") for e in container["env"]}["HOME"]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == f"{home}/.mlflow"]
    (volume,) = [v for v in monitor["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == "mlflow-monitor-credentials" and mount["readOnly"]

    # Every pipeline step: the pipeline user's Secret at ~/.mlflow, and no password in any variable.
    templates = [r.manifest() for r in resources if r.kind == "WorkflowTemplate"]
    assert templates
    for template in templates:
        for step in template["spec"]["templates"]:
            if "container" not in step:
                continue
            container = step["container"]
            env = {e["name"]: e for e in container["env"]}
            assert not any("MLFLOW_TRACKING_PASSWORD" in name for name in env)
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == f"{env['HOME']['value']}/.mlflow"]
            (volume,) = [v for v in step["volumes"] if v["name"] == mount["name"]]
            assert volume["secret"]["secretName"] == "mlflow-pipeline-credentials"
            assert volume["secret"]["items"] == [{"key": "credentials", "path": "credentials"}]


def test_prometheus_scrapes_the_server_as_the_read_only_monitor() -> None:
    from loopform.render import render_components

    resources = _by_name(
        render_components(
            lambda: registry.ModelRegistry(
                "reg",
                registry.ModelRegistryArgs(
                    environment="dev",
                    db_password="pw",
                    namespace="ml",
                    prometheus_release="kps",
                    credential_namespaces={},
                ),
            )
        )
    )
    monitor = resources["reg-servicemonitor"].manifest()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["basicAuth"] == {
        "username": {"name": "mlflow-monitor-credentials", "key": "username"},
        "password": {"name": "mlflow-monitor-credentials", "key": "password"},
    }
    copy = resources["reg-monitor-credentials-ml"].manifest()
    assert copy["metadata"]["namespace"] == "ml" == monitor["metadata"]["namespace"]
