"""Stats from the cgroup files, OOM kills, events for the bus, checkpoint preconditions, pod resources."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from services.runtimed import cgroup_stats, cgroups, checkpoint
from services.runtimed.service import Runtimed
from shared.bus.feed import TOPIC as FEED_TOPIC
from shared.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.runtimed.conftest import (cleanup, container_config, make_config, new_container, new_pod, pod_config,
                                     wait_exited)

pytestmark = pytest.mark.root

MiB = 1 << 20


class Recorder:
    """Stands in for the bus publisher: keeps the container and pod events runtimed publishes (not its state feed)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def publish(self, topic: str, event: dict[str, Any]) -> None:
        if topic != FEED_TOPIC:
            self.events.append((topic, event))

    def watch_subscribers(self) -> None:
        """No subscriber to wait for: held events go out as soon as runtimed is ready."""
        return None

    def types(self, container_id: str) -> list[str | None]:
        return [e["type"] for _, e in self.events if e["container_id"] == container_id]


async def wait_for(predicate, timeout: float = 15.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate() if asyncio.iscoroutinefunction(predicate) else predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(interval)


async def one(rt: Runtimed, cid: str) -> dict[str, Any]:
    return (await rt.list_container_stats(container_id=cid))[0]


# -- parsing, without containers ------------------------------------------------------


def test_v2_files_are_read(tmp_path: Path):
    (tmp_path / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n"
                                       "nr_periods 10\nnr_throttled 2\nthrottled_usec 1500\n")
    (tmp_path / "memory.current").write_text("104857600\n")
    (tmp_path / "memory.stat").write_text("anon 52428800\nfile 41943040\ninactive_file 20971520\n"
                                          "active_file 20971520\npgfault 1234\npgmajfault 5\nfile_mapped 4096\n")
    (tmp_path / "memory.max").write_text("209715200\n")
    (tmp_path / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (tmp_path / "pids.current").write_text("7\n")
    s = cgroup_stats.read_sample(cgroup_stats.CgroupDirs(v2=str(tmp_path)), {"cpu", "cpu_throttling", "memory", "oom", "pids"})
    assert (s.cpu_usage_ns, s.cpu_user_ns, s.cpu_system_ns) == (2_500_000_000, 2_000_000_000, 500_000_000)
    assert (s.cpu_periods, s.cpu_throttled_periods, s.cpu_throttled_ns) == (10, 2, 1_500_000)
    assert s.memory_usage == 100 * MiB and s.memory_working_set == 80 * MiB and s.memory_rss == 50 * MiB
    assert (s.page_faults, s.major_page_faults, s.oom_kills, s.pids) == (1234, 5, 1, 7)
    assert s.memory_limit == 200 * MiB and s.memory_available == 120 * MiB
    (tmp_path / "memory.max").write_text("max\n")
    assert cgroup_stats.read_sample(cgroup_stats.CgroupDirs(v2=str(tmp_path)), {"memory"}).memory_available is None


def test_v1_files_are_read_and_only_the_asked_families(tmp_path: Path):
    for d in ("cpuacct", "memory", "pids"):
        (tmp_path / d).mkdir()
    (tmp_path / "cpuacct" / "cpuacct.usage").write_text("3000000000\n")
    (tmp_path / "cpuacct" / "cpuacct.stat").write_text(f"user {2 * os.sysconf('SC_CLK_TCK')}\nsystem 0\n")
    (tmp_path / "memory" / "memory.usage_in_bytes").write_text(str(10 * MiB))
    (tmp_path / "memory" / "memory.stat").write_text(
        f"total_rss {4 * MiB}\ntotal_inactive_file {3 * MiB}\ntotal_pgfault 9\ntotal_pgmajfault 1\n"
        "hierarchical_memory_limit 9223372036854771712\n")
    (tmp_path / "pids" / "pids.current").write_text("3\n")
    dirs = cgroup_stats.CgroupDirs(cpuacct=str(tmp_path / "cpuacct"), memory=str(tmp_path / "memory"),
                            pids=str(tmp_path / "pids"))
    s = cgroup_stats.read_sample(dirs, {"cpu", "memory", "pids"})
    assert (s.cpu_usage_ns, s.cpu_user_ns) == (3_000_000_000, 2_000_000_000)
    assert s.memory_working_set == 7 * MiB and s.memory_rss == 4 * MiB and s.memory_limit is None
    assert (s.page_faults, s.major_page_faults, s.pids) == (9, 1, 3)
    cpu_only = cgroup_stats.read_sample(dirs, {"cpu"})
    assert cpu_only.memory_usage is None and cpu_only.pids is None


def test_nano_cores_between_samples():
    reader = cgroup_stats.StatsReader()
    first = cgroup_stats.Sample(timestamp_ns=10 * 10**9, cpu_usage_ns=2 * 10**9)
    # No previous sample: the average since the start (2 s of CPU over 4 s).
    assert reader.nano_cores("c", first, started_at_ns=6 * 10**9) == 500_000_000
    second = cgroup_stats.Sample(timestamp_ns=12 * 10**9, cpu_usage_ns=5 * 10**9)
    assert reader.nano_cores("c", second) == 1_500_000_000
    too_soon = cgroup_stats.Sample(timestamp_ns=12 * 10**9 + 1000, cpu_usage_ns=5 * 10**9 + 1000)
    assert reader.nano_cores("c", too_soon) == 1_500_000_000
    reader.keep_only([])
    assert reader.nano_cores("c", second) is None


def test_proc_cgroup_lines_give_controller_dirs():
    lines = ["12:pids:/kubepods/pod1/crio-abc", "4:memory:/kubepods/pod1/crio-abc",
             "2:cpu,cpuacct:/kubepods/pod1/crio-abc", "0::/kubepods/pod1/crio-abc"]
    dirs = cgroup_stats.dirs_from_proc_cgroup(lines)
    assert dirs is not None
    if cgroups.is_v2():
        assert dirs.v2 == "/sys/fs/cgroup/kubepods/pod1/crio-abc"
    else:
        assert dirs.memory.endswith("/kubepods/pod1/crio-abc") and dirs.v2 is None


# -- real containers ----------------------------------------------------------------------


async def test_stats_move_with_cpu_and_memory_use(runtimed, cgroup_parent, rootfs):
    pod = await new_pod(runtimed, cgroup_parent)
    busy = await new_container(runtimed, pod, rootfs, container_config(
        "busy", command=["sh", "-c", "while :; do :; done"], labels={"role": "burn"}))
    hog = await new_container(runtimed, pod, rootfs, container_config(
        "hog", command=["sh", "-c", "sleep 600"], labels={"role": "mem"}))
    idle = await new_container(runtimed, pod, rootfs, container_config("idle", command=["true"]), start=False)

    before_busy, before_hog = await one(runtimed, busy), await one(runtimed, hog)
    assert before_hog["memory"]["working_set_bytes"]["value"] < 16 * MiB
    # 48 MiB in the pod's /dev/shm (tmpfs) is charged to the writer's memory cgroup.
    result = await runtimed.exec_sync(container_id=hog, cmd=["dd", "if=/dev/zero", "of=/dev/shm/blob",
                                                             "bs=1M", "count=48"], timeout=30)
    assert result["exit_code"] == 0, result
    await asyncio.sleep(1.0)
    after_busy, after_hog = await one(runtimed, busy), await one(runtimed, hog)

    cpu_before = before_busy["cpu"]["usage_core_nano_seconds"]["value"]
    cpu_after = after_busy["cpu"]["usage_core_nano_seconds"]["value"]
    assert cpu_after - cpu_before > 200_000_000  # > 0.2 s of CPU in ~1 s of a busy loop
    rate = after_busy["cpu"]["usage_nano_cores"]["value"]
    assert 200_000_000 < rate <= os.cpu_count() * 1_100_000_000
    assert after_busy["cpu"]["timestamp"] > before_busy["cpu"]["timestamp"]
    mem = after_hog["memory"]
    assert mem["working_set_bytes"]["value"] >= 48 * MiB
    assert mem["usage_bytes"]["value"] >= mem["working_set_bytes"]["value"]
    assert mem["page_faults"]["value"] > 0 and mem["rss_bytes"]["value"] < 16 * MiB
    assert after_hog["attributes"]["labels"] == {"role": "mem"}

    # A container that is not running has attributes and no numbers.
    idle_stats = await one(runtimed, idle)
    assert idle_stats["attributes"]["id"] == idle and "cpu" not in idle_stats

    # Filters: id prefix, pod, labels; a list matches the single calls.
    listed = await runtimed.list_container_stats()
    assert {e["attributes"]["id"] for e in listed} == {busy, hog, idle}
    assert [e["attributes"]["id"] for e in await runtimed.list_container_stats(filter={"id": busy[:10]})] == [busy]
    by_label = await runtimed.list_container_stats(filter={"label_selector": {"role": "mem"}})
    assert [e["attributes"]["id"] for e in by_label] == [hog]
    assert await runtimed.list_container_stats(filter={"pod_sandbox_id": "0" * 64}) == []
    with pytest.raises(NotFound):
        await runtimed.list_container_stats(container_id="f" * 64)

    # The pod: its own cgroup holds both containers (and their monitors).
    pod_stats = (await runtimed.list_sandbox_stats(sandbox_id=pod))[0]
    linux = pod_stats["linux"]
    assert linux["memory"]["working_set_bytes"]["value"] >= 48 * MiB
    assert linux["cpu"]["usage_core_nano_seconds"]["value"] >= cpu_after
    assert linux["process"]["process_count"]["value"] >= 2
    assert {c["attributes"]["id"] for c in linux["containers"]} == {busy, hog, idle}
    assert pod_stats["attributes"]["metadata"]["name"] == "pod"


async def test_oom_kill_is_reported(runtimed, cgroup_parent, rootfs):
    events: list[dict[str, Any]] = []
    runtimed.add_event_hook(events.append)
    pod = await new_pod(runtimed, cgroup_parent)
    cid = await new_container(runtimed, pod, rootfs, container_config(
        "hog", command=["sh", "-c", "x=$(head -c 200000000 /dev/zero | tr '\\0' a); echo survived"],
        resources={"memory_limit_in_bytes": str(32 * MiB)}))
    status = await wait_exited(runtimed, cid, 30)
    assert status["state"] == "CONTAINER_EXITED" and status["reason"] == "OOMKilled", status
    assert status["exit_code"] == 137
    assert [e["event"] for e in events if e["id"] == cid][-2:] == ["oom", "exited"]


@pytest.fixture
async def recorded(base_dir: Path, cgroup_parent: str):
    service = Runtimed(make_config(base_dir))
    service.publisher = Recorder()
    await service.start()
    holder = {"service": service}
    try:
        yield holder
    finally:
        await cleanup(holder["service"], base_dir, cgroup_parent)


async def test_events_carry_the_pod_and_container_statuses(recorded, cgroup_parent, rootfs):
    rt: Runtimed = recorded["service"]
    rec: Recorder = rt.publisher
    pod = await new_pod(rt, cgroup_parent)
    cid = await new_container(rt, pod, rootfs, container_config("short", command=["sh", "-c", "exit 3"]))
    await wait_exited(rt, cid)
    await rt.remove_container(container_id=cid)
    await rt.stop_sandbox(sandbox_id=pod)
    await rt.remove_sandbox(sandbox_id=pod)
    assert rec.types(pod) == ["CONTAINER_CREATED_EVENT", "CONTAINER_STOPPED_EVENT", "CONTAINER_DELETED_EVENT"]
    assert rec.types(cid) == ["CONTAINER_CREATED_EVENT", "CONTAINER_STARTED_EVENT", "CONTAINER_STOPPED_EVENT",
                              "CONTAINER_DELETED_EVENT"]
    by_type = {e["type"]: e for _, e in rec.events if e["container_id"] == cid}
    created = by_type["CONTAINER_CREATED_EVENT"]
    assert created["pod_sandbox_status"]["id"] == pod
    assert created["pod_sandbox_status"]["state"] == "SANDBOX_READY"
    assert [s["state"] for s in created["containers_statuses"]] == ["CONTAINER_CREATED"]
    stopped = by_type["CONTAINER_STOPPED_EVENT"]
    [status] = stopped["containers_statuses"]
    assert status["state"] == "CONTAINER_EXITED" and status["exit_code"] == 3 and status["reason"] == "Error"
    assert stopped["created_at"] >= created["created_at"] > 0
    deleted = by_type["CONTAINER_DELETED_EVENT"]
    assert deleted["containers_statuses"] == [] and deleted["container_status"]["state"] == "CONTAINER_EXITED"
    pod_deleted = [e for _, e in rec.events if e["container_id"] == pod][-1]
    assert pod_deleted["pod_sandbox_status"]["state"] == "SANDBOX_NOTREADY"
    assert not any(e.get("derived") for _, e in rec.events)


async def test_events_say_what_the_status_calls_say(recorded, cgroup_parent, rootfs):
    """The same builders make both, down to a pod's namespace target and a user's groups."""
    rt: Runtimed = recorded["service"]
    rec: Recorder = rt.publisher
    pod_cfg = pod_config(cgroup_parent)
    pod_cfg["linux"]["security_context"]["namespace_options"]["target_id"] = "a-target"
    pod = (await rt.reserve_sandbox(config=pod_cfg))["id"]
    await rt.create_sandbox(sandbox_id=pod)
    target = await new_container(rt, pod, rootfs, container_config("target", command=["sleep", "600"]))
    sc = {"namespace_options": {"pid": "TARGET", "target_id": target}, "run_as_user": {"value": "1000"},
          "supplemental_groups": ["50"]}
    cid = await new_container(rt, pod, rootfs, container_config("joined", command=["sleep", "600"], sc=sc))
    started = [e for _, e in rec.events if e["container_id"] == cid and e["type"] == "CONTAINER_STARTED_EVENT"][-1]
    status = (await rt.container_status(container_id=cid))["status"]
    assert started["container_status"] == status
    assert status["user"]["linux"]["gid"] == 1000 and 50 in status["user"]["linux"]["supplemental_groups"]
    pod_status = (await rt.sandbox_status(sandbox_id=pod))["status"]
    assert started["pod_sandbox_status"] == pod_status
    assert pod_status["linux"]["namespaces"]["options"]["target_id"] == "a-target"


async def test_exits_during_a_restart_are_published_on_reattach(recorded, base_dir, cgroup_parent, rootfs):
    rt: Runtimed = recorded["service"]
    pod = await new_pod(rt, cgroup_parent)
    cid = await new_container(rt, pod, rootfs, container_config("victim", command=["sleep", "600"]))
    pid = rt.containers[cid]["pid"]
    await rt.stop()  # runtimed goes away; conmon keeps watching the container
    os.kill(pid, signal.SIGKILL)
    exit_file = Path(rt.ctx.exit_dir) / cid
    assert await wait_for(exit_file.exists)
    again = Runtimed(make_config(base_dir))
    again.publisher = Recorder()
    recorded["service"] = again
    await again.start()
    derived = await wait_for(lambda: [e for _, e in again.publisher.events if e["container_id"] == cid])
    assert [e["type"] for e in derived] == ["CONTAINER_STOPPED_EVENT"]
    assert derived[0]["derived"] is True
    [status] = derived[0]["containers_statuses"]
    assert status["state"] == "CONTAINER_EXITED" and status["exit_code"] == 137


async def test_checkpoint_preconditions(runtimed, cgroup_parent, rootfs, base_dir, monkeypatch):
    pod = await new_pod(runtimed, cgroup_parent)
    created = await new_container(runtimed, pod, rootfs, container_config("c", command=["sleep", "600"]), start=False)
    running = await new_container(runtimed, pod, rootfs, container_config("r", command=["sleep", "600"]))
    target = str(base_dir / "checkpoint.tar")
    with pytest.raises(FailedPrecondition, match="not running"):
        await runtimed.checkpoint_container(container_id=created, location=target)
    with pytest.raises(InvalidArgument, match="absolute"):
        await runtimed.checkpoint_container(container_id=running, location="relative.tar")
    with pytest.raises(InvalidArgument, match="does not exist"):
        await runtimed.checkpoint_container(container_id=running, location=str(base_dir / "nodir" / "x.tar"))
    with monkeypatch.context() as m:
        m.setenv("PATH", str(base_dir))
        m.setattr(checkpoint, "_criu_verdict", None)
        with pytest.raises(FailedPrecondition, match="CRIU is not installed"):
            await runtimed.checkpoint_container(container_id=running, location=target)
    usable, reason = await checkpoint.criu_usable()
    if not usable:
        with pytest.raises(FailedPrecondition, match="criu check failed"):
            await runtimed.checkpoint_container(container_id=running, location=target)
        assert not os.path.exists(target)
        pytest.skip(f"CRIU cannot run on this machine, the archive is not tested: {reason}")
    result = await runtimed.checkpoint_container(container_id=running, location=target)
    assert result["size"] > 0 and os.path.exists(target)
    assert (await runtimed.container_status(container_id=running))["status"]["state"] == "CONTAINER_RUNNING"


async def test_pod_resources_reach_the_pod_cgroup(runtimed, cgroup_parent):
    pod = await new_pod(runtimed, cgroup_parent)
    result = await runtimed.update_sandbox_resources(
        sandbox_id=pod, resources={"cpu_shares": "512", "memory_limit_in_bytes": str(256 * MiB),
                                   "cpu_quota": "50000", "cpu_period": "100000"})
    if cgroups.is_v2():
        assert cgroups.read_value(cgroup_parent, "memory", "memory.max") == str(256 * MiB)
        assert cgroups.read_value(cgroup_parent, "cpu", "cpu.max") == "50000 100000"
    else:
        assert cgroups.read_value(cgroup_parent, "memory", "memory.limit_in_bytes") == str(256 * MiB)
        assert cgroups.read_value(cgroup_parent, "cpu", "cpu.shares") == "512"
        assert cgroups.read_value(cgroup_parent, "cpu", "cpu.cfs_quota_us") == "50000"
    assert result["cgroup"] == cgroup_parent and result["written"]
    with pytest.raises(InvalidArgument):
        await runtimed.update_sandbox_resources(sandbox_id=pod, resources={"cpu_shares": "1"})
    # A pod that shares its cgroup parent with another pod has no cgroup of its own to change.
    other = await new_pod(runtimed, cgroup_parent, name="other")
    with pytest.raises(FailedPrecondition, match="shared"):
        await runtimed.update_sandbox_resources(sandbox_id=other, resources={"cpu_shares": "512"})
