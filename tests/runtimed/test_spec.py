"""The OCI spec builder and its helpers, without running anything."""

from __future__ import annotations

import asyncio
import os

import pytest

from services.runtimed import features, namespaces, podfiles, spec, spec_resources, spec_security, spec_values, users
from services.runtimed.paths import clean_absolute, confined_relative, resolve_in_root
from shared.config import RuntimeConfig
from shared.errors import InvalidArgument
from tests.runtimed.conftest import make_rootfs

ALL = frozenset({"CAP_CHOWN", "CAP_KILL", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID",
                 "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE"})


def test_process_args_follow_kubernetes_rules():
    image = {"entrypoint": ["/ep"], "cmd": ["c1", "c2"]}
    assert spec.process_args({}, image) == ["/ep", "c1", "c2"]
    assert spec.process_args({"args": ["a"]}, image) == ["/ep", "a"]
    assert spec.process_args({"command": ["/cmd"]}, image) == ["/cmd"]
    assert spec.process_args({"command": ["/cmd"], "args": ["a"]}, image) == ["/cmd", "a"]
    with pytest.raises(InvalidArgument):
        spec.process_args({}, {})


def test_int64_fields_arrive_as_strings():
    assert spec_values.i64("123", "x") == 123 and spec_values.i64(5, "x") == 5 and spec_values.i64(None, "x", 7) == 7
    assert spec_values.wrapped_int({"value": "1000"}, "u") == 1000 and spec_values.wrapped_int({}, "u") == 0
    with pytest.raises(InvalidArgument):
        spec_values.i64("12abc", "x")


def test_resources_validation_and_oom_clamp():
    out, oom = spec_resources.linux_resources({"memory_limit_in_bytes": str(64 << 20), "cpu_shares": "1",
                                     "oom_score_adj": "-999"}, pids_limit=10, available=ALL)
    assert out["memory"]["limit"] == 64 << 20 and out["cpu"]["shares"] == 2 and out["pids"] == {"limit": 10}
    assert oom >= min(0, int(open("/proc/self/oom_score_adj").read()))  # no CAP_SYS_RESOURCE in ALL
    _, oom = spec_resources.linux_resources({"oom_score_adj": "-999"}, available=ALL | {"CAP_SYS_RESOURCE"})
    assert oom == -999
    for bad in ({"memory_limit_in_bytes": "1000"}, {"cpu_period": "5"}, {"cpu_quota": "-7"},
                {"cpuset_cpus": "0-a"}, {"oom_score_adj": "1001"}, {"hugepage_limits": [{"page_size": "huge"}]},
                {"memory_limit_in_bytes": str(64 << 20), "memory_swap_limit_in_bytes": str(1 << 20)}):
        with pytest.raises(InvalidArgument):
            spec_resources.linux_resources(bad, available=ALL)


def test_capabilities_add_drop_all():
    default = ["CHOWN", "KILL"]
    caps, _ = spec_security.capabilities({"capabilities": {"add_capabilities": ["NET_ADMIN"], "drop_capabilities": ["KILL"]}},
                                default, ALL, False)
    assert caps == ["CAP_CHOWN", "CAP_NET_ADMIN"]
    caps, _ = spec_security.capabilities({"capabilities": {"drop_capabilities": ["ALL"], "add_capabilities": ["KILL"]}},
                                default, ALL, False)
    assert caps == ["CAP_KILL"]
    caps, _ = spec_security.capabilities({"capabilities": {"add_capabilities": ["SYS_RESOURCE"]}}, default, ALL, False)
    assert "CAP_SYS_RESOURCE" not in caps  # the runtime does not have it to give
    assert spec_security.capabilities({}, default, ALL, True)[0] == sorted(ALL)
    with pytest.raises(InvalidArgument):
        spec_security.capabilities({"capabilities": {"add_capabilities": ["NOPE"]}}, default, ALL, False)


def test_paths_are_confined(tmp_path):
    assert clean_absolute("/a/./b/../c", "p") == "/a/c"
    for bad in ("relative", "/../etc", "/a/../../b", ""):
        with pytest.raises(InvalidArgument):
            clean_absolute(bad, "p")
    assert confined_relative("pod/c.log", "log") == "pod/c.log"
    for bad in ("../x", "/abs", "a/../../x", "."):
        with pytest.raises(InvalidArgument):
            confined_relative(bad, "log")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    os.symlink("/../../..", root / "etc" / "up")
    os.symlink("../../../../outside", root / "etc" / "rel")
    assert resolve_in_root(str(root), "/etc/up/etc/passwd") == str(root / "etc" / "passwd")
    assert resolve_in_root(str(root), "/etc/rel") == str(root / "outside")


def test_sysctls_must_be_namespaced():
    assert namespaces.check_sysctls({"net.ipv4.ip_forward": "1", "kernel.shmmax": "1"},
                                    host_ipc=False, host_network=False)
    for sysctls, host_ipc, host_net in (({"kernel.panic": "1"}, False, False),
                                        ({"net.ipv4.ip_forward": "1"}, False, True),
                                        ({"kernel.msgmax": "1"}, True, False)):
        with pytest.raises(InvalidArgument):
            namespaces.check_sysctls(sysctls, host_ipc=host_ipc, host_network=host_net)


def test_resolv_conf_from_dns_config():
    text = podfiles.resolv_text({"servers": ["10.0.0.10", "fd00::a"], "searches": ["a.svc", "svc"], "options": ["ndots:5"]})
    assert text == "search a.svc svc\nnameserver 10.0.0.10\nnameserver fd00::a\noptions ndots:5\n"
    assert podfiles.resolv_text({}) is None
    with pytest.raises(InvalidArgument):
        podfiles.resolv_text({"servers": ["not-an-ip"]})


def _facts(**kw) -> spec.SandboxFacts:
    base = dict(id="pod", cgroup_parent="/p", hostname="h", netns_path="/run/netns/x", ipc_ns_path="/ipc",
                uts_ns_path="/uts", pid_ns_path="/proc/1/ns/pid", hosts_path="/hosts", resolv_path="/resolv",
                hostname_path="/hostname", shm_path="/shm")
    base.update(kw)
    return spec.SandboxFacts(**base)


def test_build_namespaces_mounts_and_security(tmp_path):
    rootfs = str(make_rootfs(tmp_path / "rootfs"))
    rc = RuntimeConfig()
    built = spec.build(container_id="c1", config={"command": ["sh"], "linux": {"security_context": {
        "namespace_options": {"pid": "CONTAINER"}, "readonly_rootfs": True}}},
        image={}, rootfs=rootfs, sandbox=_facts(), rc=rc, available_caps=ALL)
    s = built.spec
    ns = {n["type"]: n.get("path") for n in s["linux"]["namespaces"]}
    assert ns["network"] == "/run/netns/x" and ns["ipc"] == "/ipc" and ns["uts"] == "/uts" and ns["pid"] is None
    assert s["root"]["readonly"] and s["linux"]["cgroupsPath"] == "/p/crio-c1"
    dests = {m["destination"]: m for m in s["mounts"]}
    assert dests["/etc/hosts"]["source"] == "/hosts" and "ro" in dests["/etc/hosts"]["options"]
    assert dests["/dev/shm"]["source"] == "/shm"
    # No lists in the CRI: nothing masked (the kubelet always sends its own defaults); no profile: unconfined.
    assert s["linux"]["maskedPaths"] == [] and s["linux"]["readonlyPaths"] == [] and "seccomp" not in s["linux"]
    # Host network: no network or UTS namespace; a user mount replaces the pod's /etc/hosts.
    hosts = tmp_path / "myhosts"
    hosts.write_text("")
    built = spec.build(container_id="c2", config={"command": ["sh"], "mounts": [
        {"container_path": "/etc/hosts", "host_path": str(hosts)}]},
        image={}, rootfs=rootfs, sandbox=_facts(network_mode="NODE", netns_path=None), rc=rc, available_caps=ALL)
    ns = {n["type"] for n in built.spec["linux"]["namespaces"]}
    assert "network" not in ns and "uts" not in ns and "pid" in ns
    assert [m["source"] for m in built.spec["mounts"] if m["destination"] == "/etc/hosts"] == [str(hosts)]
    # Privileged: every capability the runtime has, no seccomp, no masked paths.
    built = spec.build(container_id="c3", config={"command": ["sh"], "linux": {"security_context": {"privileged": True}}},
                       image={}, rootfs=rootfs, sandbox=_facts(privileged=True), rc=rc, available_caps=ALL)
    assert "seccomp" not in built.spec["linux"] and "maskedPaths" not in built.spec["linux"]
    assert set(built.spec["process"]["capabilities"]["bounding"]) == ALL


KUBELET_MASKED = ["/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                  "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                  "/sys/devices/virtual/powercap"]
KUBELET_READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def _build(tmp_path, config: dict, **kw) -> spec.Built:
    rootfs = tmp_path / "rootfs"
    if not rootfs.exists():
        make_rootfs(rootfs)
    return spec.build(container_id="c", config={"command": ["sh"], **config}, image=kw.pop("image", {}),
                      rootfs=str(rootfs), sandbox=_facts(**kw.pop("facts", {})), rc=RuntimeConfig(),
                      available_caps=ALL, **kw)


def test_masked_and_readonly_paths_are_the_cri_lists(tmp_path):
    # procMount Default: the kubelet's lists, as given.
    built = _build(tmp_path, {"linux": {"security_context": {
        "masked_paths": KUBELET_MASKED + ["/proc/kcore"], "readonly_paths": KUBELET_READONLY}}})
    assert built.spec["linux"]["maskedPaths"] == KUBELET_MASKED
    assert built.spec["linux"]["readonlyPaths"] == KUBELET_READONLY
    # procMount Unmasked: the kubelet sends empty lists, which arrive as no lists at all.
    built = _build(tmp_path, {"linux": {"security_context": {"masked_paths": [], "readonly_paths": []}}})
    assert built.spec["linux"]["maskedPaths"] == [] and built.spec["linux"]["readonlyPaths"] == []
    with pytest.raises(InvalidArgument):
        _build(tmp_path, {"linux": {"security_context": {"masked_paths": ["relative/path"]}}})


def test_hugepage_limits_follow_the_controller():
    res = {"hugepage_limits": [{"page_size": "2MB", "limit": "0"}, {"page_size": "1GB", "limit": "1073741824"}]}
    out, _ = spec_resources.linux_resources(res, available=ALL, hugetlb=True)
    assert out["hugepageLimits"] == [{"pageSize": "2MB", "limit": 0}, {"pageSize": "1GB", "limit": 1 << 30}]
    out, _ = spec_resources.linux_resources(res, available=ALL, hugetlb=False)
    assert "hugepageLimits" not in out
    with pytest.raises(InvalidArgument):  # still checked when left out
        spec_resources.linux_resources({"hugepage_limits": [{"page_size": "huge"}]}, available=ALL, hugetlb=False)


def test_hugepage_limits_reach_the_spec_where_usable(tmp_path):
    config = {"linux": {"resources": {"hugepage_limits": [{"page_size": "2MB", "limit": "0"}]}}}
    assert _build(tmp_path, config, hugetlb=True).spec["linux"]["resources"]["hugepageLimits"] == \
        [{"pageSize": "2MB", "limit": 0}]
    assert "hugepageLimits" not in _build(tmp_path, config, hugetlb=False).spec["linux"]["resources"]


def test_recursive_read_only_mounts(tmp_path):
    vol = tmp_path / "vol"
    vol.mkdir()
    rro = {"container_path": "/v", "host_path": str(vol), "readonly": True, "recursive_read_only": True}
    built = _build(tmp_path, {"mounts": [rro]}, rro=True)
    [mount] = [m for m in built.spec["mounts"] if m["destination"] == "/v"]
    assert mount["options"] == ["rbind", "rprivate", "rro"]
    assert built.mounts == [{"container_path": "/v", "host_path": str(vol), "readonly": True,
                             "recursive_read_only": True, "propagation": "PROPAGATION_PRIVATE"}]
    plain = _build(tmp_path, {"mounts": [{**rro, "recursive_read_only": False}]}, rro=True)
    assert [m["options"] for m in plain.spec["mounts"] if m["destination"] == "/v"] == [["rbind", "rprivate", "ro"]]
    for bad, words in (({**rro, "readonly": False}, "needs readonly"),
                       ({**rro, "propagation": "PROPAGATION_HOST_TO_CONTAINER"}, "PROPAGATION_PRIVATE")):
        with pytest.raises(InvalidArgument, match=words):
            spec.check_request({"mounts": [bad]}, rro=True)
    with pytest.raises(InvalidArgument, match="not supported by the runtime handler: runc 1.0 is too old"):
        _build(tmp_path, {"mounts": [rro]}, rro=False, rro_reason="runc 1.0 is too old")


def test_run_as_group_needs_a_user():
    for sc in ({"run_as_group": {"value": "3000"}}, {"run_as_group": "0"}):
        with pytest.raises(InvalidArgument, match="linux.security_context.run_as_group"):
            spec.check_request({"linux": {"security_context": sc}})
        with pytest.raises(InvalidArgument, match="pod sandbox linux.security_context.run_as_group"):
            users.check_run_as_group(sc, pod=True)
    spec.check_request({"linux": {"security_context": {"run_as_group": "3", "run_as_user": "0"}}})
    spec.check_request({"linux": {"security_context": {"run_as_group": "3", "run_as_username": "alice"}}})
    users.check_run_as_group({"run_as_group": "3", "run_as_user": {"value": "0"}}, pod=True)
    with pytest.raises(InvalidArgument, match="supplemental_groups_policy"):
        spec.check_request({"linux": {"security_context": {"supplemental_groups_policy": "Sometimes"}}})


def test_supplemental_groups_policy(tmp_path):
    rootfs = str(make_rootfs(tmp_path / "rootfs"))  # alice (1000) is in staff (50) and video (44)
    merged = users.resolve(rootfs, image_user="alice", run_as_group=3000, supplemental_groups=[4000])
    assert (merged.uid, merged.gid, merged.additional_gids) == (1000, 3000, [3000, 50, 44, 4000])
    strict = users.resolve(rootfs, image_user="alice", run_as_group=3000, supplemental_groups=[4000, 3000],
                           groups_policy="Strict")
    assert (strict.uid, strict.gid, strict.additional_gids) == (1000, 3000, [3000, 4000])
    built = _build(tmp_path, {"linux": {"security_context": {
        "run_as_user": {"value": "1000"}, "supplemental_groups_policy": "Strict"}}})
    assert built.spec["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [1000]}
    assert users.supplemental_groups_policy(None) == "Merge" and users.supplemental_groups_policy(1) == "Strict"


def test_recursive_read_only_needs_runc_1_1_and_mount_setattr(monkeypatch):
    assert features.mount_setattr("5.11.22")[0] is False
    assert features.mount_setattr("not-a-version")[0] is False
    host = features.HostFeatures(kernel="6.1", mount_setattr=True, mount_setattr_reason="kernel 6.1 has it",
                                 hugetlb=False, hugetlb_reason="")

    async def detect(version: tuple[str, str], mount_setattr: bool = True) -> features.HandlerFeatures:
        async def fake_version(path: str) -> tuple[str, str]:
            return version
        monkeypatch.setattr(features.runc, "version", fake_version)
        h = host if mount_setattr else features.HostFeatures("5.4", False, "kernel 5.4 is old", False, "")
        return await features.detect_handler("h", RuntimeConfig().runtimes["runc"], h)

    assert asyncio.run(detect(("runc", "1.1.0"))).recursive_read_only_mounts
    assert asyncio.run(detect(("runc", "1.2.3+dev"))).recursive_read_only_mounts
    assert not asyncio.run(detect(("runc", "1.0.3"))).recursive_read_only_mounts
    assert not asyncio.run(detect(("crun", "1.14"))).recursive_read_only_mounts
    found = asyncio.run(detect(("runc", "1.1.5"), mount_setattr=False))
    assert not found.recursive_read_only_mounts and found.reason == "kernel 5.4 is old"


def test_default_ulimits_are_the_process_rlimits_within_runtimeds_own(tmp_path):
    import resource

    own = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # always finite (fs.nr_open at most)
    rc = RuntimeConfig(default_ulimits=["nproc=50:60", f"nofile=100:{own + 1}", "core=0:-1"])
    rootfs = tmp_path / "rootfs"
    make_rootfs(rootfs)

    def rlimits(available: frozenset[str]) -> list[dict]:
        return spec.build(container_id="c", config={"command": ["sh"]}, image={}, rootfs=str(rootfs),
                          sandbox=_facts(), rc=rc, available_caps=available).spec["process"]["rlimits"]

    assert rlimits(ALL | {"CAP_SYS_RESOURCE"}) == [
        {"type": "RLIMIT_NPROC", "soft": 50, "hard": 60},
        {"type": "RLIMIT_NOFILE", "soft": 100, "hard": own + 1},
        {"type": "RLIMIT_CORE", "soft": 0, "hard": 2**64 - 1}]
    # Without CAP_SYS_RESOURCE runc could not raise a hard limit above runtimed's own.
    without = rlimits(ALL)
    assert without[1] == {"type": "RLIMIT_NOFILE", "soft": 100, "hard": own}
    assert without[0] == {"type": "RLIMIT_NPROC", "soft": 50, "hard": 60}
    assert "rlimits" not in _build(tmp_path, {}).spec["process"]
