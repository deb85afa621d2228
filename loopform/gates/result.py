"""The one result type every gate returns, and its JSON form (what evidence and MLflow tags hold)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """Plain JSON data: numpy scalars/arrays to Python, tuples to lists, NaN/inf to None (canonical JSON refuses them)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return [json_safe(v) for v in items]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    # numpy scalars and arrays without importing numpy here
    if hasattr(value, "tolist"):
        return json_safe(value.tolist())
    if hasattr(value, "item"):
        return json_safe(value.item())
    raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")


@dataclass
class GateResult:
    """Outcome of one gate: passed or not, the measured metrics, and why it failed."""

    gate: str
    passed: bool
    metrics: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    report: str | None = None  # path of the HTML report, when one was written

    def to_dict(self) -> dict[str, Any]:
        return {
            "gate": self.gate,
            "passed": bool(self.passed),
            "metrics": json_safe(self.metrics),
            "failures": [str(f) for f in self.failures],
            "report": self.report,
        }

    def write_json(self, path: Path | str) -> Path:
        """Write the result as indented JSON (parents created); returns the path."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n")
        return target

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GateResult:
        """Inverse of to_dict; a malformed record is a ValueError naming the bad field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"gate result must be a mapping, got {type(data).__name__}")
        unknown = set(data) - {"gate", "passed", "metrics", "failures", "report"}
        if unknown:
            raise ValueError(f"gate result has unknown fields: {', '.join(sorted(unknown))}")
        gate, passed = data.get("gate"), data.get("passed")
        metrics, failures, report = data.get("metrics", {}), data.get("failures", []), data.get("report")
        if not isinstance(gate, str) or not gate:
            raise ValueError("gate result field 'gate' must be a non-empty string")
        if not isinstance(passed, bool):
            raise ValueError("gate result field 'passed' must be a boolean")
        if not isinstance(metrics, Mapping):
            raise ValueError("gate result field 'metrics' must be a mapping")
        if not isinstance(failures, list) or not all(isinstance(f, str) for f in failures):
            raise ValueError("gate result field 'failures' must be a list of strings")
        if report is not None and not isinstance(report, str):
            raise ValueError("gate result field 'report' must be a string or null")
        return cls(gate=gate, passed=passed, metrics=dict(metrics), failures=list(failures), report=report)

    @classmethod
    def read_json(cls, path: Path | str) -> GateResult:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def summary(self) -> str:
        """One line for logs and CLI output."""
        if self.passed:
            return f"{self.gate}: passed"
        return f"{self.gate}: FAILED - " + "; ".join(self.failures)
