"""FeatureStore: Feast registry, offline store, Redis online store, feature server, materialisation.

Typed Kubernetes resources rather than the Feast operator: the feature repo is the Feast
definitions the local runtime applies, rendered from each model's contract and shipped as a ConfigMap; `feast apply`
runs as a Job the server waits for, and a CronJob materialises on the spec's schedule.
The operator would add a CRD controller for what five objects express directly.

The feature server serves reads only: it runs `python -m loopform.feature_server`, Feast's own app and
gunicorn application (`feast serve` as Feast 0.67 runs it, `--metrics` included) with every route but
`/get-online-features` and `/health` removed, so no anonymous POST can rewrite the online store
(`/write-to-online-store`, `/push`, `/materialize*` answer 404). Writes reach Redis only through the Feast SDK:
the materialisation CronJob and the pipeline's steps. loopform/feature_server.py says why not Feast's `auth:`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import pulumi_kubernetes as k8s
import yaml

from components import common, secrets
from components.registry import DatabaseEndpoint, database_url
from components.secrets import SharedSecret, SharedSecretArgs
from loopform import feature_server
from loopform.features import OFFLINE_URI_ENV, REGISTRY_URL_ENV, cluster_config
from loopform.identity import FEAST_ACCOUNT
from loopform.spec import ExternalRedis, FeatureStoreSpec, InClusterRedis, Resources

COMPONENT = "feast"
#: Reviewed Checkov exception (docs/hardening.md): psql reads these secrets from the environment only.
REGISTRY_DB_ENV_EXCEPTION = (
    "CKV_K8S_35",
    "psql reads the admin password from PGPASSWORD and the script the role's from the environment",
)
REDIS_PORT = 6379
#: Where the in-cluster Redis reads its config (with `requirepass`) and the probes read its password: files.
REDIS_AUTH_DIR = "/etc/redis"
REDIS_PING = ["sh", "-c", f'REDISCLI_AUTH="$(cat {REDIS_AUTH_DIR}/password)" exec redis-cli ping']
FEAST_UID = common.IMAGE_UID  # the pipeline image's user
REDIS_UID = 999
#: With `--metrics`, the feature server serves Prometheus metrics on this port (Feast's default).
FEAST_METRICS_PORT = feature_server.METRICS_PORT
REPO_DIR = "/feature_repo"
REPO_SOURCE_DIR = "/feature_repo_source"
CONNECTION_KEY = "connection_string"
#: Copy the ConfigMap's files, dereferenced; the shell glob skips its `..data` and `..<timestamp>` entries.
REPO_COPY_COMMAND = ["sh", "-c", f'cp -L "{REPO_SOURCE_DIR}"/* "{REPO_DIR}"/']


@dataclass
class FeatureStoreArgs:
    """Inputs of the Feast deployment."""

    spec: FeatureStoreSpec = field(default_factory=FeatureStoreSpec)
    """Registry, stores, server and schedule from the stack spec."""
    image: str = "ghcr.io/loopform/pipeline:0.1.0"
    """Image with Feast and the feature definitions' imports (the pipeline image unless the spec names one)."""
    feature_files: dict[str, str] = field(default_factory=dict)
    """Feature definition files of the repo, by file name (e.g. {"fraud_features.py": source})."""
    prometheus_release: str | None = None
    """`release` label of the feature server's ServiceMonitor (its `--metrics`); None: none."""
    namespace: str = "loopform-system"
    labels: dict[str, str] = field(default_factory=dict)
    storage_class: str | None = None
    service_account: str = FEAST_ACCOUNT
    """ServiceAccount of every Feast pod (its object-store identity)."""
    account_annotations: dict[str, str] = field(default_factory=dict)
    """Annotations of that ServiceAccount, e.g. the IRSA role ARN."""
    credentials_env_from: list[dict[str, Any]] = field(default_factory=list)
    """`envFrom` with static object-store keys, when that is the identity."""
    redis_password: pulumi.Input[str] | None = None
    """AUTH password of an external Redis with `auth` (Pulumi secret config `loopform:redisPassword`)."""
    client_namespaces: Sequence[str] = ()
    """Other namespaces whose pods read the online store (model services): its connection Secret goes there too."""
    protect_data: bool = True
    """Protect and retain the in-cluster Redis and its volume (cluster.protect_data)."""
    registry_database: DatabaseEndpoint | None = None
    """The platform's PostgreSQL (ModelRegistry.database): the SQL registry's database is created on it."""
    registry_password: pulumi.Input[str] | None = None
    """Password of the registry's role (a Pulumi secret; the Platform derives it from the database password)."""
    registry_client_namespaces: Sequence[str] = ()
    """Other namespaces whose pods read the registry (pipeline steps, model services): its Secret goes there too."""


def feature_files(root: Path, model_paths: dict[str, str]) -> dict[str, str]:
    """Each model's Feast definitions, rendered from its contract (`loopform.feast_definitions`), named
    `<model>_features.py` in the repo: self-contained, so `feast apply` needs no model code."""
    from loopform.feast_definitions import registry_names, source
    from loopform.model_code import contract_at

    contracts = {model: contract_at(root, path, model) for model, path in sorted(model_paths.items())}
    owners: dict[tuple[str, str], str] = {}
    for model, contract in contracts.items():
        for kind, name in registry_names(contract).items():
            other = owners.setdefault((kind, name), model)
            if other != model:
                raise ValueError(
                    f"models {other} and {model} both declare the Feast {kind} {name!r}: the platform's one registry "
                    f"needs distinct names (models/{model}/contract.py)"
                )
    return {f"{model}_features.py": source(contract) for model, contract in contracts.items()}


def server_command(port: int) -> list[str]:
    """The feature server's command: Feast's server without its write routes (loopform.feature_server)."""
    return [
        "python",
        "-m",
        feature_server.__name__,
        "--host",
        "0.0.0.0",
        "--port",
        str(port),
        "--no-access-log",
        "--metrics",
        "--metrics-port",
        str(FEAST_METRICS_PORT),
    ]


def registry_secret_name(name: str) -> str:
    """The Secret with the SQL registry's URL (`name`: the FeatureStore's), in every namespace that reads it."""
    return f"{name}-registry"


def registry_url_env(name: str) -> dict[str, Any]:
    """The FEAST_REGISTRY_URL variable feature_store.yaml reads, for any pod that uses the registry."""
    return {"name": REGISTRY_URL_ENV, "valueFrom": {"secretKeyRef": {"name": registry_secret_name(name), "key": "url"}}}


def registry_url(spec: FeatureStoreSpec, database: DatabaseEndpoint, password: str) -> str:
    """SQLAlchemy URL of the registry (psycopg2 driver), the password percent-escaped."""
    url = database_url(
        spec.registry.user, password, database.host, database.port, spec.registry.database, database.sslmode
    )
    return url.replace("postgresql://", "postgresql+psycopg2://", 1)


#: Creates the registry's role and database if missing and sets the role's password, connected as the
#: platform database's user (libpq PG* variables from its Secret). CREATE DATABASE ... OWNER needs the user to be
#: able to SET ROLE to the owner: PostgreSQL 16 makes a CREATEROLE user (RDS's) a member WITH ADMIN but without
#: SET of the roles it creates, hence the GRANT checks SET there (MEMBER before 16). Idempotent; values come in
#: with \\getenv (no
#: password in any argv) and format() quotes every identifier (%I) and literal (%L), so none is spliced into SQL.
REGISTRY_DATABASE_SQL = """\
\\getenv user FEAST_REGISTRY_USER
\\getenv database FEAST_REGISTRY_DATABASE
\\getenv password FEAST_REGISTRY_PASSWORD
SELECT format('CREATE ROLE %I LOGIN', :'user') WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'user') \\gexec
SELECT format('ALTER ROLE %I WITH LOGIN PASSWORD %L', :'user', :'password') \\gexec
SELECT format('GRANT %I TO %I', :'user', current_user)
  WHERE NOT pg_has_role(current_user, :'user', CASE WHEN current_setting('server_version_num')::int >= 160000
                                                    THEN 'SET' ELSE 'MEMBER' END) \\gexec
SELECT format('CREATE DATABASE %I OWNER %I', :'database', :'user')
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'database') \\gexec
"""
REGISTRY_DATABASE_COMMAND = ["sh", "-c", 'printf "%s" "$REGISTRY_SQL" | psql -q -v ON_ERROR_STOP=1']


def connection_secret_name(name: str) -> str:
    """The Secret holding an external online store's connection string (`name`: the FeatureStore's)."""
    return f"{name}-online-store"


def redis_connection_env(spec: FeatureStoreSpec, name: str, namespace: str) -> dict[str, Any]:
    """The REDIS_CONNECTION_STRING variable feature_store.yaml reads, for any pod that uses the online store.

    `name` is the FeatureStore component's name. Either Redis's connection string, with its password, is in
    the Secret `<name>-online-store`, which the component creates in its own namespace and in each client
    namespace.
    """
    ref = {"name": connection_secret_name(name), "key": CONNECTION_KEY}
    return {"name": "REDIS_CONNECTION_STRING", "valueFrom": {"secretKeyRef": ref}}


def redis_connection_string(online: ExternalRedis | InClusterRedis, password: str | None, host: str = "") -> str:
    """Feast's Redis connection string: `host:port[,ssl=true][,password=...]` (comma-separated options).

    An in-cluster Redis (at `host`, the StatefulSet's Service) always requires its password, derived by the
    Platform from the database password; an external one as `auth` says, with `loopform:redisPassword`.
    """
    external = isinstance(online, ExternalRedis)
    parts = [f"{online.host}:{online.port}" if external else f"{host}:{REDIS_PORT}"]
    if external and online.ssl:
        parts.append("ssl=true")
    if not external or online.auth:
        if not password:
            raise ValueError("feature_store.online_store.auth needs pulumi config set --secret loopform:redisPassword")
        if "," in password:
            raise ValueError(
                "loopform:redisPassword: Feast splits its connection string on ',': use a token without one"
            )
        parts.append(f"password={password}")
    return ",".join(parts)


def redis_config(password: str) -> str:
    """The in-cluster Redis's config file: every client must AUTH with the password."""
    return f"requirepass {password}\n"


class FeatureStore(pulumi.ComponentResource):
    """Feast on Kubernetes, every value from the spec."""

    feature_server_url: pulumi.Output[str]
    """HTTP endpoint of the feature server (`/get-online-features`)."""
    online_store: pulumi.Output[str]
    """The Redis host:port, or the Secret that holds the external connection string."""

    def __init__(self, name: str, args: FeatureStoreArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("loopform:featurestore:FeatureStore", name, None, opts)
        spec, ns = args.spec, args.namespace
        object_labels = common.labels(COMPONENT, name, args.labels)

        repo_files = {"feature_store.yaml": cluster_config(spec), **args.feature_files}
        repo_hash = hashlib.sha256(yaml.safe_dump(repo_files, sort_keys=True).encode()).hexdigest()[:8]
        repo = k8s.core.v1.ConfigMap(
            f"{name}-repo",
            metadata=common.metadata(f"{name}-repo", ns, object_labels),
            data=repo_files,
            opts=common.child(self),
        )

        account = common.service_account(
            self, f"{name}-sa", args.service_account, ns, object_labels, args.account_annotations
        )
        redis_env = redis_connection_env(spec, name, ns)
        online = spec.online_store
        depends: list[pulumi.Resource] = [repo, account]
        if isinstance(online, InClusterRedis):
            host = f"{name}-redis.{ns}.svc.cluster.local"
            self._redis(name, online, args)
            depends.append(self._redis_workload)
            self.online_store = pulumi.Output.from_input(f"{host}:{REDIS_PORT}")
        else:
            host = online.host
            self.online_store = pulumi.Output.from_input(f"{online.host}:{online.port}")
        connection = pulumi.Output.from_input(args.redis_password).apply(
            lambda password: redis_connection_string(online, password, host)
        )
        depends.append(
            SharedSecret(
                f"{name}-online-store",
                SharedSecretArgs(
                    secret_name=connection_secret_name(name),
                    namespaces=[ns, *args.client_namespaces],
                    string_data={CONNECTION_KEY: connection},
                    labels=object_labels,
                ),
                common.child(self),
            )
        )

        registry = self._registry(name, args, object_labels)
        depends.append(registry)
        env = [redis_env, registry_url_env(name), {"name": OFFLINE_URI_ENV, "value": spec.offline_store.data_uri}]
        pod = self._pod_template(spec, args, env, repo_hash)
        # Feast reads its secrets from the environment only (docs/hardening.md).
        feast_skips = common.workload_skips([args.image], common.FEAST_ENV_EXCEPTION)

        apply_job = k8s.batch.v1.Job(
            f"{name}-apply",
            metadata=common.metadata(f"{name}-apply-{repo_hash}", ns, object_labels, feast_skips),
            spec={"backoffLimit": 4, "template": _with_command(pod, ["feast", "apply"], "OnFailure")},
            opts=common.child(self, depends_on=depends, delete_before_replace=True),
        )

        port = spec.server.port
        # Reads only (loopform.feature_server). --metrics: Feast's own Prometheus endpoint, with
        # feast_feature_freshness_seconds, the materialisation lag the LoopformFeaturesStale rule reads. Its
        # multiprocess folder goes to /tmp (emptyDir).
        server_pod = _with_command(pod, server_command(port), "Always")
        container = server_pod["spec"]["containers"][0]
        container["ports"] = [
            {"name": "http", "containerPort": port},
            {"name": "metrics", "containerPort": FEAST_METRICS_PORT},
        ]
        container["readinessProbe"] = common.http_probe("/health", "http")
        container["livenessProbe"] = common.http_probe("/health", "http", period=20, initial_delay=20)
        container["resources"] = common.resources(spec.server.resources)
        server = k8s.apps.v1.Deployment(
            f"{name}-server",
            metadata=common.metadata(f"{name}-server", ns, object_labels, feast_skips),
            spec={
                "replicas": spec.server.replicas,
                "selector": {"matchLabels": common.selector(COMPONENT, name)},
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
                "template": server_pod,
            },
            opts=common.child(self, depends_on=[apply_job]),
        )
        service = k8s.core.v1.Service(
            f"{name}-server-service",
            metadata=common.metadata(f"{name}-server", ns, object_labels),
            spec={
                "selector": common.selector(COMPONENT, name),
                "ports": [
                    {"name": "http", "port": port, "targetPort": "http"},
                    {"name": "metrics", "port": FEAST_METRICS_PORT, "targetPort": "metrics"},
                ],
            },
            opts=common.child(self, depends_on=[server]),
        )
        if args.prometheus_release is not None:
            common.custom_resource(
                f"{name}-server-servicemonitor",
                common.service_monitor(
                    f"{name}-server",
                    ns,
                    object_labels,
                    common.selector(COMPONENT, name),
                    args.prometheus_release,
                    port="metrics",
                ),
                common.child(self, depends_on=[service]),
            )

        materialize = [
            "sh",
            "-c",
            'exec feast materialize-incremental "$(date -u +%Y-%m-%dT%H:%M:%S)"',
        ]
        k8s.batch.v1.CronJob(
            f"{name}-materialize",
            metadata=common.metadata(f"{name}-materialize", ns, object_labels, feast_skips),
            spec={
                "schedule": spec.materialization_schedule,
                "concurrencyPolicy": "Forbid",
                "startingDeadlineSeconds": 600,
                "successfulJobsHistoryLimit": 3,
                "failedJobsHistoryLimit": 3,
                "jobTemplate": {"spec": {"backoffLimit": 2, "template": _with_command(pod, materialize, "OnFailure")}},
            },
            opts=common.child(self, depends_on=[apply_job]),
        )

        # Derived from the Service, so whatever uses the URL waits until the server is up behind it.
        self.feature_server_url = service.metadata.apply(
            lambda meta: common.service_url(meta.name, meta.namespace, port)
        )
        self.register_outputs({"feature_server_url": self.feature_server_url, "online_store": self.online_store})

    def _pod_template(
        self, spec: FeatureStoreSpec, args: FeatureStoreArgs, env: list[dict[str, Any]], repo_hash: str
    ) -> dict[str, Any]:
        """The pod every Feast workload runs: the repo as plain files, a scratch dir for Feast.

        A ConfigMap volume is a set of symlinks into a hidden `..<timestamp>/` folder; `feast apply`
        resolves each `*.py` and turns the resolved path into a module name starting with `..`, which
        importlib rejects. So an init container copies the files (dereferenced, dot-entries left
        behind) from the ConfigMap into an emptyDir, and Feast runs there.
        """
        labels = common.labels(COMPONENT, self._name, args.labels)
        security = common.container_security()
        return {
            # A changed feature repo, or a rotated registry password, rolls the server (and the next
            # materialisation) onto it.
            "metadata": {
                "labels": labels,
                "annotations": {
                    "loopform.dev/feature-repo-checksum": repo_hash,
                    "loopform.dev/registry-password-checksum": secrets.checksum(
                        args.registry_password or "", "loopform-feast-registry"
                    ),
                },
            },
            "spec": {
                "serviceAccountName": args.service_account,
                "automountServiceAccountToken": False,
                "securityContext": common.pod_security(FEAST_UID),
                "initContainers": [
                    {
                        "name": "feature-repo",
                        **common.image(args.image),
                        "command": REPO_COPY_COMMAND,
                        "resources": common.resources(Resources(cpu="10m", memory="64Mi")),
                        "securityContext": security,
                        "volumeMounts": [
                            {"name": "repo-source", "mountPath": REPO_SOURCE_DIR, "readOnly": True},
                            {"name": "repo", "mountPath": REPO_DIR},
                        ],
                    }
                ],
                "containers": [
                    {
                        "name": "feast",
                        **common.image(args.image),
                        "workingDir": REPO_DIR,
                        "env": [*env, {"name": "HOME", "value": "/tmp"}],
                        **common.env_from(args.credentials_env_from),
                        "resources": common.resources(spec.server.resources),
                        "securityContext": security,
                        "volumeMounts": [
                            {"name": "repo", "mountPath": REPO_DIR, "readOnly": True},
                            {"name": "tmp", "mountPath": "/tmp"},
                        ],
                    }
                ],
                "volumes": [
                    {"name": "repo-source", "configMap": {"name": self._repo_name}},
                    {"name": "repo", "emptyDir": {}},
                    {"name": "tmp", "emptyDir": {}},
                ],
            },
        }

    def _redis(self, name: str, redis: InClusterRedis, args: FeatureStoreArgs) -> None:
        """An in-cluster Redis with append-only persistence that requires a password (`requirepass`, from a
        config file in a Secret; a new password rolls the pod)."""
        ns, role = args.namespace, f"{name}-redis"
        redis_labels = common.labels("redis", role, args.labels)
        if args.redis_password is None:
            raise ValueError("the in-cluster Redis needs a password (the Platform derives it from the database's)")
        password = pulumi.Output.from_input(args.redis_password)
        auth = k8s.core.v1.Secret(
            f"{name}-redis-auth",
            metadata=common.metadata(f"{role}-auth", ns, redis_labels),
            string_data={
                "redis.conf": password.apply(redis_config),
                "password": password,
            },
            opts=common.child(self),
        )
        k8s.core.v1.Service(
            f"{name}-redis-service",
            metadata=common.metadata(role, ns, redis_labels),
            spec={
                "selector": common.selector("redis", role),
                "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis"}],
            },
            opts=common.child(self),
        )
        claim = common.persistent_volume_claim(
            self, f"{name}-redis-data", role, ns, redis_labels, redis.storage, args.storage_class, args.protect_data
        )
        self._redis_workload = k8s.apps.v1.StatefulSet(
            f"{name}-redis",
            metadata=common.metadata(
                role, ns, redis_labels, common.workload_skips([redis.image], common.DATA_OWNER_EXCEPTION)
            ),
            spec={
                "serviceName": role,
                "replicas": 1,
                "selector": {"matchLabels": common.selector("redis", role)},
                "template": {
                    "metadata": {
                        "labels": redis_labels,
                        "annotations": {"loopform.dev/redis-password-checksum": secrets.checksum(password, role)},
                    },
                    "spec": {
                        "automountServiceAccountToken": False,
                        "securityContext": common.pod_security(REDIS_UID),
                        "containers": [
                            {
                                "name": "redis",
                                **common.image(redis.image),
                                "args": [f"{REDIS_AUTH_DIR}/redis.conf", "--appendonly", "yes", "--dir", "/data"],
                                "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
                                "readinessProbe": common.exec_probe(REDIS_PING, period=5),
                                "livenessProbe": common.exec_probe(REDIS_PING, period=20),
                                "resources": common.resources(redis.resources),
                                "securityContext": common.container_security(),
                                "volumeMounts": [
                                    {"name": "data", "mountPath": "/data"},
                                    {"name": "auth", "mountPath": REDIS_AUTH_DIR, "readOnly": True},
                                ],
                            }
                        ],
                        "volumes": [
                            {"name": "data", "persistentVolumeClaim": {"claimName": common.claim_name(role)}},
                            {"name": "auth", "secret": {"secretName": f"{role}-auth", "defaultMode": 0o440}},
                        ],
                    },
                },
            },
            opts=common.stateful(self, args.protect_data, depends_on=[claim, auth]),
        )

    def _registry(self, name: str, args: FeatureStoreArgs, labels: dict[str, str]) -> pulumi.Resource:
        """The registry's Secret in every namespace that reads it, and the Job that makes its role and database."""
        database, password = args.registry_database, args.registry_password
        if database is None or password is None:
            raise ValueError(
                "the Feast SQL registry needs the platform's PostgreSQL (registry_database) and a password"
            )
        spec, ns = args.spec, args.namespace
        url = pulumi.Output.from_input(password).apply(lambda value: registry_url(spec, database, value))
        secret = SharedSecret(
            f"{name}-registry",
            SharedSecretArgs(
                secret_name=registry_secret_name(name),
                namespaces=[ns, *args.registry_client_namespaces],
                string_data={"url": url, "password": password},
                labels=labels,
            ),
            common.child(self),
        )
        # A new password gets a new Job name: the Job reruns and sets it.
        version = secrets.checksum(password, "loopform-feast-registry")
        password_ref = {"secretKeyRef": {"name": registry_secret_name(name), "key": "password"}}
        return k8s.batch.v1.Job(
            f"{name}-registry-db",
            metadata=version.apply(
                lambda tag: common.metadata(
                    f"{name}-registry-db-{tag[:8]}",
                    ns,
                    labels,
                    common.workload_skips([spec.registry.client_image], REGISTRY_DB_ENV_EXCEPTION),
                )
            ),
            spec={
                "backoffLimit": 6,
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "restartPolicy": "OnFailure",
                        "automountServiceAccountToken": False,
                        # psql needs no user of its own (the image's postgres user owns only the server's files).
                        "securityContext": common.pod_security(common.IMAGE_UID),
                        "containers": [
                            {
                                "name": "registry-database",
                                **common.image(spec.registry.client_image),
                                "command": REGISTRY_DATABASE_COMMAND,
                                "env": [
                                    {"name": "REGISTRY_SQL", "value": REGISTRY_DATABASE_SQL},
                                    {"name": "FEAST_REGISTRY_USER", "value": spec.registry.user},
                                    {"name": "FEAST_REGISTRY_DATABASE", "value": spec.registry.database},
                                    {"name": "FEAST_REGISTRY_PASSWORD", "valueFrom": password_ref},
                                ],
                                "envFrom": [{"secretRef": {"name": database.admin_secret}}],
                                "resources": common.resources(Resources(cpu="10m", memory="64Mi")),
                                "securityContext": common.container_security(),
                            }
                        ],
                    },
                },
            },
            opts=common.child(self, depends_on=[secret], delete_before_replace=True),
        )

    @property
    def _repo_name(self) -> str:
        return f"{self._name}-repo"


def _with_command(pod: dict[str, Any], command: list[str], restart: str) -> dict[str, Any]:
    """A copy of the pod template running `command`."""
    container = {**pod["spec"]["containers"][0], "command": command}
    spec = {**pod["spec"], "containers": [container]}
    if restart != "Always":
        spec["restartPolicy"] = restart
    return {**pod, "spec": spec}
