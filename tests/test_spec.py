"""The stack spec: real stacks load; bad stack files fail with one clear message each."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loopform.cli import main
from loopform.spec import (
    CONFIG_KEY,
    PlatformSpec,
    ServingSpec,
    SpecError,
    WorkloadRoles,
    check_repository,
    load_stack,
    parse_spec,
)

ROOT = Path(__file__).resolve().parent.parent


def test_every_stack_file_is_a_valid_spec() -> None:
    for path in sorted((ROOT / "stacks").glob("Pulumi.*.yaml")):
        spec = load_stack(path)
        assert spec.environment == path.name.split(".")[1]
        assert "fraud" in spec.models


def test_defaults_fill_every_section() -> None:
    spec = PlatformSpec(environment="local", cluster={"kind": "none"})
    assert spec.registry.backend.kind == "in-cluster"
    assert spec.feature_store.online_store.kind == "in-cluster"
    assert spec.cluster.namespaces.platform == "loopform-local-system"
    assert spec.gates.drift.max_drift_share == 0.3
    # One token, named `default`, unless the spec names the callers.
    assert spec.models == {} and ServingSpec().callers == ["default"]


ROLES = {w: f"arn:aws:iam::123456789012:role/{w}" for w in WorkloadRoles.model_fields}


def _base() -> dict:
    return {
        "environment": "dev",
        "cluster": {"kube_context": "dev", "identity": {"kind": "irsa", "roles": dict(ROLES)}},
        "gpu": {
            "pools": {
                "gpu": {"kind": "karpenter", "gpus_per_node": 1, "node_class": {"role": "R", "discovery_tag": "c"}}
            }
        },
        "models": {"fraud": {"path": "models/fraud", "training": {"gpu_pool": "gpu"}}},
    }


def _set(doc: dict, path: str, value: object) -> dict:
    node = doc
    *parents, last = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    return doc


# (what a user got wrong, key path, value, the key path and the words the error must contain)
BAD = [
    ("unknown top-level key", "registy", {}, f"{CONFIG_KEY}.registy", "did you mean 'registry'"),
    ("unknown nested key", "registry.artifact", {"uri": "s3://a/b"}, f"{CONFIG_KEY}.registry.artifact", "allowed here"),
    ("wrong type", "registry.replicas", "two", f"{CONFIG_KEY}.registry.replicas", "valid integer"),
    ("replicas out of range", "registry.replicas", 0, f"{CONFIG_KEY}.registry.replicas", "greater than or equal to 1"),
    (
        "bad quantity",
        "registry.backend",
        {"kind": "in-cluster", "storage": "8Gb"},
        "backend.storage",
        "Kubernetes quantity",
    ),
    ("bad cron", "feature_store.materialization_schedule", "every 5 minutes", "materialization_schedule", "cron"),
    ("cron with six fields", "monitoring.schedule", "0 0 * * * *", f"{CONFIG_KEY}.monitoring.schedule", "five fields"),
    ("bad URI", "registry.artifacts", {"uri": "bucket/artifacts"}, "registry.artifacts.uri", "s3://bucket/path"),
    ("unknown kind", "feature_store.online_store", {"kind": "memcached"}, "online_store", "'memcached' is not one of"),
    ("external db without host", "registry.backend", {"kind": "external"}, "backend.host", "Field required"),
    ("no identity for s3", "cluster.identity", None, f"{CONFIG_KEY}.cluster.identity", "required: feature_store"),
    ("bad role ARN", "cluster.identity.roles.serving", "loopform-serving", "roles.serving", "not an IAM role ARN"),
    (
        "pod identity without cluster",
        "cluster.identity",
        {"kind": "pod-identity", "roles": ROLES},
        "cluster_name",
        "required",
    ),
    (
        "karpenter without node class",
        "gpu.pools.gpu.node_class",
        {"discovery_tag": "c"},
        "node_class.role",
        "Field required",
    ),
    ("karpenter without discovery tag", "gpu.pools.gpu.node_class", {"role": "R"}, "discovery_tag", "Field required"),
    ("bad namespace name", "cluster.namespaces.platform", "Loopform_System", "namespaces.platform", "DNS-1123"),
    ("undefined GPU pool", "models.fraud.training.gpu_pool", "big", "models.fraud.training.gpu_pool", "'big'"),
    ("too many GPUs", "models.fraud.training.gpus", 4, "models.fraud.training.gpus", "gpus_per_node"),
    ("gpus without pool", "models.fraud.training", {"gpus": 1}, "models.fraud.training", "needs gpu_pool"),
    ("share above one", "gates.max_ood_rate", 1.5, "gates.max_ood_rate", "less than or equal to 1"),
    ("bad duration", "monitoring.window", "one day", "monitoring.window", "duration"),
    ("replica range", "models.fraud.serving", {"min_replicas": 5, "max_replicas": 2}, "serving", "below min_replicas"),
    ("caller listed twice", "models.fraud.serving.callers", ["web", "web"], "serving", "callers are listed twice"),
    ("caller not a name", "models.fraud.serving.callers", ["Web App"], "serving.callers[0]", "DNS-1123 label"),
    ("no caller", "models.fraud.serving.callers", [], "callers", "at least 1 item"),
    ("callers as a string", "models.fraud.serving.callers", "web", "callers", "valid list"),
    (
        "unknown key in a model's gates",
        "models.fraud.gates",
        {"min_acu": 0.9},
        f"{CONFIG_KEY}.models.fraud.gates",
        "min_acu: unknown key; did you mean 'min_auc'?",
    ),
    (
        "model's gate out of range",
        "models.fraud.gates",
        {"drift": {"max_drift_share": 1.5}},
        f"{CONFIG_KEY}.models.fraud.gates",
        "drift.max_drift_share: Input should be less than or equal to 1",
    ),
    ("model's max_rmse not positive", "models.fraud.gates", {"max_rmse": 0}, "models.fraud.gates", "greater than 0"),
    # Strict types: YAML that reads as another type is an error, not a silent conversion.
    ("boolean as integer", "registry.replicas", True, f"{CONFIG_KEY}.registry.replicas", "a boolean, not a number"),
    (
        "quoted number",
        "gates.min_auc",
        "0.9",
        f"{CONFIG_KEY}.gates.min_auc",
        "(got '0.9': a quoted number is a string; write it without quotes (`pulumi config set --path`: add --type float)",
    ),
    ("quoted integer", "gates.min_positives", "100", "gates.min_positives", "valid integer"),
    ("fraction as integer", "registry.workers", 2.5, f"{CONFIG_KEY}.registry.workers", "valid integer"),
    ("boolean as number", "models.fraud.serving.max_p99_seconds", False, "max_p99_seconds", "valid number"),
    ("number as boolean", "cluster.protect_data", 1, f"{CONFIG_KEY}.cluster.protect_data", "valid boolean"),
    ("string as boolean", "gitops.enabled", "yes", f"{CONFIG_KEY}.gitops.enabled", "valid boolean"),
    ("quoted number in a model's gates", "models.fraud.gates", {"min_auc": "0.9"}, "models.fraud.gates", "min_auc"),
    # Unknown keys under map-keyed and union sections name the closest key of that very section.
    (
        "unknown key in a model",
        "models.fraud.trainng",
        {},
        f"{CONFIG_KEY}.models.fraud.trainng",
        "did you mean 'training'?; allowed here: path, training",
    ),
    (
        "unknown key deep in a model",
        "models.fraud.serving.max_replica",
        3,
        f"{CONFIG_KEY}.models.fraud.serving.max_replica",
        "did you mean 'max_replicas'?",
    ),
    (
        "unknown key in a GPU pool",
        "gpu.pools.gpu.gpu_limt",
        4,
        f"{CONFIG_KEY}.gpu.pools.gpu.gpu_limt",
        "did you mean 'gpu_limit'?; allowed here: kind, instance_families",
    ),
    (
        "unknown key of one union variant",
        "registry.backend",
        {"kind": "external", "host": "db", "sslmod": "require"},
        f"{CONFIG_KEY}.registry.backend.sslmod",
        "did you mean 'sslmode'?; allowed here: kind, host, port",
    ),
    (
        "unknown key of the other union variant",
        "registry.backend",
        {"kind": "in-cluster", "storge": "8Gi"},
        f"{CONFIG_KEY}.registry.backend.storge",
        "did you mean 'storage'?; allowed here: kind, image, storage",
    ),
    (
        "unknown key in a list entry",
        "gpu.pools.gpu",
        {"kind": "existing", "labels": {"a": "b"}, "taints": [{"key": "k", "efect": "NoSchedule"}]},
        f"{CONFIG_KEY}.gpu.pools.gpu.taints[0].efect",
        "did you mean 'effect'?",
    ),
    ("union without kind", "registry.backend", {"storage": "8Gi"}, "backend: needs a kind", "'in-cluster', 'external'"),
]


@pytest.mark.parametrize(("case", "key", "value", "where", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_spec_names_key_and_fix(case: str, key: str, value: object, where: str, words: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(_set(_base(), key, value), "stacks/Pulumi.dev.yaml")
    message = str(caught.value)
    assert message.startswith("stacks/Pulumi.dev.yaml: invalid stack spec"), message
    assert where in message, message
    assert words in message, message
    assert len(caught.value.problems) == 1, message


def _write_stack(tmp_path: Path, platform: object) -> Path:
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text(yaml.safe_dump({"config": {CONFIG_KEY: platform}}))
    return path


def test_cli_reports_bad_file_without_traceback(tmp_path: Path) -> None:
    path = _write_stack(tmp_path, _set(_base(), "registry.backend", {"kind": "in-cluster", "storage": "8Gb"}))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "loopform.cli",
            "render",
            "--stack",
            "dev",
            "--file",
            str(path),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{path}: invalid stack spec" in result.stderr
    assert "loopform:platform.registry.backend.storage: '8Gb' is not a Kubernetes quantity" in result.stderr
    assert not (tmp_path / "o").exists(), "nothing may be rendered from a bad spec"


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("config: [unclosed", "not valid YAML"),
        ("just a string", "top-level 'config' mapping"),
        ("config:\n  other:key: 1\n", "no key 'loopform:platform'"),
        ("config:\n  loopform:platform: [1, 2]\n", "must be a mapping of sections"),
    ],
)
def test_malformed_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, words: str) -> None:
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text(content)
    assert main(["validate", "--stack", "dev", "--file", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and words in err, err


def test_missing_stack_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--stack", "nosuchstack"]) == 2
    assert "Pulumi.nosuchstack.yaml: invalid stack spec" in capsys.readouterr().err


def _dev_stack() -> dict:
    return yaml.safe_load((ROOT / "stacks" / "Pulumi.dev.yaml").read_text())


# Mistakes only the whole file and the repository reveal: tried through the CLI, as a user would.
FILE_CASES = [
    (
        "model folder missing",
        "models.fraud.path",
        "models/frod",
        "models.fraud.path: 'models/frod' has no contract.py, model.py, train.py, data.py",
    ),
    ("environment of another stack", "environment", "qa", "is 'qa' but this is the stack file of 'dev'"),
    ("bucket missing from URI", "registry.artifacts", {"uri": "s3:///artifacts"}, "is not a URI of scheme"),
]


@pytest.mark.parametrize(("case", "key", "value", "words"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
@pytest.mark.parametrize("command", ["validate", "render"])
def test_bad_stack_file_through_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, case: str, key: str, value: object, words: str
) -> None:
    document = _dev_stack()
    _set(document["config"][CONFIG_KEY], key, value)
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text(yaml.safe_dump(document))
    extra = ["--out", str(tmp_path / "out")] if command == "render" else []
    assert main([command, "--stack", "dev", "--file", str(path), *extra]) == 2
    err = capsys.readouterr().err
    assert f"{path}: invalid stack spec" in err and words in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_models_own_gates_overlay_the_environments() -> None:
    platform = _set(_base(), "gates", {"min_auc": 0.8, "drift": {"max_drift_share": 0.2, "p_value": 0.01}})
    platform["models"]["fraud"]["gates"] = {"min_auc": 0.9, "drift": {"max_drift_share": 0.4}}
    platform["models"]["delivery"] = {"path": "models/delivery", "gates": {"max_rmse": 12}}
    spec = parse_spec(platform, "stacks/Pulumi.dev.yaml")
    fraud, delivery = spec.gates_for("fraud"), spec.gates_for("delivery")
    assert (fraud.min_auc, fraud.drift.max_drift_share, fraud.drift.p_value) == (0.9, 0.4, 0.01)  # key by key
    assert (delivery.max_rmse, delivery.min_auc, delivery.drift) == (12, 0.8, spec.gates.drift)
    assert spec.gates.min_auc == 0.8 and spec.gates.max_rmse is None  # the environment's own gates stay
    assert spec.gates_for("unknown") == spec.gates


def test_a_regressor_needs_a_max_rmse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """check_repository reads each model's contract: a regressor must have a max_rmse in its gates."""
    package = f"zoo_{tmp_path.name}"  # a package of its own: nothing cached from another test
    folder = tmp_path / package / "delivery"
    folder.mkdir(parents=True)
    for name in ("model.py", "train.py", "data.py"):
        (folder / name).write_text("")
    (folder / "contract.py").write_text("from models.delivery.contract import CONTRACT as CONTRACT\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    platform = _base()
    platform["models"] = {"delivery": {"path": f"{package}/delivery"}}
    with pytest.raises(SpecError) as caught:
        check_repository(parse_spec(platform, "Pulumi.dev.yaml"), tmp_path, "Pulumi.dev.yaml")
    assert caught.value.problems == [
        f"{CONFIG_KEY}.models.delivery.gates.max_rmse: required for a regressor ({package}/delivery/contract.py "
        "declares task regression): the most holdout RMSE, in delivery_minutes's unit, a release may have"
    ]
    platform["models"]["delivery"]["gates"] = {"max_rmse": 12}
    check_repository(parse_spec(platform, "Pulumi.dev.yaml"), tmp_path, "Pulumi.dev.yaml")
    platform["models"]["delivery"]["gates"] = {}
    platform["gates"] = {"max_rmse": 30}  # the environment's own max_rmse serves too
    check_repository(parse_spec(platform, "Pulumi.dev.yaml"), tmp_path, "Pulumi.dev.yaml")


def test_an_integer_serves_where_a_number_is_declared() -> None:
    platform = _set(_base(), "gates.min_auc", 1)
    _set(platform, "models.fraud.serving.max_p99_seconds", 2)
    spec = parse_spec(platform, "stacks/Pulumi.dev.yaml")
    assert spec.gates.min_auc == 1.0 and isinstance(spec.gates.min_auc, float)
    assert spec.models["fraud"].serving.max_p99_seconds == 2.0


def test_a_model_named_like_a_union_kind_keeps_its_name_in_errors() -> None:
    """Union tags are told from keys by the spec's structure, not by name: a model may be called `external`."""
    platform = _base()
    platform["models"]["external"] = {"path": "models/external", "servng": {}}
    with pytest.raises(SpecError) as caught:
        parse_spec(platform, "stacks/Pulumi.dev.yaml")
    assert caught.value.problems == [
        f"{CONFIG_KEY}.models.external.servng: unknown key; did you mean 'serving'?; "
        "allowed here: path, training, serving, gates, release"
    ]


def test_the_local_loops_environment_stacks_are_valid_specs(tmp_path: Path) -> None:
    """`loopform up` writes staging and prod stacks from the local one: strict types must take them too."""
    from loopform.local import environment_stacks

    folder = environment_stacks(ROOT / "stacks" / "Pulumi.local.yaml", tmp_path, ROOT)
    loaded = {path.name: load_stack(path).environment for path in sorted(folder.glob("Pulumi.*.yaml"))}
    assert loaded == {"Pulumi.prod.yaml": "prod", "Pulumi.staging.yaml": "staging"}
