"""glibc malloc settings for crio-py's processes.

glibc gives each thread that allocates its own malloc arena, up to eight
per core, and an arena's freed pages mostly stay with it: a daemon whose
blocking-work threads (shared/daemon.py) all ran once holds a dozen arenas'
worth of partly used pages. Python's own allocator serves small objects from
its arenas anyway, and the GIL lets one thread at a time allocate, so two
arenas lose nothing: the classic MALLOC_ARENA_MAX=2, set from inside the
process so that it holds however the process was started (systemd, `criopy
run`, forked from the fork server, where the environment comes too late).
"""

from __future__ import annotations

from shared.libc import libc

_M_ARENA_MAX = -8  # malloc.h
ARENAS = 2


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap the arenas malloc makes from now on (existing ones stay); False where malloc is not glibc's."""
    try:
        return bool(libc().mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def trim() -> None:
    """Give the heap's free pages back to the system (after start-up, whose garbage is gone by then)."""
    try:
        libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass
