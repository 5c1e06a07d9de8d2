"""What a container sees: command/env/user merging, security settings, limits."""

from __future__ import annotations

import os

import pytest

from services.runtimed import cgroups
from shared import metrics, privileges
from shared.errors import InvalidArgument
from tests.runtimed.conftest import IMAGE, container_config, new_container, new_pod, run_to_exit

pytestmark = pytest.mark.root


def image(**config):
    return {**IMAGE, "config": {**IMAGE["config"], **config}}


async def test_command_args_env_and_workdir_merging(runtimed, cgroup_parent, rootfs):
    pod = await new_pod(runtimed, cgroup_parent)
    img = image(entrypoint=["echo", "entry"], cmd=["imagecmd"], env=["PATH=/bin", "A=image", "B=image"],
                working_dir="/data")
    # No command, no args: ENTRYPOINT + CMD.
    _, log = await run_to_exit(runtimed, pod, rootfs, container_config("a"), img)
    assert log == "entry imagecmd\n"
    # Args only: ENTRYPOINT + args.
    _, log = await run_to_exit(runtimed, pod, rootfs, container_config("b", args=["given"]), img)
    assert log == "entry given\n"
    # Command: replaces ENTRYPOINT and drops CMD.
    _, log = await run_to_exit(runtimed, pod, rootfs, container_config(
        "c", command=["sh", "-c"], args=['echo "$A $B $C $HOSTNAME"; pwd'],
        envs=[{"key": "B", "value": "config"}, {"key": "C", "value": "config"}]), img)
    assert log == "image config config pod\n/data\n"
    assert os.path.isdir(os.path.join(rootfs, "data"))


async def test_user_from_image_and_security_context(runtimed, cgroup_parent, rootfs):
    pod = await new_pod(runtimed, cgroup_parent)
    _, log = await run_to_exit(runtimed, pod, rootfs, container_config("a", command=["id"]), image(user="alice"))
    assert log == "uid=1000(alice) gid=1000(alice) groups=44(video),50(staff),1000(alice)\n" or \
        log.startswith("uid=1000(alice) gid=1000(alice)") and "50(staff)" in log and "44(video)" in log
    _, log = await run_to_exit(runtimed, pod, rootfs, container_config(
        "b", command=["id"], sc={"run_as_user": {"value": "1001"}, "run_as_group": {"value": "50"},
                                 "supplemental_groups": ["7"]}), image(user="alice"))
    assert log.startswith("uid=1001(bob) gid=50(staff)") and "7" in log
    _, log = await run_to_exit(runtimed, pod, rootfs, container_config(
        "c", command=["id", "-u"], sc={"run_as_username": "bob"}))
    assert log == "1001\n"
    with pytest.raises(InvalidArgument, match="nobody"):
        await new_container(runtimed, pod, rootfs, container_config("d", command=["id"]), image(user="nobody"))


async def test_user_lookup_is_confined_to_rootfs(runtimed, cgroup_parent, rootfs, base_dir):
    # An /etc/passwd symlink climbing out of the rootfs is resolved inside it, where its target is missing.
    (base_dir / "hostpasswd").write_text("evil:x:4242:4242::/:/bin/sh\n")
    os.unlink(os.path.join(rootfs, "etc", "passwd"))
    os.symlink("../../../../../hostpasswd", os.path.join(rootfs, "etc", "passwd"))
    pod = await new_pod(runtimed, cgroup_parent)
    with pytest.raises(InvalidArgument, match="evil"):
        await new_container(runtimed, pod, rootfs, container_config(command=["id"], sc={"run_as_username": "evil"}))


def _status_caps(log: str) -> dict[str, str]:
    return {k: v.strip() for k, _, v in (line.partition(":") for line in log.splitlines()) if k}


async def test_capabilities_and_no_new_privs(runtimed, cgroup_parent, rootfs):
    pod = await new_pod(runtimed, cgroup_parent)
    _, log = await run_to_exit(runtimed, pod, rootfs, container_config(
        "a", command=["grep", "-E", "^(CapEff|CapBnd|NoNewPrivs)", "/proc/1/status"],
        sc={"capabilities": {"add_capabilities": ["NET_ADMIN", "SYS_RESOURCE"], "drop_capabilities": ["KILL"]},
            "no_new_privs": True}))
    fields = _status_caps(log)
    eff = privileges.names_from_mask(int(fields["CapEff"], 16))
    assert "CAP_NET_ADMIN" in eff and "CAP_CHOWN" in eff
    assert "CAP_KILL" not in eff and "CAP_SYS_ADMIN" not in eff
    # The runtime itself lacks CAP_SYS_RESOURCE here: it is never handed on.
    assert ("CAP_SYS_RESOURCE" in eff) == ("CAP_SYS_RESOURCE" in privileges.bounding_capabilities())
    assert privileges.names_from_mask(int(fields["CapBnd"], 16)) == eff
    assert fields["NoNewPrivs"] == "1"
    _, log = await run_to_exit(runtimed, pod, rootfs, container_config(
        "b", command=["grep", "-E", "^(CapEff|NoNewPrivs)", "/proc/1/status"],
        sc={"capabilities": {"drop_capabilities": ["ALL"]}}))
    fields = _status_caps(log)
    assert int(fields["CapEff"], 16) == 0 and fields["NoNewPrivs"] == "0"
    # A non-root user has no effective capabilities, but its ambient ones.
    _, log = await run_to_exit(runtimed, pod, rootfs, container_config(
        "c", command=["grep", "-E", "^(CapEff|CapBnd|CapAmb)", "/proc/1/status"],
        sc={"run_as_user": {"value": "1000"}, "capabilities": {"add_ambient_capabilities": ["NET_BIND_SERVICE"]}}))
    fields = _status_caps(log)
    assert privileges.names_from_mask(int(fields["CapEff"], 16)) == {"CAP_NET_BIND_SERVICE"}
    assert privileges.names_from_mask(int(fields["CapAmb"], 16)) == {"CAP_NET_BIND_SERVICE"}
    assert "CAP_CHOWN" in privileges.names_from_mask(int(fields["CapBnd"], 16))


async def test_readonly_rootfs_refuses_writes(runtimed, cgroup_parent, rootfs):
    pod = await new_pod(runtimed, cgroup_parent)
    status, log = await run_to_exit(runtimed, pod, rootfs, container_config(
        "ro", command=["sh", "-c", "touch /newfile && echo wrote; touch /dev/shm/x && echo shm-ok"],
        sc={"readonly_rootfs": True}))
    assert "wrote" not in log and "shm-ok" in log
    assert not os.path.exists(os.path.join(rootfs, "newfile"))
    status, log = await run_to_exit(runtimed, pod, rootfs, container_config(
        "rw", command=["sh", "-c", "touch /newfile && echo wrote"]))
    assert "wrote" in log


async def test_memory_and_pids_limits_in_cgroup(runtimed, cgroup_parent, rootfs):
    pod = await new_pod(runtimed, cgroup_parent)
    limit = 64 * 1024 * 1024
    cid = await new_container(runtimed, pod, rootfs, container_config(
        "limited", command=["sleep", "600"],
        resources={"memory_limit_in_bytes": str(limit), "cpu_shares": "512", "cpu_quota": "50000",
                   "cpu_period": "100000"}))
    path = f"{cgroup_parent}/crio-{cid}"
    if cgroups.is_v2():
        assert cgroups.read_value(path, "memory", "memory.max") == str(limit)
        assert cgroups.read_value(path, "pids", "pids.max") == "64"
    else:
        assert cgroups.read_value(path, "memory", "memory.limit_in_bytes") == str(limit)
        assert cgroups.read_value(path, "cpu", "cpu.shares") == "512"
        assert cgroups.read_value(path, "cpu", "cpu.cfs_quota_us") == "50000"
        assert cgroups.read_value(path, "pids", "pids.max") == "64"
    # The container sees its own limits.
    result = await runtimed.exec_sync(container_id=cid, cmd=["cat", "/sys/fs/cgroup/pids/pids.max"], timeout=10)
    assert result["stdout"] == b"64\n"
    # Enforced: the 65th process cannot start.
    result = await runtimed.exec_sync(container_id=cid, cmd=[
        "sh", "-c", "i=0; while [ $i -lt 80 ]; do sleep 30 </dev/null >/dev/null 2>&1 & i=$((i+1)); done"],
        timeout=20)
    assert b"fork" in result["stderr"]
    # Updated live.
    await runtimed.update_resources(container_id=cid, linux={"memory_limit_in_bytes": str(2 * limit)})
    assert cgroups.read_value(path, "memory", "memory.max" if cgroups.is_v2() else "memory.limit_in_bytes") \
        == str(2 * limit)
    status = (await runtimed.container_status(container_id=cid))["status"]
    assert status["resources"]["linux"]["memory_limit_in_bytes"] == str(2 * limit)


def _sample(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


async def test_oom_killed(runtimed, cgroup_parent, rootfs):
    metrics.enable()  # as a runtimed whose configuration turns metrics on
    before = await runtimed.metrics()
    kills_before = _sample(before, "criopy_containers_oom_total")
    crio_kills_before = _sample(before, "container_runtime_crio_containers_oom_total ")
    pod = await new_pod(runtimed, cgroup_parent)
    status, _ = await run_to_exit(runtimed, pod, rootfs, container_config(
        "hog", command=["sh", "-c", "x=AAAAAAAAAAAAAAAA; while true; do x=$x$x; done"],
        resources={"memory_limit_in_bytes": str(16 * 1024 * 1024)}))
    assert status["reason"] == "OOMKilled"
    assert status["exit_code"] == 137
    page = await runtimed.metrics()
    assert _sample(page, "criopy_containers_oom_total") == kills_before + 1
    assert _sample(page, 'criopy_containers{state="exited"}') == 1
    assert _sample(page, 'criopy_pods{state="ready"}') == 1
    # CRI-O's families: in all, and by the container's name (CRI-O's k8s_<container>_<pod>_... form).
    cid = next(iter(runtimed.containers))
    name = runtimed.containers[cid]["name"]
    assert name.startswith("k8s_hog_pod_default_") and name.endswith("_0")
    assert _sample(page, "container_runtime_crio_containers_oom_total ") == crio_kills_before + 1
    assert _sample(page, f'container_runtime_crio_containers_oom_count_total{{name="{name}"}}') == 1
    # The name's series goes with the container; the total stays.
    await runtimed.remove_container(container_id=cid)
    page = await runtimed.metrics()
    assert f'name="{name}"' not in page
    assert _sample(page, "container_runtime_crio_containers_oom_total ") == crio_kills_before + 1


async def test_invalid_input(runtimed, cgroup_parent, rootfs):
    pod = await new_pod(runtimed, cgroup_parent)
    for name, config in (
        ("esc", container_config("esc", command=["true"], log_path="../../escape.log")),
        ("abs", container_config("abs", command=["true"], log_path="/etc/evil.log")),
        ("mem", container_config("mem", command=["true"], resources={"memory_limit_in_bytes": "100"})),
        ("neg", container_config("neg", command=["true"], resources={"cpu_shares": "-5"})),
        ("oom", container_config("oom", command=["true"], resources={"oom_score_adj": "5000"})),
        ("mnt", container_config("mnt", command=["true"], mounts=[{"container_path": "/x", "host_path": "/nonexistent/path"}])),
        ("cap", container_config("cap", command=["true"], sc={"capabilities": {"add_capabilities": ["BOGUS"]}})),
        ("priv", container_config("priv", command=["true"], sc={"privileged": True})),
    ):
        reserved = await runtimed.reserve_container(sandbox_id=pod, config=config)
        with pytest.raises(InvalidArgument):
            await runtimed.create_container(container_id=reserved["id"], rootfs=rootfs, image=IMAGE)
        await runtimed.release_container(container_id=reserved["id"])
    assert runtimed.containers == {}


async def test_bind_mounts_and_pod_files(runtimed, cgroup_parent, rootfs, base_dir):
    pod = await new_pod(runtimed, cgroup_parent, dns_config={"servers": ["10.0.0.10"], "searches": ["svc.local"],
                                                             "options": ["ndots:5"]})
    data = base_dir / "data"
    data.mkdir()
    (data / "hello").write_text("from host\n")
    status, log = await run_to_exit(runtimed, pod, rootfs, container_config(
        "m", command=["sh", "-c", "cat /mnt/hello; touch /mnt/new || echo ro-refused; cat /etc/resolv.conf; hostname"],
        mounts=[{"container_path": "/mnt", "host_path": str(data), "readonly": True}]))
    assert "from host" in log and "ro-refused" in log
    assert "nameserver 10.0.0.10" in log and "search svc.local" in log and "options ndots:5" in log
    assert log.strip().endswith("pod")
    assert status["mounts"][0]["container_path"] == "/mnt" and status["mounts"][0]["readonly"]


async def test_oom_score_adj_is_clamped_without_sys_resource(runtimed, cgroup_parent, rootfs):
    pod = await new_pod(runtimed, cgroup_parent)
    status, log = await run_to_exit(runtimed, pod, rootfs, container_config(
        "o", command=["cat", "/proc/self/oom_score_adj"], resources={"oom_score_adj": "-500"}))
    own = int(open("/proc/self/oom_score_adj").read())
    if "CAP_SYS_RESOURCE" in privileges.bounding_capabilities():
        assert log == "-500\n"
    else:
        assert int(log) == max(-500, own)
    status, log = await run_to_exit(runtimed, pod, rootfs, container_config(
        "p", command=["cat", "/proc/self/oom_score_adj"], resources={"oom_score_adj": "900"}))
    assert log == "900\n"


async def test_devices(runtimed, cgroup_parent, rootfs):
    if not os.path.exists("/dev/loop0"):
        pytest.skip("needs /dev/loop0")
    pod = await new_pod(runtimed, cgroup_parent)
    script = "test -b /dev/xloop && echo node; head -c 1 /dev/xloop >/dev/null && echo read-ok || echo read-refused"
    _, log = await run_to_exit(runtimed, pod, rootfs, container_config(
        "r", command=["sh", "-c", script],
        devices=[{"host_path": "/dev/loop0", "container_path": "/dev/xloop", "permissions": "r"}]))
    assert log == "node\nread-ok\n"
    _, log = await run_to_exit(runtimed, pod, rootfs, container_config(
        "w", command=["sh", "-c", script],
        devices=[{"host_path": "/dev/loop0", "container_path": "/dev/xloop", "permissions": "w"}]))
    assert "node" in log and "read-refused" in log


async def test_default_ulimits_reach_the_container(base_dir, cgroup_parent, rootfs):
    import resource

    from tests.runtimed.conftest import make_config, running

    own = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    config = make_config(base_dir, default_ulimits=["stack=8388608:16777216", f"nofile=1000:{own + 5}"])
    async with running(config, base_dir, cgroup_parent) as rt:
        pod = await new_pod(rt, cgroup_parent)
        command = ["sh", "-c", "ulimit -Ss; ulimit -Hs; ulimit -Sn; ulimit -Hn"]
        status, log = await run_to_exit(rt, pod, rootfs, container_config(command=command))
    assert status["exit_code"] == 0, log
    # Above runtimed's own hard limit, and without CAP_SYS_RESOURCE to raise it: lowered to it, not refused.
    raised = "CAP_SYS_RESOURCE" in privileges.effective_capabilities()
    assert log.split() == ["8192", "16384", "1000", str(own + 5 if raised else own)]
