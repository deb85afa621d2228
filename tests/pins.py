"""Stacks pinned by digest for tests: stand-in digests for every image a stack runs, written by `pin`.

The digests are made up (a hash of each reference); only a release can resolve real ones. A test that needs a
prod the policy pack admits pins it with these, as the release workflow's `loopform pin-images` would.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from loopform.images import pin, unpinned
from loopform.spec import IMAGE_REGISTRY, IMAGE_TAG, load_stack, stack_file


def digest(reference: str) -> str:
    return "sha256:" + hashlib.sha256(reference.encode()).hexdigest()


#: The image a prod release records once prod is pinned: `services.image` by digest, as `loopform promote` names it.
SERVING_IMAGE = f"{IMAGE_REGISTRY}/serving:{IMAGE_TAG}@{digest(f'{IMAGE_REGISTRY}/serving:{IMAGE_TAG}')}"


def digests_for(path: Path) -> dict[str, str]:
    """A stand-in digest for every image the stack at `path` runs by tag, keyed `repository:tag`."""
    return {reference: digest(reference) for reference in unpinned(load_stack(path))}


def pinned_text(path: Path | None = None, env: str = "prod") -> str:
    """The stack file's text (default: the shipped `env` stack) with every image pinned by a stand-in digest."""
    path = path or stack_file(env)
    return pin(path.read_text(), load_stack(path), digests_for(path))


def write_pinned(folder: Path, env: str = "prod") -> Path:
    """`<folder>/stacks/Pulumi.<env>.yaml`: the shipped stack, pinned."""
    target = folder / "stacks" / f"Pulumi.{env}.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(pinned_text(env=env))
    return target
