"""The OCI spec builder and its helpers, without running anything."""

from __future__ import annotations

import os

import pytest

from services.runtimed import namespaces, podfiles, spec
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
    assert spec.i64("123", "x") == 123 and spec.i64(5, "x") == 5 and spec.i64(None, "x", 7) == 7
    assert spec.wrapped_int({"value": "1000"}, "u") == 1000 and spec.wrapped_int({}, "u") == 0
    with pytest.raises(InvalidArgument):
        spec.i64("12abc", "x")


def test_resources_validation_and_oom_clamp():
    out, oom = spec.linux_resources({"memory_limit_in_bytes": str(64 << 20), "cpu_shares": "1",
                                     "oom_score_adj": "-999"}, pids_limit=10, available=ALL)
    assert out["memory"]["limit"] == 64 << 20 and out["cpu"]["shares"] == 2 and out["pids"] == {"limit": 10}
    assert oom >= min(0, int(open("/proc/self/oom_score_adj").read()))  # no CAP_SYS_RESOURCE in ALL
    _, oom = spec.linux_resources({"oom_score_adj": "-999"}, available=ALL | {"CAP_SYS_RESOURCE"})
    assert oom == -999
    for bad in ({"memory_limit_in_bytes": "1000"}, {"cpu_period": "5"}, {"cpu_quota": "-7"},
                {"cpuset_cpus": "0-a"}, {"oom_score_adj": "1001"}, {"hugepage_limits": [{"page_size": "huge"}]},
                {"memory_limit_in_bytes": str(64 << 20), "memory_swap_limit_in_bytes": str(1 << 20)}):
        with pytest.raises(InvalidArgument):
            spec.linux_resources(bad, available=ALL)


def test_capabilities_add_drop_all():
    default = ["CHOWN", "KILL"]
    caps, _ = spec.capabilities({"capabilities": {"add_capabilities": ["NET_ADMIN"], "drop_capabilities": ["KILL"]}},
                                default, ALL, False)
    assert caps == ["CAP_CHOWN", "CAP_NET_ADMIN"]
    caps, _ = spec.capabilities({"capabilities": {"drop_capabilities": ["ALL"], "add_capabilities": ["KILL"]}},
                                default, ALL, False)
    assert caps == ["CAP_KILL"]
    caps, _ = spec.capabilities({"capabilities": {"add_capabilities": ["SYS_RESOURCE"]}}, default, ALL, False)
    assert "CAP_SYS_RESOURCE" not in caps  # the runtime does not have it to give
    assert spec.capabilities({}, default, ALL, True)[0] == sorted(ALL)
    with pytest.raises(InvalidArgument):
        spec.capabilities({"capabilities": {"add_capabilities": ["NOPE"]}}, default, ALL, False)


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
    assert "/proc/kcore" in s["linux"]["maskedPaths"] and "seccomp" not in s["linux"]  # no profile: unconfined
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
