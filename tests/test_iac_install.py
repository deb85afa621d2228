"""The IaC install: the Pulumi program, `render`, `validate`, `check` and `diff` run on the base dependencies alone.

Preview and deploy jobs install only pyproject.toml's base dependencies (`pip install -c constraints.txt -e .`);
the data loop's packages are the `runtime` extra. These tests run the IaC entry points in a subprocess where every
module outside the base install cannot be imported: a `sitecustomize` on PYTHONPATH puts a finder first on
sys.meta_path that raises ModuleNotFoundError for them and logs each attempt, in the policy pack's own subprocess
too. An import from the project's code fails the test even where the code swallows the error; an optional import
inside a base dependency (opentelemetry probing for psutil) is that dependency's business, as it is in the real
install. A runtime command in the same environment must say which extra to install instead of a traceback.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import json
import os
import subprocess
import sys
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from loopform.cli import build_parser
from loopform.extras import INSTALL_RUNTIME, RUNTIME_COMMANDS, RUNTIME_MODULES
from loopform.image_ref import ImageRef
from loopform.spec import IMAGE_REGISTRY, load_stack
from tests import pins, records
from tests.helpers_project import copy_project

ROOT = Path(__file__).resolve().parent.parent
#: The repository's own top-level packages (the editable install maps them to the loopform distribution).
PROJECT_MODULES = frozenset({"loopform", "components", "policies", "models", "bentos"})
#: The packages the issue names as the runtime: none may be part of the base install.
NAMED_RUNTIME = ("mlflow", "feast", "evidently", "torch", "bentoml", "pandas", "sklearn", "pyarrow")
#: The commands that run on the base install; with RUNTIME_COMMANDS, every subcommand of the CLI.
IAC_COMMANDS = frozenset({"render", "validate", "check", "diff", "new", "keygen", "images", "pin-images"})
#: The modules the IaC entry points are: the Pulumi program's components and the commands' modules.
#: Scripts the platform mounts into other images (the MLflow image's schema upgrade): not loopform's imports.
SCRIPTS = ROOT / "components" / "scripts"
ENTRY_MODULES = (
    "components.platform",
    "loopform.spec",
    "loopform.render",
    "loopform.check",
    "loopform.diff",
    "loopform.cli",
)

SITECUSTOMIZE = '''
"""Installed by tests/test_iac_install.py: modules outside the IaC install cannot be imported."""
import importlib.abc
import os
import sys

BLOCKED = frozenset(os.environ["LOOPFORM_TEST_BLOCKED"].split(","))
LOG = os.environ["LOOPFORM_TEST_BLOCKED_LOG"]


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] not in BLOCKED:
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith(("<frozen", __file__)):
            frame = frame.f_back
        importer = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"
        with open(LOG, "a") as log:
            log.write(f"{name}\\t{importer}\\n")
        raise ModuleNotFoundError(f"No module named {name!r} (not in the IaC install)", name=name)


sys.meta_path.insert(0, Blocker())
'''


def base_distributions() -> set[str]:
    """The base install: pyproject.toml's dependencies and theirs, as installed here (no extras), and loopform."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    todo = [Requirement(line) for line in pyproject["project"]["dependencies"]]
    found = {"loopform"}
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in found or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        found.add(name)
        todo += [Requirement(line) for line in importlib.metadata.requires(name) or []]
    return found


def blocked_modules() -> frozenset[str]:
    """Every top-level module installed here that no distribution of the base install provides."""
    base = base_distributions()
    return frozenset(
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if module.isidentifier()
        and module not in PROJECT_MODULES
        and module not in sys.stdlib_module_names
        and not any(canonicalize_name(dist) in base for dist in dists)
    )


@pytest.fixture(scope="module")
def blocked() -> frozenset[str]:
    return blocked_modules()


class Blocked:
    """Runs Python in an environment where the modules outside the IaC install cannot be imported."""

    def __init__(self, folder: Path, modules: frozenset[str]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
        self.log = folder / "blocked.log"
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])),
            "LOOPFORM_TEST_BLOCKED": ",".join(sorted(modules)),
            "LOOPFORM_TEST_BLOCKED_LOG": str(self.log),
        }

    def run(self, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args], cwd=cwd, env=self.env, capture_output=True, text=True, timeout=300
        )

    def cli(self, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
        return self.run("-m", "loopform.cli", *args, cwd=cwd)

    def attempts(self) -> list[tuple[str, str]]:
        """(module, importer) of each blocked import tried so far."""
        if not self.log.exists():
            return []
        lines = self.log.read_text().splitlines()
        return [(module, importer) for module, _, importer in (line.partition("\t") for line in lines)]

    def reached_from_project(self) -> list[str]:
        """The blocked imports the project's code tried (a dependency's optional probe is not counted)."""
        installed = ("site-packages", "dist-packages")
        return [
            f"{module} from {importer}"
            for module, importer in self.attempts()
            if not any(folder in Path(importer).parts for folder in installed)
        ]


@pytest.fixture
def iac(tmp_path: Path, blocked: frozenset[str]) -> Blocked:
    return Blocked(tmp_path / "blocker", blocked)


def _project(tmp_path: Path) -> Path:
    """A user's copy of the project, for commands that write into it."""
    (tmp_path / "project").mkdir()
    return copy_project(tmp_path / "project")


def _ok(result: subprocess.CompletedProcess[str], iac: Blocked) -> None:
    assert result.returncode == 0, f"exit {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert iac.reached_from_project() == []


def test_the_runtime_is_not_in_the_base_install(blocked: frozenset[str]) -> None:
    """No base dependency pulls in a runtime package, and loopform's guard names only modules the base lacks."""
    assert set(NAMED_RUNTIME) - blocked == set()
    assert RUNTIME_MODULES - blocked == set()


def test_the_blocker_raises_module_not_found_naming_the_module(iac: Blocked) -> None:
    result = iac.run("-c", "import pandas")
    assert result.returncode == 1
    assert "ModuleNotFoundError: No module named 'pandas' (not in the IaC install)" in result.stderr
    assert iac.attempts() == [("pandas", "<string>:1")]
    assert iac.reached_from_project() == ["pandas from <string>:1"]


def test_the_entry_points_import_without_the_runtime(iac: Blocked) -> None:
    _ok(iac.run("-c", "; ".join(f"import {module}" for module in ENTRY_MODULES)), iac)


def test_render_validate_pin_and_check_without_the_runtime(iac: Blocked, tmp_path: Path) -> None:
    """`render` runs the Pulumi program (__main__.py) under mocks; `check` runs the policy pack in its own process.
    Prod is refused until pinned, then pinned as the release workflow does it: our images by repository, the
    upstream ones that `images --unpinned` lists by repository:tag (stand-in digests: resolving needs a registry)."""
    project = _project(tmp_path)
    out = tmp_path / "rendered"
    _ok(iac.cli("render", "--stack", "prod", "--out", str(out), cwd=project), iac)
    assert (out / "_tree.txt").is_file()
    _ok(iac.cli("validate", "--stack", "prod", cwd=project), iac)
    refused = iac.cli("check", "--stack", "prod", cwd=project)
    assert refused.returncode == 1 and "images-pinned-by-digest" in refused.stdout, refused.stdout[-3000:]

    listed = iac.cli("images", "--stack", "prod", "--unpinned", cwd=project)
    _ok(listed, iac)
    digests = {
        ImageRef.parse(image).repository if image.startswith(IMAGE_REGISTRY) else image: pins.digest(image)
        for image in listed.stdout.split()
    }
    assert "prom/pushgateway:v1.11.1" in digests and f"{IMAGE_REGISTRY}/pipeline" in digests
    (tmp_path / "digests.json").write_text(json.dumps(digests))
    _ok(iac.cli("pin-images", "--stack", "prod", "--digests", str(tmp_path / "digests.json"), cwd=project), iac)
    again = iac.cli("images", "--stack", "prod", "--unpinned", cwd=project)
    _ok(again, iac)
    assert again.stdout == ""  # nothing left to resolve: not even an empty line
    checked = iac.cli("check", "--stack", "prod", cwd=project)
    _ok(checked, iac)
    assert "0 mandatory, 0 advisory" in checked.stdout


def test_diff_without_the_runtime(iac: Blocked, tmp_path: Path) -> None:
    """The offline preview renders the stack at the base commit and in the working tree, then runs the pack."""
    project = _project(tmp_path)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "init", "--quiet"], cwd=project, check=True)
    subprocess.run([*git, "add", "."], cwd=project, check=True)
    subprocess.run([*git, "commit", "--quiet", "-m", "base"], cwd=project, check=True)
    result = iac.cli("diff", "--stack", "prod", "--base", "HEAD", cwd=project)
    _ok(result, iac)
    assert "Resources" in result.stdout and "Policy pack" in result.stdout  # rendered twice, then judged


def test_a_released_model_renders_and_checks_without_the_runtime(iac: Blocked, tmp_path: Path) -> None:
    """A signed release record adds the model's service: the record's verification and the service component run on
    the base install too, as a pull request's preview after `loopform promote` does."""
    project = _project(tmp_path)
    path = pins.write_pinned(project)
    document = yaml.safe_load(path.read_text())
    now = datetime.now(UTC).replace(microsecond=0)
    sealed = records.evidence(created=now - timedelta(hours=1))
    image = load_stack(path).services.image  # by digest, as `loopform promote` records it from a pinned prod
    release = records.release("prod", image=image, released=now, sealed=sealed)
    document["config"]["loopform:platform"]["models"]["fraud"]["release"] = release
    path.write_text(yaml.safe_dump(document))
    config_path = project / "policies" / "config" / "prod.json"
    config = json.loads(config_path.read_text())
    config["release-signed"]["trusted_keys"] = records.TRUSTED
    config_path.write_text(json.dumps(config))

    rendered = iac.cli("render", "--stack", "prod", cwd=project)
    _ok(rendered, iac)
    assert (project / "deploy" / "prod" / "fraud-service.deployment.yaml").is_file()
    checked = iac.cli("check", "--stack", "prod", cwd=project)
    _ok(checked, iac)
    assert "0 mandatory" in checked.stdout


def test_the_other_base_commands_run_without_the_runtime(iac: Blocked, tmp_path: Path) -> None:
    project = _project(tmp_path)
    _ok(iac.cli("new", "model", "demo", "--task", "regression", cwd=project), iac)
    _ok(iac.cli("keygen", "--out", str(tmp_path / "release.pem"), cwd=project), iac)
    digests = tmp_path / "digests.json"
    digests.write_text(json.dumps({"ghcr.io/loopform/pipeline": "sha256:" + "1" * 64}))
    _ok(iac.cli("pin-images", "--stack", "prod", "--digests", str(digests), cwd=project), iac)


def test_every_command_is_either_a_base_or_a_runtime_command() -> None:
    (commands,) = (a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert not IAC_COMMANDS & RUNTIME_COMMANDS
    assert set(commands) == IAC_COMMANDS | RUNTIME_COMMANDS


RUNTIME_INVOCATIONS = {
    "up": ["up", "--stack", "local"],
    "step": ["step", "train", "--stack", "dev", "--model", "fraud", "--run-dir", "run"],
    "serve": ["serve", "fraud"],
    "ingest": ["ingest", "--stack", "local", "--synthetic", "10"],
    "monitor": ["monitor", "fraud", "--stack", "prod", "--reference", "reference.parquet"],
    "promote": ["promote", "fraud", "1", "--to", "staging"],
    "doctor": ["doctor", "--stack", "prod"],
}


def test_every_runtime_command_is_tried_below() -> None:
    assert set(RUNTIME_INVOCATIONS) == RUNTIME_COMMANDS


@pytest.mark.parametrize("command", sorted(RUNTIME_INVOCATIONS))
def test_a_runtime_command_without_the_runtime_says_which_extra_to_install(
    iac: Blocked, tmp_path: Path, command: str
) -> None:
    project = _project(tmp_path)
    result = iac.cli(*RUNTIME_INVOCATIONS[command], cwd=project)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: loopform {command}: this command needs loopform's runtime extra" in result.stderr
    assert INSTALL_RUNTIME in result.stderr
    assert "Traceback" not in result.stderr
    assert not (project / ".loopform").exists()  # it stopped before touching anything


def _third_party_imports() -> dict[str, set[str]]:
    """Each top-level module the project's code imports that is neither the project's nor the standard library's,
    with the files that import it."""
    files = [ROOT / "__main__.py"] + [
        path
        for folder in sorted(PROJECT_MODULES)
        for path in sorted((ROOT / folder).rglob("*.py"))
        if SCRIPTS not in path.parents
    ]
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.partition(".")[0]
                if top not in PROJECT_MODULES and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_the_guard_knows_every_runtime_module_the_code_imports(blocked: frozenset[str]) -> None:
    """A module the code imports from outside the base install is one the guard turns into the install hint."""
    unknown = {
        module: sorted(files)
        for module, files in _third_party_imports().items()
        if module in blocked and module not in RUNTIME_MODULES
    }
    assert unknown == {}, "add these to loopform.extras.RUNTIME_MODULES (or to the base install)"
