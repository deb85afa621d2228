"""ModelRegistry: the MLflow tracking server and model registry.

Typed Kubernetes resources rather than a chart: the schema migration must run before any
server of the new version and while none of the old one writes (Pulumi's Chart resource runs no
hooks), and the backend (in-cluster PostgreSQL or a managed database) is a spec choice. So the
server Deployment recreates its pods, and each pod's init container runs the upgrade script:
under an advisory lock, when the database is behind this MLflow, a pg_dump to the artifact store
first (MLflow's migrations are not guaranteed transactional), then the migration.

The server runs MLflow's basic-auth app: a second init container writes its users and grants
(components/scripts/mlflow_auth.py), and each client identity gets a credentials file in a Secret of
the namespaces that act as it (see AUTH_GRANTS and docs/hardening.md).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import pulumi
import pulumi_kubernetes as k8s

from components import common, secrets
from loopform.identity import MLFLOW_ACCOUNT
from loopform.spec import ExternalDatabase, InClusterPostgres, RegistrySpec

COMPONENT = "mlflow"
POSTGRES_UID = 999  # the postgres image's user
MLFLOW_UID = common.IMAGE_UID  # images/mlflow/Dockerfile's user
#: The folder `mlflow server --expose-prometheus` keeps its workers' metric samples in.
METRICS_DIR = "/tmp/mlflow-metrics"
#: The pod's IP (downward API): a scrape's Host header, which --allowed-hosts must accept.
POD_IP_ENV = "POD_IP"
URL_KEY = "url"
PASSWORD_KEY = "POSTGRES_PASSWORD"


def database_url(user: str, password: str, host: str, port: int, database: str, sslmode: str | None = None) -> str:
    """The SQLAlchemy URL of a PostgreSQL database, the user and password percent-escaped.

    A password with `@`, `:`, `/` or `%` would otherwise end the user-info part early.
    """
    # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; the images install psycopg2.
    url = f"postgresql+psycopg2://{quote(user, safe='')}:{quote(password, safe='')}@{host}:{port}/{quote(database, safe='')}"
    return f"{url}?sslmode={sslmode}" if sslmode else url


PASSWORD_CHECKSUM = "loopform.dev/database-password-checksum"
#: The data directory's PostgreSQL major version: a new major cannot start on it (dump and restore instead).
POSTGRES_MAJOR = "loopform.dev/postgres-major-version"
#: postStart of the PostgreSQL container: set the role's password to the Secret's, through the local socket
#: (trusted inside the container), on every start. psql reads it with \\getenv: it is in no argv. The postgres image applies POSTGRES_PASSWORD only to an
#: empty data directory, so without this a rotated password would never reach the database. `postgres` is
#: the maintenance database initdb creates, present before POSTGRES_DB is.
APPLY_PASSWORD_COMMAND = [
    "sh",
    "-c",
    """for attempt in $(seq 60); do
  if pg_isready -q -h /var/run/postgresql && printf '%s\\n' '\\getenv password POSTGRES_PASSWORD' \\
      "ALTER ROLE CURRENT_USER WITH PASSWORD :'password';" \\
    | psql -q -v ON_ERROR_STOP=1 -h /var/run/postgresql -U "$POSTGRES_USER" -d postgres
  then exit 0; fi
  sleep 2
done
exit 1""",
]


#: The schema upgrade the server pods run first (components/scripts/mlflow_upgrade.py): an advisory lock, then,
#: when the database is behind this MLflow, a pg_dump to the artifact store and `mlflow db upgrade`'s migration.
UPGRADE_SCRIPT = Path(__file__).resolve().parent / "scripts" / "mlflow_upgrade.py"
UPGRADE_CHECKSUM = "loopform.dev/upgrade-script-checksum"
UPGRADE_DEADLINE_SECONDS = 3600
SCRIPTS_DIR = "/opt/loopform"


def backup_uri(spec: RegistrySpec) -> str:
    """Where schema upgrades put their database backups: the artifact bucket, outside the artifact root.

    Inside `--artifacts-destination` MLflow's artifact proxy would let any client list, download or
    delete the dumps; the bucket's root level is out of its reach.
    """
    scheme, _, rest = spec.artifacts.uri.partition("://")
    bucket = rest.partition("/")[0]
    if scheme == "file":  # a folder: beside the artifact root
        return f"file://{str(PurePosixPath('/' + rest.lstrip('/')).parent).rstrip('/')}/loopform-backups/mlflow"
    return f"{scheme}://{bucket}/loopform-backups/mlflow"


#: MLflow's basic-auth app (`mlflow server --app-name basic-auth`): every request but /health and the server-info
#: route needs a user (anonymous ones get 401). Authenticated users read everything (default READ); writes need a
#: grant. The pipeline creates runs, logged models, registered models and versions and tags them: EDIT on every
#: experiment and registered model (EDIT deletes nothing). Promotion moves aliases and release tags, and undoes
#: them when it fails halfway (deleting an alias needs can_delete): MANAGE on registered models, nothing on runs.
#: Serving and the drift monitor only read. The admin is for people (adding users); no workload gets it.
AUTH_APP = "basic-auth"
DEFAULT_PERMISSION = "READ"
ADMIN_USER = "admin"
PIPELINE_USER = "pipeline"
PROMOTION_USER = "promotion"
SERVING_USER = "serving"
MONITOR_USER = "monitor"
AUTH_GRANTS: dict[str, list[tuple[str, str, str]]] = {
    PIPELINE_USER: [("experiment", "*", "EDIT"), ("registered_model", "*", "EDIT")],
    PROMOTION_USER: [("registered_model", "*", "MANAGE")],
    SERVING_USER: [],
    MONITOR_USER: [],
}
AUTH_SCRIPT = UPGRADE_SCRIPT.parent / "mlflow_auth.py"
AUTH_DIR = "/etc/mlflow-auth"
AUTH_CONFIG_KEY = "basic_auth.ini"
AUTH_USERS_KEY = "users.json"
AUTH_CHECKSUM = "loopform.dev/auth-checksum"
#: The auth app's CSRF key, the same in every worker and replica. MLflow reads it from this variable only, so the
#: server's command sets it from the mounted file (no secret in the pod's env), then execs `mlflow server`.
FLASK_SECRET_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"
FLASK_SECRET_KEY = "flask-secret-key"
FLASK_SECRET_FROM_FILE = [
    "sh",
    "-c",
    f'{FLASK_SECRET_ENV}="$(cat {AUTH_DIR}/{FLASK_SECRET_KEY})" && export {FLASK_SECRET_ENV} && exec "$@"',
    "mlflow-server",
]
#: Keys of each identity's credentials Secret: MLflow's credentials file, and the same two values alone (for a
#: person exporting MLFLOW_TRACKING_USERNAME/PASSWORD, and for Prometheus' basic auth).
CREDENTIALS_KEY = "credentials"
USERNAME_KEY = "username"
CLIENT_PASSWORD_KEY = "password"


def _ini_value(value: str) -> str:
    """A value for configparser's default (basic) interpolation, which both MLflow readers use: `%` doubled."""
    return value.replace("%", "%%")


def auth_database_url(tracking_url: str) -> str:
    """The auth tables' database: the tracking database's name plus `_auth`, on the same server (a SQLite file:
    beside it). Their own database keeps the tracking schema's upgrades and backups MLflow's alone. Parsed with the
    standard library: the Pulumi program imports no database driver, and the escaped credentials stay as given."""
    base, query_mark, query = tracking_url.partition("?")
    folder, _, database = base.rpartition("/")
    if base.startswith("sqlite"):
        stem, dot, suffix = database.rpartition(".")
        database = f"{stem}_auth.{suffix}" if dot else f"{database}_auth"
    else:
        database = f"{database}_auth"
    return f"{folder}/{database}{query_mark}{query}"


def auth_config(database_url: str, admin_password: str) -> str:
    """The auth app's ini (MLFLOW_AUTH_CONFIG_PATH): what the server and the user bootstrap both read."""
    lines = [
        "[mlflow]",
        f"default_permission = {DEFAULT_PERMISSION}",
        f"database_uri = {_ini_value(database_url)}",
        f"admin_username = {ADMIN_USER}",
        f"admin_password = {_ini_value(admin_password)}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
    ]
    return "\n".join(lines) + "\n"


def auth_users(passwords: Mapping[str, str]) -> str:
    """The users file of components/scripts/mlflow_auth.py: each identity's password and grants."""
    users = {
        user: {"password": passwords[user], "grants": [list(grant) for grant in grants]}
        for user, grants in AUTH_GRANTS.items()
    }
    return json.dumps(users, sort_keys=True, indent=2)


def credentials_file(username: str, password: str) -> str:
    """MLflow's client credentials file (~/.mlflow/credentials, read by mlflow.utils.credentials)."""
    return f"[mlflow]\nmlflow_tracking_username = {_ini_value(username)}\nmlflow_tracking_password = {_ini_value(password)}\n"


def credentials_secret_name(user: str) -> str:
    """The Secret holding `user`'s MLflow credentials, in every namespace whose workloads act as that user."""
    return f"mlflow-{user}-credentials"


CREDENTIALS_VOLUME = "mlflow-credentials"


def credentials_volume(user: str) -> dict[str, Any]:
    """A pod volume with `user`'s credentials file only (as `credentials`)."""
    return {
        "name": CREDENTIALS_VOLUME,
        "secret": {
            "secretName": credentials_secret_name(user),
            "items": [{"key": CREDENTIALS_KEY, "path": CREDENTIALS_KEY}],
            "defaultMode": 0o440,
        },
    }


def credentials_mount(home: str) -> dict[str, Any]:
    """Mount of that volume at `<home>/.mlflow`, where MLflow's clients look (`~/.mlflow/credentials`): a file,
    not environment variables, so the password stays out of the pod spec and `env` (Checkov CKV_K8S_35)."""
    return {"name": CREDENTIALS_VOLUME, "mountPath": f"{home.rstrip('/')}/.mlflow", "readOnly": True}


@dataclass(kw_only=True)
class ModelRegistryArgs:
    """Inputs of the MLflow registry."""

    spec: RegistrySpec = field(default_factory=RegistrySpec)
    """Server, backend and artifact settings from the stack spec."""
    namespace: str = "loopform-system"
    """Namespace of the server and its database."""
    labels: dict[str, str] = field(default_factory=dict)
    """Common labels added to every object."""
    storage_class: str | None = None
    """StorageClass of the database volume; none uses the cluster default."""
    db_password: pulumi.Input[str] | None = None
    """Password of the database user (Pulumi secret config `loopform:registryDbPassword`); required."""
    environment: str
    """Environment of the stack: part of every password derived from db_password (MLflow users, the CSRF key),
    so environments given the same root secret still get different ones."""
    service_account: str = MLFLOW_ACCOUNT
    """ServiceAccount the server and the migration run as (their object-store identity)."""
    account_annotations: dict[str, str] = field(default_factory=dict)
    """Annotations of that ServiceAccount, e.g. the IRSA role ARN."""
    credentials_env_from: list[dict[str, Any]] = field(default_factory=list)
    """`envFrom` with static object-store keys, when that is the identity."""
    protect_data: bool = True
    """Protect and retain the database, its volume and its Secret (cluster.protect_data)."""
    prometheus_release: str | None = None
    """`release` label of the server's ServiceMonitor (`--expose-prometheus`); None (no Prometheus Operator): none."""
    credential_namespaces: dict[str, list[str]] = field(default_factory=dict)
    """Namespaces that get each MLflow identity's credentials Secret (`credentials_secret_name`), by user
    (PIPELINE_USER, SERVING_USER, ...); its own namespace always gets the monitor's when Prometheus scrapes."""


@dataclass(frozen=True)
class DatabaseEndpoint:
    """Where the platform's PostgreSQL is, and the Secret (libpq PG* keys) of its administering user."""

    host: str
    port: int
    sslmode: str | None
    admin_secret: str


class ModelRegistry(pulumi.ComponentResource):
    """MLflow server, its PostgreSQL backend, and the migration that precedes each rollout."""

    tracking_uri: pulumi.Output[str]
    """URI that clients (pipelines, services) set as MLFLOW_TRACKING_URI."""
    service_name: pulumi.Output[str]
    database: DatabaseEndpoint
    """The platform's PostgreSQL, for other databases on it (Feast's registry)."""

    def __init__(self, name: str, args: ModelRegistryArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("loopform:registry:ModelRegistry", name, None, opts)
        spec, ns = args.spec, args.namespace
        object_labels = common.labels(COMPONENT, name, args.labels)
        if args.db_password is None:
            raise ValueError(
                "the MLflow database needs a password: "
                "pulumi config set --secret loopform:registryDbPassword <password>"
            )

        backend = spec.backend
        database: list[pulumi.Resource] = []  # the in-cluster PostgreSQL, when the spec asks for one
        if isinstance(backend, InClusterPostgres):
            db_host, db_port, sslmode = f"{name}-postgres.{ns}.svc.cluster.local", 5432, None
        else:
            assert isinstance(backend, ExternalDatabase)
            db_host, db_port, sslmode = backend.host, backend.port, backend.sslmode
        url = pulumi.Output.from_input(args.db_password).apply(
            lambda password: database_url(backend.user, password, db_host, db_port, backend.database, sslmode)
        )
        # The URL for MLflow; the same connection as libpq variables for psql and pg_dump (no URL in argv).
        libpq = {"PGHOST": db_host, "PGPORT": str(db_port), "PGUSER": backend.user, "PGDATABASE": backend.database}
        if sslmode:
            libpq["PGSSLMODE"] = sslmode
        secret_data: dict[str, pulumi.Input[str]] = {
            URL_KEY: pulumi.Output.secret(url),
            **libpq,
            "PGPASSWORD": pulumi.Output.secret(args.db_password),
        }
        if isinstance(backend, InClusterPostgres):
            secret_data[PASSWORD_KEY] = pulumi.Output.secret(args.db_password)
        self.database = DatabaseEndpoint(host=db_host, port=db_port, sslmode=sslmode, admin_secret=f"{name}-db")
        url_secret = k8s.core.v1.Secret(
            f"{name}-db",
            metadata=common.metadata(f"{name}-db", ns, common.labels("postgresql", f"{name}-postgres", args.labels)),
            type="Opaque",
            string_data=secret_data,
            opts=common.stateful(self, args.protect_data),
        )
        # Consumers roll when the password changes (the MLflow users' passwords derive from it too).
        checksum = secrets.checksum(args.db_password, "loopform-db-password")
        auth_secret, users_checksum = self._auth(name, args, url, object_labels)
        if isinstance(backend, InClusterPostgres):
            database = self._postgres(name, backend, args, url_secret, checksum)

        account = common.service_account(
            self, f"{name}-sa", args.service_account, ns, object_labels, args.account_annotations
        )
        backend_env = {
            "name": "MLFLOW_BACKEND_STORE_URI",
            "valueFrom": {"secretKeyRef": {"name": f"{name}-db", "key": URL_KEY}},
        }
        # Read-only root filesystems: HOME and every scratch write (gunicorn, metrics, backups) go to /tmp.
        home = {"name": "HOME", "value": "/tmp"}
        env = [backend_env, home, *self._artifact_env(spec)]
        security = common.pod_security(MLFLOW_UID)

        # Before any server starts: back up and migrate the schema when this MLflow's is newer (see module doc).
        script = UPGRADE_SCRIPT.read_text()
        auth_script = AUTH_SCRIPT.read_text()
        scripts = k8s.core.v1.ConfigMap(
            f"{name}-scripts",
            metadata=common.metadata(f"{name}-scripts", ns, object_labels),
            data={UPGRADE_SCRIPT.name: script, AUTH_SCRIPT.name: auth_script},
            opts=common.child(self),
        )
        upgrade = {
            "name": "upgrade-schema",
            **common.image(spec.server_image),
            "command": ["python", f"{SCRIPTS_DIR}/{UPGRADE_SCRIPT.name}"],
            "env": [
                backend_env,
                home,
                {"name": "LOOPFORM_BACKUP_URI", "value": backup_uri(spec)},
                *self._artifact_env(spec),
            ],
            **common.env_from(args.credentials_env_from),
            "resources": common.resources(spec.resources),
            "securityContext": common.container_security(),
            "volumeMounts": [
                {"name": "scripts", "mountPath": SCRIPTS_DIR, "readOnly": True},
                {"name": "tmp", "mountPath": "/tmp"},
            ],
        }
        script_checksum = hashlib.sha256(script.encode()).hexdigest()[:16]
        auth_env = [
            {"name": "MLFLOW_AUTH_CONFIG_PATH", "value": f"{AUTH_DIR}/{AUTH_CONFIG_KEY}"},
            {"name": "LOOPFORM_AUTH_USERS", "value": f"{AUTH_DIR}/{AUTH_USERS_KEY}"},
        ]
        auth_mount = {"name": "auth", "mountPath": AUTH_DIR, "readOnly": True}
        # Then the users and their grants (components/scripts/mlflow_auth.py): idempotent, so every start applies
        # the Secret's current passwords (a change of any of them rolls the pods through AUTH_CHECKSUM).
        bootstrap_auth = {
            "name": "bootstrap-auth",
            **common.image(spec.server_image),
            "command": ["python", f"{SCRIPTS_DIR}/{AUTH_SCRIPT.name}"],
            "env": [backend_env, home, *auth_env],
            "resources": common.resources(spec.resources),
            "securityContext": common.container_security(),
            "volumeMounts": [
                {"name": "scripts", "mountPath": SCRIPTS_DIR, "readOnly": True},
                auth_mount,
                {"name": "tmp", "mountPath": "/tmp"},
            ],
        }
        # The script and the users' passwords: a password that changes without the database password (a new
        # user, a new derivation) still rolls the pods, so the init container applies it before clients use it.
        auth_script_hash = hashlib.sha256(auth_script.encode()).hexdigest()
        auth_checksum = users_checksum.apply(
            lambda c: hashlib.sha256(f"{auth_script_hash}:{c}".encode()).hexdigest()[:16]
        )

        port = spec.port
        # Prometheus scrapes the pod by its IP: the container expands $(POD_IP) from the downward API.
        hosts = [
            f"{name}",
            f"{name}.{ns}",
            f"{name}.{ns}.svc",
            f"{name}.{ns}.svc.cluster.local",
            "localhost",
            f"$({POD_IP_ENV})",
        ]
        allowed_hosts = ",".join(h for host in hosts for h in (host, f"{host}:{port}"))
        server = k8s.apps.v1.Deployment(
            f"{name}-server",
            metadata=common.metadata(
                name,
                ns,
                object_labels,
                common.workload_skips(
                    [spec.server_image],
                    ("CKV_K8S_35", "mlflow server reads its database URL only from MLFLOW_BACKEND_STORE_URI"),
                ),
            ),
            spec={
                "replicas": spec.replicas,
                "selector": {"matchLabels": common.selector(COMPONENT, name)},
                # Recreate: every old server is gone before the new pods' init container migrates, so no
                # server of the old version writes during a migration (a short gap on each rollout). A large
                # dump and migration can take long: the rollout gets an hour before it counts as failed.
                "strategy": {"type": "Recreate"},
                "progressDeadlineSeconds": UPGRADE_DEADLINE_SECONDS,
                "template": {
                    "metadata": {
                        "labels": object_labels,
                        "annotations": {
                            PASSWORD_CHECKSUM: checksum,
                            UPGRADE_CHECKSUM: script_checksum,
                            AUTH_CHECKSUM: auth_checksum,
                        },
                    },
                    "spec": {
                        "serviceAccountName": args.service_account,
                        "automountServiceAccountToken": False,
                        "securityContext": security,
                        "initContainers": [upgrade, bootstrap_auth],
                        "volumes": [
                            {"name": "scripts", "configMap": {"name": f"{name}-scripts"}},
                            {"name": "auth", "secret": {"secretName": f"{name}-auth", "defaultMode": 0o440}},
                            {"name": "tmp", "emptyDir": {}},
                        ],
                        "containers": [
                            {
                                "name": "mlflow",
                                **common.image(spec.server_image),
                                "command": [
                                    *FLASK_SECRET_FROM_FILE,
                                    "mlflow",
                                    "server",
                                    # Basic auth on every route but /health (see AUTH_GRANTS); users and grants
                                    # come from the bootstrap-auth init container.
                                    f"--app-name={AUTH_APP}",
                                    "--host=0.0.0.0",
                                    f"--port={port}",
                                    f"--workers={spec.workers}",
                                    # The backend URI (with its password) comes from MLFLOW_BACKEND_STORE_URI.
                                    "--serve-artifacts",
                                    f"--artifacts-destination={spec.artifacts.uri}",
                                    f"--allowed-hosts={allowed_hosts}",
                                    # /metrics on the server's port; the folder holds the workers' samples.
                                    f"--expose-prometheus={METRICS_DIR}",
                                ],
                                "env": [
                                    *env,
                                    {"name": POD_IP_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                                    auth_env[0],
                                ],
                                **common.env_from(args.credentials_env_from),
                                "ports": [{"name": "http", "containerPort": port}],
                                "readinessProbe": common.http_probe("/health", "http"),
                                "livenessProbe": common.http_probe("/health", "http", period=20, initial_delay=30),
                                "resources": common.resources(spec.resources),
                                "securityContext": common.container_security(),
                                "volumeMounts": [auth_mount, {"name": "tmp", "mountPath": "/tmp"}],
                            }
                        ],
                    },
                },
            },
            opts=common.child(
                self,
                depends_on=[*database, url_secret, auth_secret, account, scripts],
                custom_timeouts=pulumi.CustomTimeouts(create="60m", update="60m"),
            ),
        )

        service = k8s.core.v1.Service(
            f"{name}-service",
            metadata=common.metadata(name, ns, object_labels),
            spec={
                "selector": common.selector(COMPONENT, name),
                "ports": [{"name": "http", "port": port, "targetPort": "http"}],
            },
            opts=common.child(self, depends_on=[server]),
        )

        if args.prometheus_release is not None:
            monitor = common.service_monitor(
                name, ns, object_labels, common.selector(COMPONENT, name), args.prometheus_release
            )
            # /metrics is behind the auth app too: Prometheus scrapes as the read-only monitor user.
            credentials = credentials_secret_name(MONITOR_USER)
            monitor["spec"]["endpoints"][0]["basicAuth"] = {
                "username": {"name": credentials, "key": USERNAME_KEY},
                "password": {"name": credentials, "key": CLIENT_PASSWORD_KEY},
            }
            common.custom_resource(f"{name}-servicemonitor", monitor, common.child(self, depends_on=[service]))

        self.service_name = service.metadata.name
        # Derived from the Service, so whatever uses the URI waits until the server is up behind it.
        self.tracking_uri = service.metadata.apply(lambda meta: common.service_url(meta.name, meta.namespace, port))
        self.register_outputs({"tracking_uri": self.tracking_uri, "service_name": self.service_name})

    def _auth(
        self, name: str, args: ModelRegistryArgs, tracking_url: pulumi.Output[str], labels: dict[str, str]
    ) -> tuple[pulumi.Resource, pulumi.Output[str]]:
        """The auth app's Secret (its config, the users file, the CSRF key) and each identity's credentials Secret
        in the namespaces that act as it; returns that Secret and a checksum of the config and users file. Every password derives from the database password: nothing more to
        configure, and they rotate with it."""
        assert args.db_password is not None
        passwords = {
            user: secrets.derived_password(args.db_password, f"mlflow-user:{args.environment}:{user}")
            for user in (ADMIN_USER, *AUTH_GRANTS)
        }
        config = pulumi.Output.all(tracking_url, passwords[ADMIN_USER]).apply(
            lambda values: auth_config(auth_database_url(values[0]), values[1])
        )
        users = pulumi.Output.all(*(passwords[user] for user in AUTH_GRANTS)).apply(
            lambda values: auth_users(dict(zip(AUTH_GRANTS, values, strict=True)))
        )
        secret = k8s.core.v1.Secret(
            f"{name}-auth",
            metadata=common.metadata(f"{name}-auth", args.namespace, labels),
            type="Opaque",
            string_data={
                AUTH_CONFIG_KEY: pulumi.Output.secret(config),
                AUTH_USERS_KEY: pulumi.Output.secret(users),
                FLASK_SECRET_KEY: secrets.derived_password(
                    args.db_password, f"mlflow-flask-secret-key:{args.environment}"
                ),
            },
            opts=common.child(self),
        )
        namespaces = {user: set(found) for user, found in args.credential_namespaces.items()}
        if args.prometheus_release is not None:
            namespaces.setdefault(MONITOR_USER, set()).add(args.namespace)
        for user, found in sorted(namespaces.items()):
            password = passwords[user]
            secrets.SharedSecret(
                f"{name}-{user}-credentials",
                secrets.SharedSecretArgs(
                    secret_name=credentials_secret_name(user),
                    namespaces=sorted(found),
                    string_data={
                        CREDENTIALS_KEY: pulumi.Output.from_input(password).apply(
                            lambda p, u=user: credentials_file(u, p)
                        ),
                        USERNAME_KEY: user,
                        CLIENT_PASSWORD_KEY: password,
                    },
                    labels=common.labels("mlflow-credentials", credentials_secret_name(user), args.labels),
                ),
                common.child(self),
            )
        return secret, secrets.checksum(pulumi.Output.all(config, users).apply(json.dumps), "mlflow-auth")

    def _postgres(
        self,
        name: str,
        backend: InClusterPostgres,
        args: ModelRegistryArgs,
        secret: pulumi.Resource,
        checksum: pulumi.Input[str],
    ) -> list[pulumi.Resource]:
        """An in-cluster PostgreSQL whose password is the `POSTGRES_PASSWORD` key of the URL Secret."""
        ns, role = args.namespace, f"{name}-postgres"
        db_labels = common.labels("postgresql", role, args.labels)
        service = k8s.core.v1.Service(
            f"{name}-postgres-service",
            metadata=common.metadata(role, ns, db_labels),
            spec={
                "clusterIP": "None",
                "selector": common.selector("postgresql", role),
                "ports": [{"name": "postgres", "port": 5432, "targetPort": "postgres"}],
            },
            opts=common.child(self),
        )
        env: list[dict[str, Any]] = [
            {"name": "POSTGRES_USER", "value": backend.user},
            {"name": "POSTGRES_DB", "value": backend.database},
            {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"},
            {
                "name": "POSTGRES_PASSWORD",
                "valueFrom": {"secretKeyRef": {"name": f"{name}-db", "key": PASSWORD_KEY}},
            },
        ]
        ready = ["pg_isready", "-U", backend.user, "-d", backend.database]
        claim = common.persistent_volume_claim(
            self,
            f"{name}-postgres-data",
            role,
            ns,
            db_labels,
            backend.storage,
            args.storage_class,
            args.protect_data,
            guards={POSTGRES_MAJOR: backend.major_version},
        )
        statefulset = k8s.apps.v1.StatefulSet(
            f"{name}-postgres",
            metadata=common.metadata(
                role,
                ns,
                db_labels,
                common.workload_skips(
                    [backend.image],
                    common.DATA_OWNER_EXCEPTION,
                    ("CKV_K8S_35", "the password's postStart rotation reads POSTGRES_PASSWORD from the environment"),
                ),
            ),
            spec={
                "serviceName": role,
                "replicas": 1,
                "selector": {"matchLabels": common.selector("postgresql", role)},
                "template": {
                    # A new password rolls the pod; its postStart hook then applies it to the role.
                    "metadata": {"labels": db_labels, "annotations": {PASSWORD_CHECKSUM: checksum}},
                    "spec": {
                        "automountServiceAccountToken": False,
                        "securityContext": common.pod_security(POSTGRES_UID),
                        "containers": [
                            {
                                "name": "postgres",
                                **common.image(backend.image),
                                "env": env,
                                "ports": [{"name": "postgres", "containerPort": 5432}],
                                "readinessProbe": common.exec_probe(ready, period=5),
                                "livenessProbe": common.exec_probe(ready, period=20),
                                "lifecycle": {"postStart": {"exec": {"command": APPLY_PASSWORD_COMMAND}}},
                                "resources": common.resources(backend.resources),
                                # Read-only root: the server writes its data, its socket and lock, and scratch.
                                "securityContext": common.container_security(),
                                "volumeMounts": [
                                    {"name": "data", "mountPath": "/var/lib/postgresql/data"},
                                    {"name": "run", "mountPath": "/var/run/postgresql"},
                                    {"name": "tmp", "mountPath": "/tmp"},
                                ],
                            }
                        ],
                        "volumes": [
                            {"name": "data", "persistentVolumeClaim": {"claimName": common.claim_name(role)}},
                            {"name": "run", "emptyDir": {}},
                            {"name": "tmp", "emptyDir": {}},
                        ],
                    },
                },
            },
            opts=common.stateful(self, args.protect_data, depends_on=[secret, service, claim]),
        )
        return [statefulset]

    @staticmethod
    def _artifact_env(spec: RegistrySpec) -> list[dict[str, str]]:
        if spec.artifacts.endpoint_url:
            return [{"name": "MLFLOW_S3_ENDPOINT_URL", "value": spec.artifacts.endpoint_url}]
        return []
