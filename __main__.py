"""The Pulumi program: read the stack spec, build the Platform.

Only light imports here (pulumi, pulumi-kubernetes, pydantic), so `pulumi preview` starts fast.
"""

import sys
from pathlib import Path

import pulumi
import pulumi_kubernetes as k8s

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from components.platform import Platform, PlatformArgs, secret_config  # noqa: E402
from loopform.spec import SpecError, load_from_pulumi_config  # noqa: E402

try:
    spec = load_from_pulumi_config(ROOT)
except SpecError as error:
    raise pulumi.RunError(str(error)) from None
if spec.is_local:
    raise pulumi.RunError(
        f"stack {spec.environment} has cluster.kind none: it declares nothing; run it with "
        f"`loopform up --stack {spec.environment}`"
    )

args = PlatformArgs(spec=spec, root=ROOT, **secret_config(pulumi.Config("loopform"), spec))
# Always an explicit provider for the stack's own context (the spec requires one): never wherever kubectl points.
# Secrets and ConfigMaps update in place instead of being replaced (the provider's default): a rotated password
# must not replace the protected database Secret, and a feature-repo change must not delete the ConfigMap that
# running pods mount. Their consumers roll through checksum annotations instead.
provider = k8s.Provider(
    "kubernetes",
    context=spec.cluster.kube_context,
    enable_secret_mutable=True,
    enable_config_map_mutable=True,
)
platform = Platform(spec.environment, args, pulumi.ResourceOptions(providers=[provider]))

pulumi.export("tracking_uri", platform.tracking_uri)
pulumi.export("feature_server_url", platform.feature_server_url)
pulumi.export("namespaces", platform.namespaces)
pulumi.export("workflow_templates", platform.workflow_templates)
pulumi.export("workflow_submitter", platform.workflow_submitter)
pulumi.export("argocd_application", platform.argocd_application)
