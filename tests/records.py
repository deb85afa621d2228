"""Signed release records for tests: a fixed test key, sealed evidence, and records signed per environment."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from loopform import evidence as ev
from loopform import record as rec

KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
"""The release key of the tests (a fixed seed: records are reproducible)."""
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
"""A key no test config trusts."""
ENVIRONMENTS = ("dev", "staging", "prod")
TRUSTED = [rec.trusted_key(KEY, ENVIRONMENTS).to_dict()]
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
FILES = {"MLmodel": "1" * 64, "data/model.pth": "2" * 64}


def evidence(model: str = "fraud", version: int = 3, *, created: datetime = NOW - timedelta(days=1), **changes: Any):
    """Sealed evidence that passes every default gate."""
    body = {
        "model": model,
        "version": version,
        "run_id": "abc123",
        "training_data_fingerprint": "f" * 64,
        "gates": {
            "validation": {
                "gate": "validation",
                "passed": True,
                "metrics": {"worst_missing_share": 0.0, "worst_out_of_range_share": 0.002},
                "failures": [],
            },
            "drift": {"gate": "drift", "passed": True, "metrics": {"drift_share": 0.1}, "failures": []},
            "ood": {"gate": "ood", "passed": True, "metrics": {"ood_rate": 0.01}, "failures": []},
        },
        "evaluation": {
            "task": "classification",
            "auc": 0.91,
            "auc_low": 0.89,
            "auc_high": 0.93,
            "confidence": 0.95,
            "bootstrap_samples": 1000,
            "rows": 4000,
            "positives": 140,
            "positive_rate": 0.035,
            "base_rate": 0.03,
            "brier": 0.02,
            "brier_base": 0.0338,
            "brier_skill": 0.41,
            "ece": 0.01,
            "threshold": 0.3,
            "threshold_low": 0.2,
            "threshold_high": 0.4,
            "threshold_alert_rate": 0.04,
            "precision": 0.5,
            "recall": 0.6,
            "alert_rate": 0.01,
            "alert_threshold": 0.7,
            "precision_at_alert_rate": 0.8,
            "recall_at_alert_rate": 0.23,
            "champion_version": 2,
            "champion_auc": 0.905,
            "auc_delta": 0.005,
            "auc_delta_low": -0.002,
            "auc_delta_high": 0.012,
        },
        "artifacts": {"digest": rec.artifacts_digest(FILES), "files": FILES},
    }
    body.update(changes)
    return ev.seal(body, now=created)


REGRESSION = {
    "task": "regression",
    "rmse": 9.5,
    "rmse_low": 9.1,
    "rmse_high": 9.9,
    "mae": 7.2,
    "mae_low": 6.9,
    "mae_high": 7.5,
    "r2": 0.62,
    "rmse_base": 15.4,
    "label_mean": 38.0,
    "rows": 2000,
    "confidence": 0.95,
    "bootstrap_samples": 1000,
    "champion_version": 2,
    "champion_rmse": 9.6,
    "rmse_ratio": -0.01,
    "rmse_ratio_low": -0.02,
    "rmse_ratio_high": 0.005,
}
"""The evaluation of a regressor (`loopform.evaluation.evaluate_regressor`) that passes a max_rmse of 12."""


def regression_evidence(model: str = "delivery", version: int = 3, **evaluation: Any) -> dict[str, Any]:
    """Sealed evidence of a regressor: `evidence` with REGRESSION (and `evaluation`'s changes) as its evaluation."""
    return evidence(model, version, evaluation={**REGRESSION, **evaluation})


def release(
    env: str = "prod",
    *,
    key: Any = KEY,
    staged: bool = True,
    image: str | None = None,
    released: datetime = NOW,
    sealed: dict | None = None,
) -> dict[str, Any]:
    """A record signed for `env`; a prod record carries the signed staging record of the same version.

    The image defaults to the one `loopform promote` names for the sealed model and version.
    """
    sealed = sealed or evidence()
    image = image or f"ghcr.io/loopform/{sealed['model']}:v{sealed['version']}"
    record = rec.build(sealed, image=image, released_at=ev.now_iso(released))
    if staged and env != rec.STAGING:
        staging = rec.sign(
            rec.build(sealed, image=image, released_at=ev.now_iso(released - timedelta(hours=2))), rec.STAGING, key
        )
        record["staging"] = rec.staging_proof(staging)
    return rec.sign(record, env, key)
