"""The rows every benchmark reports, and the one table `make bench` prints (bench/all.py).

A benchmark script given `--json PATH` writes `{"rows": [...], "decisions_agree": bool | null}` there. A row
is one measured claim: loopform's number, the peer's (or none, for an absolute target), their ratio, the
target and whether it was met. A missed target is reported, never a failure: the machines are shared and
noisy. Only a decision that differs from the peer's fails a benchmark.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def ratio_row(check: str, loopform: float, peer: float, peer_name: str, unit: str, max_ratio: float) -> dict[str, Any]:
    """loopform against a peer: met when loopform / peer <= max_ratio."""
    ratio = loopform / peer if peer else float("inf")
    return {
        "check": check,
        "loopform": loopform,
        "peer": peer,
        "peer_name": peer_name,
        "unit": unit,
        "ratio": ratio,
        "target": f"<= {max_ratio:g}x {peer_name}",
        "met": ratio <= max_ratio,
    }


def limit_row(check: str, loopform: float, unit: str, limit: float) -> dict[str, Any]:
    """An absolute target (no peer): met when loopform <= limit."""
    return {
        "check": check,
        "loopform": loopform,
        "peer": None,
        "peer_name": None,
        "unit": unit,
        "ratio": None,
        "target": f"<= {limit:g} {unit}",
        "met": loopform <= limit,
    }


def write_json(path: str | Path | None, rows: Sequence[dict[str, Any]], decisions_agree: bool | None) -> None:
    """Write a script's rows where `--json` asked (nothing when it did not)."""
    if path:
        Path(path).write_text(json.dumps({"rows": list(rows), "decisions_agree": decisions_agree}, indent=1))


def markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as one Markdown table (bench/README.md keeps the latest)."""
    lines = ["| benchmark | check | loopform | peer | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        peer = f"{_number(row['peer'])} {row['unit']} ({row['peer_name']})" if row.get("peer") is not None else "-"
        ratio = f"{row['ratio']:.2f}x" if row.get("ratio") is not None else "-"
        lines.append(
            f"| {row.get('benchmark', '')} | {row['check']} | {_number(row['loopform'])} {row['unit']} | {peer} | "
            f"{ratio} | {row['target']} | {'yes' if row['met'] else 'NO'} |"
        )
    return "\n".join(lines)


def _number(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
