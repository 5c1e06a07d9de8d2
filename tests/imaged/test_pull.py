"""Pulls of every manifest kind from a real docker-registry, verified into the blob store."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from services.imaged.manifest import NoMatchingPlatform
from shared.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable
from tests.imaged.conftest import stored_blobs, temp_files
from tests.support import images
from tests.support.registry import start_registry


def file_digest(path: str) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


async def pull_ready(service, ref: str, **kwargs) -> dict:
    result = await service.pull(reference=ref, **kwargs)
    await service.mark_ready(image_id=result["image_id"])
    return result


async def test_single_layer_oci_pull_stores_verified_blobs(make_imaged, registry, catalog):
    imaged = await make_imaged(registry.host)
    img = catalog.busybox
    result = await imaged.pull(reference=img.ref)

    assert result["image_id"] == img.config_digest
    assert result["repo_tag"] == img.ref
    assert result["repo_digest"] == img.digest_ref
    assert [l["digest"] for l in result["layers"]] == img.layer_digests
    assert [l["diff_id"] for l in result["layers"]] == img.diff_ids
    for layer in result["layers"]:
        assert layer["media_type"] == "application/vnd.oci.image.layer.v1.tar+gzip"
        assert file_digest(layer["path"]) == layer["digest"]
        assert Path(layer["path"]).stat().st_size == layer["size"]
    assert {img.config_digest, img.manifest_digest, *img.layer_digests} <= stored_blobs(imaged)
    assert temp_files(imaged) == []

    # Not listed until storaged has unpacked it and the frontend marks it ready.
    assert await imaged.list_images() == []
    assert await imaged.image_status(reference=img.ref) is None
    await imaged.mark_ready(image_id=result["image_id"])
    status = await imaged.image_status(reference=img.ref)
    assert status["id"] == img.config_digest
    assert status["repo_tags"] == [img.ref]
    assert status["repo_digests"] == [img.digest_ref]
    assert status["size"] == img.size
    assert status["config"]["cmd"] == ["/bin/sh"]
    assert status["config"]["env"][0].startswith("PATH=")
    assert [i["id"] for i in await imaged.list_images()] == [img.config_digest]


async def test_docker_schema2_multi_layer_config_fields(make_imaged, registry, catalog):
    imaged = await make_imaged(registry.host)
    img = catalog.multi
    result = await pull_ready(imaged, img.ref)
    assert len(result["layers"]) == 3
    assert {l["media_type"] for l in result["layers"]} == {"application/vnd.docker.image.rootfs.diff.tar.gzip"}
    cfg = (await imaged.image_status(reference=img.ref))["config"]
    assert cfg["entrypoint"] == ["/bin/sh", "-c"]
    assert cfg["cmd"] == ["echo hi"]
    assert cfg["working_dir"] == "/app"
    assert cfg["exposed_ports"] == ["8080/tcp"]
    assert cfg["labels"] == {"layers": "3"}
    assert cfg["stop_signal"] == "SIGINT"


@pytest.mark.parametrize("which", ["index", "manifest_list"])
async def test_multi_platform_picks_linux_amd64_by_default(make_imaged, registry, catalog, which):
    imaged = await make_imaged(registry.host, image_platform="linux/amd64")
    img = getattr(catalog, which)
    result = await pull_ready(imaged, img.ref)
    amd64 = img.images["linux/amd64"]
    assert result["image_id"] == amd64.config_digest
    # The repo digest is the index's: what the tag points at and can be pulled by.
    assert result["repo_digest"] == img.digest_ref
    status = await imaged.image_status(reference=img.ref)
    assert status["config"]["labels"] == {"platform": "linux/amd64"}
    assert status["manifest_digest"] == amd64.manifest_digest


@pytest.mark.parametrize("platform", ["linux/arm64/v8", "linux/arm/v7", "linux/arm64"])
async def test_configured_platform_and_variant(make_imaged, registry, catalog, platform):
    imaged = await make_imaged(registry.host, image_platform=platform)
    result = await pull_ready(imaged, catalog.index.ref)
    wanted = "linux/arm64/v8" if platform == "linux/arm64" else platform
    assert result["image_id"] == catalog.index.images[wanted].config_digest


async def test_platform_missing_from_index_fails_clearly(make_imaged, registry, catalog):
    imaged = await make_imaged(registry.host, image_platform="linux/s390x")
    with pytest.raises(NoMatchingPlatform) as e:
        await imaged.pull(reference=catalog.index.ref)
    assert "linux/s390x" in e.value.message and "linux/amd64" in e.value.message


@pytest.mark.parametrize("which,media_type", [
    ("zstd", "application/vnd.oci.image.layer.v1.tar+zstd"),
    ("uncompressed", "application/vnd.oci.image.layer.v1.tar"),
])
async def test_zstd_and_uncompressed_layers(make_imaged, registry, catalog, which, media_type):
    imaged = await make_imaged(registry.host)
    result = await pull_ready(imaged, getattr(catalog, which).ref)
    assert result["layers"][-1]["media_type"] == media_type
    assert file_digest(result["layers"][-1]["path"]) == result["layers"][-1]["digest"]


async def test_whiteout_and_user_images(make_imaged, registry, catalog):
    imaged = await make_imaged(registry.host)
    wh = await pull_ready(imaged, catalog.whiteout.ref)
    assert len(wh["layers"]) == 3
    await pull_ready(imaged, catalog.user.ref)
    assert (await imaged.image_status(reference=catalog.user.ref))["config"]["user"] == "app"


async def test_tag_then_digest_gives_one_image_with_both_refs(make_imaged, registry, catalog):
    imaged = await make_imaged(registry.host)
    img = catalog.busybox
    a = await pull_ready(imaged, img.ref)
    b = await pull_ready(imaged, img.digest_ref)
    assert a["image_id"] == b["image_id"]
    assert b["repo_tag"] is None
    listed = await imaged.list_images()
    assert len(listed) == 1
    assert listed[0]["repo_tags"] == [img.ref]
    assert listed[0]["repo_digests"] == [img.digest_ref]
    assert (await imaged.image_status(reference=img.digest_ref))["id"] == img.config_digest


async def test_digest_then_tag_and_second_repository(make_imaged, registry, catalog):
    imaged = await make_imaged(registry.host)
    img = catalog.busybox
    await pull_ready(imaged, img.digest_ref)
    assert (await imaged.image_status(reference=img.digest_ref))["repo_tags"] == []
    await pull_ready(imaged, img.ref)
    await pull_ready(imaged, catalog.busybox_other_repo.ref)
    status = await imaged.image_status(reference=img.config_digest)
    assert sorted(status["repo_tags"]) == sorted([img.ref, catalog.busybox_other_repo.ref])
    assert img.digest_ref in status["repo_digests"]


async def test_short_names_use_unqualified_search_registries(make_imaged, registry, catalog, tmp_path):
    (tmp_path / "registries.conf").write_text(
        f'unqualified-search-registries = ["{registry.host}"]\n')
    imaged = await make_imaged(registry.host)
    result = await pull_ready(imaged, "busybox")
    assert result["repo_tag"] == f"{registry.host}/busybox:latest"
    assert result["image_id"] == catalog.short.config_digest
    assert (await imaged.image_status(reference="busybox"))["id"] == catalog.short.config_digest
    assert (await imaged.image_status(reference="busybox:latest"))["id"] == catalog.short.config_digest
    result = await pull_ready(imaged, "test/busybox")
    assert result["repo_tag"] == catalog.busybox.ref


async def test_short_name_without_search_registries_means_docker_hub(make_imaged, registry):
    imaged = await make_imaged(registry.host)
    # Nothing pulled from the network: docker.io is only named, not contacted, by a lookup.
    assert await imaged.image_status(reference="busybox") is None
    with pytest.raises(InvalidArgument):
        await imaged.image_status(reference="UPPER/Case")


async def test_registry_location_rewrite_and_mirror_fallback(make_imaged, registry, catalog, tmp_path, hostile):
    # hostile answers 404 for everything but /v2/: a broken mirror, skipped for the real location.
    (tmp_path / "registries.conf").write_text(f"""
[[registry]]
prefix = "images.example.invalid/test"
location = "{registry.host}/test"
insecure = true

[[registry.mirror]]
location = "{hostile.host}/mirror"
insecure = true
""")
    imaged = await make_imaged()
    result = await pull_ready(imaged, "images.example.invalid/test/busybox:latest")
    assert result["image_id"] == catalog.busybox.config_digest
    assert result["repo_tag"] == "images.example.invalid/test/busybox:latest"
    assert "/v2/mirror/busybox/manifests/latest" in hostile.requests


async def test_mirror_is_used_first(make_imaged, registry, catalog, tmp_path, hostile):
    (tmp_path / "registries.conf").write_text(f"""
[[registry]]
prefix = "images.example.invalid"
location = "{hostile.host}"
insecure = true

[[registry.mirror]]
location = "{registry.host}"
insecure = true
""")
    imaged = await make_imaged()
    result = await pull_ready(imaged, "images.example.invalid/test/busybox:latest")
    assert result["image_id"] == catalog.busybox.config_digest
    assert not any("/manifests/" in r for r in hostile.requests)


async def test_blocked_registry(make_imaged, registry, catalog, tmp_path):
    (tmp_path / "registries.conf").write_text(f'[[registry]]\nlocation = "{registry.host}"\nblocked = true\n')
    imaged = await make_imaged(registry.host)
    with pytest.raises(PermissionDenied) as e:
        await imaged.pull(reference=catalog.busybox.ref)
    assert "blocked" in e.value.message


async def test_missing_image_is_not_found_naming_image_and_registry(make_imaged, registry):
    imaged = await make_imaged(registry.host)
    with pytest.raises(NotFound) as e:
        await imaged.pull(reference=f"{registry.host}/test/busybox:no-such-tag")
    assert "test/busybox:no-such-tag" in e.value.message and registry.host in e.value.message


async def test_the_registry_client_is_made_at_the_first_pull(make_imaged, registry, catalog):
    imaged = await make_imaged(registry.host)
    # An imaged that only answers for the images it has holds no HTTP client nor CA store.
    assert await imaged.list_images() == []
    assert await imaged.image_status(reference=catalog.busybox.ref) is None
    assert imaged.http is None and imaged.puller is None
    await pull_ready(imaged, catalog.busybox.ref)
    client = imaged.http
    assert client is not None
    await imaged.pull(reference=catalog.busybox.ref)
    assert imaged.http is client


async def test_concurrent_pulls_of_one_image_fetch_once(make_imaged, hostile):
    image = images.Image([images.busybox_layer(), images.platform_layer("x")])
    pushed = hostile.serve_image("dedupe/img", "latest", image)
    imaged = await make_imaged(hostile.host)
    results = await asyncio.gather(*(imaged.pull(reference=pushed.ref) for _ in range(4)))
    assert {r["image_id"] for r in results} == {pushed.config_digest}
    for digest in pushed.layer_digests:
        assert hostile.hits(f"/v2/dedupe/img/blobs/{digest}") == 1
    assert hostile.hits("/v2/dedupe/img/manifests/latest") == 1


async def test_blobs_already_stored_are_not_downloaded_again(make_imaged, hostile):
    base = images.busybox_layer()
    first = hostile.serve_image("share/a", "latest", images.Image([base, images.platform_layer("a")]))
    second = hostile.serve_image("share/b", "latest", images.Image([base, images.platform_layer("b")]))
    imaged = await make_imaged(hostile.host)
    await imaged.pull(reference=first.ref)
    await imaged.pull(reference=second.ref)
    assert hostile.hits(f"/v2/share/a/blobs/{base.digest}") == 1
    assert hostile.hits(f"/v2/share/b/blobs/{base.digest}") == 0
    assert hostile.hits(f"/v2/share/b/blobs/{second.layer_digests[1]}") == 1


async def test_pull_by_digest_of_a_platform_manifest(make_imaged, registry, catalog):
    imaged = await make_imaged(registry.host)
    arm = catalog.index.images["linux/arm64/v8"]
    result = await pull_ready(imaged, f"{catalog.index.name}@{arm.manifest_digest}")
    assert result["image_id"] == arm.config_digest


async def test_https_by_default_verified_with_system_cas(make_imaged, tmp_path, monkeypatch):
    with start_registry(tmp_path / "tls-registry", tls=True) as reg:
        pushed = images.push_busybox_image(reg, "tls/busybox", "latest")
        imaged = await make_imaged()  # not insecure: HTTPS, verified
        with pytest.raises(Unavailable) as e:
            await imaged.pull(reference=pushed.ref)
        assert "certificate" in e.value.message and reg.host in e.value.message
        await imaged.stop()
        # The system's CA locations (OpenSSL honours SSL_CERT_FILE) decide what is trusted.
        monkeypatch.setenv("SSL_CERT_FILE", str(reg.ca_path))
        trusting = await make_imaged()
        result = await trusting.pull(reference=pushed.ref)
        assert result["image_id"] == pushed.config_digest


@pytest.mark.parametrize("parallel", [1, 3])
async def test_layers_download_in_parallel_up_to_the_limit(make_imaged, hostile, parallel):
    layers = [images.platform_layer(f"layer-{i}") for i in range(7)]
    pushed = hostile.serve_image("par/img", "latest", images.Image(layers))
    for layer in layers:
        hostile.routes[f"/v2/par/img/blobs/{layer.digest}"].delay = 0.3
    imaged = await make_imaged(hostile.host, max_parallel_downloads=parallel)
    await imaged.pull(reference=pushed.ref)
    assert hostile.max_active == parallel
