"""Image references (`repo:tag@sha256:...`), and the digest lock a stack pins its images with.

A tag can be moved to other content; a digest cannot. A stack's `image_digests` maps each image reference it
runs (`repository:tag`) to the digest that tag had when `loopform pin-images` wrote it, and every image the
platform names runs as `repository:tag@digest` where the map has it. Keyed by tag, so moving a tag (a new
Pushgateway, a new Argo CD patch) un-pins that image until its digest is written too, and prod's policy refuses
it meanwhile.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


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

    @property
    def tagged(self) -> str:
        """`repository:tag` (or the repository alone): the key of the digest lock."""
        return str(replace(self, digest=None))

    def __str__(self) -> str:
        return self.repository + (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")


def lock_key_problem(reference: str) -> str | None:
    """Why `reference` cannot key the digest lock (it must be `repository:tag`), or None."""
    ref = ImageRef.parse(reference)
    if ref.digest:
        return "name the image by repository and tag, without a digest (the digest is the value)"
    if not ref.tag:
        return "name the tag the digest was resolved from (repository:tag)"
    return None


def pinned(reference: str, digests: Mapping[str, str]) -> str:
    """`reference` as it runs under the lock `digests`: `repo:tag@digest` where the lock names `repo:tag`; a
    reference that already carries a digest, or that the lock does not name, is left as it is."""
    ref = ImageRef.parse(reference)
    digest = None if ref.digest else digests.get(ref.tagged)
    return str(replace(ref, digest=digest)) if digest else reference
