"""The loopform policy pack, as `pulumi preview --policy-pack policies` runs it.

Pulumi starts this file with `python -m pulumi.policy ENGINE policies`; building the pack
starts the analyzer server and prints its port. The rules live in importable modules
(`policies.pack`), so tests and `loopform check` never start a server by importing them.
"""

import sys
from pathlib import Path

from pulumi_policy import EnforcementLevel, PolicyPack

# Pulumi runs the pack from its own folder; the repository root makes `policies` and `loopform` importable
# even where the virtualenv has no editable install of the project.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from policies.pack import policies

PolicyPack(
    name="loopform",
    policies=policies(),
    enforcement_level=EnforcementLevel.MANDATORY,
    description="Promotion gates on signed release records, and the platform's guardrails.",
)
