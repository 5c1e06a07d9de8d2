"""Pin new IPC and UTS namespaces of a pod onto files (run as a separate process).

Usage: python pin_child.py '<json>' with keys: ipc (file or null), uts (file or
null), hostname, sysctls ({key: value}), netns (path or null, for net.* sysctls).
This process unshares the namespaces, sets the hostname and the pod's sysctls
in them, and bind mounts /proc/self/ns/<kind> onto the given files; the
namespaces then outlive it. Of crio-py it imports only shared/mounts.py
(standard library only), to start quickly.
"""

import ctypes
import ctypes.util
import json
import os
import sys

from shared.mounts import MS_BIND, mount

CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000

libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        sys.stderr.write(f"{what}: {os.strerror(err)}\n")
        sys.exit(1)


def write_sysctl(key, value):
    path = "/proc/sys/" + key.replace(".", "/")
    try:
        with open(path, "w") as f:
            f.write(str(value))
    except OSError as e:
        sys.stderr.write(f"sysctl {key}={value}: {e.strerror}\n")
        sys.exit(1)


def main():
    req = json.loads(sys.argv[1])
    flags = 0
    if req.get("ipc"):
        flags |= CLONE_NEWIPC
    if req.get("uts"):
        flags |= CLONE_NEWUTS
    if flags:
        check(libc.unshare(flags), "unshare")
    if req.get("uts") and req.get("hostname"):
        name = req["hostname"].encode()
        check(libc.sethostname(name, len(name)), "sethostname")
    sysctls = req.get("sysctls") or {}
    for key, value in sysctls.items():
        if not key.startswith("net."):
            write_sysctl(key, value)
    for kind in ("ipc", "uts"):
        target = req.get(kind)
        if target:
            try:
                mount(f"/proc/self/ns/{kind}", target, None, MS_BIND)
            except OSError as e:
                sys.stderr.write(f"bind mount of the {kind} namespace: {e.strerror}\n")
                sys.exit(1)
    net = {k: v for k, v in sysctls.items() if k.startswith("net.")}
    if net and req.get("netns"):
        fd = os.open(req["netns"], os.O_RDONLY)
        check(libc.setns(fd, CLONE_NEWNET), "setns into the pod network namespace")
        os.close(fd)
        for key, value in net.items():
            write_sysctl(key, value)


if __name__ == "__main__":
    main()
