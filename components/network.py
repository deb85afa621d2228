"""Network isolation: every namespace the platform creates denies all traffic, then allows what each part needs.

Kubernetes lets every pod reach every other pod until a NetworkPolicy selects it; a compromised pod could
then reach the databases, the Argo CD repo-server or the API of any service. So each namespace gets a
`default-deny` policy (ingress and egress, all pods) and a small set of allow rules, each named for what it
lets through:

- every pod: DNS (kube-system's CoreDNS, port 53);
- platform: MLflow from pipelines, serving and monitoring; the Feast server from pipelines and serving;
  Redis and PostgreSQL from the platform, pipelines and serving (Feast's SQL registry and online store);
  inside the namespace (MLflow -> PostgreSQL, Feast jobs -> Redis);
- pipelines, serving, monitoring, platform: the object store and the Kubernetes API (HTTPS: 443, and 6443
  where the API server listens there), and the managed databases' ports when the spec names external ones;
- pipelines, serving, monitoring -> the platform's servers; monitoring inside itself (Pushgateway, Argo
  Events' EventBus, EventSource and Sensors, kube-prometheus-stack when installed);
- Prometheus (in `monitoring.prometheus_namespace`) scrapes every namespace; when it runs in the platform's
  monitoring namespace, that namespace may reach every namespace;
- model services: their port from any namespace (their callers), behind their own authentication;
- gitops: Argo CD's own policies, switched on through its chart values (`global.networkPolicy`), plus
  egress to Git (HTTPS and SSH) and the API server.

A CNI that enforces NetworkPolicy (Calico, Cilium, the VPC CNI with its network policy agent) is a
prerequisite; without one these objects are accepted and change nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from components import common

DNS_PORT = 53
#: HTTPS (object stores, the Kubernetes API on managed clusters) and the API server's own port elsewhere.
HTTPS_PORTS = (443, 6443)
#: Git over HTTPS and SSH, for Argo CD's repo-server.
GIT_PORTS = (443, 22)
NAMESPACE_LABEL = "kubernetes.io/metadata.name"


def _namespace(name: str) -> dict[str, Any]:
    """A peer: every pod of namespace `name` (the label the API server sets on every namespace)."""
    return {"namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: name}}}


def _pods(component: str, namespace: str | None = None) -> dict[str, Any]:
    """A peer: the pods of one component (`app.kubernetes.io/name`), in `namespace` or the policy's own."""
    peer: dict[str, Any] = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": component}}}
    if namespace:
        peer.update(_namespace(namespace))
    return peer


def _ports(ports: Sequence[int], protocol: str = "TCP") -> list[dict[str, Any]]:
    return [{"port": port, "protocol": protocol} for port in ports]


_EVERYWHERE = {"ipBlock": {"cidr": "0.0.0.0/0"}}


@dataclass(frozen=True, kw_only=True)
class NetworkPoliciesArgs:
    """Inputs of the platform's NetworkPolicies; every value comes from the stack spec."""

    namespaces: Mapping[str, str]
    """Role -> namespace of every namespace the platform creates (spec.cluster.namespaces)."""
    registry_port: int
    """MLflow's Service port (registry.port)."""
    feature_server_port: int
    """The Feast server's port (feature_store.server.port)."""
    serving_ports: Sequence[int]
    """The model services' ports (each model's serving.port)."""
    prometheus_namespace: str | None = None
    """Where Prometheus and Alertmanager run (Prometheus scrapes every namespace, Alertmanager posts to the
    retraining webhook); None: no Prometheus Operator, no such rules."""
    external_ports: Sequence[int] = ()
    """Ports of managed services outside the cluster the platform, pipelines and services reach (PostgreSQL,
    Redis), besides HTTPS."""
    labels: dict[str, str] = field(default_factory=dict)


def _policy(
    name: str, namespace: str, labels: dict[str, str], pods: dict[str, Any], spec: dict[str, Any]
) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": common.metadata(name, namespace, common.labels("network-policy", name, labels)),
        "spec": {"podSelector": pods, **spec},
    }


def _egress(to: list[dict[str, Any]], ports: Sequence[int] | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"to": to}
    if ports:
        rule["ports"] = _ports(ports)
    return rule


def policy_manifests(args: NetworkPoliciesArgs) -> list[dict[str, Any]]:
    """Every NetworkPolicy of the platform, by namespace: the default deny first, then the allow rules."""
    ns = args.namespaces
    platform, pipelines, serving, monitoring = ns["platform"], ns["pipelines"], ns["serving"], ns["monitoring"]
    everyone: dict[str, Any] = {}
    manifests: list[dict[str, Any]] = []

    def add(name: str, namespace: str, pods: dict[str, Any], **spec: Any) -> None:
        manifests.append(_policy(name, namespace, args.labels, pods, spec))

    dns = _egress(
        [{**_namespace("kube-system"), "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
    )
    dns["ports"] = [*_ports([DNS_PORT], "UDP"), *_ports([DNS_PORT])]
    outside = [*HTTPS_PORTS, *args.external_ports]
    for role, namespace in sorted(ns.items()):
        add("default-deny", namespace, everyone, policyTypes=["Ingress", "Egress"])
        add("allow-dns", namespace, everyone, policyTypes=["Egress"], egress=[dns])
        if args.prometheus_namespace is not None:
            add(
                "allow-prometheus-scrapes",
                namespace,
                everyone,
                policyTypes=["Ingress"],
                ingress=[{"from": [_pods("prometheus", args.prometheus_namespace)]}],
            )
        if role == "gitops":
            # Argo CD's own chart policies narrow ingress per component; this lets its pods reach Git.
            add(
                "allow-git-and-api",
                namespace,
                everyone,
                policyTypes=["Egress"],
                egress=[_egress([_EVERYWHERE], sorted({*GIT_PORTS, *HTTPS_PORTS}))],
            )
            add(
                "allow-same-namespace",
                namespace,
                everyone,
                policyTypes=["Ingress", "Egress"],
                ingress=[{"from": [{"podSelector": {}}]}],
                egress=[_egress([{"podSelector": {}}])],
            )
            continue
        add(
            "allow-object-store-and-api",
            namespace,
            everyone,
            policyTypes=["Egress"],
            egress=[_egress([_EVERYWHERE], outside)],
        )

    # The platform's servers: who may call them, and what they call.
    clients = [_namespace(pipelines), _namespace(serving)]
    add(
        "allow-mlflow-clients",
        platform,
        _pods("mlflow")["podSelector"],
        policyTypes=["Ingress"],
        ingress=[{"from": [*clients, _namespace(monitoring)], "ports": _ports([args.registry_port])}],
    )
    add(
        "allow-feast-clients",
        platform,
        _pods("feast")["podSelector"],
        policyTypes=["Ingress"],
        ingress=[{"from": clients, "ports": _ports([args.feature_server_port])}],
    )
    add(
        "allow-store-clients",
        platform,
        {"matchExpressions": [{"key": "app.kubernetes.io/name", "operator": "In", "values": ["postgresql", "redis"]}]},
        policyTypes=["Ingress"],
        ingress=[{"from": [{"podSelector": {}}, *clients], "ports": _ports([5432, 6379])}],
    )
    add(
        "allow-same-namespace",
        platform,
        everyone,
        policyTypes=["Egress"],
        egress=[_egress([{"podSelector": {}}])],
    )
    # Pipelines and services call the platform's servers (MLflow, Feast, PostgreSQL, Redis).
    for namespace in (pipelines, serving):
        add(
            "allow-platform",
            namespace,
            everyone,
            policyTypes=["Egress"],
            egress=[_egress([_namespace(platform)], [args.registry_port, args.feature_server_port, 5432, 6379])],
        )
    add(
        "allow-callers",
        serving,
        _pods("model-service")["podSelector"],
        policyTypes=["Ingress"],
        ingress=[{"from": [{"namespaceSelector": {}}], "ports": _ports(args.serving_ports)}],
    )
    # Monitoring: the monitors read MLflow and push to the Pushgateway; Argo Events and the Prometheus
    # stack talk among themselves; Prometheus here scrapes every namespace.
    add(
        "allow-mlflow",
        monitoring,
        everyone,
        policyTypes=["Egress"],
        egress=[_egress([_namespace(platform)], [args.registry_port])],
    )
    add(
        "allow-same-namespace",
        monitoring,
        everyone,
        policyTypes=["Ingress", "Egress"],
        ingress=[{"from": [{"podSelector": {}}]}],
        egress=[_egress([{"podSelector": {}}])],
    )
    if args.prometheus_namespace is not None:
        add(
            "allow-alertmanager",
            monitoring,
            everyone,
            policyTypes=["Ingress"],
            ingress=[{"from": [_pods("alertmanager", args.prometheus_namespace)]}],
        )
    if args.prometheus_namespace == monitoring:
        add(
            "allow-prometheus-scraping",
            monitoring,
            _pods("prometheus")["podSelector"],
            policyTypes=["Egress"],
            egress=[_egress([{"namespaceSelector": {}}])],
        )
    return manifests


class NetworkPolicies(pulumi.ComponentResource):
    """Default deny in every namespace of the platform, and the allow rules its parts need."""

    def __init__(self, name: str, args: NetworkPoliciesArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("loopform:network:NetworkPolicies", name, None, opts)
        for manifest in policy_manifests(args):
            meta = manifest["metadata"]
            k8s.networking.v1.NetworkPolicy(
                f"{name}-{meta['namespace']}-{meta['name']}",
                metadata=meta,
                spec=manifest["spec"],
                opts=common.child(self),
            )
        self.register_outputs({})
