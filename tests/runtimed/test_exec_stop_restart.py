"""exec_sync, log reopen, stop escalation, shared PID namespace, and restarting runtimed."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from shared.errors import DeadlineExceeded, FailedPrecondition
from tests.runtimed.conftest import (IMAGE, conmon_pids, container_config, new_container,
                                     new_pod, read_log, wait_exited)

pytestmark = pytest.mark.root


async def test_exec_sync_output_exit_code_and_timeout(runtimed, cgroup_parent, rootfs):
    pod = await new_pod(runtimed, cgroup_parent)
    cid = await new_container(runtimed, pod, rootfs, container_config(command=["sleep", "600"],
                                                                      envs=[{"key": "X", "value": "from-config"}]))
    result = await runtimed.exec_sync(container_id=cid, cmd=["sh", "-c", "echo $X; echo oops >&2; exit 4"], timeout=10)
    assert result == {"stdout": b"from-config\n", "stderr": b"oops\n", "exit_code": 4}
    with pytest.raises(DeadlineExceeded):
        await runtimed.exec_sync(container_id=cid, cmd=["sleep", "60"], timeout=1)
    # The timed-out process is gone.
    result = await runtimed.exec_sync(container_id=cid, cmd=["ps", "-o", "args"], timeout=10)
    assert "sleep 60" not in result["stdout"].decode().splitlines(), result["stdout"]
    await runtimed.stop_container(container_id=cid, timeout=0)
    with pytest.raises(FailedPrecondition):
        await runtimed.exec_sync(container_id=cid, cmd=["true"], timeout=5)


async def test_reopen_log(runtimed, cgroup_parent, rootfs):
    pod = await new_pod(runtimed, cgroup_parent)
    cid = await new_container(runtimed, pod, rootfs, container_config(
        command=["sh", "-c", "i=0; while true; do echo line$i; i=$((i+1)); sleep 0.1; done"]))
    log_path = (await runtimed.container_status(container_id=cid))["status"]["log_path"]
    for _ in range(100):
        if "line2" in read_log(log_path):
            break
        await asyncio.sleep(0.05)
    rotated = log_path + ".1"
    os.rename(log_path, rotated)
    await runtimed.reopen_log(container_id=cid)
    for _ in range(100):
        if os.path.exists(log_path) and read_log(log_path):
            break
        await asyncio.sleep(0.05)
    new = read_log(log_path)
    old = read_log(rotated)
    assert new.startswith("line") and old.startswith("line0")
    assert int(new.split()[0][4:]) > int(old.split()[-1][4:]) - 1


async def test_stop_escalates_to_sigkill(runtimed, cgroup_parent, rootfs):
    pod = await new_pod(runtimed, cgroup_parent)
    stubborn = await new_container(runtimed, pod, rootfs, container_config(
        "stubborn", command=["sh", "-c", "trap '' TERM; while true; do sleep 0.2; done"]))
    polite = await new_container(runtimed, pod, rootfs, container_config(
        "polite", command=["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.2; done"]))
    custom = await new_container(runtimed, pod, rootfs, container_config(
        "custom", command=["sh", "-c", "trap 'exit 7' USR1; while true; do sleep 0.2; done"]),
        image={**IMAGE, "config": {**IMAGE["config"], "stop_signal": "SIGUSR1"}})
    await asyncio.sleep(0.5)  # let the shells install their traps
    await runtimed.stop_container(container_id=polite, timeout=10)
    await runtimed.stop_container(container_id=custom, timeout=10)
    await runtimed.stop_container(container_id=stubborn, timeout=1)
    statuses = {c: (await runtimed.container_status(container_id=c))["status"] for c in (stubborn, polite, custom)}
    assert statuses[polite]["exit_code"] == 0 and statuses[polite]["reason"] == "Completed"
    assert statuses[custom]["exit_code"] == 7
    assert statuses[stubborn]["exit_code"] == 137
    await runtimed.stop_container(container_id=stubborn, timeout=1)  # stopping again is fine


async def test_shared_pid_namespace(runtimed, cgroup_parent, rootfs):
    pod = await new_pod(runtimed, cgroup_parent, pid="POD")
    sc = {"namespace_options": {"pid": "POD"}}
    a = await new_container(runtimed, pod, rootfs, container_config("a", command=["sleep", "1234"], sc=sc))
    b = await new_container(runtimed, pod, rootfs, container_config("b", command=["sleep", "600"], sc=sc))
    result = await runtimed.exec_sync(container_id=b, cmd=["sh", "-c", "cat /proc/1/cmdline; echo; ps"], timeout=10)
    out = result["stdout"].decode()
    assert "catatonit" in out.splitlines()[0]
    assert "sleep 1234" in out
    # A container with its own PID namespace does not see them.
    c = await new_container(runtimed, pod, rootfs, container_config("c", command=["sleep", "600"],
                                                                    sc={"namespace_options": {"pid": "CONTAINER"}}))
    out = (await runtimed.exec_sync(container_id=c, cmd=["ps"], timeout=10))["stdout"].decode()
    assert "sleep 1234" not in out
    await runtimed.stop_sandbox(sandbox_id=pod)
    states = [(await runtimed.container_status(container_id=x))["status"]["state"] for x in (a, b, c)]
    assert states == ["CONTAINER_EXITED"] * 3
    assert (await runtimed.sandbox_status(sandbox_id=pod))["status"]["state"] == "SANDBOX_NOTREADY"


async def test_pod_sysctls_and_ipc(runtimed, cgroup_parent, rootfs):
    pod = await new_pod(runtimed, cgroup_parent, linux={"cgroup_parent": cgroup_parent,
                                                        "sysctls": {"kernel.shm_rmid_forced": "1"}})
    status_a = await new_container(runtimed, pod, rootfs, container_config(
        "a", command=["sh", "-c", "cat /proc/sys/kernel/shm_rmid_forced; readlink /proc/self/ns/ipc"]), start=True)
    st = await wait_exited(runtimed, status_a)
    lines = read_log(st["log_path"]).split()
    assert lines[0] == "1"
    assert lines[1] != os.readlink("/proc/self/ns/ipc")
    with pytest.raises(Exception):
        await new_pod(runtimed, cgroup_parent, name="bad", linux={"cgroup_parent": cgroup_parent,
                                                                   "sysctls": {"kernel.panic": "1"}})


async def test_restart_reattaches_and_picks_up_exits(lives, cgroup_parent, rootfs):
    first = await lives.start()
    pod = await new_pod(first, cgroup_parent)
    runner = await new_container(first, pod, rootfs, container_config("runner", command=["sleep", "600"]))
    quitter = await new_container(first, pod, rootfs, container_config(
        "quitter", command=["sh", "-c", "read x < /dev/shm/go 2>/dev/null; sleep 1; exit 5"]))
    # Simulate a SIGKILL of runtimed: drop it without any cleanup.
    await lives.stop()
    await asyncio.sleep(2)  # the quitter exits while no runtimed is running
    second = await lives.start()
    st = (await second.container_status(container_id=runner))["status"]
    assert st["state"] == "CONTAINER_RUNNING"
    result = await second.exec_sync(container_id=runner, cmd=["echo", "still here"], timeout=10)
    assert result["stdout"] == b"still here\n"
    st = (await second.container_status(container_id=quitter))["status"]
    assert st["state"] == "CONTAINER_EXITED" and st["exit_code"] == 5
    await second.stop_container(container_id=runner, timeout=0)
    assert (await second.container_status(container_id=runner))["status"]["exit_code"] == 137
    await second.remove_sandbox(sandbox_id=pod)
    assert conmon_pids(lives.base) == []


async def test_restart_finishes_or_undoes_in_flight_creates(lives, cgroup_parent, rootfs):
    first = await lives.start()
    pod = await new_pod(first, cgroup_parent)
    made = await new_container(first, pod, rootfs, container_config("made", command=["sleep", "600"]), start=False)
    half = (await first.reserve_container(sandbox_id=pod, config=container_config("half", command=["true"])))["id"]
    await lives.stop()
    records = Path(first.ctx.state_dir, "records", "containers")
    # As if killed after conmon created `made` but before the record said so.
    rec = json.loads((records / f"{made}.json").read_text())
    rec["state"] = "creating"
    (records / f"{made}.json").write_text(json.dumps(rec))
    # As if killed just after `half` started being created.
    rec = json.loads((records / f"{half}.json").read_text())
    rec.update(state="creating", bundle=os.path.join(first.ctx.state_dir, "containers", half))
    (records / f"{half}.json").write_text(json.dumps(rec))
    second = await lives.start()
    assert (await second.container_status(container_id=made))["status"]["state"] == "CONTAINER_CREATED"
    assert second.containers[half]["state"] == "reserved"
    await second.start_container(container_id=made)
    assert (await second.container_status(container_id=made))["status"]["state"] == "CONTAINER_RUNNING"
    await second.release_container(container_id=half)
    assert half not in second.containers


async def _container_whose_record_is_gone(lives, cgroup_parent, rootfs, name):
    """A running container, and runtimed stopped with the container's record deleted: (runtimed, pod, id)."""
    first = await lives.start()
    pod = await new_pod(first, cgroup_parent)
    cid = await new_container(first, pod, rootfs, container_config(name, command=["sleep", "600"]))
    await lives.stop()
    os.unlink(os.path.join(first.ctx.state_dir, "records", "containers", f"{cid}.json"))
    return first, pod, cid


async def test_a_container_whose_record_is_gone_is_found_again_and_removed(lives, cgroup_parent, rootfs):
    _first, pod, cid = await _container_whose_record_is_gone(lives, cgroup_parent, rootfs, "lost")
    second = await lives.start()
    # runc's container and its bundle's annotations say what it was; it was left running.
    [found] = await second.list_containers(filter={"pod_sandbox_id": pod})
    assert (found["id"], found["state"], found["metadata"]["name"]) == (cid, "CONTAINER_RUNNING", "lost")
    await second.remove_sandbox(sandbox_id=pod)
    assert not os.path.exists(os.path.join(second.ctx.state_dir, "runc", cid))
    assert conmon_pids(second.ctx.state_dir) == []


async def test_runc_containers_nothing_says_anything_of_are_deleted(lives, cgroup_parent, rootfs):
    first, pod, cid = await _container_whose_record_is_gone(lives, cgroup_parent, rootfs, "stray")
    # Not one of runtimed's: no annotation says it is a container of a pod.
    spec_path = Path(first.ctx.bundle(cid), "config.json")
    spec = json.loads(spec_path.read_text())
    spec["annotations"] = {}
    spec_path.write_text(json.dumps(spec))
    state_path = Path(first.ctx.state_dir, "runc", cid, "state.json")
    state = json.loads(state_path.read_text())
    state["config"]["labels"] = [label for label in state["config"]["labels"] if label.startswith("bundle=")]
    state_path.write_text(json.dumps(state))
    second = await lives.start()
    assert not os.path.exists(os.path.join(second.ctx.state_dir, "runc", cid))
    assert await second.list_containers(filter={"pod_sandbox_id": pod}) == []


async def test_a_reserved_container_left_in_runc_is_deleted_and_can_be_created_again(lives, cgroup_parent, rootfs):
    first = await lives.start()
    pod = await new_pod(first, cgroup_parent)
    cid = await new_container(first, pod, rootfs, container_config("again", command=["sleep", "600"]), start=False)
    await lives.stop()
    # As if the create was cancelled while conmon went on: the record says
    # reserved, but runc has the container.
    records = Path(first.ctx.state_dir, "records", "containers")
    rec = json.loads((records / f"{cid}.json").read_text())
    rec["state"] = "reserved"
    (records / f"{cid}.json").write_text(json.dumps(rec))
    second = await lives.start()
    assert not os.path.exists(os.path.join(second.ctx.state_dir, "runc", cid))
    await second.create_container(container_id=cid, rootfs=rootfs)
    await second.start_container(container_id=cid)
    assert (await second.container_status(container_id=cid))["status"]["state"] == "CONTAINER_RUNNING"
