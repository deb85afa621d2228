"""The pack's promotion gates, rule by rule: a passing and a violating case each, on both roads."""

from __future__ import annotations

import copy
import json
from datetime import timedelta
from typing import Any

import pytest

from components.gitops import releases_annotation
from components.model_service import ModelServiceArgs, manifests
from loopform import record as rec
from loopform.spec import ModelSpec
from policies import gitops_signing
from policies import release_gates as gates
from policies.core import Resource, with_defaults
from tests import records

DEPLOYMENT = "kubernetes:apps/v1:Deployment"
APPLICATION = "kubernetes:argoproj.io/v1alpha1:Application"
RULES = {candidate.name: candidate for candidate in gates.RULES}


def deployment(record: dict[str, Any] | None, model: str = "fraud") -> dict[str, Any]:
    """The model service's Deployment as the program declares it (direct road)."""
    spec = ModelSpec.model_validate({"path": f"models/{model}", "release": record})
    labels = {"loopform.dev/environment": "prod"}
    return manifests(ModelServiceArgs(model=model, spec=spec, namespace="serve", labels=labels))[0]


def application(record: dict[str, Any]) -> dict[str, Any]:
    """The Argo CD Application carrying the records of what it syncs (GitOps road)."""
    return {
        "metadata": {
            "name": "loopform-serving-prod",
            "labels": {"loopform.dev/environment": "prod"},
            "annotations": releases_annotation({record["model"]: record}),
        }
    }


def judge(name: str, type_: str, props: dict[str, Any], **config: Any) -> list[str]:
    base = {"environment": "prod", "trusted_keys": records.TRUSTED} if name == rec.SIGNATURE_POLICY else {}
    return RULES[name].check(type_, props, with_defaults(RULES[name], {**base, **config}))


def roads(record: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(DEPLOYMENT, deployment(record, record["model"])), (APPLICATION, application(record))]


DELIVERY = {"models": {"delivery": {"max_rmse": 12}}}
"""The config of metrics-meet-minimums in an environment whose regressor `delivery` has its own max_rmse."""


@pytest.mark.parametrize(
    ("sealed", "metrics"),
    [(records.evidence(), {}), (records.regression_evidence(), DELIVERY)],
    ids=["classifier", "regressor"],
)
def test_every_gate_rule_admits_a_good_release_on_both_roads(sealed: dict[str, Any], metrics: dict) -> None:
    good = records.release("prod", sealed=sealed)
    for type_, props in roads(good):
        for candidate in gates.RULES:
            config = {"required": True} if candidate.name == "released-to-staging-first" else {}
            if candidate.name == "metrics-meet-minimums":
                config = metrics
            assert judge(candidate.name, type_, props, **config) == [], candidate.name


def test_a_missing_record_and_an_edited_metric_fail_the_signature() -> None:
    unannotated = deployment(records.release("prod"))
    del unannotated["metadata"]["annotations"]["loopform.dev/release"]  # a service someone declared by hand
    assert judge(rec.SIGNATURE_POLICY, DEPLOYMENT, unannotated) == [
        "model fraud: no release record (annotation loopform.dev/release); run `loopform promote`"
    ]
    edited = copy.deepcopy(records.release("prod"))
    edited["gates"]["evaluation"]["auc"] = 0.99
    for type_, props in roads(edited):
        messages = judge(rec.SIGNATURE_POLICY, type_, props)
        assert messages[0].startswith("model fraud: release record of fraud v3 signature does not verify with key")
        assert messages[1].startswith("model fraud: staging proof of release record of fraud v3 signature does not")


def test_a_swapped_version_fails_the_signature_and_the_workload_match() -> None:
    good = records.release("prod")
    props = deployment(good)
    swapped = copy.deepcopy(good)
    swapped["version"] = 2
    props["metadata"]["annotations"]["loopform.dev/release"] = json.dumps(swapped)
    assert "signature does not verify" in judge(rec.SIGNATURE_POLICY, DEPLOYMENT, props)[0]
    assert judge("release-matches-workload", DEPLOYMENT, props) == [
        "model fraud: container bento runs LOOPFORM_MODEL_URI 'models:/fraud/3', "
        "the signed record of fraud v2 released 'models:/fraud/2'"
    ]
    other_image = deployment(good)
    other_image["spec"]["template"]["spec"]["containers"][0]["image"] = "ghcr.io/attacker/fraud:v3"
    assert judge("release-matches-workload", DEPLOYMENT, other_image)[0].startswith(
        "model fraud: container bento runs image 'ghcr.io/attacker/fraud:v3'"
    )


def test_a_record_resigned_with_an_untrusted_key_is_refused() -> None:
    forged = records.release("prod", key=records.OTHER_KEY)
    (message, staging) = judge(rec.SIGNATURE_POLICY, APPLICATION, application(forged))
    assert "which the prod policy config does not trust" in message
    assert staging.startswith("model fraud: staging proof of release record of fraud v3 is signed by key")


def _failing(sealed: dict[str, Any] | None = None, **evaluation_or_gates: Any) -> dict[str, Any]:
    """A prod release of `sealed` (the classifier's evidence by default) with these gate results and metrics."""
    sealed = sealed or records.evidence()
    body = {k: v for k, v in sealed.items() if k != "digest"}
    for key, value in evaluation_or_gates.items():
        if key in ("validation", "drift", "ood"):
            body["gates"][key] = value
        else:
            body["evaluation"][key] = value
    from loopform import evidence as ev

    return records.release("prod", sealed=ev.seal(body, now=records.NOW - timedelta(days=1)))


@pytest.mark.parametrize(
    ("name", "changes", "expected"),
    [
        (
            "drift-within-threshold",
            {"drift": {"passed": False, "metrics": {"drift_share": 0.41}}},
            [
                "model fraud: the drift gate of fraud v3 did not pass",
                "model fraud: drift share 0.4100 > 0.3 (prod, max_drift_share)",
            ],
        ),
        (
            "ood-within-threshold",
            {"ood": {"passed": True, "metrics": {"ood_rate": 0.09}}},
            ["model fraud: OOD rate 0.0900 > 0.05 (prod, max_ood_rate)"],
        ),
        (
            "data-validation-passed",
            {"validation": {"passed": False, "metrics": {"worst_missing_share": 0.2, "worst_out_of_range_share": 0.0}}},
            [
                "model fraud: data validation of fraud v3 did not pass",
                "model fraud: worst missing share 0.2000 > 0.05 (prod, max_missing_share)",
            ],
        ),
        ("metrics-meet-minimums", {"auc": 0.7}, ["model fraud: AUC 0.7000 < 0.75 (prod, min_auc)"]),
        (
            "metrics-meet-minimums",
            {"positives": 36},
            ["model fraud: holdout positives 36 < 100 (prod, min_positives)"],
        ),
        (
            "metrics-meet-minimums",
            {"auc": 0.5, "auc_low": 0.5, "brier_skill": 0.0},  # a model that always predicts the base rate
            [
                "model fraud: AUC 0.5000 < 0.75 (prod, min_auc)",
                "model fraud: Brier skill 0.000 < 0.05 (prod, min_brier_skill)",
            ],
        ),
        (
            "no-champion-regression",
            {"auc_delta": 0.004, "auc_delta_low": -0.03},  # ahead on the point estimate, not shown non-inferior
            [
                "model fraud: AUC minus the champion's has lower bound -0.0300 <= -0.01 (prod, max_auc_drop): "
                "not shown to be non-inferior"
            ],
        ),
    ],
)
def test_a_failed_gate_is_refused_with_number_and_threshold(name: str, changes: dict, expected: list[str]) -> None:
    record = _failing(**changes)
    assert judge(rec.SIGNATURE_POLICY, APPLICATION, application(record)) == []  # honestly signed
    for type_, props in roads(record):
        assert judge(name, type_, props) == expected


def test_a_first_release_has_no_champion_and_unrecorded_metrics_are_refused() -> None:
    first = _failing(champion_version=None, champion_auc=None, auc_delta=None, auc_delta_low=None, auc_delta_high=None)
    for type_, props in roads(first):
        assert judge("no-champion-regression", type_, props) == []
    bare = copy.deepcopy(records.release("prod"))
    bare["gates"]["evaluation"] = {"task": "classification", "auc": 0.91}
    assert judge("metrics-meet-minimums", APPLICATION, application(bare)) == [
        "model fraud: fraud v3 records no holdout positives",
        "model fraud: fraud v3 records no Brier skill",
    ]
    bare["gates"]["evaluation"] = {"auc": 0.91}
    assert judge("metrics-meet-minimums", APPLICATION, application(bare)) == [
        "model fraud: fraud v3 records no task (classification or regression), so no minimum can judge it"
    ]


@pytest.mark.parametrize(
    ("name", "changes", "config", "expected"),
    [
        (
            "metrics-meet-minimums",
            {"rmse": 14.2},
            DELIVERY,
            ["model delivery: RMSE 14.2000 > 12 (prod, models.delivery.max_rmse)"],
        ),
        ("metrics-meet-minimums", {}, {"max_rmse": 9}, ["model delivery: RMSE 9.5000 > 9 (prod, max_rmse)"]),
        (
            "metrics-meet-minimums",
            {"rows": 150},
            DELIVERY,
            ["model delivery: holdout rows 150 < 200 (prod, min_holdout_rows)"],
        ),
        (
            "metrics-meet-minimums",
            {"r2": -0.00001, "rmse": 11.9},  # no better than always predicting the training mean
            DELIVERY,
            ["model delivery: R² 0.000 < 0.1 (prod, min_r2)"],
        ),
        (
            "metrics-meet-minimums",
            {},
            {"models": {"fraud": {"max_rmse": 12}}},  # another model's threshold is not this one's
            [
                "model delivery: delivery v3 is judged by RMSE, and prod sets no max_rmse for it "
                "(set models.delivery.gates.max_rmse in the stack file)"
            ],
        ),
        (
            "no-champion-regression",
            {"rmse_ratio": -0.01, "rmse_ratio_high": 0.03},  # ahead on the point estimate, not shown non-inferior
            {},
            [
                "model delivery: RMSE increase over the champion's has upper bound 0.0300 >= 0.02 "
                "(prod, max_rmse_increase): not shown to be non-inferior"
            ],
        ),
        (
            "no-champion-regression",
            {"rmse_ratio_high": 0.015},
            {"models": {"delivery": {"max_rmse_increase": 0.01}}},
            [
                "model delivery: RMSE increase over the champion's has upper bound 0.0150 >= 0.01 "
                "(prod, models.delivery.max_rmse_increase): not shown to be non-inferior"
            ],
        ),
    ],
)
def test_a_regressor_is_judged_by_its_own_metrics(name: str, changes: dict, config: dict, expected: list[str]) -> None:
    record = _failing(records.regression_evidence(), **changes)
    assert judge(rec.SIGNATURE_POLICY, APPLICATION, application(record)) == []  # honestly signed
    for type_, props in roads(record):
        assert judge(name, type_, props, **config) == expected
    # The classifier's numbers do not judge a regressor, nor the regressor's a classifier.
    assert judge(name, APPLICATION, application(record), min_auc=0.99, max_auc_drop=0.0001, **config) == expected
    classifier = _failing(rmse=50.0, r2=-1.0, rows=1, rmse_ratio_high=0.5)
    assert judge(name, APPLICATION, application(classifier), **{**config, "max_rmse": 1}) == []


def test_a_first_regressor_release_has_no_champion_and_unrecorded_metrics_are_refused() -> None:
    first = _failing(records.regression_evidence(champion_version=None, rmse_ratio_high=None))
    assert judge("no-champion-regression", APPLICATION, application(first)) == []
    bare = copy.deepcopy(first)
    bare["gates"]["evaluation"] = {"task": "regression", "rmse": 9.5}
    assert judge("metrics-meet-minimums", APPLICATION, application(bare), **DELIVERY) == [
        "model delivery: delivery v3 records no holdout rows",
        "model delivery: delivery v3 records no R²",
    ]


@pytest.mark.parametrize(
    ("name", "threshold", "expected"),
    [
        ("data-validation-passed", {"max_out_of_range_share": 0.001}, "worst out of range share 0.0020 > 0.001"),
        ("drift-within-threshold", {"max_drift_share": 0.05}, "drift share 0.1000 > 0.05"),
        ("ood-within-threshold", {"max_ood_rate": 0.005}, "OOD rate 0.0100 > 0.005"),
        ("metrics-meet-minimums", {"max_rmse": 9}, "RMSE 9.5000 > 9"),
        ("no-champion-regression", {"max_rmse_increase": 0.005}, "RMSE increase over the champion's"),
        ("evidence-fresh", {"max_evidence_age_days": 0.5}, "evidence of delivery v3 was 1.0 days old when released"),
    ],
)
def test_a_models_own_thresholds_judge_that_model_only(name: str, threshold: dict, expected: str) -> None:
    """`models.<m>` of a rule's config (from the stack's models.<m>.gates) is over the environment's thresholds."""
    (key,) = threshold
    config = {"models": {"delivery": {**DELIVERY["models"]["delivery"], **threshold}}}
    regressor = records.release("prod", sealed=records.regression_evidence())
    for type_, props in roads(regressor):
        (message,) = judge(name, type_, props, **config)
        assert message.startswith(f"model delivery: {expected}") and f"(prod, models.delivery.{key})" in message
    classifier = records.release("prod")
    assert judge(name, APPLICATION, application(classifier), **config) == []
    both = {
        "metadata": application(classifier)["metadata"]
        | {"annotations": releases_annotation({"fraud": classifier, "delivery": regressor})}
    }
    assert [m.split(":")[0] for m in judge(name, APPLICATION, both, **config)] == ["model delivery"]


def test_a_models_own_staging_rule() -> None:
    unstaged = records.release("prod", sealed=records.regression_evidence(), staged=False)
    assert judge("released-to-staging-first", DEPLOYMENT, deployment(unstaged, "delivery")) == []
    config = {"models": {"delivery": {"required": True}}}
    assert judge("released-to-staging-first", DEPLOYMENT, deployment(unstaged, "delivery"), **config) == [
        "model delivery: delivery v3 was never released to staging (no signed staging record; prod requires one)"
    ]
    assert (
        judge("released-to-staging-first", DEPLOYMENT, deployment(records.release("prod", staged=False)), **config)
        == []
    )


def test_metric_thresholds_come_from_the_config() -> None:
    record = _failing(positives=60, brier_skill=0.04, auc_delta_low=-0.008)
    assert (
        judge("metrics-meet-minimums", APPLICATION, application(record), min_positives=50, min_brier_skill=0.03) == []
    )
    assert judge("no-champion-regression", APPLICATION, application(record)) == []
    assert judge("no-champion-regression", APPLICATION, application(record), max_auc_drop=0.005) == [
        "model fraud: AUC minus the champion's has lower bound -0.0080 <= -0.005 (prod, max_auc_drop): "
        "not shown to be non-inferior"
    ]


def test_thresholds_come_from_the_config() -> None:
    record = _failing(drift={"passed": True, "metrics": {"drift_share": 0.25}})
    assert judge("drift-within-threshold", APPLICATION, application(record)) == []
    assert judge("drift-within-threshold", APPLICATION, application(record), max_drift_share=0.2) == [
        "model fraud: drift share 0.2500 > 0.2 (prod, max_drift_share)"
    ]


def test_prod_requires_a_staging_release_first() -> None:
    unstaged = records.release("prod", staged=False)
    assert judge("released-to-staging-first", DEPLOYMENT, deployment(unstaged)) == []  # not required: dev
    assert judge("released-to-staging-first", DEPLOYMENT, deployment(unstaged), required=True) == [
        "model fraud: fraud v3 was never released to staging (no signed staging record; prod requires one)"
    ]


def test_stale_evidence_is_refused() -> None:
    stale = records.release("prod", sealed=records.evidence(created=records.NOW - timedelta(days=40)))
    assert judge("evidence-fresh", APPLICATION, application(stale)) == [
        "model fraud: evidence of fraud v3 was 40.0 days old when released > 30 (prod, max_evidence_age_days)"
    ]
    assert judge("evidence-fresh", APPLICATION, application(stale), max_evidence_age_days=60) == []


def test_resources_without_releases_are_not_judged() -> None:
    plain = {"metadata": {"name": "mlflow", "labels": {}}}
    for candidate in gates.RULES:
        assert judge(candidate.name, DEPLOYMENT, plain) == []


def _stack(resources: Any) -> list[Resource]:
    return [Resource(type=r.type_, name=r.name, props=r.inputs, urn=r.urn) for r in resources]


def test_staging_and_prod_sync_only_signed_commits(rendered) -> None:
    check = gitops_signing.RULES[0].check
    for stack in ("staging", "prod"):
        resources = _stack(rendered(stack))
        (project,) = [r for r in resources if r.type == gitops_signing.APP_PROJECT]
        assert project.props["spec"]["signatureKeys"] == [{"keyID": "72A9A46405AFD43D"}]
        assert check(resources, {"required": True}) == []
    dev = _stack(rendered("dev"))
    assert check(dev, {"required": False}) == []
    ((resource, message),) = check(dev, {"required": True})
    assert resource.type == gitops_signing.APP_PROJECT
    assert message == (
        "AppProject loopform-dev: 0 signatureKeys < 1 (required): any commit pushed to "
        "https://github.com/loopform/loopform.git syncs into the serving namespace"
    )


def test_a_release_key_argo_cd_does_not_have_fails_every_sync(rendered) -> None:
    resources = _stack(rendered("prod"))
    charts = [r for r in resources if r.props.get("chart") == "argo-cd"]
    without_keys = [
        Resource(r.type, r.name, {**r.props, "values": {**r.props["values"], "configs": {}}}, r.urn)
        if r in charts
        else r
        for r in resources
    ]
    ((_, message),) = gitops_signing.RULES[0].check(without_keys, {"required": True})
    assert (
        message == "AppProject loopform-prod: release key 72A9A46405AFD43D is not imported (argo-cd configs.gpg.keys)"
    )
