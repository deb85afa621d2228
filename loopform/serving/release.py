"""What a service loads at start-up: the released model version, its online store and its payload log.

All of it is named by the environment (set by the ModelService component or `loopform up`), so one image
serves any release and promotion only changes configuration.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loopform.contract import Contract
    from loopform.features import FeatureRepo
    from loopform.payloads import PayloadLog

ENV_TRACKING_URI = "LOOPFORM_TRACKING_URI"
ENV_MODEL_URI = "LOOPFORM_MODEL_URI"
ENV_ARTIFACTS_DIGEST = "LOOPFORM_ARTIFACTS_DIGEST"
ENV_FEAST_REPO = "LOOPFORM_FEAST_REPO"
ENV_FEAST_CONFIG = "LOOPFORM_FEAST_CONFIG"
ENV_PAYLOAD_URI = "LOOPFORM_PAYLOAD_URI"
ENV_PAYLOAD_FLUSH_ROWS = "LOOPFORM_PAYLOAD_FLUSH_ROWS"
ENV_PAYLOAD_FLUSH_SECONDS = "LOOPFORM_PAYLOAD_FLUSH_SECONDS"


@dataclass(frozen=True)
class Release:
    """A loaded model version."""

    model: Any
    name: str
    version: int
    uri: str


def parse_model_uri(uri: str) -> tuple[str, str | None, int | None]:
    """`models:/NAME@ALIAS` -> (NAME, ALIAS, None); `models:/NAME/VERSION` -> (NAME, None, VERSION)."""
    if not uri.startswith("models:/"):
        raise ValueError(f"model URI {uri!r} must look like models:/NAME@ALIAS or models:/NAME/VERSION")
    rest = uri.removeprefix("models:/").strip("/")
    if "@" in rest:
        name, _, alias = rest.partition("@")
        if name and alias and "/" not in rest:
            return name, alias, None
    else:
        name, _, version = rest.partition("/")
        if name and version.isdigit() and int(version) > 0:
            return name, None, int(version)
    raise ValueError(f"model URI {uri!r} must look like models:/NAME@ALIAS or models:/NAME/VERSION")


class ArtifactDigestError(RuntimeError):
    """The registry serves other files than the signed release record names (e.g. swapped weights)."""


def load_release(tracking_uri: str, model_uri: str, artifacts_digest: str | None = None) -> Release:
    """Resolve an alias to its version once, then load exactly that version (the alias may move meanwhile).

    The model's files are downloaded first. With `artifacts_digest` (from the signed release record)
    they are refused unless their digest matches, so a weights file swapped in the artifact store is
    caught at load, before any request is scored. The model is rebuilt from those same files without
    unpickling (loopform.registry.load_model_folder: the image's model code + JSON + exported network).
    """
    import mlflow
    from mlflow import MlflowClient

    from loopform import record
    from loopform.registry import download_model, load_model_folder

    name, alias, version = parse_model_uri(model_uri)
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    if alias is not None:
        version = int(client.get_model_version_by_alias(name, alias).version)
    assert version is not None
    pinned = f"models:/{name}/{version}"
    with tempfile.TemporaryDirectory(prefix=f"loopform-{name}-v{version}-") as tmp:
        folder = download_model(tracking_uri, pinned, Path(tmp))
        if artifacts_digest:
            found = record.artifacts_digest(record.file_digests(folder))
            if found != artifacts_digest:
                raise ArtifactDigestError(
                    f"refusing {pinned}: its files hash to {found}, the signed release record names "
                    f"{artifacts_digest} (the artifacts were replaced after the release was signed)"
                )
        model = load_model_folder(folder)
    model.eval()
    return Release(model=model, name=name, version=version, uri=pinned)


def release_from_env() -> Release:
    """The release named by LOOPFORM_TRACKING_URI and LOOPFORM_MODEL_URI (clear error when unset).

    LOOPFORM_ARTIFACTS_DIGEST, when set (the platform sets it from the signed record), pins the files.
    """
    missing = [name for name in (ENV_TRACKING_URI, ENV_MODEL_URI) if not os.environ.get(name)]
    if missing:
        raise RuntimeError(
            f"set {' and '.join(missing)}: the service loads its model from MLflow, "
            f"e.g. {ENV_TRACKING_URI}=sqlite:////abs/mlflow.db {ENV_MODEL_URI}=models:/NAME@production"
        )
    return load_release(
        os.environ[ENV_TRACKING_URI], os.environ[ENV_MODEL_URI], os.environ.get(ENV_ARTIFACTS_DIGEST) or None
    )


def online_store_from_env(contract: Contract) -> FeatureRepo | None:
    """The online-feature reader the environment configures, or None (then only the raw-feature APIs work).

    LOOPFORM_FEAST_REPO: a local Feast repo folder (the local loop). LOOPFORM_FEAST_CONFIG: the
    platform's feature_store.yaml (set by the ModelService component), used from a scratch repo with
    the Feast definitions of `contract`.
    """
    from loopform.features import FeatureRepo

    if os.environ.get(ENV_FEAST_REPO):
        return FeatureRepo(Path(os.environ[ENV_FEAST_REPO]), contract)
    if os.environ.get(ENV_FEAST_CONFIG):
        return FeatureRepo(Path(tempfile.mkdtemp(prefix="feast-")), contract, config=os.environ[ENV_FEAST_CONFIG])
    return None


def payload_log_from_env(model: str) -> PayloadLog:
    """The payload log at LOOPFORM_PAYLOAD_URI (default `payloads`), batched by the flush settings."""
    from loopform.payloads import PayloadLog

    return PayloadLog(
        os.environ.get(ENV_PAYLOAD_URI, "payloads"),
        model,
        flush_rows=int(os.environ.get(ENV_PAYLOAD_FLUSH_ROWS, "1000")),
        flush_seconds=float(os.environ.get(ENV_PAYLOAD_FLUSH_SECONDS, "10")),
    )
