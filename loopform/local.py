"""`loopform up --stack local`: the whole data loop on one machine, from the embedded defaults.

generate data -> Feast apply + materialise -> pipeline (validate -> features -> train ->
evaluate -> register -> promote to staging) -> promote to production through the gates ->
serve with BentoML on localhost -> traffic -> drifted traffic -> the monitor detects it ->
retraining on the new data -> the new version is evaluated and gated -> summary.

Everything it writes stays under `local.workdir`: MLflow on SQLite, the Feast repo, the
payload log, reports, and the stack files its promotions record releases in (copies made
from the local stack, never the repository's dev, staging or prod files). Each run starts
from an empty workdir, so running it twice gives the same loop.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from loopform.monitor import parse_duration
from loopform.pipeline import PIPELINE
from loopform.spec import CONFIG_KEY, load_stack, read_stack_file

PRODUCTION = "prod"
ENVIRONMENTS = ("staging", PRODUCTION)
DRIFT_STRENGTH = 0.8
CARD_SHARE = 0.2  # share of single requests scored by card id through the online store
CARD_TRAFFIC = 600  # requests of a phase sent one at a time; the rest go in batches
BATCH = 500  # transactions per /predict_batch request
MARKER = ".loopform-workdir"


@dataclass
class Summary:
    """What the loop did, for the closing report and for tests."""

    workdir: Path
    tracking_uri: str
    versions: list[int] = field(default_factory=list)
    production_version: int | None = None
    endpoint: str = ""
    requests: dict[str, int] = field(default_factory=dict)
    monitor: dict[str, dict[str, Any]] = field(default_factory=dict)
    reports: list[str] = field(default_factory=list)
    payload_rows: int = 0
    release: dict[str, Any] = field(default_factory=dict)
    """The signed production record (the last one released)."""
    refusals: list[str] = field(default_factory=list)
    """Why a retrained version did not reach production (a gate's refusal), if it did not."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir),
            "tracking_uri": self.tracking_uri,
            "versions": self.versions,
            "production_version": self.production_version,
            "endpoint": self.endpoint,
            "requests": self.requests,
            "monitor": self.monitor,
            "reports": self.reports,
            "payload_rows": self.payload_rows,
            "refusals": self.refusals,
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
        # The repository's own gates of this environment, unlowered (prod: only after a signed staging release).
        platform["gates"] = read_stack_file(root / "stacks" / f"Pulumi.{env}.yaml")["config"][CONFIG_KEY]["gates"]
        text = f"# Local {env} environment of `loopform up`, made from {stack_path.name}.\n"
        (folder / f"Pulumi.{env}.yaml").write_text(text + yaml.safe_dump({"config": {CONFIG_KEY: platform}}))
    return folder


def signers(workdir: Path, root: Path, stacks: Path) -> dict[str, Any]:
    """The local loop's own release key and, per environment, the policy config that trusts it.

    The configs are the repository's `policies/config/<env>.json` with the local stacks' gate
    thresholds and this key: `loopform check --file <workdir>/stacks/Pulumi.<env>.yaml` finds them.
    """
    from loopform import policy_config, record
    from loopform.promotion import Signer

    key, pem = record.generate_key()
    record.write_key(workdir / "keys" / "release.pem", pem)
    trusted = [record.trusted_key(key, ENVIRONMENTS)]
    found = {}
    for env in ENVIRONMENTS:
        base = json.loads((root / "policies" / "config" / f"{env}.json").read_text())
        gates = load_stack(stacks / f"Pulumi.{env}.yaml").gates
        config = policy_config.for_environment(base, env, gates, trusted)
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


def up(stack_path: Path, root: Path, echo: Callable[[str], None] = print) -> Summary:
    """Run the whole loop; returns the summary (raises on any failed step, with the reason)."""
    spec = load_stack(stack_path, root)
    local = spec.local
    model = sorted(spec.models)[0]
    workdir = fresh_workdir((root / local.workdir).resolve(), root)
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    payload_uri = str(workdir / "payloads")
    stacks = environment_stacks(stack_path, workdir, root)
    keys = signers(workdir, root, stacks)
    summary = Summary(workdir=workdir, tracking_uri=tracking_uri)
    progress = Progress(total=10 + 2 * len(PIPELINE), echo=echo)
    echo(f"loopform up --stack {spec.environment}: model {model!r}, everything under {workdir}")

    from loopform import data
    from loopform.steps import StepContext, ingest

    now = datetime.now(UTC).replace(microsecond=0)

    def context(run: str) -> StepContext:
        return StepContext(
            model=model,
            spec=spec,
            run_dir=workdir / "runs" / run,
            tracking_uri=tracking_uri,
            feature_repo=workdir / "feast",
            root=root,
            stack_files=stacks,
            seed=local.seed,
            now=datetime.now(UTC),
            signer=keys["staging"],
        )

    first = context("run-1")
    history_start = now - timedelta(days=30 + 1 + local.drift_days)
    with progress.phase(f"generate {local.rows} labelled transactions (30 days, seed {local.seed})"):
        history = data.generate(local.rows, local.seed, start=history_start, days=30)
        progress.note(f"fraud rate {history[data.LABEL].mean():.3f}, {history[data.ENTITY].nunique()} cards")
    with progress.phase("Feast: validate and write the first batch, apply definitions, materialise the online store"):
        ingest(first, history)
        repo = first.repo()
        progress.note("applied " + ", ".join(repo.apply()))
        repo.materialize(end=now)

    summary.versions.append(_pipeline(first, progress))
    with progress.phase(f"promote version {summary.versions[0]} to {PRODUCTION} through its gates"):
        released = summary.release = _promote(first, summary.versions[0], keys[PRODUCTION], root, progress)
        summary.production_version = summary.versions[0]

    clean_from = now - timedelta(days=1 + local.drift_days)
    traffic = data.generate(local.traffic, local.seed + 100, start=clean_from, days=1)
    drifted = _drifted(local.drift, local.drift_rows, local.seed + 200, now, days=local.drift_days)
    server = _server(root, workdir, tracking_uri, released, local.serve_port)
    with progress.phase(f"serve {model} version {released['version']} with BentoML on {server.url}"):
        server.start()
        summary.endpoint = server.url
    try:
        clean_start = datetime.now(UTC)
        with progress.phase(f"send {local.traffic} requests of live traffic (1 day)"):
            summary.requests["clean"] = _send(server.url, traffic, repo)
        drift_start = datetime.now(UTC)
        with progress.phase(
            f"send {local.drift_rows} transactions of drifted traffic ({local.drift} drift, {local.drift_days} days)"
        ):
            summary.requests["drifted"] = _send(server.url, drifted, repo)
    finally:
        server.stop()  # graceful: the service drains its payload log
    summary.payload_rows = _payload_rows(payload_uri, model)

    reference = first.run_dir / "reference.parquet"
    with progress.phase("drift monitor on the live-traffic window"):
        summary.monitor["clean"] = _monitor(first, reference, payload_uri, clean_start, drift_start, workdir)
        progress.note(_monitor_line(summary.monitor["clean"]))
    with progress.phase("drift monitor on the drifted window"):
        summary.monitor["drifted"] = _monitor(first, reference, payload_uri, drift_start, None, workdir)
        progress.note(_monitor_line(summary.monitor["drifted"]))
    if summary.monitor["drifted"]["triggered"]:
        served = {"live": traffic, "drifted": drifted}
        _retrain(context("run-2"), workdir, summary, progress, served, payload_uri, keys[PRODUCTION])
    else:
        progress.note(f"no retraining: the monitor saw no drift crossing the threshold ({local.drift} drift injected)")

    # Each run's gate reports and the monitor's (MLflow keeps its own copies of the gate reports).
    summary.reports = sorted(str(p) for folder in ("runs", "monitor") for p in (workdir / folder).rglob("*.html"))
    (workdir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2, default=str))
    _print_summary(summary, model, echo)
    return summary


def _retrain(
    ctx: Any, workdir: Path, summary: Summary, progress: Progress, served: Any, payload_uri: str, signer: Any
) -> None:
    """What the trigger starts: the served traffic whose labels have arrived, validated in; the pipeline on the
    window that now ends with it; the gated promotion. A refusal at any gate is reported, and production stays."""
    from loopform.ingest import BatchRefused
    from loopform.monitor import FileTrigger
    from loopform.promotion import PromotionError
    from loopform.steps import StepFailed, ingest

    trigger = FileTrigger(workdir / "triggers")
    with progress.phase("retraining trigger: ingest the served traffic whose labels have arrived, materialise"):
        pending = trigger.pending(ctx.model)
        for path in pending:
            progress.note(f"handling {path.name}")
            trigger.acknowledge(path)
        delay = parse_duration(ctx.spec.local.label_delay)
        for name, frame in served.items():
            labelled = labelled_traffic(frame, payload_uri, ctx.model, delay)
            progress.note(
                f"{name}: {len(labelled)} of {len(frame)} served transactions labelled "
                f"(labels arrive {ctx.spec.local.label_delay} after each transaction)"
            )
            # Live traffic must pass on its own; the drifted traffic is the shift the trigger saw, accepted as such.
            reason = f"retraining trigger {pending[0].name if pending else 'by hand'}" if name == "drifted" else None
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
            summary.versions.append(int(ctx.read_json("release.json")["version"]))
        summary.refusals.append(str(error))
        progress.note(f"REFUSED, version {summary.production_version} stays in production: {error}")
        return
    summary.versions.append(version)
    with progress.phase(f"promote version {version} to {PRODUCTION} through its gates"):
        try:
            summary.release = _promote(ctx, version, signer, ctx.root, progress)
        except PromotionError as error:
            summary.refusals.append(str(error))
            progress.note(f"REFUSED, version {summary.production_version} stays in production:\n{error}")
            return
        summary.production_version = version


def labelled_traffic(served: Any, payload_uri: str, model: str, delay: timedelta) -> Any:
    """The served transactions (in the payload log) whose labels have arrived: event time + delay <= now."""
    from loopform import data

    logged = set(_payloads(payload_uri, model)["transaction_id"].dropna())
    arrived = served[data.TIMESTAMP] + delay <= datetime.now(UTC)
    return served[served[data.ID].isin(logged) & arrived].reset_index(drop=True)


def _pipeline(ctx: Any, progress: Progress) -> int:
    """Every declared step, in order, in-process; returns the registered version."""
    for number, step in enumerate(PIPELINE, 1):
        with progress.phase(f"pipeline {ctx.run_dir.name} step {number}/{len(PIPELINE)}: {step.name}"):
            step.load()(ctx)
    release = ctx.read_json("release.json")
    evaluation = ctx.read_json("evaluation.json")
    # The staging release the last step recorded becomes the workdir's staging stack file.
    shutil.copyfile(ctx.run_dir / "Pulumi.staging.yaml", ctx.stack_files / "Pulumi.staging.yaml")
    progress.note(
        f"version {release['version']}: AUC {evaluation['auc']:.3f}, precision {evaluation['precision']:.3f}, "
        f"recall {evaluation['recall']:.3f}, champion {_champion(evaluation)}"
    )
    return int(release["version"])


def _champion(evaluation: dict[str, Any]) -> str:
    if evaluation.get("champion_version") is None:
        return "none yet"
    return f"version {evaluation['champion_version']} AUC {evaluation['champion_auc']:.3f} on the same holdout"


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


def _drifted(kind: str, rows: int, seed: int, now: datetime, days: int = 1) -> Any:
    from loopform import data

    start = now - timedelta(days=days)
    if kind == "label":
        return data.generate(rows, seed, start=start, days=days, label_shift=0.1)
    strength = DRIFT_STRENGTH if kind == "covariate" else 0.0
    return data.generate(rows, seed, start=start, days=days, covariate_drift=strength)


def _server(root: Path, workdir: Path, tracking_uri: str, release: dict[str, Any], port: int) -> Any:
    from loopform.serving import BentoServer

    env = {**serve_env(workdir, tracking_uri, release), "MLFLOW_DISABLE_TELEMETRY": "true"}
    return BentoServer(
        "bentos.fraud.service:FraudService", working_dir=root, env=env, port=port, log_path=workdir / "serve.log"
    )


def serve_env(workdir: Path, tracking_uri: str, release: dict[str, Any]) -> dict[str, str]:
    """What the local service needs: the signed release (version and artifacts digest), its online store and
    where payloads go."""
    from loopform.record import release_env

    return {
        "LOOPFORM_TRACKING_URI": tracking_uri,
        **release_env(release),
        "LOOPFORM_FEAST_REPO": str(workdir / "feast"),
        "LOOPFORM_PAYLOAD_URI": str(workdir / "payloads"),
        "BENTOML_HOME": str(workdir / "bentoml"),
    }


def _send(url: str, frame: Any, repo: Any) -> int:
    """POST the transactions: the first `CARD_TRAFFIC` one at a time (a share by card id), the rest in batches.

    By card id the request carries the transaction's own fields and the service reads the card's
    aggregates online, written there just before (as a streaming feature pipeline does on arrival),
    so what is served is what training will join to the transaction.
    """
    import httpx

    from loopform import data

    answered = 0
    rows = frame.to_dict(orient="records")
    with httpx.Client(base_url=url, timeout=60.0) as client:
        for index, row in enumerate(rows[:CARD_TRAFFIC]):
            body = {"transaction_id": row[data.ID], **{name: _plain(row[name]) for name in data.FEATURE_NAMES}}
            if index % round(1 / CARD_SHARE) == 0:
                repo.write_online(frame.iloc[[index]])
                own = {name: body[name] for name in ("transaction_id", *data.TRANSACTION_FEATURES)}
                response = client.post("/predict_card", json={data.ENTITY: int(row[data.ENTITY]), **own})
            else:
                response = client.post("/predict", json=body)
            response.raise_for_status()
            answered += 1
        for start in range(CARD_TRAFFIC, len(rows), BATCH):
            batch = [
                {"transaction_id": row[data.ID], **{name: _plain(row[name]) for name in data.FEATURE_NAMES}}
                for row in rows[start : start + BATCH]
            ]
            response = client.post("/predict_batch", json={"transactions": batch})
            response.raise_for_status()
            answered += len(response.json())
    return answered


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _monitor(
    ctx: Any, reference: Path, payload_uri: str, since: datetime, until: datetime | None, workdir: Path
) -> dict:
    from loopform.monitor import FileTrigger, run_monitor

    result = run_monitor(
        ctx.model,
        reference=reference,
        payload_uri=payload_uri,
        since=since,
        until=until or datetime.now(UTC),
        gates=ctx.spec.gates,
        report_dir=workdir / "monitor",
        min_rows=ctx.spec.monitoring.min_rows,
        trigger=FileTrigger(workdir / "triggers"),
    )
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


def _payload_rows(payload_uri: str, model: str) -> int:
    return len(_payloads(payload_uri, model))


def _print_summary(summary: Summary, model: str, echo: Callable[[str], None]) -> None:
    echo("")
    echo("The loop closed:")
    echo(
        f"  model versions       {summary.versions} in MLflow; production alias -> version {summary.production_version}"
    )
    echo(f"  requests answered    {summary.requests}; payload log rows: {summary.payload_rows}")
    for refusal in summary.refusals:
        echo(f"  REFUSED              {refusal.splitlines()[0]}")
        for line in refusal.splitlines()[1:]:
            echo(f"                       {line.strip()}")
    for phase, result in summary.monitor.items():
        echo(f"  monitor ({phase:<7})    {_monitor_line(result)}")
    echo(f"  reports              {len(summary.reports)} HTML reports (gate reports also in each MLflow run):")
    for report in summary.reports:
        echo(f"                       {report}")
    echo(f"  endpoint             {summary.endpoint} (stopped; serve again with:")
    for name, value in serve_env(summary.workdir, summary.tracking_uri, summary.release).items():
        echo(f"                       {name}={value} \\")
    echo("                       .venv/bin/bentoml serve bentos.fraud.service:FraudService)")
    echo(f"  MLflow UI            .venv/bin/mlflow ui --backend-store-uri {summary.tracking_uri}")
