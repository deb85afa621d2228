"""`loopform up --stack local`: the whole data loop on one machine, from the embedded defaults.

For every model of the stack, one after the other: generate data (the model's own generator) ->
Feast apply + materialise -> pipeline (validate -> features -> train -> evaluate -> register ->
promote to staging) -> promote to production through the gates -> serve with BentoML on
localhost -> traffic -> drifted traffic -> the monitor detects it -> retraining on the new data
-> the new version is evaluated and gated; then one summary of every model.

The monitor's decision reaches the retraining by the cluster's route when Prometheus, the Pushgateway and
Alertmanager are installed (`loopform.local_alerting`): its gauges are pushed, Prometheus's drift rule fires,
Alertmanager notifies the webhook receiver, and the receiver's callback starts the retraining, once per
incident. Without them the monitor's `FileTrigger` starts it, and the progress says so.

Everything it writes stays under `local.workdir`: MLflow on SQLite, the Feast repo, the
payload log, reports, and the stack files its promotions record releases in (copies made
from the local stack, never the repository's dev, staging or prod files). Each run starts
from an empty workdir, so running it twice gives the same loop. The services authenticate callers as on the
cluster: `up` writes a tokens file into the workdir (0600), its own traffic is the caller `loop`, the monitor
reads authenticated callers' rows only, and the summary prints how to call a service with the token.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from loopform.monitor import parse_duration
from loopform.pipeline import PIPELINE
from loopform.serve import service_target
from loopform.spec import CONFIG_KEY, PlatformSpec, load_stack, read_stack_file

if TYPE_CHECKING:
    from loopform.alerts import RetrainRequest
    from loopform.contract import Contract
    from loopform.local_alerting import LocalAlerting, Retrainings
    from loopform.model_code import ModelCode

PRODUCTION = "prod"
ENVIRONMENTS = ("staging", PRODUCTION)
DRIFT_STRENGTH = 0.8
LABEL_SHIFT = 0.1  # the generators' label_shift of the "label" drift
ENTITY_SHARE = 0.2  # share of single requests scored by entity id through the online store
SINGLE_TRAFFIC = 600  # requests of a phase sent one at a time; the rest go in batches
BATCH = 500  # events per /predict_batch request
MARKER = ".loopform-workdir"
IMAGES_POLICY = "images-pinned-by-digest"  # advisory in the loop's own policy configs (`signers`)
TOKENS_FILE = "api-tokens.json"  # the local services' callers (0600), as the cluster's Secret holds them
LOCAL_CALLER = "loop"  # the caller the loop's own traffic authenticates as


@dataclass
class AlertRoute:
    """The running Pushgateway -> Prometheus -> Alertmanager -> receiver route and what its receiver started."""

    alerting: LocalAlerting
    retrainings: Retrainings


@contextmanager
def drift_route(spec: PlatformSpec, workdir: Path, root: Path) -> Iterator[AlertRoute | None]:
    """The real alert route for the run's models, or None (the file trigger) when a server's binary is missing."""
    from loopform.alert_rules import feature_views, rule_groups
    from loopform.local_alerting import LocalAlerting, Retrainings, missing

    if missing():
        yield None
        return
    retrainings = Retrainings()
    with LocalAlerting(workdir / "alerting", rule_groups(spec, feature_views(spec, root)), retrainings) as alerting:
        yield AlertRoute(alerting, retrainings)


def route_line(route: AlertRoute | None, workdir: Path) -> str:
    """The progress line naming the route that starts retraining (and how to get the real one when it is not)."""
    from loopform.local_alerting import PACKAGES, missing

    if route is not None:
        return f"drift route: {route.alerting.route()}"
    return (
        f"drift route: the monitor's file trigger in {workdir / 'triggers'} ({', '.join(missing())} missing: "
        f"apt-get install {' '.join(PACKAGES)} for the Pushgateway -> Prometheus -> Alertmanager route)"
    )


@dataclass
class ModelRun:
    """What the loop did for one model."""

    model: str
    versions: list[int] = field(default_factory=list)
    production_version: int | None = None
    endpoint: str = ""
    service: str = ""
    """The BentoML service import string (`bentos/<m>/bentofile.yaml`'s `service`)."""
    requests: dict[str, int] = field(default_factory=dict)
    monitor: dict[str, dict[str, Any]] = field(default_factory=dict)
    payload_rows: int = 0
    release: dict[str, Any] = field(default_factory=dict)
    """The signed production record (the last one released)."""
    refusals: list[str] = field(default_factory=list)
    """Why a retrained version did not reach production (a gate's refusal), if it did not."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "versions": self.versions,
            "production_version": self.production_version,
            "endpoint": self.endpoint,
            "requests": self.requests,
            "monitor": self.monitor,
            "payload_rows": self.payload_rows,
            "refusals": self.refusals,
        }


@dataclass
class Summary:
    """What the loop did, per model, for the closing report and for tests."""

    workdir: Path
    tracking_uri: str
    models: dict[str, ModelRun] = field(default_factory=dict)
    reports: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir),
            "tracking_uri": self.tracking_uri,
            "models": {name: run.to_dict() for name, run in self.models.items()},
            "reports": self.reports,
        }


class Progress:
    """Numbered phases with timings on the console."""

    def __init__(self, total: int, echo: Callable[[str], None] = print) -> None:
        self.total, self.done, self.echo = total, 0, echo

    @contextmanager
    def phase(self, title: str) -> Iterator[None]:
        self.done += 1
        self.echo(f"[{self.done:>2}/{self.total}] {title} ...")
        started = time.perf_counter()
        yield
        self.echo(f"        done in {time.perf_counter() - started:.1f} s")

    def note(self, text: str) -> None:
        self.echo(f"        {text}")


def environment_stacks(stack_path: Path, workdir: Path, root: Path) -> Path:
    """Stack files for the local staging and production environments, made from the local stack.

    They declare a cluster (the direct road, no GitOps) so `loopform check` can render them and
    send the released services through the policy pack; nothing ever deploys them.
    """
    folder = workdir / "stacks"
    folder.mkdir(parents=True, exist_ok=True)
    document = read_stack_file(stack_path)
    for env in ENVIRONMENTS:
        platform = dict(document["config"][CONFIG_KEY])
        platform["environment"] = env
        platform["cluster"] = {
            "kind": "kubernetes",
            "kube_context": f"loopform-local-{env}",
            "identity": {"kind": "static-keys"},
        }
        platform["gitops"] = {"enabled": False}
        # The repository's own gates of this environment, unlowered (prod: only after a signed staging release),
        # and each model's own gates there; a model the environment does not declare yet keeps the local stack's.
        repository = read_stack_file(root / "stacks" / f"Pulumi.{env}.yaml")["config"][CONFIG_KEY]
        platform["gates"] = repository["gates"]
        declared = repository.get("models") or {}
        platform["models"] = {
            name: {**model, "gates": (declared.get(name) or model).get("gates") or {}}
            for name, model in (platform.get("models") or {}).items()
        }
        text = f"# Local {env} environment of `loopform up`, made from {stack_path.name}.\n"
        (folder / f"Pulumi.{env}.yaml").write_text(text + yaml.safe_dump({"config": {CONFIG_KEY: platform}}))
    return folder


def signers(workdir: Path, root: Path, stacks: Path) -> dict[str, Any]:
    """The local loop's own release key and, per environment, the policy config that trusts it.

    The configs are the repository's `policies/config/<env>.json` with the local stacks' gate
    thresholds and this key: `loopform check --file <workdir>/stacks/Pulumi.<env>.yaml` finds them.
    `images-pinned-by-digest` is advisory there: the local loop builds and pushes no image, so no digest
    exists to pin (its violations are still reported); a cluster's prod gets its digests from a release
    (`loopform pin-images`).
    """
    from loopform import policy_config, record
    from loopform.promotion import Signer

    key, pem = record.generate_key()
    record.write_key(workdir / "keys" / "release.pem", pem)
    trusted = [record.trusted_key(key, ENVIRONMENTS)]
    found = {}
    for env in ENVIRONMENTS:
        base = json.loads((root / "policies" / "config" / f"{env}.json").read_text())
        config = policy_config.for_environment(base, load_stack(stacks / f"Pulumi.{env}.yaml"), trusted)
        images = config.get(IMAGES_POLICY)
        config[IMAGES_POLICY] = {**(images if isinstance(images, dict) else {}), "enforcementLevel": "advisory"}
        found[env] = Signer(key, policy_config.write(workdir / "policy" / f"{env}.json", config))
    return found


def fresh_workdir(workdir: Path, root: Path) -> Path:
    """Empty the workdir for a new run: only a folder this command made (it holds MARKER) is ever deleted."""
    if workdir in (root.resolve(), *root.resolve().parents) or workdir == Path.home():
        raise ValueError(f"refusing to use {workdir} as the local workdir: it holds the repository or your home")
    if workdir.exists():
        if any(workdir.iterdir()) and not (workdir / MARKER).exists():
            raise ValueError(
                f"{workdir} is not empty and was not made by `loopform up` (no {MARKER}): "
                "set local.workdir to a new folder or empty it yourself"
            )
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    (workdir / MARKER).write_text("made by `loopform up`; deleted and made anew on every run\n")
    return workdir


def local_tokens(workdir: Path) -> dict[str, str]:
    """Write the local services' tokens file (0600): one caller, LOCAL_CALLER, with a fresh token."""
    import secrets

    tokens = {LOCAL_CALLER: secrets.token_urlsafe(32)}
    descriptor = os.open(workdir / TOKENS_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as out:
        json.dump(tokens, out)
    return tokens


def local_token(workdir: Path) -> str:
    """The loop's own bearer token, from the workdir's tokens file."""
    return str(json.loads((workdir / TOKENS_FILE).read_text())[LOCAL_CALLER])


def local_feature_repo(spec: PlatformSpec, root: Path, model: str) -> Path:
    """The local Feast repo of a model under local.workdir (its own registry, event table and online store)."""
    return (root / spec.local.workdir).resolve() / "feast" / model


def up(stack_path: Path, root: Path, echo: Callable[[str], None] = print) -> Summary:
    """Run the whole loop for every model of the stack, one after the other; returns the summary (raises on any
    failed step, with the reason)."""
    spec = load_stack(stack_path, root)
    if not spec.models:
        raise ValueError(f"{stack_path} declares no models: nothing to run (`loopform new model NAME` adds one)")
    workdir = fresh_workdir((root / spec.local.workdir).resolve(), root)
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    stacks = environment_stacks(stack_path, workdir, root)
    keys = signers(workdir, root, stacks)
    local_tokens(workdir)
    summary = Summary(workdir=workdir, tracking_uri=tracking_uri)
    progress = Progress(total=len(spec.models) * (10 + 2 * len(PIPELINE)), echo=echo)
    echo(f"loopform up --stack {spec.environment}: models {', '.join(sorted(spec.models))}, everything under {workdir}")
    with drift_route(spec, workdir, root) as route:
        for model in sorted(spec.models):
            summary.models[model] = _model_loop(model, spec, root, workdir, tracking_uri, stacks, keys, progress, route)
    # Each run's gate reports and the monitor's (MLflow keeps its own copies of the gate reports).
    summary.reports = sorted(str(p) for folder in ("runs", "monitor") for p in (workdir / folder).rglob("*.html"))
    (workdir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2, default=str))
    _print_summary(summary, echo)
    return summary


def _model_loop(
    model: str,
    spec: PlatformSpec,
    root: Path,
    workdir: Path,
    tracking_uri: str,
    stacks: Path,
    keys: dict[str, Any],
    progress: Progress,
    route: AlertRoute | None,
) -> ModelRun:
    """One model's loop: data, first version, production, serving, traffic, monitor, retraining on drift."""
    from loopform.steps import StepContext, ingest

    local = spec.local
    run = ModelRun(model)
    payload_uri = str(workdir / "payloads")
    now = datetime.now(UTC).replace(microsecond=0)

    def context(name: str) -> StepContext:
        return StepContext(
            model=model,
            spec=spec,
            run_dir=workdir / "runs" / model / name,
            tracking_uri=tracking_uri,
            feature_repo=local_feature_repo(spec, root, model),
            root=root,
            stack_files=stacks,
            seed=local.seed,
            now=datetime.now(UTC),
            signer=keys["staging"],
        )

    first = context("run-1")
    code, contract = first.code, first.contract
    history_start = now - timedelta(days=30 + 1 + local.drift_days)
    with progress.phase(f"{model}: generate {local.rows} labelled events (30 days, seed {local.seed})"):
        history = code.generate(local.rows, local.seed, start=history_start, days=30)
        progress.note(
            f"{contract.label} mean {history[contract.label].mean():.3f}, "
            f"{history[contract.entity].nunique()} {contract.entity} values"
        )
    with progress.phase(f"{model}: Feast: validate and write the first batch, apply definitions, materialise"):
        ingest(first, history)
        repo = first.repo()
        progress.note("applied " + ", ".join(repo.apply()))
        repo.materialize(end=now)

    run.versions.append(_pipeline(first, progress))
    with progress.phase(f"{model}: promote version {run.versions[0]} to {PRODUCTION} through its gates"):
        released = run.release = _promote(first, run.versions[0], keys[PRODUCTION], root, progress)
        run.production_version = run.versions[0]

    clean_from = now - timedelta(days=1 + local.drift_days)
    traffic = code.generate(local.traffic, local.seed + 100, start=clean_from, days=1)
    drifted = _drifted(code, local.drift, local.drift_rows, local.seed + 200, now, days=local.drift_days)
    run.service = service_target(root, model)
    server = _server(run.service, root, workdir, model, tracking_uri, released, local.serve_port)
    with progress.phase(f"{model}: serve version {released['version']} with BentoML on {server.url}"):
        server.start()
        run.endpoint = server.url
    try:
        clean_start = datetime.now(UTC)
        with progress.phase(f"{model}: send {local.traffic} requests of live traffic (1 day)"):
            run.requests["clean"] = _send(server.url, traffic, repo, contract, local_token(workdir))
        drift_start = datetime.now(UTC)
        with progress.phase(
            f"{model}: send {local.drift_rows} events of drifted traffic ({local.drift} drift, {local.drift_days} days)"
        ):
            run.requests["drifted"] = _send(server.url, drifted, repo, contract, local_token(workdir))
    finally:
        server.stop()  # graceful: the service drains its payload log
    run.payload_rows = len(_payloads(payload_uri, model))

    reference = _stored_reference(first)
    with progress.phase(f"{model}: drift monitor on the live-traffic window"):
        run.monitor["clean"] = _monitor(first, reference, payload_uri, clean_start, drift_start, workdir, route)
        progress.note(_monitor_line(run.monitor["clean"]))
    with progress.phase(f"{model}: drift monitor on the drifted window"):
        run.monitor["drifted"] = _monitor(first, reference, payload_uri, drift_start, None, workdir, route)
        progress.note(_monitor_line(run.monitor["drifted"]))
        progress.note(route_line(route, workdir))
    if run.monitor["drifted"]["triggered"]:
        served = {"live": traffic, "drifted": drifted}
        _retrain(context("run-2"), workdir, run, progress, served, payload_uri, keys[PRODUCTION], route)
        if route is not None:
            progress.note(
                f"Alertmanager re-sent firing drift alerts {route.alerting.repeats_ignored()} times so far; "
                "the receiver ignored the repeats (incidents already acted on)"
            )
    else:
        progress.note(f"no retraining: the monitor saw no drift crossing the threshold ({local.drift} drift injected)")
    return run


def _retrain(
    ctx: Any,
    workdir: Path,
    run: ModelRun,
    progress: Progress,
    served: Any,
    payload_uri: str,
    signer: Any,
    route: AlertRoute | None,
) -> None:
    """What the trigger starts: the served traffic whose labels have arrived, validated in; the pipeline on the
    window that now ends with it; the gated promotion. A refusal at any gate is reported, and production stays."""
    from loopform.ingest import BatchRefused
    from loopform.promotion import PromotionError
    from loopform.steps import StepFailed, ingest

    with progress.phase(
        f"{ctx.model}: retraining trigger: ingest the served traffic whose labels have arrived, materialise"
    ):
        trigger = _started_by(ctx.model, workdir, route, progress)
        delay = parse_duration(ctx.spec.local.label_delay)
        for name, frame in served.items():
            labelled = labelled_traffic(frame, payload_uri, ctx.contract, delay)
            progress.note(
                f"{name}: {len(labelled)} of {len(frame)} served events labelled "
                f"(labels arrive {ctx.spec.local.label_delay} after each event)"
            )
            # Live traffic must pass on its own; the drifted traffic is the shift the trigger saw, accepted as such.
            reason = f"retraining trigger {trigger}" if name == "drifted" else None
            try:
                report = ingest(ctx, labelled, accept_shift=reason)
            except BatchRefused as error:
                progress.note(f"{name}: REFUSED at ingest, quarantined: {error}")
                continue
            for line in report.accepted_lines():
                progress.note(f"{name}: accepted ({reason}): {line}")
        ctx.repo().materialize(end=datetime.now(UTC))
    try:
        version = _pipeline(ctx, progress)
    except StepFailed as error:
        if (ctx.run_dir / "release.json").exists():  # registered, then refused at staging's gates
            run.versions.append(int(ctx.read_json("release.json")["version"]))
        run.refusals.append(str(error))
        progress.note(f"REFUSED, version {run.production_version} stays in production: {error}")
        return
    run.versions.append(version)
    with progress.phase(f"{ctx.model}: promote version {version} to {PRODUCTION} through its gates"):
        try:
            run.release = _promote(ctx, version, signer, ctx.root, progress)
        except PromotionError as error:
            run.refusals.append(str(error))
            progress.note(f"REFUSED, version {run.production_version} stays in production:\n{error}")
            return
        run.production_version = version


def _started_by(model: str, workdir: Path, route: AlertRoute | None, progress: Progress) -> str:
    """Wait for what starts this model's retraining; returns its name (`<model>-...`) for the ingest record.

    On the alert route: the receiver's callback for the model's firing drift incident (polled; the guard only
    keeps a broken route from hanging). Otherwise: the monitor's pending trigger files, acknowledged.
    """
    from loopform.alerts import DRIFT_ALERTNAME
    from loopform.monitor import FileTrigger

    if route is not None:
        progress.note(f"waiting for Prometheus to fire {DRIFT_ALERTNAME} and Alertmanager to notify the receiver")
        route.alerting.wait(lambda: bool(route.retrainings.of(model)), f"{model}'s {DRIFT_ALERTNAME} notification")
        request: RetrainRequest = route.retrainings.of(model)[0]
        progress.note(
            f"{DRIFT_ALERTNAME} firing for {model} since {request.starts_at} (fingerprint {request.fingerprint}): "
            "the receiver started retraining"
        )
        return f"{model}-{DRIFT_ALERTNAME}-{request.fingerprint}"
    trigger = FileTrigger(workdir / "triggers")
    pending = trigger.pending(model)
    for path in pending:
        progress.note(f"handling {path.name}")
        trigger.acknowledge(path)
    return pending[0].name if pending else "by hand"


def labelled_traffic(served: Any, payload_uri: str, contract: Contract, delay: timedelta) -> Any:
    """The served events (in the payload log) whose labels have arrived: event time + delay <= now."""
    logged = set(_payloads(payload_uri, contract.model)[contract.id].dropna())
    arrived = served[contract.timestamp] + delay <= datetime.now(UTC)
    return served[served[contract.id].isin(logged) & arrived].reset_index(drop=True)


def _pipeline(ctx: Any, progress: Progress) -> int:
    """Every declared step, in order, in-process; returns the registered version."""
    for number, step in enumerate(PIPELINE, 1):
        with progress.phase(f"{ctx.model}: pipeline {ctx.run_dir.name} step {number}/{len(PIPELINE)}: {step.name}"):
            step.load()(ctx)
    release = ctx.read_json("release.json")
    evaluation = ctx.read_json("evaluation.json")
    # The staging release the last step recorded becomes the workdir's staging stack file.
    shutil.copyfile(ctx.run_dir / "Pulumi.staging.yaml", ctx.stack_files / "Pulumi.staging.yaml")
    progress.note(f"version {release['version']}: {_metrics_line(evaluation)}")
    return int(release["version"])


def _metrics_line(evaluation: dict[str, Any]) -> str:
    """The evaluation's headline numbers for its task, and the champion's on the same holdout."""
    champion = evaluation.get("champion_version")
    if evaluation.get("task") == "regression":
        line = f"RMSE {evaluation['rmse']:.3f}, MAE {evaluation['mae']:.3f}, R² {evaluation['r2']:.3f}"
        versus = None if champion is None else f"RMSE {evaluation['champion_rmse']:.3f}"
    else:
        line = (
            f"AUC {evaluation['auc']:.3f}, precision {evaluation['precision']:.3f}, recall {evaluation['recall']:.3f}"
        )
        versus = None if champion is None else f"AUC {evaluation['champion_auc']:.3f}"
    return line + (
        ", champion none yet" if versus is None else f", champion version {champion} {versus} on the same holdout"
    )


def _promote(ctx: Any, version: int, signer: Any, root: Path, progress: Progress) -> dict[str, Any]:
    """Release the version to production, then prove the policy pack admits the workdir's prod stack."""
    from loopform.check import check, format_violations
    from loopform.promotion import promote

    path = ctx.stack_files / f"Pulumi.{PRODUCTION}.yaml"
    release = promote(ctx.model, version, PRODUCTION, tracking_uri=ctx.tracking_uri, stack_path=path, signer=signer)
    result = check(PRODUCTION, root, path, signer.policy_config)
    if result.mandatory:
        lines = "\n".join(format_violations([v for v in result.violations if v.mandatory]))
        raise RuntimeError(f"the policy pack refuses {path} after promoting version {version}:\n{lines}")
    progress.note(f"signed record in {path}; policy pack: {result.summary()}")
    return release.record()


def _drifted(code: ModelCode, kind: str, rows: int, seed: int, now: datetime, days: int = 1) -> Any:
    start = now - timedelta(days=days)
    if kind == "label":
        return code.generate(rows, seed, start=start, days=days, label_shift=LABEL_SHIFT)
    strength = DRIFT_STRENGTH if kind == "covariate" else 0.0
    return code.generate(rows, seed, start=start, days=days, covariate_drift=strength)


def _server(
    service: str, root: Path, workdir: Path, model: str, tracking_uri: str, release: dict[str, Any], port: int
) -> Any:
    from loopform.serving.process import BentoServer

    env = {**serve_env(workdir, model, tracking_uri, release), "MLFLOW_DISABLE_TELEMETRY": "true"}
    return BentoServer(service, working_dir=root, env=env, port=port, log_path=workdir / f"serve-{model}.log")


def serve_env(workdir: Path, model: str, tracking_uri: str, release: dict[str, Any]) -> dict[str, str]:
    """What the local service needs: the signed release (version and artifacts digest), its online store, where
    payloads go and its callers' tokens."""
    from loopform.record import release_env
    from loopform.serving.auth import ENV_TOKENS_FILE

    return {
        "LOOPFORM_TRACKING_URI": tracking_uri,
        ENV_TOKENS_FILE: str(workdir / TOKENS_FILE),
        **release_env(release),
        "LOOPFORM_FEAST_REPO": str(workdir / "feast" / model),
        "LOOPFORM_PAYLOAD_URI": str(workdir / "payloads"),
        "BENTOML_HOME": str(workdir / "bentoml"),
    }


def _send(url: str, frame: Any, repo: Any, contract: Contract, token: str) -> int:
    """POST the events as the caller LOCAL_CALLER: the first `SINGLE_TRAFFIC` one at a time (a share by entity id),
    the rest in batches.

    By entity id the request carries the event's own fields and the service reads the entity's
    features online, written there just before (as a streaming feature pipeline does on arrival),
    so what is served is what training will join to the event.
    """
    import httpx

    from loopform.serving.schemas import BATCH_FIELD, entity_api

    def body(row: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
        return {contract.id: row[contract.id], **{name: _plain(row[name]) for name in names}}

    answered = 0
    rows = frame.to_dict(orient="records")
    with httpx.Client(base_url=url, timeout=60.0, headers={"Authorization": f"Bearer {token}"}) as client:
        for index, row in enumerate(rows[:SINGLE_TRAFFIC]):
            if index % round(1 / ENTITY_SHARE) == 0:
                repo.write_online(frame.iloc[[index]])
                request = {contract.entity: int(row[contract.entity]), **body(row, contract.event_features)}
                response = client.post(f"/{entity_api(contract)}", json=request)
            else:
                response = client.post("/predict", json=body(row, contract.feature_names))
            response.raise_for_status()
            answered += 1
        for start in range(SINGLE_TRAFFIC, len(rows), BATCH):
            batch = [body(row, contract.feature_names) for row in rows[start : start + BATCH]]
            response = client.post("/predict_batch", json={BATCH_FIELD: batch})
            response.raise_for_status()
            answered += len(response.json())
    return answered


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _stored_reference(ctx: Any) -> tuple[Path, str | None]:
    """The released run's reference profile and the sha256 its evidence seals (as the cluster's monitor loads
    it from MLflow), or its training data where the run stored no profile."""
    stored = ctx.read_json("release.json")["evidence"].get("reference_profile")
    if stored is None:
        return ctx.run_dir / "reference.parquet", None
    return ctx.run_dir / Path(stored["artifact"]).name, stored["sha256"]


def _monitor(
    ctx: Any,
    reference: tuple[Path, str | None],
    payload_uri: str,
    since: datetime,
    until: datetime | None,
    workdir: Path,
    route: AlertRoute | None,
) -> dict:
    """One monitor run. On the alert route its gauges are pushed, and it asks for retraining exactly when the
    drift rule will fire (the share above the model's threshold); otherwise its file trigger asks."""
    from prometheus_client import CollectorRegistry

    from loopform.alerts import DRIFT_ALERTNAME
    from loopform.monitor import CallerPolicy, FileTrigger, run_monitor

    registry = CollectorRegistry()
    result = run_monitor(
        ctx.model,
        contract=ctx.contract,
        reference=reference[0],
        reference_sha256=reference[1],
        payload_uri=payload_uri,
        since=since,
        until=until or datetime.now(UTC),
        gates=ctx.gates,
        report_dir=workdir / "monitor",
        min_rows=ctx.spec.monitoring.min_rows,
        registry=registry,
        trigger=None if route is not None else FileTrigger(workdir / "triggers"),
        callers=CallerPolicy(),  # authenticated callers only, as `loopform monitor` reads them
    )
    if route is not None:
        route.alerting.push(registry, ctx.model)
        share = result.drift_share
        result.triggered = share is not None and share > result.max_drift_share
        if result.triggered:
            result.trigger = f"{route.alerting.pushgateway.url} -> {DRIFT_ALERTNAME}"
            result.message += f"; retraining asked for: share pushed to {route.alerting.pushgateway.url}"
        elif result.status == "drift":
            result.message += f"; label shift only: {DRIFT_ALERTNAME} reads the drift share, so no alert"
    return result.to_dict()


def _monitor_line(result: dict[str, Any]) -> str:
    share = result["drift_share"]
    drifted = ", ".join(result["drifted"]) or "none"
    verdict = "RETRAINING TRIGGERED" if result["triggered"] else "no action"
    ood = result.get("ood_rate")
    ood_text = "" if ood is None else f", OOD rate {ood:.3f}"
    return (
        f"{result['rows']} rows, drift share {share if share is None else round(share, 3)}{ood_text}, "
        f"drifted: {drifted} -> {verdict}"
    )


def _payloads(payload_uri: str, model: str) -> Any:
    from loopform.payloads import read_payloads

    return read_payloads(payload_uri, model, datetime(2000, 1, 1, tzinfo=UTC), datetime.now(UTC) + timedelta(1))


def _print_summary(summary: Summary, echo: Callable[[str], None]) -> None:
    echo("")
    echo("The loop closed:")
    for model, run in summary.models.items():
        echo(f"  {model}")
        echo(f"    model versions     {run.versions} in MLflow; production alias -> version {run.production_version}")
        echo(f"    requests answered  {run.requests}; payload log rows: {run.payload_rows}")
        for refusal in run.refusals:
            echo(f"    REFUSED            {refusal.splitlines()[0]}")
            for line in refusal.splitlines()[1:]:
                echo(f"                       {line.strip()}")
        for phase, result in run.monitor.items():
            echo(f"    monitor ({phase:<7})  {_monitor_line(result)}")
        echo(f"    endpoint           {run.endpoint} (stopped; serve again with:")
        for name, value in serve_env(summary.workdir, model, summary.tracking_uri, run.release).items():
            echo(f"                       {name}={value} \\")
        echo(f"                       .venv/bin/loopform serve {model} --port {run.endpoint.rsplit(':', 1)[-1]})")
        tokens = summary.workdir / TOKENS_FILE
        echo(f"    call it            with the token of caller {LOCAL_CALLER!r} in {tokens} (0600; add callers there):")
        echo(
            f"                       TOKEN=$(.venv/bin/python -c \"import json; print(json.load(open('{tokens}'))"
            f"['{LOCAL_CALLER}'])\")"
        )
        echo(
            f"                       curl -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: application/json' "
            f"-d @event.json {run.endpoint}/predict"
        )
    echo(f"  reports              {len(summary.reports)} HTML reports (gate reports also in each MLflow run):")
    for report in summary.reports:
        echo(f"                       {report}")
    echo(f"  MLflow UI            .venv/bin/mlflow ui --backend-store-uri {summary.tracking_uri}")
