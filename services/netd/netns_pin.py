"""Child program: create a network namespace and pin it with a bind mount.

    python -I -S netns_pin.py /var/run/netns/criopy-<pod id>

Runs as a short-lived child of netd so that `unshare` never touches the
daemon itself. It does what `ip netns add` does, for any directory: makes the
directory a shared mount point (so unmounting a pin propagates to mount
namespaces copied from this one), unshares a network namespace, bind-mounts
/proc/self/ns/net onto the pin file and brings loopback up inside it.
Standard library only; exit status 0 on success, otherwise the reason on stderr.
"""

import ctypes
import errno
import fcntl
import os
import socket
import struct
import sys

CLONE_NEWNET = 0x40000000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: str, fstype: str, flags: int) -> int:
    return _libc.mount(source.encode(), target.encode(), fstype.encode(), flags, None)


def make_shared_dir(directory: str) -> None:
    """Make `directory` a shared mount point, bind-mounting it on itself if needed."""
    if _mount("", directory, "none", MS_SHARED | MS_REC) == 0:
        return
    if ctypes.get_errno() != errno.EINVAL:  # EINVAL: not a mount point yet
        _check(-1, f"making {directory} shared")
    _check(_mount(directory, directory, "none", MS_BIND | MS_REC), f"bind-mounting {directory} on itself")
    _check(_mount("", directory, "none", MS_SHARED | MS_REC), f"making {directory} shared")


def is_pinned(path: str) -> bool:
    """True when `path` is a bind mount of a network namespace (nsfs)."""
    try:
        return os.stat(path).st_dev == os.stat("/proc/self/ns/net").st_dev
    except OSError:
        return False


def loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def pin(target: str) -> None:
    directory = os.path.dirname(target)
    os.makedirs(directory, mode=0o755, exist_ok=True)
    make_shared_dir(directory)
    if is_pinned(target):
        return  # already created by an earlier attempt: nothing to do
    fd = os.open(target, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o444)
    os.close(fd)
    try:
        _check(_libc.unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)")
        _check(_mount("/proc/self/ns/net", target, "none", MS_BIND), f"bind-mounting the namespace on {target}")
        loopback_up()
    except BaseException:
        _libc.umount2(target.encode(), 2)  # MNT_DETACH
        try:
            os.unlink(target)
        except OSError:
            pass
        raise


def main(argv: list[str]) -> int:
    if len(argv) != 2 or not os.path.isabs(argv[1]):
        sys.stderr.write("usage: netns_pin.py /absolute/pin/path\n")
        return 2
    try:
        pin(argv[1])
    except OSError as e:
        sys.stderr.write(f"{e.strerror or e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
