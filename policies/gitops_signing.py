"""GitOps road: Argo CD syncs only commits signed by a release key.

Without `signatureKeys` on the AppProject, anyone who can push to the synced branch can deploy
any allowed workload into the serving namespace, and the policy pack never sees it. Argo CD
verifies signatures with the GnuPG public keys in `argocd-gpg-keys-cm`, which the argo-cd chart
fills from `configs.gpg.keys`: a key named by the project but not imported fails every sync.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from policies.core import Config, Resource, StackRule

APP_PROJECT = "kubernetes:argoproj.io/v1alpha1:AppProject"
CHARTS = frozenset({"kubernetes:helm.sh/v4:Chart", "kubernetes:helm.sh/v3:Chart", "kubernetes:helm.sh/v3:Release"})


def _imported_keys(resources: Sequence[Resource]) -> set[str]:
    keys: set[str] = set()
    for resource in resources:
        if resource.type in CHARTS and resource.props.get("chart") == "argo-cd":
            values: Any = resource.props.get("values") or {}
            gpg = ((values.get("configs") or {}).get("gpg") or {}) if isinstance(values, Mapping) else {}
            keys |= set((gpg.get("keys") or {}).keys())
    return keys


def check_commits_signed(resources: Sequence[Resource], config: Config) -> list[tuple[Resource | None, str]]:
    """Every AppProject names release keys (when required), and each is imported into Argo CD."""
    imported = _imported_keys(resources)
    found: list[tuple[Resource | None, str]] = []
    for project in (r for r in resources if r.type == APP_PROJECT):
        spec = project.props.get("spec") or {}
        name = (project.props.get("metadata") or {}).get("name", project.name)
        keys = [entry.get("keyID") for entry in spec.get("signatureKeys") or [] if isinstance(entry, Mapping)]
        if not keys and config["required"]:
            found.append(
                (
                    project,
                    f"AppProject {name}: 0 signatureKeys < 1 (required): any commit pushed to "
                    f"{', '.join(spec.get('sourceRepos') or ['its repository'])} syncs into the serving namespace",
                )
            )
        for key in keys:
            if key not in imported:
                found.append(
                    (project, f"AppProject {name}: release key {key} is not imported (argo-cd configs.gpg.keys)")
                )
    return found


RULES = [
    StackRule(
        name="gitops-commits-signed",
        description="Argo CD syncs only commits signed by a release key whose public key it has.",
        check=check_commits_signed,
        config={"required": {"type": "boolean", "default": False}},
    )
]
