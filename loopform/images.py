"""`loopform pin-images`: a stack's digest lock (`image_digests`) written from the digests a release resolved.

`.github/workflows/images.yml` builds every `images/<name>/Dockerfile`, pushes it to `IMAGE_REGISTRY/<name>`
tagged with the git SHA and the version, and on a release tag opens a pull request with
`loopform pin-images --stack prod` run on the digests it pushed and on those of every upstream image the stack
runs (`loopform images --unpinned`, resolved with `docker buildx imagetools inspect`). A tag can be moved to
other content; a digest cannot, so a pinned stack runs exactly what the release built and reviewed.
"""

from __future__ import annotations

import difflib
import io
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from loopform.image_ref import DIGEST, ImageRef
from loopform.spec import (
    CONFIG_KEY,
    FeatureStoreSpec,
    OrchestratorSpec,
    PlatformSpec,
    RegistrySpec,
    ServicesSpec,
    load_stack,
    parse_spec,
)

if TYPE_CHECKING:
    from ruamel.yaml.comments import CommentedMap

LOCK = "image_digests"


def read_digests(path: Path) -> dict[str, str]:
    """The digests a release resolved: a JSON (or YAML) mapping of image to sha256 digest. An image is named
    `repository:tag` (the digest that tag had), or by repository alone for an image this checkout builds (the
    digest of the build the release tagged; the release workflow writes these)."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"cannot read digests from {path}: {error}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(
            f"{path}: must map images to digests "
            '({"ghcr.io/loopform/pipeline": "sha256:...", "prom/pushgateway:v1.11.1": "sha256:..."})'
        )
    problems = []
    for image, digest in data.items():
        if ImageRef.parse(str(image)).digest:
            problems.append(f"{image}: name the image without a digest (repository, or repository:tag)")
        if not isinstance(digest, str) or not DIGEST.match(digest):
            problems.append(f"{image}: {digest!r} is not a digest (sha256: and 64 lowercase hex digits)")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return {str(image): digest for image, digest in data.items()}


def built(spec: PlatformSpec) -> dict[str, ImageRef]:
    """By repository, what this checkout's release builds: the image fields' defaults (at the stack's MLflow
    version), which point at what `.github/workflows/images.yml` publishes."""
    defaults = PlatformSpec.model_construct(
        environment=spec.environment,
        orchestrator=OrchestratorSpec(),
        registry=RegistrySpec(mlflow_version=spec.registry.mlflow_version),
        services=ServicesSpec(),
        feature_store=FeatureStoreSpec(),
    )
    ours = (
        defaults.orchestrator.pipeline_image,
        defaults.orchestrator.gpu_pipeline_image,
        defaults.registry.server_image,
        defaults.services.image,
    )
    return {ref.repository: ref for ref in map(ImageRef.parse, ours)}


def unpinned(spec: PlatformSpec) -> list[str]:
    """The images the stack runs by tag alone (`loopform images --unpinned`): what a release must resolve."""
    return sorted({str(ref) for ref in map(ImageRef.parse, spec.images().values()) if ref.digest is None})


def pin(text: str, spec: PlatformSpec, digests: Mapping[str, str]) -> str:
    """The stack file's text (whose spec is `spec`) with `digests` written into its lock; comments and layout of
    the rest kept.

    An image named by repository alone is this checkout's build: a field naming another tag of it (an older
    release) moves to the release's tag, since the digest is of that build. Entries of the lock that no image
    of the stack runs any more are dropped.
    """
    from ruamel.yaml.comments import CommentedMap

    from loopform.promotion import _yaml

    releases = built(spec)
    unknown = [image for image in digests if ImageRef.parse(image).tag is None and image not in releases]
    if unknown:
        raise ValueError(
            f"{', '.join(sorted(unknown))}: not built by this checkout (built: {', '.join(sorted(releases))}); "
            "name the tag the digest was resolved from (repository:tag)"
        )
    rt = _yaml()
    document = rt.load(text)
    platform = document["config"][CONFIG_KEY]
    lock = dict(spec.image_digests)
    running: set[str] = set()
    used: set[str] = set()
    # What each field names by itself, without the lock: a digest written into a field is told apart from one
    # the lock adds.
    written = parse_spec({**yaml.safe_load(text)["config"][CONFIG_KEY], LOCK: {}}, "the stack before pinning")
    for key, image in written.images().items():
        ref = ImageRef.parse(image)
        given = ref.repository if ref.repository in digests else ref.tagged
        if given in digests:
            # A field naming another build (an older release), or a digest written into the field, moves to the
            # tag whose digest this is; the lock then pins it. Version fields (Argo) name tags only.
            target = releases[given] if given == ref.repository else replace(ref, digest=None)
            if ref != target:
                _set(platform, tuple(key.split(".")), str(target), spec)
            ref = target
            lock[ref.tagged] = digests[given]
            used.add(given)
        if ref.digest is None:  # the lock applies to it
            running.add(ref.tagged)
    unused = sorted(set(digests) - used)
    if unused:
        raise ValueError(f"{', '.join(unused)}: the stack runs no such image (loopform images lists what it runs)")
    kept = {image: lock[image] for image in sorted(lock) if image in running}
    if kept:
        _insert(platform, LOCK, CommentedMap(kept), list(PlatformSpec.model_fields))
    else:
        platform.pop(LOCK, None)
    buffer = io.StringIO()
    rt.dump(document, buffer)
    return buffer.getvalue()


def _set(mapping: CommentedMap, path: tuple[str, ...], value: str, model: object) -> None:
    """Set the stack key at `path` (sections created as needed, in the spec's order)."""
    from ruamel.yaml.comments import CommentedMap

    head, *rest = path
    order = list(type(model).model_fields)  # type: ignore[attr-defined]
    if not rest:
        _insert(mapping, head, value, order)
        return
    if mapping.get(head) is None:
        _insert(mapping, head, CommentedMap(), order)
    _set(mapping[head], tuple(rest), value, getattr(model, head))


def _insert(mapping: CommentedMap, key: str, value: object, order: list[str]) -> None:
    """Set `key`; a new key goes before the first key that follows it in the spec's order (else last)."""
    if key in mapping:
        mapping[key] = value
        return
    later = order[order.index(key) + 1 :]
    position = next((i for i, existing in enumerate(mapping) if existing in later), len(mapping))
    mapping.insert(position, key, value)


def pin_images(path: Path, digests: Mapping[str, str], root: Path) -> str:
    """Pin the stack file at `path` (`pin`), check the result as `loopform validate` does and that each image
    given a digest now runs by exactly that digest, write it; the unified diff."""
    old = path.read_text()
    new = pin(old, load_stack(path), digests)
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / path.name  # the file name says the environment
        result.write_text(new)
        spec = load_stack(result, root)
    left = []
    for key, image in spec.images().items():
        ref = ImageRef.parse(image)
        given = ref.repository if ref.repository in digests else ref.tagged
        if given in digests and ref.digest != digests[given]:
            left.append(f"{key}: {image}")
    if left:
        raise ValueError(f"{path}: not pinned to the given digests after pinning: {', '.join(left)}")
    path.write_text(new)
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"{path} (before)", str(path)))
