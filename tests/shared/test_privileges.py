"""Dropping capabilities: every set of the process ends up as declared."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shared import privileges
from tests.support.stack import REPO

pytestmark = pytest.mark.root

_CHILD = """
import json, os, subprocess, sys
from shared import privileges
kept = privileges.restrict_to(json.loads(sys.argv[1]))
own = {k: sorted(v) for k, v in privileges.read_status_sets().items()}
# A program executed as root afterwards gets no more than the kept set.
child = subprocess.run(["grep", "^Cap", "/proc/self/status"], capture_output=True, text=True).stdout
print(json.dumps({"kept": sorted(kept), "own": own, "exec": child}))
"""


def restrict_in_child(keep: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(keep)], cwd=REPO,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def parse_exec_sets(text: str) -> dict[str, frozenset[str]]:
    sets = {}
    for line in text.splitlines():
        key, value = line.split(":")
        sets[key] = privileges.names_from_mask(int(value.strip(), 16))
    return sets


def test_drop_everything() -> None:
    result = restrict_in_child([])
    assert result["kept"] == []
    for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert result["own"][key] == [], key
    assert all(not s for s in parse_exec_sets(result["exec"]).values())


def test_keep_a_declared_set() -> None:
    keep = ["CAP_NET_ADMIN", "CAP_SYS_ADMIN"]
    result = restrict_in_child(keep)
    assert result["kept"] == sorted(keep)
    assert result["own"]["CapEff"] == sorted(keep)
    assert result["own"]["CapBnd"] == sorted(keep)
    assert result["own"]["CapInh"] == [] and result["own"]["CapAmb"] == []
    executed = parse_exec_sets(result["exec"])
    assert executed["CapEff"] == frozenset(keep)
    assert executed["CapBnd"] == frozenset(keep)


def test_a_capability_the_machine_lacks_is_not_kept() -> None:
    missing = set(privileges.CAPABILITY_NAMES) - privileges.bounding_capabilities()
    if not missing:
        pytest.skip("this machine grants every capability")
    result = restrict_in_child(sorted(missing | {"CAP_CHOWN"}))
    assert result["kept"] == ["CAP_CHOWN"]


def test_unknown_capability_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown capability"):
        privileges.mask_from_names(["CAP_FLY"])
