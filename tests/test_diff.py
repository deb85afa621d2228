"""`loopform diff`: golden Markdown of representative changes, the cut to one comment, secrets, and the CLI end
to end against a real git base.

The golden cases diff two renders of prod made by the same code, so they hold only what each change touches.
After an intended change, regenerate them with `LOOPFORM_REGENERATE_GOLDEN=1 pytest tests/test_diff.py` and
review the diff; CI never sets it.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from loopform import diff, render
from loopform.diff import ABSENT, SECRET, FieldChange, Finding, ObjectKey, Verdict
from loopform.promotion import render_release
from loopform.spec import CONFIG_KEY, Release
from tests import pins, records
from tests.helpers_project import ROOT, cli, copy_project

GOLDEN = Path(__file__).resolve().parent / "golden" / "diff"
REGENERATE = os.environ.get("LOOPFORM_REGENERATE_GOLDEN") == "1"
PROD = yaml.safe_load((ROOT / "stacks" / "Pulumi.prod.yaml").read_text())
#: The prod policy config, trusting the tests' release key as `loopform keygen` would have it added.
POLICY = json.loads((ROOT / "policies" / "config" / "prod.json").read_text())
POLICY["release-signed"]["trusted_keys"] = records.TRUSTED
#: A verdict for the golden cases: fixed, so the goldens do not move with unrelated policies.
CLEAN = Verdict(
    (Finding("advisory", "images-pinned-by-digest", "kubernetes:batch/v1:Job prod-features-apply", "not pinned"),),
    policies=20,
    resources=64,
)

Objects = dict[ObjectKey, dict[str, Any]]


def _git_missing() -> None:
    if shutil.which("git") is None:
        if os.environ.get("CI"):
            pytest.fail("git is required for loopform diff's end-to-end tests")
        pytest.skip("git is not installed")


def _release(version: int, image: str | None = None) -> dict[str, Any]:
    return records.release("prod", image=image, sealed=records.evidence("fraud", version))


def _stack(change: Callable[[dict[str, Any]], None] | None = None, **releases: dict[str, Any]) -> dict[str, Any]:
    document = copy.deepcopy(PROD)
    platform = document["config"][CONFIG_KEY]
    for model, record in releases.items():
        platform["models"][model]["release"] = record
    if change:
        change(platform)
    return document


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Callable[[dict[str, Any]], Objects]:
    """Prod rendered from a stack document, as `loopform render --out` writes it (each document once)."""
    cache: dict[str, Objects] = {}

    def objects(document: dict[str, Any]) -> Objects:
        text = yaml.safe_dump(document, sort_keys=True)
        if text not in cache:
            folder = tmp_path_factory.mktemp("render")
            path = folder / "stacks" / "Pulumi.prod.yaml"
            path.parent.mkdir()
            path.write_text(text)
            out = folder / "out"
            render.write(render.render_stack("prod", ROOT, path), out)
            render.write_services("prod", ROOT, out / "services", path)
            cache[text] = diff.objects_in(out)
        return cache[text]

    return objects


def _report(rendered, base: dict[str, Any], head: dict[str, Any], verdict: Verdict = CLEAN) -> diff.Report:
    return diff.build_report(
        "prod",
        "main",
        "0123456789ab",
        rendered(base),
        rendered(head),
        diff.releases(base),
        diff.releases(head),
        POLICY,
        verdict,
    )


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if REGENERATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} is missing: regenerate with LOOPFORM_REGENERATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from the golden file (regenerate and review if intended)"


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(platform: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node = platform
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value

    return change


# --- golden cases ----------------------------------------------------------------------------------------------


def test_a_promotion_shows_gates_signature_and_rolling_update(rendered) -> None:
    report = _report(rendered, _stack(fraud=_release(2)), _stack(fraud=_release(3)))
    markdown = diff.to_markdown(report)
    _golden("promotion.md", markdown)
    _golden("promotion.txt", diff.to_text(report))
    assert markdown.index("Model promotions") < markdown.index("Resources:") < markdown.index("Policy pack")
    assert "### fraud: v2 → v3" in markdown
    assert (
        "**Signature**: verified: signed by key 56475aa75463474c, trusted for prod; its staging proof verifies too"
        in markdown
    )
    assert "| evaluation (classification) | **pass** | auc 0.91 (min 0.8)" in markdown
    assert "rolling update of `Deployment loopform-prod-serving/fraud-service` (applied by Argo CD)" in markdown
    assert (
        "`spec.template.spec.containers[name=bento].env[name=LOOPFORM_MODEL_URI].value`: `models:/fraud/2` → `models:/fraud/3`"
        in markdown
    )


def test_a_replica_change(rendered) -> None:
    report = _report(rendered, _stack(), _stack(_set("registry.replicas", 4)))
    _golden("replicas.md", diff.to_markdown(report))
    assert [c.key.kind for c in report.changes if c.action != "changed"] == []
    assert not report.promotions


def test_a_new_gpu_pool(rendered) -> None:
    pool = {
        "kind": "existing",
        "labels": {"eks.amazonaws.com/nodegroup": "gpu-h100"},
        "taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
        "gpu_limit": 8,
        "gpus_per_node": 8,
    }

    def change(platform: dict[str, Any]) -> None:
        platform["gpu"]["pools"]["h100"] = pool
        platform["models"]["fraud"]["training"]["gpu_pool"] = "h100"

    report = _report(rendered, _stack(), _stack(change))
    markdown = diff.to_markdown(report)
    _golden("gpu_pool.md", markdown)
    assert "gpu-h100" in markdown


def test_a_removed_model(rendered) -> None:
    def remove(platform: dict[str, Any]) -> None:
        del platform["models"]["fraud"]

    report = _report(rendered, _stack(fraud=_release(2)), _stack(remove))
    markdown = diff.to_markdown(report)
    _golden("removed_model.md", markdown)
    assert "### fraud: v2 → none" in markdown
    assert "`Deployment loopform-prod-serving/fraud-service` (applied by Argo CD) is removed: its pods stop" in markdown
    removed = {c.key.kind for c in report.changes if c.action == "removed"}
    assert {"Deployment", "WorkflowTemplate", "CronWorkflow"} <= removed


def test_a_chart_version_bump(rendered) -> None:
    report = _report(rendered, _stack(), _stack(_set("orchestrator.chart_version", "1.0.0")))
    markdown = diff.to_markdown(report)
    _golden("chart_bump.md", markdown)
    assert "- `version`: `0.47.5` → `1.0.0`" in markdown


def _long_report() -> diff.Report:
    """400 changed ConfigMaps and 300 advisories: far more than one comment holds."""
    old = {
        ObjectKey("ConfigMap", "ns", f"cm-{i:03d}"): {"data": {f"k{j}": "a" * 40 for j in range(5)}} for i in range(400)
    }
    new = {key: {"data": {f"k{j}": "b" * 40 for j in range(5)}} for key in old}
    findings = tuple(
        Finding("advisory", "images-pinned-by-digest", f"Job job-{i:03d}", "not pinned") for i in range(300)
    )
    return diff.build_report("prod", "main", "0123456789ab", old, new, {}, {}, POLICY, Verdict(findings, 20, 700))


def test_a_diff_too_long_for_one_comment_is_cut_cleanly() -> None:
    report = _long_report()
    whole = diff.to_markdown(report, limit=10**9)
    cut = diff.to_markdown(report)
    _golden("long.md", cut)
    assert len(whole) > diff.COMMENT_LIMIT >= len(cut)
    assert "**Cut to fit one pull-request comment (65,536 characters):** left out" in cut
    assert "field diffs (from the field diff of ConfigMap ns/cm-" in cut
    # Every resource is still named, the verdict is whole, and nothing stops mid-entry.
    assert all(f"`ConfigMap ns/cm-{i:03d}`" in cut for i in range(400))
    assert cut.count("<details>") == cut.count("</details>") == 1
    assert "Policy pack passes: 0 mandatory, 300 advisory" in cut
    lines = cut.splitlines()
    kept = [line for line in lines if line.startswith("  - `data.")]
    assert kept and all(line.endswith("`") for line in kept)
    assert len(kept) % 5 == 0  # whole resources' field diffs only


# --- pure functions --------------------------------------------------------------------------------------------


def test_secret_values_are_never_shown() -> None:
    key = ObjectKey("Secret", "ns", "db")
    wrapped = {"4dabf18193072939515e22adb298388d": "1b47061264138c4ac30d75fd1eb44270", "value": "hunter2-wrapped"}
    old = {key: {"data": {"password": "aHVudGVyMg=="}, "metadata": {"name": "db"}}}
    new = {key: {"data": {"password": "c2VjcmV0", "user": "bWU="}, "stringData": {"token": "hunter2-plain"}}}
    config = ObjectKey("ConfigMap", "ns", "conf")
    old[config] = {"data": {"dsn": "<redacted>"}, "spec": {"value": "x"}}
    new[config] = {"data": {"dsn": "<redacted>", "extra": "<redacted>"}, "spec": {"value": wrapped}}
    report = diff.build_report("prod", "main", "abc", old, new, {}, {}, None, Verdict())
    for text in (diff.to_markdown(report), diff.to_text(report)):
        for value in ("aHVudGVyMg==", "c2VjcmV0", "bWU=", "hunter2", "redacted"):
            assert value not in text
        assert text.count(SECRET) == 6  # password (both sides), user, stringData, extra, spec.value
    changes = {c.path: (c.old, c.new) for change in report.changes for c in change.fields}
    assert changes["data.password"] == (SECRET, SECRET)
    assert changes["stringData"] == (ABSENT, SECRET)
    assert changes["spec.value"] == ("x", SECRET)


def test_field_changes_match_named_entries_and_read_json_annotations() -> None:
    old = {
        "metadata": {"annotations": {"loopform.dev/release": json.dumps({"version": 2, "image": "a"})}},
        "spec": {"containers": [{"name": "a", "image": "x:1"}, {"name": "b", "image": "y:1"}]},
    }
    new = {
        "metadata": {"annotations": {"loopform.dev/release": json.dumps({"version": 3, "image": "a"})}},
        "spec": {"containers": [{"name": "b", "image": "y:2"}, {"name": "a", "image": "x:1"}], "replicas": 2},
    }
    assert diff.field_changes(old, new) == [
        FieldChange('metadata.annotations["loopform.dev/release"].version', 2, 3),
        FieldChange("spec.containers[name=b].image", "y:1", "y:2"),
        FieldChange("spec.replicas", ABSENT, 2),
    ]


def test_a_gate_the_pack_refuses_fails_and_says_why(rendered) -> None:
    refusal = "model fraud: AUC 0.7100 < 0.8 (prod gates)"
    late = "model fraud: fraud v3 was released to staging at 2026-11-21, not before this release at 2026-11-20"
    findings = (
        Finding("mandatory", "metrics-meet-minimums", "Deployment fraud-service", refusal),
        Finding("mandatory", "released-to-staging-first", "Deployment fraud-service", late),
    )
    verdict = Verdict(findings, 20, 64)
    report = _report(rendered, _stack(fraud=_release(2)), _stack(fraud=_release(3)), verdict)
    evaluation = next(g for g in report.promotions[0].gates if g.name.startswith("evaluation"))
    assert evaluation.passed is False
    assert evaluation.problems == ("AUC 0.7100 < 0.8 (prod gates)",)
    markdown = diff.to_markdown(report)
    assert "| evaluation (classification) | **FAIL** |" in markdown
    assert "- **Policy**: fraud v3 was released to staging at 2026-11-21, not before this release" in markdown
    assert "Policy pack FAILS: 2 mandatory" in markdown


def test_a_record_signed_by_an_untrusted_key_is_not_verified() -> None:
    forged = records.release("prod", key=records.OTHER_KEY)
    verified, note = diff.signature(forged, POLICY)
    assert not verified
    assert note.startswith("NOT verified: release record of fraud v3 is signed by key")
    assert diff.signature(_release(3), POLICY)[0]


# --- the CLI end to end, against a real git base ---------------------------------------------------------------


def _git(root: Path, *args: str) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com"}
    env |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    subprocess.run(["git", "-c", "commit.gpgsign=false", *args], cwd=root, env=env, check=True, capture_output=True)


def _write_release(root: Path, record: dict[str, Any]) -> None:
    """As `loopform promote` writes a release: the stack file's record, and the GitOps folder's manifests."""
    path = root / "stacks" / "Pulumi.prod.yaml"
    path.write_text(render_release(path, "fraud", Release.model_validate(record)))
    render.write_services("prod", root)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A user's repository: `genesis` without the prod stack file, `main` with fraud v2 released to prod, and
    fraud v3 promoted in the working tree (a branch's change)."""
    _git_missing()
    root = copy_project(tmp_path_factory.mktemp("project"))
    config = root / "policies" / "config" / "prod.json"
    config.write_text(json.dumps(POLICY, indent=2) + "\n")
    stack = root / "stacks" / "Pulumi.prod.yaml"
    prod = pins.pinned_text()  # prod runs images by digest, as after a release's pin-images pull request
    stack.unlink()
    _git(root, "init", "-q", "-b", "main")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "genesis")
    _git(root, "tag", "genesis")
    stack.write_text(prod)
    _write_release(root, _release(2, image=pins.SERVING_IMAGE))
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "fraud v2 in prod")
    _write_release(root, _release(3, image=pins.SERVING_IMAGE))
    return root


def test_promote_then_diff_against_main_is_ready_to_post(project: Path) -> None:
    result = cli(project, "diff", "--stack", "prod", "--base", "main", "--out", "pr.md")
    assert result.returncode == 0, result.stderr
    markdown = (project / "pr.md").read_text()
    assert len(markdown) <= diff.COMMENT_LIMIT
    assert "### fraud: v2 → v3" in markdown
    assert (
        "**Signature**: verified: signed by key 56475aa75463474c, trusted for prod; its staging proof verifies too"
        in markdown
    )
    for gate in ("validation", "drift", "ood", "evaluation (classification)"):
        assert f"| {gate} | **pass** |" in markdown
    assert "rolling update of `Deployment loopform-prod-serving/fraud-service` (applied by Argo CD)" in markdown
    assert "Policy pack passes: 0 mandatory" in markdown
    changed = markdown.split("#### Changed", 1)[1].split("### Policy pack", 1)[0]
    assert "`Deployment loopform-prod-serving/fraud-service`" in changed
    assert "#### Added" not in markdown and "#### Removed" not in markdown


def test_a_base_without_the_stack_file_adds_everything(project: Path) -> None:
    result = cli(project, "diff", "--stack", "prod", "--base", "genesis", "--format", "text")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "stacks/Pulumi.prod.yaml did not exist at genesis: every resource is added." in text
    assert "fraud: none -> v3 (first release)" in text
    assert (
        "new Deployment loopform-prod-serving/fraud-service (applied by Argo CD): first rollout of 3 replicas" in text
    )
    assert " 0 changed, 0 removed" in text and "**" not in text


def test_a_ref_that_does_not_exist_is_a_clear_error(project: Path) -> None:
    result = cli(project, "diff", "--stack", "prod", "--base", "no-such-branch")
    assert result.returncode == 2
    assert "error: no commit 'no-such-branch' in the git repository at" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
