"""The frontend process loads the frontend's code and the common library, never a daemon's."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import grpc
import pytest
from cri_api.v1 import api_pb2, api_pb2_grpc

from tests.support.stack import REPO, Dirs, remove_dirs, short_tempdir

pytestmark = pytest.mark.root

OTHER_PROCESSES = ("services.imaged", "services.storaged", "services.runtimed", "services.netd", "shared.supervisor")
MARKER = "loaded modules: "
# `criopy service frontend`, which prints at exit every module it ever loaded.
RUN_FRONTEND = (
    "import atexit, json, runpy, sys\n"
    f"atexit.register(lambda: print({MARKER!r} + json.dumps(sorted(sys.modules)), file=sys.stderr, flush=True))\n"
    "sys.argv[0] = 'criopy'\n"
    "runpy.run_module('shared.cli', run_name='__main__')\n"
)


def test_a_frontend_process_imports_no_daemon_code() -> None:
    dirs = Dirs(short_tempdir("fe-")).make()
    process = subprocess.Popen(
        [sys.executable, "-c", RUN_FRONTEND, *dirs.flags(), "service", "frontend"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not dirs.socket.exists():
            assert process.poll() is None, "the frontend exited"
            assert time.monotonic() < deadline, "the frontend did not create its socket"
            time.sleep(0.1)
        # Calls that reach each daemon's client code (the daemons are not running: they fail).
        with grpc.insecure_channel(f"unix://{dirs.socket}") as channel:
            runtime = api_pb2_grpc.RuntimeServiceStub(channel)
            images = api_pb2_grpc.ImageServiceStub(channel)
            for call in (lambda: runtime.Version(api_pb2.VersionRequest(), timeout=1),
                         lambda: runtime.Status(api_pb2.StatusRequest(), timeout=2),
                         lambda: runtime.ListPodSandbox(api_pb2.ListPodSandboxRequest(), timeout=1),
                         lambda: images.ListImages(api_pb2.ListImagesRequest(), timeout=1)):
                try:
                    call()
                except grpc.RpcError:
                    pass
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _out, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            _out, stderr = process.communicate()
        remove_dirs(dirs)
    lines = [line for line in stderr.splitlines() if line.startswith(MARKER)]
    assert lines, f"the frontend did not exit cleanly: {stderr[-2000:]}"
    modules = json.loads(lines[-1].removeprefix(MARKER))
    assert "services.frontend.service" in modules and "services.frontend.sandbox_run" in modules
    loaded = sorted(m for m in modules if m.startswith(OTHER_PROCESSES))
    assert loaded == [], f"the frontend loaded code of other processes: {loaded}"
