"""Offline render: run the Pulumi program under the SDK's mocks and capture every resource.

No Pulumi CLI, cluster or credentials: `pulumi.runtime.set_mocks` stands in for the engine,
a recording monitor keeps each registration (type, name, parent, inputs), and the result
is written as one YAML file per resource. Kubernetes objects come out exactly as they
would be applied; Helm charts as chart + version + values; Secret data redacted.
"""

from __future__ import annotations

import json
import runpy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import yaml
from pulumi.runtime import Mocks, set_mocks
from pulumi.runtime.mocks import MockMonitor
from pulumi.runtime.rpc import is_rpc_secret

from loopform.spec import read_stack_file, repo_root, stack_file

REDACTED = "<redacted>"
#: Secret config values handed to the program during an offline render.
RENDER_SECRETS = {
    f"loopform:{key}": "render-placeholder"
    for key in ("registryDbPassword", "redisPassword", "objectStoreAccessKeyId", "objectStoreSecretAccessKey")
}


@dataclass(frozen=True)
class RenderedResource:
    """One registered resource: its type token, logical name, parent and inputs."""

    type_: str
    name: str
    urn: str
    parent: str | None
    custom: bool
    inputs: dict[str, Any] = field(repr=False)
    dependencies: tuple[str, ...] = ()
    protect: bool = False
    retain_on_delete: bool = False
    delete_before_replace: bool = False
    replace_on_changes: tuple[str, ...] = ()

    @property
    def options(self) -> list[str]:
        """The resource options that change what a deploy may do to it, for reviewers."""
        flags = (
            ("protect", self.protect),
            ("retain-on-delete", self.retain_on_delete),
            ("delete-before-replace", self.delete_before_replace),
        )
        replace_on = [f"replace-on-changes {path}" for path in self.replace_on_changes]
        return [name for name, on in flags if on] + replace_on

    @property
    def kind(self) -> str:
        return self.type_.rsplit(":", 1)[-1]

    @property
    def is_kubernetes_object(self) -> bool:
        return self.custom and self.type_.startswith("kubernetes:") and "apiVersion" in self.inputs

    @property
    def is_chart(self) -> bool:
        return self.type_.startswith("kubernetes:helm.sh/")

    def manifest(self) -> dict[str, Any]:
        """What a reviewer should see: the object as applied, or the chart and its values."""
        data = _plain(self.inputs)
        if self.is_chart:
            return {
                key: data[key] for key in ("chart", "version", "repositoryOpts", "namespace", "values") if key in data
            }
        if self.kind == "Secret" and self.is_kubernetes_object:
            for key in ("data", "stringData"):
                raw = self.inputs.get(key)
                if is_rpc_secret(raw):
                    raw = raw["value"]
                if isinstance(raw, dict):
                    data[key] = {k: REDACTED for k in raw}
        return data


def _plain(value: Any) -> Any:
    """Inputs as plain YAML data: secrets redacted, integral floats as ints (mocks send 3.0)."""
    if is_rpc_secret(value):
        return REDACTED
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class _Mocks(Mocks):
    """Answers for the engine: echo inputs, fill names the provider would fill."""

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        state = dict(args.inputs)
        if args.typ.startswith("kubernetes:") and "apiVersion" in state:
            metadata = dict(state.get("metadata") or {})
            metadata.setdefault("name", args.name)
            state["metadata"] = metadata
        return f"{args.name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        return {}


class _RecordingMonitor(MockMonitor):
    """A MockMonitor that also keeps parent, custom flag, dependencies and inputs."""

    def __init__(self, mocks: Mocks) -> None:
        super().__init__(mocks)
        self.recorded: list[RenderedResource] = []

    def RegisterResource(self, request: Any) -> Any:
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            inputs = pulumi.runtime.rpc.deserialize_properties(request.object)
            self.recorded.append(
                RenderedResource(
                    type_=request.type,
                    name=request.name,
                    urn=response.urn,
                    parent=request.parent or None,
                    custom=bool(request.custom),
                    inputs=inputs,
                    dependencies=tuple(request.dependencies),
                    protect=bool(request.protect),
                    retain_on_delete=bool(request.retainOnDelete),
                    delete_before_replace=bool(request.deleteBeforeReplace),
                    replace_on_changes=tuple(request.replaceOnChanges),
                )
            )
        return response


def render_components(
    build: Callable[[], Any], config: dict[str, str] | None = None, *, stack: str = "test", project: str = "loopform"
) -> list[RenderedResource]:
    """Run `build` (which declares resources) under mocks; return what it registered.

    If `build` returns an Output, the run also waits for it, so tests can read outputs.
    """
    from pulumi.runtime import settings

    mocks = _Mocks()
    monitor = _RecordingMonitor(mocks)
    settings.SETTINGS.outputs.clear()
    settings.set_root_resource(None)
    pulumi.runtime.set_all_config(dict(config or {}))
    set_mocks(mocks, project=project, stack=stack, preview=False, monitor=monitor)
    pulumi.runtime.test(build)()
    return list(monitor.recorded)


def stack_config(stack: str, root: Path | None = None, path: Path | None = None) -> dict[str, str]:
    """The stack file's config as the Pulumi engine hands it to a program (objects as JSON)."""
    config = read_stack_file(path or stack_file(stack, root))["config"]
    values = {key: value if isinstance(value, str) else json.dumps(value) for key, value in config.items()}
    return {**RENDER_SECRETS, **values}


def render_stack(stack: str, root: Path | None = None, path: Path | None = None) -> list[RenderedResource]:
    """Run the Pulumi program (`__main__.py`) for `stack` under mocks, with `path` as its stack file if given."""
    root = root or repo_root()
    config = stack_config(stack, root, path)
    program = str(root / "__main__.py")
    return render_components(lambda: runpy.run_path(program, run_name="__main__") and None, config, stack=stack)


def file_name(resource: RenderedResource) -> str:
    return f"{resource.name}.{resource.kind.lower()}.yaml"


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=True, default_flow_style=False, width=120, allow_unicode=True)


def tree(resources: Iterable[RenderedResource]) -> str:
    """Every resource, components included, as an indented tree: the shape of the stack."""
    resources = list(resources)
    by_parent: dict[str | None, list[RenderedResource]] = {}
    urns = {r.urn for r in resources}
    for resource in resources:
        parent = resource.parent if resource.parent in urns else None
        by_parent.setdefault(parent, []).append(resource)
    lines: list[str] = []

    def walk(parent: str | None, depth: int) -> None:
        for resource in sorted(by_parent.get(parent, []), key=lambda r: (r.type_, r.name)):
            options = f" [{', '.join(resource.options)}]" if resource.options else ""
            lines.append(f"{'  ' * depth}{resource.type_} {resource.name}{options}")
            walk(resource.urn, depth + 1)

    walk(None, 0)
    return "\n".join(lines) + "\n"


def write(resources: list[RenderedResource], out: Path) -> list[Path]:
    """Write one YAML file per Kubernetes object or chart, plus the resource tree.

    Files a previous render wrote into `out` are replaced, so removals show as deletions.
    """
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.yaml"):
        old.unlink()
    written = []
    for resource in resources:
        if not (resource.is_kubernetes_object or resource.is_chart):
            continue
        path = out / file_name(resource)
        if path.exists():
            raise ValueError(f"two resources render to {path.name}: rename one of the {resource.kind}s")
        path.write_text(dump_yaml(resource.manifest()))
        written.append(path)
    tree_path = out / "_tree.txt"
    tree_path.write_text(tree(resources))
    return [*sorted(written), tree_path]


SERVICES_README = """# Generated by `loopform render --stack {stack}`: do not edit.

Argo CD syncs this folder (Application `{application}` in namespace `{namespace}`). It holds the
manifests of every model released to `{stack}`: `loopform promote` writes the release into
stacks/Pulumi.{stack}.yaml, `loopform render` writes the manifests here, and the pull request
shows both.
"""


def write_services(stack: str, root: Path, out: Path | None = None, path: Path | None = None) -> list[Path]:
    """Write the model-service manifests Argo CD syncs into `<gitops.path>/<stack>/` (or `out`)."""
    from components.model_service import manifests
    from components.platform import model_services
    from loopform.spec import load_stack

    spec = load_stack(path or stack_file(stack, root))
    out = out or root / spec.gitops.path / stack
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.yaml"):
        old.unlink()
    written = []
    for service in model_services(spec):
        for manifest in manifests(service):
            path = out / f"{manifest['metadata']['name']}.{manifest['kind'].lower()}.yaml"
            path.write_text(dump_yaml(manifest))
            written.append(path)
    from components.gitops import application_name

    readme = SERVICES_README.format(
        stack=stack, application=application_name(stack), namespace=spec.cluster.namespaces.gitops
    )
    (out / "README.md").write_text(readme)
    return sorted(written)


def stack_manifests(resources: list[RenderedResource], spec: Any) -> Any:
    """Everything a stack puts in the cluster: rendered objects and charts, plus the services Argo CD applies."""
    from components.model_service import manifests
    from components.platform import model_services
    from loopform.references import Manifests

    objects = [r.manifest() for r in resources if r.is_kubernetes_object]
    if spec.gitops.enabled:
        objects += [manifest for service in model_services(spec) for manifest in manifests(service)]
    charts = [(r.name, r.manifest()) for r in resources if r.is_chart]
    return Manifests(objects=objects, charts=charts)


def check_references(resources: list[RenderedResource], spec: Any) -> list[str]:
    """What a cluster would refuse or leave pending: unresolved references, pods without object-store credentials."""
    from loopform.prerequisites import prerequisites
    from loopform.references import pods_without_object_store_credentials, unresolved

    manifests = stack_manifests(resources, spec)
    needed = prerequisites(spec)
    problems = [
        f"{ref} (referenced by {ref.by}) is neither created by the program nor a prerequisite"
        for ref in unresolved(manifests, needed)
    ]
    problems += [
        f"{pod} reads s3:// with no credentials (no IRSA role, Pod Identity association or static keys)"
        for pod in pods_without_object_store_credentials(manifests, needed)
    ]
    return problems
