"""Child program: mount(2) one file system, with paths relative to its working directory.

Run as `python -I -S mount_syscall.py FSTYPE TARGET OPTIONS` with the working
directory set by the caller. Overlay mount options must fit in one page, so
layer paths are given relative to the store (`l/<short name>`); changing
directory is process-wide, which is why this runs in its own process and not
in the asyncio daemon. Standard library only. Exit status 0 on success; on
failure the errno number and message on stderr.
"""

import ctypes
import ctypes.util
import os
import sys


def main(argv: list) -> int:
    if len(argv) != 4:
        sys.stderr.write("usage: mount_syscall.py FSTYPE TARGET OPTIONS\n")
        return 2
    fstype, target, options = argv[1], argv[2], argv[3]
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    rc = libc.mount(fstype.encode(), os.fsencode(target), fstype.encode(), ctypes.c_ulong(0),
                    ctypes.c_char_p(options.encode()))
    if rc != 0:
        err = ctypes.get_errno()
        sys.stderr.write(f"{err} {os.strerror(err)}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
