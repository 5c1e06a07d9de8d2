"""A container's confinement in its spec: capabilities, seccomp, AppArmor, masked and read-only paths."""

from __future__ import annotations

from typing import Any

from services.runtimed import seccomp
from services.runtimed.paths import clean_absolute
from shared import privileges
from shared.config import RuntimeConfig
from shared.errors import InvalidArgument


def runtime_capabilities() -> frozenset[str]:
    """Capabilities this process can hand on to a container."""
    return privileges.bounding_capabilities() & privileges.effective_capabilities()


def _cap_name(name: str) -> str:
    name = str(name).upper()
    return name if name.startswith("CAP_") else "CAP_" + name


def capabilities(sc: dict[str, Any], default: list[str], available: frozenset[str],
                 privileged: bool) -> tuple[list[str], list[str]]:
    """(bounding/effective/permitted, ambient) capability names."""
    if privileged:
        return sorted(available), []
    caps_cfg = sc.get("capabilities") or {}
    add = [_cap_name(c) for c in caps_cfg.get("add_capabilities") or []]
    drop = [_cap_name(c) for c in caps_cfg.get("drop_capabilities") or []]
    ambient = [_cap_name(c) for c in caps_cfg.get("add_ambient_capabilities") or []]
    for name in add + drop + ambient:
        if name != "CAP_ALL" and name not in privileges.CAPABILITY_NUMBERS:
            raise InvalidArgument(f"unknown capability {name}")
    caps = {_cap_name(c) for c in default}
    if "CAP_ALL" in drop:
        caps = set()
    else:
        caps -= set(drop)
    if "CAP_ALL" in add:
        caps |= set(privileges.CAPABILITY_NAMES)
    else:
        caps |= set(add) | set(ambient)
    caps &= available
    return sorted(caps), sorted(set(ambient) & caps)


def seccomp_profile(sc: dict[str, Any], caps: set[str], rc: RuntimeConfig) -> tuple[dict | None, str]:
    """The seccomp section for the bounding set `caps`, and where it came from.

    As CRI-O: no profile at all runs unconfined; RuntimeDefault is crio.conf's
    seccomp_profile or the built-in profile. Without the `seccomp` field, the
    deprecated seccomp_profile_path is read the way CRI-O read it before it was
    dropped: "", "unconfined", "runtime/default", "docker/default", "localhost/<path>".
    """
    prof = sc.get("seccomp")
    if prof is not None:
        kind = prof.get("profile_type", "RuntimeDefault")
        kind = {0: "RuntimeDefault", 1: "Unconfined", 2: "Localhost"}.get(kind, kind)
        if kind == "Unconfined":
            return None, "unconfined"
        if kind == "Localhost":
            ref = prof.get("localhost_ref", "")
            return seccomp.load_profile(ref, caps), "localhost/" + ref
        if kind != "RuntimeDefault":
            raise InvalidArgument(f"unknown seccomp profile type {kind!r}")
    else:
        path = sc.get("seccomp_profile_path", "")
        if path in ("", "unconfined"):
            return None, "unconfined"
        if path.startswith("localhost/"):
            ref = path[len("localhost/"):]
            return seccomp.load_profile(ref, caps), path
        if path not in ("runtime/default", "docker/default"):
            raise InvalidArgument(f"unknown seccomp profile path {path!r}")
    if rc.seccomp_profile:
        return seccomp.load_profile(rc.seccomp_profile, caps), "runtime/default"
    return seccomp.default_profile(caps), "runtime/default"


def apparmor_enabled() -> bool:
    try:
        with open("/sys/module/apparmor/parameters/enabled") as f:
            return f.read().strip() == "Y"
    except OSError:
        return False


def apparmor_profile(sc: dict[str, Any], rc: RuntimeConfig) -> str:
    prof = sc.get("apparmor")
    if prof:
        kind = prof.get("profile_type", "RuntimeDefault")
        if kind == "Unconfined":
            return "unconfined"
        if kind == "Localhost":
            return prof.get("localhost_ref", "")
        return rc.apparmor_profile
    name = sc.get("apparmor_profile", "")
    if name == "unconfined":
        return "unconfined"
    if name.startswith("localhost/"):
        return name[len("localhost/"):]
    return rc.apparmor_profile


def unique_paths(paths: list[str]) -> list[str]:
    out = []
    for p in paths:
        p = clean_absolute(p, "masked or read-only path")
        if p not in out:
            out.append(p)
    return out
