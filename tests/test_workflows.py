"""The workflows are pinned and least-privilege, and `images.yml` builds every image with its attestations.

A tag of an action can be moved to other code after it was reviewed; a commit SHA cannot. A token with
more than a job needs is what a compromised step would use. The image workflow's version step is run
here as the runner runs it, so the tags it pushes are the tags tested, not a copy of its logic.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from loopform.spec import IMAGE_REGISTRY, IMAGE_TAG

from .conftest import ROOT

GITHUB = ROOT / ".github"
# The release workflow; the pull-request and deploy workflows (preview.yml, up.yml, actions/pulumi-up) are pinned
# and narrowed to least privilege by issue 14 and join this list then.
WORKFLOWS = [GITHUB / "workflows" / "images.yml"]
ACTIONS: list[Path] = []
IMAGES_WORKFLOW = GITHUB / "workflows" / "images.yml"
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


def steps(job: dict[str, Any], action: str) -> list[dict[str, Any]]:
    return [step for step in job["steps"] if step.get("uses", "").split("@")[0] == action]


def build_job() -> dict[str, Any]:
    return load(IMAGES_WORKFLOW)["jobs"]["build"]


def workflow_images() -> list[str]:
    """The images `images.yml` builds: its build matrix."""
    return list(build_job()["strategy"]["matrix"]["image"])


def image_folders() -> list[str]:
    return sorted(path.parent.name for path in (ROOT / "images").glob("*/Dockerfile"))


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
        result = subprocess.run(
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
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
