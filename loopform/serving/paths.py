"""Bounded request-path labels: every path the service does not serve is folded into one, `/__unknown__`.

BentoML's HTTP metrics label each request by its raw path, so 50 random 404 paths made 50 new series per metric
(1,000 in all), and a scanner could grow /metrics without bound. BentoML's metrics middleware is the outermost
of its app and reads the path before any middleware added with `add_asgi_middleware` runs, so the folding wraps
the whole app instead: the service class of `loopform.serving.bento` (passed to
`bentoml.service(service_class=...)`) returns the app of `to_asgi`, what BentoML's worker serves, behind
`FoldUnknownPaths`. An unknown path is rewritten in the ASGI scope before anything sees it; the router then
answers it 404 like any unknown path.

Known paths are the app's exact routes (APIs, health, /metrics, the OpenAPI document, the index) and the files of
its static folders, a set fixed when the app is built. A path under a static folder that names no file is unknown.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loopform.serving.auth import ASGIApp

UNKNOWN_PATH = "/__unknown__"


def known_paths(app: Any) -> frozenset[str]:
    """Every path a Starlette app serves: its plain routes' paths and each file under its static mounts."""
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    paths: set[str] = set()
    for route in app.router.routes:
        if isinstance(route, Route) and not route.param_convertors:
            paths.add(route.path)
        elif isinstance(route, Mount) and isinstance(route.app, StaticFiles) and route.app.directory is not None:
            root = Path(route.app.directory)
            paths.update(
                f"{route.path}/{file.relative_to(root).as_posix()}" for file in root.rglob("*") if file.is_file()
            )
        elif isinstance(route, Route | Mount):
            raise ValueError(f"route {route.path!r} takes parameters: its paths cannot be listed to bound labels")
    return frozenset(paths)


class FoldUnknownPaths:
    """ASGI wrapper: requests to paths the app does not serve reach it (and its metrics) as `/__unknown__`."""

    def __init__(self, app: ASGIApp, known: frozenset[str]) -> None:
        self.app = app
        self.known = known

    async def __call__(self, scope: dict[str, Any], receive: ASGIApp, send: ASGIApp) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"] not in self.known:
            scope = {**scope, "path": UNKNOWN_PATH, "raw_path": UNKNOWN_PATH.encode()}
        await self.app(scope, receive, send)
