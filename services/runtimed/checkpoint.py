"""Checkpointing a running container with CRIU through `runc checkpoint`.

The archive written to the requested location has CRI-O's layout, so tools
that read CRI-O checkpoints (checkpointctl) understand it:
  checkpoint/      CRIU's image files
  config.dump      the container's identity (id, name, image, creation time)
  spec.dump        the OCI runtime spec the container runs with
  rootfs-diff.tar  files changed in the container's writable layer
  deleted.files    files the container deleted from its image (JSON list)
  dump.log         CRIU's log of the dump
The container keeps running (the kubelet's forensic checkpointing).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import stat
import time
from typing import Any

import structlog

from services.runtimed import exits
from services.runtimed.context import Context
from services.runtimed.runc import Runc
from shared import programs
from shared.errors import FailedPrecondition, Internal, InvalidArgument

log = structlog.get_logger(__name__)

DEFAULT_TIMEOUT = 300.0
_OVERLAY_WHITEOUT_DEV = 0  # a whiteout is a 0:0 character device
_criu_verdict: tuple[bool, str] | None = None


async def checkpoint_container(ctx: Context, container_id: str, location: str, upper_dir: str | None,
                               timeout: float) -> dict[str, Any]:
    """Checkpoint a running container into the archive `location`, under its lock."""
    rec = ctx.records.container(container_id, visible=True)
    async with ctx.records.lock(rec["id"]):
        await exits.refresh(ctx, rec)
        return await checkpoint(
            ctx.runc(rec), rec, location=location, upper_dir=upper_dir,
            work_root=os.path.join(ctx.run_dir, "checkpoints"),
            timeout=float(timeout) if timeout and timeout > 0 else DEFAULT_TIMEOUT)


def criu_path() -> str | None:
    return shutil.which("criu", path=os.environ.get("PATH") or "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")


async def criu_usable() -> tuple[bool, str]:
    """Whether CRIU is installed and can run on this kernel (`criu check`); the reason when not."""
    global _criu_verdict
    if _criu_verdict is not None:
        return _criu_verdict
    path = criu_path()
    if path is None:
        return False, "CRIU is not installed (the criu binary is not in PATH); install the criu package"
    result = await programs.run([path, "check"], timeout=30)
    if result.returncode != 0:
        lines = [ln for ln in (result.stderr + result.stdout).decode(errors="replace").splitlines() if ln.strip()]
        reason = "; ".join(lines[-3:]) or f"exit status {result.returncode}"
        _criu_verdict = (False, f"CRIU cannot checkpoint on this machine (criu check failed: {reason})")
    else:
        _criu_verdict = (True, "")
    return _criu_verdict


def check_location(location: str) -> str:
    """The archive path: absolute, in an existing directory, not a directory itself."""
    if not location:
        raise InvalidArgument("checkpoint location is required")
    if "\0" in location or not os.path.isabs(location):
        raise InvalidArgument(f"checkpoint location must be an absolute path: {location!r}")
    location = os.path.normpath(location)
    if os.path.isdir(location):
        raise InvalidArgument(f"checkpoint location {location} is a directory; name the archive file")
    if not os.path.isdir(os.path.dirname(location)):
        raise InvalidArgument(f"the directory of checkpoint location {location} does not exist")
    return location


async def checkpoint(runc: Runc, rec: dict[str, Any], *, location: str, upper_dir: str | None,
                     work_root: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Dump the running container `rec` with CRIU and write the archive to `location`."""
    location = check_location(location)
    if rec.get("state") != "running":
        raise FailedPrecondition(f"container {rec['id']} is not running; only a running container can be checkpointed")
    usable, reason = await criu_usable()
    if not usable:
        raise FailedPrecondition(reason)
    work = os.path.join(work_root, f"{rec['id'][:12]}-{secrets.token_hex(4)}")
    images = os.path.join(work, "checkpoint")
    os.makedirs(images, mode=0o700)
    try:
        args = [runc.path, *runc.global_args(), "checkpoint", "--image-path", images, "--work-path", work,
                "--leave-running", "--file-locks", "--tcp-established", rec["id"]]
        started = time.monotonic()
        result = await programs.run(args, timeout=timeout)
        if result.returncode != 0:
            raise Internal(f"runc checkpoint of {rec['id']} failed: {_failure(result, work)}")
        log.info("container_checkpointed", container_id=rec["id"], seconds=round(time.monotonic() - started, 3))
        await asyncio.to_thread(_write_archive, rec, work, images, upper_dir, location)
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)
    return {"location": location, "size": os.path.getsize(location)}


def _failure(result: programs.Completed, work: str) -> str:
    text = result.stderr.decode(errors="replace").strip().splitlines()
    message = text[-1] if text else f"exit status {result.returncode}"
    try:
        with open(os.path.join(work, "dump.log"), errors="replace") as f:
            errors = [ln.strip() for ln in f if "Error" in ln]
        if errors:
            message += f" (criu: {'; '.join(errors[-3:])})"
    except OSError:
        pass
    return message


def _write_archive(rec: dict[str, Any], work: str, images: str, upper_dir: str | None, location: str) -> None:
    config = {"id": rec["id"], "name": rec.get("name", ""), "rootfsImageName": rec.get("image_name", ""),
              "rootfsImageRef": rec.get("image_id", ""), "createdTime": rec.get("created_at", 0),
              "checkpointedTime": time.time_ns(), "runtime": "runc"}
    with open(os.path.join(work, "config.dump"), "w") as f:
        json.dump(config, f)
    shutil.copyfile(os.path.join(rec["bundle"], "config.json"), os.path.join(work, "spec.dump"))
    deleted: list[str] = []
    if upper_dir and os.path.isdir(upper_dir):
        deleted = _write_rootfs_diff(upper_dir, os.path.join(work, "rootfs-diff.tar"))
    with open(os.path.join(work, "deleted.files"), "w") as f:
        json.dump(deleted, f)
    tmp = f"{location}.{secrets.token_hex(4)}.tmp"
    try:
        import tarfile  # checkpoints are rare: not imported at start

        with tarfile.open(tmp, "w") as tar:
            tar.add(images, arcname="checkpoint")
            for name in ("config.dump", "spec.dump", "rootfs-diff.tar", "deleted.files", "dump.log"):
                path = os.path.join(work, name)
                if os.path.exists(path):
                    tar.add(path, arcname=name)
        os.chmod(tmp, 0o600)
        os.replace(tmp, location)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_rootfs_diff(upper_dir: str, target: str) -> list[str]:
    """Tar the writable layer's files; return the paths it deleted (overlay whiteouts)."""
    import tarfile

    deleted: list[str] = []
    with tarfile.open(target, "w") as tar:
        for root, dirs, files in os.walk(upper_dir):
            for name in sorted(dirs + files):
                path = os.path.join(root, name)
                rel = os.path.relpath(path, upper_dir)
                st = os.lstat(path)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == _OVERLAY_WHITEOUT_DEV:
                    deleted.append("/" + rel)
                    continue
                tar.add(path, arcname=rel, recursive=False)
    return deleted
