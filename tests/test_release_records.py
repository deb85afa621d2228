"""Signed release records: signing, verification, keys and artifact digests (loopform.record)."""

from __future__ import annotations

import copy
import json
import stat
from pathlib import Path

import pytest

from loopform import record as rec
from tests import records


def test_a_signed_record_verifies_for_its_environment_only() -> None:
    staging = records.release("staging")
    assert rec.verify(staging, "staging", records.TRUSTED) == []
    (reason,) = rec.verify(staging, "prod", records.TRUSTED)
    assert "signature does not verify with key" in reason and "for prod" in reason


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("gates", "evaluation", "auc"), 0.99),
        (("gates", "drift", "drift_share"), 0.0),
        (("version",), 4),
        (("image",), "ghcr.io/attacker/fraud:v3"),
        (("artifacts",), "sha256:" + "0" * 64),
        (("released_at",), "2026-11-21T12:00:00+00:00"),
        (("staging", "released_at"), "2026-11-19T00:00:00+00:00"),
    ],
)
def test_any_field_edited_by_hand_fails_verification(path: tuple[str, ...], value: object) -> None:
    edited = copy.deepcopy(records.release("prod"))
    *parents, leaf = path
    target = edited
    for key in parents:
        target = target[key]
    target[leaf] = value
    reasons = rec.verify(edited, "prod", records.TRUSTED)
    assert reasons and all("signature does not verify" in r for r in reasons)


def test_untrusted_and_wrongly_scoped_keys_are_refused() -> None:
    other = rec.trusted_key(records.OTHER_KEY, ("prod",))
    forged = records.release("prod", key=records.OTHER_KEY)
    reasons = rec.verify(forged, "prod", records.TRUSTED)
    assert reasons[0] == (
        f"release record of fraud v3 is signed by key {other.key_id}, which the prod policy config does not trust"
    )
    staging_only = [rec.trusted_key(records.KEY, ("staging",)).to_dict()]
    (reason,) = rec.verify(records.release("prod"), "prod", staging_only)
    assert reason.endswith("trusted for staging but not for prod")


def test_a_staging_proof_must_verify_as_staging() -> None:
    record = records.release("prod")
    assert rec.staging_record(record)["released_at"] == record["staging"]["released_at"]
    # Signed by the staging key for another version: the proof no longer matches this record.
    other = records.release("prod", sealed=records.evidence(version=4))
    swapped = rec.sign(
        {**{k: v for k, v in record.items() if k != "signature"}, "staging": other["staging"]}, "prod", records.KEY
    )
    (reason,) = rec.verify(swapped, "prod", records.TRUSTED)
    assert reason.startswith("staging proof of release record of fraud v3 signature does not verify")


def test_incomplete_records_name_what_they_lack() -> None:
    record = records.release("staging")
    del record["artifacts"]
    assert rec.verify(record, "staging", records.TRUSTED) == ["release record of fraud v3 lacks artifacts"]


def test_artifacts_digest_covers_names_and_contents(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    (tmp_path / "data" / "model.pth").write_bytes(b"weights")
    digest = rec.artifacts_digest(rec.file_digests(tmp_path))
    assert digest.startswith("sha256:") and len(digest) == 71
    (tmp_path / "data" / "model.pth").write_bytes(b"weightz")
    assert rec.artifacts_digest(rec.file_digests(tmp_path)) != digest
    (tmp_path / "data" / "model.pth").write_bytes(b"weights")
    (tmp_path / "data" / "model.pth").rename(tmp_path / "data" / "other.pth")
    assert rec.artifacts_digest(rec.file_digests(tmp_path)) != digest


def test_keys_load_from_a_file_or_the_environment(tmp_path: Path) -> None:
    key, pem = rec.generate_key()
    path = tmp_path / "keys" / "release.pem"
    rec.write_key(path, pem)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        rec.write_key(path, pem)  # never overwrites a key
    expected = rec.trusted_key(key, ()).key_id
    assert rec.trusted_key(rec.load_key(path), ()).key_id == expected
    assert rec.trusted_key(rec.load_key(environ={rec.KEY_ENV: pem.decode()}), ()).key_id == expected
    assert rec.trusted_key(rec.load_key(environ={rec.KEY_FILE_ENV: str(path)}), ()).key_id == expected
    with pytest.raises(rec.RecordError, match="no signing key"):
        rec.load_key(environ={})
    with pytest.raises(rec.RecordError, match="not an unencrypted PEM private key"):
        rec.load_key(environ={rec.KEY_ENV: "not a key"})


def test_policy_config_names_its_environment_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "prod.json"
    path.write_text(json.dumps({"release-signed": {"environment": "prod", "trusted_keys": records.TRUSTED}}))
    environment, keys = rec.read_policy_config(path)
    assert environment == "prod" and [k.to_dict() for k in keys] == records.TRUSTED
    path.write_text(json.dumps({"all": "mandatory"}))
    with pytest.raises(rec.RecordError, match="trusts no release keys"):
        rec.read_policy_config(path)


def test_a_record_carries_the_task_and_the_numbers_its_rules_judge() -> None:
    classifier = rec.gate_summary(records.evidence())["evaluation"]
    assert classifier == {
        "task": "classification",
        "auc": 0.91,
        "auc_low": 0.89,
        "auc_delta_low": -0.002,
        "brier_skill": 0.41,
        "positives": 140,
    }
    regressor = rec.gate_summary(records.regression_evidence())["evaluation"]
    assert regressor == {
        "task": "regression",
        "rmse": 9.5,
        "rmse_high": 9.9,
        "r2": 0.62,
        "rows": 2000,
        "rmse_ratio_high": 0.005,
    }
    assert isinstance(regressor["rows"], int)
    first = rec.gate_summary(records.regression_evidence(champion_version=None, rmse_ratio_high=None))
    assert first["evaluation"]["rmse_ratio_high"] is None  # no champion: nothing to compare
    assert rec.gate_summary(records.evidence(evaluation={"auc": 0.9}))["evaluation"] == {"task": None}
