"""Gated promotion against a temporary MLflow store and copies of the real stack files.

Each refusal must change nothing: the stack file stays byte-identical, and no alias or
tag of any version moves.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from loopform import evidence as ev
from loopform import policy_config, registry
from loopform import record as rec
from loopform.evaluation import evaluate_classifier
from loopform.gates.result import GateResult
from loopform.promotion import PromotionError, Signer, aliases_for, image_problem, lock_path, promote
from loopform.spec import load_stack
from models.fraud.data import LABEL
from models.fraud.train import train
from tests import records
from tests.helpers_registry import base_rate_model, gate_results, make_version, small_model, stored_weights

ROOT = Path(__file__).resolve().parent.parent
SIGNERS: dict[str, Signer] = {}


@pytest.fixture(scope="module", autouse=True)
def signers(tmp_path_factory) -> dict[str, Signer]:
    """Per environment: the test key, and a policy config (with the stack's gates) that trusts it."""
    folder = tmp_path_factory.mktemp("policy")
    for env in ("dev", "staging", "prod"):
        spec = load_stack(ROOT / "stacks" / f"Pulumi.{env}.yaml")
        config = policy_config.for_environment({}, spec, [rec.TrustedKey.parse(k) for k in records.TRUSTED])
        SIGNERS[env] = Signer(records.KEY, policy_config.write(folder / f"{env}.json", config))
    return SIGNERS


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def small():
    """(model, train frame, holdout, evaluation) of the small model every test here registers."""
    return small_model()


@pytest.fixture(scope="module")
def trained(small):
    model, _, _, evaluation = small
    # Clears every stack's gates, so refusals below are the gates' doing.
    assert evaluation["auc"] > 0.8 and evaluation["positives"] >= 100 and evaluation["brier_skill"] > 0.1
    return model, evaluation


@pytest.fixture
def stacks(tmp_path) -> dict[str, Path]:
    """Copies of the repository's stack files (the originals are never touched)."""
    out = {}
    for env in ("dev", "staging", "prod"):
        out[env] = tmp_path / f"Pulumi.{env}.yaml"
        shutil.copyfile(ROOT / "stacks" / f"Pulumi.{env}.yaml", out[env])
    return out


def state(store: str, name: str, stack: Path) -> tuple[bytes, dict[str, int], dict[str, dict[str, str]]]:
    """Everything a promotion may change: stack file bytes, aliases, every version's tags."""
    client = registry.client(store)
    aliases = dict(client.get_registered_model(name).aliases)
    tags = {v.version: dict(v.tags) for v in client.search_model_versions(f"name = '{name}'")}
    return stack.read_bytes(), aliases, tags


def refused(store: str, name: str, version: int, env: str, stack: Path, **kwargs) -> list[str]:
    before = state(store, name, stack)
    with pytest.raises(PromotionError) as info:
        promote(name, version, env, tracking_uri=store, stack_path=stack, **{"signer": SIGNERS[env], **kwargs})
    assert state(store, name, stack) == before, "a refused promotion changed something"
    assert str(version) in str(info.value) and env in str(info.value)
    return info.value.reasons


def rename(stack: Path, name: str, gates: str = "") -> None:
    """Declare the stack's fraud model under another name, so each test has its own registered model,
    with `gates` (YAML flow mapping) as its own models.<name>.gates."""
    own = f"        gates: {gates}\n" if gates else ""
    stack.write_text(stack.read_text().replace("      fraud:\n", f"      {name}:\n{own}"))


def test_promote_to_staging_writes_release_and_moves_alias(store, trained, stacks):
    model, evaluation = trained
    rename(stacks["staging"], "fraud-a")
    original = stacks["staging"].read_text()
    record = make_version(store, "fraud-a", model, evaluation)

    release = promote(
        "fraud-a",
        record.version,
        "staging",
        signer=SIGNERS["staging"],
        tracking_uri=store,
        stack_path=stacks["staging"],
    )

    assert release.version == record.version and release.run_id == record.run_id
    # The serving image the stack names: one image for every model and version, no build per release.
    assert release.image == load_stack(stacks["staging"]).services.image
    text = stacks["staging"].read_text()
    # Round trip: every original line (comments included) is still there, in order; only the release was added.
    lines = iter(text.splitlines())
    assert all(any(line == other for other in lines) for line in original.splitlines())
    assert text.startswith("# Staging: production-shaped")
    spec = load_stack(stacks["staging"])
    written = spec.models["fraud-a"].release
    assert written == release
    # A compact record: the evidence's digest, not the evidence; signed for staging with the trusted key.
    added = len(text.splitlines()) - len(original.splitlines())
    assert added <= 30, f"the release record takes {added} lines"
    assert written.evidence == f"sha256:{record.evidence['digest']}"
    assert written.artifacts == record.evidence["artifacts"]["digest"]
    assert written.gates["drift"] == {"passed": True, "drift_share": 0.0}
    assert written.staging is None and written.key_id == records.TRUSTED[0]["key_id"]
    assert rec.verify(written.record(), "staging", records.TRUSTED) == []
    assert rec.verify(written.record(), "prod", records.TRUSTED) != []  # signed for staging only
    assert registry.alias_version(store, "fraud-a", "staging") == record.version
    tags = registry.client(store).get_model_version("fraud-a", str(record.version)).tags
    assert rec.verify(json.loads(tags["loopform.release.staging"]), "staging", records.TRUSTED) == []
    assert "archived" not in tags


def test_refuses_missing_evidence(store, trained, stacks):
    model, evaluation = trained
    rename(stacks["staging"], "fraud-b")
    good = make_version(store, "fraud-b", model, evaluation)
    promote(
        "fraud-b", good.version, "staging", signer=SIGNERS["staging"], tracking_uri=store, stack_path=stacks["staging"]
    )
    client = registry.client(store)
    bare = client.create_model_version("fraud-b", source=client.get_model_version("fraud-b", "1").source)

    reasons = refused(store, "fraud-b", int(bare.version), "staging", stacks["staging"])
    assert reasons[0] == "missing evidence: the version carries no release evidence"
    assert registry.alias_version(store, "fraud-b", "staging") == good.version


def test_refuses_failed_gate(store, trained, stacks):
    model, evaluation = trained
    rename(stacks["dev"], "fraud-c")
    drifted = GateResult("drift", False, {"drift_share": 0.6}, ["6 of 9 features drifted (share 0.67 > 0.3)"])
    record = make_version(store, "fraud-c", model, evaluation, gates=gate_results(drift=drifted))

    reasons = refused(store, "fraud-c", record.version, "dev", stacks["dev"])
    assert "gate 'drift' did not pass: 6 of 9 features drifted (share 0.67 > 0.3)" in reasons
    assert "drift share 0.600 is above gates.drift.max_drift_share=0.3" in reasons
    assert registry.alias_version(store, "fraud-c", "dev") is None


def test_refuses_tampered_evidence(store, trained, stacks):
    model, evaluation = trained
    rename(stacks["staging"], "fraud-d")
    weak = {**evaluation, "auc": 0.6}
    record = make_version(store, "fraud-d", model, weak)
    assert "AUC 0.6000 < 0.75 (gates.min_auc)" in refused(
        store, "fraud-d", record.version, "staging", stacks["staging"]
    )

    # Someone edits the recorded AUC in the tag (and the key tag) to get past the gate.
    forged = json.loads(
        registry.client(store).get_model_version("fraud-d", str(record.version)).tags[registry.EVIDENCE_TAG]
    )
    forged["evaluation"]["auc"] = 0.95
    client = registry.client(store)
    client.set_model_version_tag("fraud-d", str(record.version), registry.EVIDENCE_TAG, json.dumps(forged))
    client.set_model_version_tag("fraud-d", str(record.version), "loopform.auc", "0.95")

    reasons = refused(store, "fraud-d", record.version, "staging", stacks["staging"])
    assert reasons[0].startswith("tampered evidence: digest mismatch")
    assert f"forged evidence: evaluation differ from what run {record.run_id} recorded" in reasons

    # Resealed, the digest matches again: the run's own artifacts still tell the truth.
    client.set_model_version_tag(
        "fraud-d", str(record.version), registry.EVIDENCE_TAG, ev.canonical(ev.seal(forged)).decode()
    )
    reasons = refused(store, "fraud-d", record.version, "staging", stacks["staging"])
    assert reasons == [f"forged evidence: evaluation differ from what run {record.run_id} recorded"]


def test_refuses_evidence_copied_from_another_version(store, trained, stacks):
    model, evaluation = trained
    rename(stacks["staging"], "fraud-e")
    first = make_version(store, "fraud-e", model, evaluation)
    failing = make_version(store, "fraud-e", model, {**evaluation, "auc": 0.5})
    client = registry.client(store)
    client.set_model_version_tag(
        "fraud-e", str(failing.version), registry.EVIDENCE_TAG, ev.canonical(first.evidence).decode()
    )
    reasons = refused(store, "fraud-e", failing.version, "staging", stacks["staging"])
    assert f"evidence belongs elsewhere: its version is {first.version}, this version's is {failing.version}" in reasons
    assert any(r.startswith("evidence belongs elsewhere: its run_id") for r in reasons)


def test_refuses_stale_evidence_and_unknown_versions(store, trained, stacks):
    model, evaluation = trained
    rename(stacks["dev"], "fraud-f")
    record = make_version(store, "fraud-f", model, evaluation)
    later = datetime.now(UTC) + timedelta(days=61)  # dev allows 60 days
    reasons = refused(store, "fraud-f", record.version, "dev", stacks["dev"], now=later)
    assert len(reasons) == 1 and reasons[0].startswith("stale evidence:")
    assert reasons[0].endswith("more than gates.max_evidence_age_days=60")

    assert refused(store, "fraud-f", 99, "dev", stacks["dev"]) == [
        f"the registry at {store} has no version 99 of model 'fraud-f'"
    ]
    reasons = refused(store, "fraud-f", record.version, "dev", stacks["staging"])  # staging declares no fraud-f
    declared = ", ".join(sorted(load_stack(stacks["staging"]).models))
    assert reasons == [f"{stacks['staging']} declares no model 'fraud-f' under models (declared: {declared})"]


def test_prod_needs_staging_first_and_archives_the_previous_champion(store, small, stacks):
    model, train_df, holdout, evaluation = small
    for env in ("staging", "prod"):
        rename(stacks[env], "fraud-g")
    v1 = make_version(store, "fraud-g", model, evaluation)

    reasons = refused(store, "fraud-g", v1.version, "prod", stacks["prod"])
    assert reasons == [
        "prod requires a prior staging release (gates.require_staging): "
        "the version carries no signed staging record (promote it to staging first)"
    ]
    # An MLflow tag is not proof: any client can write one. A staging record signed by an untrusted key is refused.
    forged = records.release(
        "staging", key=records.OTHER_KEY, sealed=registry.read_evidence(store, "fraud-g", v1.version)
    )
    client = registry.client(store)
    client.set_model_version_tag("fraud-g", str(v1.version), "loopform.release.staging", json.dumps(forged))
    (reason,) = refused(store, "fraud-g", v1.version, "prod", stacks["prod"])
    assert "which the staging policy config does not trust" in reason or "does not trust" in reason
    client.delete_model_version_tag("fraud-g", str(v1.version), "loopform.release.staging")

    promote(
        "fraud-g", v1.version, "staging", signer=SIGNERS["staging"], tracking_uri=store, stack_path=stacks["staging"]
    )
    release = promote(
        "fraud-g",
        v1.version,
        "prod",
        signer=SIGNERS["prod"],
        tracking_uri=store,
        stack_path=stacks["prod"],
        image="registry.example/fraud:1",
    )
    # The prod record carries the signed staging record, which verifies as staging's.
    assert release.staging is not None and rec.verify(release.record(), "prod", records.TRUSTED) == []
    assert aliases_for("prod") == ("prod", "production", "champion")
    for alias in aliases_for("prod"):
        assert registry.alias_version(store, "fraud-g", alias) == v1.version
    assert load_stack(stacks["prod"]).models["fraud-g"].release.image == "registry.example/fraud:1" == release.image

    # The challenger is compared with the champion on the same resampled rows (here: the same model, delta 0).
    compared = evaluate_classifier(model, holdout, model, label=LABEL, champion_version=v1.version, training=train_df)
    assert compared["auc_delta_low"] == compared["auc_delta_high"] == 0.0
    v2 = make_version(store, "fraud-g", model, compared)
    promote(
        "fraud-g", v2.version, "staging", signer=SIGNERS["staging"], tracking_uri=store, stack_path=stacks["staging"]
    )
    promote("fraud-g", v2.version, "prod", signer=SIGNERS["prod"], tracking_uri=store, stack_path=stacks["prod"])
    client = registry.client(store)
    assert client.get_model_version("fraud-g", str(v1.version)).tags.get("archived") == "true"
    assert "archived" not in client.get_model_version("fraud-g", str(v2.version)).tags
    assert registry.alias_version(store, "fraud-g", "champion") == v2.version
    assert registry.champion(store, "fraud-g")[1] == v2.version
    assert load_stack(stacks["prod"]).models["fraud-g"].release.version == v2.version


def test_prod_gates_are_stricter_than_staging(store, trained, stacks):
    model, evaluation = trained
    for env in ("staging", "prod"):
        rename(stacks[env], "fraud-h")
    record = make_version(store, "fraud-h", model, {**evaluation, "auc": 0.78})
    promote(
        "fraud-h",
        record.version,
        "staging",
        signer=SIGNERS["staging"],
        tracking_uri=store,
        stack_path=stacks["staging"],
    )
    assert refused(store, "fraud-h", record.version, "prod", stacks["prod"]) == ["AUC 0.7800 < 0.8 (gates.min_auc)"]


def test_records_survive_yaml_1_1_readers(store, trained, stacks):
    """Values YAML 1.1 would misread unquoted (1e-05, times) read back exactly, so the signature still verifies."""
    model, evaluation = trained
    rename(stacks["dev"], "fraud-i")
    odd = GateResult("ood", True, {"ood_rate": 1e-05, "rule": "yes", "window": "12:30:45"})
    record = make_version(store, "fraud-i", model, evaluation, gates=gate_results(ood=odd))
    promote("fraud-i", record.version, "dev", signer=SIGNERS["dev"], tracking_uri=store, stack_path=stacks["dev"])
    raw = yaml.safe_load(stacks["dev"].read_text())["config"]["loopform:platform"]["models"]["fraud-i"]["release"]
    assert raw["gates"]["ood"]["ood_rate"] == 1e-05
    assert rec.verify(raw, "dev", records.TRUSTED) == []


def test_refuses_keys_the_environment_does_not_trust(store, trained, stacks, tmp_path):
    model, evaluation = trained
    rename(stacks["staging"], "fraud-j")
    record = make_version(store, "fraud-j", model, evaluation)
    other = rec.trusted_key(records.OTHER_KEY, ())
    reasons = refused(
        store,
        "fraud-j",
        record.version,
        "staging",
        stacks["staging"],
        signer=Signer(records.OTHER_KEY, SIGNERS["staging"].policy_config),
    )
    assert reasons == [
        f"signing key {other.key_id} is not among the trusted keys of {SIGNERS['staging'].policy_config} "
        "(add it: `loopform keygen` prints the entry)"
    ]
    reasons = refused(
        store,
        "fraud-j",
        record.version,
        "staging",
        stacks["staging"],
        signer=Signer(records.KEY, SIGNERS["prod"].policy_config),
    )
    assert reasons == [f"{SIGNERS['prod'].policy_config} is the policy config of 'prod', not of 'staging'"]


DIGEST = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        ("ghcr.io/loopform/serving:0.1.0", None),
        (f"ghcr.io/loopform/serving@{DIGEST}", None),
        (f"ghcr.io/loopform/serving:0.1.0@{DIGEST}", None),
        ("localhost:5000/team/fraud-svc:v2", None),
        ("ghcr.io/loopform/serving", "has neither tag nor digest"),
        ("localhost:5000/serving", "has neither tag nor digest"),
        ("ghcr.io/loopform/serving:latest", "uses the latest tag"),
        ("ghcr.io/loopform/serving@sha256:abc", "has an invalid digest"),
        (f"ghcr.io/loopform/serving@{DIGEST.upper()}", "has an invalid digest"),
        ("ghcr.io/loopform/serving:-1", "has an invalid tag"),
        ("ghcr.io/Loopform/serving:1", "is not a valid reference"),
        ("ghcr.io/loopform/serving:1@", "is not a valid reference"),
        ("", "is not a valid reference"),
    ],
)
def test_image_is_a_tag_or_a_digest(image, problem):
    found = image_problem(image)
    assert found is None if problem is None else problem in found


def test_records_the_image_given_by_digest_and_refuses_a_malformed_one(store, trained, stacks):
    """A reference the cluster could not pull is refused here, not found out when the pods start."""
    model, evaluation = trained
    rename(stacks["dev"], "fraud-m")
    record = make_version(store, "fraud-m", model, evaluation)
    (reason,) = refused(store, "fraud-m", record.version, "dev", stacks["dev"], image="ghcr.io/loopform/serving")
    assert reason.startswith("image 'ghcr.io/loopform/serving' has neither tag nor digest")
    document = yaml.safe_load(stacks["dev"].read_text())
    document["config"]["loopform:platform"]["services"] = {"image": "serving:latest"}
    stacks["dev"].write_text(yaml.safe_dump(document))
    (reason,) = refused(store, "fraud-m", record.version, "dev", stacks["dev"])
    assert reason.startswith(f"{stacks['dev']} services.image: image 'serving:latest' uses the latest tag")

    pinned = f"ghcr.io/loopform/serving@{DIGEST}"
    release = promote(
        "fraud-m",
        record.version,
        "dev",
        signer=SIGNERS["dev"],
        tracking_uri=store,
        stack_path=stacks["dev"],
        image=pinned,
    )
    assert release.image == pinned == load_stack(stacks["dev"]).models["fraud-m"].release.image


def test_refuses_weights_swapped_after_registration(store, trained, stacks):
    """The evidence names each file's digest; promotion re-reads the registry's files and refuses others."""
    model, evaluation = trained
    rename(stacks["dev"], "fraud-k")
    record = make_version(store, "fraud-k", model, evaluation)
    stored, name = stored_weights(store, "fraud-k", record.version)
    stored.write_bytes(stored.read_bytes() + b"swapped")
    (reason,) = refused(store, "fraud-k", record.version, "dev", stacks["dev"])
    assert reason == f"the model's artifacts changed since registration: {name} differ from the sealed digests"


def test_a_base_rate_model_fails_promotion(store, small, stacks):
    """A model that always predicts the training base rate is perfectly calibrated (ECE near 0) and useless."""
    model, train_df, holdout, _ = small
    rename(stacks["dev"], "fraud-l")
    constant = base_rate_model(model)
    evaluation = evaluate_classifier(constant, holdout, label=LABEL, training=train_df)
    assert evaluation["auc"] == evaluation["auc_low"] == 0.5
    assert evaluation["brier_skill"] == pytest.approx(0.0, abs=1e-6)
    assert evaluation["ece"] < 0.01  # the old calibration gate (ECE <= 0.1) would have passed it
    assert evaluation["precision_at_alert_rate"] == pytest.approx(evaluation["positive_rate"])
    record = make_version(store, "fraud-l", constant, evaluation)

    assert refused(store, "fraud-l", record.version, "dev", stacks["dev"]) == [
        "AUC 0.5000 < 0.7 (gates.min_auc)",
        "Brier skill 0.000 < 0.05 (gates.min_brier_skill)",
    ]
    assert registry.alias_version(store, "fraud-l", "dev") is None


def test_a_challenger_not_shown_non_inferior_fails_promotion(store, small, stacks):
    """The paired lower bound of challenger minus champion AUC must clear the margin (staging: -0.01)."""
    model, train_df, holdout, _ = small
    rename(stacks["staging"], "fraud-m")
    weaker = train(train_df.iloc[:1500], seed=2, max_epochs=3)
    evaluation = evaluate_classifier(weaker, holdout, model, label=LABEL, champion_version=1, training=train_df)
    assert evaluation["auc_delta_low"] <= -0.01
    assert evaluation["auc_delta_low"] <= evaluation["auc_delta"] <= evaluation["auc_delta_high"]
    record = make_version(store, "fraud-m", weaker, evaluation)
    reasons = refused(store, "fraud-m", record.version, "staging", stacks["staging"])
    assert (
        f"AUC minus the champion version 1's: lower bound {evaluation['auc_delta_low']:.4f} at 95% <= -0.01 "
        "(gates.max_auc_drop): not shown to be non-inferior"
    ) in reasons


def test_too_few_holdout_positives_fail_promotion(store, small, stacks):
    model, train_df, holdout, _ = small
    rename(stacks["dev"], "fraud-n")
    few = holdout.iloc[: len(holdout) // 4]
    evaluation = evaluate_classifier(model, few, label=LABEL, training=train_df)
    assert evaluation["positives"] < 100
    record = make_version(store, "fraud-n", model, evaluation)
    assert refused(store, "fraud-n", record.version, "dev", stacks["dev"]) == [
        f"holdout positives {evaluation['positives']} < 100 (gates.min_positives): too few to judge the model"
    ]


def test_a_regressor_is_judged_by_its_own_gates(store, trained, stacks):
    """A regressor's evidence is judged by RMSE, R² and holdout rows; max_rmse comes from models.<m>.gates."""
    model, _ = trained  # the evaluation, not the network, is what the gates judge
    first = {**records.REGRESSION, **dict.fromkeys(("champion_version", "champion_rmse", "rmse_ratio"))}
    first |= dict.fromkeys(("rmse_ratio_low", "rmse_ratio_high"))
    rename(stacks["dev"], "delivery-a")
    record = make_version(store, "delivery-a", model, first)
    assert refused(store, "delivery-a", record.version, "dev", stacks["dev"]) == [
        "no max_rmse gate to judge a regressor by: set models.delivery-a.gates.max_rmse "
        "(the most holdout RMSE a release may have, in the label's unit)"
    ]
    shutil.copyfile(ROOT / "stacks" / "Pulumi.dev.yaml", stacks["dev"])
    rename(stacks["dev"], "delivery-a", "{max_rmse: 9, min_r2: 0.7}")
    assert refused(store, "delivery-a", record.version, "dev", stacks["dev"]) == [
        "RMSE 9.5000 > 9 (models.delivery-a.gates.max_rmse)",
        "R² 0.620 < 0.7 (models.delivery-a.gates.min_r2)",
    ]
    shutil.copyfile(ROOT / "stacks" / "Pulumi.dev.yaml", stacks["dev"])
    rename(stacks["dev"], "delivery-a", "{max_rmse: 12}")
    release = promote(
        "delivery-a", record.version, "dev", signer=SIGNERS["dev"], tracking_uri=store, stack_path=stacks["dev"]
    )
    assert release.gates["evaluation"] == {
        "task": "regression",
        "rmse": 9.5,
        "rmse_high": 9.9,
        "r2": 0.62,
        "rows": 2000,
        "rmse_ratio_high": None,
    }
    assert rec.verify(load_stack(stacks["dev"]).models["delivery-a"].release.record(), "dev", records.TRUSTED) == []

    worse = make_version(store, "delivery-a", model, {**records.REGRESSION, "rmse_ratio_high": 0.03})
    assert refused(store, "delivery-a", worse.version, "dev", stacks["dev"]) == [
        "RMSE increase over the champion version 2's: upper bound 0.0300 at 95% >= 0.02 (gates.max_rmse_increase): "
        "not shown to be non-inferior"
    ]
    few = make_version(store, "delivery-a", model, {**first, "rows": 150})
    assert refused(store, "delivery-a", few.version, "dev", stacks["dev"]) == [
        "holdout rows 150 < 200 (gates.min_holdout_rows): too few to judge the model"
    ]


def test_a_models_own_gates_judge_a_classifier_and_a_wrong_task_is_refused(store, trained, stacks):
    model, evaluation = trained
    rename(stacks["dev"], "fraud-o", "{min_auc: 0.99, drift: {max_drift_share: 0.01}}")
    drifted = GateResult("drift", True, {"drift_share": 0.05})
    record = make_version(store, "fraud-o", model, evaluation, gates=gate_results(drift=drifted))
    assert refused(store, "fraud-o", record.version, "dev", stacks["dev"]) == [
        "drift share 0.050 is above models.fraud-o.gates.drift.max_drift_share=0.01",
        f"AUC {evaluation['auc']:.4f} < 0.99 (models.fraud-o.gates.min_auc)",
    ]
    untold = make_version(store, "fraud-o", model, {k: v for k, v in evaluation.items() if k != "task"})
    assert refused(store, "fraud-o", untold.version, "dev", stacks["dev"]) == [
        "evaluation.task is None: expected one of classification, regression, so no gate can judge it"
    ]


#: One racing `promote`: waits at the start line (a file), then promotes. While it holds the stack's lock it waits
#: for the other racer to finish, so the two overlap however the machine schedules them.
RACER = """
import json, sys, time
from pathlib import Path
from loopform import promotion
from tests import records

store, stack, policy, version, folder, me, other = sys.argv[1:]
folder = Path(folder)
render_release = promotion.render_release

def held(*args):
    deadline = time.monotonic() + 120  # a bound on waiting for a racer that died, not a timing assertion
    while not (folder / f"done-{other}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    return render_release(*args)

promotion.render_release = held
(folder / f"ready-{me}").touch()
while not (folder / "go").exists():
    time.sleep(0.01)
try:
    signer = promotion.Signer(records.KEY, Path(policy))
    release = promotion.promote("fraud-race", int(version), "staging", tracking_uri=store, stack_path=Path(stack),
                                signer=signer)
    print(json.dumps({"promoted": release.version}))
except promotion.PromotionError as error:
    print(json.dumps({"refused": str(error)}))
finally:
    (folder / f"done-{me}").touch()
"""


def test_two_promotions_at_once_leave_one_winner_and_a_valid_stack_file(store, trained, stacks, tmp_path):
    model, evaluation = trained
    rename(stacks["staging"], "fraud-race")
    versions = [make_version(store, "fraud-race", model, evaluation).version for _ in range(2)]
    folder = tmp_path / "race"
    folder.mkdir()
    racers = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                RACER,
                store,
                str(stacks["staging"]),
                str(SIGNERS["staging"].policy_config),
                str(version),
                str(folder),
                str(me),
                str(1 - me),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for me, version in enumerate(versions)
    ]
    while not all((folder / f"ready-{me}").exists() or racer.poll() is not None for me, racer in enumerate(racers)):
        time.sleep(0.01)  # both at the start line (or dead: communicate() then shows why)
    (folder / "go").touch()
    outcomes = []
    for racer in racers:
        out, err = racer.communicate(timeout=300)
        assert racer.returncode == 0, err
        outcomes.append(json.loads(out.strip().splitlines()[-1]))

    winners = [o["promoted"] for o in outcomes if "promoted" in o]
    losers = [o["refused"] for o in outcomes if "refused" in o]
    assert len(winners) == 1 and len(losers) == 1, outcomes
    lock = lock_path(stacks["staging"])
    assert f"holds the lock {lock}" in losers[0] and "another promotion" in losers[0]
    # The file parses and validates, holds the winner's release, and the alias names the same version.
    release = load_stack(stacks["staging"]).models["fraud-race"].release
    assert release is not None and release.version == winners[0]
    assert rec.verify(release.record(), "staging", records.TRUSTED) == []
    assert registry.alias_version(store, "fraud-race", "staging") == winners[0]
    assert not lock.exists() and not list(stacks["staging"].parent.glob(".*.tmp"))


def test_a_failed_alias_move_leaves_the_stack_file_and_the_registry_as_they_were(store, trained, stacks, monkeypatch):
    model, evaluation = trained
    rename(stacks["staging"], "fraud-alias")
    record = make_version(store, "fraud-alias", model, evaluation)
    seen = []

    def failing_set_alias(uri: str, name: str, alias: str, version: int | str) -> None:
        seen.append(load_stack(stacks["staging"]).models["fraud-alias"].release)  # what the file held at the move
        raise OSError("registry unreachable")

    monkeypatch.setattr(registry, "set_alias", failing_set_alias)
    reasons = refused(store, "fraud-alias", record.version, "staging", stacks["staging"])
    assert len(reasons) == 1 and "registry unreachable" in reasons[0] and "are as they were" in reasons[0]
    # The alias was to move only once the stack file held the release.
    assert len(seen) == 1 and seen[0] is not None and seen[0].version == record.version


def test_a_release_failing_after_the_alias_moved_puts_the_alias_back(store, trained, stacks, monkeypatch):
    from mlflow import MlflowClient

    model, evaluation = trained
    rename(stacks["staging"], "fraud-undo")
    first = make_version(store, "fraud-undo", model, evaluation)
    promote(
        "fraud-undo",
        first.version,
        "staging",
        signer=SIGNERS["staging"],
        tracking_uri=store,
        stack_path=stacks["staging"],
    )
    second = make_version(store, "fraud-undo", model, evaluation)
    set_tag = MlflowClient.set_model_version_tag

    def failing_set_tag(self, name: str, version: str, key: str, value: str) -> None:
        if key == "loopform.release.staging":
            assert registry.alias_version(store, name, "staging") == second.version  # the alias had moved
            raise OSError("tag write lost")
        set_tag(self, name, version, key, value)

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", failing_set_tag)
    reasons = refused(store, "fraud-undo", second.version, "staging", stacks["staging"])
    assert "tag write lost" in reasons[0]
    assert registry.alias_version(store, "fraud-undo", "staging") == first.version
    assert load_stack(stacks["staging"]).models["fraud-undo"].release.version == first.version


def test_an_undo_that_fails_is_reported_and_the_rest_is_still_undone(store, trained, stacks, monkeypatch):
    from mlflow import MlflowClient

    model, evaluation = trained
    rename(stacks["staging"], "fraud-stuck")
    original = stacks["staging"].read_bytes()
    record = make_version(store, "fraud-stuck", model, evaluation)
    set_tag = MlflowClient.set_model_version_tag

    def failing_set_tag(self, name: str, version: str, key: str, value: str) -> None:
        if key == "loopform.release.staging":
            raise OSError("tag write lost")
        set_tag(self, name, version, key, value)

    def failing_delete_alias(self, name: str, alias: str) -> None:
        raise OSError("alias delete lost")

    monkeypatch.setattr(MlflowClient, "set_model_version_tag", failing_set_tag)
    monkeypatch.setattr(MlflowClient, "delete_registered_model_alias", failing_delete_alias)
    with pytest.raises(PromotionError) as info:
        promote(
            "fraud-stuck",
            record.version,
            "staging",
            signer=SIGNERS["staging"],
            tracking_uri=store,
            stack_path=stacks["staging"],
        )
    (reason,) = info.value.reasons
    assert (
        "failed halfway (OSError: tag write lost) and could not be fully undone: OSError: alias delete lost" in reason
    )
    # The alias it could not take back stays, and says so; the stack file was still restored after that failure.
    assert registry.alias_version(store, "fraud-stuck", "staging") == record.version
    assert stacks["staging"].read_bytes() == original
