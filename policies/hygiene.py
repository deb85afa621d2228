"""Configuration hygiene: no credentials in plain configuration, and Helm charts at exact versions.

A ConfigMap, a container's plain `env[].value` and Helm chart values are readable by anyone who may
read the object, land in `pulumi preview` diffs and the stack's state, and are never rotated with
the Secret they should have been. Credentials are recognised by their names (password, token, API
key, ...) and by their shape (a URL with user:password@, `password=` in a connection string, an AWS access
key id, a PEM private key).
A name that refers to a credential rather than holding one (`existingSecret`, `secretName`,
`passwordKey`, `tokenFile`) is not one, nor is a placeholder (`${PASSWORD}`, `<password>`, `pass`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from policies.core import Config, Props, ResourceRule
from policies.workloads import CHART_TYPES, WORKLOAD_TYPES, containers, items, mapping, unwrap_secrets

CONFIG_MAP = "kubernetes:core/v1:ConfigMap"
CREDENTIAL_NAME = re.compile(r"password|passwd|secret|token|api[_-]?key|private[_-]?key|access[_-]?key", re.IGNORECASE)
#: Names that point at a credential (a Secret's name, a key in it, a file) or digest one (a checksum annotation that
#: rolls pods when it rotates) rather than hold one.
REFERENCE_NAME = re.compile(
    r"(^existing|name$|ref$|key$|keys$|file$|path$|dir$|url$|uri$|endpoint$|type$|enabled$|create$|policy$|ttl$"
    r"|seconds$|timeout$|length$|checksum$)",
    re.IGNORECASE,
)
#: ... but these hold one although they end like a reference (`apiKey`, `AWS_SECRET_ACCESS_KEY`).
CREDENTIAL_KEY_NAME = re.compile(r"(api|private|access|secret)[_-]?key$", re.IGNORECASE)
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/:@]+:(?P<password>[^\s/@]+)@", re.IGNORECASE)
PLACEHOLDER = re.compile(
    r"^(\$\{?[a-z_][a-z0-9_]*\}?|<[^>]*>|\{\{?[^}]*\}?\}|\*+|x+|\.\.\.|pass|password|passwd|pwd|secret)$",
    re.IGNORECASE,
)
#: `password=...` in a connection string (libpq, ODBC, redis-py's as Feast writes it).
CONNECTION_PASSWORD = re.compile(r"(?:^|[\s,;?&])(?:password|pwd)=(?P<password>[^\s,;&]+)", re.IGNORECASE)
AWS_ACCESS_KEY_ID = re.compile(r"\bAKIA[0-9A-Z]{16}\b")
PEM_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")


def credential_name(name: str, allowed: frozenset[str]) -> bool:
    """`name` says it holds a credential (and is not a reference to one, nor exempt in config)."""
    if name in allowed or not CREDENTIAL_NAME.search(name):
        return False
    return bool(CREDENTIAL_KEY_NAME.search(name)) or not REFERENCE_NAME.search(name)


def credential_in(value: str) -> str | None:
    """What credential the text holds, if any."""
    for pattern, what in (
        (URL_WITH_PASSWORD, "a URL with a password"),
        (CONNECTION_PASSWORD, "a connection string password"),
    ):
        if any(not PLACEHOLDER.match(match["password"]) for match in pattern.finditer(value)):
            return what
    if AWS_ACCESS_KEY_ID.search(value):
        return "an AWS access key id"
    if PEM_PRIVATE_KEY.search(value):
        return "a PEM private key"
    return None


def _literal(value: Any) -> bool:
    return isinstance(value, str | int | float) and not isinstance(value, bool) and str(value).strip() != ""


def _config_map(props: Mapping[str, Any], allowed: frozenset[str]) -> list[str]:
    found = []
    for field in ("data", "binaryData"):
        for key, value in mapping(props.get(field)).items():
            if credential_name(str(key), allowed) and _literal(value):
                found.append(f"{field} key {key} holds a value and names a credential (put it in a Secret)")
            elif isinstance(value, str) and field == "data" and (what := credential_in(value)):
                found.append(f"{field} key {key} holds {what} (put it in a Secret)")
    return found


def _env(type_: str, props: Props, allowed: frozenset[str]) -> list[str]:
    found = []
    for container in containers(type_, props):
        for variable in map(mapping, items(container.spec.get("env"))):
            name, value = str(variable.get("name", "?")), variable.get("value")
            if not _literal(value):
                continue
            if credential_name(name, allowed):
                found.append(
                    f"{container.where}: env {name} has a literal value and names a credential "
                    "(use valueFrom.secretKeyRef)"
                )
            elif what := credential_in(str(value)):
                found.append(f"{container.where}: env {name} holds {what} (use valueFrom.secretKeyRef)")
    return found


def _values(values: Any, allowed: frozenset[str], path: str) -> Iterator[str]:
    """Literal credentials in chart values: credential keys, env-style name/value pairs, credential-shaped text."""
    if isinstance(values, Mapping):
        name = values.get("name")
        if isinstance(name, str) and credential_name(name, allowed) and _literal(values.get("value")):
            yield f"{path}: {name} has a literal value and names a credential (use an existing Secret)"
        for key, value in values.items():
            where = f"{path}.{key}"
            if credential_name(str(key), allowed) and _literal(value):
                yield f"{where} is a literal credential (use an existing Secret)"
            else:
                yield from _values(value, allowed, where)
    elif isinstance(values, list):
        for index, value in enumerate(values):
            yield from _values(value, allowed, f"{path}[{index}]")
    elif isinstance(values, str) and (what := credential_in(values)):
        yield f"{path} holds {what} (use an existing Secret)"


def check_no_secrets_in_config(type_: str, props: Props, config: Config) -> list[str]:
    """Credentials belong in Secrets: not in ConfigMaps, plain env values or chart values."""
    allowed = frozenset(str(name) for name in config["allowed_names"])
    props = unwrap_secrets(props)
    if type_ == CONFIG_MAP:
        return _config_map(props, allowed)
    if type_ in CHART_TYPES:
        return list(_values(props.get("values"), allowed, f"chart {props.get('chart', '?')} values"))
    return _env(type_, props, allowed)


# --- helm-charts-pinned ----------------------------------------------------------------------------------

EXACT_VERSION = re.compile(r"^v?(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$")
LOCAL_CHART = ("./", "../", "/", "file://")


def check_helm_charts_pinned(type_: str, props: Props, config: Config) -> list[str]:
    """A chart from a repository at an exact version (no range): the same chart, and its images, on every run.

    A chart from a local path is pinned by the repository it lives in.
    """
    props = unwrap_secrets(props)
    chart = str(props.get("chart") or "?")
    if chart.startswith(LOCAL_CHART):
        return []
    version = props.get("version")
    if not version:
        return [f"chart {chart}: no version (Helm would take the newest; an exact version like 1.2.3 required)"]
    if not EXACT_VERSION.match(str(version)):
        return [f"chart {chart}: version {version} is not an exact version (no ranges or wildcards; e.g. 1.2.3)"]
    return []


RULES = [
    ResourceRule(
        name="no-secrets-in-config",
        description="No credentials in ConfigMaps, in containers' plain env values or in Helm chart values: by "
        "name (password, secret, token, API/private/access key) or by shape (URL with a password, AWS access "
        "key id, PEM private key).",
        check=check_no_secrets_in_config,
        types=frozenset({CONFIG_MAP}) | WORKLOAD_TYPES | CHART_TYPES,
        config={
            "allowed_names": {
                "type": "array",
                "items": {"type": "string"},
                "default": [],
                "description": "Exact keys or variable names that look like credentials but are not (reasoned "
                "exceptions).",
            }
        },
    ),
    ResourceRule(
        name="helm-charts-pinned",
        description="Every Helm chart (helm.sh/v4 Chart, v3 Chart, v3 Release) has an exact semantic version.",
        check=check_helm_charts_pinned,
        types=CHART_TYPES,
    ),
]
