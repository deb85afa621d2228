"""The whole program under mocks, per stack: golden manifests, schema validation, determinism.

Golden files live in tests/golden/<stack>/. After an intended change, regenerate them with
`LOOPFORM_REGENERATE_GOLDEN=1 pytest tests/test_render.py` and review the diff; CI never sets it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import kubernetes_validate
import pytest

from loopform import render
from loopform.cli import main
from loopform.pipeline import PIPELINE, STEP_NAMES

from .conftest import STACKS

GOLDEN = Path(__file__).resolve().parent / "golden"
REGENERATE = os.environ.get("LOOPFORM_REGENERATE_GOLDEN") == "1"
KUBERNETES_VERSION = "1.30"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "NodePool", "EC2NodeClass"}


def _files(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.mark.parametrize("stack", STACKS)
def test_render_matches_golden(stack: str, rendered, tmp_path: Path) -> None:
    out = GOLDEN / stack if REGENERATE else tmp_path / stack
    if REGENERATE:  # a resource that is gone must lose its golden file too
        shutil.rmtree(out, ignore_errors=True)
    render.write(rendered(stack), out)
    actual, expected = _files(out), _files(GOLDEN / stack)
    assert sorted(actual) == sorted(expected), "resources added or removed: regenerate and review the golden files"
    for name, content in actual.items():
        assert content == expected[name], f"{stack}/{name} differs from the golden file"


@pytest.mark.parametrize("stack", STACKS)
def test_core_objects_validate_against_kubernetes_schemas(stack: str, rendered) -> None:
    checked = 0
    for resource in rendered(stack):
        if not resource.is_kubernetes_object:
            continue
        manifest = resource.manifest()
        try:
            kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            continue  # custom resources are checked against their own models in their tests
        checked += 1
    assert checked >= 10


@pytest.mark.parametrize("stack", STACKS)
def test_every_object_is_namespaced_and_labelled(stack: str, rendered) -> None:
    for resource in rendered(stack):
        if not resource.is_kubernetes_object:
            continue
        metadata = resource.inputs["metadata"]
        assert metadata["labels"]["loopform.dev/environment"] == stack, resource.name
        if resource.kind not in CLUSTER_SCOPED:
            assert metadata.get("namespace"), f"{resource.name} has no namespace"


def test_render_is_deterministic(rendered, tmp_path: Path) -> None:
    first = render.write(rendered("dev"), tmp_path / "a")
    second = render.write(render.render_stack("dev"), tmp_path / "b")
    assert [p.name for p in first] == [p.name for p in second]
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_stacks_differ_only_in_data(rendered) -> None:
    """The same program renders every stack; only the spec's values differ."""
    kinds = {stack: {(r.type_, r.name.split("-", 1)[1]) for r in rendered(stack) if "-" in r.name} for stack in STACKS}
    components = {stack: {r.type_ for r in rendered(stack) if not r.custom} for stack in STACKS}
    assert components["dev"] == components["staging"]
    # prod's spec names an external Redis: its connection Secret is shared with the serving namespace; its
    # cluster has a Prometheus Operator (monitoring.prometheus_operator), which the retraining route needs.
    assert components["prod"] == components["dev"] | {
        "loopform:secrets:SharedSecret",
        "loopform:retraining:RetrainingRoute",
    }
    # prod's spec names external databases: the in-cluster ones are simply not declared
    assert ("kubernetes:apps/v1:StatefulSet", "registry-postgres") in kinds["dev"]
    assert ("kubernetes:apps/v1:StatefulSet", "registry-postgres") not in kinds["prod"]


def test_render_command_writes_files_and_prints_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    services = tmp_path / "services"
    assert main(["render", "--stack", "dev", "--out", str(tmp_path), "--services-out", str(services)]) == 0
    printed = capsys.readouterr().out
    assert "KIND" in printed and "dev-registry-server" in printed
    assert (tmp_path / "dev-registry-server.deployment.yaml").exists()
    assert (tmp_path / "_tree.txt").read_text().startswith("loopform:platform:Platform dev")
    secret = (tmp_path / "dev-registry-db.secret.yaml").read_text()
    assert "render-placeholder" not in secret and render.REDACTED in secret
    assert (services / "README.md").exists()


@pytest.mark.parametrize("stack", STACKS)
def test_committed_gitops_folder_is_current(stack: str, tmp_path: Path) -> None:
    """deploy/<stack> is what Argo CD syncs: it must equal a fresh render (run `make render`)."""
    root = Path(__file__).resolve().parent.parent
    render.write_services(stack, root, tmp_path)
    assert _files(tmp_path) == _files(root / "deploy" / stack)


@pytest.mark.parametrize("stack", STACKS)
def test_gitops_application_syncs_the_folder_render_writes(stack: str, rendered) -> None:
    from loopform.spec import load_stack, stack_file

    spec = load_stack(stack_file(stack))
    application = next(r for r in rendered(stack) if r.kind == "Application")
    source = application.inputs["spec"]["source"]
    assert source["path"] == f"{spec.gitops.path}/{stack}"
    assert source["repoURL"] == spec.gitops.repo_url
    assert application.inputs["spec"]["destination"]["namespace"] == spec.cluster.namespaces.serving
    # The folder's README names the Application that really syncs it.
    readme = (Path(__file__).resolve().parent.parent / "deploy" / stack / "README.md").read_text()
    assert f"Application `{application.inputs['metadata']['name']}`" in readme


@pytest.mark.parametrize("stack", STACKS)
def test_every_model_has_its_pipeline(stack: str, rendered) -> None:
    templates = [r for r in rendered(stack) if r.kind == "WorkflowTemplate"]
    assert sorted(t.inputs["metadata"]["name"] for t in templates) == ["delivery-pipeline", "fraud-pipeline"]
    for template in templates:
        tasks = template.inputs["spec"]["templates"][-1]["dag"]["tasks"]
        assert [t["name"] for t in tasks] == list(STEP_NAMES)
        needs = {t["name"]: t.get("depends") for t in tasks}
        for step in PIPELINE:
            assert needs[step.name] == (" && ".join(step.needs) or None), step.name


def _images(value: object) -> list[str]:
    """Every container image a manifest names (any `image` string, however deep)."""
    if isinstance(value, dict):
        return [v for k, v in value.items() if k == "image" and isinstance(v, str)] + [
            image for v in value.values() for image in _images(v)
        ]
    return [image for v in value for image in _images(v)] if isinstance(value, list) else []


@pytest.mark.parametrize("stack", STACKS)
def test_only_the_steps_that_request_gpus_run_the_cuda_pipeline_image(stack: str, rendered) -> None:
    """fraud trains on GPUs in every stack, delivery on CPU: the CUDA image is fraud's train step's alone."""
    from loopform.spec import load_stack, stack_file

    orchestrator = load_stack(stack_file(stack)).orchestrator
    steps = {
        (resource.inputs["metadata"]["name"], template["name"]): template["container"]
        for resource in rendered(stack)
        if resource.kind == "WorkflowTemplate"
        for template in resource.inputs["spec"]["templates"]
        if "container" in template
    }
    gpu_steps = {key for key, container in steps.items() if "nvidia.com/gpu" in container["resources"]["limits"]}
    assert gpu_steps == {("fraud-pipeline", "train")}
    for key, container in steps.items():
        expected = orchestrator.gpu_pipeline_image if key in gpu_steps else orchestrator.pipeline_image
        assert container["image"] == expected, key
    everywhere = [image for resource in rendered(stack) for image in _images(resource.manifest())]
    assert everywhere.count(orchestrator.gpu_pipeline_image) == 1


def test_render_reads_the_file_it_is_given(tmp_path: Path) -> None:
    import yaml

    from loopform.spec import CONFIG_KEY

    root = Path(__file__).resolve().parent.parent
    document = yaml.safe_load((root / "stacks" / "Pulumi.dev.yaml").read_text())
    document["config"][CONFIG_KEY]["registry"]["replicas"] = 3
    path = tmp_path / "Pulumi.dev.yaml"
    path.write_text(yaml.safe_dump(document))
    deploy_before = _files(root / "deploy" / "dev")
    assert main(["render", "--stack", "dev", "--file", str(path), "--out", str(tmp_path / "out")]) == 0
    deployment = yaml.safe_load((tmp_path / "out" / "dev-registry-server.deployment.yaml").read_text())
    assert deployment["spec"]["replicas"] == 3
    assert (tmp_path / "out" / "services" / "README.md").exists()
    assert _files(root / "deploy" / "dev") == deploy_before


# --- `render --out` writes only into folders it created, and deletes only what it wrote -------------------------


def test_render_out_refuses_the_repositorys_stacks_folder_and_the_stack_files_survive(tmp_path: Path) -> None:
    from tests.helpers_project import cli, copy_project

    project = copy_project(tmp_path)
    before = _files(project / "stacks")
    refused = cli(project, "render", "--stack", "dev", "--out", "stacks")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "refusing to render into stacks: it is in the repository's own stacks/ folder" in refused.stderr
    assert _files(project / "stacks") == before and before


@pytest.mark.parametrize("inside", [".", "..", "tests", "loopform/gates", "models/fraud/new"])
def test_render_never_writes_into_the_repositorys_own_folders(tmp_path: Path, inside: str) -> None:
    root = tmp_path / "repo"
    (root / "models" / "fraud").mkdir(parents=True)
    with pytest.raises(render.OutputRefused, match="refusing to render into"):
        render.write_output({"a.yaml": "a: 1\n"}, root / inside, root)
    assert not (root / inside / "a.yaml").exists()


def test_render_out_refuses_a_folder_it_did_not_create(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.yaml").write_text("mine: true\n")
    assert main(["render", "--stack", "dev", "--out", str(mine)]) == 2
    assert _files(mine) == {"keep.yaml": "mine: true\n"}
    # --services-out is held to the same rule
    out = tmp_path / "out"
    assert main(["render", "--stack", "dev", "--out", str(out), "--services-out", str(mine)]) == 2
    assert _files(mine) == {"keep.yaml": "mine: true\n"}


def test_render_out_replaces_only_the_files_it_wrote(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = render.write_output(
        {"a.deployment.yaml": "a\n", "b.service.yaml": "b\n", "_tree.txt": "t\n"}, out, tmp_path
    )
    assert [p.name for p in first] == ["_tree.txt", "a.deployment.yaml", "b.service.yaml"]
    (out / "notes.yaml").write_text("a reviewer's notes\n")
    # b is gone from the second render: its file goes; the file render did not write stays.
    render.write_output({"a.deployment.yaml": "a2\n", "_tree.txt": "t2\n"}, out, tmp_path)
    assert _files(out) == {
        render.MARKER: (out / render.MARKER).read_text(),
        "_tree.txt": "t2\n",
        "a.deployment.yaml": "a2\n",
        "notes.yaml": "a reviewer's notes\n",
    }
    listed = [line for line in (out / render.MARKER).read_text().splitlines() if not line.startswith("#")]
    assert listed == ["_tree.txt", "a.deployment.yaml"]
    # A file render did not write is never overwritten, and a marker naming a path out of the folder deletes nothing.
    with pytest.raises(render.OutputRefused, match="did not write it"):
        render.write_output({"notes.yaml": "x\n"}, out, tmp_path)
    (tmp_path / "outside.yaml").write_text("x\n")
    (out / render.MARKER).write_text("../outside.yaml\n")
    render.write_output({"a.deployment.yaml": "a3\n"}, out, tmp_path)
    assert (tmp_path / "outside.yaml").exists() and (out / "notes.yaml").exists()


def test_render_command_renders_again_into_its_own_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["render", "--stack", "dev", "--out", str(out)]) == 0
    (out / "README.md").write_text("kept\n")
    stale = out / "dev-gone.deployment.yaml"
    stale.write_text("kind: Deployment\n")
    with (out / render.MARKER).open("a") as marker:
        marker.write(f"{stale.name}\n")  # as if an earlier render had written it
    assert main(["render", "--stack", "dev", "--out", str(out)]) == 0
    assert not stale.exists() and (out / "README.md").read_text() == "kept\n"
    assert (out / "dev-registry-server.deployment.yaml").exists() and (out / "services" / render.MARKER).exists()


# --- render's stand-ins for SDK helpers (loopform.render) agree with the SDK's own -------------------------


def test_contains_unknowns_agrees_with_the_sdk() -> None:
    from pulumi.output import Unknown
    from pulumi.runtime import rpc

    from loopform.render import _contains_unknowns

    cyclic: dict = {"a": [1, {"b": "x"}]}
    cyclic["self"] = cyclic
    shared = {"k": "v"}
    values = [
        None,
        1,
        "x",
        [],
        {},
        Unknown(),
        [Unknown()],
        {"a": {"b": [1, 2, {"c": Unknown()}]}},
        {"a": {"b": [1, 2, {"c": 3}]}},
        cyclic,
        [shared, shared],
        ({"t": Unknown()},),
    ]
    for value in values:
        assert _contains_unknowns(value) == rpc.contains_unknowns(value), value
    assert _contains_unknowns({"a": [{"b": Unknown()}]})  # the answer that matters is not always False


def test_plain_inputs_agree_with_the_sdk() -> None:
    from google.protobuf import struct_pb2
    from pulumi.runtime import rpc

    from loopform.render import _plain_inputs

    struct = struct_pb2.Struct()
    struct.update(
        {
            "apiVersion": "v1",
            "n": 3,
            "f": 1.5,
            "ok": True,
            "none": None,
            "metadata": {"name": "x", "labels": {"a": "b"}, "empty": {}},
            "list": [1, None, "s", [True]],
        }
    )
    secret = struct_pb2.Struct()
    secret.update(
        {
            "data": {rpc._special_sig_key: rpc._special_secret_sig, "value": {"k": "v"}},
            "unknown": rpc.UNKNOWN,
            "nested": [{"deep": {rpc._special_sig_key: rpc._special_secret_sig, "value": "s"}}],
        }
    )
    for case in (struct, secret, struct_pb2.Struct()):
        plain, sdk = _plain_inputs(case), rpc.deserialize_properties(case)
        assert plain == sdk and repr(plain) == repr(sdk)
    assert "none" not in _plain_inputs(struct) and _plain_inputs(struct)["list"][1] is None


def test_render_works_after_asyncio_run_left_no_event_loop() -> None:
    """`asyncio.run` (an ASGI test client, a server test) leaves the main thread without a current event loop;
    the SDK's registration needs one, so render sets it up itself."""
    import asyncio

    import pulumi

    async def nothing() -> None:
        return None

    asyncio.run(nothing())
    resources = render.render_components(lambda: pulumi.ComponentResource("test:index:Thing", "thing"))
    assert [r.name for r in resources] == ["thing"]
