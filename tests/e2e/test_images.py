"""The CRI ImageService through the real socket: pulls from docker-registry, unpacked by storaged."""

from __future__ import annotations

import base64
import json
import os
import signal
import sqlite3
import time
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from cri_api.v1 import api_pb2

from tests.e2e.test_restart_drill import _restart
from tests.support import images
from tests.support.hostile_registry import HostileRegistry
from tests.support.registry import PASSWORD, USERNAME, Registry, free_port, launch_registry
from tests.support.stack import Dirs, Stack, remove_dirs, short_tempdir, start_stack

pytestmark = pytest.mark.root


class Catalog:
    def __init__(self, reg: Registry) -> None:
        self.busybox = images.push_busybox_image(reg, "e2e/busybox", "latest")
        self.alias = images.push_busybox_image(reg, "e2e/busybox", "alias")
        self.multi = images.push_multi_layer_image(reg, "e2e/multilayer", "latest")
        self.whiteout = images.push_whiteout_image(reg, "e2e/whiteout", "latest")
        self.user = images.push_user_image(reg, "e2e/user", "latest")
        self.index = images.push_multiplatform_image(reg, "e2e/multiarch", "latest")
        self.zstd = images.push_zstd_image(reg, "e2e/zstd", "latest")
        self.short = images.push_busybox_image(reg, "busybox", "latest")


@pytest.fixture(scope="module")
def registries(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, Registry, HostileRegistry]]:
    plain = launch_registry(tmp_path_factory.mktemp("e2e-registry"))
    basic = None
    hostile = HostileRegistry()
    try:
        basic = launch_registry(tmp_path_factory.mktemp("e2e-basic"), auth="basic", storage_dir=plain.storage_dir)
        yield plain, basic, hostile
    finally:
        hostile.stop()
        if basic is not None:
            basic.stop()
        plain.stop()


@pytest.fixture(scope="module")
def catalog(registries: tuple[Registry, Registry, HostileRegistry]) -> Catalog:
    return Catalog(registries[0])


@pytest.fixture(scope="module")
def image_stack(registries: tuple[Registry, Registry, HostileRegistry], catalog: Catalog) -> Iterator[Stack]:
    plain, basic, hostile = registries
    dirs = Dirs(short_tempdir("cpi-")).make()
    conf = dirs.base / "registries.conf"
    conf.write_text(f'unqualified-search-registries = ["{plain.host}"]\n')
    (dirs.cni / "10-test.conflist").write_text(json.dumps(
        {"cniVersion": "1.0.0", "name": "criopy-test", "plugins": [{"type": "loopback"}]}))
    insecure = json.dumps([plain.host, basic.host, hostile.host])
    stack = start_stack(dirs, "--registries-conf", str(conf), "--set", f"crio.image.insecure_registries={insecure}",
                        "--set", 'crio.image.image_platform="linux/amd64"')
    try:
        yield stack
    finally:
        stack.stop()
        remove_dirs(dirs)


def spec(ref: str) -> api_pb2.ImageSpec:
    return api_pb2.ImageSpec(image=ref)


def pull(stack: Stack, ref: str, auth: api_pb2.AuthConfig | None = None) -> str:
    response = stack.images.PullImage(api_pb2.PullImageRequest(image=spec(ref), auth=auth), timeout=60)
    return response.image_ref


def status(stack: Stack, ref: str, verbose: bool = False) -> api_pb2.ImageStatusResponse:
    return stack.images.ImageStatus(api_pb2.ImageStatusRequest(image=spec(ref), verbose=verbose), timeout=10)


def listed(stack: Stack, ref: str = "") -> list[api_pb2.Image]:
    request = api_pb2.ListImagesRequest(filter=api_pb2.ImageFilter(image=spec(ref))) if ref else api_pb2.ListImagesRequest()
    return list(stack.images.ListImages(request, timeout=10).images)


def remove(stack: Stack, ref: str) -> None:
    stack.images.RemoveImage(api_pb2.RemoveImageRequest(image=spec(ref)), timeout=30)


def rpc_error(call, *args) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as e:
        call(*args)
    return e.value


def test_pull_list_status_of_a_single_layer_image(image_stack: Stack, catalog: Catalog) -> None:
    img = catalog.busybox
    image_ref = pull(image_stack, img.ref)
    assert image_ref == img.config_digest
    found = [i for i in listed(image_stack) if i.id == img.config_digest]
    assert len(found) == 1
    assert img.ref in found[0].repo_tags and img.digest_ref in found[0].repo_digests
    built = images.Image([images.busybox_layer()])
    assert found[0].size == len(built.config_bytes()) + len(built.manifest_bytes()) + len(built.layers[0].tar)

    st = status(image_stack, img.ref, verbose=True)
    assert st.image.id == img.config_digest
    assert not st.image.HasField("uid") and st.image.username == ""
    info = json.loads(st.info["info"])
    assert info["imageSpec"]["config"]["Cmd"] == ["/bin/sh"]
    assert info["imageSpec"]["rootfs"]["diff_ids"] == img.diff_ids
    assert info["topLayer"], "storaged's chain id is recorded"
    assert [i.id for i in listed(image_stack, img.ref)] == [img.config_digest]
    # The process that talked to the registry holds no capability at all.
    assert image_stack.status()["imaged"]["capabilities"] == []


def test_missing_image_status_is_empty_not_an_error(image_stack: Stack, registries) -> None:
    response = status(image_stack, f"{registries[0].host}/e2e/none:latest")
    assert not response.HasField("image")
    assert listed(image_stack, f"{registries[0].host}/e2e/none:latest") == []


@pytest.mark.parametrize("which", ["multi", "whiteout", "index", "zstd"])
def test_pull_each_kind(image_stack: Stack, catalog: Catalog, which: str) -> None:
    img = getattr(catalog, which)
    assert pull(image_stack, img.ref) == img.config_digest
    assert status(image_stack, img.ref).image.id == img.config_digest


def test_user_image_reports_its_username(image_stack: Stack, catalog: Catalog) -> None:
    pull(image_stack, catalog.user.ref)
    assert status(image_stack, catalog.user.ref).image.username == "app"


def test_short_name_and_tag_then_digest(image_stack: Stack, catalog: Catalog) -> None:
    assert pull(image_stack, "busybox") == catalog.short.config_digest
    assert pull(image_stack, catalog.short.digest_ref) == catalog.short.config_digest
    st = status(image_stack, "busybox:latest").image
    assert catalog.short.ref in st.repo_tags and catalog.short.digest_ref in st.repo_digests


def test_remove_by_tag_digest_and_id(image_stack: Stack, catalog: Catalog) -> None:
    a, b = catalog.busybox, catalog.alias
    pull(image_stack, a.ref)
    pull(image_stack, b.ref)
    remove(image_stack, a.ref)  # shared with another tag: only untagged
    st = status(image_stack, b.ref).image
    assert st.id == a.config_digest and a.ref not in st.repo_tags and b.ref in st.repo_tags
    remove(image_stack, b.config_digest)
    assert not status(image_stack, b.ref).HasField("image")
    remove(image_stack, b.config_digest)  # already gone: not an error

    pull(image_stack, catalog.multi.ref)
    remove(image_stack, catalog.multi.digest_ref)
    assert not status(image_stack, catalog.multi.ref).HasField("image")
    # Pulled again after removal: fetched and unpacked again.
    assert pull(image_stack, catalog.multi.ref) == catalog.multi.config_digest


def test_image_fs_info_reports_real_usage(image_stack: Stack, catalog: Catalog, registries) -> None:
    fresh = images.push_big_image(registries[0], "e2e/fsinfo", "latest", total_mb=4, layers=2, seed=7)
    before = image_stack.images.ImageFsInfo(api_pb2.ImageFsInfoRequest(), timeout=10)
    pull(image_stack, fresh.ref)
    after = image_stack.images.ImageFsInfo(api_pb2.ImageFsInfoRequest(), timeout=10)
    fs_before, fs_after = before.image_filesystems[0], after.image_filesystems[0]
    assert fs_after.fs_id.mountpoint.startswith(str(image_stack.dirs.root))
    # The compressed blobs and the unpacked layers both count: at least twice the 4 MiB of data.
    assert fs_after.used_bytes.value - fs_before.used_bytes.value >= 2 * 4 * 1024 * 1024
    assert fs_after.inodes_used.value > fs_before.inodes_used.value
    assert fs_after.timestamp > 0


def test_errors_name_image_and_registry(image_stack: Stack, registries) -> None:
    plain, basic, _ = registries
    ref = f"{plain.host}/e2e/busybox:no-such-tag"
    err = rpc_error(pull, image_stack, ref)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert ref in err.details() and plain.host in err.details()

    basic_ref = f"{basic.host}/e2e/busybox:latest"
    err = rpc_error(pull, image_stack, basic_ref)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and basic.host in err.details()
    err = rpc_error(pull, image_stack, basic_ref, api_pb2.AuthConfig(username=USERNAME, password="wrong"))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    token = base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
    assert pull(image_stack, basic_ref, api_pb2.AuthConfig(auth=token)).startswith("sha256:")

    err = rpc_error(pull, image_stack, "Not/A:Valid Ref")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT

    # A registry nobody answers on: imaged retries it with backoff, then the kubelet hears of it
    # (and backs off itself) rather than the whole pull being repeated until its deadline.
    closed = f"127.0.0.1:{free_port()}"
    err = rpc_error(pull, image_stack, f"{closed}/e2e/busybox:latest")
    assert err.code() == grpc.StatusCode.UNAVAILABLE and closed in err.details()


def test_blob_digest_mismatch_fails_and_is_not_listed(image_stack: Stack, registries) -> None:
    hostile = registries[2]
    image = images.Image([images.busybox_layer(), images.platform_layer("bad-digest")])
    top = image.layers[1]
    pushed = hostile.serve_image("e2e/bad-digest", "latest", image, blob_bodies={top.digest: top.blob[::-1]})
    err = rpc_error(pull, image_stack, pushed.ref)
    assert err.code() == grpc.StatusCode.DATA_LOSS and top.digest in err.details()
    assert not any(i.id == pushed.config_digest for i in listed(image_stack))
    blob = image_stack.dirs.root / "imaged" / "blobs" / "sha256" / top.digest.split(":")[1]
    assert not blob.exists()


ESCAPES = {
    "dot-dot": lambda out: [images.file_entry("../../../../../../../../" + out.lstrip("/") + "/pwned", b"x")],
    "symlink then file": lambda out: [images.symlink_entry("evil", out), images.file_entry("evil/pwned", b"x")],
    "hardlink outside": lambda out: [images.hardlink_entry("h", out + "/victim")],
}


@pytest.mark.parametrize("case", list(ESCAPES))
def test_hostile_layers_fail_cleanly(image_stack: Stack, registries, tmp_path: Path, case: str) -> None:
    hostile = registries[2]
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"original")
    evil = images.Layer(images.build_tar([images.dir_entry("ok"), *ESCAPES[case](str(outside))]))
    pushed = hostile.serve_image(f"e2e/escape-{case.replace(' ', '-')}", "latest",
                                 images.Image([images.busybox_layer(), evil]))
    err = rpc_error(pull, image_stack, pushed.ref)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
    assert (outside / "victim").read_bytes() == b"original"
    assert not any(i.id == pushed.config_digest for i in listed(image_stack))


def test_pull_interrupted_by_killing_imaged_is_repeated(image_stack: Stack, registries) -> None:
    hostile = registries[2]
    unique = images.Layer(images.build_tar([images.file_entry("data", os.urandom(2 * 1024 * 1024))]))
    image = images.Image([images.busybox_layer(), unique])
    pushed = hostile.serve_image("e2e/killed", "latest", image)
    stalled = hostile.routes[f"/v2/e2e/killed/blobs/{unique.digest}"]
    stalled.stall_after = 100_000
    future = image_stack.images.PullImage.future(api_pb2.PullImageRequest(image=spec(pushed.ref)), timeout=120)
    deadline = time.time() + 30
    while not stalled.hits:
        assert time.time() < deadline, "imaged never asked for the layer"
        time.sleep(0.05)
    old_pid = image_stack.pid("imaged")
    os.kill(old_pid, signal.SIGKILL)
    stalled.stall_after = None
    # The CRI call is idempotent end to end: it either survives the restart or is repeated.
    try:
        image_ref = future.result().image_ref
    except grpc.RpcError:
        image_ref = pull(image_stack, pushed.ref)
    assert image_ref == pushed.config_digest
    assert image_stack.pid("imaged") != old_pid
    assert status(image_stack, pushed.ref).image.id == pushed.config_digest
    tmp = image_stack.dirs.root / "imaged" / "blobs" / "tmp"
    assert list(tmp.iterdir()) == []


def test_size_is_the_layers_unpacked_not_the_blobs_downloaded(image_stack: Stack, registries) -> None:
    # A megabyte of zeros compresses to about a kilobyte: sizes that cannot be mistaken for each other.
    zeros = images.Layer(images.build_tar([images.dir_entry("data"), images.file_entry("data/zeros", bytes(4 << 20))]))
    image = images.Image([images.busybox_layer(), zeros])
    pushed = images.push_image(registries[0], "e2e/compressible", "latest", image)
    assert len(zeros.blob) < len(zeros.tar) // 100
    pull(image_stack, pushed.ref)

    # What storaged measured when it unpacked the layers (each layer's uncompressed tar).
    layers_dir = image_stack.dirs.root / "storaged" / "layers"
    measured = {json.loads(p.read_text())["diff_id"]: json.loads(p.read_text())["tar_size"]
                for p in layers_dir.glob("*/layer.json")}
    assert [measured[d] for d in pushed.diff_ids] == [len(l.tar) for l in image.layers]
    # CRI-O's size: config and manifest, and the layers as unpacked; nothing like the blobs' size.
    expected = len(image.config_bytes()) + len(image.manifest_bytes()) + sum(measured[d] for d in pushed.diff_ids)
    assert status(image_stack, pushed.ref).image.size == expected
    assert [i.size for i in listed(image_stack, pushed.ref)] == [expected]
    assert expected > 4 * pushed.size

    # An image recorded before sizes were kept (found by imaged when it starts) gets its size from
    # storaged when first asked, once.
    db = sqlite3.connect(image_stack.dirs.root / "imaged" / "images.db")
    try:
        with db:
            db.execute("UPDATE images SET meta_size = NULL, unpacked_size = NULL WHERE id = ?", (pushed.image_id,))
        _restart(image_stack, "imaged")
        legacy = len(image.config_bytes()) + sum(measured[d] for d in pushed.diff_ids)
        assert [i.size for i in listed(image_stack) if i.id == pushed.image_id] == [legacy]
        assert db.execute("SELECT unpacked_size FROM images WHERE id = ?", (pushed.image_id,)).fetchone() == \
            (sum(measured[d] for d in pushed.diff_ids),)
        assert status(image_stack, pushed.ref).image.size == legacy
    finally:
        db.close()


def test_pull_past_its_deadline_is_deadline_exceeded(image_stack: Stack, registries) -> None:
    hostile = registries[2]
    pushed = hostile.serve_image("e2e/slow", "latest", images.Image([images.busybox_layer()]))
    hostile.routes[f"/v2/e2e/slow/manifests/latest"].delay = 5.0
    request = api_pb2.PullImageRequest(image=spec(pushed.ref))
    log_start = len(image_stack.logs())
    # Very short deadlines (the CRI validation suite's) and one long enough for crio-py to answer itself.
    for timeout in (0.001, 0.05, 0.5) * 3:
        with pytest.raises(grpc.RpcError) as e:
            image_stack.images.PullImage(request, timeout=timeout)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (timeout, e.value.details())
    answered = [json.loads(line) for line in image_stack.logs()[log_start:].splitlines()
                if '"cri_call_failed"' in line and "PullImage" in line]
    # crio-py's own answers (those that beat the client's timer) say DEADLINE_EXCEEDED too, and what was waited on.
    assert answered and {a["code"] for a in answered} == {"DEADLINE_EXCEEDED"}, answered
    assert all("imaged.pull" in a["error"] for a in answered)


class LyingLayer(images.Layer):
    """A layer whose image config declares a diff_id its content does not have: storaged refuses to unpack it."""

    @property
    def diff_id(self) -> str:
        return images.sha256(b"not this layer")


def wait_for_log(stack: Stack, since: int, event: str, timeout: float = 60.0, **fields: str) -> dict:
    deadline = time.time() + timeout
    while True:
        for line in stack.logs()[since:].splitlines():
            if f'"{event}"' in line:
                entry = json.loads(line)
                if all(entry.get(k) == v for k, v in fields.items()):
                    return entry
        assert time.time() < deadline, f"no {event} {fields} in the log"
        time.sleep(0.1)


def test_a_pull_whose_later_layer_fails_leaves_no_layer(image_stack: Stack, registries) -> None:
    hostile = registries[2]
    bottom = images.platform_layer("early-bottom")
    top = images.platform_layer("early-top")
    pushed = hostile.serve_image("e2e/early", "latest", images.Image([bottom, top]),
                                 blob_bodies={top.digest: top.blob[::-1]})
    # The top layer comes late (and wrong): the bottom one is stored, and unpacked, before the pull fails.
    hostile.routes[f"/v2/e2e/early/blobs/{top.digest}"].delay = 1.5
    since = len(image_stack.logs())
    assert rpc_error(pull, image_stack, pushed.ref).code() == grpc.StatusCode.DATA_LOSS
    # A bottom layer's chain id is its diff id.
    wait_for_log(image_stack, since, "layer_removed", chain_id=pushed.diff_ids[0])
    layers_dir = image_stack.dirs.root / "storaged" / "layers"
    assert [p for p in layers_dir.glob("*/layer.json") if json.loads(p.read_text())["diff_id"] in pushed.diff_ids] == []
    assert not any(i.id == pushed.config_digest for i in listed(image_stack))


def test_a_pull_the_kubelet_gave_up_on_still_completes(image_stack: Stack, registries) -> None:
    hostile = registries[2]
    image = images.Image([images.busybox_layer(), images.platform_layer("given-up")])
    pushed = hostile.serve_image("e2e/given-up", "latest", image)
    hostile.routes[f"/v2/e2e/given-up/blobs/{image.layers[1].digest}"].delay = 3.0
    with pytest.raises(grpc.RpcError) as e:
        image_stack.images.PullImage(api_pb2.PullImageRequest(image=spec(pushed.ref)), timeout=1)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Nobody waits for it any more, and it is carried to its end: the kubelet's retry finds the image.
    deadline = time.time() + 60
    while not status(image_stack, pushed.ref).HasField("image"):
        assert time.time() < deadline, "the pull given up on never completed"
        time.sleep(0.2)
    assert pull(image_stack, pushed.ref) == pushed.image_id


def test_a_pull_the_kubelet_gave_up_on_is_undone_when_it_fails(image_stack: Stack, registries) -> None:
    hostile = registries[2]
    lying = LyingLayer(images.build_tar([images.file_entry("etc/lie", b"lie\n")]))
    pushed = hostile.serve_image("e2e/given-up-bad", "latest", images.Image([images.busybox_layer(), lying]))
    hostile.routes[f"/v2/e2e/given-up-bad/blobs/{lying.digest}"].delay = 3.0
    since = len(image_stack.logs())
    with pytest.raises(grpc.RpcError) as e:
        image_stack.images.PullImage(api_pb2.PullImageRequest(image=spec(pushed.ref)), timeout=1)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Its unpack fails after the kubelet gave up: the undo still runs, and no record that never
    # became ready stays behind.
    wait_for_log(image_stack, since, "image_pull_abandoned", image_id=pushed.image_id)
    db = sqlite3.connect(f"file:{image_stack.dirs.root / 'imaged' / 'images.db'}?mode=ro", uri=True)
    try:
        assert db.execute("SELECT id FROM images WHERE id = ?", (pushed.image_id,)).fetchall() == []
    finally:
        db.close()
    assert not (image_stack.dirs.root / "imaged" / "blobs" / "sha256" / lying.digest.split(":")[1]).exists()


def test_a_tag_moves_to_the_new_image_only_once_it_is_ready(image_stack: Stack, registries) -> None:
    hostile = registries[2]
    old = hostile.serve_image("e2e/moving", "v1", images.Image([images.busybox_layer(), images.platform_layer("old")]))
    assert pull(image_stack, old.ref) == old.image_id
    # The tag moves to an image that cannot be unpacked: the failed pull leaves the tag where it was.
    lying = LyingLayer(images.build_tar([images.file_entry("etc/lie", b"lie\n")]))
    broken = hostile.serve_image("e2e/moving", "v1", images.Image([images.busybox_layer(), lying]))
    assert broken.ref == old.ref and broken.image_id != old.image_id
    assert rpc_error(pull, image_stack, broken.ref).code() == grpc.StatusCode.INVALID_ARGUMENT
    st = status(image_stack, old.ref)
    assert st.image.id == old.image_id and old.ref in st.image.repo_tags
    assert [i.id for i in listed(image_stack, old.ref)] == [old.image_id]
    # Moved to an image that works, the tag follows it; the old image stays, by its id.
    new = hostile.serve_image("e2e/moving", "v1", images.Image([images.busybox_layer(), images.platform_layer("new")]))
    assert pull(image_stack, new.ref) == new.image_id
    assert status(image_stack, new.ref).image.id == new.image_id
    assert list(status(image_stack, old.image_id).image.repo_tags) == []
