"""What a command needs beyond the base install, so a missing runtime package says how to install it.

The base install is the IaC set (pyproject.toml's dependencies): the Pulumi program, `render`, `validate`,
`check` and `diff` need nothing else, and preview jobs install only that. The data loop's packages come with the
`runtime` extra; a runtime command run without it would otherwise stop on a traceback deep in an import.
"""

from __future__ import annotations

import importlib.util

RUNTIME_EXTRA = "runtime"
INSTALL_RUNTIME = f'pip install -c constraints.txt -e ".[{RUNTIME_EXTRA}]"'
"""The install command, run in the repository (`make install` installs it too, with the dev tools)."""

RUNTIME_COMMANDS = frozenset({"doctor", "ingest", "monitor", "promote", "serve", "step", "up"})
"""The commands that run the data loop (or, `doctor`, talk to a cluster): they need the runtime extra. The rest
(`render`, `validate`, `check`, `diff`, `new`, `keygen`, `images`, `pin-images`) run on the base install."""

RUNTIME_MODULES = frozenset(
    {
        "bentoml",
        "duckdb",
        "evidently",
        "feast",
        "fsspec",
        "httpx",
        "kubernetes",
        "mlflow",
        "numpy",
        "pandas",
        "prometheus_client",
        "pyarrow",
        "redis",
        "scipy",
        "sklearn",
        "starlette",
        "torch",
    }
)
"""Top-level modules that loopform imports from the runtime extra and the base install lacks
(tests/test_iac_install.py checks this against the imports in the code and the IaC install set)."""


def missing_runtime(error: ModuleNotFoundError) -> str | None:
    """What to install when `error` is an import of a runtime package; None for any other missing module."""
    module = (error.name or "").partition(".")[0]
    if module not in RUNTIME_MODULES:
        return None
    return (
        f"this command needs loopform's {RUNTIME_EXTRA} extra, which is not installed (no module {module!r}): "
        f"{INSTALL_RUNTIME}"
    )


def require_runtime() -> None:
    """Raise ModuleNotFoundError for the first runtime module that is not installed, before a command starts:
    `loopform up` would otherwise empty its workdir and then stop on the import."""
    for module in sorted(RUNTIME_MODULES):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"No module named {module!r}", name=module)
