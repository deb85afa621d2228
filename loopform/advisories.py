"""Known-vulnerable versions of what the platform pins, and the check that none is pinned.

Each advisory names a component, the versions it affects (half-open ranges, as GitHub's advisory
database states them) and the releases that fix it. `pinned_versions` reads what a spec runs and
`constraint_versions` what the images install; `findings` names every advisory one of those versions
falls in. `tests/test_advisories.py` runs it over the repository's stacks and constraints, so a pin on
this list fails the suite. Add an advisory here when one is published for a listed component, before
moving the pin.

Only advisories some release fixes are listed: one that no version escapes (Feast's CORS advisory
CVE-2024-11602, MLflow's and BentoML's "loading an untrusted model runs its code") cannot be pinned
away; the deployment answers those (authenticated writes, network policies, signed release records).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from loopform.spec import PlatformSpec

ARGO_WORKFLOWS = "argo-workflows"
ARGO_CD = "argo-cd"
MLFLOW = "mlflow"
FEAST = "feast"
BENTOML = "bentoml"
#: Components installed from constraints.txt (their PyPI names).
PYTHON_PACKAGES = (MLFLOW, FEAST, BENTOML)

_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)$")
_CONSTRAINT = re.compile(r"^([A-Za-z0-9_.-]+)==([^\s;#]+)")

Version = tuple[int, int, int]


def parse_version(text: str) -> Version:
    """`v3.7.18` or `3.7.18` as (3, 7, 18); anything else is refused rather than compared wrongly."""
    match = _VERSION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a release version (MAJOR.MINOR.PATCH, optionally prefixed with v)")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


@dataclass(frozen=True)
class Advisory:
    """One published advisory's affected range on one release line: versions in [introduced, below)."""

    component: str
    id: str
    """CVE id, as the fix's release notes and the advisory database cite it."""
    introduced: str | None
    """First affected version; None: every version before `below`."""
    below: str
    """First version past the range (the fix, or the next line where this line never got one)."""
    fixed_in: str
    """Releases that fix it, e.g. `3.7.15` or `3.2.12, 3.3.10, 3.4.2`."""
    summary: str

    def affects(self, version: str) -> bool:
        parsed = parse_version(version)
        if self.introduced is not None and parsed < parse_version(self.introduced):
            return False
        return parsed < parse_version(self.below)

    @property
    def affected(self) -> str:
        """The range in the advisory database's notation, e.g. `>=3.7.0, <3.7.14`."""
        return f">={self.introduced or 0}, <{self.below}"


def _aw(cve: str, introduced: str | None, below: str, summary: str, fixed_in: str | None = None) -> Advisory:
    return Advisory(ARGO_WORKFLOWS, cve, introduced, below, fixed_in or below, summary)


def _cd(cve: str, introduced: str | None, below: str, summary: str, fixed_in: str | None = None) -> Advisory:
    return Advisory(ARGO_CD, cve, introduced, below, fixed_in or below, summary)


_STRICT_BYPASS = "bypasses templateReferencing Strict/Secure: a submitter runs any pod with the steps' secrets"
_CD_XSS_FIXES = "3.2.12, 3.3.10, 3.4.2"

#: Sources: github.com/advisories/<GHSA> for the Go modules github.com/argoproj/argo-workflows/v3 and /v4,
#: github.com/argoproj/argo-cd/v2 and /v3, and the PyPI packages mlflow, feast and bentoml.
ADVISORIES: tuple[Advisory, ...] = (
    # Argo Workflows, v3. The templateReferencing bypasses are why the platform runs >= v3.7.15.
    _aw("CVE-2025-62157", None, "3.6.12", "controller logs show artifact repository keys", "3.6.12, 3.7.3"),
    _aw("CVE-2025-62157", "3.7.0", "3.7.3", "controller logs show artifact repository keys"),
    _aw("CVE-2025-66626", None, "3.6.14", "executor untar follows symlinks (ZipSlip, RCE)", "3.6.14, 3.7.5"),
    _aw("CVE-2025-66626", "3.7.0", "3.7.5", "executor untar follows symlinks (ZipSlip, RCE)"),
    _aw("CVE-2026-23960", None, "3.6.17", "stored XSS in the artifact directory listing", "3.6.17, 3.7.8"),
    _aw("CVE-2026-23960", "3.7.0", "3.7.8", "stored XSS in the artifact directory listing"),
    _aw("CVE-2026-31892", None, "3.7.11", f"podSpecPatch {_STRICT_BYPASS}"),
    # The database states `>=3.6.5` beside `>=3.7.0, <3.7.14`: no 3.6 release has the fix.
    _aw("CVE-2026-40886", "3.6.5", "3.7.0", "a pod annotation crash-loops the controller", "3.7.14"),
    _aw("CVE-2026-40886", "3.7.0", "3.7.14", "a pod annotation crash-loops the controller"),
    _aw("CVE-2026-42294", None, "3.7.14", "the webhook interceptor reads any body before authenticating (DoS)"),
    _aw("CVE-2026-42296", None, "3.7.14", f"serviceAccountName, securityContext, hostNetwork {_STRICT_BYPASS}"),
    _aw("CVE-2026-54526", None, "3.7.15", f"artifactGC.podSpecPatch {_STRICT_BYPASS}"),
    # Argo Workflows, v4 (for the move to chart 1.x).
    _aw("CVE-2026-31892", "4.0.0", "4.0.2", f"podSpecPatch {_STRICT_BYPASS}"),
    _aw("CVE-2026-40886", "4.0.0", "4.0.5", "a pod annotation crash-loops the controller"),
    _aw("CVE-2026-42294", "4.0.0", "4.0.5", "the webhook interceptor reads any body before authenticating (DoS)"),
    _aw("CVE-2026-42295", "4.0.0", "4.0.5", "the executor logs artifact repository credentials"),
    _aw("CVE-2026-42296", "4.0.0", "4.0.5", f"serviceAccountName, securityContext, hostNetwork {_STRICT_BYPASS}"),
    _aw("CVE-2026-42297", "4.0.0", "4.0.5", "the sync ConfigMap provider has no authorization"),
    _aw("CVE-2026-54526", "4.0.0", "4.0.6", f"artifactGC.podSpecPatch {_STRICT_BYPASS}"),
    # Argo CD.
    _cd("CVE-2025-55190", "2.13.0", "2.13.9", "project API tokens read repository credentials"),
    _cd("CVE-2025-55190", "2.14.0", "2.14.16", "project API tokens read repository credentials"),
    _cd("CVE-2025-55190", "3.0.0", "3.0.14", "project API tokens read repository credentials"),
    _cd("CVE-2025-55190", "3.1.0", "3.1.2", "project API tokens read repository credentials"),
    _cd("CVE-2026-42880", "3.2.0", "3.2.11", "ServerSideDiff lets read-only users extract Secrets", "3.2.11, 3.3.9"),
    _cd("CVE-2026-42880", "3.3.0", "3.3.9", "ServerSideDiff lets read-only users extract Secrets"),
    _cd("CVE-2026-45737", "3.2.0", "3.2.12", "Secret extraction through sensitive annotations", _CD_XSS_FIXES),
    _cd("CVE-2026-45737", "3.3.0", "3.3.10", "Secret extraction through sensitive annotations", _CD_XSS_FIXES),
    _cd("CVE-2026-45737", "3.4.0", "3.4.2", "Secret extraction through sensitive annotations", _CD_XSS_FIXES),
    # No 2.x release fixes it: the whole v2 module is affected.
    _cd("CVE-2026-45738", None, "3.0.0", "stored XSS in Application links (developer to admin)", _CD_XSS_FIXES),
    _cd("CVE-2026-45738", "3.0.0", "3.2.12", "stored XSS in Application links (developer to admin)", _CD_XSS_FIXES),
    _cd("CVE-2026-45738", "3.3.0", "3.3.10", "stored XSS in Application links (developer to admin)", _CD_XSS_FIXES),
    _cd("CVE-2026-45738", "3.4.0", "3.4.2", "stored XSS in Application links (developer to admin)", _CD_XSS_FIXES),
    # MLflow (the tracking server image and every image's client).
    Advisory(MLFLOW, "CVE-2026-2033", None, "3.8.0", "3.8.0", "artifact handler path traversal (unauthenticated RCE)"),
    Advisory(MLFLOW, "CVE-2026-2611", "3.9.0", "3.10.0", "3.10.0", "Assistant /ajax-api accepts cross-origin calls"),
    Advisory(MLFLOW, "CVE-2026-2734", None, "3.10.0", "3.10.0", "any authenticated user lists every model version"),
    Advisory(
        MLFLOW, "CVE-2026-4035", None, "3.11.0", "3.11.0", "AI Gateway secrets resolve server environment variables"
    ),
    Advisory(MLFLOW, "CVE-2026-33865", None, "3.11.1", "3.11.1", "stored XSS through MLmodel YAML in the UI"),
    # Feast and BentoML (the feature server and the model services).
    Advisory(FEAST, "CVE-2025-11157", None, "0.54.0", "0.54.0", "Kubernetes materializer loads YAML unsafely (RCE)"),
    Advisory(BENTOML, "CVE-2024-2912", None, "1.2.5", "1.2.5", "insecure deserialization of request bodies (RCE)"),
    Advisory(
        BENTOML, "CVE-2026-33744", None, "1.4.37", "1.4.37", "bentofile system_packages inject Dockerfile commands"
    ),
    Advisory(BENTOML, "CVE-2026-35043", None, "1.4.38", "1.4.38", "cloud deployment injects system_packages commands"),
    Advisory(BENTOML, "CVE-2026-35044", None, "1.4.38", "1.4.38", "Dockerfile generation renders unsandboxed Jinja"),
    Advisory(BENTOML, "CVE-2026-44345", None, "1.4.39", "1.4.39", "docker.base_image injects Dockerfile commands"),
    Advisory(BENTOML, "CVE-2026-44346", None, "1.4.39", "1.4.39", "envs[*].name injects Dockerfile commands"),
)


def affecting(component: str, version: str) -> list[Advisory]:
    """Advisories of `component` whose affected range holds `version`."""
    return [a for a in ADVISORIES if a.component == component and a.affects(version)]


def pinned_versions(spec: PlatformSpec) -> dict[str, str]:
    """Component -> version the spec runs: the image tags set over the charts' own app versions."""
    versions = {ARGO_WORKFLOWS: spec.orchestrator.argo_workflows_version, MLFLOW: spec.registry.mlflow_version}
    if spec.gitops.enabled:
        versions[ARGO_CD] = spec.gitops.argocd_version
    return versions


def constraint_versions(constraints: str) -> dict[str, str]:
    """Versions constraints.txt pins (`name==version`) for the listed Python components."""
    pins = {}
    for line in constraints.splitlines():
        match = _CONSTRAINT.match(line.strip())
        if match and match.group(1).lower() in PYTHON_PACKAGES:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def findings(versions: dict[str, str]) -> list[str]:
    """One line per advisory a pinned version falls in, naming the advisory and its fixes."""
    return [
        f"{component} {version} is affected by {a.id} ({a.affected}; fixed in {a.fixed_in}): {a.summary}"
        for component, version in sorted(versions.items())
        for a in affecting(component, version)
    ]
