"""Create or update MLflow's basic-auth users and their grants, before the server starts.

The MLflow server pods run this as an init container (after the schema upgrade), on every start: it is
idempotent, so a rerun changes nothing, and a rotated password (a new Secret rolls the pods) reaches the user
store on the next start. It writes the auth tables directly through MLflow's own store (`init_db` migrates
them first), so it needs no running server and no admin session: the admin itself is created here, and its
password follows the config file too (the auth app applies `admin_password` only when it creates the admin).

The auth tables live in a database of their own beside the tracking database (its schema upgrades and backups
stay MLflow's alone): on PostgreSQL it is created here when missing, connected as the tracking database's user.

Environment (the config and the users file are mounted from a Secret; nothing secret is printed):
  MLFLOW_AUTH_CONFIG_PATH   the auth app's ini ([mlflow] database_uri, admin_username, admin_password, ...)
  LOOPFORM_AUTH_USERS       a JSON file {"<user>": {"password": "...", "grants": [[type, pattern, permission]]}}
  MLFLOW_BACKEND_STORE_URI  the tracking database, to create the auth database from (PostgreSQL only)

Users the file does not name (people an admin added by hand) are left alone; a named user's grants of the
resource types the file lists are set to exactly the listed ones. Exit status: 0 done; 1 error; 2 configuration.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Any

USERS_VARIABLE = "LOOPFORM_AUTH_USERS"
TRACKING_VARIABLE = "MLFLOW_BACKEND_STORE_URI"
ATTEMPTS = 5  # replicas starting together race on the same rows: the loser retries and finds them current


def ensure_database(database_uri: str, tracking_uri: str | None) -> None:
    """Create the auth database on the tracking database's PostgreSQL server when it is missing."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    url = make_url(database_uri)
    if not url.drivername.startswith("postgresql") or not tracking_uri:
        return  # SQLite creates its file itself
    engine = create_engine(tracking_uri, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            exists = connection.execute(text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": url.database})
            if exists.first() is None:
                quoted = engine.dialect.identifier_preparer.quote_identifier(url.database)
                connection.execute(text(f"CREATE DATABASE {quoted}"))
    finally:
        engine.dispose()


def _store(database_uri: str) -> Any:
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    store.init_db(database_uri)
    return store


def ensure_user(store: Any, username: str, password: str, is_admin: bool) -> str:
    """Create the user, or set its password and admin flag; returns what it did."""
    if not store.has_user(username, use_primary=True):
        store.create_user(username, password, is_admin=is_admin)
        return "created"
    if store.authenticate_user(username, password, use_primary=True) and store.get_user(username).is_admin == is_admin:
        return "current"
    store.update_user(username, password=password, is_admin=is_admin)
    return "updated"


def ensure_grants(store: Any, username: str, grants: list[tuple[str, str, str]]) -> None:
    """Make the user's grants of the listed resource types exactly `grants` (revoke others, add missing)."""
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    wanted = {(kind, pattern): permission for kind, pattern, permission in grants}
    user = store.get_user(username)
    workspace = SqlAlchemyStore._get_active_workspace_name()
    kinds = {kind for kind, _ in wanted}
    present = {
        (row.resource_type, row.resource_pattern): row.permission
        for row in store.list_grants(user.id, workspace, kinds)
        if row.resource_type in kinds
    }
    for (kind, pattern), permission in present.items():
        if wanted.get((kind, pattern)) != permission:
            store.revoke_user_resource_permission(username, kind, pattern)
    for (kind, pattern), permission in wanted.items():
        if present.get((kind, pattern)) != permission:
            store.grant_user_resource_permission(username, kind, pattern, permission)


def bootstrap(
    database_uri: str,
    admin: tuple[str, str],
    users: Mapping[str, Mapping[str, Any]],
    tracking_uri: str | None = None,
) -> dict[str, str]:
    """Apply the admin and `users` to the auth store at `database_uri`; returns each user's outcome."""
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(1, ATTEMPTS + 1):
        try:
            ensure_database(database_uri, tracking_uri)
            store = _store(database_uri)
            outcome = {admin[0]: ensure_user(store, admin[0], admin[1], is_admin=True)}
            for username, entry in sorted(users.items()):
                outcome[username] = ensure_user(store, username, entry["password"], is_admin=False)
                ensure_grants(store, username, [tuple(grant) for grant in entry.get("grants", [])])
            return outcome
        except (MlflowException, SQLAlchemyError):
            if attempt == ATTEMPTS:
                raise
            time.sleep(attempt)
    raise AssertionError("unreachable")


def main() -> int:
    from mlflow.server.auth.config import read_auth_config

    users_path = os.environ.get(USERS_VARIABLE)
    config = read_auth_config()
    if not users_path or not config.admin_username or not config.admin_password:
        print(f"set MLFLOW_AUTH_CONFIG_PATH (with admin_username, admin_password) and {USERS_VARIABLE}")
        return 2
    with open(users_path, encoding="utf-8") as handle:
        users = json.load(handle)
    admin = (config.admin_username, config.admin_password)
    outcome = bootstrap(config.database_uri, admin, users, os.environ.get(TRACKING_VARIABLE))
    for username, done in outcome.items():
        print(f"user {username}: {done}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
