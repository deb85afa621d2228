"""SharedSecret: one Secret, with the same name and data, in every namespace whose pods read it.

A pod can only mount or reference a Secret of its own namespace, so credentials that several
namespaces' workloads use (object-store keys, the online store's connection string) are
declared once here, from Pulumi secret config, and copied to each namespace by the program:
nothing is left for an operator to create by hand.
"""

from __future__ import annotations

import hashlib
import hmac
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


def derived_password(secret: pulumi.Input[str], purpose: str) -> pulumi.Output[str]:
    """A password for `purpose` derived from `secret` (HMAC-SHA256): stable, rotates with it, never configured twice."""
    return pulumi.Output.secret(
        pulumi.Output.from_input(secret).apply(
            lambda value: hmac.new(value.encode(), purpose.encode(), hashlib.sha256).hexdigest()[:40]
        )
    )


def checksum(secret: pulumi.Input[str], purpose: str) -> pulumi.Output[str]:
    """A short one-way digest of a secret, for names and annotations that must change when it does.

    Unsecret on purpose: it reveals nothing usable of a random password, and a secret annotation
    would hide the whole pod spec from every preview diff.
    """
    digest = pulumi.Output.from_input(secret).apply(
        lambda value: hashlib.sha256(f"{purpose}:{value}".encode()).hexdigest()[:16]
    )
    return pulumi.Output.unsecret(digest)
