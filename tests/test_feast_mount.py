"""`feast apply` as the cluster runs it: the real CLI, on the ConfigMap volume exactly as the kubelet lays it out.

A ConfigMap volume is a folder of symlinks (`<file> -> ..data/<file>`, `..data -> ..<timestamp>`).
feast 0.67 resolves each `*.py` and builds a module name from the resolved path, which then
starts with `..`: importlib refuses it, the Job fails, and nothing after it deploys. These
tests lay out each volume of the rendered Job's pod as the kubelet would, run its init
container and then its container (commands, working directory, environment as rendered,
mount paths mapped to folders here), and check that the registry holds the definitions.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from components.feature_store import FeatureStore, FeatureStoreArgs, feature_files
from components.registry import DatabaseEndpoint
from loopform.features import REGISTRY_URL_ENV
from loopform.render import render_components
from loopform.spec import FeatureStoreSpec, OfflineStore

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def kubelet_configmap_volume(folder: Path, data: dict[str, str]) -> Path:
    """Lay out `data` as the kubelet's atomic writer does: files in a timestamped folder, reached via symlinks."""
    payload = folder / "..2026_11_27_10_00_00.000000001"
    payload.mkdir(parents=True)
    for name, content in data.items():
        (payload / name).write_text(content)
    (folder / "..data").symlink_to(payload.name)
    for name in data:
        (folder / name).symlink_to(f"..data/{name}")
    return folder


def _rendered_apply_job(tmp_path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The apply Job's pod spec and the repo ConfigMap's data, from the real component under mocks."""
    spec = FeatureStoreSpec(offline_store=OfflineStore(data_uri=f"file://{tmp_path}/offline"))
    files = feature_files(ROOT, {"fraud": "models/fraud"})
    args = FeatureStoreArgs(
        spec=spec,
        feature_files=files,
        registry_database=DatabaseEndpoint("db", 5432, None, "db-admin"),
        registry_password="pw",
        redis_password="redis-token",
    )
    resources = render_components(lambda: FeatureStore("fs", args))
    by_name = {r.name: r.inputs for r in resources}
    return by_name["fs-apply"]["spec"]["template"]["spec"], by_name["fs-repo"]["data"]


class Node:
    """The volumes of one pod on this machine, and how its containers' paths map onto them."""

    def __init__(
        self, pod: dict[str, Any], configmap_data: dict[str, str], root: Path, secrets: dict[str, str]
    ) -> None:
        self.secrets = secrets
        """Values of the env variables the pod reads from Secrets."""
        self.volumes: dict[str, Path] = {}
        for volume in pod["volumes"]:
            folder = root / "volumes" / volume["name"]
            if "configMap" in volume:
                kubelet_configmap_volume(folder, configmap_data)
            else:
                assert "emptyDir" in volume, f"volume {volume['name']} is neither a ConfigMap nor an emptyDir"
                folder.mkdir(parents=True)
            self.volumes[volume["name"]] = folder

    def run(self, container: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        """Run a container's command with its mounts mapped to this node's folders."""
        mounts = {m["mountPath"]: self.volumes[m["name"]] for m in container.get("volumeMounts", [])}

        # One pass, longest mount first (/feature_repo_source before /feature_repo), only at path boundaries.
        pattern = re.compile("|".join(re.escape(p) + r"(?=/|\b|$)" for p in sorted(mounts, key=len, reverse=True)))

        def host(text: str) -> str:
            return pattern.sub(lambda match: str(mounts[match.group(0)]), text) if mounts else text

        env = {"PATH": f"{BIN}:{os.environ['PATH']}", "FEAST_USAGE": "False"}
        env.update({e["name"]: host(e["value"]) for e in container.get("env", []) if "value" in e})
        env.update({e["name"]: self.secrets[e["name"]] for e in container.get("env", []) if "valueFrom" in e})
        command = [host(part) for part in [*container["command"], *container.get("args", [])]]
        cwd = host(container.get("workingDir", "/"))
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def rendered_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, str], Path]:
    tmp = tmp_path_factory.mktemp("feast-mount")
    pod, data = _rendered_apply_job(tmp)
    return pod, data, tmp


def test_feast_apply_runs_on_the_rendered_pod(rendered_job, tmp_path: Path) -> None:
    pod, data, store = rendered_job
    # The registry Secret's URL: Feast's SQL registry, on SQLite here (PostgreSQL on the cluster).
    registry = f"sqlite:///{store}/registry.db"
    node = Node(pod, data, tmp_path, {REGISTRY_URL_ENV: registry, "REDIS_CONNECTION_STRING": "localhost:6379"})
    for init in pod.get("initContainers", []):
        done = node.run(init)
        assert done.returncode == 0, f"init container {init['name']} failed: {done.stderr}"
    (container,) = pod["containers"]
    assert container["command"] == ["feast", "apply"]
    read_only = [node.volumes[m["name"]] for m in container["volumeMounts"] if m.get("readOnly")]
    before = {folder: sorted(folder.rglob("*")) for folder in read_only}
    done = node.run(container)
    assert done.returncode == 0, f"feast apply failed on the pod's volumes:\n{done.stdout}\n{done.stderr}"
    # Root here ignores read-only modes, so check that Feast wrote nothing where the pod mounts read-only.
    assert {folder: sorted(folder.rglob("*")) for folder in read_only} == before

    from feast import FeatureStore as Store

    repo = node.volumes["repo"]
    os.environ[REGISTRY_URL_ENV] = registry
    try:
        registered = Store(repo_path=str(repo))
        assert [s.name for s in registered.list_feature_services()] == ["fraud_v1"]
        assert {v.name for v in registered.list_feature_views()} == {"card_aggregates"}
    finally:
        del os.environ[REGISTRY_URL_ENV]
    assert (store / "registry.db").exists()


def test_feast_apply_directly_on_a_configmap_mount_fails_as_on_the_cluster(rendered_job, tmp_path: Path) -> None:
    """The old design (Feast running in the ConfigMap volume itself) fails here exactly as in the cluster."""
    _, data, _ = rendered_job
    repo = kubelet_configmap_volume(tmp_path / "repo", data)
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "REDIS_CONNECTION_STRING": "localhost:6379",
        REGISTRY_URL_ENV: f"sqlite:///{tmp_path}/registry.db",
    }
    done = subprocess.run(["feast", "apply"], cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "relative import" in done.stderr or "TypeError" in done.stderr, done.stderr
