"""Shared test set-up: offline switches for MLflow/BentoML/Feast, and rendered stacks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
# The payload log's spill folders (loopform.payloads) go to this session's own temp folder, not a shared one.
os.environ.setdefault("LOOPFORM_PAYLOAD_SPILL_DIR", tempfile.mkdtemp(prefix="loopform-test-spill-"))

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
