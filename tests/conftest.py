"""Shared test set-up: offline switches for MLflow/BentoML/Feast, and rendered stacks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

STACKS = ("dev", "staging", "prod")


@pytest.fixture(scope="session")
def rendered():
    """Each stack's resources, rendered once per session under Pulumi mocks."""
    from loopform.render import render_stack

    cache: dict = {}

    def get(stack: str):
        if stack not in cache:
            cache[stack] = render_stack(stack, ROOT)
        return cache[stack]

    return get
