"""The MLflow server's init container: the schema is backed up before MLflow upgrades it, and upgraded once.

Each test runs components/scripts/mlflow_upgrade.py as the pod does: `python mlflow_upgrade.py`, configured by
environment variables alone. The PostgreSQL tests start a real server (as the `postgres` user when run as root)
and need psycopg2, which the MLflow image installs (psycopg2-binary). PYTHONPATH passes through to the script,
so a psycopg2 installed outside the virtualenv (pip install --target DIR) can serve both.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from . import pg
from .pg import server_binaries

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "components" / "scripts" / "mlflow_upgrade.py"
# How far behind MLflow's head the "old" databases are: several migrations, on either database.
REVISIONS_BEHIND = 8
# What a URL's password survives: each character that means something in a URL, and an escape of its own.
PASSWORD = "p@ss:w/rd%41?#&x"


def _revisions() -> tuple[str, str]:
    """MLflow's head revision, and the one REVISIONS_BEHIND migrations before it."""
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    script = ScriptDirectory.from_config(_get_alembic_config(""))
    head = older = script.get_current_head()
    for _ in range(REVISIONS_BEHIND):
        down = script.get_revision(older).down_revision
        older = down[0] if isinstance(down, tuple) else down
    assert head and older and older != head
    return head, older


HEAD, OLDER = _revisions()


def _database_at(url: str, revision: str) -> None:
    """A database that an older MLflow left: its tables migrated only to `revision`, with one experiment."""
    import sqlalchemy
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

    engine = sqlalchemy.create_engine(url)
    try:
        InitialBase.metadata.create_all(engine)
        command.upgrade(_get_alembic_config(url), revision)
        with engine.begin() as connection:
            connection.execute(
                sqlalchemy.text(
                    "INSERT INTO experiments (name, artifact_location, lifecycle_stage)"
                    " VALUES ('kept', 's3://artifacts/kept', 'active')"
                )
            )
    finally:
        engine.dispose()


def _state(url: str) -> tuple[str | None, list[str]]:
    """The database's alembic revision and its experiments' names."""
    import sqlalchemy
    from alembic.runtime.migration import MigrationContext

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            revision = MigrationContext.configure(connection).get_current_revision()
            names = [row[0] for row in connection.execute(sqlalchemy.text("SELECT name FROM experiments"))]
        return revision, names
    finally:
        engine.dispose()


def _environment(database: str, backup: str | None, *, path: str = "/usr/bin:/bin", **extra: str) -> dict[str, str]:
    """What the init container has: the two variables (and no command-line arguments)."""
    environment = {"PATH": path, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", **extra}
    environment["MLFLOW_BACKEND_STORE_URI"] = database
    if backup is not None:
        environment["LOOPFORM_BACKUP_URI"] = backup
    pythonpath = [extra.get("PYTHONPATH", ""), os.environ.get("PYTHONPATH", "")]
    environment["PYTHONPATH"] = os.pathsep.join(entry for entry in pythonpath if entry)
    return environment


def _upgrade(
    database: str, backup: str | None, *args: str, path: str = "/usr/bin:/bin", **extra: str
) -> subprocess.CompletedProcess[str]:
    environment = _environment(database, backup, path=path, **extra)
    command = [sys.executable, str(SCRIPT), *args]
    return subprocess.run(command, env=environment, capture_output=True, text=True, check=False)


def _files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.is_file()) if folder.exists() else []


# --- SQLite ------------------------------------------------------------------------------------------------------


def test_an_empty_database_gets_mlflows_tables_without_a_backup_and_a_second_run_does_nothing(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    backups = tmp_path / "backups"

    first = _upgrade(database, backups.as_uri())
    assert first.returncode == 0, first.stderr
    assert "empty database: created" in first.stdout
    assert _state(database) == (HEAD, [])
    assert _files(backups) == []

    second = _upgrade(database, backups.as_uri())
    assert second.returncode == 0, second.stderr
    assert f"mlflow schema at {HEAD}, head {HEAD}" in second.stdout
    assert "nothing to do" in second.stdout
    assert _files(backups) == []


def test_an_older_schema_is_backed_up_then_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "mlflow.db"
    database = f"sqlite:///{path}"
    _database_at(database, OLDER)
    backups = tmp_path / "backups" / "mlflow"

    done = _upgrade(database, backups.as_uri())
    assert done.returncode == 0, done.stderr
    assert _state(database) == (HEAD, ["kept"])
    [copy] = _files(backups)
    assert copy.name.startswith(f"mlflow-{OLDER}-") and copy.suffix == ".sqlite"
    # The copy is the database as it was: at the old revision, with its experiment.
    assert _state(f"sqlite:///{copy}") == (OLDER, ["kept"])
    assert f"mlflow schema at {OLDER}, head {HEAD}" in done.stdout
    assert f"backed up to {backups.as_uri()}/{copy.name}" in done.stdout
    assert "fsspec" in done.stdout
    assert done.stdout.rstrip().endswith("upgraded")

    again = _upgrade(database, backups.as_uri())
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert _files(backups) == [copy]


def test_without_fsspec_as_in_the_mlflow_image_the_backup_is_copied_to_the_folder(tmp_path: Path) -> None:
    """The MLflow image (mlflow, psycopg2-binary, boto3) has no fsspec: file:// backups still land."""
    database = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _database_at(database, OLDER)
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "fsspec.py").write_text("raise ImportError('no fsspec in the MLflow image')\n")
    backups = tmp_path / "backups"

    done = _upgrade(database, backups.as_uri(), PYTHONPATH=str(blocked))
    assert done.returncode == 0, done.stderr
    assert "file copy" in done.stdout
    [copy] = _files(backups)
    assert _state(f"sqlite:///{copy}") == (OLDER, ["kept"])
    assert _state(database) == (HEAD, ["kept"])


FAKE_BOTO3 = """
import json, os, shutil

class _S3:
    def __init__(self, endpoint_url):
        self.endpoint_url = endpoint_url

    def _path(self, bucket, key):
        return os.path.join(os.environ["FAKE_S3_ROOT"], bucket, key)

    def upload_file(self, filename, bucket, key):
        os.makedirs(os.path.dirname(self._path(bucket, key)), exist_ok=True)
        shutil.copyfile(filename, self._path(bucket, key))
        with open(os.path.join(os.environ["FAKE_S3_ROOT"], "calls.json"), "a") as calls:
            calls.write(json.dumps({"endpoint_url": self.endpoint_url, "bucket": bucket, "key": key}) + "\\n")

    def head_object(self, Bucket, Key):
        return {"ContentLength": os.path.getsize(self._path(Bucket, Key))}

def client(service, endpoint_url=None):
    assert service == "s3"
    return _S3(endpoint_url)
"""


@pytest.mark.parametrize("fsspec", ["fsspec without s3fs", "no fsspec"])
def test_an_s3_backup_goes_through_boto3_where_fsspec_cannot_write_s3(tmp_path: Path, fsspec: str) -> None:
    database = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _database_at(database, OLDER)
    modules, bucket = tmp_path / "modules", tmp_path / "s3"
    modules.mkdir()
    (modules / "boto3.py").write_text(FAKE_BOTO3)  # records the upload and stores it under FAKE_S3_ROOT
    if fsspec == "no fsspec":
        (modules / "fsspec.py").write_text("raise ImportError('no fsspec in the MLflow image')\n")
    else:  # fsspec present, its s3 implementation not (as where s3fs is not installed)
        (modules / "s3fs.py").write_text("raise ImportError('no s3fs in the MLflow image')\n")

    done = _upgrade(
        database,
        "s3://mlflow-backups/prod/",
        PYTHONPATH=str(modules),
        FAKE_S3_ROOT=str(bucket),
        MLFLOW_S3_ENDPOINT_URL="http://minio.storage:9000",
    )
    assert done.returncode == 0, done.stderr
    assert "boto3" in done.stdout
    [call] = [line for line in (bucket / "calls.json").read_text().splitlines()]
    assert '"endpoint_url": "http://minio.storage:9000"' in call and '"bucket": "mlflow-backups"' in call
    [copy] = [path for path in _files(bucket) if path.name != "calls.json"]
    assert copy.parent == bucket / "mlflow-backups" / "prod"
    assert copy.name.startswith(f"mlflow-{OLDER}-") and copy.suffix == ".sqlite"
    assert f"backed up to s3://mlflow-backups/prod/{copy.name}" in done.stdout
    assert _state(f"sqlite:///{copy}") == (OLDER, ["kept"])
    assert _state(database) == (HEAD, ["kept"])


def test_a_failed_backup_leaves_the_schema_as_it_was(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _database_at(database, OLDER)
    (tmp_path / "not-a-folder").write_text("a file where the backup folder should be\n")
    unwritable = tmp_path / "not-a-folder" / "backups"  # unwritable even for root

    done = _upgrade(database, unwritable.as_uri())
    assert done.returncode == 3, done.stdout + done.stderr
    assert "backup failed, not upgraded" in done.stderr
    assert "upgraded" not in done.stdout
    assert _state(database) == (OLDER, ["kept"])
    assert [path.name for path in tmp_path.rglob("mlflow-*")] == []


def test_a_database_that_a_newer_mlflow_wrote_is_left_alone(tmp_path: Path) -> None:
    import sqlalchemy

    database = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _database_at(database, OLDER)
    engine = sqlalchemy.create_engine(database)
    with engine.begin() as connection:
        connection.execute(sqlalchemy.text("UPDATE alembic_version SET version_num = 'f00dfeedbeef'"))
    engine.dispose()

    done = _upgrade(database, (tmp_path / "backups").as_uri())
    assert done.returncode == 4, done.stdout + done.stderr
    assert "f00dfeedbeef is no revision this MLflow knows" in done.stderr
    assert _state(database) == ("f00dfeedbeef", ["kept"])
    assert _files(tmp_path / "backups") == []


def test_nothing_is_read_from_the_command_line_and_nothing_happens_unconfigured(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _database_at(database, OLDER)

    without_backup = _upgrade(database, None)
    assert without_backup.returncode == 2
    assert "LOOPFORM_BACKUP_URI" in without_backup.stderr

    environment = _environment("", (tmp_path / "backups").as_uri())
    del environment["MLFLOW_BACKEND_STORE_URI"]
    command = [sys.executable, str(SCRIPT), database]
    as_argument = subprocess.run(command, env=environment, capture_output=True, text=True, check=False)
    assert as_argument.returncode == 2
    assert database not in as_argument.stdout + as_argument.stderr

    assert _state(database) == (OLDER, ["kept"])
    assert _files(tmp_path / "backups") == []


def test_a_missing_database_driver_is_named_without_the_password(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "psycopg2.py").write_text("raise ImportError('no psycopg2 here')\n")
    database = f"postgresql+psycopg2://mlflow:{quote(PASSWORD, safe='')}@127.0.0.1:1/mlflow"

    done = _upgrade(database, (tmp_path / "backups").as_uri(), PYTHONPATH=str(blocked))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "the Python driver psycopg2" in done.stderr
    for secret in (PASSWORD, quote(PASSWORD, safe=""), database):
        assert secret not in done.stdout + done.stderr


# --- PostgreSQL --------------------------------------------------------------------------------------------------


class Postgres:
    def __init__(self, binaries: Path, port: int) -> None:
        self.binaries, self.port = binaries, port
        self._databases = 0

    def url(self, database: str) -> str:
        # The driver named: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg (3); the MLflow image has psycopg2.
        return (
            f"postgresql+psycopg2://mlflow:{quote(PASSWORD, safe='')}@127.0.0.1:{self.port}/{database}?sslmode=disable"
        )

    def new_database(self) -> str:
        import sqlalchemy

        self._databases += 1
        name = f"mlflow{self._databases}"
        engine = sqlalchemy.create_engine(self.url("postgres"), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as connection:
                connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
        finally:
            engine.dispose()
        return self.url(name)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    if server_binaries() is None and not os.environ.get("CI"):  # CI installs the server: there it must run
        pytest.skip("PostgreSQL server binaries missing (apt-get install postgresql)")
    with pg.postgres(user="mlflow", password=PASSWORD) as server:
        yield Postgres(server.binaries, server.port)


def _pg_dump_wrapper(folder: Path, postgres: Postgres, body: str) -> str:
    """A PATH whose pg_dump runs `body` (a shell script) first; returns that PATH."""
    folder.mkdir()
    wrapper = folder / "pg_dump"
    real = postgres.binaries / "pg_dump"
    wrapper.write_text(f'#!/bin/sh\n{body}\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    return f"{folder}:/usr/bin:/bin"


class CommandLines:
    """Every process's command line, read from /proc again and again while the script runs."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.is_set():
            for entry in Path("/proc").glob("[0-9]*/cmdline"):
                with contextlib.suppress(OSError):  # the process has gone
                    self.seen.add(entry.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
            self.rounds += 1

    def __enter__(self) -> CommandLines:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.slow
def test_an_empty_postgresql_database_gets_mlflows_tables(postgres: Postgres, tmp_path: Path) -> None:
    database = postgres.new_database()
    backups = tmp_path / "backups"

    first = _upgrade(database, backups.as_uri())
    assert first.returncode == 0, first.stderr
    assert "empty database: created" in first.stdout
    second = _upgrade(database, backups.as_uri())
    assert second.returncode == 0, second.stderr
    assert "nothing to do" in second.stdout
    assert _state(database) == (HEAD, [])
    assert _files(backups) == []


@pytest.mark.slow
def test_an_older_postgresql_schema_is_dumped_then_upgraded_and_the_password_stays_secret(
    postgres: Postgres, tmp_path: Path
) -> None:
    database = postgres.new_database()
    _database_at(database, OLDER)
    backups = tmp_path / "backups"
    calls = tmp_path / "pg_dump-calls"
    # The wrapper notes pg_dump's command line and whether libpq's PGPASSWORD carries the password.
    record = f'printf "%s\\n" "$*" >> "{calls}"; [ -n "$PGPASSWORD" ] && echo "PGPASSWORD set" >> "{calls}"'
    path = _pg_dump_wrapper(tmp_path / "bin", postgres, record)

    with CommandLines() as command_lines:
        done = _upgrade(database, backups.as_uri(), path=path)
    assert done.returncode == 0, done.stderr
    assert _state(database) == (HEAD, ["kept"])
    [dump] = _files(backups)
    assert dump.name.startswith(f"mlflow-{OLDER}-") and dump.suffix == ".dump"
    assert f"backed up to {backups.as_uri()}/{dump.name}" in done.stdout

    listing = subprocess.run(
        [str(postgres.binaries / "pg_restore"), "--list", str(dump)], capture_output=True, text=True, check=False
    )
    assert listing.returncode == 0, listing.stderr
    assert "Format: CUSTOM" in listing.stdout
    assert "TABLE public experiments" in listing.stdout
    # The dump holds the database as it was: alembic's revision before the upgrade, and the experiment.
    data = subprocess.run(
        [str(postgres.binaries / "pg_restore"), "--data-only", "--file=-", str(dump)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert data.returncode == 0, data.stderr
    assert f"\n{OLDER}\n" in data.stdout and "\tkept\t" in data.stdout

    secrets = (PASSWORD, quote(PASSWORD, safe=""))
    pg_dump_calls = calls.read_text().splitlines()
    assert pg_dump_calls[-1] == "PGPASSWORD set" and len(pg_dump_calls) == 2
    assert "--format=custom" in pg_dump_calls[0]
    for secret in secrets:
        assert secret not in pg_dump_calls[0]
        assert secret not in done.stdout and secret not in done.stderr
        assert not [line for line in command_lines.seen if secret in line]
    assert command_lines.rounds > 0


@pytest.mark.slow
def test_a_failing_pg_dump_leaves_the_postgresql_schema_as_it_was(postgres: Postgres, tmp_path: Path) -> None:
    database = postgres.new_database()
    _database_at(database, OLDER)
    backups = tmp_path / "backups"
    path = _pg_dump_wrapper(tmp_path / "bin", postgres, 'echo "pg_dump: error: connection refused" >&2; exit 1')

    done = _upgrade(database, backups.as_uri(), path=path)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "backup failed, not upgraded: pg_dump exited with 1: pg_dump: error: connection refused" in done.stderr
    assert _state(database) == (OLDER, ["kept"])
    assert _files(backups) == []


@pytest.mark.slow
def test_two_replicas_starting_together_back_up_and_upgrade_once(postgres: Postgres, tmp_path: Path) -> None:
    """The advisory lock: while one replica dumps, the other waits, then finds the schema current."""
    database = postgres.new_database()
    _database_at(database, OLDER)
    backups, calls, release = tmp_path / "backups", tmp_path / "pg_dump-calls", tmp_path / "release"
    # pg_dump holds on until the test releases it: the replica that dumps holds the lock meanwhile.
    hold = f'echo dump >> "{calls}"; while [ ! -e "{release}" ]; do sleep 0.05; done'
    environment = _environment(database, backups.as_uri(), path=_pg_dump_wrapper(tmp_path / "bin", postgres, hold))
    outputs = [tmp_path / f"replica-{index}.out" for index in range(2)]
    replicas = []
    for output in outputs:
        with output.open("w") as stream:
            command = [sys.executable, str(SCRIPT)]
            replicas.append(subprocess.Popen(command, env=environment, stdout=stream, stderr=subprocess.STDOUT))

    def dumps() -> int:
        return len(calls.read_text().splitlines()) if calls.exists() else 0

    # Until one replica dumps while the other waits for the lock (or, without a lock, both dump; or one ends).
    while not (
        (dumps() >= 1 and any("waiting" in output.read_text() for output in outputs))
        or dumps() >= 2
        or any(replica.poll() is not None for replica in replicas)
    ):
        time.sleep(0.05)
    release.touch()
    codes = [replica.wait() for replica in replicas]
    texts = [output.read_text() for output in outputs]

    assert codes == [0, 0], texts
    assert dumps() == 1
    assert len(_files(backups)) == 1
    upgraded = [text for text in texts if ", upgraded" in text]
    waited = [text for text in texts if "waiting" in text and "nothing to do" in text]
    assert len(upgraded) == 1 and len(waited) == 1, texts
    assert _state(database) == (HEAD, ["kept"])
