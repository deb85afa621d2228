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

from loopform.pipeline import PIPELINE
from loopform.spec import CONFIG_KEY, load_stack, read_stack_file

PRODUCTION = "prod"
ENVIRONMENTS = ("staging", PRODUCTION)
DRIFT_STRENGTH = 0.8
CARD_SHARE = 0.2  # share of requests scored by card id through the online store
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
    """The signed production record that was served first."""

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


def environment_stacks(stack_path: Path, workdir: Path) -> Path:
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
        if env == PRODUCTION:  # as in stacks/Pulumi.prod.yaml: production only after staging
            platform["gates"] = {**platform.get("gates", {}), "require_staging": True}
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
    stacks = environment_stacks(stack_path, workdir)
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
    with progress.phase(f"generate {local.rows} labelled transactions (30 days, seed {local.seed})"):
        history = data.generate(local.rows, local.seed, start=now - timedelta(days=61), days=30)
        progress.note(f"fraud rate {history[data.LABEL].mean():.3f}, {history[data.ENTITY].nunique()} cards")
    with progress.phase("Feast: write the offline source, apply definitions, materialise the online store"):
        ingest(first, history)
        repo = first.repo()
        progress.note("applied " + ", ".join(repo.apply()))
        repo.materialize(end=now)

    summary.versions.append(_pipeline(first, progress))
    with progress.phase(f"promote version {summary.versions[0]} to {PRODUCTION} through its gates"):
        released = summary.release = _promote(first, summary.versions[0], keys[PRODUCTION], root, progress)
        summary.production_version = summary.versions[0]

    server = _server(root, workdir, tracking_uri, released, local.serve_port)
    with progress.phase(f"serve {model}@production with BentoML on {server.url}"):
        server.start()
        summary.endpoint = server.url
    try:
        clean_start = datetime.now(UTC)
        with progress.phase(f"send {local.traffic} requests of live traffic"):
            traffic = data.generate(local.traffic, local.seed + 100, start=now - timedelta(days=1), days=1)
            summary.requests["clean"] = _send(server.url, traffic, history)
        drift_start = datetime.now(UTC)
        with progress.phase(f"send {local.traffic} requests of drifted traffic ({local.drift} drift)"):
            drifted = _drifted(local.drift, local.traffic, local.seed + 200, now)
            summary.requests["drifted"] = _send(server.url, drifted, history)
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
        _retrain(context("run-2"), workdir, summary, progress, local, now, keys[PRODUCTION])
    else:
        progress.note(f"no retraining: the monitor saw no drift crossing the threshold ({local.drift} drift injected)")

    # Each run's gate reports and the monitor's (MLflow keeps its own copies of the gate reports).
    summary.reports = sorted(str(p) for folder in ("runs", "monitor") for p in (workdir / folder).rglob("*.html"))
    (workdir / "summary.json").write_text(json.dumps(summary.to_dict(), indent=2, default=str))
    _print_summary(summary, model, echo)
    return summary


def _retrain(
    ctx: Any, workdir: Path, summary: Summary, progress: Progress, local: Any, now: datetime, signer: Any
) -> None:
    """What the trigger starts: the newest labelled data in, the pipeline, and the gated promotion."""
    from loopform.monitor import FileTrigger
    from loopform.steps import ingest

    trigger = FileTrigger(workdir / "triggers")
    with progress.phase("retraining trigger: ingest the newest labelled data and materialise"):
        for pending in trigger.pending(ctx.model):
            progress.note(f"handling {pending.name}")
            trigger.acknowledge(pending)
        ingest(ctx, _drifted(local.drift, local.rows, local.seed + 1, now, days=30))
        ctx.repo().materialize(end=datetime.now(UTC))
    version = _pipeline(ctx, progress)
    summary.versions.append(version)
    with progress.phase(f"promote version {version} to {PRODUCTION} through its gates"):
        summary.release = _promote(ctx, version, signer, ctx.root, progress)
        summary.production_version = version


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


def _send(url: str, frame: Any, history: Any) -> int:
    """POST each transaction (some by card id through the online store); returns how many were answered."""
    import httpx

    from loopform import data

    known_cards = set(history[data.ENTITY].tolist())
    answered = 0
    with httpx.Client(base_url=url, timeout=30.0) as client:
        for index, row in enumerate(frame.to_dict(orient="records")):
            body = {name: _plain(row[name]) for name in data.FEATURE_NAMES}
            if index % round(1 / CARD_SHARE) == 0 and row[data.ENTITY] in known_cards:
                response = client.post(
                    "/predict_card", json={data.ENTITY: int(row[data.ENTITY]), "amount": body["amount"]}
                )
            else:
                response = client.post("/predict", json=body)
            response.raise_for_status()
            answered += 1
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
    return f"{result['rows']} rows, drift share {share if share is None else round(share, 3)}, drifted: {drifted} -> {verdict}"


def _payload_rows(payload_uri: str, model: str) -> int:
    from loopform.payloads import read_payloads

    return len(read_payloads(payload_uri, model, datetime(2000, 1, 1, tzinfo=UTC), datetime.now(UTC) + timedelta(1)))


def _print_summary(summary: Summary, model: str, echo: Callable[[str], None]) -> None:
    echo("")
    echo("The loop closed:")
    echo(
        f"  model versions       {summary.versions} in MLflow; production alias -> version {summary.production_version}"
    )
    echo(f"  requests answered    {summary.requests}; payload log rows: {summary.payload_rows}")
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
