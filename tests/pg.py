"""A real PostgreSQL server for tests, from Debian's packages (`.ci/run` installs them).

PostgreSQL refuses to run as root, so as root the server runs as the `postgres` user in a folder
of its own under /tmp (pytest's folders are private to root).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


def server_binaries() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists() and (candidate / "pg_ctl").exists():
            return candidate
    return None


#: Skips where the server is missing, except in CI (`CI` set), where `.ci/run` installs it: there it must run.
needs_postgres = pytest.mark.skipif(
    server_binaries() is None and not os.environ.get("CI"),
    reason="PostgreSQL server binaries missing (apt-get install postgresql)",
)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class Server:
    """A running server: superuser `user` with `password`, TCP on 127.0.0.1:`port`, its socket folder."""

    binaries: Path
    port: int
    socket_dir: Path
    user: str
    password: str
    run: dict[str, Any]

    def env(self, **extra: str) -> dict[str, str]:
        """An environment with the PostgreSQL client tools on PATH (psql, pg_isready, pg_dump)."""
        return {"PATH": f"{self.binaries}:/usr/bin:/bin", **extra}

    def psql(self, sql: str, *, user: str | None = None, password: str | None = None, database: str = "postgres"):
        command = ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", user or self.user, "-d", database]
        env = self.env(PGPASSWORD=password if password is not None else self.password)
        return subprocess.run([*command, "-tAc", sql], env=env, **self.run)


def _demote(user: str) -> dict[str, Any]:
    if os.geteuid() != 0:
        return {}
    entry = pwd.getpwnam(user)

    def demote() -> None:
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)

    return {"preexec_fn": demote}


@contextmanager
def postgres(user: str = "mlflow", password: str = "old-password") -> Iterator[Server]:
    """Start a PostgreSQL server with superuser `user`, local connections trusted, TCP by scram password."""
    binaries = server_binaries()
    assert binaries is not None, "PostgreSQL server binaries missing: .ci/run installs Debian's postgresql"
    owner = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    folder = Path(tempfile.mkdtemp(prefix="loopform-pg-", dir="/tmp"))
    data, socket_dir, password_file = folder / "data", folder / "socket", folder / "pw"
    socket_dir.mkdir()
    password_file.write_text(password + "\n")
    if os.geteuid() == 0:
        for path in (folder, socket_dir, password_file):
            shutil.chown(path, owner)
    run: dict[str, Any] = {"capture_output": True, "text": True, "timeout": 120, **_demote(owner)}
    initdb = [str(binaries / "initdb"), "-D", str(data), "-U", user, "--pwfile", str(password_file)]
    done = subprocess.run([*initdb, "--auth-local=trust", "--auth-host=scram-sha-256"], **run)
    assert done.returncode == 0, done.stderr
    port = _free_port()
    options = f"-k {socket_dir} -p {port} -c listen_addresses=127.0.0.1"
    log = folder / "log"
    done = subprocess.run(
        [str(binaries / "pg_ctl"), "-D", str(data), "-o", options, "-w", "-l", str(log), "start"], **run
    )
    assert done.returncode == 0, done.stderr + (log.read_text() if log.exists() else "")
    try:
        yield Server(binaries, port, socket_dir, user, password, run)
    finally:
        subprocess.run([str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], **run)
        shutil.rmtree(folder, ignore_errors=True)
