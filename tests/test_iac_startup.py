"""The Pulumi program starts without hera's Argo models, and render's fast paths write what the slow ones wrote.

Times are bench/iac.py's business; these check the behaviour the speed rests on: what importing the program
loads, that the YAML every render writes is unchanged byte for byte, and that the artifact-repository check
still finds what it found.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from typing import Any

import hera._yaml  # noqa: F401  (hera's presenter on yaml.safe_dump: what every render wrote before)
import yaml

from loopform import render
from loopform.references import Ref, object_refs

from .helpers_project import ROOT


def _in_fresh_process(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return done.stdout


def test_importing_the_program_leaves_hera_models_unloaded() -> None:
    loaded = _in_fresh_process(
        """
        import sys
        import components.platform
        print(sorted(name for name in sys.modules if name.startswith("hera.workflows")))
        """
    )
    assert loaded.strip() == "[]"


def test_building_a_template_loads_hera_when_needed() -> None:
    out = _in_fresh_process(
        """
        import sys
        from components.workflow import render_cron_workflow, PipelineContext
        from loopform.spec import OrchestratorSpec
        ctx = PipelineContext(
            environment="dev", namespace="p", orchestrator=OrchestratorSpec(), pools={}, service_account="runner"
        )
        doc = render_cron_workflow(ctx, "fraud", "0 3 * * *")
        print(doc["kind"], doc["spec"]["workflowSpec"]["workflowTemplateRef"]["name"])
        print("hera.workflows.models" in sys.modules)
        """
    )
    assert out.split("\n")[:2] == ["CronWorkflow fraud-pipeline", "True"]


def test_the_program_keeps_heras_yaml_presenter() -> None:
    """ConfigMap data and the feature store's content hash are yaml.safe_dump output: it must not change."""
    out = _in_fresh_process(
        """
        import yaml
        import components.platform
        print(yaml.safe_dump({"script": "a\\nb", "flag": "y"}), end="")
        """
    )
    assert out == "flag: 'y'\nscript: |-\n  a\n  b\n"


_SCALARS = (1, -3, 2.5, 1e20, 1e-7, float("inf"), True, None, "", "y", "n", "yes", "null", "~", "0x10", "1.0")
_SCALARS += ("2024-01-01", "- a", "a: b", "#x", "'", '"', "*a", "&a", "|", "? x", "...", "---", "\n", "a\n", "\na")
_SCALARS += (" a", "a ", "a\n\n", "{{tasks.x.outputs}}", "s3://bucket/key", "a\tb", "é→😀", "a \nb", "a\n b")


def _tree(rng: random.Random, alphabet: str, depth: int = 0) -> Any:
    roll = rng.random()
    if depth < 3 and roll < 0.2:
        return {_text(rng, alphabet)[: rng.choice((20, 200))]: _tree(rng, alphabet, depth + 1) for _ in range(4)}
    if depth < 3 and roll < 0.35:
        return [_tree(rng, alphabet, depth + 1) for _ in range(rng.randint(0, 4))]
    if roll < 0.45:
        return rng.choice(_SCALARS)
    return _text(rng, alphabet)


def _text(rng: random.Random, alphabet: str) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.choice((rng.randint(0, 10), rng.randint(0, 300)))))


def test_dump_yaml_writes_what_pyyaml_wrote() -> None:
    """Random manifests-like data, printable and not: libyaml is used where it is exact, PyYAML elsewhere."""
    rng = random.Random(15)
    alphabets = ("abc :-#'\"{}[],&*!|>%@`?\n", "ab \n", "a b:\n\t\x85é😀\u2028")
    fast = 0
    for i in range(3000):
        data = {"kind": _tree(rng, alphabets[i % len(alphabets)])}
        expected = yaml.safe_dump(data, sort_keys=True, default_flow_style=False, width=120, allow_unicode=True)
        assert render.dump_yaml(data) == expected, data
        fast += render._libyaml_exact(data)
    assert 300 < fast < 2700, "both paths must be exercised"


def test_dump_yaml_of_a_rendered_stack_is_unchanged(rendered) -> None:
    for resource in rendered("prod"):
        if resource.is_kubernetes_object or resource.is_chart:
            manifest = resource.manifest()
            expected = yaml.safe_dump(manifest, sort_keys=True, default_flow_style=False, width=120, allow_unicode=True)
            assert render.dump_yaml(manifest) == expected, resource.name


def _config_map(text: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "repo", "namespace": "p"},
        "data": {"k": text},
    }


def test_artifact_repositories_are_found_in_any_spelling() -> None:
    secret = {"name": "keys", "key": "id"}
    spellings = (
        yaml.safe_dump({"s3": {"bucket": "b1", "accessKeySecret": secret}}),
        json.dumps({"s3": {"bucket": "b1", "accessKeySecret": secret}}),
        '"s3" :\n  bucket: b1\n  accessKeySecret: {name: keys, key: id}\n',
        "? s3\n: {bucket: b1, accessKeySecret: {name: keys, key: id}}\n",
    )
    for text in spellings:
        refs = object_refs(_config_map(text))
        assert Ref("Bucket", None, "b1") in refs, text
        assert Ref("Secret", "p", "keys", "id") in refs, text


def test_data_without_an_s3_key_names_no_repository() -> None:
    dashboard = json.dumps({"panels": [{"title": f"model {i}", "targets": ["s3 is not a key"]} for i in range(50)]})
    assert not [ref for ref in object_refs(_config_map(dashboard)) if ref.kind in ("Bucket", "Secret")]


def test_template_metadata_is_what_the_template_renders() -> None:
    """The Orchestrator declares templates with `template_metadata` instead of building each one twice."""
    from components.orchestrator import OrchestratorArgs, _context
    from components.workflow import render_workflow_template, template_metadata
    from loopform.spec import load_stack, stack_file

    spec = load_stack(stack_file("prod"))
    args = OrchestratorArgs(
        spec=spec.orchestrator,
        environment=spec.environment,
        namespaces=spec.cluster.namespaces,
        models=spec.models,
        gpu_pools=spec.gpu.pools,
    )
    ctx = _context(args, spec.cluster.namespaces.pipelines, {"loopform.dev/environment": "prod"}, {})
    for model, model_spec in spec.models.items():
        assert template_metadata(ctx, model) == render_workflow_template(ctx, model, model_spec)["metadata"]
