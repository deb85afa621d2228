"""ModelService: manifests of a released model, the GitOps folder, and the component under mocks."""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes_validate
import pulumi
import yaml

from components.model_service import SERVING_UID, ModelService, ModelServiceArgs, manifests
from loopform.render import render_components, write_services
from loopform.spec import CONFIG_KEY, ModelSpec, ServicesSpec
from models.fraud.contract import CONTRACT
from tests import records

RELEASE = records.release("dev", image=ServicesSpec().image)


def _spec(release: dict | None = RELEASE) -> ModelSpec:
    return ModelSpec.model_validate({"path": "models/fraud", "release": release, "serving": {"min_replicas": 2}})


def test_released_model_gets_zero_downtime_service() -> None:
    objects = {m["kind"]: m for m in manifests(ModelServiceArgs(model="fraud", spec=_spec(), namespace="serve"))}
    assert set(objects) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    for manifest in objects.values():
        kubernetes_validate.validate(manifest, "1.30", strict=True)
    deployment = objects["Deployment"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    # The serving image for every model and version: the release picks the model and its files by env.
    assert container["image"] == RELEASE["image"] == ServicesSpec().image
    assert "command" not in container and container["args"] == ["--port", "3000"]  # `loopform serve` (ENTRYPOINT)
    assert container["ports"] == [{"name": "http", "containerPort": 3000}]
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == SERVING_UID
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # Start-up checks the release before the server listens: liveness counts only after the startup probe.
    assert container["startupProbe"]["httpGet"]["path"] == "/livez"
    assert container["lifecycle"]["preStop"]["sleep"]["seconds"] > 0
    assert {"name": "LOOPFORM_MODEL_URI", "value": "models:/fraud/3"} in container["env"]
    assert {"name": "LOOPFORM_ARTIFACTS_DIGEST", "value": RELEASE["artifacts"]} in container["env"]
    # The Deployment carries the signed record exactly as signed; the pods only its version and signature.
    annotations = deployment["metadata"]["annotations"]
    assert json.loads(annotations["loopform.dev/release"]) == RELEASE
    pod_annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert pod_annotations["loopform.dev/release-signature"] == RELEASE["signature"]
    assert "loopform.dev/release" not in pod_annotations
    assert objects["HorizontalPodAutoscaler"]["spec"]["minReplicas"] == 2


def test_service_runs_as_its_account_with_the_static_keys_when_those_are_the_identity() -> None:
    def pod(**extra) -> dict:
        (deployment,) = [
            m for m in manifests(ModelServiceArgs(model="fraud", spec=_spec(), **extra)) if m["kind"] == "Deployment"
        ]
        return deployment["spec"]["template"]["spec"]

    assert pod()["serviceAccountName"] == "loopform-model-service"
    assert "envFrom" not in pod()["containers"][0]
    keys = [{"secretRef": {"name": "loopform-object-store"}}]
    assert pod(credentials_env_from=keys)["containers"][0]["envFrom"] == keys


def test_platform_declares_the_serving_account_with_its_role(rendered) -> None:
    (account,) = [r.manifest() for r in rendered("dev") if r.name == "dev-serving-sa"]
    assert account["metadata"]["namespace"] == "loopform-dev-serving"
    assert account["metadata"]["name"] == "loopform-model-service"
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert role == "arn:aws:iam::123456789012:role/loopform-dev-serving"


def test_unreleased_model_has_no_service() -> None:
    assert manifests(ModelServiceArgs(model="fraud", spec=_spec(None))) == []


def test_component_declares_the_same_objects() -> None:
    resources = render_components(lambda: ModelService("svc", ModelServiceArgs(model="fraud", spec=_spec())))
    component = next(r for r in resources if r.name == "svc")
    children = {r.kind: r for r in resources if r.parent == component.urn}
    assert set(children) == {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    expected = {m["kind"]: m for m in manifests(ModelServiceArgs(model="fraud", spec=_spec()))}
    for kind, resource in children.items():
        assert resource.manifest() == expected[kind]


def _written_with_fraud_released(tmp_path: Path) -> list[Path]:
    """The dev stack's GitOps folder, written with fraud released."""
    root = Path(__file__).resolve().parent.parent
    stack = yaml.safe_load((root / "stacks" / "Pulumi.dev.yaml").read_text())
    stack["config"][CONFIG_KEY]["models"]["fraud"]["release"] = RELEASE
    (tmp_path / "stacks").mkdir()
    (tmp_path / "stacks" / "Pulumi.dev.yaml").write_text(yaml.safe_dump(stack))
    return write_services("dev", tmp_path, tmp_path / "out")


def test_gitops_folder_holds_released_services(tmp_path: Path) -> None:
    written = _written_with_fraud_released(tmp_path)
    assert [p.name for p in written] == [
        "fraud-service.deployment.yaml",
        "fraud-service.horizontalpodautoscaler.yaml",
        "fraud-service.poddisruptionbudget.yaml",
        "fraud-service.service.yaml",
    ]
    assert "Argo CD syncs this folder" in (tmp_path / "out" / "README.md").read_text()


def test_service_reads_the_platforms_feast(monkeypatch) -> None:
    """The env the manifests set is what the service builds its online-store reader from."""
    from loopform.features import cluster_config
    from loopform.serving.release import online_store_from_env
    from loopform.spec import FeatureStoreSpec

    config = cluster_config(FeatureStoreSpec())
    args = ModelServiceArgs(
        model="fraud",
        spec=_spec(),
        feast_config=config,
        redis_env={"name": "REDIS_CONNECTION_STRING", "value": "redis:6379"},
    )
    container = manifests(args)[0]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["LOOPFORM_FEAST_CONFIG"] == config and env["REDIS_CONNECTION_STRING"] == "redis:6379"

    monkeypatch.delenv("LOOPFORM_FEAST_REPO", raising=False)
    monkeypatch.setenv("LOOPFORM_FEAST_CONFIG", env["LOOPFORM_FEAST_CONFIG"])
    repo = online_store_from_env(CONTRACT)
    assert repo is not None and repo.config == config
    assert (repo.configure() / "feature_store.yaml").read_text() == config
    monkeypatch.delenv("LOOPFORM_FEAST_CONFIG")
    assert online_store_from_env(CONTRACT) is None


def test_with_the_operator_bentomls_metrics_are_scraped() -> None:
    """A ServiceMonitor for BentoML's /metrics on the Service's http port; none without the Prometheus Operator."""
    objects = {m["kind"]: m for m in manifests(ModelServiceArgs(model="fraud", spec=_spec(), prometheus_release="kps"))}
    monitor, service = objects["ServiceMonitor"], objects["Service"]
    assert monitor["metadata"]["labels"]["release"] == "kps"
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics"}]
    assert "http" in {p["name"] for p in service["spec"]["ports"]}
    assert "ServiceMonitor" not in {m["kind"] for m in manifests(ModelServiceArgs(model="fraud", spec=_spec()))}
    resources = render_components(
        lambda: ModelService("svc", ModelServiceArgs(model="fraud", spec=_spec(), prometheus_release="kps"))
    )
    assert "svc-servicemonitor" in {r.name for r in resources}


def test_the_payload_log_spills_to_a_bounded_volume_of_its_own() -> None:
    """The spill folder (loopform.payloads) is an emptyDir: it outlives a container restart and is bigger than
    the log's own bound, so the log, not the kubelet, decides when rows are dropped."""
    from kubernetes.utils import parse_quantity

    from loopform.payloads import ENV_SPILL_DIR, ENV_SPILL_MAX_BYTES

    (deployment,) = [m for m in manifests(ModelServiceArgs(model="fraud", spec=_spec())) if m["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == env[ENV_SPILL_DIR]]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert parse_quantity(volume["emptyDir"]["sizeLimit"]) > int(env[ENV_SPILL_MAX_BYTES])


def _secret_value(resource, key: str) -> str:
    from pulumi.runtime.rpc import is_rpc_secret

    data = resource.inputs["stringData"]
    data = data["value"] if is_rpc_secret(data) else data  # a secret value wraps the whole property
    value = data[key]
    return value["value"] if is_rpc_secret(value) else value


def test_callers_tokens_and_mlflow_credentials_are_files_never_env() -> None:
    """The tokens file (LOOPFORM_API_TOKENS_FILE) and the serving user's MLflow credentials come from Secrets
    mounted read-only; no variable takes a Secret's value (Checkov CKV_K8S_35)."""
    from components.model_service import HOME, TOKENS_DIR, TOKENS_ENV, TOKENS_KEY, tokens_secret_name
    from components.registry import CREDENTIALS_KEY, SERVING_USER, credentials_secret_name

    (deployment,) = [m for m in manifests(ModelServiceArgs(model="fraud", spec=_spec())) if m["kind"] == "Deployment"]
    kubernetes_validate.validate(deployment, "1.30", strict=True)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env[TOKENS_ENV]["value"] == "/var/run/secrets/loopform/api/tokens.json" == f"{TOKENS_DIR}/{TOKENS_KEY}"
    assert env["HOME"]["value"] == HOME
    assert not any("secretKeyRef" in e.get("valueFrom", {}) for e in container["env"])
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    tokens = volumes[mounts[TOKENS_DIR]["name"]]["secret"]
    assert tokens["secretName"] == tokens_secret_name("fraud") == "fraud-service-tokens"
    assert tokens["items"] == [{"key": TOKENS_KEY, "path": TOKENS_KEY}]
    credentials = volumes[mounts[f"{HOME}/.mlflow"]["name"]]["secret"]
    assert credentials["secretName"] == credentials_secret_name(SERVING_USER)
    assert credentials["items"] == [{"key": CREDENTIALS_KEY, "path": "credentials"}]  # ~/.mlflow/credentials
    assert all(mounts[path]["readOnly"] for path in (TOKENS_DIR, f"{HOME}/.mlflow"))


def test_the_tokens_secret_holds_one_derived_token_per_caller() -> None:
    """tokens.json maps each spec caller to its own token, derived from the root secret (stable across runs, new
    when the root secret rotates), and is a Pulumi secret."""
    from pulumi.runtime.rpc import is_rpc_secret

    from components.model_service import TOKENS_KEY, tokens_secret

    def tokens(root: str, callers: list[str], environment: str = "prod") -> tuple[dict[str, str], bool]:
        resources = render_components(
            lambda: tokens_secret("t", environment, "fraud", callers, root, "serve", {}, pulumi.ResourceOptions())
        )
        (secret,) = [r for r in resources if r.name == "t"]
        metadata = secret.manifest()["metadata"]
        assert (metadata["name"], metadata["namespace"]) == ("fraud-service-tokens", "serve")
        return json.loads(_secret_value(secret, TOKENS_KEY)), is_rpc_secret(secret.inputs["stringData"])

    first, hidden = tokens("root-1", ["default", "batch-scorer"])
    assert hidden
    assert set(first) == {"default", "batch-scorer"} and len(set(first.values())) == 2
    assert all(len(token) >= 32 for token in first.values())
    assert tokens("root-1", ["default", "batch-scorer"])[0] == first
    assert tokens("root-2", ["default"])[0]["default"] != first["default"]
    # Another environment given the same root secret: other tokens, so a dev token never opens prod.
    assert tokens("root-1", ["default"], environment="dev")[0]["default"] != first["default"]


def test_no_token_reaches_the_gitops_folder(tmp_path: Path) -> None:
    written = _written_with_fraud_released(tmp_path)
    # No Secret in git: the Deployment names the one Pulumi declares.
    assert {yaml.safe_load(p.read_text())["kind"] for p in written} == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }
    assert "fraud-service-tokens" in (tmp_path / "out" / "fraud-service.deployment.yaml").read_text()


def stack_models(stack: dict) -> set[str]:
    return set(stack["config"][CONFIG_KEY]["models"])


def test_the_platform_declares_each_models_tokens_secret(tmp_path: Path) -> None:
    from loopform.render import render_stack

    root = Path(__file__).resolve().parent.parent
    stack = yaml.safe_load((root / "stacks" / "Pulumi.dev.yaml").read_text())
    stack["config"][CONFIG_KEY]["models"]["fraud"]["release"] = RELEASE
    stack["config"][CONFIG_KEY]["models"]["fraud"]["serving"] = {"callers": ["checkout", "backoffice"]}
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text(yaml.safe_dump(stack))
    resources = render_stack("dev", root, path)
    # Every model has one, released or not: Argo CD may sync a first release before the next `pulumi up`.
    assert {r.name for r in resources if r.name.endswith("-tokens")} == {f"dev-{m}-tokens" for m in stack_models(stack)}
    (secret,) = [r for r in resources if r.name == "dev-fraud-tokens"]
    assert secret.manifest()["metadata"]["name"] == "fraud-service-tokens"
    assert secret.manifest()["metadata"]["namespace"] == "loopform-dev-serving"
    assert set(json.loads(_secret_value(secret, "tokens.json"))) == {"checkout", "backoffice"}
