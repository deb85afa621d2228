"""Each image's install set contains what its programs import for `s3://`, at the versions the tests ran with,
and the torch build its hardware needs: the CPU build in every image but the CUDA pipeline image's.

The install set of an image is what pip resolves for the install arguments written in the image's own
definition: the `pip install` line of a Dockerfile (with the files it installs from mapped back through its
COPY lines) and the Bento's locked `bentos/requirements.txt`. pip resolves it with `--dry-run --report` against the
repository's constraints.txt, so editing a Dockerfile, a requirements file, pyproject.toml's extras, the
bentofile or constraints.txt changes what is tested. The IaC install the preview and deploy jobs run
(`pip install -c constraints.txt -e .`, the base dependencies alone) is resolved the same way: it holds none of
the runtime. The resolution needs a package index: these tests (marked slow) are skipped, with the reason, only
where pip reaches none and CI is unset.
"""

from __future__ import annotations

import fnmatch
import functools
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import quote, unquote, urlparse

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
BENTOFILE = ROOT / "bentos" / "fraud" / "bentofile.yaml"
#: The Bento's install set as written by hand (top-level pins), and the same set resolved with every dependency
#: pinned, which every bentofile installs (`python.requirements_txt`) and `bentoml build` locks.
BENTO_REQUIREMENTS_IN = ROOT / "bentos" / "requirements.in"
BENTO_REQUIREMENTS = ROOT / "bentos" / "requirements.txt"
#: Where the Bento's CPU build of torch comes from: its wheel, named by URL. A bentofile index (`extra_index_url`)
#: would be the lock's (uv's) first choice for every package it also hosts (numpy, pillow, ...), failing the lock
#: where it lacks a pinned version.
TORCH_CPU_WHEELS = "https://download.pytorch.org/whl/cpu/"
REGENERATE = os.environ.get("LOOPFORM_REGENERATE_GOLDEN") == "1"
IMAGES_DIR = ROOT / "images"
DOCKERFILES = {name: IMAGES_DIR / name / "Dockerfile" for name in ("pipeline", "pipeline-cuda", "serving", "mlflow")}
# Index hosts an image names that this machine (and CI) cannot reach. The PyTorch CPU index only offers the
# CPU build of the same pinned torch, which pip finds here through this machine's pip configuration.
UNREACHABLE_INDEX_HOSTS = {"download.pytorch.org"}
# Environment variables that change where pip finds packages (the rest, such as PIP_CERT, only how it fetches).
_PIP_SOURCE_ENV = ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_CONSTRAINT")
# The images whose torch is PyPI's Linux wheel, the CUDA build; every other image with torch has the CPU build.
CUDA_IMAGES = {"pipeline-cuda"}

# What each image's programs import, for s3:// above all: Feast's S3 registry imports boto3, pandas/pyarrow
# open s3:// through s3fs, MLflow's S3 artifact repository imports boto3, the server's backend is PostgreSQL.
REQUIRED = {
    "pipeline": {"feast", "boto3", "s3fs", "redis", "torch", "mlflow"},
    "pipeline-cuda": {"feast", "boto3", "s3fs", "redis", "torch", "mlflow"},
    "serving": {"bentoml", "boto3", "s3fs", "redis", "feast", "mlflow", "torch"},
    "mlflow": {"mlflow", "boto3", "psycopg2-binary"},
    "bento": {"bentoml", "boto3", "s3fs", "redis", "feast", "mlflow", "torch"},
    "bento-requirements.in": {"bentoml", "boto3", "s3fs", "redis", "feast", "mlflow", "torch"},
    "iac": {"pulumi", "pulumi-kubernetes", "pulumi-policy", "pydantic", "hera", "cryptography"},
}
IMAGES = sorted(REQUIRED)

# pip install options that do not change what is resolved.
_PIP_FLAGS_IGNORED = {
    "--no-cache-dir",
    "--no-compile",
    "--quiet",
    "-q",
    "--disable-pip-version-check",
    "--root-user-action=ignore",
    "--upgrade",
    "-U",
}
_PIP_OPTIONS_WITH_PATH = {"-c": "-c", "--constraint": "-c", "-r": "-r", "--requirement": "-r"}
_PIP_OPTIONS_WITH_URL = {"--extra-index-url", "--index-url", "-i", "--find-links", "-f"}


def constraint_pins() -> dict[str, Requirement]:
    pins: dict[str, Requirement] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            pins[canonicalize_name(req.name)] = req
    return pins


def pinned_version(req: Requirement) -> str | None:
    """The version of an exact `name==X` pin, else None."""
    specs = list(req.specifier)
    if len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version:
        return specs[0].version
    return None


# --- Dockerfiles -------------------------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        keyword, _, rest = buf.partition(" ")
        out.append((keyword.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path}: a continuation line runs off the end"
    return out


def _image_path(workdir: PurePosixPath, path: str) -> PurePosixPath:
    p = PurePosixPath(path)
    return p if p.is_absolute() else workdir / p


def _copy(path: Path, args: str) -> tuple[list[str], str]:
    """(sources, destination) of a COPY line; its sources are paths in the build context."""
    parts = json.loads(args) if args.startswith("[") else shlex.split(args)
    assert not any(p.startswith("--from") for p in parts), f"{path}: COPY --from is not the repository"
    *sources, dest = [p for p in parts if not p.startswith("--")]
    return sources, dest


def _is_pip_install(tokens: list[str]) -> int | None:
    """Index of the first argument after `pip install` / `python -m pip install`, else None."""
    for i, tok in enumerate(tokens[:-1]):
        if PurePosixPath(tok).name in {"pip", "pip3"} and tokens[i + 1] == "install":
            return i + 2
    return None


def dockerfile_install_args(path: Path) -> tuple[str, list[str]]:
    """The base image and the `pip install` arguments of a Dockerfile, with image paths mapped to the repository.

    A file in the image maps back to the repository through the COPY line that put it there (the build
    context is the repository root); a local project directory maps through its pyproject.toml.
    """
    workdir = PurePosixPath("/")
    copies: dict[PurePosixPath, Path] = {}  # image path -> repository path (file or directory)
    base = ""
    installs: list[tuple[PurePosixPath, list[str]]] = []  # (working directory, arguments)
    for keyword, args in dockerfile_instructions(path):
        if keyword == "FROM":
            base = args.split()[0]
        elif keyword == "WORKDIR":
            workdir = _image_path(workdir, args)
        elif keyword == "ADD":
            raise AssertionError(f"{path}: ADD is not read by this test; use COPY or teach it")
        elif keyword == "COPY":
            sources, dest = _copy(path, args)
            dest_dir = dest.endswith("/") or dest in {".", "./"} or len(sources) > 1
            dest_path = _image_path(workdir, dest)
            for src in sources:
                repo_src = ROOT / src
                assert repo_src.exists(), f"{path}: COPY source {src} is not in the repository"
                if repo_src.is_dir():
                    copies[dest_path] = repo_src  # docker copies a directory's contents into dest
                else:
                    copies[dest_path / repo_src.name if dest_dir else dest_path] = repo_src
        elif keyword == "RUN":
            tokens = shlex.split(args)
            segment: list[str] = []
            for tok in [*tokens, "&&"]:
                if tok in {"&&", "||", ";"}:
                    start = _is_pip_install(segment)
                    if start is not None:
                        installs.append((workdir, segment[start:]))
                    segment = []
                else:
                    segment.append(tok)
    assert len(installs) == 1, f"{path}: expected one `pip install`, found {len(installs)}"

    def to_repo(image_path: PurePosixPath) -> Path:
        for dest, src in copies.items():
            if image_path == dest:
                return src
            if src.is_dir() and dest in image_path.parents:
                return src / image_path.relative_to(dest)
        raise AssertionError(f"{path}: {image_path} is installed from but no COPY line puts it in the image")

    run_dir, raw = installs[0]
    out: list[str] = []
    it = iter(raw)
    for tok in it:
        if "$" in tok:
            raise AssertionError(f"{path}: variable in pip install argument {tok!r}: the install set is not fixed")
        name, eq, value = tok.partition("=")
        if tok in _PIP_FLAGS_IGNORED:
            continue
        if name in _PIP_OPTIONS_WITH_PATH:
            value = value if eq else next(it)
            out += [_PIP_OPTIONS_WITH_PATH[name], str(to_repo(_image_path(run_dir, value)))]
        elif name in _PIP_OPTIONS_WITH_URL:
            out += [name, value if eq else next(it)]
        elif tok.startswith("-"):
            raise AssertionError(f"{path}: pip option {tok!r} is not understood by this test; teach it")
        elif tok.startswith((".", "/")):  # a local project, maybe with extras: .[cluster]
            local, _, extras = tok.partition("[")
            project = to_repo(_image_path(run_dir, local) / "pyproject.toml").parent
            out.append(f"{project}[{extras}" if extras else str(project))
        else:
            out.append(tok)
    return base, out


# --- bentofile ---------------------------------------------------------------------------------------------


def bento_python() -> dict:
    return yaml.safe_load(BENTOFILE.read_text())["python"]


def bento_install_args() -> list[str]:
    """What `bentoml build` writes to the Bento's requirements.txt and install.sh, plus the constraints."""
    python = bento_python()
    assert python == {"requirements_txt": "bentos/requirements.txt", "lock_packages": True}, (
        "every bentofile installs the locked bentos/requirements.txt, and `bentoml build` locks it"
    )
    # Resolving with the constraints as well checks that the lock agrees with them.
    return ["-c", str(CONSTRAINTS), "-r", str(BENTO_REQUIREMENTS)]


def requirement_lines(path: Path) -> list[str]:
    return [line for raw in path.read_text().splitlines() if (line := raw.split("#", 1)[0].strip())]


# --- resolution --------------------------------------------------------------------------------------------


def install_args(image: str) -> list[str]:
    if image == "bento":
        return bento_install_args()
    if image == "bento-requirements.in":  # resolved where the CPU build of torch is: its index
        return ["-c", str(CONSTRAINTS), "--extra-index-url", TORCH_CPU_WHEELS, "-r", str(BENTO_REQUIREMENTS_IN)]
    if image == "iac":
        return ["-c", str(CONSTRAINTS), str(ROOT)]
    return dockerfile_install_args(DOCKERFILES[image])[1]


def resolution(image: str) -> tuple[list[str], bool]:
    """(pip arguments, whether this machine's pip configuration stands in) of an image's install set here.

    An image's build runs pip without configuration, against PyPI and the indexes its install names. An index
    this machine cannot reach (UNREACHABLE_INDEX_HOSTS) is left out, and this machine's pip configuration stands
    in for it. An image that names none resolves without that configuration, as its build does: a wheel on this
    machine (the CPU build of torch) must not stand in for the one PyPI serves it (the CUDA build).
    """
    args: list[str] = []
    stand_in = False
    it = iter(install_args(image))
    for arg in it:
        if arg == "-r" and (path := Path(next(it))) == BENTO_REQUIREMENTS:
            # A wheel named by URL on an unreachable host stands in as its version, found by this machine's pip.
            lines = [_reachable(line) for line in requirement_lines(path)]
            stand_in = stand_in or lines != requirement_lines(path)
            args += lines
        elif arg == "-r":
            args += [arg, str(path)]
        elif arg not in _PIP_OPTIONS_WITH_URL:
            args.append(arg)
        elif urlparse(url := next(it)).hostname in UNREACHABLE_INDEX_HOSTS:
            stand_in = True
        else:
            args += [arg, url]
    return args, stand_in


def _reachable(line: str) -> str:
    """`name @ URL` of a wheel on an unreachable host as `name==version` (its filename's), else the line."""
    req = Requirement(line)
    if not req.url or urlparse(req.url).hostname not in UNREACHABLE_INDEX_HOSTS:
        return line
    version = unquote(req.url.rsplit("/", 1)[-1]).split("-")[1]
    return f"{req.name}=={version}"


def _pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", *args]


def _pip_env(stand_in: bool) -> dict[str, str]:
    """This process's environment, where nothing stands in without this machine's pip configuration and sources."""
    if stand_in:
        return dict(os.environ)
    return {k: v for k, v in os.environ.items() if k not in _PIP_SOURCE_ENV} | {"PIP_CONFIG_FILE": os.devnull}


@functools.cache
def _index_unreachable(stand_in: bool) -> str | None:
    """Why pip reaches no package index with that environment, or None where it reaches one (asked at most once).

    Asked only after a resolution failed, and about a package with no version, so a bad pin fails the test
    instead of skipping it.
    """
    probe = subprocess.run(
        _pip("install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet", "boto3"),
        cwd=ROOT,
        env=_pip_env(stand_in),
        capture_output=True,
        text=True,
    )
    if probe.returncode == 0:
        return None
    tail = (probe.stderr.strip().splitlines() or ["no output"])[-1]
    return f"pip reaches no package index (`pip install --dry-run --no-deps boto3` failed: {tail})"


@dataclass(frozen=True)
class Resolved:
    """One distribution of an install set, from pip's report."""

    version: str
    local: bool
    """A local project (the repository), not a package from an index."""
    requires: tuple[str, ...]
    """Its requirements (Requires-Dist), markers included."""
    filename: str = ""
    """The file pip would install (a wheel's name carries its build, e.g. torch's `+cpu`)."""


@pytest.fixture(scope="module")
def install_set(tmp_path_factory):
    """resolve(image) -> {distribution: Resolved}: one pip resolution per image.

    The resolutions are independent, so they run side by side, started when the first test asks.
    """
    tmp = tmp_path_factory.mktemp("pip-report")
    runs: dict[str, tuple[list[str], bool, subprocess.Popen | None, BaseException | None]] = {}
    for image in IMAGES:
        try:
            args, stand_in = resolution(image)
        except (AssertionError, KeyError, ValueError) as exc:  # a definition this test cannot read
            runs[image] = ([], False, None, exc)
            continue
        with (tmp / f"{image}.log").open("w") as log:
            proc = subprocess.Popen(
                _pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(tmp / f"{image}.json"))
                + args,
                cwd=ROOT,
                env=_pip_env(stand_in),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        runs[image] = (args, stand_in, proc, None)

    @functools.cache
    def resolve(image: str) -> dict[str, Resolved]:
        args, stand_in, proc, error = runs[image]
        if error is not None:
            raise error
        if proc.wait() != 0:
            # No index at all skips, except in CI (`CI` set), which reaches PyPI: there it fails.
            if (reason := _index_unreachable(stand_in)) and not os.environ.get("CI"):
                pytest.skip(reason)
            output = (tmp / f"{image}.log").read_text()
            raise AssertionError(f"{image}: pip cannot resolve {shlex.join(args)}:\n{output[-4000:]}")
        return {
            canonicalize_name(item["metadata"]["name"]): Resolved(
                item["metadata"]["version"],
                "dir_info" in item.get("download_info", {}),
                tuple(item["metadata"].get("requires_dist") or ()),
                unquote(item.get("download_info", {}).get("url", "").rsplit("/", 1)[-1]),
            )
            for item in json.loads((tmp / f"{image}.json").read_text())["install"]
        }

    yield resolve
    for _, _, proc, _ in runs.values():
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("image", IMAGES)
def test_install_set_contains_what_the_image_imports(install_set, image):
    resolved = install_set(image)
    missing = sorted(REQUIRED[image] - set(resolved))
    assert not missing, f"{image} image installs none of {missing} (install arguments: {install_args(image)})"


@pytest.mark.slow
@pytest.mark.parametrize("image", IMAGES)
def test_install_set_is_exactly_constraints(install_set, image):
    """Every distribution an image installs is pinned in constraints.txt, at the pinned version."""
    pins = constraint_pins()
    resolved = install_set(image)
    unpinned = sorted(name for name, dist in resolved.items() if not dist.local and name not in pins)
    assert not unpinned, f"{image}: installs distributions constraints.txt does not pin: {unpinned}"
    differ = {
        name: (dist.version, str(pins[name].specifier))
        for name, dist in resolved.items()
        if name in pins and not pins[name].specifier.contains(Version(dist.version), prereleases=True)
    }
    assert not differ, f"{image}: resolved versions differ from constraints.txt: {differ}"


@pytest.mark.slow
def test_the_iac_install_holds_none_of_the_runtime(install_set):
    """The base install resolves without a single package of the runtime extra (torch, mlflow, feast, ...)."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    runtime = {canonicalize_name(Requirement(line).name) for line in extras["runtime"]}
    assert runtime, "pyproject.toml has no runtime extra"
    assert sorted(runtime & set(install_set("iac"))) == []


def cuda_libraries(torch: Resolved) -> set[str]:
    """The CUDA libraries (nvidia-*, cuda-*) torch requires on this platform: none in the CPU build."""
    requirements = [Requirement(line) for line in torch.requires]
    return {
        canonicalize_name(req.name)
        for req in requirements
        if req.name.startswith(("nvidia-", "cuda-")) and (req.marker is None or req.marker.evaluate({"extra": ""}))
    }


@pytest.mark.slow
@pytest.mark.parametrize("image", [image for image in IMAGES if "torch" in REQUIRED[image]])
def test_torch_is_the_build_the_image_runs_on(install_set, image):
    """The CUDA pipeline image installs PyPI's Linux wheel with the CUDA libraries it needs; every other image the
    CPU build (`+cpu`, from the PyTorch CPU index), without them."""
    resolved = install_set(image)
    torch, libraries = resolved["torch"], cuda_libraries(resolved["torch"])
    if image in CUDA_IMAGES:
        assert Version(torch.version).local is None, f"{image}: torch {torch.version} is not PyPI's CUDA build"
        assert libraries, f"{image}: torch {torch.version} requires no CUDA libraries"
        assert libraries <= set(resolved), f"{image}: CUDA libraries missing: {sorted(libraries - set(resolved))}"
    else:
        assert Version(torch.version).local == "cpu", f"{image}: torch {torch.version} is not the CPU build"
        assert not libraries, f"{image}: the CPU build requires {sorted(libraries)}"


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfile_installs_through_constraints_on_plain_python(image):
    """A known interpreter and nothing preinstalled, so the install set above is the image's install set."""
    base, args = dockerfile_install_args(DOCKERFILES[image])
    tested = f"{sys.version_info.major}.{sys.version_info.minor}"
    python = re.fullmatch(r"(?:docker\.io/)?(?:library/)?python:(\d+\.\d+)(?:\.\d+)?(?:-[\w.-]+)?", base)
    assert python, f"{image}: base image {base} is not the plain python image: what it has installed is unknown"
    assert python[1] == tested, f"{image}: base image {base} is not Python {tested}, the Python the test resolved with"
    constraints = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "-c"]
    assert str(CONSTRAINTS) in constraints, f"{image}: `pip install` does not use the repository's constraints.txt"


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Whether BuildKit leaves `path` out of the build context: the last pattern that matches it or a folder
    above it decides, and a `!` pattern lets it in again (Docker's rule, for the patterns these files use)."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        if any(fnmatch.fnmatchcase(prefix, pattern.removeprefix("!").strip("/")) for prefix in prefixes):
            ignored = not pattern.startswith("!")
    return ignored


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_build_context_holds_what_the_dockerfile_copies_and_not_the_venv(image):
    """Each Dockerfile has its own `.dockerignore` (the context is the repository root, .venv included), and every
    COPY source gets through it: a build would otherwise fail on a file it cannot find."""
    dockerfile = DOCKERFILES[image]
    ignore = dockerfile.with_name(f"{dockerfile.name}.dockerignore")
    assert ignore.is_file(), f"{image}: no {ignore.relative_to(ROOT)}: the build would send the whole repository"
    patterns = [line.strip() for line in ignore.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert dockerignored(".venv/bin/python", patterns), f"{image}: the build context holds .venv"
    sources = [
        s
        for keyword, args in dockerfile_instructions(dockerfile)
        if keyword == "COPY"
        for s in _copy(dockerfile, args)[0]
    ]
    assert sources, f"{image}: copies nothing"
    left_out = [source for source in sources if dockerignored(source, patterns)]
    assert not left_out, f"{image}: {ignore.relative_to(ROOT)} leaves out what the Dockerfile copies: {left_out}"


def test_image_tags_follow_the_versions_they_hold():
    """The MLflow image is tagged with the MLflow it installs (constraints.txt, images/mlflow/requirements.txt);
    the repository's own images with the project's version."""
    from loopform.spec import IMAGE_REGISTRY, IMAGE_TAG, RegistrySpec

    mlflow = pinned_version(constraint_pins()["mlflow"])
    requirements = [
        line.split("#", 1)[0].strip() for line in (IMAGES_DIR / "mlflow" / "requirements.txt").read_text().splitlines()
    ]
    pinned = [pinned_version(req) for req in map(Requirement, filter(None, requirements)) if req.name == "mlflow"]
    assert pinned == [mlflow], f"images/mlflow/requirements.txt pins mlflow {pinned}, constraints.txt {mlflow}"
    assert RegistrySpec().mlflow_version == mlflow
    assert RegistrySpec().server_image == f"{IMAGE_REGISTRY}/mlflow:v{mlflow}"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version == IMAGE_TAG, f"loopform.spec.IMAGE_TAG is {IMAGE_TAG}, pyproject.toml's version {version}"


def test_bento_requirements_pin_constraints_versions():
    """Every line of the Bento's requirements, written and locked, is an exact pin at constraints.txt's version
    (torch by its CPU wheel's URL), and the bentofile's Python is the one the tests ran with."""
    pins = constraint_pins()
    tested = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert yaml.safe_load(BENTOFILE.read_text())["docker"]["python_version"] == tested
    differ = {}
    for path in (BENTO_REQUIREMENTS_IN, BENTO_REQUIREMENTS):
        for line in requirement_lines(path):
            req = Requirement(_reachable(line))
            name = canonicalize_name(req.name)
            want = pinned_version(pins[name]) if name in pins else None
            got = pinned_version(req)
            if got is None or want is None or Version(got).public != Version(want).public:
                differ[f"{path.name}: {line}"] = f"constraints.txt: {pins.get(name, 'not pinned')}"
    assert not differ, f"Bento requirements not pinned (==) to constraints.txt's version: {differ}"


@pytest.mark.slow
def test_bento_lock_is_the_resolution_of_its_requirements(install_set):
    """bentos/requirements.txt is requirements.in resolved: every distribution it needs, each pinned, nothing else,
    torch as the CPU wheel's URL. `bentoml build` locks it (lock_packages) to itself, so a Bento installs exactly
    what was tested. After changing requirements.in or constraints.txt: LOOPFORM_REGENERATE_GOLDEN=1."""
    resolved = install_set("bento-requirements.in")
    torch = resolved["torch"]
    assert torch.filename.startswith("torch-") and "+cpu" in torch.filename, torch.filename
    lines = [
        f"torch @ {TORCH_CPU_WHEELS}{quote(torch.filename)}" if name == "torch" else f"{name}=={dist.version}"
        for name, dist in sorted(resolved.items())
    ]
    header = [line for line in BENTO_REQUIREMENTS.read_text().splitlines() if line.startswith("#")] or [
        "# Generated from bentos/requirements.in by tests/test_images.py (LOOPFORM_REGENERATE_GOLDEN=1)."
    ]
    expected = "\n".join([*header, *lines]) + "\n"
    if REGENERATE:
        BENTO_REQUIREMENTS.write_text(expected)
    assert BENTO_REQUIREMENTS.read_text() == expected, (
        "bentos/requirements.txt is not requirements.in resolved: LOOPFORM_REGENERATE_GOLDEN=1 pytest tests/test_images.py"
    )


def test_every_bento_installs_what_the_tested_one_does():
    """Every model's bentofile, and the one `loopform new model` writes, has the python and docker sections of the
    bentofile the tests above resolve: one install set for every model service."""
    from string import Template

    from loopform.scaffold import TEMPLATES, values

    tested = yaml.safe_load(BENTOFILE.read_text())
    scaffolded = Template((TEMPLATES / "bentofile.yaml.tmpl").read_text()).substitute(values("demo", "regression"))
    bentofiles = {str(p.relative_to(ROOT)): p.read_text() for p in sorted((ROOT / "bentos").glob("*/bentofile.yaml"))}
    bentofiles["loopform new model"] = scaffolded
    assert len(bentofiles) >= 3
    for where, text in bentofiles.items():
        bentofile = yaml.safe_load(text)
        assert (bentofile["python"], bentofile["docker"]) == (tested["python"], tested["docker"]), where
    assert yaml.safe_load(scaffolded)["service"] == "bentos.demo.service:DemoService"
