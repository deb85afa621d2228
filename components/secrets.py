"""SharedSecret: one Secret, with the same name and data, in every namespace whose pods read it.

A pod can only mount or reference a Secret of its own namespace, so credentials that several
namespaces' workloads use (object-store keys, the online store's connection string) are
declared once here, from Pulumi secret config, and copied to each namespace by the program:
nothing is left for an operator to create by hand.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_kubernetes as k8s

from components import common


@dataclass(frozen=True, kw_only=True)
class SharedSecretArgs:
    """Inputs of a Secret shared by several namespaces."""

    secret_name: str
    """Name of the Secret in every namespace (what pods reference)."""
    namespaces: Sequence[str]
    """Namespaces whose workloads read it."""
    string_data: Mapping[str, pulumi.Input[str]]
    """Keys and values; each value is stored as a Pulumi secret."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Common labels added to every copy."""


class SharedSecret(pulumi.ComponentResource):
    """The same Secret in each namespace of `namespaces`; children are `<name>-<namespace>`."""

    secret_name: pulumi.Output[str]
    namespaces: pulumi.Output[list[str]]

    def __init__(self, name: str, args: SharedSecretArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("loopform:secrets:SharedSecret", name, None, opts)
        data = {key: pulumi.Output.secret(value) for key, value in sorted(args.string_data.items())}
        for namespace in sorted(set(args.namespaces)):
            k8s.core.v1.Secret(
                f"{name}-{namespace}",
                metadata=common.metadata(args.secret_name, namespace, dict(args.labels)),
                type="Opaque",
                string_data=data,
                opts=common.child(self),
            )
        self.secret_name = pulumi.Output.from_input(args.secret_name)
        self.namespaces = pulumi.Output.from_input(sorted(set(args.namespaces)))
        self.register_outputs({"secret_name": self.secret_name, "namespaces": self.namespaces})
