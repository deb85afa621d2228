"""Gated promotion: `loopform promote MODEL VERSION --to ENV`.

Reads the evidence from the version's MLflow tags, judges it with
`loopform.evidence.check_evidence` against the gates the model has in ENV (the stack's
`gates` with the model's own `models.<model>.gates` over them), checks that the registry still
serves the files the evidence names, and on success:

1. writes a compact, signed release record (`loopform.record`) into `models.<model>.release`
   of the stack file with ruamel.yaml round-trip, so comments and layout stay and the
   promotion is a reviewable diff of about 30 lines; the full evidence stays in the run;
2. points the MLflow alias named after ENV at the version; a production environment
   (`prod` or `production`) also moves `production` and `champion` (what the next
   training run is compared with), and the version that held `champion` before gets the
   tag `archived=true`;
3. tags the version `loopform.release.<env>` with the signed record, which is where a later
   production promotion finds the staging record it must carry. The tag is only a courier:
   MLflow tags are writable by any client, so the record counts only because its signature
   verifies with a key the environment's policy config trusts for staging.

The record names the service image: `--image`, else the target stack's `services.image` (images/serving, which
serves every model and version from the Deployment's environment, so a release needs no image build). It must be
`name:tag` or `name[:tag]@sha256:<64 hex>`: a malformed reference would fail only when the cluster pulls it.

The signing key must be one the target environment's policy config trusts for it, so a
promotion that the policy pack would refuse is refused here first. Every check runs
before any change; a refusal raises PromotionError and changes nothing.

Two promotions to one environment at once: each holds an exclusive lock on `.<stack file>.lock` beside the stack
file from before it reads the file until its last change, and one that finds the lock held is refused at once,
naming it, rather than waiting to overwrite the winner's release with a record checked against a stale file. The
stack file is replaced atomically (a temporary file renamed over it), so a reader or a crash sees the old or the new
file, never half of one. The aliases move only after the stack file is written; if the registry then fails, every
alias and tag already changed is put back and the stack file restored, so the two never disagree.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loopform import evidence as ev
from loopform import record as rec
from loopform.images import DIGEST, ImageRef
from loopform.spec import CONFIG_KEY, Release, SpecError, load_stack, parse_spec

PRODUCTION_ENVS = frozenset({"prod", "production"})
STAGING_ENV = rec.STAGING
CHAMPION_ALIAS = "champion"
RELEASE_TAG = "loopform.release.{env}"
#: Evidence fields that must equal the run's own artifacts (gate JSONs, evaluation.json, data fingerprint).
RECORDED_FIELDS = ("gates", "evaluation", "training", "training_data_fingerprint")


class PromotionError(Exception):
    """A refused promotion; `reasons` lists every reason, and nothing was changed (unless a reason says that a
    release which failed halfway could not be fully undone, and what stayed changed)."""

    def __init__(self, model: str, version: int | str, env: str, reasons: list[str]) -> None:
        self.model = model
        self.version = version
        self.env = env
        self.reasons = reasons
        lines = "\n".join(f"  - {r}" for r in reasons)
        super().__init__(f"refusing to promote {model} version {version} to {env}:\n{lines}")


@dataclass(frozen=True)
class Signer:
    """The key a promotion signs with, and the policy config whose trusted keys judge the result."""

    key: Any
    """Ed25519 private key (`loopform.record.load_key`)."""
    policy_config: Path
    """The target environment's policy config (`policies/config/<env>.json`)."""


def aliases_for(env: str) -> tuple[str, ...]:
    """The aliases a release to `env` sets: the env name, and for production also production/champion."""
    names = [env]
    if env in PRODUCTION_ENVS:
        names += ["production", CHAMPION_ALIAS]
    return tuple(dict.fromkeys(names))


#: The OCI distribution grammar of a repository: an optional registry host (and port), then lowercase path components.
_REPOSITORY = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*(?::[0-9]+)?/)?"
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def image_problem(image: str) -> str | None:
    """Why `image` is not a reference a release may record (`name:tag` or `name[:tag]@sha256:<64 hex>`), or None."""
    ref = ImageRef.parse(image)
    form = "name:tag or name[:tag]@sha256:<64 hex digits>"
    if str(ref) != image or not _REPOSITORY.match(ref.repository) or len(ref.repository) > 255:  # e.g. `app:1@`
        return f"image {image!r} is not a valid reference ({form})"
    if ref.tag and not _TAG.match(ref.tag):
        return f"image {image!r} has an invalid tag {ref.tag!r} ({form})"
    if ref.digest is not None and not DIGEST.match(ref.digest):
        return f"image {image!r} has an invalid digest {ref.digest!r}: sha256: and 64 lowercase hex digits"
    if ref.tag is None and ref.digest is None:
        return f"image {image!r} has neither tag nor digest, so it would run whatever `latest` is ({form})"
    if ref.tag == "latest" and ref.digest is None:
        return f"image {image!r} uses the latest tag, which moves: name a version tag or a digest ({form})"
    return None


def promote(
    model: str,
    version: int,
    env: str,
    *,
    tracking_uri: str,
    stack_path: Path,
    signer: Signer,
    image: str | None = None,
    now: datetime | None = None,
) -> Release:
    """Check the version's evidence against the model's gates in `env`, then release it (see module doc).

    Raises PromotionError with every reason when it refuses; then neither the stack file nor
    the registry has changed.
    """
    version = int(version)
    stack_path = Path(stack_path)
    with stack_lock(stack_path, lambda why: PromotionError(model, version, env, [why])):
        return _promote_locked(model, version, env, tracking_uri, stack_path, signer, image, now or datetime.now(UTC))


def _promote_locked(
    model: str,
    version: int,
    env: str,
    tracking_uri: str,
    stack_path: Path,
    signer: Signer,
    image: str | None,
    now: datetime,
) -> Release:
    """`promote` while this process holds the stack file's lock."""
    from mlflow.exceptions import MlflowException

    from loopform import registry

    def refuse(*reasons: str) -> PromotionError:
        return PromotionError(model, version, env, list(reasons))

    try:
        spec = load_stack(stack_path)
    except SpecError as error:
        raise refuse(f"stack file is not valid: {error}") from None
    if model not in spec.models:
        known = ", ".join(sorted(spec.models)) or "none"
        raise refuse(f"{stack_path} declares no model {model!r} under models (declared: {known})")
    gates = spec.gates_for(model)
    try:
        environment, trusted = rec.read_policy_config(signer.policy_config)
    except (OSError, ValueError, KeyError, rec.RecordError) as error:
        raise refuse(f"cannot read the trusted keys of {signer.policy_config}: {error}") from None
    key = rec.trusted_key(signer.key, ())
    reasons = _key_reasons(key.key_id, env, environment, trusted, signer.policy_config)
    given = image is not None
    image = image if image is not None else spec.services.image
    if problem := image_problem(image):
        reasons.append(problem if given else f"{stack_path} services.image: {problem}")

    mlflow_client = registry.client(tracking_uri)
    try:
        model_version = mlflow_client.get_model_version(model, str(version))
    except MlflowException as error:
        if denied := access_denied(error, tracking_uri):
            raise refuse(*reasons, denied) from None
        raise refuse(*reasons, f"the registry at {tracking_uri} has no version {version} of model {model!r}") from None

    evidence = registry.read_evidence(tracking_uri, model, version)
    raw = model_version.tags.get(registry.EVIDENCE_TAG)
    if evidence is None and raw:
        raise refuse(f"malformed evidence: tag {registry.EVIDENCE_TAG} is not a JSON object")
    paths = ev.GatePaths(model, spec.models[model].gates)
    reasons += ev.check_evidence(evidence, gates.model_dump(), now=now, paths=paths)
    if evidence is not None:
        for field, expected in (("model", model), ("version", version), ("run_id", model_version.run_id)):
            if evidence.get(field) != expected:
                reasons.append(
                    f"evidence belongs elsewhere: its {field} is {evidence.get(field)!r}, this version's is {expected!r}"
                )
        reasons += _disagreements(evidence, registry.run_record(tracking_uri, model_version.run_id))
        reasons += _artifact_reasons(evidence, registry.model_file_digests(tracking_uri, f"models:/{model}/{version}"))
    staged = None
    if gates.require_staging and env != STAGING_ENV:
        staged, why = _staging_record(model_version.tags.get(RELEASE_TAG.format(env=STAGING_ENV)), evidence, trusted)
        if why:
            reasons.append(f"{env} requires a prior staging release ({paths('require_staging')}): {why}")
    if reasons:
        raise refuse(*reasons)

    assert evidence is not None
    unsigned = rec.build(evidence, image=image, released_at=ev.now_iso(now))
    if staged is not None:
        unsigned["staging"] = rec.staging_proof(staged)
    signed = rec.sign(unsigned, env, signer.key)
    problems = rec.verify(signed, env, trusted)
    if problems:  # the checks above should make this impossible; never write a record the pack refuses
        raise refuse(*problems)
    release = Release.model_validate(signed)
    text = render_release(stack_path, model, release)  # validates before anything is written

    previous_champion = registry.alias_version(tracking_uri, model, CHAMPION_ALIAS) if env in PRODUCTION_ENVS else None
    original = stack_path.read_bytes()
    undo: list[Callable[[], None]] = []
    try:
        replace_file(stack_path, text.encode("utf-8"))  # first: the aliases never name a release the file lacks
        undo.append(lambda: replace_file(stack_path, original))  # atomic: had it failed, the file would be as it was
        for alias in aliases_for(env):
            undo.append(_alias_undo(mlflow_client, model, alias, registry.alias_version(tracking_uri, model, alias)))
            registry.set_alias(tracking_uri, model, alias, version)
        tags = [(version, RELEASE_TAG.format(env=env), json.dumps(signed))]
        if env in PRODUCTION_ENVS:
            if previous_champion is not None and previous_champion != version:
                tags.append((previous_champion, registry.ARCHIVED_TAG, "true"))
            if model_version.tags.get(registry.ARCHIVED_TAG):
                tags.append((version, registry.ARCHIVED_TAG, None))
        for tagged, tag, value in tags:
            undo.append(_tag_undo(mlflow_client, model, tagged, tag))
            if value is None:
                mlflow_client.delete_model_version_tag(model, str(tagged), tag)
            else:
                mlflow_client.set_model_version_tag(model, str(tagged), tag, value)
    except Exception as error:
        left = _roll_back(undo)
        if left:
            raise refuse(
                f"the release failed halfway ({type(error).__name__}: {error}) and could not be fully undone: "
                + "; ".join(left)
            ) from error
        raise refuse(
            f"the registry at {tracking_uri} failed during the release ({type(error).__name__}: {error}); "
            f"{stack_path}, the aliases and the tags are as they were"
        ) from error
    return release


LOCK_SUFFIX = ".lock"


def lock_path(stack_path: Path) -> Path:
    """The lock file of a stack file: hidden, beside it (one lock per environment)."""
    return stack_path.with_name(f".{stack_path.name}{LOCK_SUFFIX}")


@contextlib.contextmanager
def stack_lock(stack_path: Path, refused: Callable[[str], Exception]) -> Iterator[Path]:
    """Hold an exclusive flock on the stack file's lock file, or raise `refused(why)` at once if another holds it.

    The lock file is removed on release. A process that opened it just before that removal finds, once it holds
    the lock, that the path no longer names the file it locked, and tries again with the new one.
    """
    lock = lock_path(stack_path)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise refused(
                f"another promotion to this environment holds the lock {lock} on {stack_path}: "
                "try again when it has finished (one promotion per stack file at a time)"
            ) from None
        try:
            current = os.stat(lock)
        except FileNotFoundError:
            current = None
        held = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(fd)  # the holder before us removed it after we opened it: lock the file the path names now
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for an operator who finds it
        yield lock
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        os.close(fd)


def replace_file(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically: a temporary file beside it, synced, then renamed over it (mode kept)."""
    mode = path.stat().st_mode & 0o7777 if path.exists() else 0o644
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def access_denied(error: Exception, tracking_uri: str) -> str | None:
    """What to do when the registry refused the caller (401/403 from MLflow's auth app), else None."""
    status = error.get_http_status_code() if hasattr(error, "get_http_status_code") else None
    if status not in (401, 403):
        return None
    why = "refused these credentials" if status == 401 else "does not let this user promote"
    return (
        f"the registry at {tracking_uri} {why} (HTTP {status}): set MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD to the `promotion` user's, from the Secret mlflow-promotion-credentials "
        "(docs/hardening.md, MLflow: authenticated writes)"
    )


def _alias_undo(client: Any, model: str, alias: str, before: int | None) -> Callable[[], None]:
    """Put `alias` back where it pointed (or remove it, if it pointed nowhere)."""
    if before is None:
        return lambda: client.delete_registered_model_alias(model, alias)
    return lambda: client.set_registered_model_alias(model, alias, str(before))


def _tag_undo(client: Any, model: str, version: int, tag: str) -> Callable[[], None]:
    """Put a version's tag back to its current value (or remove it, if it has none)."""
    before = client.get_model_version(model, str(version)).tags.get(tag)
    if before is None:
        return lambda: client.delete_model_version_tag(model, str(version), tag)
    return lambda: client.set_model_version_tag(model, str(version), tag, before)


def _roll_back(undo: list[Callable[[], None]]) -> list[str]:
    """Run the undo steps newest first, each even if an earlier one fails; what could not be undone."""
    left = []
    for step in reversed(undo):
        try:
            step()
        except Exception as error:  # keep undoing the rest; report what stayed changed
            left.append(f"{type(error).__name__}: {error}")
    return left


def _key_reasons(key_id: str, env: str, environment: str, trusted: list[rec.TrustedKey], config: Path) -> list[str]:
    """The signing key must be one the target environment's policy config trusts for it."""
    if environment != env:
        return [f"{config} is the policy config of {environment or 'no environment'!r}, not of {env!r}"]
    for key in trusted:
        if key.key_id == key_id:
            return (
                []
                if env in key.environments
                else [
                    f"signing key {key_id} is trusted by {config} only for "
                    f"{', '.join(key.environments) or 'nothing'}, not {env}"
                ]
            )
    return [
        f"signing key {key_id} is not among the trusted keys of {config} (add it: `loopform keygen` prints the entry)"
    ]


def _artifact_reasons(evidence: Mapping[str, Any], files: Mapping[str, str]) -> list[str]:
    """The registry must still serve exactly the files the evidence was sealed over."""
    sealed = (evidence.get("artifacts") or {}).get("files") or {}
    if not sealed:
        return []  # check_evidence already reports the missing artifacts field
    changed = sorted(path for path in set(sealed) | set(files) if sealed.get(path) != files.get(path))
    if not changed:
        return []
    return [f"the model's artifacts changed since registration: {', '.join(changed)} differ from the sealed digests"]


def _staging_record(
    raw: str | None, evidence: Mapping[str, Any] | None, trusted: list[rec.TrustedKey]
) -> tuple[dict[str, Any] | None, str]:
    """The version's signed staging record, or why there is none that verifies."""
    if not raw:
        return None, "the version carries no signed staging record (promote it to staging first)"
    try:
        staged = json.loads(raw)
    except json.JSONDecodeError:
        return None, "its staging record is not JSON"
    if not isinstance(staged, dict):
        return None, "its staging record is not a JSON object"
    problems = rec.verify(staged, STAGING_ENV, trusted)
    if problems:
        return None, "; ".join(problems)
    if evidence is not None and staged.get("evidence") != rec.DIGEST_PREFIX + str(evidence.get("digest")):
        return None, "the staging record was signed over other evidence"
    return staged, ""


def _disagreements(evidence: dict[str, Any], recorded: dict[str, Any]) -> list[str]:
    """A digest proves the evidence is intact, not that it is true: it must equal what its run recorded."""
    differ = [key for key in RECORDED_FIELDS if evidence.get(key) != ev.jsonable(recorded.get(key))]
    if not differ:
        return []
    return [f"forged evidence: {', '.join(differ)} differ from what run {evidence.get('run_id')} recorded"]


def render_release(stack_path: Path, model: str, release: Release) -> str:
    """The stack file's text with `models.<model>.release` set; comments and layout kept.

    The result is re-parsed with the spec's own loader (PyYAML, YAML 1.1) and validated,
    and the evidence must still verify there: what Pulumi and the policy pack read back is
    exactly what was sealed.
    """
    import yaml as pyyaml

    rt = _yaml()
    document = rt.load(stack_path.read_text())
    models = document["config"][CONFIG_KEY]["models"]
    models[model]["release"] = _plain_yaml(release.record())
    buffer = io.StringIO()
    rt.dump(document, buffer)
    text = buffer.getvalue()

    reread = pyyaml.safe_load(text)["config"][CONFIG_KEY]
    spec = parse_spec(reread, str(stack_path))
    written = spec.models[model].release
    if written is None or written != release or written.record() != release.record():
        raise ValueError(f"release written to {stack_path} does not read back identically (YAML round trip)")
    return text


def _yaml() -> Any:
    from ruamel.yaml import YAML

    rt = YAML()  # round-trip: comments, key order and quoting of the rest of the file stay
    rt.preserve_quotes = True
    rt.width = 4096
    rt.indent(mapping=2, sequence=4, offset=2)
    rt.representer.add_representer(_Float, _represent_float)
    rt.representer.add_representer(type(None), _represent_null)
    return rt


class _Float(float):
    """A float written so YAML 1.1 readers (PyYAML) and 1.2 readers both read it back exactly."""


def _represent_float(representer: Any, value: _Float) -> Any:
    text = repr(float(value))
    mantissa, e, exponent = text.partition("e")
    if e and "." not in mantissa:
        text = f"{mantissa}.0e{exponent}"  # '1e-05' is a string to YAML 1.1; '1.0e-05' is a float to both
    return representer.represent_scalar("tag:yaml.org,2002:float", text)


def _represent_null(representer: Any, value: None) -> Any:
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")  # explicit, not an empty value


def _plain_yaml(value: Any) -> Any:
    """Evidence as YAML-safe data: strings double-quoted (no 'yes'/time/sexagesimal surprises)."""
    from ruamel.yaml.comments import CommentedMap
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    if isinstance(value, Mapping):
        out = CommentedMap()
        for key, item in value.items():
            out[_key(str(key))] = _plain_yaml(item)
        return out
    if isinstance(value, list | tuple):
        return [_plain_yaml(v) for v in value]
    if isinstance(value, str):
        return DoubleQuotedScalarString(value)
    if isinstance(value, float) and not isinstance(value, bool):
        return _Float(value)
    return value


def _key(key: str) -> Any:
    import yaml as pyyaml
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    try:
        plain = pyyaml.safe_load(f"{key}: 0")
    except pyyaml.YAMLError:
        plain = None
    return key if isinstance(plain, dict) and list(plain) == [key] else DoubleQuotedScalarString(key)
