"""Checkov 3.x on `loopform render` output: no failed check, and every reviewed exception (a `checkov.io/skip`
annotation) listed in docs/hardening.md with its reason.

Checkov pins its own dependencies, so it lives in a venv of its own: `.ci/run` makes `.venv-checkov`;
elsewhere `$CHECKOV` names the binary. Where neither exists the test skips, except in CI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from loopform import render

from .conftest import ROOT, STACKS

HARDENING = ROOT / "docs" / "hardening.md"
CHECKOV = os.environ.get("CHECKOV") or next(
    (str(p) for p in (ROOT / ".venv-checkov" / "bin" / "checkov",) if p.exists()), shutil.which("checkov")
)
needs_checkov = pytest.mark.skipif(
    CHECKOV is None and not os.environ.get("CI"), reason="checkov missing (.ci/run makes .venv-checkov)"
)
#: Images named by tag (CKV_K8S_43): an exception only while a workload runs one (components.common.workload_skips).
BY_DIGEST = "CKV_K8S_43"
SKIP = re.compile(r"^checkov\.io/skip\d+$")


def _rendered_folder(stack: str, rendered, tmp_path: Path) -> Path:
    out = tmp_path / stack
    render.write(rendered(stack), out)
    return out


def _skips(folder: Path) -> set[tuple[str, str]]:
    import yaml

    found = set()
    for path in folder.glob("*.yaml"):
        manifest: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
        for key, value in ((manifest.get("metadata") or {}).get("annotations") or {}).items():
            if SKIP.match(key):
                check, _, reason = value.partition("=")
                found.add((check, reason))
    return found


def _documented() -> set[tuple[str, str]]:
    rows = re.findall(r"^\| (CKV_K8S_\d+) \| [^|]+ \| ([^|]+) \|$", HARDENING.read_text(), re.M)
    return {(check, reason.strip()) for check, reason in rows}


@pytest.mark.parametrize("stack", STACKS)
def test_every_exception_is_documented(stack: str, rendered, tmp_path: Path) -> None:
    skips = _skips(_rendered_folder(stack, rendered, tmp_path))
    assert skips, "no reviewed exception found: did the annotation key change?"
    assert skips <= _documented(), skips - _documented()


def test_the_docs_list_no_exception_nothing_carries(rendered, tmp_path: Path) -> None:
    carried = set().union(*(_skips(_rendered_folder(s, rendered, tmp_path)) for s in STACKS))
    assert _documented() == carried


@needs_checkov
@pytest.mark.parametrize("stack", STACKS)
def test_checkov_finds_nothing(stack: str, rendered, tmp_path: Path) -> None:
    assert CHECKOV, "checkov missing: .ci/run makes .venv-checkov (pip install checkov)"
    folder = _rendered_folder(stack, rendered, tmp_path)
    done = subprocess.run(
        [CHECKOV, "-d", str(folder), "--compact", "-o", "json", "--skip-download"],
        capture_output=True,
        text=True,
        check=False,
    )
    reports = json.loads(done.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert {r["check_type"] for r in reports} >= {"kubernetes"}, done.stderr[-2000:]
    failed = [(f["check_id"], Path(f["file_path"]).name) for r in reports for f in r["results"]["failed_checks"]]
    assert failed == []
    passed = sum(r["summary"]["passed"] for r in reports)
    skipped = {c["check_id"] for r in reports for c in r["results"]["skipped_checks"]}
    assert passed > 300 and skipped <= {check for check, _ in _documented()}


def _images(manifest: dict[str, Any]) -> list[str]:
    spec = manifest["spec"]
    pod = (spec.get("jobTemplate", {}).get("spec", spec))["template"]["spec"]
    return [c["image"] for c in [*pod.get("initContainers", []), *pod["containers"]]]


@pytest.mark.parametrize("stack", STACKS)
def test_the_tag_exception_is_carried_exactly_by_workloads_running_a_tag(stack: str, rendered, tmp_path: Path) -> None:
    """A workload skips CKV_K8S_43 while, and only while, one of its images is named by tag: pinning them all by
    digest (loopform pin-images) takes the exception away."""
    import yaml

    workloads = 0
    for path in _rendered_folder(stack, rendered, tmp_path).glob("*.yaml"):
        manifest = yaml.safe_load(path.read_text()) or {}
        if manifest.get("kind") not in {"Deployment", "StatefulSet", "Job", "CronJob", "DaemonSet"}:
            continue
        workloads += 1
        annotations = (manifest.get("metadata") or {}).get("annotations") or {}
        skips_tag = any(v.startswith(f"{BY_DIGEST}=") for k, v in annotations.items() if SKIP.match(k))
        assert skips_tag == any("@sha256:" not in image for image in _images(manifest)), path.name
    assert workloads


def test_a_workload_pinned_by_digest_carries_no_tag_exception() -> None:
    from components.common import FEAST_ENV_EXCEPTION, workload_skips

    pinned = "ghcr.io/loopform/pipeline@sha256:" + "a" * 64
    assert workload_skips([pinned]) == {}
    assert workload_skips([pinned], FEAST_ENV_EXCEPTION) == {"checkov.io/skip1": "=".join(FEAST_ENV_EXCEPTION)}
    tagged = workload_skips([pinned, "prom/pushgateway:v1.11.1"], FEAST_ENV_EXCEPTION)
    assert [value.split("=")[0] for value in tagged.values()] == ["CKV_K8S_35", BY_DIGEST]
