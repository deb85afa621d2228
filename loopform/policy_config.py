"""Policy config per environment (`policies/config/<env>.json`): enforcement levels, thresholds, trusted keys.

The thresholds the pack enforces are the stack's `gates`, written in the pack's terms:
`gate_thresholds` is the one mapping between the two, so a test can prove the shipped
configs agree with the shipped stacks, and the local loop writes its own config from its
stack's gates together with the key pair it makes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from loopform.record import SIGNATURE_POLICY, TrustedKey
from loopform.spec import GatesSpec


def gate_thresholds(gates: GatesSpec) -> dict[str, dict[str, Any]]:
    """Each promotion-gate rule's config, from the environment's gates."""
    return {
        "data-validation-passed": {
            "max_missing_share": gates.max_missing_share,
            "max_out_of_range_share": gates.max_out_of_range_share,
        },
        "drift-within-threshold": {"max_drift_share": gates.drift.max_drift_share},
        "ood-within-threshold": {"max_ood_rate": gates.max_ood_rate},
        "metrics-meet-minimums": {
            "min_auc": gates.min_auc,
            "min_positives": gates.min_positives,
            "min_brier_skill": gates.min_brier_skill,
        },
        "no-champion-regression": {"max_auc_drop": gates.max_auc_drop},
        "released-to-staging-first": {"required": gates.require_staging},
        "evidence-fresh": {"max_evidence_age_days": gates.max_evidence_age_days},
    }


def disagreements(config: Mapping[str, Any], gates: GatesSpec) -> list[str]:
    """Where a policy config's thresholds differ from the stack's gates (promote and the pack would disagree)."""
    found = []
    for rule, expected in gate_thresholds(gates).items():
        entry = config.get(rule)
        entry = entry if isinstance(entry, Mapping) else {}
        for key, value in expected.items():
            if entry.get(key) != value:
                found.append(f"{rule}.{key} is {entry.get(key)!r} in the policy config, {value!r} in the stack's gates")
    return found


def for_environment(
    base: Mapping[str, Any], environment: str, gates: GatesSpec, trusted: Iterable[TrustedKey]
) -> dict[str, Any]:
    """`base` (levels and guardrail config) with this environment's gate thresholds and trusted keys."""
    config: dict[str, Any] = json.loads(json.dumps(base))
    for rule, values in gate_thresholds(gates).items():
        entry = config.get(rule)
        config[rule] = {**(entry if isinstance(entry, dict) else _level(entry)), **values}
    entry = config.get(SIGNATURE_POLICY)
    config[SIGNATURE_POLICY] = {
        **(entry if isinstance(entry, dict) else _level(entry)),
        "environment": environment,
        "trusted_keys": [key.to_dict() for key in trusted],
    }
    return config


def _level(entry: Any) -> dict[str, Any]:
    return {"enforcementLevel": entry} if isinstance(entry, str) else {}


def write(path: Path, config: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path
