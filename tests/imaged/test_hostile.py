"""A misbehaving registry: nothing unverified is stored, transient errors are retried, others are not."""

from __future__ import annotations

import pytest

from services.imaged.blobstore import BlobVerificationError
from shared.errors import DataLoss, NotFound, PermissionDenied, Unauthenticated, Unavailable
from tests.imaged.conftest import stored_blobs, temp_files
from tests.support import images


def two_layer_image() -> images.Image:
    return images.Image([images.busybox_layer(), images.platform_layer("hostile")])


async def assert_nothing_stored(imaged, *digests: str) -> None:
    blobs = stored_blobs(imaged)
    for d in digests:
        assert d not in blobs
    assert temp_files(imaged) == []
    assert await imaged.list_images() == []
    assert imaged.records.all(ready_only=False) == []


async def test_layer_digest_mismatch_fails_and_stores_nothing(make_imaged, hostile):
    image = two_layer_image()
    evil = images.compress(images.build_tar([images.file_entry("evil", b"not what the digest says")]), "gzip")
    top = image.layers[1]
    pushed = hostile.serve_image("evil/digest", "latest", image, blob_bodies={top.digest: evil})
    imaged = await make_imaged(hostile.host)
    with pytest.raises(BlobVerificationError) as e:
        await imaged.pull(reference=pushed.ref)
    assert isinstance(e.value, DataLoss)
    assert top.digest in e.value.message and hostile.host in e.value.message
    await assert_nothing_stored(imaged, top.digest)


async def test_truncated_blob_is_rejected(make_imaged, hostile):
    image = two_layer_image()
    base = image.layers[0]
    pushed = hostile.serve_image("evil/truncated", "latest", image, blob_bodies={base.digest: base.blob[:1000]})
    imaged = await make_imaged(hostile.host)
    with pytest.raises(BlobVerificationError) as e:
        await imaged.pull(reference=pushed.ref)
    assert "1000 bytes" in e.value.message
    await assert_nothing_stored(imaged, base.digest)


async def test_blob_cut_off_mid_transfer_is_retried_then_fails(make_imaged, hostile):
    image = two_layer_image()
    base = image.layers[0]
    pushed = hostile.serve_image("evil/cut", "latest", image)
    # Announces the full size, sends 1000 bytes, closes: a broken connection.
    route = hostile.routes[f"/v2/evil/cut/blobs/{base.digest}"]
    route.body = base.blob[:1000]
    route.content_length = len(base.blob)
    imaged = await make_imaged(hostile.host)
    with pytest.raises(Unavailable):
        await imaged.pull(reference=pushed.ref)
    assert route.hits > 1
    await assert_nothing_stored(imaged, base.digest)


@pytest.mark.parametrize("announce", [True, False])
async def test_oversized_blob_is_cut_off(make_imaged, hostile, announce):
    image = two_layer_image()
    top = image.layers[1]
    pushed = hostile.serve_image("evil/big", "latest", image,
                                 blob_bodies={top.digest: top.blob + b"\0" * (3 * 1024 * 1024)})
    if not announce:
        hostile.routes[f"/v2/evil/big/blobs/{top.digest}"].headers["Transfer-Encoding"] = "chunked"
    imaged = await make_imaged(hostile.host)
    with pytest.raises(BlobVerificationError) as e:
        await imaged.pull(reference=pushed.ref)
    assert str(len(top.blob)) in e.value.message
    await assert_nothing_stored(imaged, top.digest)


@pytest.mark.parametrize("announce", [True, False])
async def test_oversized_manifest_is_refused(make_imaged, hostile, announce):
    hostile.serve_oversized_manifest("evil/manifest", "latest", announce=announce)
    imaged = await make_imaged(hostile.host)
    with pytest.raises(BlobVerificationError) as e:
        await imaged.pull(reference=f"{hostile.host}/evil/manifest:latest")
    assert "limit" in e.value.message
    await assert_nothing_stored(imaged)


async def test_manifest_not_matching_its_digest(make_imaged, hostile):
    image = two_layer_image()
    other = images.Image([images.busybox_layer()]).manifest_bytes()
    pushed = hostile.serve_image("evil/mdigest", None, image, manifest_body=other)
    imaged = await make_imaged(hostile.host)
    with pytest.raises(BlobVerificationError) as e:
        await imaged.pull(reference=pushed.digest_ref)
    assert pushed.manifest_digest in e.value.message
    await assert_nothing_stored(imaged)


async def test_config_not_matching_its_digest(make_imaged, hostile):
    image = two_layer_image()
    pushed = hostile.serve_image("evil/config", "latest", image,
                                 blob_bodies={image.config_digest: image.config_bytes().replace(b"amd64", b"arm64")})
    imaged = await make_imaged(hostile.host)
    with pytest.raises(BlobVerificationError):
        await imaged.pull(reference=pushed.ref)
    await assert_nothing_stored(imaged, image.config_digest)


@pytest.mark.parametrize("failure,retry_after", [(503, None), (429, "0"), (502, "0"), ("reset", None)])
async def test_transient_failures_are_retried(make_imaged, hostile, failure, retry_after):
    image = two_layer_image()
    pushed = hostile.serve_image("flaky/img", "latest", image)
    manifest = hostile.routes["/v2/flaky/img/manifests/latest"]
    blob = hostile.routes[f"/v2/flaky/img/blobs/{image.layers[0].digest}"]
    for route in (manifest, blob):
        route.failures, route.failure, route.retry_after = 2, failure, retry_after
    imaged = await make_imaged(hostile.host)
    result = await imaged.pull(reference=pushed.ref)
    assert result["image_id"] == pushed.config_digest
    assert manifest.hits == 3 and blob.hits == 3


async def test_persistent_5xx_gives_unavailable(make_imaged, hostile):
    hostile.route("/v2/down/img/manifests/latest", failures=100, failure=500, retry_after="0")
    imaged = await make_imaged(hostile.host)
    with pytest.raises(Unavailable) as e:
        await imaged.pull(reference=f"{hostile.host}/down/img:latest")
    assert hostile.hits("/v2/down/img/manifests/latest") == 5
    assert hostile.host in e.value.message


@pytest.mark.parametrize("status,error", [(401, Unauthenticated), (403, PermissionDenied), (404, NotFound)])
async def test_client_errors_are_not_retried(make_imaged, hostile, status, error):
    hostile.route("/v2/denied/img/manifests/latest", status=status, body=b"{}")
    imaged = await make_imaged(hostile.host)
    ref = f"{hostile.host}/denied/img:latest"
    with pytest.raises(error) as e:
        await imaged.pull(reference=ref)
    assert ref in e.value.message and hostile.host in e.value.message
    # A 401 is retried once with a fresh challenge; 403 and 404 are final at once.
    assert hostile.hits("/v2/denied/img/manifests/latest") == (2 if status == 401 else 1)


async def test_blob_404_names_the_blob(make_imaged, hostile):
    image = two_layer_image()
    pushed = hostile.serve_image("gone/img", "latest", image)
    del hostile.routes[f"/v2/gone/img/blobs/{image.layers[1].digest}"]
    imaged = await make_imaged(hostile.host)
    with pytest.raises(NotFound) as e:
        await imaged.pull(reference=pushed.ref)
    assert image.layers[1].digest in e.value.message
    assert temp_files(imaged) == []
