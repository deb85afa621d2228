"""Offline render: run the Pulumi program under the SDK's mocks and capture every resource.

No Pulumi CLI, cluster or credentials: `pulumi.runtime.set_mocks` stands in for the engine,
a recording monitor keeps each registration (type, name, parent, inputs), and the result
is written as one YAML file per resource. Kubernetes objects come out exactly as they
would be applied; Helm charts as chart + version + values; Secret data redacted.
"""

from __future__ import annotations

import json
import re
import runpy
import threading
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
                key: data[key]
                for key in ("chart", "version", "name", "repositoryOpts", "namespace", "verify", "keyring", "values")
                if key in data
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

    def __init__(self) -> None:
        # The inputs of the registration this thread is answering, already deserialized by the MockMonitor: the
        # recording monitor keeps them instead of deserializing them again (the SDK registers from worker threads).
        self.answering = threading.local()

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        self.answering.inputs = args.inputs
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

    def __init__(self, mocks: _Mocks) -> None:
        super().__init__(mocks)
        self.recorded: list[RenderedResource] = []

    def RegisterResource(self, request: Any) -> Any:
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            self.recorded.append(
                RenderedResource(
                    type_=request.type,
                    name=request.name,
                    urn=response.urn,
                    parent=request.parent or None,
                    custom=bool(request.custom),
                    inputs=self.mocks.answering.inputs,
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


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    """Strings as every render has written them: hera's YAML presenter, which the program installs globally when it
    imports hera (multi-line text as a literal block, the YAML 1.1 booleans y/Y/n/N quoted), here made explicit so
    the output never depends on what else was imported."""
    if "\n" in text:
        return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|")
    if text in ("y", "Y", "n", "N"):
        return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="'")
    return dumper.represent_scalar("tag:yaml.org,2002:str", text)


class _Dumper(yaml.SafeDumper):
    """PyYAML's pure-Python emitter: the reference output."""


class _FastDumper(yaml.CSafeDumper):
    """libyaml's emitter, several times faster: byte-identical to `_Dumper` on `_libyaml_exact` data."""


for _dumper in (_Dumper, _FastDumper):
    _dumper.add_representer(str, _represent_str)

#: Text libyaml emits exactly as PyYAML does: printable ASCII and line breaks, no space before a line break.
_EXACT_TEXT = re.compile(r"[\n\x20-\x7e]*")
#: PyYAML writes a mapping key of this many characters or more as an explicit `? key`; libyaml counts differently.
_LONG_KEY = 100


def _exact_text(text: str) -> bool:
    """Whether libyaml writes `text` as PyYAML does. The two fold double-quoted scalars, and count the width of
    escapes and non-ASCII characters, differently; double quotes are what text with other characters, a space
    before a line break, or (multi-line) a trailing space gets. A multi-line text ending in two line breaks (the
    `|+` block) may be followed by a document end marker in one and not the other."""
    if _EXACT_TEXT.fullmatch(text) is None or " \n" in text:
        return False
    if "\n" in text:
        return not text.endswith((" ", "\n\n")) and text != "\n"
    return True


def _libyaml_exact(data: Any) -> bool:
    """Whether libyaml dumps `data` byte for byte as PyYAML does (`_exact_text` for every string; keys non-empty,
    single-line and short); anything else goes through PyYAML."""
    if isinstance(data, str):
        return _exact_text(data)
    if isinstance(data, dict):
        return all(
            isinstance(key, str) and 0 < len(key) < _LONG_KEY and "\n" not in key and _exact_text(key) for key in data
        ) and all(_libyaml_exact(value) for value in data.values())
    if isinstance(data, list):
        return all(_libyaml_exact(item) for item in data)
    return data is None or isinstance(data, bool | int | float)


def dump_yaml(data: Any) -> str:
    """`data` as block YAML, keys sorted: with libyaml where it is exact (a mapping, `_libyaml_exact`), else with
    PyYAML (which ends a lone scalar with a document end marker that libyaml leaves out)."""
    dumper = _FastDumper if isinstance(data, dict) and _libyaml_exact(data) else _Dumper
    return yaml.dump(data, Dumper=dumper, sort_keys=True, default_flow_style=False, width=120, allow_unicode=True)


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


TREE_FILE = "_tree.txt"


def rendered_files(resources: list[RenderedResource]) -> dict[str, str]:
    """One YAML file per Kubernetes object or chart, plus the resource tree: file name -> text."""
    files: dict[str, str] = {}
    for resource in resources:
        if not (resource.is_kubernetes_object or resource.is_chart):
            continue
        name = file_name(resource)
        if name in files:
            raise ValueError(f"two resources render to {name}: rename one of the {resource.kind}s")
        files[name] = dump_yaml(resource.manifest())
    files[TREE_FILE] = tree(resources)
    return files


def write(resources: list[RenderedResource], out: Path) -> list[Path]:
    """Write `rendered_files` into `out` (created if missing); the YAML files sorted, then the tree.

    Deletes nothing: `write_output` is what replaces an earlier render's files.
    """
    files = rendered_files(resources)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
    return [*sorted(out / name for name in files if name != TREE_FILE), out / TREE_FILE]


MARKER = ".loopform-render"
"""Written by `write_output` into each folder it writes: the names of the files it wrote there, one a line."""
#: Folders of the repository itself: render never writes into them or below them (nor into the root or above it).
REPOSITORY_FOLDERS = (
    "stacks",
    "components",
    "models",
    "policies",
    "tests",
    "loopform",
    "bentos",
    "images",
    "docs",
    "bench",
    ".git",
    ".github",
    ".ci",
)


class OutputRefused(ValueError):
    """A folder render may not write into: the repository's own, or one it did not create."""


def claim_output(out: Path, root: Path) -> frozenset[str]:
    """The names of the files an earlier render wrote into `out`, if render may write there; else OutputRefused.

    Render may write into a folder that is missing, empty, or holds its marker; never into the repository's root,
    a folder above it, or one of its own folders (`REPOSITORY_FOLDERS`), which `--out stacks` once emptied.
    """
    refuse_repository_folder(out, root)
    target = out.resolve()
    if not target.exists():
        return frozenset()
    if not target.is_dir():
        raise OutputRefused(f"refusing to render into {out}: it is not a folder")
    marker = target / MARKER
    if marker.is_file():
        names = (line.strip() for line in marker.read_text().splitlines() if not line.startswith("#"))
        return frozenset(name for name in names if _plain_name(name))
    if any(target.iterdir()):
        raise OutputRefused(
            f"refusing to render into {out}: it holds files and loopform render did not create it (no {MARKER}), "
            "so they would be mixed with or replaced by rendered ones; pick a new or empty folder"
        )
    return frozenset()


def refuse_repository_folder(out: Path, root: Path) -> None:
    """OutputRefused if `out` is the repository's root, a folder above it, or in one of `REPOSITORY_FOLDERS`."""
    target, repository = out.resolve(), root.resolve()
    if repository.is_relative_to(target):
        raise OutputRefused(f"refusing to render into {out}: it is the repository {root} or a folder above it")
    for folder in REPOSITORY_FOLDERS:
        if target.is_relative_to(repository / folder):
            raise OutputRefused(
                f"refusing to render into {out}: it is in the repository's own {folder}/ folder; "
                "pick a folder of its own, e.g. rendered/<stack> (the default)"
            )


def write_output(files: dict[str, str], out: Path, root: Path) -> list[Path]:
    """Write `files` (name -> text) into `out` in place of the files an earlier render wrote there, which go,
    so removals show as deletions; any other file stays. Refuses (OutputRefused) what `claim_output` refuses.
    """
    previous = claim_output(out, root)
    out.mkdir(parents=True, exist_ok=True)
    _mark(out, previous | set(files))  # a render stopped halfway still knows every file it may have written
    for name in sorted(previous):
        (out / name).unlink(missing_ok=True)
    written = []
    for name, text in files.items():
        path = out / name
        if path.exists():
            raise OutputRefused(f"refusing to overwrite {path}: loopform render did not write it")
        path.write_text(text)
        written.append(path)
    _mark(out, set(files))
    return sorted(written)


def _plain_name(name: str) -> bool:
    """A marker line render may delete: a file name in the folder itself, never a path out of it."""
    return bool(name) and name not in (".", "..", MARKER) and "/" not in name and "\\" not in name


def _mark(out: Path, names: set[str]) -> None:
    header = "# Written by `loopform render`: the files it wrote here, which the next render replaces."
    (out / MARKER).write_text("\n".join([header, *sorted(names)]) + "\n")


SERVICES_README = """# Generated by `loopform render --stack {stack}`: do not edit.

Argo CD syncs this folder (Application `{application}` in namespace `{namespace}`). It holds the
manifests of every model released to `{stack}`: `loopform promote` writes the release into
stacks/Pulumi.{stack}.yaml, `loopform render` writes the manifests here, and the pull request
shows both.
"""


def service_files(stack: str, root: Path, path: Path | None = None) -> dict[str, str]:
    """The model-service manifests Argo CD syncs, and the folder's README: file name -> text."""
    from components.gitops import application_name
    from components.model_service import manifests
    from components.platform import model_services
    from loopform.spec import load_stack

    spec = load_stack(path or stack_file(stack, root))
    files = {
        f"{manifest['metadata']['name']}.{manifest['kind'].lower()}.yaml": dump_yaml(manifest)
        for service in model_services(spec)
        for manifest in manifests(service)
    }
    files["README.md"] = SERVICES_README.format(
        stack=stack, application=application_name(stack), namespace=spec.cluster.namespaces.gitops
    )
    return files


def write_services(stack: str, root: Path, out: Path | None = None, path: Path | None = None) -> list[Path]:
    """Write the model-service manifests into `out`, else into `<gitops.path>/<stack>/`, which Argo CD syncs and
    which holds only what render writes (`loopform check` enforces it), so its other YAML files go.

    Returns the manifests written, sorted (not the README).
    """
    from loopform.spec import load_stack

    files = service_files(stack, root, path)
    if out is None:
        out = root / load_stack(path or stack_file(stack, root)).gitops.path / stack
        refuse_repository_folder(out, root)  # whatever gitops.path says
        for old in out.glob("*.yaml"):
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
    return sorted(out / name for name in files if name != "README.md")


def write_services_to(stack: str, root: Path, out: Path | None, path: Path | None = None) -> list[Path]:
    """`write_services` as `loopform render` runs it: a folder given (`--services-out`, `--out`) is written as
    `write_output` writes, so render refuses one it did not create; without one, the GitOps folder."""
    if out is None:
        return write_services(stack, root, None, path)
    return [p for p in write_output(service_files(stack, root, path), out, root) if p.name != "README.md"]


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
