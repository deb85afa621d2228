"""No version the platform pins is on the list of known-vulnerable versions (loopform/advisories.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loopform.advisories import (
    ADVISORIES,
    ARGO_CD,
    ARGO_WORKFLOWS,
    BENTOML,
    FEAST,
    MLFLOW,
    PYTHON_PACKAGES,
    affecting,
    constraint_versions,
    findings,
    parse_version,
    pinned_versions,
)
from loopform.spec import PlatformSpec, load_stack, stack_file

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"

STACKS = ("local", "dev", "staging", "prod")


@pytest.mark.parametrize("stack", STACKS)
def test_no_stack_pins_a_known_vulnerable_version(stack: str) -> None:
    found = findings(pinned_versions(load_stack(stack_file(stack))))
    assert not found, "\n".join(found)


def test_spec_defaults_pin_no_known_vulnerable_version() -> None:
    spec = PlatformSpec.model_validate({"environment": "dev", "cluster": {"kind": "none"}})
    versions = pinned_versions(spec)
    assert set(versions) == {ARGO_WORKFLOWS, ARGO_CD, MLFLOW}
    assert findings(versions) == []


def test_the_images_install_no_known_vulnerable_package() -> None:
    """constraints.txt pins what every image installs (MLflow, Feast, BentoML): none is on the list."""
    versions = constraint_versions(CONSTRAINTS.read_text())
    assert set(versions) == set(PYTHON_PACKAGES)
    found = findings(versions)
    assert not found, "\n".join(found)


def test_constraints_are_read_by_package_name() -> None:
    text = "# pins\nMLflow==3.7.0\nmlflow-skinny==3.7.0\nfeast==0.53.0 ; python_version >= '3.10'\nnumpy==2.3.1\n"
    assert constraint_versions(text) == {MLFLOW: "3.7.0", FEAST: "0.53.0"}


@pytest.mark.parametrize(
    ("component", "version", "advisories"),
    [
        # What chart 0.45.2 ran: every templateReferencing bypass.
        (ARGO_WORKFLOWS, "v3.6.2", {"CVE-2026-31892", "CVE-2026-42296", "CVE-2026-54526", "CVE-2026-23960"}),
        # What chart 0.47.5 runs without an image tag: the two bypasses fixed after it.
        (ARGO_WORKFLOWS, "v3.7.11", {"CVE-2026-42296", "CVE-2026-54526", "CVE-2026-42294", "CVE-2026-40886"}),
        (ARGO_WORKFLOWS, "v3.7.14", {"CVE-2026-54526"}),
        (ARGO_WORKFLOWS, "v4.0.5", {"CVE-2026-54526"}),
        # The old Argo CD pin, and the last of 2.14: no 2.x release fixes CVE-2026-45738.
        (ARGO_CD, "v2.14.2", {"CVE-2025-55190", "CVE-2026-45738"}),
        (ARGO_CD, "v2.14.21", {"CVE-2026-45738"}),
        (ARGO_CD, "v3.3.8", {"CVE-2026-42880", "CVE-2026-45737", "CVE-2026-45738"}),
        (MLFLOW, "3.7.0", {"CVE-2026-2033", "CVE-2026-2734", "CVE-2026-4035", "CVE-2026-33865"}),
        (FEAST, "0.53.0", {"CVE-2025-11157"}),
        (BENTOML, "1.4.38", {"CVE-2026-44345", "CVE-2026-44346"}),
    ],
)
def test_old_pins_are_reported_with_their_advisories(component: str, version: str, advisories: set[str]) -> None:
    assert {a.id for a in affecting(component, version)} >= advisories
    messages = findings({component: version})
    assert all(any(advisory in line for line in messages) for advisory in advisories)
    assert all(line.startswith(f"{component} {version} is affected by CVE-") for line in messages)
    assert all("; fixed in " in line for line in messages)


def test_a_stack_with_the_old_pins_fails() -> None:
    spec = load_stack(stack_file("prod"))
    old = spec.model_copy(
        update={
            "orchestrator": spec.orchestrator.model_copy(update={"argo_workflows_version": "v3.6.2"}),
            "gitops": spec.gitops.model_copy(update={"argocd_version": "v2.14.2"}),
        }
    )
    found = findings(pinned_versions(old))
    assert any(
        "argo-workflows v3.6.2 is affected by CVE-2026-54526 (>=0, <3.7.15; fixed in 3.7.15)" in f for f in found
    )
    assert any(
        "argo-cd v2.14.2 is affected by CVE-2025-55190 (>=2.14.0, <2.14.16; fixed in 2.14.16)" in f for f in found
    )


@pytest.mark.parametrize(
    ("component", "version"),
    [
        (ARGO_WORKFLOWS, "v3.7.15"),
        (ARGO_WORKFLOWS, "3.7.18"),
        (ARGO_WORKFLOWS, "v4.0.6"),
        (ARGO_CD, "v3.4.2"),
        (ARGO_CD, "v3.5.1"),
        (MLFLOW, "3.11.1"),
        (BENTOML, "1.4.39"),
    ],
)
def test_fixed_versions_are_clean(component: str, version: str) -> None:
    assert affecting(component, version) == []


def test_ranges_are_well_formed() -> None:
    """Every bound parses and every range is non-empty, so no advisory silently matches nothing."""
    for advisory in ADVISORIES:
        assert advisory.id.startswith(("CVE-", "GHSA-")) and advisory.summary
        assert advisory.fixed_in
        if advisory.introduced:
            assert parse_version(advisory.introduced) < parse_version(advisory.below), advisory


@pytest.mark.parametrize("text", ["latest", "v3.7", "3.7.15-rc1", "sha256:abc"])
def test_unparsable_versions_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a release version"):
        parse_version(text)
