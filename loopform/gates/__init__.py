"""Data gates every release must pass: schema validation, drift and out-of-distribution rate."""

from loopform.gates.drift import (
    DriftInputError,
    DriftStats,
    FeatureDrift,
    Profile,
    compute_drift,
    drift_gate,
    profile,
)
from loopform.gates.ood import Envelope, fit_envelope, ood_gate
from loopform.gates.result import GateResult
from loopform.gates.validation import validate_data

__all__ = [
    "DriftInputError",
    "DriftStats",
    "Envelope",
    "FeatureDrift",
    "GateResult",
    "Profile",
    "compute_drift",
    "drift_gate",
    "fit_envelope",
    "ood_gate",
    "profile",
    "validate_data",
]
