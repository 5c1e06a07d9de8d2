"""Seccomp profiles: the RuntimeDefault table, Localhost files, and the section runc is given."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
from typing import Any

import pytest

from services.runtimed import seccomp, spec, spec_security
from shared import privileges
from shared.config import DEFAULT_CAPABILITIES, RuntimeConfig
from shared.errors import InvalidArgument
from tests.runtimed.conftest import make_rootfs

CRIO_DEFAULT = frozenset(f"CAP_{c}" for c in DEFAULT_CAPABILITIES)


def verdicts(section: dict[str, Any], name: str) -> list[tuple[str, int | None, tuple]]:
    """(action, errno, args) of every rule naming `name`."""
    return [(r["action"], r.get("errnoRet"), tuple((a["index"], a["op"], a["value"]) for a in r.get("args", ())))
            for r in section["syscalls"] if name in r["names"]]


def allowed(section: dict[str, Any], name: str) -> bool:
    return ("SCMP_ACT_ALLOW", None, ()) in verdicts(section, name)


def refused(section: dict[str, Any], name: str) -> bool:
    return ("SCMP_ACT_ERRNO", errno.EPERM, ()) in verdicts(section, name)


def check_runc_section(section: dict[str, Any], features: dict[str, Any] | None = None) -> None:
    """The shape of the runtime spec's `linux.seccomp`, and values this machine's runc knows."""
    assert set(section) <= {"defaultAction", "defaultErrnoRet", "architectures", "flags", "syscalls"}
    actions = set(features["actions"]) if features else seccomp.ACTIONS
    operators = set(features["operators"]) if features else seccomp.OPERATORS
    archs = set(features["archs"]) if features else seccomp.ARCHITECTURES
    assert section["defaultAction"] in actions
    assert isinstance(section.get("defaultErrnoRet", 0), int)
    assert set(section["architectures"]) <= archs
    for rule in section["syscalls"]:
        assert set(rule) <= {"names", "action", "errnoRet", "args"}
        assert rule["names"] and all(isinstance(n, str) and n for n in rule["names"])
        assert rule["action"] in actions
        assert ("errnoRet" in rule) <= (rule["action"] == "SCMP_ACT_ERRNO")
        for arg in rule.get("args", []):
            assert set(arg) <= {"index", "value", "valueTwo", "op"}
            assert 0 <= arg["index"] <= 5 and 0 <= arg["value"] < 1 << 64 and arg["op"] in operators
    assert json.loads(json.dumps(section)) == section


def test_default_is_an_allow_list_refusing_the_rest_with_enosys():
    section = seccomp.default_profile(CRIO_DEFAULT, arch="amd64")
    assert section["defaultAction"] == "SCMP_ACT_ERRNO" and section["defaultErrnoRet"] == errno.ENOSYS
    assert section["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    for name in ("read", "execve", "clone", "clone3", "mount", "mkdirat", "openat2"):
        assert allowed(section, name), name
    for name in ("swapon", "kexec_load", "userfaultfd", "syscall"):
        assert verdicts(section, name) == [("SCMP_ACT_ERRNO", errno.EPERM, ())], name
    # Not named at all: left to the default action.
    for name in ("afs_syscall", "lookup_dcookie_2", "unshare"):
        assert verdicts(section, name) == [], name
    # personality(2) only with the values ordinary programs pass.
    assert sorted(v[2][0][2] for v in verdicts(section, "personality")) == [0, 8, 0x20000, 0x20008, 0xffffffff]


def test_capability_rules_follow_the_capabilities():
    without = seccomp.default_profile(CRIO_DEFAULT, arch="amd64")
    more = seccomp.default_profile(CRIO_DEFAULT | {"CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_TIME"}, arch="amd64")
    for name in ("chroot", "kcmp", "clock_settime", "settimeofday"):
        assert verdicts(without, name) == [("SCMP_ACT_ERRNO", errno.EPERM, ())], name
        assert verdicts(more, name) == [("SCMP_ACT_ALLOW", None, ())], name
    # CRI-O's own rule: unshare(2) with CAP_SYS_ADMIN only, otherwise the default ENOSYS.
    admin = seccomp.default_profile(CRIO_DEFAULT | {"CAP_SYS_ADMIN"}, arch="amd64")
    assert allowed(admin, "unshare") and verdicts(without, "unshare") == []
    assert allowed(admin, "sethostname") and refused(without, "sethostname")
    # bpf(2): refused unless CAP_SYS_ADMIN or CAP_BPF; either one allows it.
    assert refused(without, "bpf") and not allowed(without, "bpf")
    for caps in ({"CAP_BPF"}, {"CAP_SYS_ADMIN"}):
        section = seccomp.default_profile(CRIO_DEFAULT | caps, arch="amd64")
        assert allowed(section, "bpf") and not refused(section, "bpf")


def test_socket_rules_look_at_the_address_family():
    without = verdicts(seccomp.default_profile(CRIO_DEFAULT, arch="amd64"), "socket")
    assert ("SCMP_ACT_ERRNO", errno.EPERM, ((0, "SCMP_CMP_EQ", seccomp.AF_VSOCK),)) in without
    assert ("SCMP_ACT_ERRNO", errno.EPERM, ((0, "SCMP_CMP_EQ", seccomp.AF_ALG),)) in without
    audit = ((0, "SCMP_CMP_EQ", seccomp.AF_NETLINK), (2, "SCMP_CMP_EQ", seccomp.NETLINK_AUDIT))
    assert ("SCMP_ACT_ERRNO", errno.EINVAL, audit) in without
    assert ("SCMP_ACT_ALLOW", None, ((0, "SCMP_CMP_NE", seccomp.AF_NETLINK),)) in without
    with_audit = verdicts(seccomp.default_profile(CRIO_DEFAULT | {"CAP_AUDIT_WRITE"}, arch="amd64"), "socket")
    assert all(v[1] != errno.EINVAL for v in with_audit)
    assert ("SCMP_ACT_ALLOW", None, ((0, "SCMP_CMP_NE", seccomp.AF_VSOCK),)) in with_audit


def test_architecture_rules_follow_the_machine():
    amd64 = seccomp.default_profile(CRIO_DEFAULT, arch="amd64")
    arm64 = seccomp.default_profile(CRIO_DEFAULT, arch="arm64")
    ppc = seccomp.default_profile(CRIO_DEFAULT, arch="ppc64le")
    assert allowed(amd64, "arch_prctl") and allowed(amd64, "modify_ldt") and not verdicts(amd64, "set_tls")
    assert allowed(arm64, "set_tls") and not verdicts(arm64, "arch_prctl")
    assert arm64["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]
    # No archMap entry for ppc64le: libseccomp takes the native architecture alone.
    assert ppc["architectures"] == [] and allowed(ppc, "sync_file_range2")


def test_default_section_is_what_this_runc_accepts():
    runc = shutil.which("runc")
    if runc is None:
        pytest.skip("runc is not installed")
    features = json.loads(subprocess.run([runc, "features"], capture_output=True, text=True, check=True).stdout)
    for caps in (frozenset(), CRIO_DEFAULT, frozenset(privileges.CAPABILITY_NAMES)):
        check_runc_section(seccomp.default_profile(caps), features["linux"]["seccomp"])


def test_profiles_in_the_containers_format_are_resolved():
    profile = {
        "defaultAction": "SCMP_ACT_ALLOW", "defaultErrno": "EPERM",
        "archMap": [{"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]}],
        "syscalls": [
            {"name": "mkdir", "action": "SCMP_ACT_ERRNO", "errno": "EACCES", "comment": "", "args": []},
            {"names": ["mount"], "action": "SCMP_ACT_ERRNO", "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
            {"names": ["chroot"], "action": "SCMP_ACT_ERRNO", "includes": {"caps": ["CAP_SYS_CHROOT", "CAP_KILL"]}},
            {"names": ["ioperm"], "action": "SCMP_ACT_ERRNO", "includes": {"arches": ["arm64"]}},
            {"names": ["kill"], "action": "SCMP_ACT_ERRNO",
             "args": [{"index": 1, "value": 9, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]},
        ],
    }
    out = seccomp.resolve(profile, {"CAP_SYS_CHROOT"}, "p", arch="amd64")
    check_runc_section(out)
    assert out["defaultErrnoRet"] == errno.EPERM and out["architectures"] == []
    assert [r["names"] for r in out["syscalls"]] == [["mkdir"], ["mount"], ["kill"]]
    assert out["syscalls"][0]["errnoRet"] == errno.EACCES
    assert out["syscalls"][2]["args"] == [{"index": 1, "value": 9, "op": "SCMP_CMP_EQ"}]
    out = seccomp.resolve(profile, {"CAP_SYS_ADMIN", "CAP_SYS_CHROOT", "CAP_KILL"}, "p", arch="arm64")
    assert [r["names"] for r in out["syscalls"]] == [["mkdir"], ["chroot"], ["ioperm"], ["kill"]]
    assert out["architectures"] == ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"]


@pytest.mark.parametrize("bad, message", [
    ([], "JSON object"),
    ({}, "defaultAction"),
    ({"defaultAction": "SCMP_ACT_NOPE"}, "defaultAction"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
      "archMap": [{"architecture": "SCMP_ARCH_X86_64"}]}, "not both"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_Z80"]}, "architecture"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": {"names": ["x"]}}, "list"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": [], "action": "SCMP_ACT_ERRNO"}]}, "names no"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"name": "a", "names": ["b"], "action": "SCMP_ACT_LOG"}]},
     "not both"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["a"], "action": "SCMP_ACT_NOTIFY"}]}, "action"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["a"], "action": "SCMP_ACT_ERRNO",
                                                        "errno": "ENOTANERRNO"}]}, "errno"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["a"], "action": "SCMP_ACT_ERRNO",
                                                        "errnoRet": -1}]}, "errnoRet"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["a"], "action": "SCMP_ACT_ALLOW",
                                                        "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]},
     "index"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["a"], "action": "SCMP_ACT_ALLOW",
                                                        "args": [{"index": 0, "value": 1, "op": "=="}]}]}, "op"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["a"], "action": "SCMP_ACT_ALLOW",
                                                        "includes": {"caps": "CAP_KILL"}}]}, "includes.caps"),
    ({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_NOPE"]}, "flags"),
])
def test_invalid_profiles_are_refused(bad, message):
    with pytest.raises(InvalidArgument, match=message):
        seccomp.resolve(bad, CRIO_DEFAULT, "p", arch="amd64")


def test_profile_files(tmp_path):
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW",
                                "syscalls": [{"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}))
    assert seccomp.load_profile(str(good), CRIO_DEFAULT)["syscalls"] == [
        {"names": ["mkdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    (tmp_path / "bad.json").write_text("{not json")
    for path, message in ((str(tmp_path / "missing.json"), "does not exist"),
                          (str(tmp_path / "bad.json"), "not valid JSON"),
                          ("good.json", "absolute"), ("", "empty"), (str(tmp_path), "cannot be read")):
        with pytest.raises(InvalidArgument, match=message):
            seccomp.load_profile(path, CRIO_DEFAULT)


def test_which_profile_a_security_context_selects(tmp_path):
    profile = tmp_path / "p.json"
    profile.write_text('{"defaultAction": "SCMP_ACT_LOG"}')
    rc = RuntimeConfig()

    def select(sc: dict[str, Any]) -> tuple[dict | None, str]:
        return spec_security.seccomp_profile(sc, set(CRIO_DEFAULT), rc)

    # Nothing at all, or the deprecated path empty: unconfined, as CRI-O.
    assert select({}) == (None, "unconfined")
    assert select({"seccomp_profile_path": ""}) == (None, "unconfined")
    assert select({"seccomp": {"profile_type": "Unconfined"}}) == (None, "unconfined")
    assert select({"seccomp_profile_path": "unconfined"}) == (None, "unconfined")
    default = seccomp.default_profile(CRIO_DEFAULT)
    # RuntimeDefault is the enum's zero value: MessageToDict leaves it out.
    for sc in ({"seccomp": {}}, {"seccomp": {"profile_type": "RuntimeDefault"}},
               {"seccomp_profile_path": "runtime/default"}, {"seccomp_profile_path": "docker/default"}):
        assert select(sc) == (default, "runtime/default")
    # The field wins over the deprecated path.
    assert select({"seccomp": {"profile_type": "Unconfined"}, "seccomp_profile_path": "runtime/default"})[0] is None
    for sc in ({"seccomp": {"profile_type": "Localhost", "localhost_ref": str(profile)}},
               {"seccomp_profile_path": f"localhost/{profile}"}):
        assert select(sc)[0]["defaultAction"] == "SCMP_ACT_LOG"
    for sc, message in (({"seccomp": {"profile_type": "Localhost"}}, "empty"),
                        ({"seccomp_profile_path": "notgood"}, "unknown seccomp profile path"),
                        ({"seccomp": {"profile_type": "Sideways"}}, "unknown seccomp profile type")):
        with pytest.raises(InvalidArgument, match=message):
            select(sc)
    # crio.conf's seccomp_profile replaces the built-in RuntimeDefault.
    rc = RuntimeConfig(seccomp_profile=str(profile))
    assert spec_security.seccomp_profile({"seccomp": {}}, set(), rc)[0]["defaultAction"] == "SCMP_ACT_LOG"


def test_build_applies_the_profile_for_the_capabilities_the_container_gets(tmp_path):
    rootfs = str(make_rootfs(tmp_path / "rootfs"))
    sandbox = spec.SandboxFacts(id="pod", cgroup_parent="/p", hostname="h")
    sc = {"seccomp": {"profile_type": "RuntimeDefault"}, "capabilities": {"add_capabilities": ["SYS_CHROOT"]}}

    def section(available: frozenset[str]) -> dict[str, Any]:
        built = spec.build(container_id="c", config={"command": ["sh"], "linux": {"security_context": sc}},
                           image={}, rootfs=rootfs, sandbox=sandbox, rc=RuntimeConfig(), available_caps=available)
        return built.spec["linux"]["seccomp"]

    assert allowed(section(CRIO_DEFAULT | {"CAP_SYS_CHROOT"}), "chroot")
    # A runtime without CAP_SYS_CHROOT cannot hand it on, so neither does the profile.
    assert refused(section(CRIO_DEFAULT), "chroot")
