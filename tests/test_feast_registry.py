"""Feast's SQL registry on the platform's PostgreSQL: the Job makes its role and database, Feast writes it.

The rendered Job's command and SQL run against a real PostgreSQL as the platform's database user
would connect (libpq variables from its Secret), then the real `feast apply` writes the registry
through the URL the FeatureStore puts in its Secret, as the `feast` role.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from components.feature_store import (
    REGISTRY_DATABASE_COMMAND,
    FeatureStore,
    FeatureStoreArgs,
    feature_files,
    registry_url,
)
from components.registry import DatabaseEndpoint
from loopform.features import REGISTRY_URL_ENV, FeatureRepo, cluster_config
from loopform.render import render_components
from loopform.spec import FeatureStoreSpec
from models.fraud.contract import CONTRACT

from .pg import needs_postgres, postgres

ROOT = Path(__file__).resolve().parent.parent
DATABASE = DatabaseEndpoint(host="db.internal", port=5432, sslmode="require", admin_secret="platform-db")


def _rendered() -> dict[str, Any]:
    files = feature_files(ROOT, {"fraud": "models/fraud"})
    args = FeatureStoreArgs(
        spec=FeatureStoreSpec(),
        feature_files=files,
        namespace="ml",
        registry_database=DATABASE,
        registry_password="p@ss/w:rd",
        registry_client_namespaces=["pipelines", "serving"],
        redis_password="redis-token",
    )
    return {r.name: r for r in render_components(lambda: FeatureStore("fs", args))}


def test_the_registry_secret_reaches_every_namespace_that_reads_it_and_feast_reads_it_from_there() -> None:
    resources = _rendered()
    for namespace in ("ml", "pipelines", "serving"):
        secret = resources[f"fs-registry-{namespace}"].manifest()
        assert secret["metadata"]["name"] == "fs-registry" and set(secret["stringData"]) == {"url", "password"}
    for workload in ("fs-apply", "fs-server"):
        env = resources[workload].inputs["spec"]["template"]["spec"]["containers"][0]["env"]
        assert {"name": REGISTRY_URL_ENV, "valueFrom": {"secretKeyRef": {"name": "fs-registry", "key": "url"}}} in env
    job = resources["fs-registry-db"].manifest()
    assert job["spec"]["template"]["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "platform-db"}}]
    assert resources["fs-registry-db"].urn in resources["fs-apply"].dependencies
    # The URL escapes the password and names the psycopg2 driver the images install.
    assert registry_url(FeatureStoreSpec(), DATABASE, "p@ss/w:rd") == (
        "postgresql+psycopg2://feast:p%40ss%2Fw%3Ard@db.internal:5432/feast?sslmode=require"
    )
    assert f"${{{REGISTRY_URL_ENV}}}" in cluster_config(FeatureStoreSpec())


def _job_env(server, password: str, admin: tuple[str, str] | None = None) -> dict[str, str]:
    """The Job container's environment: the rendered values, the platform user's libpq variables."""
    container = _rendered()["fs-registry-db"].inputs["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    user, admin_password = admin or (server.user, server.password)
    return server.env(
        **env,
        FEAST_REGISTRY_PASSWORD=password,
        PGHOST="127.0.0.1",
        PGPORT=str(server.port),
        PGUSER=user,
        PGPASSWORD=admin_password,
        PGDATABASE="mlflow",
    )


@pytest.mark.slow
@needs_postgres
def test_the_job_works_for_a_managed_databases_user_that_is_no_superuser() -> None:
    """RDS's master user has CREATEROLE and CREATEDB, not superuser: CREATE DATABASE ... OWNER needs the GRANT."""
    with postgres(user="mlflow", password="admin-pw") as server:
        assert server.psql("CREATE ROLE platform LOGIN CREATEROLE CREATEDB PASSWORD 'platform-pw'").returncode == 0
        assert server.psql("CREATE DATABASE mlflow OWNER platform").returncode == 0
        for _ in range(2):  # idempotent
            env = _job_env(server, "feast-pw", admin=("platform", "platform-pw"))
            done = subprocess.run(REGISTRY_DATABASE_COMMAND, env=env, **server.run)
            assert done.returncode == 0, done.stderr
        owner = server.psql("select pg_get_userbyid(datdba) from pg_database where datname = 'feast'")
        assert owner.stdout.strip() == "feast"
        assert server.psql("select 1", user="feast", password="feast-pw", database="feast").returncode == 0


@pytest.mark.slow
@needs_postgres
def test_the_job_creates_role_and_database_then_feast_applies_into_them(tmp_path: Path) -> None:
    with postgres(user="mlflow", password="admin-pw") as server:
        assert server.psql("CREATE DATABASE mlflow").returncode == 0
        for password in ("first p@ss", "rotated/pass:word"):  # the second run is a rotation: same Job, new password
            done = subprocess.run(REGISTRY_DATABASE_COMMAND, env=_job_env(server, password), **server.run)
            assert done.returncode == 0, done.stderr
            assert (
                server.psql("select current_user", user="feast", password=password, database="feast").stdout.strip()
                == "feast"
            )
        assert server.psql("select 1", user="feast", password="first p@ss", database="feast").returncode != 0
        assert "password" not in " ".join(REGISTRY_DATABASE_COMMAND)  # read with \getenv, in no argv

        # feast apply (the real CLI) with the cluster's feature_store.yaml and the URL of the registry Secret.
        url = registry_url(
            FeatureStoreSpec(), DatabaseEndpoint("127.0.0.1", server.port, None, "x"), "rotated/pass:word"
        )
        FeatureRepo(tmp_path / "repo", CONTRACT, config=cluster_config(FeatureStoreSpec())).configure()
        env = {
            **os.environ,
            REGISTRY_URL_ENV: url,
            "REDIS_CONNECTION_STRING": "localhost:6379",
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        }
        done = subprocess.run(["feast", "apply"], cwd=tmp_path / "repo", env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        services = server.psql("select feature_service_name from feature_services", user="feast",
                               password="rotated/pass:word", database="feast")  # fmt: skip
        assert services.stdout.split() == ["fraud_v1"]
