"""The workflows are pinned, least-privilege and safe for forks; `images.yml` builds every image with its attestations.

A tag of an action can be moved to other code after it was reviewed; a commit SHA cannot. A token with
more than a job needs is what a compromised step would use, and a pull request's code is untrusted: the jobs
that run it get a read-only token and no secrets, and the workflow that comments runs none of it. GitHub's
schema and zizmor check all of it; the steps with logic (the image version, the stacks a pull request changes,
the comment poster) are run here as the runner runs them, so what is tested is the workflow, not a copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from loopform.spec import IMAGE_REGISTRY, IMAGE_TAG

from .conftest import ROOT, STACKS

GITHUB = ROOT / ".github"
WORKFLOWS = sorted((GITHUB / "workflows").glob("*.yml"))
IMAGES_WORKFLOW = GITHUB / "workflows" / "images.yml"
PREVIEW_WORKFLOW = GITHUB / "workflows" / "preview.yml"
COMMENT_WORKFLOW = GITHUB / "workflows" / "preview-comment.yml"
UP_WORKFLOW = GITHUB / "workflows" / "up.yml"
BUILD_PUSH = "docker/build-push-action"
#: `uses: owner/repo[/path]@<40 hex> # v<version>`: the commit, and the release it is, for reviewers and bots.
PINNED_LINE = re.compile(r"uses:\s*[\w.-]+/[\w./-]+@[0-9a-f]{40}\s+#\s*v\d")


def load(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    if True in document:  # YAML 1.1 reads the key `on` as a boolean
        document["on"] = document.pop(True)
    return document


def uses(node: Any) -> Iterator[str]:
    """Every `uses:` in a workflow or composite action: steps' actions and jobs' reusable workflows."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "uses" and isinstance(value, str):
                yield value
            else:
                yield from uses(value)
    elif isinstance(node, list):
        for item in node:
            yield from uses(item)


def local_actions() -> list[Path]:
    """The composite actions of this repository that a workflow uses (`uses: ./path`)."""
    used = {u for path in WORKFLOWS for u in uses(load(path)) if u.startswith("./")}
    return sorted(ROOT / u / "action.yml" for u in used)


ACTIONS = local_actions()


def steps(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [step for step in job["steps"] if step.get("uses", "").split("@")[0] == action]


def build_job() -> dict[str, Any]:
    return load(IMAGES_WORKFLOW)["jobs"]["build"]


def workflow_images() -> list[str]:
    """The images `images.yml` builds: its build matrix."""
    return list(build_job()["strategy"]["matrix"]["image"])


def image_folders() -> list[str]:
    return sorted(path.parent.name for path in (ROOT / "images").glob("*/Dockerfile"))


def run_step(script: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A workflow's `run:` script as the runner runs it with `shell: bash` (no profile, -e, pipefail); a step
    without `shell:` runs without pipefail, which only makes a failing pipeline pass more often."""
    command = ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", script]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)


def run_version_step(image: str, ref_type: str = "branch", ref_name: str = "main") -> tuple[int, str, str]:
    """The build job's version step, run as the runner runs a `run:` step, for one image and git ref: its exit
    status, its log, and what it wrote to $GITHUB_OUTPUT."""
    (step,) = [step for step in build_job()["steps"] if step.get("id") == "version"]
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "github_output"
        env = {
            **os.environ,
            "IMAGE": image,
            "GITHUB_OUTPUT": str(output),
            "GITHUB_REF_TYPE": ref_type,
            "GITHUB_REF_NAME": ref_name,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # a python3 with tomllib
        }
        result = run_step(step["run"], ROOT, env)
        return result.returncode, result.stdout + result.stderr, output.read_text() if output.exists() else ""


def released_tags() -> dict[str, str]:
    """By image name, the version tag `images.yml` pushes (beside the git SHA), for the images it builds from a
    Dockerfile in images/."""
    tags = {}
    for image in sorted(set(workflow_images()) & set(image_folders())):
        status, log, output = run_version_step(image)
        assert status == 0, log
        (tag,) = re.findall(r"^tag=(.+)$", output, re.MULTILINE)
        tags[image] = tag
    return tags


@pytest.mark.parametrize("path", WORKFLOWS + ACTIONS, ids=lambda p: str(p.relative_to(GITHUB)))
def test_every_action_is_pinned_by_commit(path: Path) -> None:
    remote = [u for u in uses(load(path)) if not u.startswith("./")]
    unpinned = [u for u in remote if not re.fullmatch(r"[^@\s]+@[0-9a-f]{40}", u) and "@sha256:" not in u]
    assert unpinned == [], f"{path.name}: pin these by full commit SHA (with the version in a comment)"
    lines = [line.strip() for line in path.read_text().splitlines() if re.match(r"\s*-?\s*uses:\s*[^.\s]", line)]
    assert [line for line in lines if not PINNED_LINE.search(line)] == []


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_token_is_read_only_unless_a_job_asks(path: Path) -> None:
    workflow = load(path)
    assert "permissions" in workflow, "without `permissions`, the token gets the repository's default (maybe write)"
    top = workflow["permissions"]
    assert top in ({}, "read-all") or (isinstance(top, dict) and set(top.values()) <= {"read", "none"})
    assert "pull_request_target" not in workflow["on"]  # runs fork code with a write token and secrets


def test_images_workflow_builds_every_image_with_sbom_and_provenance() -> None:
    job = build_job()
    assert workflow_images() == image_folders()
    (build,) = steps(job, BUILD_PUSH)
    options = build["with"]
    assert options["context"] == "."  # the Dockerfiles copy from the repository root
    assert options["file"] == "images/${{ matrix.image }}/Dockerfile"
    assert options["push"] is True
    assert options["sbom"] is True
    assert options["provenance"] == "mode=max"
    assert options["cache-from"] == "type=gha,scope=${{ matrix.image }}"
    assert options["cache-to"] == "type=gha,mode=max,scope=${{ matrix.image }}"
    assert steps(job, "docker/setup-buildx-action")  # BuildKit (the docker-container driver) for cache and attestations
    tags = options["tags"].splitlines()
    assert tags == [
        "${{ env.IMAGE_REGISTRY }}/${{ matrix.image }}:${{ github.sha }}",
        "${{ env.IMAGE_REGISTRY }}/${{ matrix.image }}:${{ steps.version.outputs.tag }}",
    ]
    assert load(IMAGES_WORKFLOW)["env"]["IMAGE_REGISTRY"] == IMAGE_REGISTRY


def test_images_workflow_prints_and_outputs_each_digest() -> None:
    job = build_job()
    (digest,) = [step for step in job["steps"] if step.get("id") == "digest"]
    assert digest["env"]["DIGEST"] == "${{ steps.build.outputs.digest }}"
    assert "$GITHUB_STEP_SUMMARY" in digest["run"]
    assert '"$IMAGE=$DIGEST" >> "$GITHUB_OUTPUT"' in digest["run"]
    # One job output per image: GitHub combines the matrix legs' outputs when their names differ.
    assert job["outputs"] == {image: f"${{{{ steps.digest.outputs.{image} }}}}" for image in workflow_images()}


def test_images_workflow_is_least_privilege() -> None:
    workflow = load(IMAGES_WORKFLOW)
    assert workflow["on"] == {"push": {"branches": ["main"], "tags": ["v*"]}}
    assert workflow["permissions"] == {}
    assert workflow["concurrency"]["group"] == "images-${{ github.ref }}"
    jobs = workflow["jobs"]
    assert jobs["build"]["permissions"] == {"contents": "read", "packages": "write"}
    assert jobs["pin-prod"]["permissions"] == {"contents": "write", "pull-requests": "write"}
    assert jobs["pin-prod"]["if"] == "startsWith(github.ref, 'refs/tags/v')"
    assert set(re.findall(r"secrets\.(\w+)", IMAGES_WORKFLOW.read_text())) == {"GITHUB_TOKEN"}
    for job in jobs.values():
        for checkout in steps(job, "actions/checkout"):
            assert checkout["with"]["persist-credentials"] is False
        for step in job["steps"]:  # untrusted context (branch names, actors) reaches scripts only through env
            assert "${{" not in step.get("run", "")


def test_pin_job_pins_prod_with_the_build_digests() -> None:
    job = load(IMAGES_WORKFLOW)["jobs"]["pin-prod"]
    assert job["needs"] == "build"
    scripts = "\n".join(step.get("run", "") for step in job["steps"])
    assert "loopform pin-images --stack prod --digests" in scripts
    assert "gh pr create" in scripts
    (pin,) = [step for step in job["steps"] if "DIGESTS" in step.get("env", {})]
    assert pin["env"]["DIGESTS"] == "${{ toJSON(needs.build.outputs) }}"


#: A stand-in `docker`: `docker buildx imagetools inspect IMAGE --format '{{json .Manifest}}'` prints a descriptor
#: whose digest is the hash of IMAGE, and logs each image it was asked for.
FAKE_DOCKER = """#!/bin/sh
[ "$1 $2 $3" = "buildx imagetools inspect" ] || exit 2
[ -z "$DOCKER_FAIL" ] || { echo "ERROR: rate limited" >&2; exit 1; }
echo "$4" >> "$DOCKER_LOG"
printf '{"mediaType":"application/vnd.oci.image.index.v1+json","digest":"sha256:%s","size":1}\\n' \\
  "$(printf '%s' "$4" | sha256sum | cut -d' ' -f1)"
"""


def test_pin_step_pins_every_image_prod_runs(tmp_path: Path) -> None:
    """The pin job's step, run as the runner runs it against a copy of the project: ours get the digests the build
    pushed, every upstream image the digest its tag resolves to (a stand-in registry), and prod is left with no
    image by tag alone."""
    from loopform.images import unpinned
    from loopform.spec import load_stack

    from .helpers_project import copy_project
    from .pins import digest

    tool("jq")
    (tmp_path / "project").mkdir()
    project = copy_project(tmp_path / "project")
    (project / ".venv").symlink_to(Path(sys.executable).parent.parent)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    (step,) = [step for step in load(IMAGES_WORKFLOW)["jobs"]["pin-prod"]["steps"] if "DIGESTS" in step.get("env", {})]
    built = {name: digest(name) for name in workflow_images()}
    env = {
        **os.environ,
        "DIGESTS": json.dumps(built),
        "IMAGE_REGISTRY": load(IMAGES_WORKFLOW)["env"]["IMAGE_REGISTRY"],
        "RUNNER_TEMP": str(tmp_path),
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md"),
        "DOCKER_LOG": str(tmp_path / "docker.log"),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    assert step["shell"] == "bash"  # -e and pipefail, as run_step runs it
    stack = project / "stacks" / "Pulumi.prod.yaml"
    before, text = unpinned(load_stack(stack)), stack.read_text()

    # A lookup that fails fails the step with the registry's error, and nothing is pinned.
    failed = run_step(step["run"], project, {**env, "DOCKER_FAIL": "1"})
    assert failed.returncode != 0 and "rate limited" in failed.stderr
    assert stack.read_text() == text
    (tmp_path / "docker.log").unlink(missing_ok=True)

    result = run_step(step["run"], project, env)
    assert result.returncode == 0, result.stdout + result.stderr
    spec = load_stack(stack)
    assert unpinned(spec) == []
    upstream = [image for image in before if not image.startswith(f"{IMAGE_REGISTRY}/")]
    assert sorted((tmp_path / "docker.log").read_text().split()) == upstream  # resolved: only the upstream ones
    ours = {
        image: built[image.removeprefix(f"{IMAGE_REGISTRY}/").split(":")[0]]
        for image in before
        if image not in upstream
    }
    assert spec.image_digests == {image: digest(image) for image in upstream} | ours

    # Run again on the pinned stack (a rerun of the release job): nothing to resolve, nothing changes.
    pinned = stack.read_text()
    again = run_step(step["run"], project, env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert sorted((tmp_path / "docker.log").read_text().split()) == upstream
    assert stack.read_text() == pinned


def test_version_tags_are_what_the_spec_defaults_name() -> None:
    """Ours carry the project's version and MLflow's the pinned MLflow version: the tags the spec's defaults name."""
    import tomllib

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    (mlflow,) = re.findall(r"^mlflow==([^\s;#]+)", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    tags = released_tags()
    assert tags == {image: f"v{mlflow}" if image == "mlflow" else version for image in image_folders()}
    assert version == IMAGE_TAG


def test_a_release_tag_must_be_the_project_version() -> None:
    assert run_version_step("pipeline", "tag", f"v{IMAGE_TAG}")[0] == 0
    status, log, output = run_version_step("pipeline", "tag", "v99.0.0")
    assert status != 0
    assert f"tag v99.0.0 is not v{IMAGE_TAG}" in log
    assert output == ""


# --- the offline audits: GitHub's schema and zizmor ---------------------------------------------------------------


def tool(name: str) -> str:
    """A command-line tool from this venv or PATH; skips where it is missing, except under CI, where it must be."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} missing: `make install` installs it (the dev extra)")
        pytest.skip(f"{name} missing (pip install {name})")
    return found


def test_workflows_match_githubs_schema() -> None:
    command = [tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *map(str, WORKFLOWS)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_zizmor_finds_nothing() -> None:
    """Every audit of zizmor's default persona, offline, over the workflows and the actions they use."""
    inputs = [str(GITHUB / "workflows"), *(str(path) for path in ACTIONS)]
    env = {key: value for key, value in os.environ.items() if key not in ("GH_TOKEN", "GITHUB_TOKEN")}
    result = subprocess.run(
        [tool("zizmor"), "--offline", "--format", "json", *inputs], capture_output=True, text=True, env=env
    )
    findings = json.loads(result.stdout or "null")
    assert findings == [], "\n".join(f"{f['ident']}: {f['locations'][0]['symbolic']['key']}" for f in findings or [])
    assert result.returncode == 0, result.stderr


def test_the_one_zizmor_ignore_is_the_comment_workflows_trigger() -> None:
    """`workflow_run` is what lets a fork's pull request get a comment; it is safe only because that workflow runs
    no pull-request code (tested below). No other finding may be silenced."""
    ignores = [
        (path.name, line.strip())
        for path in WORKFLOWS + ACTIONS
        for line in path.read_text().splitlines()
        if "zizmor: ignore" in line
    ]
    assert len(ignores) == 1
    ((name, line),) = ignores
    assert name == COMMENT_WORKFLOW.name
    assert re.match(r"workflow_run:\s*# zizmor: ignore\[dangerous-triggers\] \S", line)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_expressions_reach_scripts_only_through_env(path: Path) -> None:
    """A branch name or a PR title expanded into a script is code the PR's author wrote; env values are data."""
    for job in load(path)["jobs"].values():
        for step in job.get("steps", []):
            assert "${{" not in step.get("run", "")
            assert "${{" not in step.get("with", {}).get("script", "")
            for checkout in steps(job, "actions/checkout"):
                assert checkout["with"]["persist-credentials"] is False


# --- pull requests: preview.yml runs the PR's code with a read-only token ------------------------------------------


def preview_jobs() -> dict[str, Any]:
    return load(PREVIEW_WORKFLOW)["jobs"]


def workflow_stacks() -> list[str]:
    return load(PREVIEW_WORKFLOW)["env"]["STACKS"].split()


def test_preview_stacks_are_the_deployed_stacks() -> None:
    deployed = sorted(path.name.split(".")[1] for path in (ROOT / "stacks").glob("Pulumi.*.yaml"))
    assert sorted(workflow_stacks()) == sorted(set(deployed) - {"local"})
    assert workflow_stacks() == list(load(UP_WORKFLOW)["jobs"])  # dev, staging, prod: the order up.yml deploys in


def test_pull_request_jobs_get_a_read_only_token_and_no_secrets() -> None:
    workflow = load(PREVIEW_WORKFLOW)
    assert list(workflow["on"]) == ["pull_request"]
    assert workflow["permissions"] == {}
    jobs = preview_jobs()
    for name, job in jobs.items():
        if name == "pulumi-preview":
            continue
        assert job["permissions"] == {"contents": "read"}, name
        assert "secrets." not in yaml.safe_dump(job), name
        assert "environment" not in job, name


def test_only_this_repositorys_branches_reach_the_preview_credentials() -> None:
    job = preview_jobs()["pulumi-preview"]
    assert "github.event.pull_request.head.repo.full_name == github.repository" in job["if"]
    assert job["environment"] == {"name": "preview", "deployment": False}  # its own read-only credentials
    assert job["permissions"] == {"contents": "read", "pull-requests": "write", "id-token": "write"}
    (pulumi,) = steps(job, "pulumi/actions")
    assert pulumi["with"]["command"] == "preview"
    assert pulumi["with"]["diff"] is True
    assert pulumi["with"]["comment-on-pr"] is True
    assert pulumi["with"]["policyPacks"] == "policies"
    assert pulumi["with"]["policyPackConfigs"] == "policies/config/${{ matrix.stack }}.json"
    # Without the secrets (Dependabot, a repository that has none) it skips every step after saying so.
    first, *rest = job["steps"]
    assert first["id"] == "credentials"
    assert all(step["if"].startswith("steps.credentials.outputs.present == 'true'") for step in rest)


def test_diff_job_posts_nothing_itself_and_uploads_the_diff_per_stack() -> None:
    job = preview_jobs()["diff"]
    assert job["strategy"]["matrix"]["stack"] == "${{ fromJSON(needs.stacks.outputs.stacks) }}"
    (diff,) = [step for step in job["steps"] if "loopform diff" in step.get("run", "")]
    assert diff["env"] == {"STACK": "${{ matrix.stack }}", "BASE_SHA": "${{ github.event.pull_request.base.sha }}"}
    assert (
        '.venv/bin/loopform diff --stack "$STACK" --base "$BASE_SHA" --format markdown --limit 65000 --out "$RUNNER_TEMP/diff/diff.md"'
        in diff["run"]
    )
    (upload,) = steps(job, "actions/upload-artifact")
    assert upload["with"]["name"] == "loopform-diff-${{ matrix.stack }}"
    assert upload["if"] == "${{ !cancelled() }}"  # a failed diff is reported as failed, not left stale
    (checkout,) = steps(job, "actions/checkout")
    assert checkout["with"]["fetch-depth"] == 0  # the base commit, which `loopform diff` renders


@pytest.mark.parametrize(
    "workflow,job",
    [
        (PREVIEW_WORKFLOW, "diff"),
        (PREVIEW_WORKFLOW, "pulumi-preview"),
        *((UP_WORKFLOW, stack) for stack in STACKS),
        (IMAGES_WORKFLOW, "pin-prod"),
    ],
)
def test_iac_jobs_install_only_the_iac_set(workflow: Path, job: str) -> None:
    definition = load(workflow)["jobs"][job]
    scripts = "\n".join(step.get("run", "") for step in definition["steps"])
    (install,) = [line.strip() for line in scripts.splitlines() if "pip install" in line]
    assert install == ".venv/bin/pip install --quiet -c constraints.txt -e ."  # no extra: not the runtime
    assert "make install" not in scripts
    # The install runs dependencies' build hooks: no secret or cloud credential is in reach yet. Secrets sit in
    # the env of the steps that use them (a step's env ends with it); none is left on disk or in $GITHUB_ENV.
    assert "secrets." not in yaml.safe_dump(definition.get("env", {}))
    assert "GITHUB_ENV" not in yaml.safe_dump(definition)
    at = next(i for i, step in enumerate(definition["steps"]) if "pip install" in step.get("run", ""))
    before = yaml.safe_dump(definition["steps"][: at + 1])
    assert "configure-aws-credentials" not in before
    assert ".kube" not in before


def run_stacks_step(repo: Path, base: str) -> tuple[list[str], dict[str, Any]]:
    """The `stacks` job's step, run as the runner runs it in a checkout of `repo`: the stacks it outputs, and the
    pr.json it leaves for preview-comment.yml."""
    (step,) = [step for step in preview_jobs()["stacks"]["steps"] if step.get("id") == "changed"]
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "github_output"
        env = {
            **os.environ,
            "STACKS": load(PREVIEW_WORKFLOW)["env"]["STACKS"],
            "BASE_SHA": base,
            "PR_NUMBER": "42",
            "GITHUB_OUTPUT": str(output),
            "RUNNER_TEMP": folder,
        }
        result = run_step(step["run"], repo, env)
        assert result.returncode == 0, result.stdout + result.stderr
        (stacks,) = re.findall(r"^stacks=(.+)$", output.read_text(), re.MULTILINE)
        return json.loads(stacks), json.loads((Path(folder) / "pr" / "pr.json").read_text())


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.fixture
def project_repo(tmp_path: Path) -> tuple[Path, str]:
    """A git repository with the files the `stacks` step looks at, and its first commit (the PR's base)."""
    if shutil.which("jq") is None and not os.environ.get("CI"):
        pytest.skip("jq missing (the runner has it)")
    files = [
        "README.md",
        "__main__.py",
        "components/platform.py",
        "loopform/spec.py",
        "models/fraud/model.py",
        "policies/core.py",
        "deploy/keys/key.asc",
        *(f"stacks/Pulumi.{stack}.yaml" for stack in ("local", *STACKS)),
        *(f"policies/config/{stack}.json" for stack in STACKS),
        *(f"deploy/{stack}/README.md" for stack in STACKS),
    ]
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("base\n")
    git(tmp_path, "init", "--quiet")
    git(tmp_path, "add", ".")
    git(tmp_path, "commit", "--quiet", "-m", "base")
    return tmp_path, git(tmp_path, "rev-parse", "HEAD")


@pytest.mark.parametrize(
    "changed,expected",
    [
        (["README.md"], []),
        (["stacks/Pulumi.local.yaml"], []),
        (["stacks/Pulumi.prod.yaml"], ["prod"]),
        (["policies/config/dev.json", "deploy/staging/README.md"], ["dev", "staging"]),
        (["policies/core.py"], list(STACKS)),
        (["components/platform.py"], list(STACKS)),
        (["loopform/spec.py"], list(STACKS)),
        (["models/fraud/model.py"], list(STACKS)),
        (["deploy/keys/key.asc"], list(STACKS)),
        (["__main__.py"], list(STACKS)),
    ],
)
def test_a_pull_request_diffs_the_stacks_whose_inputs_it_changes(
    project_repo: tuple[Path, str], changed: list[str], expected: list[str]
) -> None:
    repo, base = project_repo
    for name in changed:
        (repo / name).write_text("changed\n")
    git(repo, "commit", "--quiet", "-am", "change")
    stacks, pr = run_stacks_step(repo, base)
    assert stacks == expected
    assert pr == {"number": 42, "stacks": expected}


def test_a_large_pull_request_still_finds_its_shared_change(project_repo: tuple[Path, str]) -> None:
    """A shared input listed first, then more file names than a pipe holds: the match must not be lost."""
    repo, base = project_repo
    (repo / "components" / "platform.py").write_text("changed\n")
    (repo / "docs").mkdir()
    for i in range(4000):  # about 450 kB of names
        (repo / "docs" / f"{'page' * 25}-{i:05d}.md").write_text("new\n")
    git(repo, "add", ".")
    git(repo, "commit", "--quiet", "-m", "large")
    assert run_stacks_step(repo, base)[0] == list(STACKS)


def test_every_input_of_a_stack_starts_up() -> None:
    """What makes the pull request diff a stack is what makes a merge deploy it (up.yml's path filter)."""
    from fnmatch import fnmatch

    paths = load(UP_WORKFLOW)["on"]["push"]["paths"]
    inputs = ["__main__.py", "Pulumi.yaml", "pyproject.toml", "constraints.txt", "stacks/Pulumi.prod.yaml"]
    inputs += ["components/a.py", "models/m/x.py", "bentos/b/service.py", "loopform/spec.py", "policies/core.py"]
    inputs += ["policies/config/prod.json", "deploy/keys/k.asc", "deploy/prod/README.md"]
    assert [name for name in inputs if not any(fnmatch(name, pattern) for pattern in paths)] == []
    script = next(step["run"] for step in preview_jobs()["stacks"]["steps"] if step.get("id") == "changed")
    for name in ("__main__", "Pulumi", "pyproject", "constraints", "components", "models", "bentos", "loopform"):
        assert name in script


# --- the comment: preview-comment.yml runs main's code only, on the artifacts as data ------------------------------


def comment_job() -> dict[str, Any]:
    return load(COMMENT_WORKFLOW)["jobs"]["comment"]


def comment_script() -> str:
    (script,) = steps(comment_job(), "actions/github-script")
    return script["with"]["script"]


def test_comment_workflow_never_checks_out_or_runs_pull_request_code() -> None:
    workflow = load(COMMENT_WORKFLOW)
    assert workflow["on"] == {"workflow_run": {"workflows": ["preview"], "types": ["completed"]}}
    assert load(PREVIEW_WORKFLOW)["name"] == "preview"
    assert workflow["permissions"] == {}
    job = comment_job()
    assert job["permissions"] == {"actions": "read", "pull-requests": "write"}
    assert "github.event.workflow_run.event == 'pull_request'" in job["if"]
    # Two steps: download the artifacts, post them from JavaScript. No checkout, no shell, no local action.
    assert [step["uses"].split("@")[0] for step in job["steps"]] == [
        "actions/download-artifact",
        "actions/github-script",
    ]
    assert "actions/checkout" not in COMMENT_WORKFLOW.read_text()
    (download,) = steps(job, "actions/download-artifact")
    assert download["with"]["run-id"] == "${{ github.event.workflow_run.id }}"
    assert download["with"]["pattern"] == "loopform-diff-*"
    assert download["with"]["path"].startswith("${{ runner.temp }}/")  # outside any workspace
    script = comment_script()
    for forbidden in ("child_process", "exec(", "eval(", "require('child"):
        assert forbidden not in script


def test_comment_workflow_knows_the_same_stacks() -> None:
    (listed,) = re.findall(r"const STACKS = \[([^\]]*)\]", comment_script())
    assert re.findall(r"'([^']+)'", listed) == workflow_stacks()


#: Runs the comment step's script as actions/github-script runs it (an async function of github, context, core),
#: against a recorded pull request and its comments, and prints the API calls it made.
HARNESS = r"""
const fs = require('fs');
const scenario = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const script = fs.readFileSync(process.argv[3], 'utf8');
const calls = [];
const github = {
  rest: {
    pulls: { get: async (args) => { calls.push(['get', args]); return { data: scenario.pull }; } },
    issues: {
      listComments: async () => { throw new Error('call through paginate'); },
      updateComment: async (args) => { calls.push(['update', args]); return { data: {} }; },
      createComment: async (args) => { calls.push(['create', args]); return { data: { id: 1000 } }; },
    },
  },
  paginate: async (method, args) => {
    if (method !== github.rest.issues.listComments) throw new Error('unexpected paginate');
    calls.push(['list', args]);
    return scenario.comments;
  },
};
const core = {
  info: () => {},
  notice: (message) => calls.push(['notice', message]),
  setFailed: (message) => calls.push(['failed', message]),
};
const context = { repo: { owner: 'loopform', repo: 'loopform' } };
const AsyncFunction = Object.getPrototypeOf(async () => {}).constructor;
new AsyncFunction('require', 'github', 'context', 'core', script)(require, github, context, core)
  .then(() => process.stdout.write(JSON.stringify(calls)))
  .catch((error) => { console.error(error); process.exit(1); });
"""
HEAD = "a" * 40
FORK = "someone/loopform"


def post(
    tmp_path: Path,
    artifacts: dict[str, str],
    comments: list[dict[str, Any]] | None = None,
    head: str = HEAD,
) -> list[list[Any]]:
    """The comment step run on these artifact files (`<artifact>/<file>`: text) for pull request 7 at `head`."""
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI"):
            pytest.fail("node missing (GitHub's runners have it)")
        pytest.skip("node missing")
    diffs = tmp_path / "diffs"
    for name, text in artifacts.items():
        (diffs / name).parent.mkdir(parents=True, exist_ok=True)
        (diffs / name).write_text(text)
    diffs.mkdir(exist_ok=True)
    scenario = {"pull": {"number": 7, "head": {"sha": head, "repo": {"full_name": FORK}}}, "comments": comments or []}
    (tmp_path / "scenario.json").write_text(json.dumps(scenario))
    (tmp_path / "script.js").write_text(comment_script())
    (tmp_path / "harness.js").write_text(HARNESS)
    (step,) = steps(comment_job(), "actions/github-script")
    assert set(step["env"]) == {"DIFF_DIR", "HEAD_SHA", "HEAD_REPOSITORY", "RUN_URL"}
    env = {
        **os.environ,
        "DIFF_DIR": str(diffs),
        "HEAD_SHA": HEAD,
        "HEAD_REPOSITORY": FORK,
        "RUN_URL": "https://github.com/loopform/loopform/actions/runs/1",
    }
    result = subprocess.run(
        [node, str(tmp_path / "harness.js"), str(tmp_path / "scenario.json"), str(tmp_path / "script.js")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def pr_json(number: Any = 7, stacks: Any = ("dev", "prod")) -> str:
    return json.dumps({"number": number, "stacks": list(stacks) if isinstance(stacks, tuple) else stacks})


def writes(calls: list[list[Any]]) -> list[tuple[str, Any, str]]:
    """(create or update, the comment id or PR number, the body) of each write."""
    return [
        (kind, args.get("comment_id", args.get("issue_number")), args["body"])
        for kind, args in calls
        if kind in ("create", "update")
    ]


def bot(comment_id: int, body: str) -> dict[str, Any]:
    return {"id": comment_id, "user": {"login": "github-actions[bot]"}, "body": body}


def test_first_push_creates_one_comment_per_changed_stack(tmp_path: Path) -> None:
    calls = post(
        tmp_path,
        {
            "loopform-diff-pr/pr.json": pr_json(),
            "loopform-diff-dev/diff.md": "## dev\nreplicas 2 -> 3\n",
            "loopform-diff-prod/diff.md": "## prod\nfraud v1 -> v2\n",
        },
    )
    assert calls[0] == ["get", {"owner": "loopform", "repo": "loopform", "pull_number": 7}]
    made = writes(calls)
    assert [(kind, target) for kind, target, _ in made] == [("create", 7), ("create", 7)]
    dev, prod = (body for _, _, body in made)
    assert dev.startswith("<!-- loopform-diff:dev -->\n## dev\nreplicas 2 -> 3\n")
    assert prod.startswith("<!-- loopform-diff:prod -->\n## prod\nfraud v1 -> v2\n")
    assert HEAD[:12] in prod


def test_later_pushes_edit_each_stacks_comment_in_place(tmp_path: Path) -> None:
    comments = [
        bot(11, "<!-- loopform-diff:dev -->\nold dev"),
        bot(12, "<!-- loopform-diff:staging -->\nold staging"),
        {"id": 13, "user": {"login": "a-reviewer"}, "body": "<!-- loopform-diff:prod -->\nquoted by a human"},
        bot(14, "an unrelated bot comment that mentions <!-- loopform-diff:prod -->"),
    ]
    calls = post(
        tmp_path,
        {
            "loopform-diff-pr/pr.json": pr_json(),
            "loopform-diff-dev/diff.md": "new dev",
            "loopform-diff-prod/diff.md": "new prod",
        },
        comments,
    )
    made = {(kind, target): body for kind, target, body in writes(calls)}
    assert set(made) == {("update", 11), ("update", 12), ("create", 7)}
    assert made[("update", 11)].startswith("<!-- loopform-diff:dev -->\nnew dev")
    # A stack this push no longer changes says so, rather than keeping a stale diff.
    assert "no longer changes the inputs of `staging`" in made[("update", 12)]
    assert made[("create", 7)].startswith("<!-- loopform-diff:prod -->\nnew prod")


def test_an_artifact_cannot_aim_at_another_pull_request(tmp_path: Path) -> None:
    """The PR number comes from the run's artifact: it is believed only if that PR's head is the commit the run
    tested. The same check keeps an older run from overwriting a newer push's diff."""
    calls = post(tmp_path, {"loopform-diff-pr/pr.json": pr_json(), "loopform-diff-dev/diff.md": "x"}, head="b" * 40)
    assert writes(calls) == []
    assert [kind for kind, _ in calls] == ["get", "notice"]


@pytest.mark.parametrize("number", ["7", "7; rm -rf /", -1, 0, 1.5, None, 2**60])
def test_a_pull_request_number_must_be_a_number(tmp_path: Path, number: Any) -> None:
    calls = post(tmp_path, {"loopform-diff-pr/pr.json": pr_json(number), "loopform-diff-dev/diff.md": "x"})
    assert [kind for kind, _ in calls] == ["failed"]


def test_stack_names_come_from_the_workflow_not_the_artifact(tmp_path: Path) -> None:
    calls = post(
        tmp_path,
        {
            "loopform-diff-pr/pr.json": pr_json(stacks=["dev", "../../etc", "evil"]),
            "loopform-diff-dev/diff.md": "dev diff",
            "loopform-diff-evil/diff.md": "not a stack",
        },
    )
    made = writes(calls)
    assert len(made) == 1
    assert made[0][2].startswith("<!-- loopform-diff:dev -->\ndev diff")
    assert "not a stack" not in json.dumps(calls)


def test_a_changed_stack_without_a_diff_reports_the_failure(tmp_path: Path) -> None:
    calls = post(tmp_path, {"loopform-diff-pr/pr.json": pr_json(stacks=["staging"])})
    ((kind, _, body),) = writes(calls)
    assert kind == "create"
    assert body.startswith("<!-- loopform-diff:staging -->\n")
    assert "`loopform diff --stack staging` failed" in body
    assert "actions/runs/1" in body


def test_a_diff_too_long_for_one_comment_is_cut_at_a_line(tmp_path: Path) -> None:
    lines = "".join(f"| resource-{i:06d} | changed |\n" for i in range(4000))  # about 112,000 characters
    calls = post(tmp_path, {"loopform-diff-pr/pr.json": pr_json(stacks=["prod"]), "loopform-diff-prod/diff.md": lines})
    ((_, _, body),) = writes(calls)
    assert len(body) <= 65536
    assert "Cut to fit one comment" in body
    kept = body.split("\n", 1)[1].split("\n\n_Cut")[0]
    assert lines.startswith(kept + "\n")  # whole lines only


def test_no_pr_json_posts_nothing(tmp_path: Path) -> None:
    assert writes(post(tmp_path, {})) == []


# --- merges to main: up.yml ----------------------------------------------------------------------------------------


def test_up_deploys_dev_then_staging_and_prod_behind_their_environments() -> None:
    workflow = load(UP_WORKFLOW)
    assert set(workflow["on"]) == {"push", "workflow_dispatch"}
    assert workflow["on"]["push"]["branches"] == ["main"]
    assert workflow["permissions"] == {}
    assert workflow["concurrency"] == {"group": "pulumi-up", "cancel-in-progress": False}
    jobs = workflow["jobs"]
    assert list(jobs) == ["dev", "staging", "prod"]
    assert "needs" not in jobs["dev"]
    assert jobs["staging"]["needs"] == "dev"
    assert jobs["prod"]["needs"] == "staging"
    for stack, job in jobs.items():
        # The environment holds the stack's secrets, and for staging and prod its required reviewers.
        assert job["environment"] == {"name": stack}
        assert job["permissions"] == {"contents": "read", "id-token": "write"}
        (pulumi,) = steps(job, "pulumi/actions")
        assert pulumi["with"]["command"] == "up"
        assert pulumi["with"]["stack-name"] == stack
        assert pulumi["with"]["policyPacks"] == "policies"
        assert pulumi["with"]["policyPackConfigs"] == f"policies/config/{stack}.json"
        assert set(re.findall(r"secrets\.(\w+)", yaml.safe_dump(job))) == {
            "PULUMI_ACCESS_TOKEN",
            "PULUMI_CONFIG_PASSPHRASE",
            "KUBECONFIG",
        }
