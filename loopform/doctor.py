"""`loopform doctor`: check a stack's cluster prerequisites against the live cluster.

Reads the prerequisites from the spec (`loopform.prerequisites`), connects with the user's
kubeconfig through the official Kubernetes client (so EKS's `aws eks get-token` exec plugin
works), and GETs each object the platform needs but does not create. Cloud-account and
Pulumi-config items are listed with the command that checks or creates them. Read-only:
nothing is written to the cluster or to the kubeconfig.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from loopform.prerequisites import DEFAULT_STORAGE_CLASS, Prerequisite, prerequisites
from loopform.spec import PlatformSpec

#: (connect, read) seconds of each request: a preflight should fail fast on an unreachable server.
REQUEST_TIMEOUT = (10, 30)
DEFAULT_CLASS_ANNOTATIONS = (
    "storageclass.kubernetes.io/is-default-class",
    "storageclass.beta.kubernetes.io/is-default-class",  # still honoured by the DefaultStorageClass admission
)
#: In-tree volume plugins that Kubernetes migrates to a CSI driver (csi-translation-lib); their
#: in-tree code is gone, so a StorageClass naming them provisions nothing without that driver.
MIGRATED_TO_CSI = {
    "kubernetes.io/aws-ebs": "ebs.csi.aws.com",
    "kubernetes.io/gce-pd": "pd.csi.storage.gke.io",
    "kubernetes.io/azure-disk": "disk.csi.azure.com",
    "kubernetes.io/azure-file": "file.csi.azure.com",
    "kubernetes.io/cinder": "cinder.csi.openstack.org",
    "kubernetes.io/vsphere-volume": "csi.vsphere.vmware.com",
}
EBS_CSI_DRIVER = "ebs.csi.aws.com"
EBS_CSI_FIX = "aws eks create-addon --cluster-name <cluster> --addon-name aws-ebs-csi-driver"

Status = Literal["ok", "missing", "not checked"]


class DoctorError(Exception):
    """The cluster cannot be checked at all (kubeconfig, connection, credentials): exit 2."""


@dataclass(frozen=True)
class Result:
    """The outcome of one prerequisite: its status, why it failed and the command that fixes it."""

    item: Prerequisite
    status: Status
    reason: str = ""
    fix: str = ""

    @property
    def label(self) -> str:
        if self.status == "not checked":
            return f"not checked ({self.item.checked_in})"
        return "MISSING" if self.status == "missing" else "ok"

    def line(self) -> str:
        where = f"{self.item.namespace}/" if self.item.namespace else ""
        text = f"{self.label:<21}{self.item.kind} {where}{self.item.name}"
        if self.status == "missing":
            text += f": {self.reason} (needed for: {self.item.why})"
        if self.status != "ok":
            text += f"; fix: {self.fix or self.item.fix}"
        return text


class Cluster:
    """Raw, read-only GETs against one kubeconfig context's API server."""

    def __init__(self, api: Any, context: str, kubeconfig: str) -> None:
        self.api = api
        self.context = context
        self.kubeconfig = kubeconfig
        self.version = "unknown version"

    @property
    def server(self) -> str:
        return str(self.api.configuration.host)

    def get(self, path: str) -> dict[str, Any] | None:
        """The object at `path`, or None where the server answers 404."""
        import urllib3
        from kubernetes.client.exceptions import ApiException

        method, url, headers, _, _ = self.api.param_serialize(
            "GET", path, header_params={"Accept": "application/json"}, auth_settings=["BearerToken"]
        )
        try:
            response = self.api.call_api(method, url, headers, _request_timeout=REQUEST_TIMEOUT)
            body = response.read()
        except (urllib3.exceptions.HTTPError, ApiException) as error:
            raise DoctorError(
                f"context {self.context}: cannot reach the API server {self.server} ({_reason(error)}); "
                f"check the network path to the cluster and the server address in {self.kubeconfig}"
            ) from None
        if response.status == 404:
            return None
        if response.status in (401, 403):
            raise DoctorError(self._refused(path, response.status, body))
        if not 200 <= response.status < 300:
            raise DoctorError(
                f"context {self.context}: the API server {self.server} answered GET {path} with "
                f"HTTP {response.status}: {_message(body)}"
            )
        try:
            data = json.loads(body)
        except ValueError:
            raise DoctorError(
                f"context {self.context}: {self.server} answered GET {path} with no JSON "
                f"(is it a Kubernetes API server?): {body[:80]!r}"
            ) from None
        if not isinstance(data, dict):
            raise DoctorError(f"context {self.context}: {self.server} answered GET {path} with {type(data).__name__}")
        return data

    def _refused(self, path: str, status: int, body: bytes) -> str:
        if status == 401:
            return (
                f"context {self.context}: the API server {self.server} refused the credentials (401 Unauthorized: "
                f"{_message(body)}); refresh them (on EKS: aws eks update-kubeconfig --name <cluster>, and check "
                "that `aws eks get-token` runs with your AWS credentials)"
            )
        return (
            f"context {self.context}: the API server {self.server} forbids GET {path} (403 Forbidden: "
            f"{_message(body)}); doctor needs read access to CRDs, APIServices, StorageClasses, CSIDrivers, "
            "Namespaces and DaemonSets (on EKS: an access entry with a view policy)"
        )


def kubeconfig_path(flag: str | None = None) -> str:
    """--kubeconfig, else $KUBECONFIG (which may list several files), else ~/.kube/config."""
    return flag or os.environ.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())


def connect(kubeconfig: str, context: str | None) -> Cluster:
    """A client of the kubeconfig's context (None: its current context) whose server answers /version."""
    from kubernetes import client, config

    if not any(Path(part).expanduser().exists() for part in kubeconfig.split(os.pathsep) if part):
        raise DoctorError(
            f"kubeconfig {kubeconfig} not found: pass --kubeconfig or set KUBECONFIG "
            "(on EKS: aws eks update-kubeconfig --name <cluster> writes ~/.kube/config)"
        )
    try:
        contexts, current = config.list_kube_config_contexts(config_file=kubeconfig)
    except (config.ConfigException, OSError, ValueError) as error:
        raise DoctorError(f"cannot read kubeconfig {kubeconfig}: {error}") from None
    names = [entry["name"] for entry in contexts or []]
    chosen = context or (current or {}).get("name")
    if not chosen:
        raise DoctorError(
            f"kubeconfig {kubeconfig} has no current context: pass --context or set cluster.kube_context "
            f"(contexts there: {', '.join(names) or 'none'})"
        )
    if chosen not in names:
        raise DoctorError(
            f"context {chosen} is not in kubeconfig {kubeconfig} (contexts there: {', '.join(names) or 'none'}); "
            f"on EKS: aws eks update-kubeconfig --name <cluster> --alias {chosen}"
        )
    configuration = client.Configuration()
    configuration.retries = 1
    try:
        api = config.new_client_from_config(
            config_file=kubeconfig, context=chosen, persist_config=False, client_configuration=configuration
        )
    except (config.ConfigException, OSError, ValueError) as error:
        raise DoctorError(f"context {chosen} of kubeconfig {kubeconfig} cannot be used: {error}") from None
    cluster = Cluster(api, chosen, kubeconfig)
    version = cluster.get("/version")
    if version is None:
        raise DoctorError(f"context {chosen}: {cluster.server} answered GET /version with 404: not a Kubernetes API")
    cluster.version = str(version.get("gitVersion") or cluster.version)
    return cluster


def check(cluster: Cluster, item: Prerequisite) -> Result:
    """One cluster prerequisite against the API server."""
    checks: dict[str, Callable[[Cluster, Prerequisite], Result]] = {
        "crd": _crd,
        "api-service": _api_service,
        "storage-class": _storage_class,
        "namespace": _namespace,
        "daemonset": _daemonset,
    }
    return checks[item.kind](cluster, item)


def check_all(spec: PlatformSpec, cluster: Cluster) -> list[Result]:
    """Every prerequisite: the cluster ones checked, the AWS and Pulumi ones listed with their command."""
    return [
        check(cluster, item) if item.checked_in == "cluster" else Result(item, "not checked")
        for item in prerequisites(spec)
    ]


def summary(results: list[Result]) -> str:
    counts = {status: sum(1 for r in results if r.status == status) for status in ("ok", "missing", "not checked")}
    return f"{counts['ok']} ok, {counts['missing']} missing, {counts['not checked']} not checked here"


def doctor(spec: PlatformSpec, *, kubeconfig: str | None = None, context: str | None = None) -> int:
    """Print one line per prerequisite and a summary; 0 when no cluster check failed, 1 when one did.

    Raises DoctorError when the cluster cannot be checked at all.
    """
    if not prerequisites(spec):
        print(f"Stack {spec.environment}: no prerequisites (it runs no cluster objects).")
        return 0
    path = kubeconfig_path(kubeconfig)
    cluster = connect(path, context or spec.cluster.kube_context)
    print(
        f"Stack {spec.environment}: context {cluster.context}, server {cluster.server} (Kubernetes {cluster.version})"
    )
    results = check_all(spec, cluster)
    order = {"cluster": 0, "aws": 1, "pulumi": 2}
    results.sort(key=lambda r: order[r.item.checked_in])  # what was checked first, then what was not
    for result in results:
        print(result.line())
    print(summary(results))
    return 1 if any(r.status == "missing" for r in results) else 0


# --- checks by kind ------------------------------------------------------------------------------


def _condition(obj: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return condition
    return None


def _condition_result(item: Prerequisite, obj: dict[str, Any] | None, kind: str, what: str) -> Result:
    if obj is None:
        return Result(item, "missing", f"{what} not found")
    condition = _condition(obj, kind)
    if condition is None:
        return Result(item, "missing", f"{what} has no {kind} condition yet")
    if condition.get("status") != "True":
        detail = ": ".join(str(part) for part in (condition.get("reason"), condition.get("message")) if part)
        return Result(item, "missing", f"{what} is not {kind} ({kind}={condition.get('status')}: {detail or '-'})")
    return Result(item, "ok")


def _crd(cluster: Cluster, item: Prerequisite) -> Result:
    obj = cluster.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{item.name}")
    return _condition_result(item, obj, "Established", "CustomResourceDefinition")


def _api_service(cluster: Cluster, item: Prerequisite) -> Result:
    obj = cluster.get(f"/apis/apiregistration.k8s.io/v1/apiservices/{item.name}")
    return _condition_result(item, obj, "Available", "APIService")


def _is_default(storage_class: dict[str, Any]) -> bool:
    annotations = (storage_class.get("metadata") or {}).get("annotations") or {}
    return any(annotations.get(key) == "true" for key in DEFAULT_CLASS_ANNOTATIONS)


def _storage_class(cluster: Cluster, item: Prerequisite) -> Result:
    if item.name == DEFAULT_STORAGE_CLASS:
        listed = cluster.get("/apis/storage.k8s.io/v1/storageclasses") or {}
        defaults = [sc for sc in listed.get("items") or [] if _is_default(sc)]
        if not defaults:
            return Result(item, "missing", "no StorageClass is annotated storageclass.kubernetes.io/is-default-class")
        # With several defaults, the admission plugin picks the newest.
        chosen = max(defaults, key=lambda sc: (sc.get("metadata") or {}).get("creationTimestamp") or "")
    else:
        found = cluster.get(f"/apis/storage.k8s.io/v1/storageclasses/{item.name}")
        if found is None:
            return Result(item, "missing", f"StorageClass {item.name} not found")
        chosen = found
    name = (chosen.get("metadata") or {}).get("name")
    if chosen.get("allowVolumeExpansion") is not True:  # volumes are grown in place (README, day two)
        fix = f"kubectl patch storageclass {name} -p '{{\"allowVolumeExpansion\": true}}'"
        return Result(item, "missing", f"StorageClass {name} does not allow volume expansion", fix)
    provisioner = str(chosen.get("provisioner") or "")
    driver = MIGRATED_TO_CSI.get(provisioner, provisioner)
    if driver.startswith("kubernetes.io/"):
        return Result(item, "ok")  # an in-tree provisioner without a CSI driver (e.g. kubernetes.io/no-provisioner)
    if cluster.get(f"/apis/storage.k8s.io/v1/csidrivers/{driver}") is not None:
        return Result(item, "ok")
    via = f" (migrated to CSI driver {driver})" if driver != provisioner else ""
    fix = EBS_CSI_FIX if driver == EBS_CSI_DRIVER else f"install the CSI driver {driver}"
    return Result(
        item, "missing", f"StorageClass {name}: provisioner {provisioner}{via} has no CSI driver installed", fix
    )


def _namespace(cluster: Cluster, item: Prerequisite) -> Result:
    obj = cluster.get(f"/api/v1/namespaces/{item.name}")
    if obj is None:
        return Result(item, "missing", "Namespace not found")
    if (obj.get("status") or {}).get("phase") == "Terminating":
        return Result(item, "missing", "Namespace is being deleted (phase Terminating)")
    return Result(item, "ok")


def _daemonset(cluster: Cluster, item: Prerequisite) -> Result:
    obj = cluster.get(f"/apis/apps/v1/namespaces/{item.namespace}/daemonsets/{item.name}")
    if obj is None:
        return Result(item, "missing", "DaemonSet not found")
    status = obj.get("status") or {}
    if int(status.get("numberAvailable") or 0) <= 0:
        return Result(
            item,
            "missing",
            f"DaemonSet has no available pod ({int(status.get('numberReady') or 0)} ready of "
            f"{int(status.get('desiredNumberScheduled') or 0)} scheduled)",
        )
    return Result(item, "ok")


# --- error text ----------------------------------------------------------------------------------


def _reason(error: BaseException) -> str:
    """The underlying reason of a connection failure, without urllib3's object and retry wrappers."""
    reason = getattr(error, "reason", None)
    if isinstance(reason, BaseException):
        error = reason
    text = (reason if isinstance(reason, str) else str(error)).strip() or type(error).__name__
    return re.sub(r"^\w+\([^)]*\): ", "", text).replace("\n", ": ")


def _message(body: bytes) -> str:
    """The `message` of a Kubernetes Status body, else the start of the body."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])
    return body[:200].decode("utf-8", "replace").strip() or "no body"
