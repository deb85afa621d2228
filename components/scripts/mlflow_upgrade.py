"""Bring the MLflow tracking database to the schema of this image's MLflow, backing it up first.

The MLflow server pods run this as an init container, before `mlflow server` starts; the Deployment's strategy
is Recreate, so no server of the old version writes while it runs. It needs only what the MLflow server image
has: MLflow (with SQLAlchemy and Alembic), psycopg2 and boto3; fsspec and s3fs are used where installed. For a
PostgreSQL database it also needs `pg_dump` on PATH (Debian's postgresql-client, of the server's major version or
newer).

Environment (nothing is read from the command line, and the database URL and its password are never printed):
  MLFLOW_BACKEND_STORE_URI  the database URL, as `mlflow server` reads it (a postgresql+psycopg2 URL with user, password, host, db)
  LOOPFORM_BACKUP_URI       the folder backups go to: s3://bucket/prefix or file:///path
  MLFLOW_S3_ENDPOINT_URL    optional: the S3 endpoint (MinIO and the like), as for MLflow's artifacts

What it decides, one line on stdout for each decision:
  empty database            create MLflow's tables, as `mlflow db upgrade` does; no backup
  schema at MLflow's head   nothing
  schema behind the head    back up (PostgreSQL: `pg_dump --format=custom`; SQLite: a copy of the database) to
                            <LOOPFORM_BACKUP_URI>/mlflow-<revision>-<UTC time>.dump (.sqlite), then upgrade;
                            if the backup fails, nothing is upgraded
  unknown revision          the database was written by a newer MLflow: nothing is changed

On PostgreSQL the whole run holds an advisory lock (pg_advisory_lock(LOCK_KEY)): replicas that start together
wait for the one that migrates, then find the schema current.

Exit status: 0 done; 1 unexpected error; 2 configuration; 3 backup failed (not upgraded); 4 the database is newer
than this MLflow; 5 the upgrade failed after the backup (restore from the backup it names).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit
from urllib.request import url2pathname

DATABASE_VARIABLE = "MLFLOW_BACKEND_STORE_URI"
BACKUP_VARIABLE = "LOOPFORM_BACKUP_URI"
S3_ENDPOINT_VARIABLE = "MLFLOW_S3_ENDPOINT_URL"
# The same key in every replica; PostgreSQL scopes advisory locks to the database.
LOCK_KEY = int.from_bytes(b"loopform", "big")

# URL query parameters (what psycopg2 hands to libpq) and the libpq environment variable pg_dump reads for each.
LIBPQ_ENVIRONMENT = {
    "host": "PGHOST",
    "hostaddr": "PGHOSTADDR",
    "port": "PGPORT",
    "dbname": "PGDATABASE",
    "user": "PGUSER",
    "password": "PGPASSWORD",
    "passfile": "PGPASSFILE",
    "service": "PGSERVICE",
    "options": "PGOPTIONS",
    "application_name": "PGAPPNAME",
    "connect_timeout": "PGCONNECT_TIMEOUT",
    "sslmode": "PGSSLMODE",
    "sslrootcert": "PGSSLROOTCERT",
    "sslcert": "PGSSLCERT",
    "sslkey": "PGSSLKEY",
    "sslcrl": "PGSSLCRL",
    "sslcrldir": "PGSSLCRLDIR",
    "sslsni": "PGSSLSNI",
    "requirepeer": "PGREQUIREPEER",
    "ssl_min_protocol_version": "PGSSLMINPROTOCOLVERSION",
    "ssl_max_protocol_version": "PGSSLMAXPROTOCOLVERSION",
    "gssencmode": "PGGSSENCMODE",
    "krbsrvname": "PGKRBSRVNAME",
    "gsslib": "PGGSSLIB",
    "channel_binding": "PGCHANNELBINDING",
    "target_session_attrs": "PGTARGETSESSIONATTRS",
    "load_balance_hosts": "PGLOADBALANCEHOSTS",
}

_SECRETS: list[str] = []


class ConfigurationError(Exception):
    """The environment does not say what to migrate or where backups go."""


class BackupError(Exception):
    """The backup could not be taken or stored: the schema must not be upgraded."""


def _redact(text: str) -> str:
    for secret in _SECRETS:
        text = text.replace(secret, "***")
    return text


class _Redacting(io.TextIOBase):
    """A text stream that writes through to another with every secret replaced by ***."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(_redact(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self._stream.isatty()

    def fileno(self) -> int:
        return self._stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._stream.encoding


def say(message: str) -> None:
    print(_redact(message), flush=True)


def complain(message: str) -> None:
    print(_redact(message), file=sys.stderr, flush=True)


def _remember_secrets(url: str) -> None:
    """Everything in the URL that reveals the password: the URL itself, the password as written and decoded."""
    _SECRETS.append(url)
    try:
        written = urlsplit(url).password
    except ValueError:
        written = None
    for secret in (written, unquote(written) if written else None):
        if secret and secret not in _SECRETS:
            _SECRETS.append(secret)
    _SECRETS.sort(key=len, reverse=True)  # the URL before the password inside it


def _public(uri: str) -> str:
    """A backup location as printed: without any user or password in it."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


# --- the lock ----------------------------------------------------------------------------------------------------


@contextmanager
def migration_lock(url: Any) -> Iterator[None]:
    """Hold PostgreSQL's advisory lock LOCK_KEY on a connection of its own for the whole run (no-op elsewhere)."""
    if url.get_backend_name() != "postgresql":
        yield
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    # Autocommit: the lock is held by the session, with no transaction left open beside the migrations.
    engine = sqlalchemy.create_engine(url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            key = {"key": LOCK_KEY}
            if not connection.execute(sqlalchemy.text("SELECT pg_try_advisory_lock(:key)"), key).scalar():
                say(f"mlflow schema: another replica holds the migration lock ({LOCK_KEY}): waiting")
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), key)
            try:
                yield
            finally:
                with contextlib.suppress(Exception):  # where the connection is gone, the lock went with it
                    connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), key)
    finally:
        engine.dispose()


# --- backups -----------------------------------------------------------------------------------------------------


def _libpq_environment(url: Any) -> dict[str, str]:
    """pg_dump's connection, as libpq environment variables: the password is in no command line."""
    environment = {name: value for name, value in os.environ.items() if name != DATABASE_VARIABLE}
    given = {"host": url.host, "port": url.port, "user": url.username, "password": url.password, "dbname": url.database}
    for name, value in given.items():
        if value not in (None, ""):
            environment[LIBPQ_ENVIRONMENT[name]] = str(value)
    for name, value in url.query.items():
        if name not in LIBPQ_ENVIRONMENT:
            say(f"mlflow schema: pg_dump ignores the database URL's parameter {name!r} (no libpq variable)")
            continue
        environment[LIBPQ_ENVIRONMENT[name]] = ",".join(value) if isinstance(value, tuple) else str(value)
    return environment


def _dump_postgresql(url: Any, local: Path) -> None:
    pg_dump = shutil.which("pg_dump")
    if pg_dump is None:
        raise BackupError("pg_dump is not on PATH (the image needs postgresql-client of the server's major or newer)")
    command = [pg_dump, "--format=custom", "--no-password", f"--file={local}"]
    done = subprocess.run(command, env=_libpq_environment(url), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BackupError(f"pg_dump exited with {done.returncode}: {done.stderr.strip()[-2000:]}")


def _copy_sqlite(url: Any, local: Path) -> None:
    database = url.database
    if not database or database == ":memory:" or url.query.get("mode") == "memory":
        raise BackupError("an in-memory SQLite database has nothing to back up")
    if not Path(database).is_file():
        raise BackupError(f"the SQLite database {database} is not a file")
    source = sqlite3.connect(f"{Path(database).resolve().as_uri()}?mode=ro", uri=True)
    try:
        target = sqlite3.connect(local)
        try:
            source.backup(target)  # a consistent copy, even of a database someone writes
        finally:
            target.close()
    finally:
        source.close()


def _store_with_fsspec(local: Path, target: str) -> str | None:
    """Copy the backup with fsspec; None where fsspec, or its implementation of the target's protocol, is missing."""
    try:
        import fsspec.core
    except ImportError:
        return None
    options: dict[str, Any] = {}
    endpoint = os.environ.get(S3_ENDPOINT_VARIABLE)
    if endpoint and urlsplit(target).scheme in ("s3", "s3a"):
        options["client_kwargs"] = {"endpoint_url": endpoint}
    try:
        filesystem, path = fsspec.core.url_to_fs(target, **options)
    except ImportError:  # e.g. s3:// without s3fs
        return None
    filesystem.makedirs(filesystem._parent(path), exist_ok=True)
    if "file" in filesystem.protocol:  # under a name of its own until complete
        filesystem.put_file(str(local), f"{path}.partial")
        filesystem.mv(f"{path}.partial", path)
    else:
        filesystem.put_file(str(local), path)
    stored = filesystem.size(path)
    if stored != local.stat().st_size:
        raise BackupError(f"{_public(target)} holds {stored} bytes, the backup {local.stat().st_size}")
    return "fsspec"


def _store_in_folder(local: Path, target: str) -> str:
    parts = urlsplit(target)
    path = Path(url2pathname(parts.path) if parts.scheme == "file" else target)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.partial")
    shutil.copyfile(local, partial)
    os.replace(partial, path)
    if path.stat().st_size != local.stat().st_size:
        raise BackupError(f"{path} holds {path.stat().st_size} bytes, the backup {local.stat().st_size}")
    return "file copy"


def _store_with_boto3(local: Path, target: str) -> str:
    import boto3

    parts = urlsplit(target)
    bucket, key = parts.netloc.rsplit("@", 1)[-1], parts.path.lstrip("/")
    client = boto3.client("s3", endpoint_url=os.environ.get(S3_ENDPOINT_VARIABLE) or None)
    client.upload_file(str(local), bucket, key)
    stored = client.head_object(Bucket=bucket, Key=key)["ContentLength"]
    if stored != local.stat().st_size:
        raise BackupError(f"{_public(target)} holds {stored} bytes, the backup {local.stat().st_size}")
    return "boto3"


def store(local: Path, target: str) -> str:
    """Copy the local backup to `target`; returns how."""
    how = _store_with_fsspec(local, target)
    if how is not None:
        return how
    scheme = urlsplit(target).scheme.lower()
    if scheme in ("", "file"):
        return _store_in_folder(local, target)
    if scheme in ("s3", "s3a"):
        return _store_with_boto3(local, target)
    raise BackupError(f"no way to write {scheme}:// here (fsspec with its {scheme} implementation is missing)")


def backup(url: Any, backup_uri: str, revision: str | None) -> str:
    """Back the database up to backup_uri; returns where to, and how. Raises BackupError."""
    backend = url.get_backend_name()
    suffix = {"postgresql": ".dump", "sqlite": ".sqlite"}.get(backend)
    if suffix is None:
        raise BackupError(f"no backup method for {backend} databases")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    name = f"mlflow-{revision or 'base'}-{stamp}{suffix}"
    target = f"{backup_uri.rstrip('/')}/{name}"
    try:
        with tempfile.TemporaryDirectory(prefix="mlflow-backup-") as folder:
            local = Path(folder) / name
            if backend == "postgresql":
                _dump_postgresql(url, local)
            else:
                _copy_sqlite(url, local)
            size = local.stat().st_size if local.exists() else 0
            if size == 0:
                raise BackupError("the backup is empty")
            how = store(local, target)
    except BackupError:
        raise
    except Exception as error:
        raise BackupError(f"{type(error).__name__}: {error}") from error
    return f"{_public(target)} ({size} bytes, {how})"


# --- the decision ------------------------------------------------------------------------------------------------


def _configuration() -> tuple[str, str]:
    if sys.argv[1:]:
        raise ConfigurationError(f"takes no arguments: set {DATABASE_VARIABLE} and {BACKUP_VARIABLE}")
    database = os.environ.get(DATABASE_VARIABLE, "").strip()
    backup_uri = os.environ.get(BACKUP_VARIABLE, "").strip()
    if database:
        _remember_secrets(database)
    missing = [name for name, value in ((DATABASE_VARIABLE, database), (BACKUP_VARIABLE, backup_uri)) if not value]
    if missing:
        raise ConfigurationError(f"set {' and '.join(missing)}")
    return database, backup_uri


def _check_driver(url: Any) -> None:
    """The URL's Python driver is importable: SQLAlchemy 2.1 reads postgresql:// as psycopg (3), not psycopg2."""
    import sqlalchemy

    dialect = url.get_dialect()
    try:
        dialect.import_dbapi()
    except ImportError as error:
        raise ConfigurationError(
            f"{DATABASE_VARIABLE}'s scheme {url.drivername}:// means the Python driver {dialect.driver} to"
            f" SQLAlchemy {sqlalchemy.__version__}, and it is not installed ({error}): install it, or name the"
            f" installed driver in the scheme ({url.get_backend_name()}+<driver>://, e.g. postgresql+psycopg2://)"
        ) from error


def migrate(database: str, backup_uri: str) -> int:
    import mlflow
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError
    from mlflow.store.db import utils
    from sqlalchemy.engine import make_url

    try:
        url = make_url(database)
    except Exception as error:
        raise ConfigurationError(f"{DATABASE_VARIABLE} is not a database URL") from error
    _check_driver(url)
    script = ScriptDirectory.from_config(utils._get_alembic_config(""))
    head = utils._get_latest_schema_revision()
    engine = utils.create_sqlalchemy_engine_with_retry(database)
    try:
        with migration_lock(url):
            if utils._is_empty_database(engine):
                utils._initialize_tables(engine)
                created = utils._get_schema_version(engine)
                if created != head:
                    complain(f"mlflow schema: created MLflow's tables, but they are at {created}, not {head}")
                    return 5
                say(f"mlflow schema: empty database: created MLflow {mlflow.__version__}'s tables at {head}")
                return 0
            current = utils._get_schema_version(engine)
            where = f"mlflow schema at {current}, head {head} (MLflow {mlflow.__version__})"
            if current == head:
                say(f"{where}: up to date, nothing to do")
                return 0
            if current is not None:
                try:
                    script.get_revision(current)
                except CommandError:
                    complain(
                        f"{where}: {current} is no revision this MLflow knows (a newer MLflow wrote it): no change"
                    )
                    return 4
            say(f"{where}: behind, backing up to {_public(backup_uri)} before upgrading")
            try:
                stored = backup(url, backup_uri, current)
            except BackupError as error:
                complain(f"{where}: backup failed, not upgraded: {error}")
                return 3
            try:
                utils._upgrade_db(engine)
                upgraded = utils._get_schema_version(engine)
                if upgraded != head:
                    raise RuntimeError(f"the schema is at {upgraded} after the upgrade")
            except Exception:
                complain(traceback.format_exc())
                complain(f"{where}: backed up to {stored}, upgrade FAILED: restore from that backup")
                return 5
            say(f"{where}: backed up to {stored}, upgraded")
            return 0
    finally:
        engine.dispose()


def main() -> int:
    sys.stdout = _Redacting(sys.stdout)
    sys.stderr = _Redacting(sys.stderr)
    try:
        database, backup_uri = _configuration()
        return migrate(database, backup_uri)
    except ConfigurationError as error:
        complain(f"mlflow schema: {error}")
        return 2
    except Exception:
        complain(traceback.format_exc())
        complain("mlflow schema: failed (above)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
