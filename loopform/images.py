"""Image references, and `loopform pin-images`: a stack's images pinned to the digests a release built.

`.github/workflows/images.yml` builds every `images/<name>/Dockerfile`, pushes it to `IMAGE_REGISTRY/<name>`
tagged with the git SHA and the version, and on a release tag opens a pull request with
`loopform pin-images --stack prod` run on the digests it pushed. A tag can be moved to other content; a
digest cannot, so a pinned stack runs exactly what the release built and attested.
"""

from __future__ import annotations

import difflib
import io
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from loopform.spec import (
    CONFIG_KEY,
    FeatureStoreSpec,
    OrchestratorSpec,
    PlatformSpec,
    RegistrySpec,
    ServicesSpec,
    load_stack,
)

if TYPE_CHECKING:
    from ruamel.yaml.comments import CommentedMap

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
#: Left out, feature_store.image is orchestrator.pipeline_image: pinning that pins it.
FALLS_BACK = ("feature_store", "image")


@dataclass(frozen=True)
class ImageRef:
    """An image reference split into repository, tag and digest (`repo:tag@sha256:...`; tag and digest optional)."""

    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, reference: str) -> ImageRef:
        name, _, digest = reference.partition("@")
        # A colon after the last slash starts the tag; one before it is a registry's port (localhost:5000/app).
        colon = name.rfind(":")
        if colon > name.rfind("/"):
            return cls(name[:colon], name[colon + 1 :], digest or None)
        return cls(name, None, digest or None)

    def __str__(self) -> str:
        return self.repository + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def read_digests(path: Path) -> dict[str, str]:
    """The file the release workflow writes: a JSON (or YAML) mapping of image repository to sha256 digest."""
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"cannot read digests from {path}: {error}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(
            f'{path}: must map image repositories to digests ({{"ghcr.io/loopform/pipeline": "sha256:..."}})'
        )
    problems = []
    for repository, digest in data.items():
        ref = ImageRef.parse(str(repository))
        if ref.tag or ref.digest:
            problems.append(f"{repository}: name the repository alone, without tag or digest")
        if not isinstance(digest, str) or not DIGEST.match(digest):
            problems.append(f"{repository}: {digest!r} is not a digest (sha256: and 64 lowercase hex digits)")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return {str(repository): digest for repository, digest in data.items()}


def image_fields(spec: PlatformSpec) -> dict[tuple[str, str], str]:
    """The image each image field of the stack (section, key) runs, defaults and fallbacks applied."""
    return {
        ("orchestrator", "pipeline_image"): spec.orchestrator.pipeline_image,
        ("orchestrator", "gpu_pipeline_image"): spec.orchestrator.gpu_pipeline_image,
        ("registry", "image"): spec.registry.server_image,
        ("services", "image"): spec.services.image,
        FALLS_BACK: spec.feature_store.image or spec.orchestrator.pipeline_image,
    }


def built(spec: PlatformSpec) -> dict[str, ImageRef]:
    """By repository, what this checkout's release builds: the image fields' defaults (at the stack's MLflow
    version), which point at what `.github/workflows/images.yml` publishes."""
    defaults = spec.model_copy(
        update={
            "orchestrator": OrchestratorSpec(),
            "registry": RegistrySpec(mlflow_version=spec.registry.mlflow_version),
            "services": ServicesSpec(),
            "feature_store": FeatureStoreSpec(),
        }
    )
    return {ref.repository: ref for ref in map(ImageRef.parse, image_fields(defaults).values())}


def pin(text: str, spec: PlatformSpec, digests: Mapping[str, str]) -> str:
    """The stack file's text (whose spec is `spec`) with every image field that names or defaults to a repository
    of `digests` set to `repository:tag@digest`; comments and layout of the rest kept.

    The tag is the one this checkout's release gives the repository, since the digest is of that build; a
    repository the defaults do not name keeps its tag.
    """
    from ruamel.yaml.comments import CommentedMap

    from loopform.promotion import _yaml

    releases = built(spec)
    rt = _yaml()
    document = rt.load(text)
    platform = document["config"][CONFIG_KEY]
    for (section, key), image in image_fields(spec).items():
        current = (platform.get(section) or {}).get(key)
        ref = ImageRef.parse(image)
        if (current is None and (section, key) == FALLS_BACK) or ref.repository not in digests:
            continue
        pinned = str(replace(releases.get(ref.repository, ref), digest=digests[ref.repository]))
        if pinned == current:
            continue
        if platform.get(section) is None:
            _insert(platform, section, CommentedMap(), list(PlatformSpec.model_fields))
        _insert(platform[section], key, pinned, list(type(getattr(spec, section)).model_fields))
    buffer = io.StringIO()
    rt.dump(document, buffer)
    return buffer.getvalue()


def _insert(mapping: CommentedMap, key: str, value: object, order: list[str]) -> None:
    """Set `key`; a new key goes before the first key that follows it in the spec's order (else last)."""
    if key in mapping:
        mapping[key] = value
        return
    later = order[order.index(key) + 1 :]
    position = next((i for i, existing in enumerate(mapping) if existing in later), len(mapping))
    mapping.insert(position, key, value)


def pin_images(path: Path, digests: Mapping[str, str], root: Path) -> str:
    """Pin the stack file at `path` (`pin`), check the result as `loopform validate` does and that each image of
    those repositories now runs by its digest, write it; the unified diff."""
    old = path.read_text()
    new = pin(old, load_stack(path), digests)
    with tempfile.TemporaryDirectory() as folder:
        result = Path(folder) / path.name  # the file name says the environment
        result.write_text(new)
        spec = load_stack(result, root)
    refs = {field: ImageRef.parse(image) for field, image in image_fields(spec).items()}
    unpinned = [
        f"{section}.{key}: {ref}"
        for (section, key), ref in refs.items()
        if ref.repository in digests and ref.digest != digests[ref.repository]
    ]
    if unpinned:
        raise ValueError(f"{path}: not pinned to the given digests after pinning: {', '.join(unpinned)}")
    path.write_text(new)
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"{path} (before)", str(path)))
