"""The serving image's command, run here exactly as a pod runs it, without a container engine.

The pod's command is the Dockerfile's ENTRYPOINT with the Deployment's args (components/model_service.py), in an
environment of the Dockerfile's ENV and the Deployment's env, in a folder that holds only what the Dockerfile's COPY
lines put in the image (WORKDIR), with the venv's `loopform` on PATH. Against a local MLflow store holding a
released fraud version it serves that version, and with another artifacts digest it exits with the reason.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest

from components.model_service import SERVING_UID, ModelServiceArgs, manifests
from loopform import registry
from loopform.cli import build_parser, main
from loopform.serve import served_models, service_target
from loopform.serving.release import ArtifactDigestError, Release
from loopform.spec import ModelSpec, ServicesSpec, ServingSpec
from tests import records
from tests.helpers_registry import make_version, small_model
from tests.helpers_serving import CALLER, free_port, token_env
from tests.test_images import dockerfile_instructions
from tests.test_service import GOOD

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "images" / "serving" / "Dockerfile"
WRONG_DIGEST = "sha256:" + "0" * 64


# --- the Dockerfile ----------------------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE)


def last(keyword: str) -> str:
    found = [args for kw, args in instructions() if kw == keyword]
    assert found, f"{DOCKERFILE} has no {keyword}"
    return found[-1]


def workdir() -> PurePosixPath:
    return PurePosixPath(last("WORKDIR"))


def entrypoint() -> list[str]:
    """ENTRYPOINT and CMD in exec form (a shell form would not pass signals to the server)."""
    command = json.loads(last("ENTRYPOINT"))
    cmd = [args for kw, args in instructions() if kw == "CMD"]
    return command + (json.loads(cmd[-1]) if cmd else [])


def env() -> dict[str, str]:
    out: dict[str, str] = {}
    for keyword, args in instructions():
        if keyword == "ENV":
            for item in shlex.split(args):
                name, eq, value = item.partition("=")
                assert eq, f"{DOCKERFILE}: ENV {args!r}: write NAME=VALUE"
                out[name] = value
    return out


def copies() -> list[tuple[str, PurePosixPath]]:
    """(repository path, image path) of every COPY source."""
    out = []
    for keyword, args in instructions():
        if keyword == "COPY":
            parts = [p for p in shlex.split(args) if not p.startswith("--")]
            *sources, dest = parts
            target = workdir() / dest
            for source in sources:
                into_dir = dest.endswith("/") or dest in {".", "./"} or len(sources) > 1
                out.append((source, target / PurePosixPath(source).name if into_dir else target))
    return out


def image_root(folder: Path) -> Path:
    """`folder` as the image's WORKDIR: what the COPY lines put there, without what the dockerignore leaves out."""
    app = folder / workdir().relative_to("/")
    for source, target in copies():
        assert target.is_relative_to(workdir()), f"COPY {source} {target}: outside WORKDIR, not read here"
        dest = app / target.relative_to(workdir())
        if (ROOT / source).is_dir():
            shutil.copytree(ROOT / source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / source, dest)
    return app


def test_dockerfile_runs_loopform_serve_as_the_pods_non_root_user() -> None:
    user = last("USER")
    assert user.isdigit() and int(user) != 0, f"USER {user}: a numeric non-root uid (runAsNonRoot checks it)"
    assert int(user) == SERVING_UID, "the Deployment runs the pods as another user than the image's"
    assert entrypoint() == ["loopform", "serve"]
    assert env()["LOOPFORM_ROOT"] == str(workdir())
    default_port = build_parser().parse_args(["serve"]).port
    assert last("EXPOSE").split() == [str(default_port)] and default_port == ServingSpec().port


def test_image_holds_every_model_service(tmp_path: Path) -> None:
    """What `loopform serve` and the services import is copied (tests/test_images.py checks the build context)."""
    app = image_root(tmp_path)
    assert {"loopform", "models", "bentos"} <= {p.name for p in app.iterdir()}
    assert served_models(app) == served_models(ROOT) and "fraud" in served_models(app)
    for model in served_models(app):
        module = service_target(app, model).partition(":")[0]
        assert (app / (module.replace(".", "/") + ".py")).is_file(), f"{model}: {module} is not in the image"


def test_deployment_runs_the_images_command_on_its_port() -> None:
    record = records.release("dev", image=ServicesSpec().image)
    spec = ModelSpec.model_validate({"path": "models/fraud", "release": record, "serving": {"port": 8080}})
    (deployment,) = [m for m in manifests(ModelServiceArgs(model="fraud", spec=spec)) if m["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert "command" not in container, "the Deployment should run the image's ENTRYPOINT"
    args = build_parser().parse_args([*entrypoint()[1:], *container["args"]])
    assert (args.command, args.model, args.port) == ("serve", None, 8080)
    assert container["ports"] == [{"name": "http", "containerPort": 8080}]
    assert pod["securityContext"]["runAsUser"] == SERVING_UID


# --- `loopform serve` without a server ---------------------------------------------------------------------


class Exec(Exception):
    """Raised instead of replacing the test process."""


@pytest.fixture
def serve_cli(monkeypatch, tmp_path: Path):
    """run(*argv, **env) -> (exit code, the exec'd (command, env) or None): `loopform serve` with the release load
    and exec stubbed out, and the callers' tokens file the Deployment mounts."""
    calls: dict[str, Any] = {}
    tokens, _ = token_env(tmp_path / "tokens.json")
    for name, value in tokens.items():
        monkeypatch.setenv(name, value)

    def load_release(tracking_uri: str, uri: str, digest: str | None) -> Release:
        calls["load"] = (tracking_uri, uri, digest)
        if digest == WRONG_DIGEST:
            raise ArtifactDigestError(f"refusing models:/fraud/7: its files hash to sha256:1..., not {digest}")
        return Release(model=None, name="fraud", version=7, uri="models:/fraud/7")

    def execve(path: str, command: list[str], environ: dict[str, str]) -> None:
        calls["exec"] = (command, environ)
        raise Exec

    monkeypatch.setattr("loopform.serving.release.load_release", load_release)
    monkeypatch.setattr("os.execve", execve)
    monkeypatch.setattr("os.chdir", lambda path: calls.setdefault("cwd", path))

    def run(*argv: str, **environ: str) -> tuple[int, Any]:
        calls.clear()
        for name in ("LOOPFORM_MODEL_URI", "LOOPFORM_TRACKING_URI", "LOOPFORM_ARTIFACTS_DIGEST"):
            monkeypatch.delenv(name, raising=False)
        for name, value in environ.items():
            monkeypatch.setenv(name, value)
        try:
            code = main(["--root", str(ROOT), "serve", *argv])
        except Exec:
            return 0, calls
        return code, None

    return run


def test_serve_execs_bentoml_pinned_to_the_checked_version(serve_cli) -> None:
    code, calls = serve_cli(LOOPFORM_TRACKING_URI="sqlite:////m.db", LOOPFORM_MODEL_URI="models:/fraud@production")
    assert code == 0
    assert calls["load"] == ("sqlite:////m.db", "models:/fraud@production", None)
    command, environ = calls["exec"]
    assert command == [
        sys.executable, "-m", "bentoml", "serve", "bentos.fraud.service:FraudService",
        "--host", "0.0.0.0", "--port", "3000", "--working-dir", str(ROOT),
    ]  # fmt: skip
    assert environ["LOOPFORM_MODEL_URI"] == "models:/fraud/7"  # the workers load the version checked here
    assert calls["cwd"] == ROOT
    # MODEL alone serves its production alias.
    _, calls = serve_cli("fraud", "--port", "8080", LOOPFORM_TRACKING_URI="sqlite:////m.db")
    assert calls["load"][1] == "models:/fraud@production" and "8080" in calls["exec"][0]


@pytest.mark.parametrize(
    ("argv", "environ", "message"),
    [
        ((), {"LOOPFORM_TRACKING_URI": "sqlite:////m.db"}, "name the model to serve"),
        (("nope",), {"LOOPFORM_TRACKING_URI": "sqlite:////m.db"}, "has no model 'nope' to serve"),
        (("delivery",), {"LOOPFORM_MODEL_URI": "models:/fraud/3"}, "names model 'fraud', not 'delivery'"),
        ((), {"LOOPFORM_MODEL_URI": "fraud"}, "must look like models:/NAME@ALIAS"),
        (("fraud",), {}, "set LOOPFORM_TRACKING_URI"),
    ],
)
def test_serve_refuses_what_it_cannot_serve(serve_cli, capsys, argv, environ, message) -> None:
    assert serve_cli(*argv, **environ) == (2, None)
    assert message in capsys.readouterr().err


def test_serve_exits_when_the_files_are_not_the_released_ones(serve_cli, capsys) -> None:
    code, calls = serve_cli("fraud", LOOPFORM_TRACKING_URI="sqlite:////m.db", LOOPFORM_ARTIFACTS_DIGEST=WRONG_DIGEST)
    assert (code, calls) == (1, None)
    assert "error: cannot serve models:/fraud@production from sqlite:////m.db: refusing" in capsys.readouterr().err


# --- the image's command against a local MLflow store ------------------------------------------------------


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> dict[str, Any]:
    """A fraud version registered in a fresh SQLite store and its signed release record."""
    work = tmp_path_factory.mktemp("serving-image")
    store = f"sqlite:///{work}/mlflow.db"
    model, _, _, evaluation = small_model()
    version = make_version(store, "fraud", model, evaluation).version
    sealed = registry.read_evidence(store, "fraud", version)
    return {"work": work, "store": store, "record": records.release("dev", image=ServicesSpec().image, sealed=sealed)}


def pod(
    released: dict[str, Any], folder: Path, **override: str
) -> tuple[list[str], dict[str, str], Path, int, dict[str, str]]:
    """(command, environment, working directory, port, callers' Authorization headers) of the released model's pod.

    The Deployment mounts the tokens Secret at LOOPFORM_API_TOKENS_FILE; here a tokens file in `folder` stands in."""
    port = free_port()
    spec = ModelSpec.model_validate({"path": "models/fraud", "release": released["record"], "serving": {"port": port}})
    args = ModelServiceArgs(
        model="fraud", spec=spec, tracking_uri=released["store"], payload_uri=str(folder / "payloads")
    )
    (container,) = manifests(args)[0]["spec"]["template"]["spec"]["containers"]
    app = image_root(folder)
    image_env = {k: str(app) if v == str(workdir()) else v for k, v in env().items()}
    mounted, headers = token_env(folder / "tokens.json")
    environ = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",  # the venv's `loopform`, as the image's
        **image_env,
        **{variable["name"]: variable["value"] for variable in container["env"] if "value" in variable},
        "HOME": str(folder / "home"),  # the pod's home holds only the mounted MLflow credentials
        **mounted,
        **override,
    }
    assert shutil.which("loopform", path=environ["PATH"]), "the venv has no `loopform` script"
    return [*entrypoint(), *container["args"]], environ, app, port, headers


@pytest.mark.slow
def test_image_command_serves_the_released_version(released, tmp_path: Path) -> None:
    command, environ, app, port, headers = pod(released, tmp_path)
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=app, env=environ, stdout=out, stderr=subprocess.STDOUT)
    try:
        while process.poll() is None:
            try:
                if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        assert process.poll() is None, f"the server exited with {process.returncode}:\n{log.read_text()[-4000:]}"
        response = httpx.post(f"{url}/predict", json=GOOD, headers={"Authorization": headers[CALLER]}, timeout=60.0)
        assert response.status_code == 200, response.text
        answer = response.json()
        assert (answer["model"], answer["version"]) == ("fraud", released["record"]["version"])
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    # SIGTERM reached BentoML (loopform exec'd it), which drained the payload log before exiting.
    assert process.wait() == 0, log.read_text()[-4000:]
    from loopform.payloads import read_payloads

    rows = read_payloads(
        environ["LOOPFORM_PAYLOAD_URI"], "fraud", datetime(2000, 1, 1, tzinfo=UTC), datetime.now(UTC) + timedelta(1)
    )
    assert list(rows["request_id"]) == [answer["request_id"]]


@pytest.mark.slow
def test_image_command_refuses_files_with_another_digest(released, tmp_path: Path) -> None:
    command, environ, app, _, _ = pod(released, tmp_path, LOOPFORM_ARTIFACTS_DIGEST=WRONG_DIGEST)
    result = subprocess.run(command, cwd=app, env=environ, capture_output=True, text=True)
    version = released["record"]["version"]
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"refusing models:/fraud/{version}: its files hash to {released['record']['artifacts']}" in result.stderr
    assert WRONG_DIGEST in result.stderr
