"""A full disk through the real socket: pulls fail with RESOURCE_EXHAUSTED naming the file system and leave
nothing behind, the same pull succeeds once there is room; a container whose log file system fills runs on.

The stack's --root is a small tmpfs mounted for the test (storaged's directory another one when the
blobs must fit but the unpacked layers must not); images come from a real docker-registry.
"""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from cri_api.v1 import api_pb2

from tests.e2e.test_foundation import wait_for
from tests.e2e.test_pods import CGROUP_PARENT, container_config, create, pod_config, run_pod
from tests.support import images
from tests.support.pods import bridge_stack
from tests.support.registry import Registry, start_registry
from tests.support.small_fs import resize, tmpfs
from tests.support.stack import Dirs, Stack, remove_dirs, short_tempdir, start_stack

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    with start_registry(tmp_path_factory.mktemp("diskfull-registry")) as reg:
        yield reg


@contextmanager
def small_root_stack(registry: Registry, root_size: str, storaged_size: str | None = None) -> Iterator[Stack]:
    """crio-py whose --root is a tmpfs of `root_size`, and storaged's directory one of its own if asked."""
    dirs = Dirs(short_tempdir("cpdf-"))
    try:
        with ExitStack() as mounts:
            mounts.enter_context(tmpfs(dirs.root, root_size))
            if storaged_size:
                mounts.enter_context(tmpfs(dirs.root / "storaged", storaged_size))
            stack = start_stack(dirs, "--set", f"crio.image.insecure_registries={json.dumps([registry.host])}")
            try:
                yield stack
            finally:
                stack.stop()
    finally:
        remove_dirs(dirs)


def pull(stack: Stack, ref: str) -> str:
    return stack.images.PullImage(api_pb2.PullImageRequest(image=api_pb2.ImageSpec(image=ref)), timeout=120).image_ref


def pull_error(stack: Stack, ref: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as failure:
        pull(stack, ref)
    return failure.value


def assert_nothing_partial(stack: Stack) -> None:
    """No blob, temporary file, layer, short link or image record is left in the stores."""
    root = stack.dirs.root
    for d in ("imaged/blobs/sha256", "imaged/blobs/tmp", "storaged/layers", "storaged/l", "storaged/tmp",
              "storaged/trash"):
        assert os.listdir(root / d) == [], d
    with sqlite3.connect(f"file:{root / 'imaged' / 'images.db'}?mode=ro", uri=True) as db:
        assert db.execute("SELECT id FROM images").fetchall() == []
        assert db.execute("SELECT name FROM names").fetchall() == []
    assert list(stack.images.ListImages(api_pb2.ListImagesRequest(), timeout=10).images) == []


def test_pull_that_fills_the_disk_while_downloading(registry: Registry):
    # Random data does not compress: 40 MiB of blobs to fetch into a 24 MiB root.
    big = images.push_big_image(registry, "diskfull/download", "latest", total_mb=40, layers=4, seed=11)
    with small_root_stack(registry, "24m") as stack:
        error = pull_error(stack, big.ref)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert f"file system mounted at {stack.dirs.root} (tmpfs)" in error.details()
        assert "layer sha256:" in error.details()
        assert_nothing_partial(stack)

        resize(stack.dirs.root, "160m")
        assert pull(stack, big.ref) == big.image_id
        listed = stack.images.ListImages(api_pb2.ListImagesRequest(), timeout=10).images
        assert [i.id for i in listed] == [big.image_id] and list(listed[0].repo_tags) == [big.ref]
        assert len(os.listdir(stack.dirs.root / "storaged" / "layers")) == len(big.layer_digests)


def test_pull_whose_unpacked_layers_do_not_fit(registry: Registry):
    # A few KiB of blobs that unpack to 24 MiB, onto a layer store of 8 MiB (a file system of its own):
    # the layers below the one that fails were unpacked, and must go again.
    image = images.Image([
        images.busybox_layer(),
        images.Layer(images.build_tar([images.file_entry("etc/motd", b"fits\n")])),
        images.Layer(images.build_tar([images.dir_entry("data"), images.file_entry("data/zeros", bytes(24 << 20))])),
    ])
    pushed = images.push_image(registry, "diskfull/unpack", "latest", image)
    assert pushed.size < 4 << 20
    with small_root_stack(registry, "64m", storaged_size="8m") as stack:
        error = pull_error(stack, pushed.ref)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        # The layer store's own file system is named, not the root's.
        assert f"file system mounted at {stack.dirs.root / 'storaged'} (tmpfs)" in error.details()
        assert "unpacking layer" in error.details()
        assert_nothing_partial(stack)

        resize(stack.dirs.root / "storaged", "64m")
        assert pull(stack, pushed.ref) == pushed.image_id
        status = stack.images.ImageStatus(api_pb2.ImageStatusRequest(image=api_pb2.ImageSpec(image=pushed.ref)),
                                          timeout=10).image
        assert status.id == pushed.image_id and status.size > 24 << 20
        assert len(os.listdir(stack.dirs.root / "storaged" / "layers")) == 3


# -- container logs ---------------------------------------------------------------------------------


def exec_out(stack: Stack, cid: str, *cmd: str) -> str:
    result = stack.runtime.ExecSync(api_pb2.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=10), timeout=30)
    assert result.exit_code == 0, result.stderr
    return result.stdout.decode()


def test_container_runs_on_while_its_log_file_system_is_full(registry: Registry):
    pushed = images.push_busybox_image(registry, "diskfull/busybox", "latest")
    with bridge_stack("cpdl-", CGROUP_PARENT, registry=registry) as stack, \
            tmpfs(stack.dirs.base / "podlogs", "256k") as log_dir:
        pull(stack, pushed.ref)
        pod = pod_config("logs")
        pod.log_directory = str(log_dir)
        pod.linux.security_context.namespace_options.network = api_pb2.NamespaceMode.NODE
        pod_id = run_pod(stack, pod)
        # A line every millisecond or so, its number also kept (renamed into place: never read half
        # written) in the container's own file system.
        script = ('i=0; while :; do i=$((i+1)); echo "line $i $(printf %0150d 0)"; echo $i > /tmp/n; '
                  'mv /tmp/n /tmp/count; usleep 1000; done')
        cid = create(stack, pod_id, pod, container_config("chatty", pushed.ref, ["sh", "-c", script]))
        stack.runtime.StartContainer(api_pb2.StartContainerRequest(container_id=cid), timeout=30)
        log_file = log_dir / "chatty.log"

        def lines_later(n: int) -> None:
            counted = int(exec_out(stack, cid, "cat", "/tmp/count"))
            assert wait_for(lambda: int(exec_out(stack, cid, "cat", "/tmp/count")) > counted + n, timeout=60)

        assert wait_for(lambda: os.statvfs(log_dir).f_bavail == 0, timeout=60), "the log file system never filled"
        lines_later(100)  # the last page filled
        full_size = log_file.stat().st_size
        # Hundreds of lines later, none of them could be logged, and the container is still at it.
        lines_later(300)
        assert log_file.stat().st_size == full_size
        status = stack.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid, verbose=True),
                                               timeout=10)
        assert status.status.state == api_pb2.ContainerState.CONTAINER_RUNNING
        pid = json.loads(status.info["info"])["pid"]
        assert pid and Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] not in ("Z", "X")

        # Room again: lines the container writes from now on reach the log.
        resize(log_dir, "8m")
        after = int(exec_out(stack, cid, "cat", "/tmp/count"))

        def logged_since() -> bool:
            numbers = [int(line.split()[4]) for line in log_file.read_text(errors="replace").splitlines()[-50:]
                       if line.split()[2:4] == ["F", "line"] and len(line.split()) > 4 and line.split()[4].isdigit()]
            return any(n > after for n in numbers)

        assert wait_for(logged_since, timeout=60), "no line reached the log once there was room"
        assert log_file.stat().st_size > full_size
        state = stack.runtime.ContainerStatus(api_pb2.ContainerStatusRequest(container_id=cid), timeout=10).status.state
        assert state == api_pb2.ContainerState.CONTAINER_RUNNING
