"""Policy config per environment (`policies/config/<env>.json`): enforcement levels, thresholds, trusted keys.

The thresholds the pack enforces are the stack's gates, written in the pack's terms:
`gate_thresholds` is the one mapping between the two, so a test can prove the shipped
configs agree with the shipped stacks, and the local loop writes its own config from its
stack's gates together with the key pair it makes. A model's own gates (`models.<m>.gates`)
reach the pack as the rule's `models` entry: `{"delivery": {"max_rmse": 12}}` holds the
thresholds of that model that differ from the environment's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from loopform.record import MODELS, SIGNATURE_POLICY, TrustedKey
from loopform.spec import GatesSpec, PlatformSpec


def rule_thresholds(gates: GatesSpec) -> dict[str, dict[str, Any]]:
    """Each promotion-gate rule's thresholds, from one set of gates."""
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
            "min_holdout_rows": gates.min_holdout_rows,
            "max_rmse": gates.max_rmse,
            "min_r2": gates.min_r2,
        },
        "no-champion-regression": {"max_auc_drop": gates.max_auc_drop, "max_rmse_increase": gates.max_rmse_increase},
        "released-to-staging-first": {"required": gates.require_staging},
        "evidence-fresh": {"max_evidence_age_days": gates.max_evidence_age_days},
    }


def gate_thresholds(spec: PlatformSpec) -> dict[str, dict[str, Any]]:
    """Each promotion-gate rule's config: the environment's thresholds, and under `models` each model's
    thresholds that differ from them (`PlatformSpec.gates_for`)."""
    found = rule_thresholds(spec.gates)
    own = {name: rule_thresholds(spec.gates_for(name)) for name in sorted(spec.models)}
    for rule, values in found.items():
        models = {}
        for name, thresholds in own.items():
            differ = {key: value for key, value in thresholds[rule].items() if value != values[key]}
            if differ:
                models[name] = differ
        if models:
            values[MODELS] = models
    return found


def _flat(entry: Mapping[str, Any]) -> dict[str, Any]:
    """A rule's thresholds with per-model ones as `models.<m>.<key>`."""
    flat = {key: value for key, value in entry.items() if key != MODELS}
    models = entry.get(MODELS)
    for name, values in (models if isinstance(models, Mapping) else {}).items():
        if isinstance(values, Mapping):
            flat.update({f"{MODELS}.{name}.{key}": value for key, value in values.items()})
        else:
            flat[f"{MODELS}.{name}"] = values
    return flat


def disagreements(config: Mapping[str, Any], spec: PlatformSpec) -> list[str]:
    """Where a policy config's thresholds differ from the stack's gates (promote and the pack would disagree)."""
    found = []
    for rule, expected in gate_thresholds(spec).items():
        entry = config.get(rule)
        want, have = _flat(expected), _flat(entry if isinstance(entry, Mapping) else {})
        extra = sorted(key for key in have if key.startswith(f"{MODELS}.") and key not in want)
        for key in [*want, *extra]:
            if have.get(key) != want.get(key):
                found.append(
                    f"{rule}.{key} is {have.get(key)!r} in the policy config, {want.get(key)!r} in the stack's gates"
                )
    return found


def for_environment(base: Mapping[str, Any], spec: PlatformSpec, trusted: Iterable[TrustedKey]) -> dict[str, Any]:
    """`base` (levels and guardrail config) with the gate thresholds of `spec`'s environment and its models,
    and the trusted keys."""
    config: dict[str, Any] = json.loads(json.dumps(base))
    for rule, values in gate_thresholds(spec).items():
        entry = config.get(rule)
        kept = {k: v for k, v in (entry if isinstance(entry, dict) else _level(entry)).items() if k != MODELS}
        config[rule] = {**kept, **values}
    entry = config.get(SIGNATURE_POLICY)
    config[SIGNATURE_POLICY] = {
        **(entry if isinstance(entry, dict) else _level(entry)),
        "environment": spec.environment,
        "trusted_keys": [key.to_dict() for key in trusted],
    }
    return config


def _level(entry: Any) -> dict[str, Any]:
    return {"enforcementLevel": entry} if isinstance(entry, str) else {}


def write(path: Path, config: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path
