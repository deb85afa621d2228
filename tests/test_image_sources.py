"""Every image a rendered stack names is produced by this repository or pinned upstream.

A pod whose image nobody pushed, or whose tag can move under it, is not deployed. Each image of every
rendered object of dev, staging and prod (with every model released, so the model services Argo CD
applies are included) and each image a chart's values set is either `ghcr.io/loopform/<name>` where
`images/<name>/Dockerfile` exists, `.github/workflows/images.yml` builds `<name>`, and the tag is one that
workflow pushes (the version, or a git SHA) or a digest pins it; or an upstream image pinned by a version tag
or a digest. Charts' own images, where the values set none, are pinned by the chart's version.
`loopform pin-images` then pins prod's images to the digests a release pushed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from loopform import render
from loopform.cli import main
from loopform.image_ref import ImageRef
from loopform.images import pin_images, read_digests, unpinned
from loopform.spec import IMAGE_REGISTRY, PlatformSpec, SpecError, load_stack, parse_spec, stack_file
from tests import pins, records

from .conftest import ROOT, STACKS
from .test_workflows import released_tags

GIT_SHA = re.compile(r"^[0-9a-f]{40}$")
#: An upstream tag that names a version: starts with one (16.4, v2.14.2, 3.11-slim), unlike latest or stable.
VERSION_TAG = re.compile(r"^v?\d")
DIGESTS = {
    f"{IMAGE_REGISTRY}/{name}": f"sha256:{digit * 64}"
    for name, digit in (("pipeline", "1"), ("pipeline-cuda", "2"), ("serving", "3"), ("mlflow", "4"))
}


def released(spec: PlatformSpec) -> PlatformSpec:
    """The stack with every model released in the image `loopform promote` records (services.image)."""
    sealed = {"fraud": records.evidence(), "delivery": records.regression_evidence()}
    data = spec.model_dump(mode="json")
    for name, model in data["models"].items():
        model["release"] = records.release(spec.environment, image=spec.services.image, sealed=sealed[name])
    return PlatformSpec.model_validate(data)


def images_in(node: Any) -> Iterator[str]:
    """Every image an object or chart values name: `image` strings, and Helm's {registry, repository, tag}."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "image" and isinstance(value, str):
                yield value
            elif key == "image" and isinstance(value, dict) and "repository" in value:
                registry = f"{value['registry']}/" if value.get("registry") else ""
                yield registry + value["repository"] + (f":{value['tag']}" if value.get("tag") else "")
            else:
                yield from images_in(value)
    elif isinstance(node, list):
        for item in node:
            yield from images_in(item)


def stack_images(resources: list[render.RenderedResource], spec: PlatformSpec) -> dict[str, set[str]]:
    """Each image of the rendered stack, with the objects (kind/name) and charts that name it."""
    manifests = render.stack_manifests(resources, released(spec))
    found: dict[str, set[str]] = {}
    for manifest in manifests.objects:
        for image in images_in(manifest):
            found.setdefault(image, set()).add(f"{manifest['kind']}/{manifest['metadata']['name']}")
    for chart_name, chart in manifests.charts:
        for image in images_in(chart.get("values") or {}):
            found.setdefault(image, set()).add(f"chart {chart_name}")
    return found


def source_problems(images: Iterable[str], produced: Mapping[str, str]) -> list[str]:
    """Why each image would not pull as reviewed: `produced` maps each image this repository builds and pushes
    to IMAGE_REGISTRY to the version tag it pushes (beside the git SHA)."""
    problems = []
    for image in sorted(images):
        ref = ImageRef.parse(image)
        if ref.repository.startswith(f"{IMAGE_REGISTRY}/"):
            name = ref.repository.removeprefix(f"{IMAGE_REGISTRY}/")
            if name not in produced:
                problems.append(f"{image}: no images/{name}/Dockerfile that .github/workflows/images.yml builds")
            elif ref.tag is not None and ref.tag != produced[name] and not GIT_SHA.match(ref.tag):
                problems.append(f"{image}: images.yml tags {name} {produced[name]} and the git SHA, not {ref.tag}")
            elif ref.tag is None and ref.digest is None:
                problems.append(f"{image}: untagged (pulls latest)")
        elif ref.digest is None and (ref.tag is None or not VERSION_TAG.match(ref.tag)):
            problems.append(f"{image}: an upstream image needs a version tag or a digest, not {ref.tag or 'no tag'}")
    return problems


@pytest.fixture(scope="module")
def produced() -> dict[str, str]:
    return released_tags()


@pytest.mark.parametrize("name", STACKS)
def test_every_rendered_image_is_built_here_or_pinned_upstream(name: str, rendered, produced) -> None:
    found = stack_images(rendered(name), load_stack(stack_file(name)))
    kinds = {where.split("/")[0] for places in found.values() for where in places}
    assert {"Deployment", "WorkflowTemplate", "CronJob", "Job"} <= kinds
    spec = load_stack(stack_file(name))
    assert spec.services.image in found  # the model services of the released models
    assert spec.orchestrator.gpu_pipeline_image in found  # a GPU pool's training step
    problems = [
        f"{problem} (in {', '.join(sorted(found[image]))})"
        for image in found
        for problem in source_problems([image], produced)
    ]
    assert problems == []


@pytest.mark.parametrize("name", STACKS)
def test_charts_without_image_values_are_pinned_by_version(name: str, rendered) -> None:
    for chart_name, chart in render.stack_manifests(rendered(name), load_stack(stack_file(name))).charts:
        assert re.fullmatch(r"\d+\.\d+\.\d+", str(chart.get("version"))), (
            f"{chart_name}: chart version {chart.get('version')}"
        )


def test_unknown_and_floating_images_are_caught(produced) -> None:
    assert source_problems([f"{IMAGE_REGISTRY}/pipeline:{produced['pipeline']}"], produced) == []
    assert (
        source_problems(
            [f"{IMAGE_REGISTRY}/pipeline:{'a' * 40}", f"{IMAGE_REGISTRY}/mlflow@{'sha256:' + '0' * 64}"], produced
        )
        == []
    )
    assert (
        source_problems(["postgres:16.4", "quay.io/argoproj/argocd:v2.14.2", f"redis@sha256:{'0' * 64}"], produced)
        == []
    )
    (unknown,) = source_problems([f"{IMAGE_REGISTRY}/foo:{produced['pipeline']}"], produced)
    assert "no images/foo/Dockerfile" in unknown
    (latest,) = source_problems(["redis:latest"], produced)
    assert "not latest" in latest
    (untagged,) = source_problems(["localhost:5000/redis"], produced)
    assert "not no tag" in untagged
    (moved,) = source_problems([f"{IMAGE_REGISTRY}/pipeline:9.9.9"], produced)
    assert "not 9.9.9" in moved


def test_a_rendered_unknown_or_floating_image_is_caught(tmp_path: Path, produced) -> None:
    """End to end: a stack naming an image nobody builds here and an upstream `latest` fails the check above."""
    path = tmp_path / "Pulumi.dev.yaml"
    document = yaml.safe_load(stack_file("dev").read_text())
    platform = document["config"]["loopform:platform"]
    platform["registry"]["image"] = f"{IMAGE_REGISTRY}/foo:{produced['pipeline']}"
    platform["feature_store"]["online_store"]["image"] = "redis:latest"
    path.write_text(yaml.safe_dump(document))
    found = stack_images(render.render_stack("dev", ROOT, path), load_stack(path))
    problems = source_problems(found, produced)
    assert len(problems) == 2
    assert f"{IMAGE_REGISTRY}/foo:{produced['pipeline']}: no images/foo/Dockerfile" in problems[0]
    assert problems[1].startswith("redis:latest: an upstream image needs a version tag or a digest")


def test_image_references_parse() -> None:
    digest = "sha256:" + "a" * 64
    assert ImageRef.parse(f"ghcr.io/loopform/pipeline:0.1.0@{digest}") == ImageRef(
        "ghcr.io/loopform/pipeline", "0.1.0", digest
    )
    assert ImageRef.parse("localhost:5000/app") == ImageRef("localhost:5000/app")
    assert ImageRef.parse("localhost:5000/app:1.2") == ImageRef("localhost:5000/app", "1.2")
    assert str(ImageRef.parse(f"postgres@{digest}")) == f"postgres@{digest}"


@pytest.fixture
def prod_copy(tmp_path: Path) -> Path:
    path = tmp_path / "stacks" / "Pulumi.prod.yaml"
    path.parent.mkdir()
    path.write_text(stack_file("prod").read_text())
    return path


def test_pin_images_pins_prod_and_the_result_loads(prod_copy: Path, tmp_path: Path, capsys) -> None:
    before = prod_copy.read_text()
    digests_file = tmp_path / "digests.json"
    digests_file.write_text(json.dumps(DIGESTS))
    root = str(ROOT)
    assert (
        main(
            ["--root", root, "pin-images", "--stack", "prod", "--file", str(prod_copy), "--digests", str(digests_file)]
        )
        == 0
    )
    diff = capsys.readouterr().out
    after = prod_copy.read_text()
    spec = load_stack(prod_copy, ROOT)
    tag = load_stack(stack_file("prod")).orchestrator.pipeline_image.split(":")[-1]
    assert (
        spec.orchestrator.pipeline_image == f"{IMAGE_REGISTRY}/pipeline:{tag}@{DIGESTS[f'{IMAGE_REGISTRY}/pipeline']}"
    )
    assert (
        spec.orchestrator.gpu_pipeline_image
        == f"{IMAGE_REGISTRY}/pipeline-cuda:{tag}@{DIGESTS[f'{IMAGE_REGISTRY}/pipeline-cuda']}"
    )
    assert spec.services.image == f"{IMAGE_REGISTRY}/serving:{tag}@{DIGESTS[f'{IMAGE_REGISTRY}/serving']}"
    assert (
        spec.registry.server_image
        == f"{IMAGE_REGISTRY}/mlflow:v{spec.registry.mlflow_version}@{DIGESTS[f'{IMAGE_REGISTRY}/mlflow']}"
    )
    assert spec.feature_store.image is None  # it falls back to the pinned pipeline image
    # Only additions: every line of the file, comments included, is still there, in order.
    removed = [line for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    assert removed == []
    assert [line for line in after.splitlines() if line in before.splitlines()] == before.splitlines()
    assert (
        yaml.safe_load(after)["config"]["loopform:platform"]["models"]
        == yaml.safe_load(before)["config"]["loopform:platform"]["models"]
    )
    # Again with the same digests: nothing to change.
    assert pin_images(prod_copy, DIGESTS, ROOT) == ""
    assert prod_copy.read_text() == after


def test_pinned_prod_renders_only_digest_pinned_images(prod_copy: Path) -> None:
    """Ours from the release's builds, the upstream ones (Pushgateway, PostgreSQL, the Argo images set in chart
    values) from the tags they resolved to: nothing in a pinned prod runs by tag alone."""
    pin_images(prod_copy, DIGESTS, ROOT)
    upstream = {image: pins.digest(image) for image in unpinned(load_stack(prod_copy))}
    assert upstream and not any(image.startswith(IMAGE_REGISTRY) for image in upstream)
    pin_images(prod_copy, upstream, ROOT)
    spec = load_stack(prod_copy)
    found = stack_images(render.render_stack("prod", ROOT, prod_copy), spec)
    refs = [ImageRef.parse(image) for image in found]
    assert {ref.repository for ref in refs} >= {"prom/pushgateway", "postgres", "quay.io/argoproj/argoexec"}
    assert [str(ref) for ref in refs if ref.digest is None] == []
    for ref in refs:
        expected = DIGESTS.get(ref.repository) or upstream.get(ref.tagged)
        assert ref.digest == expected, ref


def test_a_new_release_moves_tag_and_digest(prod_copy: Path) -> None:
    """A stack an older release pinned: the new release's digest moves the field to its tag, and the lock drops
    the old entry, which nothing runs any more."""
    old = f"{IMAGE_REGISTRY}/pipeline:0.0.9"
    document = yaml.safe_load(prod_copy.read_text())
    platform = document["config"]["loopform:platform"]
    platform["orchestrator"]["pipeline_image"] = old
    platform["image_digests"] = {old: "sha256:" + "1" * 64}
    prod_copy.write_text(yaml.safe_dump(document))
    assert load_stack(prod_copy).orchestrator.pipeline_image == f"{old}@sha256:{'1' * 64}"
    newer = {f"{IMAGE_REGISTRY}/pipeline": "sha256:" + "9" * 64}
    diff = pin_images(prod_copy, newer, ROOT)
    tag = load_stack(stack_file("prod")).orchestrator.pipeline_image.split(":")[-1]
    spec = load_stack(prod_copy)
    assert spec.orchestrator.pipeline_image == f"{IMAGE_REGISTRY}/pipeline:{tag}@sha256:{'9' * 64}"
    assert spec.image_digests == {f"{IMAGE_REGISTRY}/pipeline:{tag}": "sha256:" + "9" * 64}
    removed = [line[1:].strip() for line in diff.splitlines() if line.startswith("-") and not line.startswith("---")]
    assert f"pipeline_image: {old}" in removed and f"{old}: sha256:{'1' * 64}" in removed


def test_a_moved_tag_runs_unpinned_until_its_digest_is_added(prod_copy: Path) -> None:
    """The lock is keyed by tag: a new Pushgateway tag under the old lock runs by tag (the pack refuses it in
    prod), never the old digest under a new name."""
    pin_images(prod_copy, {"prom/pushgateway:v1.11.1": pins.digest("old")}, ROOT)
    document = yaml.safe_load(prod_copy.read_text())
    document["config"]["loopform:platform"]["monitoring"]["pushgateway_image"] = "prom/pushgateway:v1.12.0"
    prod_copy.write_text(yaml.safe_dump(document))
    spec = load_stack(prod_copy)
    assert spec.monitoring.pushgateway_image == "prom/pushgateway:v1.12.0"
    assert "prom/pushgateway:v1.12.0" in unpinned(spec)
    pin_images(prod_copy, {"prom/pushgateway:v1.12.0": pins.digest("new")}, ROOT)
    spec = load_stack(prod_copy)
    assert spec.monitoring.pushgateway_image == f"prom/pushgateway:v1.12.0@{pins.digest('new')}"
    assert "prom/pushgateway:v1.11.1" not in spec.image_digests


def test_a_digest_written_into_a_field_gives_way_to_the_new_one(prod_copy: Path) -> None:
    """A field that carries a digest of its own (written by hand, or by an older pin-images) and the same in the
    lock: a new digest for its tag must replace both, or the field's old one would keep running."""
    old, new = pins.digest("old"), pins.digest("new")
    document = yaml.safe_load(prod_copy.read_text())
    platform = document["config"]["loopform:platform"]
    platform["monitoring"]["pushgateway_image"] = f"prom/pushgateway:v1.11.1@{old}"
    platform["image_digests"] = {"prom/pushgateway:v1.11.1": old}
    prod_copy.write_text(yaml.safe_dump(document))
    pin_images(prod_copy, {"prom/pushgateway:v1.11.1": new}, ROOT)
    spec = load_stack(prod_copy)
    assert spec.monitoring.pushgateway_image == f"prom/pushgateway:v1.11.1@{new}"
    assert spec.image_digests == {"prom/pushgateway:v1.11.1": new}
    platform = yaml.safe_load(prod_copy.read_text())["config"]["loopform:platform"]
    assert platform["monitoring"]["pushgateway_image"] == "prom/pushgateway:v1.11.1"  # the lock pins it now


@pytest.mark.parametrize(
    ("digests", "message"),
    [
        ({"prom/pushgateway": "sha256:" + "0" * 64}, "not built by this checkout"),
        ({"redis:7.4": "sha256:" + "0" * 64}, "the stack runs no such image"),
    ],
)
def test_digests_the_stack_cannot_use_are_refused(prod_copy: Path, digests: dict, message: str) -> None:
    before = prod_copy.read_text()
    with pytest.raises(ValueError, match=message):
        pin_images(prod_copy, digests, ROOT)
    assert prod_copy.read_text() == before


@pytest.mark.parametrize(
    ("lock", "message"),
    [
        ({"prom/pushgateway": "sha256:" + "0" * 64}, "name the tag the digest was resolved from"),
        ({f"prom/pushgateway:v1.11.1@sha256:{'0' * 64}": "sha256:" + "0" * 64}, "without a digest"),
        ({"prom/pushgateway:v1.11.1": "sha256:abc"}, "image_digests"),
    ],
)
def test_the_lock_is_checked(lock: dict, message: str) -> None:
    platform = yaml.safe_load(stack_file("prod").read_text())["config"]["loopform:platform"]
    with pytest.raises(SpecError, match=message):
        parse_spec({**platform, "image_digests": lock}, "prod")


@pytest.mark.parametrize(
    ("digests", "message"),
    [
        ({f"{IMAGE_REGISTRY}/pipeline": "sha256:abc"}, "is not a digest"),
        ({f"{IMAGE_REGISTRY}/pipeline": "sha512:" + "0" * 64}, "is not a digest"),
        ({f"{IMAGE_REGISTRY}/pipeline@sha256:{'0' * 64}": "sha256:" + "0" * 64}, "without a digest"),
        ({}, "must map images to digests"),
    ],
)
def test_digests_file_is_checked(tmp_path: Path, digests: dict, message: str) -> None:
    path = tmp_path / "digests.json"
    path.write_text(json.dumps(digests))
    with pytest.raises(ValueError, match=message):
        read_digests(path)
