"""`loopform serve [MODEL]`: the serving image's entrypoint (images/serving/Dockerfile).

One image serves every model and every version. The model is the one LOOPFORM_MODEL_URI names (or MODEL's
`production` alias), its service is `bentos/<model>/bentofile.yaml`'s, and the version's files come from MLflow at
start-up and must hash to LOOPFORM_ARTIFACTS_DIGEST, the signed release record's; so a promotion changes only those
two variables of the Deployment, a rolling update with no image build per version.

The release is loaded and checked here once before the server starts, because BentoML restarts a worker whose
start-up failed for ever instead of exiting: a wrong digest, a missing version or an unreachable registry ends the
process with the reason (the pod restarts with back-off while the old pods keep serving), never a server that is
up but never ready. So are the callers' tokens (`loopform.serving.auth`): without LOOPFORM_API_TOKENS_FILE, or
with a file that is not a valid `{caller: token}` object, nothing starts unless LOOPFORM_ALLOW_ANONYMOUS=true.
The process then becomes `bentoml serve` (exec: signals reach BentoML, which drains the payload
log on SIGTERM), pinned to the version just checked, so an alias that moves meanwhile cannot change what it serves.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import yaml

from loopform.serving.release import ENV_ARTIFACTS_DIGEST, ENV_MODEL_URI, ENV_TRACKING_URI, parse_model_uri

if TYPE_CHECKING:
    from loopform.serving.release import Release

DEFAULT_ALIAS = "production"


class ServeRefused(Exception):
    """The release cannot be served (not found, not loadable, or not the files the record names): nothing started."""


def service_target(root: Path, model: str) -> str:
    """The model's BentoML service as `module:Class`: the `service` of `bentos/<model>/bentofile.yaml`."""
    path = root / "bentos" / model / "bentofile.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"model {model!r} has no {path}: each model's service is bentos/<model>/")
    return str(yaml.safe_load(path.read_text())["service"])


def served_models(root: Path) -> list[str]:
    """The models the project can serve: those with `models/<m>/` and `bentos/<m>/bentofile.yaml`."""
    return sorted(
        p.parent.name for p in root.glob("bentos/*/bentofile.yaml") if (root / "models" / p.parent.name).is_dir()
    )


def model_uri(root: Path, model: str | None, environ: Mapping[str, str]) -> str:
    """The model URI to serve: LOOPFORM_MODEL_URI, else MODEL's production alias; refused unless the project has it."""
    named = environ.get(ENV_MODEL_URI)
    if model is None and not named:
        raise ValueError(f"name the model to serve: `loopform serve MODEL`, or set {ENV_MODEL_URI}=models:/MODEL@ALIAS")
    uri = named or f"models:/{model}@{DEFAULT_ALIAS}"
    name = parse_model_uri(uri)[0]
    if model is not None and name != model:
        raise ValueError(
            f"{ENV_MODEL_URI}={uri} names model {name!r}, not {model!r}: {model}'s service cannot serve it"
        )
    available = served_models(root)
    if name not in available:
        raise ValueError(
            f"the project at {root} has no model {name!r} to serve (models/<m>/ and bentos/<m>/bentofile.yaml; "
            f"it has: {', '.join(available) or 'none'})"
        )
    return uri


def checked_release(tracking_uri: str, uri: str, digest: str | None) -> Release:
    """The release loaded as the service will load it, its files checked against `digest` when given."""
    from mlflow.exceptions import MlflowException

    from loopform.serving.release import load_release

    try:
        return load_release(tracking_uri, uri, digest)
    except (MlflowException, RuntimeError, OSError) as error:  # RuntimeError includes ArtifactDigestError
        raise ServeRefused(f"cannot serve {uri} from {tracking_uri}: {error}") from error


def checked_callers(environ: Mapping[str, str]) -> str:
    """How the service will authenticate its callers; refused when it has no tokens and anonymity was not asked for."""
    from loopform.serving.auth import TokensError, describe

    try:
        return describe(environ)
    except TokensError as error:
        raise ServeRefused(f"cannot serve without callers' tokens: {error}") from error


def bentoml_command(target: str, root: Path, host: str, port: int) -> list[str]:
    """`bentoml serve` of `target` from this interpreter, which has BentoML whether or not its bin is on PATH."""
    return [
        sys.executable, "-m", "bentoml", "serve", target,
        "--host", host, "--port", str(port), "--working-dir", str(root),
    ]  # fmt: skip


def serve(root: Path, model: str | None, *, host: str, port: int, environ: Mapping[str, str] | None = None) -> NoReturn:
    """Check the release, then replace this process with `bentoml serve` of the model's service (see module doc)."""
    environ = dict(os.environ if environ is None else environ)
    root = root.resolve()
    uri = model_uri(root, model, environ)
    tracking_uri = environ.get(ENV_TRACKING_URI)
    if not tracking_uri:
        raise ValueError(f"set {ENV_TRACKING_URI}: the service loads {uri} from MLflow (e.g. sqlite:////abs/mlflow.db)")
    digest = environ.get(ENV_ARTIFACTS_DIGEST) or None
    callers = checked_callers(environ)
    release = checked_release(tracking_uri, uri, digest)
    target = service_target(root, release.name)
    checked = f"files match {digest}" if digest else f"files not checked: no {ENV_ARTIFACTS_DIGEST}"
    print(f"serving {release.uri} ({checked}; {callers}) with {target} on {host}:{port}", file=sys.stderr, flush=True)
    command = bentoml_command(target, root, host, port)
    os.chdir(root)
    os.execve(command[0], command, {**environ, ENV_MODEL_URI: release.uri})
