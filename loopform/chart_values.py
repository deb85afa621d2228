"""The keys each pinned Helm chart documents, and a check of the values the platform passes it.

Helm ignores a values key the chart does not read, so a misspelt or renamed key (`controler`, a key an upgrade moved)
silently does nothing. The lists below are written from each chart's own values.yaml (and, where noted, from keys the
chart's templates or Chart.yaml read outside it), so a test can reject values that use anything else.

A tree maps each documented key to the tree of its children, or to None where the chart takes the map as free-form
(a Kubernetes object, labels, a list) or where the platform sets nothing below it. Children are listed only along the
paths the platform's values reach, and then in full, so any sibling the chart documents passes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

KeyTree = Mapping[str, "KeyTree | None"]


def _leaves(*names: str) -> dict[str, None]:
    """Keys whose contents are not checked further."""
    return dict.fromkeys(names)


@dataclass(frozen=True)
class ChartKeys:
    """The documented keys of one pinned chart version, and where they were read."""

    chart: str
    version: str
    source: str
    """Repository, path and commit of the values.yaml the keys were written from."""
    source_version: str
    """The chart version of that values.yaml: `version` itself, or the nearest stored one (see `note`)."""
    keys: KeyTree
    note: str = ""
    """Why `source_version` differs from `version`, where it does."""


_ARGO_CD_COMPONENT_COMMON = (
    "name", "runtimeClassName", "pdb", "vpa", "image", "imagePullSecrets", "extraArgs", "env", "envFrom",
    "extraContainers", "initContainers", "volumeMounts", "volumes", "emptyDir", "deploymentAnnotations",
    "deploymentLabels", "podAnnotations", "podLabels", "resources", "containerPorts", "dnsConfig", "dnsPolicy",
    "containerSecurityContext", "readinessProbe", "terminationGracePeriodSeconds", "priorityClassName", "nodeSelector",
    "tolerations", "affinity", "topologySpreadConstraints", "automountServiceAccountToken", "serviceAccount", "metrics",
    "clusterRoleRules", "networkPolicy",
)  # fmt: skip

#: argo-cd: argoproj/argo-helm charts/argo-cd/values.yaml at aa6978d5e8ae1281c023ea4eb533c11ec8b01d59, whose
#: Chart.yaml is version 9.6.1 (appVersion v3.4.4). NEAREST STORED VERSION: no values.yaml of 10.1.3 is in the
#: library's index; 10.x may add keys (a false alarm here) but a key 10.x removed would pass unnoticed.
ARGO_CD = ChartKeys(
    chart="argo-cd",
    version="10.1.3",
    source="github.com/argoproj/argo-helm charts/argo-cd/values.yaml@aa6978d5e8ae1281c023ea4eb533c11ec8b01d59",
    source_version="9.6.1",
    note="nearest stored version: 10.1.3's values.yaml is not in the reference index",
    keys={
        **_leaves(
            "nameOverride", "fullnameOverride", "namespaceOverride", "kubeVersionOverride", "apiVersionOverrides",
            "createAggregateRoles", "createClusterRoles", "openshift", "extraObjects", "redis", "redis-ha",
            "externalRedis", "repoServer", "applicationSet", "notifications", "commitServer",
        ),
        "crds": _leaves("install", "keep", "annotations", "additionalLabels"),
        "global": {
            **_leaves(
                "domain", "runtimeClassName", "additionalLabels", "revisionHistoryLimit", "imagePullSecrets",
                "logging", "statefulsetAnnotations", "statefulsetLabels", "deploymentAnnotations", "deploymentLabels",
                "podAnnotations", "podLabels", "addPrometheusAnnotations", "securityContext", "hostAliases",
                "dualStack", "priorityClassName", "nodeSelector", "tolerations", "affinity",
                "topologySpreadConstraints", "deploymentStrategy", "env", "extraVolumes", "extraVolumeMounts",
                "certificateAnnotations",
            ),
            "image": _leaves("repository", "tag", "imagePullPolicy"),
            "networkPolicy": _leaves("create", "defaultDenyIngress"),
        },
        "configs": {
            **_leaves(
                "cm", "params", "rbac", "ssh", "tls", "cmp", "clusterCredentials", "credentialTemplates",
                "credentialTemplatesAnnotations", "repositories", "repositoriesAnnotations", "secret", "styles",
            ),
            "gpg": _leaves("annotations", "keys"),
        },
        "controller": _leaves(
            *_ARGO_CD_COMPONENT_COMMON, "replicas", "dynamicClusterDistribution", "heartbeatTime",
            "revisionHistoryLimit", "statefulsetAnnotations", "statefulsetLabels", "hostNetwork", "roleRules",
        ),
        "dex": _leaves(
            "enabled", "name", "extraArgs", "runtimeClassName", "metrics", "pdb", "vpa", "image", "imagePullSecrets",
            "initImage", "env", "envFrom", "extraContainers", "initContainers", "volumeMounts", "volumes", "emptyDir",
            "certificateSecret", "deploymentAnnotations", "deploymentLabels", "podAnnotations", "podLabels",
            "resources", "containerPorts", "dnsConfig", "dnsPolicy", "containerSecurityContext", "livenessProbe",
            "readinessProbe", "terminationGracePeriodSeconds", "automountServiceAccountToken", "serviceAccount",
            "servicePortHttp", "servicePortHttpName", "servicePortGrpc", "servicePortGrpcName", "servicePortMetrics",
            "priorityClassName", "nodeSelector", "tolerations", "affinity", "topologySpreadConstraints",
            "deploymentStrategy", "networkPolicy",
        ),
        "redisSecretInit": _leaves(
            "enabled", "name", "image", "extraArgs", "imagePullSecrets", "runtimeClassName", "jobAnnotations",
            "podAnnotations", "podLabels", "resources", "containerSecurityContext", "securityContext",
            "serviceAccount", "priorityClassName", "affinity", "nodeSelector", "tolerations",
        ),
        "server": _leaves(
            *_ARGO_CD_COMPONENT_COMMON, "replicas", "autoscaling", "lifecycle", "extensions", "hostNetwork",
            "livenessProbe", "deploymentStrategy", "certificate", "certificateSecret", "service", "ingress",
            "ingressGrpc", "route", "httproute", "grpcroute", "backendTLSPolicy", "listenerset",
        ),
    },
)  # fmt: skip

#: argo-workflows: the team mirror /work/shared/upstream/charts/argo-workflows-0.45.2, i.e. argoproj/argo-helm
#: charts/argo-workflows/values.yaml at f9856eb58376062f8f3697d79c0579c19aad14ac (Chart.yaml 0.45.2).
#: NEAREST STORED VERSION: the index holds Chart.yaml 0.46.0 (9fa16395) but no values.yaml of 0.46.x or 0.47.x.
ARGO_WORKFLOWS = ChartKeys(
    chart="argo-workflows",
    version="0.47.5",
    source="github.com/argoproj/argo-helm charts/argo-workflows/values.yaml@f9856eb58376062f8f3697d79c0579c19aad14ac",
    source_version="0.45.2",
    note="nearest stored version: no values.yaml of 0.46.x/0.47.x is in the reference index",
    keys={
        **_leaves(
            "createAggregateRoles", "nameOverride", "fullnameOverride", "namespaceOverride", "commonLabels",
            "kubeVersionOverride", "apiVersionOverrides", "singleNamespace", "mainContainer", "extraObjects",
            "useStaticCredentials", "artifactRepository", "customArtifactRepository", "artifactRepositoryRef",
            "emissary",
        ),
        "images": _leaves("tag", "pullPolicy", "pullSecrets"),
        "crds": _leaves("install", "keep", "annotations"),
        "workflow": {
            **_leaves("namespace"),
            "serviceAccount": _leaves("create", "labels", "annotations", "name", "pullSecrets"),
            "rbac": _leaves("create", "agentPermissions", "artifactGC", "serviceAccounts"),
        },
        "controller": {
            **_leaves(
                "image", "parallelism", "resourceRateLimit", "rbac", "configMap", "namespaceParallelism",
                "initialDelay", "deploymentAnnotations", "podAnnotations", "podLabels", "podSecurityContext",
                "securityContext", "persistence", "workflowDefaults", "workflowWorkers", "workflowTTLWorkers",
                "podCleanupWorkers", "cronWorkflowWorkers", "workflowRestrictions", "telemetryConfig",
                "serviceAccount", "name", "workflowNamespaces", "instanceID", "logging", "serviceType",
                "serviceAnnotations", "serviceLabels", "loadBalancerClass", "loadBalancerSourceRanges", "resources",
                "livenessProbe", "extraEnv", "extraArgs", "volumeMounts", "volumes", "replicas",
                "revisionHistoryLimit", "pdb", "nodeSelector", "tolerations", "affinity", "topologySpreadConstraints",
                "priorityClassName", "links", "columns", "navColor", "extraContainers", "extraInitContainers",
                "retentionPolicy", "nodeEvents", "kubeConfig", "podGCGracePeriodSeconds", "podGCDeleteDelayDuration",
            ),
            "metricsConfig": _leaves(
                "enabled", "path", "interval", "port", "metricsTTL", "ignoreErrors", "secure", "portName",
                "servicePort", "servicePortName", "headlessService", "honorLabels", "relabelings",
                "metricRelabelings", "targetLabels",
            ),
            "serviceMonitor": _leaves("enabled", "additionalLabels", "namespace"),
            "clusterWorkflowTemplates": _leaves("enabled", "serviceAccounts"),
        },
        "executor": _leaves("image", "resources", "args", "env", "securityContext"),
        "server": {
            **_leaves(
                "enabled", "baseHref", "image", "deploymentAnnotations", "podAnnotations", "podLabels",
                "podSecurityContext", "rbac", "securityContext", "name", "serviceType", "servicePort",
                "serviceNodePort", "servicePortName", "hostAliases", "serviceAccount", "serviceAnnotations",
                "serviceLabels", "loadBalancerClass", "loadBalancerIP", "loadBalancerSourceRanges", "resources",
                "replicas", "revisionHistoryLimit", "autoscaling", "pdb", "nodeSelector", "tolerations", "affinity",
                "topologySpreadConstraints", "priorityClassName", "secure", "extraEnv", "authMode", "authModes",
                "extraArgs", "logging", "tmpVolume", "volumeMounts", "volumes", "ingress", "GKEbackendConfig",
                "GKEmanagedCertificate", "GKEfrontendConfig", "sso", "extraContainers", "extraInitContainers",
                "lifecycle", "terminationGracePeriodSeconds",
            ),
            "clusterWorkflowTemplates": _leaves("enabled", "enableEditing"),
        },
    },
)  # fmt: skip

#: argo-events: argoproj/argo-helm charts/argo-events/values.yaml at 7d7009b80b7e241d6b94126d1691907268b86890 (its
#: JetStream version list ends at 2.10.10, as in the 2.4.x series), mirrored in
#: /work/shared/upstream/charts/argo-events-2.4.x-7d7009b. NEAREST STORED VERSION, chart version not verified: the
#: index holds no Chart.yaml at that commit and no values.yaml of 2.4.19.
ARGO_EVENTS = ChartKeys(
    chart="argo-events",
    version="2.4.19",
    source="github.com/argoproj/argo-helm charts/argo-events/values.yaml@7d7009b80b7e241d6b94126d1691907268b86890",
    source_version="2.4.x (unverified)",
    note="nearest stored version: 2.4.19's values.yaml is not in the reference index; chart version of the copy read "
    "is inferred, not verified",
    keys={
        **_leaves(
            "nameOverride", "fullnameOverride", "namespaceOverride", "openshift", "createAggregateRoles", "global",
            "configs", "extraObjects", "webhook",
        ),
        "crds": _leaves("install", "keep", "annotations"),
        "controller": {
            **_leaves(
                "name", "image", "revisionHistoryLimit", "replicas", "pdb", "env", "envFrom", "podAnnotations",
                "podLabels", "containerSecurityContext", "readinessProbe", "livenessProbe", "volumes", "volumeMounts",
                "nodeSelector", "tolerations", "affinity", "topologySpreadConstraints", "priorityClassName",
                "resources", "extraContainers", "initContainers", "serviceAccount", "metrics",
            ),
            "rbac": _leaves("enabled", "namespaced", "managedNamespace", "rules"),
        },
    },
)  # fmt: skip

#: kube-prometheus-stack: prometheus-community/helm-charts charts/kube-prometheus-stack/values.yaml at
#: 001f3a6d7d24b9cbafda24b2c7843aeccfa173cb (Prometheus v3.5.0, Alertmanager v0.28.1, Thanos v0.39.1: the 77.x
#: series). NEAREST STORED VERSION, chart version not verified: the index holds no Chart.yaml at that commit, and that
#: copy does not parse as YAML (prometheusSpec.additionalScrapeConfigsSecret is `{}` followed by indented keys), so it
#: is a mid-edit commit, not a release; the keys below were read from its text.
KUBE_PROMETHEUS_STACK = ChartKeys(
    chart="kube-prometheus-stack",
    version="77.5.0",
    source="github.com/prometheus-community/helm-charts charts/kube-prometheus-stack/values.yaml"
    "@001f3a6d7d24b9cbafda24b2c7843aeccfa173cb",
    source_version="77.x (unverified)",
    note="nearest stored version: 77.5.0's Chart.yaml is not in the reference index; the copy read ships the "
    "same Prometheus/Alertmanager/Thanos images as the 77.x series",
    keys={
        **_leaves(
            "nameOverride", "namespaceOverride", "kubeTargetVersionOverride", "kubeVersionOverride",
            "fullnameOverride", "commonLabels", "customRules", "defaultRules", "additionalPrometheusRulesMap",
            "global", "windowsMonitoring", "prometheus-windows-exporter", "kubernetesServiceMonitors",
            "kubeApiServer", "kubelet", "kubeControllerManager", "coreDns", "kubeDns", "kubeEtcd", "kubeScheduler",
            "kubeProxy", "kubeStateMetrics", "kube-state-metrics", "nodeExporter", "prometheus-node-exporter",
            "prometheusOperator", "thanosRuler", "cleanPrometheusOperatorObjectNames", "extraManifests",
        ),
        "crds": _leaves("enabled", "upgradeJob"),
        "alertmanager": {
            **_leaves(
                "enabled", "namespaceOverride", "annotations", "additionalLabels", "apiVersion", "enableFeatures",
                "forceDeployDashboards", "networkPolicy", "serviceAccount", "podDisruptionBudget", "config",
                "stringConfig", "tplConfig", "templateFiles", "ingress", "route", "secret", "ingressPerReplica",
                "service", "servicePerReplica", "serviceMonitor", "extraSecret",
            ),
            "alertmanagerSpec": _leaves(
                "persistentVolumeClaimRetentionPolicy", "podMetadata", "serviceName", "image", "useExistingSecret",
                "secrets", "automountServiceAccountToken", "configMaps", "web", "alertmanagerConfigSelector",
                "alertmanagerConfigNamespaceSelector", "alertmanagerConfiguration", "alertmanagerConfigMatcherStrategy",
                "additionalArgs", "logFormat", "logLevel", "replicas", "retention", "storage", "externalUrl",
                "routePrefix", "scheme", "tlsConfig", "paused", "nodeSelector", "resources", "podAntiAffinity",
                "podAntiAffinityTopologyKey", "affinity", "tolerations", "topologySpreadConstraints",
                "securityContext", "listenLocal", "containers", "volumes", "volumeMounts", "initContainers",
                "priorityClassName", "additionalPeers", "portName", "clusterAdvertiseAddress",
                "clusterGossipInterval", "clusterPeerTimeout", "clusterPushpullInterval", "clusterLabel",
                "forceEnableClusterMode", "minReadySeconds", "additionalConfig", "additionalConfigString",
            ),
        },
        "grafana": {
            **_leaves(
                "enabled", "namespaceOverride", "forceDeployDatasources", "forceDeployDashboards",
                "defaultDashboardsEnabled", "operator", "defaultDashboardsTimezone", "defaultDashboardsEditable",
                "defaultDashboardsInterval", "adminUser", "adminPassword", "rbac", "ingress", "serviceAccount",
                "extraConfigmapMounts", "deleteDatasources", "additionalDataSources", "prune", "service",
                "serviceMonitor",
            ),
            "sidecar": {
                **_leaves("datasources"),
                "dashboards": _leaves(
                    "enabled", "label", "labelValue", "searchNamespace", "enableNewTablePanelSyntax", "annotations",
                    "multicluster", "provider",
                ),
            },
        },
        "prometheus": {
            **_leaves(
                "enabled", "agentMode", "annotations", "additionalLabels", "networkPolicy", "serviceAccount",
                "thanosService", "thanosServiceMonitor", "thanosServiceExternal", "service", "servicePerReplica",
                "podDisruptionBudget", "thanosIngress", "extraSecret", "ingress", "route", "ingressPerReplica",
                "serviceMonitor", "additionalRulesForClusterRole", "additionalServiceMonitors",
                "additionalPodMonitors",
            ),
            "prometheusSpec": _leaves(
                "persistentVolumeClaimRetentionPolicy", "disableCompaction", "automountServiceAccountToken",
                "apiserverConfig", "additionalArgs", "scrapeFailureLogFile", "scrapeInterval", "scrapeTimeout",
                "scrapeClasses", "podTargetLabels", "evaluationInterval", "listenLocal", "enableOTLPReceiver",
                "enableAdminAPI", "version", "web", "exemplars", "enableFeatures", "otlp", "serviceName", "image",
                "tolerations", "topologySpreadConstraints", "alertingEndpoints", "externalLabels",
                "enableRemoteWriteReceiver", "replicaExternalLabelName", "replicaExternalLabelNameClear",
                "prometheusExternalLabelName", "prometheusExternalLabelNameClear", "externalUrl", "nodeSelector",
                "secrets", "configMaps", "query", "ruleNamespaceSelector", "ruleSelectorNilUsesHelmValues",
                "ruleSelector", "serviceMonitorSelectorNilUsesHelmValues", "serviceMonitorSelector",
                "serviceMonitorNamespaceSelector", "podMonitorSelectorNilUsesHelmValues", "podMonitorSelector",
                "podMonitorNamespaceSelector", "probeSelectorNilUsesHelmValues", "probeSelector",
                "probeNamespaceSelector", "scrapeConfigSelectorNilUsesHelmValues", "scrapeConfigSelector",
                "scrapeConfigNamespaceSelector", "retention", "retentionSize", "tsdb", "walCompression", "paused",
                "replicas", "shards", "logLevel", "logFormat", "routePrefix", "podMetadata", "podAntiAffinity",
                "podAntiAffinityTopologyKey", "affinity", "remoteRead", "additionalRemoteRead", "remoteWrite",
                "additionalRemoteWrite", "remoteWriteDashboards", "resources", "storageSpec", "volumes",
                "volumeMounts", "additionalScrapeConfigs", "additionalScrapeConfigsSecret",
                "additionalPrometheusSecretsAnnotations", "additionalAlertManagerConfigs",
                "additionalAlertManagerConfigsSecret", "additionalAlertRelabelConfigs",
                "additionalAlertRelabelConfigsSecret", "securityContext", "priorityClassName", "thanos", "containers",
                "initContainers", "portName", "arbitraryFSAccessThroughSMs", "overrideHonorLabels",
                "overrideHonorTimestamps", "ignoreNamespaceSelectors", "enforcedNamespaceLabel",
                "prometheusRulesExcludedFromEnforce", "excludedFromEnforcement", "queryLogFile", "sampleLimit",
                "enforcedKeepDroppedTargets", "enforcedSampleLimit", "enforcedTargetLimit", "enforcedLabelLimit",
                "enforcedLabelNameLengthLimit", "enforcedLabelValueLengthLimit", "allowOverlappingBlocks",
                "nameValidationScheme", "minReadySeconds", "hostNetwork", "hostAliases", "tracingConfig",
                "serviceDiscoveryRole", "additionalConfig", "additionalConfigString", "maximumStartupDurationSeconds",
                "scrapeProtocols",
            ),
        },
    },
)  # fmt: skip

#: nvidia-device-plugin: the team mirror /work/shared/upstream/charts/nvidia-device-plugin-0.17.1, i.e. the published
#: chart archive NVIDIA/k8s-device-plugin gh-pages stable/nvidia-device-plugin-0.17.1.tgz at
#: bf584288ed8c31d6b63b1ec5bdc9c8ef8f0ded7c (exact version). `nfd.enabled` is not in values.yaml: the chart's
#: Chart.yaml reads it as the condition `nfd.enabled,gfd.enabled` of its node-feature-discovery 0.15.3 dependency.
NVIDIA_DEVICE_PLUGIN = ChartKeys(
    chart="nvidia-device-plugin",
    version="0.17.1",
    source="github.com/NVIDIA/k8s-device-plugin gh-pages:stable/nvidia-device-plugin-0.17.1.tgz values.yaml"
    "@bf584288ed8c31d6b63b1ec5bdc9c8ef8f0ded7c",
    source_version="0.17.1",
    keys={
        **_leaves(
            "config", "compatWithCPUManager", "migStrategy", "failOnInitError", "deviceListStrategy",
            "deviceIDStrategy", "nvidiaDriverRoot", "gdsEnabled", "mofedEnabled", "deviceDiscoveryStrategy",
            "nameOverride", "fullnameOverride", "namespaceOverride", "selectorLabelsOverride", "allowDefaultNamespace",
            "imagePullSecrets", "image", "updateStrategy", "podAnnotations", "podSecurityContext", "securityContext",
            "resources", "nodeSelector", "affinity", "tolerations", "priorityClassName", "runtimeClassName",
            "devicePlugin", "mps", "cdi",
        ),
        "gfd": _leaves("enabled", "nameOverride", "namespaceOverride", "noTimestamp", "sleepInterval", "securityContext"),
        "nfd": _leaves("enabled", "nameOverride", "enableNodeFeatureApi", "master", "worker"),
    },
)  # fmt: skip

#: dcgm-exporter: the team mirror /work/shared/upstream/charts/dcgm-exporter-4.1.1, i.e. the published chart archive
#: NVIDIA/dcgm-exporter gh-pages helm-charts/dcgm-exporter-4.1.1.tgz at ecd340dc2e9717757db9d1d662a621fe18e9514d.
DCGM_EXPORTER = ChartKeys(
    chart="dcgm-exporter",
    version="4.1.1",
    source="github.com/NVIDIA/dcgm-exporter gh-pages:helm-charts/dcgm-exporter-4.1.1.tgz values.yaml"
    "@ecd340dc2e9717757db9d1d662a621fe18e9514d",
    source_version="4.1.1",
    keys={
        **_leaves(
            "image", "arguments", "imagePullSecrets", "nameOverride", "fullnameOverride", "namespaceOverride",
            "runtimeClassName", "serviceAccount", "rollingUpdate", "podLabels", "podAnnotations", "podSecurityContext",
            "securityContext", "service", "resources", "nodeSelector", "tolerations", "affinity", "extraHostVolumes",
            "extraConfigMapVolumes", "extraVolumeMounts", "extraEnv", "kubeletPath", "tlsServerConfig", "basicAuth",
        ),
        "serviceMonitor": _leaves("apiVersion", "enabled", "interval", "honorLabels", "additionalLabels", "relabelings"),
    },
)  # fmt: skip

#: Every (chart, version) the platform pins, by chart name and version.
CHARTS: dict[tuple[str, str], ChartKeys] = {
    (entry.chart, entry.version): entry
    for entry in (ARGO_CD, ARGO_WORKFLOWS, ARGO_EVENTS, KUBE_PROMETHEUS_STACK, NVIDIA_DEVICE_PLUGIN, DCGM_EXPORTER)
}


def unknown_keys(values: Mapping[str, Any], keys: KeyTree, prefix: str = "") -> list[str]:
    """Dotted paths in `values` that `keys` does not document, walking only where `keys` lists children."""
    unknown: list[str] = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if key not in keys:
            unknown.append(path)
            continue
        children = keys[key]
        if children is not None and isinstance(value, Mapping):
            unknown.extend(unknown_keys(value, children, f"{path}."))
    return unknown


def check_values(chart: str, version: str, values: Mapping[str, Any]) -> list[str]:
    """Unknown key paths of `values` for the pinned `chart` `version`; KeyError if that version has no entry."""
    return unknown_keys(values, CHARTS[(chart, version)].keys)
