"""The `loopform` command line.

Start-up stays light: each command imports what it needs (Pulumi for render, MLflow and
torch for the runtime) only when it runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from loopform.spec import SpecError, load_stack, repo_root, stack_file

Handler = Callable[[argparse.Namespace], int]


def _stack_path(args: argparse.Namespace) -> Path:
    return Path(args.file) if getattr(args, "file", None) else stack_file(args.stack, Path(args.root))


def cmd_render(args: argparse.Namespace) -> int:
    """Render the stack's resources offline and write them as YAML."""
    spec = load_stack(_stack_path(args))  # a bad spec is reported before Pulumi starts
    from loopform import render

    root = Path(args.root)
    resources = render.render_stack(args.stack, root)
    out = Path(args.out) if args.out else root / "rendered" / args.stack
    paths = render.write(resources, out)
    rows = [
        (r.kind, r.name, str((r.inputs.get("metadata") or {}).get("namespace") or r.inputs.get("namespace") or "-"))
        for r in resources
        if r.is_kubernetes_object or r.is_chart
    ]
    _table(("KIND", "NAME", "NAMESPACE"), sorted(rows))
    components = sum(1 for r in resources if not r.custom)
    print(f"\n{len(rows)} resources in {components} components written to {out} ({len(paths) - 1} files + _tree.txt)")
    if spec.gitops.enabled:
        services_out = Path(args.services_out) if args.services_out else None
        services = render.write_services(args.stack, root, services_out)
        where = services_out or root / spec.gitops.path / args.stack
        print(f"{len(services)} model-service manifests written to {where} (synced by Argo CD)")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a stack file against the spec without rendering anything."""
    path = _stack_path(args)
    spec = load_stack(path)
    print(f"{path}: valid spec for environment {spec.environment!r} ({len(spec.models)} models)")
    return 0


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loopform", description="The ML data loop as infrastructure.")
    parser.add_argument("--root", default=str(repo_root()), help="repository root (default: this checkout)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def stack_args(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--stack", required=True, help="stack name: reads stacks/Pulumi.<stack>.yaml")
        sub.add_argument("--file", help="read this stack file instead of stacks/Pulumi.<stack>.yaml")

    render = commands.add_parser("render", help="render the stack's resources offline (no CLI, no cluster)")
    stack_args(render)
    render.add_argument("--out", help="output folder (default: rendered/<stack>)")
    render.add_argument("--services-out", help="model-service manifests for Argo CD (default: <gitops.path>/<stack>)")
    render.set_defaults(handler=cmd_render)

    validate = commands.add_parser("validate", help="check a stack file against the spec")
    stack_args(validate)
    validate.set_defaults(handler=cmd_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except SpecError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
