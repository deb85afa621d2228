"""`loopform check`: the policy pack over the analyzer protocol, as `pulumi preview --policy-pack` runs it, offline.

The pack is started exactly as Pulumi starts a Python pack (`python -u -m pulumi.policy ENGINE PACKDIR` in the
pack's folder; its first stdout line is the port of its `Analyzer` gRPC server), and called the way the engine
calls it:

1. `GetAnalyzerInfo`: the policies, their enforcement levels and config schemas.
2. `Configure`: what the Pulumi CLI does before it, done here because the analyzer does not do it: the policy
   config file read (`{"all": LEVEL, "<policy>": LEVEL | {"enforcementLevel": LEVEL, <props>}}`), schema
   defaults filled in, `initialConfig` and the file overlaid, each policy's properties validated with jsonschema.
3. `ConfigureStack`, then `Analyze` once per registered resource (custom resources, components, providers and
   the stack itself: the engine's step generator analyzes every registration, with no custom-only filter), then
   `AnalyzeStack` once with all of them, parents and dependencies included.

The resources are the stack rendered under Pulumi mocks (`loopform.render.render_stack`), plus, on the GitOps
road, the manifests in `<gitops.path>/<env>/` that Argo CD applies and Pulumi never sees; that folder must also
be exactly what `loopform render` writes from the stack file (policy `gitops-manifests-match-stack`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loopform.render import RenderedResource

PROJECT = "loopform"
#: The pseudo-policy `check` adds on the GitOps road: deploy/<env>/ must be what render writes.
GITOPS_POLICY = "gitops-manifests-match-stack"
LEVELS = ("advisory", "mandatory", "remediate", "disabled")
#: Seconds the pack may take to print its port and accept connections (it imports Pulumi and every rule).
START_TIMEOUT = 120.0
#: Seconds one analyzer call may take before the pack is taken for hung.
CALL_TIMEOUT = 600.0
_MAX_MESSAGE = 1024 * 1024 * 400  # what pulumi_policy's server accepts


class CheckError(Exception):
    """The check could not run: the pack did not start or failed, or its inputs are unusable."""


class PolicyConfigError(CheckError):
    """The policy config file does not fit the pack; one line per problem, each naming the policy."""

    def __init__(self, path: Path, problems: Sequence[str]) -> None:
        self.path = path
        self.problems = list(problems)
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"policy config {path} is invalid:\n{lines}")


@dataclass(frozen=True)
class Violation:
    """One policy violation, attached to the resource it is about (the stack itself for stack-wide ones)."""

    policy: str
    level: str
    urn: str
    type_: str
    name: str
    message: str
    description: str = ""

    @property
    def mandatory(self) -> bool:
        return self.level == "mandatory"


@dataclass(frozen=True)
class PolicyInfo:
    """A policy as `GetAnalyzerInfo` describes it."""

    name: str
    level: str
    schema: dict[str, Any] | None
    kind: str = ""  # "resource" or "stack"


@dataclass(frozen=True)
class PolicyConfig:
    """What `Configure` sends for one policy: its enforcement level and its full properties."""

    level: str
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PackRun:
    """What one run of the pack found."""

    violations: list[Violation]
    policies: dict[str, PolicyConfig]
    resources: int

    @property
    def enabled(self) -> list[str]:
        return [name for name, config in self.policies.items() if config.level != "disabled"]


@dataclass(frozen=True)
class CheckResult:
    """A whole `loopform check`: the pack's violations and the GitOps folder's."""

    violations: list[Violation]
    policies: list[str]
    resources: int
    config_path: Path

    @property
    def mandatory(self) -> int:
        return sum(1 for v in self.violations if v.mandatory)

    @property
    def advisory(self) -> int:
        return sum(1 for v in self.violations if v.level == "advisory")

    def summary(self) -> str:
        return (
            f"{self.mandatory} mandatory, {self.advisory} advisory violations from {len(self.policies)} policies "
            f"over {self.resources} resources"
        )


# --- the whole check ---------------------------------------------------------------------------------------


def check(
    stack: str,
    root: Path,
    file: Path | None = None,
    policy_config: Path | None = None,
    pack_dir: Path | None = None,
) -> CheckResult:
    """Render `stack` (from the stack file `file` if given, as `--file`), add the GitOps folder, and run the pack
    (`pack_dir`, default `<root>/policies`) over all of it with the policy config `policy_config_path` picks."""
    from loopform import render
    from loopform.spec import load_stack, read_stack_file, stack_file

    path = file or stack_file(stack, root)
    spec = load_stack(path, root)
    config_path = policy_config_path(stack, root, file, policy_config)
    resources = list(render.render_stack(stack, root, path))
    extra: list[Violation] = []
    if spec.gitops.enabled:
        folder = root / spec.gitops.path / stack
        syncer = _argocd_application(resources, stack)
        resources += manifest_resources(stack, folder, parent=syncer.urn if syncer else None)
        extra = gitops_drift(stack, root, path, syncer)
    stack_config = {
        key: value if isinstance(value, str) else json.dumps(value)
        for key, value in (read_stack_file(path).get("config") or {}).items()
    }
    run = run_pack(resources, config_path, pack_dir or root / "policies", stack, stack_config=stack_config)
    policies = run.enabled + ([GITOPS_POLICY] if spec.gitops.enabled else [])
    return CheckResult(
        violations=sort_violations(run.violations + extra),
        policies=policies,
        resources=run.resources,
        config_path=config_path,
    )


def policy_config_path(stack: str, root: Path, file: Path | None = None, given: Path | None = None) -> Path:
    """The policy config for `stack`: `given`; else the trusted keys beside a `--file` stack (the local loop's
    `<dir>/policy/<stack>.json` for `<dir>/stacks/Pulumi.<stack>.yaml`); else `policies/config/<stack>.json`."""
    if given is not None:
        if not Path(given).is_file():
            raise CheckError(f"policy config {given} does not exist")
        return Path(given)
    looked: list[Path] = []
    if file is not None:
        beside = Path(file).parent.parent / "policy" / f"{stack}.json"
        if beside.is_file():
            return beside
        looked.append(beside)
    default = root / "policies" / "config" / f"{stack}.json"
    if default.is_file():
        return default
    looked.append(default)
    raise CheckError(
        f"no policy config for stack {stack}: looked for {' and '.join(map(str, looked))}; "
        "write one or pass --policy-config PATH"
    )


def format_violations(violations: Sequence[Violation]) -> list[str]:
    """One line per violation, `LEVEL  policy  type name  message`, in aligned columns."""
    rows = [(v.level, v.policy, f"{v.type_} {v.name}", " ".join(v.message.split())) for v in violations]
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return ["  ".join([*(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)), row[3]]) for row in rows]


def sort_violations(violations: Iterable[Violation]) -> list[Violation]:
    return sorted(violations, key=lambda v: (not v.mandatory, v.policy, v.type_, v.name, v.message))


# --- the GitOps folder -------------------------------------------------------------------------------------


def manifest_type(manifest: Mapping[str, Any]) -> str:
    """The pulumi-kubernetes type token of a manifest: `kubernetes:apps/v1:Deployment`, `kubernetes:core/v1:Service`."""
    api_version = str(manifest["apiVersion"])
    group_version = api_version if "/" in api_version else f"core/{api_version}"
    return f"kubernetes:{group_version}:{manifest['kind']}"


def manifest_urn(stack: str, type_: str, name: str) -> str:
    """A URN marking an object Argo CD applies (not Pulumi): `...::argocd$<type>::<name>`."""
    return f"urn:pulumi:{stack}::{PROJECT}::argocd${type_}::{name}"


def manifest_resources(stack: str, folder: Path, parent: str | None = None) -> list[RenderedResource]:
    """Every Kubernetes object in the YAML/JSON files Argo CD syncs from `folder`, as a resource for the pack."""
    resources: list[RenderedResource] = []
    if not folder.is_dir():
        return resources
    for file in sorted(folder.iterdir()):
        if not file.is_file() or file.suffix not in (".yaml", ".yml", ".json"):
            continue
        try:
            documents = list(yaml.safe_load_all(file.read_text()))
        except yaml.YAMLError as error:
            raise CheckError(f"{file} is not valid YAML: {error}") from None
        for document in documents:
            if not isinstance(document, dict) or "apiVersion" not in document or "kind" not in document:
                continue
            type_ = manifest_type(document)
            name = str((document.get("metadata") or {}).get("name") or file.stem)
            resources.append(
                RenderedResource(
                    type_=type_,
                    name=name,
                    urn=manifest_urn(stack, type_, name),
                    parent=parent or root_urn(stack),
                    custom=True,
                    inputs=_jsonable(document),
                )
            )
    return resources


def gitops_drift(
    stack: str, root: Path, path: Path | None = None, syncer: RenderedResource | None = None
) -> list[Violation]:
    """One mandatory violation per file of `<gitops.path>/<stack>/` that is not what `render.write_services`
    writes from the stack file: differing, missing or extra (dot files aside)."""
    from loopform.render import write_services
    from loopform.spec import load_stack, stack_file

    spec = load_stack(path or stack_file(stack, root), root)
    folder = root / spec.gitops.path / stack
    with tempfile.TemporaryDirectory(prefix="loopform-check-") as tmp:
        write_services(stack, root, Path(tmp), path)
        expected = _files(Path(tmp))
    actual = _files(folder)
    shown = _shown(folder, root)
    problems = []
    for name in sorted(set(expected) | set(actual)):
        if name not in actual:
            problems.append(f"{shown}/{name} is missing: `loopform render --stack {stack}` writes it")
        elif name not in expected:
            problems.append(f"{shown}/{name} is extra: `loopform render --stack {stack}` does not write it")
        elif actual[name] != expected[name]:
            problems.append(f"{shown}/{name} differs from what `loopform render --stack {stack}` writes")
    type_, name, urn = (
        (syncer.type_, syncer.name, syncer.urn)
        if syncer
        else ("pulumi:pulumi:Stack", root_name(stack), root_urn(stack))
    )
    description = f"{shown}/ (synced by Argo CD) holds exactly what `loopform render` writes from the stack file."
    return [
        Violation(GITOPS_POLICY, "mandatory", urn, type_, name, problem, description=description)
        for problem in problems
    ]


def _files(folder: Path) -> dict[str, bytes]:
    if not folder.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")}


def _shown(folder: Path, root: Path) -> str:
    try:
        return str(folder.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(folder)


def _argocd_application(resources: Iterable[RenderedResource], stack: str) -> RenderedResource | None:
    from components.gitops import application_name

    return next(
        (
            resource
            for resource in resources
            if resource.type_.startswith("kubernetes:argoproj.io/")
            and resource.kind == "Application"
            and (resource.inputs.get("metadata") or {}).get("name") == application_name(stack)
        ),
        None,
    )


def _jsonable(value: Any) -> Any:
    """YAML data as JSON data: dates and other scalars YAML may produce become strings."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


# --- policy config, as the Pulumi CLI reconciles it --------------------------------------------------------


def read_policy_config(path: Path) -> dict[str, Any]:
    """The policy config file: a JSON object of policy name (or "all") to a level or an object."""
    try:
        data = json.loads(Path(path).read_text() or "{}")
    except json.JSONDecodeError as error:
        raise CheckError(f"policy config {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise PolicyConfigError(path, ["the file must hold a JSON object of policy name to config"])
    return data


def reconcile_config(
    policies: Sequence[PolicyInfo],
    given: Mapping[str, Any],
    initial: Mapping[str, PolicyConfig] | None = None,
    path: Path = Path("<policy config>"),
) -> dict[str, PolicyConfig]:
    """Every policy's level and properties, as the CLI computes them before `Configure`.

    Level: the policy's entry, else "all", else the policy's own (pack default). Properties: schema defaults,
    then the pack's initial config, then the file. Refused (PolicyConfigError, every problem listed with its
    policy's name): an unknown policy name, a bad enforcement level, properties that fail the policy's schema,
    and, stricter than the CLI, properties the schema does not declare (a misspelt key would otherwise leave the
    default silently in force).
    """
    known = {policy.name: policy for policy in policies}
    problems: list[str] = []
    parsed: dict[str, tuple[str | None, dict[str, Any]]] = {}
    for key, value in given.items():
        level, props = _parse_entry(key, value, problems)
        if key == "all":
            if props:
                problems.append(f"all: only an enforcement level applies to all policies (got {', '.join(props)})")
        elif key not in known:
            problems.append(f"{key}: no such policy in the pack (policies: {', '.join(sorted(known))})")
        parsed[key] = (level, props)

    result = {policy.name: PolicyConfig(policy.level, _schema_defaults(policy.schema)) for policy in policies}
    for layer in (
        {k: (c.level, c.properties) for k, c in (initial or {}).items()},
        parsed,
    ):
        everyone = layer.get("all", (None, {}))[0]
        if everyone:
            result = {name: PolicyConfig(everyone, config.properties) for name, config in result.items()}
        for name, (level, props) in layer.items():
            if name == "all" or name not in result:
                continue
            current = result[name]
            result[name] = PolicyConfig(level or current.level, {**current.properties, **props})

    for policy in policies:
        problems += _validate(policy, result[policy.name].properties)
    if problems:
        raise PolicyConfigError(path, problems)
    return result


def _parse_entry(key: str, value: Any, problems: list[str]) -> tuple[str | None, dict[str, Any]]:
    if isinstance(value, str):
        if value not in LEVELS:
            problems.append(f"{key}: {value!r} is not an enforcement level ({', '.join(LEVELS)})")
            return None, {}
        return value, {}
    if isinstance(value, dict):
        props = dict(value)
        level = props.pop("enforcementLevel", None)
        if level is not None and level not in LEVELS:
            problems.append(f"{key}: enforcementLevel {level!r} is not an enforcement level ({', '.join(LEVELS)})")
            level = None
        return level, props
    problems.append(f"{key}: {value!r} is neither an enforcement level nor an object")
    return None, {}


def _schema_defaults(schema: Mapping[str, Any] | None) -> dict[str, Any]:
    properties = (schema or {}).get("properties") or {}
    return {key: prop["default"] for key, prop in properties.items() if isinstance(prop, dict) and "default" in prop}


def _validate(policy: PolicyInfo, props: Mapping[str, Any]) -> list[str]:
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - installed with the project
        raise CheckError("validating policy config needs jsonschema: pip install jsonschema") from None

    if not policy.schema or not policy.schema.get("properties"):
        return [f"{policy.name}: takes no configuration (got {', '.join(sorted(props))})"] if props else []
    declared = policy.schema["properties"]
    # As the CLI builds it (pkg/resource/analyzer/config.go: convertSchema).
    schema: dict[str, Any] = {"type": "object", "properties": declared}
    if policy.schema.get("required"):
        schema["required"] = list(policy.schema["required"])
    problems = [
        f"{policy.name}: unknown property {key!r} (declared: {', '.join(sorted(declared))})"
        for key in sorted(props)
        if key not in declared
    ]
    validator = jsonschema.Draft7Validator(schema)
    for error in sorted(validator.iter_errors(dict(props)), key=lambda e: list(map(str, e.absolute_path))):
        where = "/".join(str(part) for part in error.absolute_path)
        problems.append(f"{policy.name}: {where + ': ' if where else ''}{error.message}")
    return problems


# --- the analyzer protocol ---------------------------------------------------------------------------------


def root_name(stack: str) -> str:
    return f"{PROJECT}-{stack}"


def root_urn(stack: str) -> str:
    """The stack resource's URN, as the engine names it (and as the mocks name the parent of top-level resources)."""
    return f"urn:pulumi:{stack}::{PROJECT}::pulumi:pulumi:Stack::{root_name(stack)}"


def analyze(resources: Sequence[RenderedResource], config_path: Path, pack_dir: Path, stack: str) -> list[Violation]:
    """Run the pack at `pack_dir` over `resources` with the policy config at `config_path`; its violations."""
    return run_pack(resources, config_path, pack_dir, stack).violations


def run_pack(
    resources: Sequence[RenderedResource],
    config_path: Path,
    pack_dir: Path,
    stack: str,
    *,
    stack_config: Mapping[str, str] | None = None,
    start_timeout: float = START_TIMEOUT,
) -> PackRun:
    """Start the pack as Pulumi does, configure it from `config_path`, and send it every resource.

    The stack resource (`pulumi:pulumi:Stack`) is added when `resources` lack it, as the engine registers it.
    Always stops the pack.
    """
    from google.protobuf import empty_pb2
    from pulumi.runtime.proto import analyzer_pb2

    given = read_policy_config(config_path)
    everything = _with_root(resources, stack)
    by_urn = {r.urn: r for r in everything}
    with _Pack(Path(pack_dir), stack, stack_config or {}, start_timeout) as pack:
        info = pack.call("GetAnalyzerInfo", empty_pb2.Empty())
        policies = [_policy_info(p) for p in info.policies]
        # As the CLI reads it: proto3 enums have no "unset", so an entry's level is always taken (0 is advisory).
        initial = {
            name: PolicyConfig(_level_name(c.enforcementLevel), _to_dict(c.properties))
            for name, c in info.initialConfig.items()
        }
        config = reconcile_config(policies, given, initial, config_path)
        pack.call("Configure", _configure_request(config))
        pack.call(
            "ConfigureStack",
            analyzer_pb2.AnalyzerStackConfigureRequest(
                stack=stack, project=PROJECT, organization="organization", dry_run=True, config=dict(stack_config or {})
            ),
        )
        violations: list[Violation] = []
        for resource in everything:
            response = pack.call("Analyze", analyze_request(resource))
            # The engine keeps the URN of its request: the pack answers Analyze with an empty one.
            violations += [_violation(d, resource) for d in response.diagnostics]
        response = pack.call(
            "AnalyzeStack", analyzer_pb2.AnalyzeStackRequest(resources=[stack_resource(r) for r in everything])
        )
        root = by_urn[root_urn(stack)] if root_urn(stack) in by_urn else everything[0]
        for diagnostic in response.diagnostics:
            # As the engine: a URN the stack does not hold, or none, is the stack's own.
            violations.append(_violation(diagnostic, by_urn.get(diagnostic.urn, root)))
    return PackRun(violations=sort_violations(violations), policies=config, resources=len(everything))


def _with_root(resources: Sequence[RenderedResource], stack: str) -> list[RenderedResource]:
    urn = root_urn(stack)
    if any(r.urn == urn for r in resources):
        return list(resources)
    root = RenderedResource(
        type_="pulumi:pulumi:Stack", name=root_name(stack), urn=urn, parent=None, custom=False, inputs={}
    )
    return [root, *resources]


def to_struct(props: Mapping[str, Any]) -> Any:
    """Properties as the engine marshals them for an analyzer (plain JSON; secrets kept as secret objects,
    which the pack unwraps into `args.props`)."""
    from google.protobuf import struct_pb2

    struct = struct_pb2.Struct()
    struct.update(_jsonable(dict(props)))
    return struct


def _options(resource: RenderedResource) -> Any:
    from pulumi.runtime.proto import analyzer_pb2

    return analyzer_pb2.AnalyzerResourceOptions(
        protect=resource.protect,
        deleteBeforeReplace=resource.delete_before_replace,
        deleteBeforeReplaceDefined=resource.delete_before_replace,
        parent=resource.parent or "",
    )


def analyze_request(resource: RenderedResource) -> Any:
    from pulumi.runtime.proto import analyzer_pb2

    return analyzer_pb2.AnalyzeRequest(
        type=resource.type_,
        properties=to_struct(resource.inputs),
        urn=resource.urn,
        name=resource.name,
        options=_options(resource),
    )


def stack_resource(resource: RenderedResource) -> Any:
    from pulumi.runtime.proto import analyzer_pb2

    return analyzer_pb2.AnalyzerResource(
        type=resource.type_,
        properties=to_struct(resource.inputs),
        urn=resource.urn,
        name=resource.name,
        options=_options(resource),
        parent=resource.parent or "",
        dependencies=list(resource.dependencies),
    )


def _configure_request(config: Mapping[str, PolicyConfig]) -> Any:
    from pulumi.runtime.proto import analyzer_pb2

    request = analyzer_pb2.ConfigureAnalyzerRequest()
    for name, policy in config.items():
        entry = analyzer_pb2.PolicyConfig(enforcementLevel=_level_value(policy.level))
        if policy.properties:
            entry.properties.update(_jsonable(policy.properties))
        request.policyConfig[name].CopyFrom(entry)
    return request


def _policy_info(info: Any) -> PolicyInfo:
    from pulumi.runtime.proto import analyzer_pb2

    schema = None
    if info.HasField("configSchema") and (info.configSchema.properties or info.configSchema.required):
        schema = {"properties": _to_dict(info.configSchema.properties), "required": list(info.configSchema.required)}
    kind = {analyzer_pb2.POLICY_TYPE_RESOURCE: "resource", analyzer_pb2.POLICY_TYPE_STACK: "stack"}.get(
        info.policy_type, ""
    )
    return PolicyInfo(name=info.name, level=_level_name(info.enforcementLevel), schema=schema, kind=kind)


def _to_dict(struct: Any) -> dict[str, Any]:
    from google.protobuf import json_format

    return json_format.MessageToDict(struct)


def _level_name(value: int) -> str:
    from pulumi.runtime.proto import analyzer_pb2

    return analyzer_pb2.EnforcementLevel.Name(value).lower()


def _level_value(level: str) -> int:
    from pulumi.runtime.proto import analyzer_pb2

    return analyzer_pb2.EnforcementLevel.Value(level.upper())


def _violation(diagnostic: Any, resource: RenderedResource) -> Violation:
    level = _level_name(diagnostic.enforcementLevel)
    if level == "remediate":
        level = "mandatory"  # as the engine reports a remediation policy's remaining violation
    description = diagnostic.description
    message = diagnostic.message
    # pulumi_policy sends "<description>\n<message>"; keep the rule's own words.
    if description and message.startswith(description):
        message = message[len(description) :].lstrip("\n") or description
    return Violation(
        policy=diagnostic.policyName,
        level=level,
        urn=resource.urn,
        type_=resource.type_,
        name=resource.name,
        message=message,
        description=description,
    )


class _Pack:
    """The pack as a subprocess, started as Pulumi starts it; its analyzer stub; always stopped on exit."""

    def __init__(self, pack_dir: Path, stack: str, stack_config: Mapping[str, str], start_timeout: float) -> None:
        self.pack_dir = pack_dir.resolve()
        self.stack = stack
        self.stack_config = stack_config
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.channel: Any = None

    def __enter__(self) -> _Pack:
        import grpc
        from pulumi.runtime.proto import analyzer_pb2_grpc

        if not (self.pack_dir / "__main__.py").is_file():
            raise CheckError(f"{self.pack_dir} is not a policy pack (no __main__.py)")
        self._tmp = tempfile.TemporaryDirectory(prefix="loopform-pack-")
        self.stdout_path = Path(self._tmp.name) / "stdout"
        self.stderr_path = Path(self._tmp.name) / "stderr"
        env = {
            **os.environ,
            "PULUMI_PROJECT": PROJECT,
            "PULUMI_STACK": self.stack,
            "PULUMI_DRY_RUN": "true",
            "PULUMI_CONFIG": json.dumps(dict(self.stack_config)),
        }
        # Pulumi's pulumi-analyzer-policy-python runs `python -u -m pulumi.policy <engine> <pack>`: unbuffered,
        # or the port would sit in the pack's stdout buffer. No engine runs here, so the address is a dummy.
        argv = [sys.executable, "-u", "-m", "pulumi.policy", "127.0.0.1:0", str(self.pack_dir)]
        try:
            with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
                self.process = subprocess.Popen(
                    argv, cwd=self.pack_dir, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env
                )
            port = self._port()
            self.channel = grpc.insecure_channel(
                f"127.0.0.1:{port}",
                options=[("grpc.max_receive_message_length", _MAX_MESSAGE), ("grpc.max_send_message_length", -1)],
            )
            try:
                grpc.channel_ready_future(self.channel).result(timeout=self.start_timeout)
            except grpc.FutureTimeoutError:
                raise CheckError(self._failure(f"accepted no connection on port {port}")) from None
            self.stub = analyzer_pb2_grpc.AnalyzerStub(self.channel)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _port(self) -> int:
        assert self.process is not None
        deadline = time.monotonic() + self.start_timeout
        while True:
            first = self.stdout_path.read_bytes().split(b"\n", 1)
            if len(first) == 2:
                try:
                    return int(first[0].strip())
                except ValueError:
                    raise CheckError(self._failure(f"printed {first[0][:200]!r} instead of its port")) from None
            if self.process.poll() is not None:
                raise CheckError(
                    self._failure(f"exited with status {self.process.returncode} before it printed its port")
                )
            if time.monotonic() > deadline:
                raise CheckError(self._failure(f"printed no port within {self.start_timeout:g} s"))
            time.sleep(0.02)

    def _stderr(self) -> str:
        try:
            text = self.stderr_path.read_text(errors="replace").strip()
        except OSError:
            return ""
        return text[-6000:]

    def _failure(self, what: str) -> str:
        stderr = self._stderr()
        return f"policy pack {self.pack_dir} {what}" + (f"; its stderr:\n{stderr}" if stderr else " (no stderr)")

    def call(self, method: str, request: Any) -> Any:
        import grpc

        try:
            return getattr(self.stub, method)(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as error:
            details = error.details() if hasattr(error, "details") else str(error)
            raise CheckError(self._failure(f"failed in {method}: {details}")) from None

    def __exit__(self, *exc: object) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            self.process = None
        if getattr(self, "_tmp", None) is not None:
            self._tmp.cleanup()
            self._tmp = None
