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

args = PlatformArgs(spec=spec, root=ROOT, **secret_config(pulumi.Config("loopform"), spec))

provider_opts = None
if spec.cluster.kube_context:
    provider = k8s.Provider("kubernetes", context=spec.cluster.kube_context)
    provider_opts = pulumi.ResourceOptions(providers=[provider])

platform = Platform(spec.environment, args, provider_opts)

pulumi.export("tracking_uri", platform.tracking_uri)
pulumi.export("feature_server_url", platform.feature_server_url)
pulumi.export("namespaces", platform.namespaces)
pulumi.export("workflow_templates", platform.workflow_templates)
pulumi.export("workflow_submitter", platform.workflow_submitter)
