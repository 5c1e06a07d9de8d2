"""`[crio.runtime] default_ulimits`: resource limits every container gets, written as CRI-O writes them.

An entry is "<name>=<soft>:<hard>" ("nofile=1024:2048"), or "<name>=<limit>"
for both; -1 is unlimited. The name is a setrlimit resource without its
RLIMIT_ prefix. Entries are checked when the configuration loads, so a typo
stops start-up instead of every container's creation.
"""

from __future__ import annotations

from dataclasses import dataclass

UNLIMITED = 2**64 - 1  # RLIM_INFINITY as the OCI spec's unsigned limits carry it

RESOURCES = frozenset({"as", "core", "cpu", "data", "fsize", "locks", "memlock", "msgqueue", "nice", "nofile",
                       "nproc", "rss", "rtprio", "rttime", "sigpending", "stack"})


@dataclass(frozen=True)
class Ulimit:
    name: str
    soft: int
    hard: int

    @property
    def rlimit(self) -> str:
        return f"RLIMIT_{self.name.upper()}"


def parse(entry: str) -> Ulimit:
    """One entry; ValueError says what is wrong with it."""
    name, sep, limits = str(entry).partition("=")
    name = name.strip().lower()
    if not sep or name not in RESOURCES:
        raise ValueError(f"{entry!r} is not <name>=<soft>:<hard> with a name among {', '.join(sorted(RESOURCES))}")
    soft_text, _, hard_text = limits.partition(":")
    soft, hard = _limit(entry, soft_text), _limit(entry, hard_text or soft_text)
    if soft > hard:
        raise ValueError(f"{entry!r}: the soft limit is above the hard one")
    return Ulimit(name, soft, hard)


def _limit(entry: str, text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{entry!r}: {text.strip()!r} is not a number") from None
    if value == -1:
        return UNLIMITED
    if not 0 <= value < UNLIMITED:
        raise ValueError(f"{entry!r}: {value} is out of range")
    return value
