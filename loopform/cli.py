"""The `loopform` command line.

Start-up stays light: each command imports what it needs (Pulumi for render, MLflow and
torch for the runtime) only when it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from loopform.extras import RUNTIME_COMMANDS, missing_runtime, require_runtime
from loopform.spec import ProjectNotFound, SpecError, load_stack, repo_root, stack_file

Handler = Callable[[argparse.Namespace], int]


def _stack_path(args: argparse.Namespace) -> Path:
    return Path(args.file) if getattr(args, "file", None) else stack_file(args.stack, Path(args.root))


def cmd_render(args: argparse.Namespace) -> int:
    """Render the stack's resources offline and write them as YAML."""
    path = _stack_path(args)
    spec = load_stack(path, Path(args.root))  # a bad spec is reported before Pulumi starts
    if spec.is_local:
        raise UsageError(
            f"stack {args.stack} has cluster.kind none and declares nothing: `loopform up --stack {args.stack}` runs it"
        )
    from loopform import render

    root = Path(args.root)
    out = Path(args.out) if args.out else root / "rendered" / args.stack
    render.claim_output(out, root)  # before the render's seconds: refuses a folder it did not create
    resources = render.render_stack(args.stack, root, path)
    paths = render.write_output(render.rendered_files(resources), out, root)
    rows = [
        (r.kind, r.name, str((r.inputs.get("metadata") or {}).get("namespace") or r.inputs.get("namespace") or "-"))
        for r in resources
        if r.is_kubernetes_object or r.is_chart
    ]
    _table(("KIND", "NAME", "NAMESPACE"), sorted(rows))
    components = sum(1 for r in resources if not r.custom)
    print(f"\n{len(rows)} resources in {components} components written to {out} ({len(paths) - 1} files + _tree.txt)")
    from loopform.prerequisites import report

    print(f"\n{report(spec)}")
    problems = render.check_references(resources, spec)
    if problems:
        print(f"error: {len(problems)} object(s) would not start on the cluster:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    if spec.gitops.enabled:
        # The repository's GitOps folder only by default; with --out, beside the rendered files.
        services_out = Path(args.services_out or out / "services") if args.services_out or args.out else None
        services = render.write_services_to(args.stack, root, services_out, path)
        where = services_out or root / spec.gitops.path / args.stack
        print(f"{len(services)} model-service manifests written to {where} (synced by Argo CD)")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Run the policy pack offline over the stack's resources and the GitOps folder (exit 1 on a mandatory one)."""
    path = _stack_path(args)
    spec = load_stack(path, Path(args.root))
    if spec.is_local:
        raise UsageError(
            f"stack {args.stack} has cluster.kind none and declares nothing: `loopform up --stack {args.stack}` runs it"
        )
    from loopform.check import CheckError, check, format_violations

    try:
        result = check(
            args.stack,
            Path(args.root),
            Path(args.file) if args.file else None,
            policy_config=Path(args.policy_config) if args.policy_config else None,
            pack_dir=Path(args.policy_pack) if args.policy_pack else None,
        )
    except CheckError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"policy config: {result.config_path}")
    for line in format_violations(result.violations):
        print(line)
    print(result.summary())
    return 1 if result.mandatory else 0


def cmd_diff(args: argparse.Namespace) -> int:
    """Preview offline what the working tree changes in a stack against a git ref, as a pull-request comment.

    Exit 0 whatever the policy verdict says (the comment reports it; `loopform check` is the gate).
    """
    from loopform.diff import DiffError, diff, to_markdown, to_text

    try:
        report = diff(args.stack, Path(args.root), args.base)
    except DiffError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = to_text(report) if args.format == "text" else to_markdown(report, args.limit)
    if args.out:
        Path(args.out).write_text(text)
        print(f"diff of stack {args.stack} against {args.base} written to {args.out} ({len(text):,} characters)")
    else:
        print(text, end="")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a stack file against the spec without rendering anything."""
    path = _stack_path(args)
    spec = load_stack(path, Path(args.root))
    print(f"{path}: valid spec for environment {spec.environment!r} ({len(spec.models)} models)")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check the stack's cluster prerequisites against the cluster of the kubeconfig."""
    spec = load_stack(_stack_path(args), Path(args.root))
    from loopform import doctor

    try:
        return doctor.doctor(spec, kubeconfig=args.kubeconfig, context=args.context)
    except doctor.DoctorError as error:
        raise UsageError(str(error)) from None


def cmd_ingest(args: argparse.Namespace) -> int:
    """Admit a batch of labelled events into the stack's offline store, after its own checks (exit 1: refused)."""
    from loopform.ingest import BatchRefused, ingest_batch, read_batch, synthetic_batch
    from loopform.local import local_feature_repo
    from loopform.model_code import ModelCode
    from loopform.steps import LABELS_FILE, StepFailed

    spec = load_stack(_stack_path(args), Path(args.root))
    if (args.path is None) == (args.synthetic is None):
        raise UsageError("give a FILE of labelled events (.parquet or .csv) or --synthetic ROWS, not both")
    model = args.model or (next(iter(spec.models)) if len(spec.models) == 1 else None)
    if model is None:
        raise UsageError(f"stack {args.stack} has several models: name one with --model ({', '.join(spec.models)})")
    if model not in spec.models:
        raise UsageError(f"stack {args.stack} declares no model {model!r} (declared: {', '.join(spec.models)})")
    offline_uri, feature_repo = args.offline_uri, None
    if offline_uri is None and spec.is_local:
        # The local loop's own store: the Feast repo `loopform up` made under local.workdir.
        feature_repo = local_feature_repo(spec, Path(args.root), model)
        if not (feature_repo / "data" / LABELS_FILE).exists():
            raise UsageError(
                f"no local offline store at {feature_repo / 'data'}: run `loopform up --stack {args.stack}` first "
                "(it makes the store), or name one with --offline-uri"
            )
    elif offline_uri is None:
        offline_uri = spec.feature_store.offline_store.data_uri
    code = ModelCode(model, Path(args.root), spec.models[model].path)
    try:
        frame = (
            read_batch(Path(args.path), code.contract)
            if args.path
            else synthetic_batch(code, args.synthetic, args.seed)
        )
        done = ingest_batch(
            spec,
            model,
            frame,
            Path(args.root),
            offline_uri,
            feature_repo=feature_repo,
            accept_shift=args.accept_shift,
            html_report=args.html_report,
        )
    except BatchRefused as refused:
        report = refused.report
        print(f"refused: batch {report.batch_id} ({report.rows} rows) of model {model}", file=sys.stderr)
        print(f"  {report.scope()}", file=sys.stderr)
        for line in report.failure_lines():
            print(f"  FAILED {line}", file=sys.stderr)
        for line in report.accepted_lines():
            print(f"  accepted ({report.accept_shift}) {line}", file=sys.stderr)
        print(f"  quarantined in {refused.quarantine_uri} (rows and report.json)", file=sys.stderr)
        print("  nothing was written to the offline store: fix the batch upstream and send it again", file=sys.stderr)
        return 1
    except StepFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ImportError as error:
        raise UsageError(f"cannot write {offline_uri}: {error} (pip install 'loopform[cluster]')") from None
    report = done.report
    print(f"ingested {done.rows} labelled events of model {model}: {done.total} in the offline store")
    print(f"  {report.scope()}")
    ran = [c.name for c in report.checks if c.skipped is None and c.passed]
    print(f"  passed: {', '.join(ran)}")
    for check in report.checks:
        if check.skipped is not None and report.reference is not None:
            print(f"  {check.name} {check.skipped}")
    for line in report.accepted_lines():
        print(f"  accepted ({report.accept_shift}) {line}")
    print(f"  features: {done.source_uri}\n  labels:   {done.labels_uri}")
    return 0


def cmd_new(args: argparse.Namespace) -> int:
    """Scaffold a model: models/NAME/, bentos/NAME/ and its entries in the local and dev stack files."""
    from loopform.scaffold import ScaffoldError, new_model

    root = Path(args.root)
    try:
        scaffold = new_model(root, args.name, args.task)
    except ScaffoldError as error:
        raise UsageError(str(error)) from None
    for path in scaffold.files:
        print(f"created {path.relative_to(root)}")
    for diff in scaffold.diffs.values():
        print(diff, end="")
    print(
        f"\nmodel {args.name!r} ({args.task}) added. Next: `loopform up --stack local` trains, gates, promotes and "
        f"serves it; `loopform render --stack dev` shows its WorkflowTemplate. Replace models/{args.name}/contract.py, "
        "data.py, model.py and train.py with yours (README: Add your own model)."
    )
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """The whole loop on this machine."""
    import warnings

    from loopform.local import up

    # Third-party noise, not the user's concern: library warnings, MLflow's notices and progress bars.
    # Libraries reset warning filters when imported, so silence the display instead.
    warnings.showwarning = lambda *args, **kwargs: None
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    up(_stack_path(args), Path(args.root))
    return 0


def _tracking_uri(args: argparse.Namespace) -> str:
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise UsageError("set --tracking-uri or MLFLOW_TRACKING_URI (e.g. sqlite:////abs/path/mlflow.db)")
    return uri


def cmd_step(args: argparse.Namespace) -> int:
    """One pipeline step, as an Argo pod runs it."""
    from loopform.features import OFFLINE_URI_ENV
    from loopform.pipeline import step
    from loopform.steps import StepContext, StepFailed

    spec = load_stack(_stack_path(args), Path(args.root))
    if args.model not in spec.models:
        raise UsageError(f"stack {args.stack} declares no model {args.model!r} (declared: {', '.join(spec.models)})")
    declared = step(args.name)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    feature_repo = args.feature_repo or os.environ.get("LOOPFORM_FEATURE_REPO") or str(run_dir.parent / "feast")
    context = StepContext(
        model=args.model,
        spec=spec,
        run_dir=run_dir,
        tracking_uri=args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"),
        feature_repo=Path(feature_repo),
        root=Path(args.root),
        stack_files=_stack_path(args).parent,
        offline_uri=os.environ.get(OFFLINE_URI_ENV),
    )
    try:
        declared.load()(context)
    except StepFailed as error:
        print(f"step {declared.name} failed: {error}", file=sys.stderr)
        return 1
    print(f"step {declared.name} done: outputs in {run_dir}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The serving image's entrypoint: check the release, then become `bentoml serve` of its model's service."""
    from loopform.serve import ServeRefused, serve

    try:
        serve(Path(args.root), args.model, host=args.host, port=args.port)
    except ServeRefused as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


def cmd_promote(args: argparse.Namespace) -> int:
    """Promote a registered version to an environment through its gates, as a signed release record."""
    from loopform import record
    from loopform.promotion import PromotionError, Signer, promote

    root = Path(args.root)
    path = stack_file(args.to, root)
    try:
        key = record.load_key(Path(args.signing_key) if args.signing_key else None)
    except (OSError, record.RecordError) as error:
        raise UsageError(str(error)) from None
    policy = Path(args.policy_config) if args.policy_config else root / "policies" / "config" / f"{args.to}.json"
    try:
        release = promote(
            args.model,
            args.version,
            args.to,
            tracking_uri=_tracking_uri(args),
            stack_path=path,
            signer=Signer(key, policy),
            image=args.image,
        )
    except PromotionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"promoted {args.model} version {release.version} to {args.to}: release record signed by key "
        f"{release.key_id} written to {path}"
    )
    spec = load_stack(path)
    if spec.gitops.enabled:
        from loopform.render import write_services

        written = write_services(args.to, root)
        print(f"{len(written)} model-service manifests written to {spec.gitops.path}/{args.to}: commit both for review")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    """Create a release key pair; print the entry that trusts its public key in a policy config."""
    import json

    from loopform import record

    out = Path(args.out)
    if out.exists():
        raise UsageError(f"{out} exists: a release key is never overwritten (choose another path)")
    key, pem = record.generate_key()
    record.write_key(out, pem)
    entry = {**record.trusted_key(key, args.env or ["staging", "prod"]).to_dict()}
    if args.owner:
        entry["owner"] = args.owner
    print(f"private key written to {out} (mode 600): keep it in your secret store, never in the repository")
    print('add this to "trusted_keys" of "release-signed" in policies/config/<env>.json:')
    print(json.dumps(entry, indent=2))
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    """List the images the stack runs, as it runs them; `--unpinned`: those by tag alone, one per line."""
    from loopform.images import unpinned

    spec = load_stack(_stack_path(args), Path(args.root))
    if args.unpinned:
        for image in unpinned(spec):  # nothing at all when every image is pinned
            print(image)
    else:
        images = spec.images()
        width = max(map(len, images))
        print("\n".join(f"{key:<{width}}  {image}" for key, image in images.items()))
    return 0


def cmd_pin_images(args: argparse.Namespace) -> int:
    """Pin the stack's images to the digests a release pushed, so the environment runs exactly that build."""
    from loopform.images import pin_images, read_digests

    path = _stack_path(args)
    diff = pin_images(path, read_digests(Path(args.digests)), Path(args.root))
    print(diff or f"{path}: its images are already pinned to these digests")
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    """Drift of the production version's recent payloads against its training data; may trigger retraining."""
    from datetime import UTC, datetime

    from prometheus_client import CollectorRegistry

    from loopform.model_code import ModelCode
    from loopform.monitor import (
        CallerPolicy,
        FileTrigger,
        production_reference,
        push_metrics,
        run_monitor,
        write_metrics,
    )

    spec = load_stack(_stack_path(args), Path(args.root))
    if args.model not in spec.models:
        raise UsageError(f"stack {args.stack} declares no model {args.model!r} (declared: {', '.join(spec.models)})")
    contract = ModelCode(args.model, Path(args.root), spec.models[args.model].path).contract
    try:
        callers = CallerPolicy(tuple(args.caller or ()), args.include_anonymous, args.max_caller_share)
    except ValueError as error:
        raise UsageError(f"--max-caller-share: {error}") from None
    report_dir = Path(args.report_dir)
    version = None
    sha256 = args.reference_sha256
    if args.reference:
        reference: Path = Path(args.reference)
    else:
        # The release's stored reference profile (its digest sealed in the evidence), or, for a release
        # registered before profiles were stored, its training data.
        try:
            reference, sha256, version = production_reference(_tracking_uri(args), args.model, report_dir)
        except LookupError as error:
            raise UsageError(f"{error}; pass --reference") from None
    payload_uri = args.payload_uri or spec.monitoring.payload_uri
    registry = CollectorRegistry()
    try:
        result = run_monitor(
            args.model,
            contract=contract,
            reference=reference,
            payload_uri=payload_uri,
            gates=spec.gates_for(args.model),
            window=spec.monitoring.window,
            until=datetime.now(UTC),
            min_rows=spec.monitoring.min_rows,
            report_dir=report_dir,
            registry=registry,
            trigger=FileTrigger(report_dir / "triggers"),
            version=version,
            reference_sha256=sha256,
            callers=callers,
        )
    except ImportError as error:
        raise UsageError(f"cannot read {payload_uri}: {error} (pip install 'loopform[cluster]')") from None
    if args.metrics_file:
        write_metrics(args.metrics_file, registry)
    if args.push_gateway:
        push_metrics(args.push_gateway, registry, args.model)
    print(result.message)
    return 3 if result.triggered else 0


class UsageError(Exception):
    """A command used wrongly; the message says how to use it."""


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopform", description="The ML data loop as infrastructure.")
    parser.add_argument(
        "--root",
        help="project root (default: $LOOPFORM_ROOT, else the nearest folder with Pulumi.yaml at or above the "
        "current directory)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def stack_args(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--stack", required=True, help="stack name: reads stacks/Pulumi.<stack>.yaml")
        sub.add_argument("--file", help="read this stack file instead of stacks/Pulumi.<stack>.yaml")

    render = commands.add_parser("render", help="render the stack's resources offline (no CLI, no cluster)")
    stack_args(render)
    render.add_argument(
        "--out",
        help="output folder: new, empty, or one render wrote before, never one of the repository's own "
        "(default: rendered/<stack>)",
    )
    render.add_argument(
        "--services-out",
        help="model-service manifests for Argo CD (default: <out>/services with --out, else <gitops.path>/<stack>)",
    )
    render.set_defaults(handler=cmd_render)

    check = commands.add_parser(
        "check", help="run the policy pack offline over the stack and its GitOps folder (exit 1: a mandatory one)"
    )
    stack_args(check)
    check.add_argument(
        "--policy-config",
        help="policy config JSON (default: <file's dir>/../policy/<stack>.json beside --file, else "
        "policies/config/<stack>.json)",
    )
    check.add_argument("--policy-pack", help="policy pack folder (default: policies)")
    check.set_defaults(handler=cmd_check)

    diff = commands.add_parser(
        "diff",
        help="preview offline what the working tree changes in a stack against a git ref: promotions, resources, "
        "policy verdict (Markdown for a pull request)",
    )
    diff.add_argument("--stack", required=True, help="stack name: compares stacks/Pulumi.<stack>.yaml's renders")
    diff.add_argument("--base", required=True, metavar="REF", help="git branch, tag or commit to compare with")
    diff.add_argument(
        "--format", choices=["markdown", "text"], default="markdown", help="markdown (default, cut to one comment)"
    )
    diff.add_argument("--out", metavar="FILE", help="write the diff here instead of standard output")
    diff.add_argument(
        "--limit",
        type=int,
        default=65_536,
        metavar="CHARS",
        help="most characters of the Markdown, cut at whole entries (default: 65536, one pull-request comment)",
    )
    diff.set_defaults(handler=cmd_diff)

    validate = commands.add_parser("validate", help="check a stack file against the spec")
    stack_args(validate)
    validate.set_defaults(handler=cmd_validate)

    doctor = commands.add_parser(
        "doctor", help="check the stack's cluster prerequisites with your kubeconfig (exit 1 when one is missing)"
    )
    stack_args(doctor)
    doctor.add_argument("--context", help="kubeconfig context (default: cluster.kube_context, else the current one)")
    doctor.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, else ~/.kube/config)")
    doctor.set_defaults(handler=cmd_doctor)

    new = commands.add_parser("new", help="scaffold a model that renders, trains, passes its gates and serves")
    kinds = new.add_subparsers(dest="kind", required=True, metavar="KIND")
    new_model = kinds.add_parser("model", help="models/NAME/, bentos/NAME/ and its local and dev stack entries")
    new_model.add_argument("name", help="model name: lowercase letters and digits, starting with a letter")
    new_model.add_argument("--task", required=True, choices=["classification", "regression"])
    new_model.set_defaults(handler=cmd_new)

    seed = commands.add_parser(
        "ingest",
        help="check a batch of labelled events on its own, then append it to the stack's offline store "
        "(exit 1: refused and quarantined, the store unchanged)",
    )
    seed.add_argument("path", nargs="?", help="labelled events: a .parquet or .csv file with the model's columns")
    stack_args(seed)
    seed.add_argument("--model", help="model whose data it is (default: the stack's only model)")
    seed.add_argument("--synthetic", type=int, metavar="ROWS", help="a demo batch from the generator instead of a file")
    seed.add_argument("--seed", type=int, default=7, help="seed of --synthetic (default: 7)")
    seed.add_argument(
        "--offline-uri",
        help="offline store folder (default: feature_store.offline_store.data_uri of the stack; for a local "
        "stack, the store `loopform up` made under local.workdir)",
    )
    seed.add_argument(
        "--accept-shift",
        metavar="REASON",
        help="let failed checks against the stored reference (label shift, drift, OOD) pass, for this reason "
        "(the world changed, not the pipeline); structural checks and id conflicts still refuse",
    )
    seed.add_argument(
        "--html-report",
        action="store_true",
        help="also write the data summary report of a refused batch into its quarantine folder",
    )
    seed.set_defaults(handler=cmd_ingest)

    up = commands.add_parser("up", help="run the whole data loop on this machine (use --stack local)")
    stack_args(up)
    up.set_defaults(handler=cmd_up)

    run_step = commands.add_parser("step", help="run one pipeline step (the container entrypoint)")
    run_step.add_argument("name", help="validate-data, get-features, train, evaluate, register, promote-to-staging")
    stack_args(run_step)
    run_step.add_argument("--model", required=True)
    run_step.add_argument("--run-dir", required=True, help="folder the steps pass state through")
    run_step.add_argument(
        "--feature-repo", help="Feast repo folder (default: $LOOPFORM_FEATURE_REPO or <run-dir>/../feast)"
    )
    run_step.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    run_step.set_defaults(handler=cmd_step)

    serve = commands.add_parser(
        "serve", help="serve a released model version with BentoML (the serving image's entrypoint; exit 1: refused)"
    )
    serve.add_argument(
        "model",
        nargs="?",
        help="model to serve (default: the one $LOOPFORM_MODEL_URI names; without that variable, MODEL@production)",
    )
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    serve.add_argument("--port", type=int, default=3000, help="port to listen on (default: 3000)")
    serve.set_defaults(handler=cmd_serve)

    promote = commands.add_parser("promote", help="promote a model version to an environment through its gates")
    promote.add_argument("model")
    promote.add_argument("version", type=int)
    promote.add_argument("--to", required=True, help="environment: stacks/Pulumi.<env>.yaml gets the release")
    promote.add_argument(
        "--image", help="service image, name:tag or name[:tag]@sha256:<digest> (default: the stack's services.image)"
    )
    promote.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    promote.add_argument(
        "--signing-key",
        help="Ed25519 private key (PEM) that signs the record (default: $LOOPFORM_SIGNING_KEY, "
        "a PEM text, or $LOOPFORM_SIGNING_KEY_FILE, a path)",
    )
    promote.add_argument(
        "--policy-config",
        help="policy config whose trusted keys judge the record (default: policies/config/<env>.json)",
    )
    promote.set_defaults(handler=cmd_promote)

    keygen = commands.add_parser("keygen", help="create a release key pair; print its trusted-key entry")
    keygen.add_argument("--out", required=True, help="where to write the private key (never in the repository)")
    keygen.add_argument(
        "--env", action="append", help="environment the key may release to (repeatable; default: staging and prod)"
    )
    keygen.add_argument("--owner", help="who holds the key, recorded in the entry for reviewers")
    keygen.set_defaults(handler=cmd_keygen)

    images = commands.add_parser("images", help="list the images the stack runs (digest lock applied)")
    stack_args(images)
    images.add_argument(
        "--unpinned", action="store_true", help="only those run by tag alone, as repository:tag (what to resolve)"
    )
    images.set_defaults(handler=cmd_images)

    pin = commands.add_parser(
        "pin-images", help="write a release's digests into the stack's digest lock (image_digests); print the diff"
    )
    stack_args(pin)
    pin.add_argument(
        "--digests",
        required=True,
        metavar="FILE",
        help='JSON mapping images to digests: repository:tag for any image ({"prom/pushgateway:v1.11.1": '
        '"sha256:..."}), the repository alone for one this checkout builds ({"ghcr.io/loopform/pipeline": '
        '"sha256:..."}, as .github/workflows/images.yml writes them)',
    )
    pin.set_defaults(handler=cmd_pin_images)

    monitor = commands.add_parser("monitor", help="drift of recent payloads; exit 3 when retraining is triggered")
    monitor.add_argument("model")
    stack_args(monitor)
    monitor.add_argument(
        "--reference",
        help="reference: training data (Parquet) or a stored profile (.npz, with --reference-sha256); "
        "default: the production version's stored profile",
    )
    monitor.add_argument("--reference-sha256", help="sha256 a --reference profile must have")
    monitor.add_argument("--payload-uri", help="payload log (default: monitoring.payload_uri)")
    monitor.add_argument(
        "--report-dir",
        default=".loopform/monitor",
        help="where reports, results and triggers go (default: .loopform/monitor)",
    )
    monitor.add_argument("--metrics-file", help="write the Prometheus gauges here (textfile collector format)")
    monitor.add_argument(
        "--push-gateway", help="push the Prometheus gauges to this Pushgateway (URL), grouped by model"
    )
    monitor.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    monitor.add_argument(
        "--caller",
        action="append",
        metavar="NAME",
        help="read only this authenticated caller's payload rows (repeatable; default: every authenticated caller)",
    )
    monitor.add_argument(
        "--include-anonymous",
        action="store_true",
        help="also read rows of anonymous traffic and rows without a caller (left out by default)",
    )
    monitor.add_argument(
        "--max-caller-share",
        type=float,
        metavar="F",
        help="cap each caller at this share of the window (0 < F <= 1); fewer than 1/F callers: no decision",
    )
    monitor.set_defaults(handler=cmd_monitor)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.root is None:
        try:
            args.root = str(repo_root())
        except ProjectNotFound as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    handler: Handler = args.handler
    try:
        if args.command in RUNTIME_COMMANDS:
            require_runtime()
        return handler(args)
    except (SpecError, UsageError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as error:
        if (message := missing_runtime(error)) is None:
            raise
        print(f"error: loopform {args.command}: {message}", file=sys.stderr)
        return 2


def run() -> None:
    """The `loopform` command: `main`, then exit without the collector walking what the command left behind.

    A render of hundreds of models leaves millions of objects; freezing them spares the interpreter's exit about
    two seconds (bench/iac.py). Not in `main`, which tests call in-process."""
    import gc

    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
