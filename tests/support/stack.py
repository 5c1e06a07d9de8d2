"""Running crio-py for tests: the whole `criopy run` supervisor, or one service, in short temp dirs.

A loaded machine (a compiler beside the test suite) makes everything slower,
and starting a Python process most of all: the fixtures ask for the services'
status from the test process itself (the code `criopy status` runs, without an
interpreter to start each time), wait long for readiness, and fail at once only
on what is really wrong: `criopy run` exiting, or a service restarting again
and again.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cri_api.v1 import api_pb2, api_pb2_grpc

from shared import cli, config_load
from shared.config import Config

REPO = Path(__file__).resolve().parents[2]
# How long crio-py may take to become ready, and a `criopy` command to finish, on a loaded machine.
READY_TIMEOUT = 120.0
COMMAND_TIMEOUT = 120.0
# Restarts of one service during one wait for readiness that make it a crash loop, not a slow start.
CRASH_LOOP_RESTARTS = 3

# A test that calls a daemon itself, as root, runs it with root counted as the frontend: the
# setting for running single services by hand (`[criopy.users] frontend = "root"`).
ROOT_AS_FRONTEND = ("--set", 'criopy.users.frontend="root"')


def root_as_frontend(config: Config | None = None) -> Config:
    """`config` (the defaults when none) with root counted as the frontend, for daemons a test calls itself."""
    config = config or Config()
    config.criopy.users.frontend = "root"
    return config


def short_tempdir(prefix: str = "cp-") -> Path:
    """A temp dir with a short path: unix socket paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@dataclass
class Dirs:
    base: Path

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def runroot(self) -> Path:
        return self.base / "run"

    @property
    def cni(self) -> Path:
        return self.base / "cni"

    @property
    def netns(self) -> Path:
        return self.base / "netns"

    @property
    def logs(self) -> Path:
        return self.base / "logs"

    @property
    def socket(self) -> Path:
        return self.base / "run" / "criopy.sock"

    @property
    def config_file(self) -> Path:
        return self.base / "criopy.conf"

    @property
    def config_dir(self) -> Path:
        return self.base / "criopy.conf.d"

    def make(self) -> "Dirs":
        # The frontend and imaged run as users of their own: they must get through the base (mkdtemp's 0700).
        self.base.chmod(0o755)
        for d in (self.root, self.runroot, self.cni, self.netns, self.logs, self.config_dir):
            d.mkdir(parents=True, exist_ok=True)
        if not self.config_file.exists():
            self.config_file.write_text("")
        return self

    def flags(self, *extra: str) -> list[str]:
        return [
            "--config", str(self.config_file), "--config-dir", str(self.config_dir),
            "--root", str(self.root), "--runroot", str(self.runroot), "--listen", str(self.socket),
            "--cni-config-dir", str(self.cni), "--netns-dir", str(self.netns), "--log-dir", str(self.logs),
            "--log-format", "json", *extra,
        ]


def criopy(dirs: Dirs, *args: str, extra_flags: tuple[str, ...] = (),
           timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "shared.cli", *dirs.flags(*extra_flags), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


@dataclass
class Stack:
    """A running `criopy run` and CRI clients on its socket."""

    dirs: Dirs
    process: subprocess.Popen[bytes]
    log_path: Path
    flags: tuple[str, ...] = ()
    env: dict[str, str] | None = None
    channel: grpc.Channel = field(init=False)
    _configs: dict[tuple[str, ...], Config] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._connect()

    def _connect(self) -> None:
        self.channel = grpc.insecure_channel(f"unix://{self.dirs.socket}")
        self.runtime = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.images = api_pb2_grpc.ImageServiceStub(self.channel)

    def status(self, timeout: float = COMMAND_TIMEOUT) -> dict[str, Any]:
        """What `criopy status --json` reports, asked from this process."""
        return status_of(self.config(), timeout)

    def config(self, *extra_flags: str) -> Config:
        """The configuration `criopy` commands read with this stack's flags (and `extra_flags`)."""
        if extra_flags not in self._configs:
            args = cli._parser().parse_args([*self.dirs.flags(*self.flags, *extra_flags), "status"])
            self._configs[extra_flags] = config_load.load(cli._sources(args))
        return self._configs[extra_flags]

    def pid(self, service: str) -> int:
        pid = self.status()[service].get("pid")
        assert pid, f"{service} is not running: {self.status()[service]}"
        return int(pid)

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> dict[str, Any]:
        """Every service up and ready, and the CRI socket answering."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        restarts: dict[str, int] | None = None
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"criopy run exited with {self.process.returncode}:\n{self.logs()}")
            last = self.status()
            now = {name: int(s.get("restarts") or 0) for name, s in last.items()}
            restarts = restarts or now
            looping = sorted(name for name in now if now[name] - restarts.get(name, 0) >= CRASH_LOOP_RESTARTS)
            if looping:
                raise AssertionError(f"{', '.join(looping)} keeps restarting: {last}\n{self.logs()[-4000:]}")
            if all(s.get("state") == "up" and s.get("ready") for s in last.values()):
                try:
                    self.runtime.Version(api_pb2.VersionRequest(), timeout=10)
                    return last
                except grpc.RpcError:
                    pass
            if time.monotonic() > deadline:
                raise AssertionError(f"crio-py did not become ready: {last}\n{self.logs()[-4000:]}")
            time.sleep(0.2)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def restart(self) -> None:
        """Start crio-py again on the same directories and flags, after `stop` (its log goes on)."""
        assert self.process.poll() is not None, "stop it first"
        self.process = _launch(self.dirs, self.log_path, self.flags, self.env, "ab")
        self._connect()
        self.wait_ready()

    def stop(self) -> int:
        self.channel.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def status_of(config: Config, timeout: float = COMMAND_TIMEOUT) -> dict[str, Any]:
    """`criopy status`'s report, made by its own code in a thread of this process (whatever loop runs here)."""
    result: dict[str, Any] = {}

    def ask() -> None:
        try:
            result["report"] = asyncio.run(cli._status(config))
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e

    thread = threading.Thread(target=ask, name="criopy-status", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"criopy status did not answer within {timeout:g}s")
    if "error" in result:
        raise result["error"]
    return result["report"]


def _launch(dirs: Dirs, log_path: Path, flags: tuple[str, ...], env: dict[str, str] | None,
            mode: str) -> subprocess.Popen[bytes]:
    with open(log_path, mode) as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "shared.cli", *dirs.flags(*flags), "run"],
            cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def start_stack(dirs: Dirs, *extra_flags: str, env: dict[str, str] | None = None) -> Stack:
    dirs.make()
    log_path = dirs.base / "criopy.log"
    process = _launch(dirs, log_path, extra_flags, env, "wb")
    stack = Stack(dirs, process, log_path, extra_flags, env)
    try:
        stack.wait_ready()
    except BaseException:
        stack.stop()
        raise
    return stack


def unmount_below(base: Path) -> None:
    """Unmount everything mounted under `base` (netns pins, overlays), deepest first."""
    prefix = str(base.resolve()) + "/"
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    for point in sorted({p for p in points if (p + "/").startswith(prefix)}, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)


def remove_dirs(dirs: Dirs) -> None:
    unmount_below(dirs.base)
    shutil.rmtree(dirs.base, ignore_errors=True)
