"""Offline render: run the Pulumi program under the SDK's mocks and capture every resource.

No Pulumi CLI, cluster or credentials: `pulumi.runtime.set_mocks` stands in for the engine,
a recording monitor keeps each registration (type, name, parent, inputs), and the result
is written as one YAML file per resource. Kubernetes objects come out exactly as they
would be applied; Helm charts as chart + version + values; Secret data redacted.
"""

from __future__ import annotations

import gc
import json
import re
import runpy
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import yaml
from google.protobuf import struct_pb2
from pulumi.runtime import Mocks, rpc, set_mocks
from pulumi.runtime.mocks import MockMonitor, MockResourceArgs, _resolve_callbacks
from pulumi.runtime.proto import resource_pb2
from pulumi.runtime.rpc import is_rpc_secret
from pulumi.runtime.sync_await import _ensure_event_loop, _sync_await

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

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        """The inputs themselves, not a copy: `_RecordingMonitor` replies only with what differs from them."""
        state = args.inputs
        if args.typ.startswith("kubernetes:") and "apiVersion" in state:
            metadata = state.get("metadata") or {}
            if "name" not in metadata:
                state = {**state, "metadata": {**metadata, "name": args.name}}
        return f"{args.name}-id", state

    def call(self, args: pulumi.runtime.MockCallArgs) -> dict[str, Any]:
        return {}


class _NotPlain(Exception):
    """A value `_plain_inputs` leaves to the SDK: a secret, resource reference, asset or unknown."""


def _plain_inputs(struct: struct_pb2.Struct) -> dict[str, Any]:
    """`rpc.deserialize_properties(struct)`, 2.5 times faster for inputs that are plain data (all a Kubernetes
    object's are, secrets aside): anything the SDK would turn into something else (a secret, a resource
    reference, an asset, an unknown) goes to the SDK instead."""
    try:
        return _plain_struct(struct)
    except _NotPlain:
        _ensure_event_loop()  # deserializing a resource reference needs one on this (worker) thread
        return rpc.deserialize_properties(struct)


def _plain_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    fields = struct.fields
    if rpc._special_sig_key in fields:
        raise _NotPlain
    plain = {}
    for key, value in fields.items():
        item = _plain_value(value)
        if item is not None:  # as the SDK: a null property is no property
            plain[key] = item
    return plain


def _plain_value(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        if value.string_value == rpc.UNKNOWN:
            raise _NotPlain
        return value.string_value
    if kind == "number_value":
        return value.number_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _plain_struct(value.struct_value)
    if kind == "list_value":
        return [_plain_value(item) for item in value.list_value.values]
    return None


class _RecordingMonitor(MockMonitor):
    """A MockMonitor that also keeps parent, custom flag, dependencies and inputs, and answers with less work.

    Its reply holds only the outputs that differ from the inputs: the SDK takes every property a reply leaves out from
    the resource's own inputs (`rpc.resolve_outputs`, as for a deploy's provider), so the program sees the same
    outputs as from MockMonitor's full echo, without serializing each resource's inputs back a second time."""

    def __init__(self, mocks: _Mocks) -> None:
        super().__init__(mocks)
        self.recorded: list[RenderedResource] = []

    def RegisterResource(self, request: Any) -> Any:
        if request.type == "pulumi:pulumi:Stack":
            return super().RegisterResource(request)
        urn = self.make_urn(request.parent, request.type, request.name)
        inputs = _plain_inputs(request.object)
        id_, state = self.mocks.new_resource(
            MockResourceArgs(
                typ=request.type,
                name=request.name,
                inputs=inputs,
                provider=request.provider,
                resource_id=request.importId,
                custom=request.custom or False,
                transforms=_resolve_callbacks(request.transforms),
            )
        )
        changed = {key: value for key, value in state.items() if key not in inputs or inputs[key] is not value}
        reply = _sync_await(rpc.serialize_properties(changed, {})) if changed else struct_pb2.Struct()
        self.resources[urn] = MockMonitor.ResourceRegistration(urn, id_, state)
        self.recorded.append(
            RenderedResource(
                type_=request.type,
                name=request.name,
                urn=urn,
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
        return resource_pb2.RegisterResourceResponse(urn=urn, id=id_, object=reply)


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a render's step. A render allocates millions of small dicts and
    lists that live until it ends, and the collector traversed them again and again (a third of a 500-model
    render's CPU time); the cycles the SDK's tasks leave are collected once, when it is back on."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _no_stack_trace() -> Any:
    """What the SDK sends the engine when it finds no stack: the mock engine drops stack traces anyway."""
    from pulumi.runtime.proto import source_pb2

    return source_pb2.StackTrace()


def _contains_unknowns(value: Any) -> bool:
    """`rpc.contains_unknowns` (whether an Unknown lies in `value`, its dicts and lists) without the SDK's recursive
    closure: each call of that left a garbage cycle (function, cell, annotations), 100,000 of them at 500 models,
    which the collector then had to find. Same answer for every value."""
    from pulumi.output import Unknown

    pending, seen = [value], set()
    while pending:
        item = pending.pop()
        if isinstance(item, Unknown):
            return True
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, dict):
            pending.extend(item[key] for key in item)
        elif isinstance(item, list):
            pending.extend(item)
    return False


@contextmanager
def _lighter_sdk() -> Iterator[None]:
    """Two of the SDK's helpers replaced while the program runs under mocks, the program itself untouched:

    - `resource._get_stack_trace` extracts and formats the Python stack at each registration, for the engine to
      point its messages at the program's lines; the mock engine drops it (about 5% of a render's CPU time);
    - `rpc.contains_unknowns` by `_contains_unknowns`, which gives the same answers without leaving garbage.

    A helper a newer SDK no longer has is left alone."""
    from pulumi.runtime import resource

    patches = [(resource, "_get_stack_trace", _no_stack_trace), (rpc, "contains_unknowns", _contains_unknowns)]
    originals = [(module, name, getattr(module, name)) for module, name, _ in patches if hasattr(module, name)]
    for module, name, replacement in patches:
        if hasattr(module, name):
            setattr(module, name, replacement)
    try:
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


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
    # The SDK makes its futures on this thread's event loop; a caller that ran `asyncio.run` before (which leaves
    # none set) would otherwise make registration fail with "There is no current event loop".
    _ensure_event_loop()
    set_mocks(mocks, project=project, stack=stack, preview=False, monitor=monitor)
    with _collector_paused(), _lighter_sdk():
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


#: Implicit tags of short scalars already resolved, shared by every dump: (text, implicit) -> tag.
_RESOLVED: dict[tuple[str, Any], str] = {}
#: Longer scalars are rarely repeated (and would keep large texts alive in `_RESOLVED`).
_RESOLVED_MAX_LENGTH = 200


class _CachedResolution:
    """The YAML resolver's answer for a scalar remembered: the emitters ask it twice per scalar, with a regular
    expression per candidate tag, for the same few thousand keys and values over and over.
    Safe because the dumpers add no path resolvers: the tag depends on the text and `implicit` alone."""

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is not yaml.ScalarNode or len(value) > _RESOLVED_MAX_LENGTH:
            return super().resolve(kind, value, implicit)  # type: ignore[misc]
        key = (value, implicit)
        tag = _RESOLVED.get(key)
        if tag is None:
            tag = _RESOLVED[key] = super().resolve(kind, value, implicit)  # type: ignore[misc]
        return tag


class _Dumper(_CachedResolution, yaml.SafeDumper):
    """PyYAML's pure-Python emitter: the reference output."""


class _FastDumper(_CachedResolution, yaml.CSafeDumper):
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
    with _collector_paused():
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

    with _collector_paused():
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
