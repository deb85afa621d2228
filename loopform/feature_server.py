"""The platform's Feast feature server: Feast's own app with the read routes only.

`feast serve` mounts writes next to reads with no authentication: `/write-to-online-store`, `/push`,
`/materialize` and `/materialize-incremental` let any pod that reaches the Service rewrite a card's online
profile (the review did it with one anonymous POST). Nothing on the platform writes through the server: the
materialisation CronJob and `loopform.features` write to Redis through the Feast SDK. So this server builds
Feast's app (`feast.feature_server.get_app`, the one `feast serve` runs) and keeps only the routes in
`READ_ROUTES`; every other path answers 404 (a kept path with another method, 405).

Why not Feast's `auth:` with Permissions (WRITE_ONLINE to the pipeline only)? In Feast 0.67 `auth:` covers every
route: `inject_user_details` answers 401 to a read without a token too, so every model service would need a
token: with `kubernetes`, a mounted ServiceAccount token in each client and the server (which we turn off
everywhere) and TokenReview RBAC for the server; with `oidc`, an identity provider the platform lacks. The write
rule would then be a Permission in the registry, data any registry writer can change. A write route that is not
mounted cannot be misconfigured, and an allow-list keeps a route a later Feast adds off until someone lists it.

Everything else is `feast serve` (`feast.feature_server.start_server`) as Feast 0.67 runs it: gunicorn with
Feast's own application class (uvicorn workers; with metrics, its per-worker resource and freshness hooks), the
Prometheus endpoint on its port (8000 unless `--metrics-port`) from a process of its own, and Feast's
auth managers from feature_store.yaml (an `auth:` there still guards the reads). The other differences: the
metrics port is an option (tests run the server beside another), and gunicorn's control socket is off.
Run it in the feature repository: `python -m loopform.feature_server --metrics`.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from feast import FeatureStore

#: The routes served: online feature reads and the health check the probes call.
READ_ROUTES = frozenset({"/get-online-features", "/health"})
#: `feast serve`'s defaults.
PORT = 6566
METRICS_PORT = 8000
WORKERS = 1
WORKER_CONNECTIONS = 1000
MAX_REQUESTS = 1000
MAX_REQUESTS_JITTER = 50
KEEP_ALIVE_SECONDS = 30
REGISTRY_TTL_SECONDS = 60


def read_only(app: Any) -> Any:
    """Drop every route of Feast's FastAPI app but `READ_ROUTES` (idempotent); fail if Feast lacks one of them."""
    kept = [route for route in app.router.routes if getattr(route, "path", None) in READ_ROUTES]
    missing = READ_ROUTES - {route.path for route in kept}
    if missing:
        raise RuntimeError(f"Feast's feature server has no route {sorted(missing)}: check the Feast version")
    app.router.routes[:] = kept
    return app


def serve(store: FeatureStore, args: argparse.Namespace) -> None:
    """`feast.feature_server.start_server` for `store`, serving `read_only(get_app(store))`."""
    from feast import metrics as feast_metrics
    from feast.feature_server import FeastServeApplication
    from feast.permissions.server.utils import (
        ServerType,
        init_auth_manager,
        init_security_manager,
        str_to_auth_manager_type,
    )

    class ReadOnlyApplication(FeastServeApplication):
        """Feast's gunicorn application; each worker loads the app without its write routes."""

        def load(self) -> Any:
            return read_only(super().load())

    metrics_config = getattr(getattr(store.config, "feature_server", None), "metrics", None)
    metrics = args.metrics or bool(getattr(metrics_config, "enabled", False))
    if metrics:
        # Gunicorn forks the workers: its post_worker_init hook starts their resource and freshness monitors.
        feast_metrics.start_metrics_server(
            store,
            port=args.metrics_port,
            metrics_config=feast_metrics.build_metrics_flags(metrics_config),
            start_resource_monitoring=False,
            start_freshness_monitoring=False,
        )
    auth_type = str_to_auth_manager_type(store.config.auth_config.type)
    init_security_manager(auth_type=auth_type, fs=store)
    init_auth_manager(auth_type=auth_type, server_type=ServerType.REST, auth_config=store.config.auth_config)
    ReadOnlyApplication(
        store=store,
        metrics_enabled=metrics,
        bind=f"{args.host}:{args.port}",
        accesslog=None if args.no_access_log else "-",
        workers=args.workers,
        worker_connections=WORKER_CONNECTIONS,
        max_requests=MAX_REQUESTS,
        max_requests_jitter=MAX_REQUESTS_JITTER,
        keepalive=KEEP_ALIVE_SECONDS,
        registry_ttl_sec=args.registry_ttl_sec,
        # Gunicorn 26's control socket (a Unix socket in $HOME) would let a process in the pod reconfigure it.
        control_socket_disable=True,
    ).run()


def parser() -> argparse.ArgumentParser:
    """`feast serve`'s options that the platform sets, with its defaults, and the metrics port."""
    parser = argparse.ArgumentParser(
        prog="python -m loopform.feature_server",
        description="Feast's feature server with the read routes only, for the feature repository in this folder.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=PORT)
    parser.add_argument("--no-access-log", action="store_true")
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--registry-ttl-sec", type=int, default=REGISTRY_TTL_SECONDS)
    parser.add_argument("--metrics", action="store_true", help="serve Feast's Prometheus metrics")
    parser.add_argument("--metrics-port", type=int, default=METRICS_PORT)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = parser().parse_args(argv)
    from feast import FeatureStore

    serve(FeatureStore(repo_path="."), args)


if __name__ == "__main__":
    main()
