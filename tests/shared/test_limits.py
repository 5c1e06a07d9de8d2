"""`criopy run` raises its open-files limit before it starts the services, as far as it may."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.stack import REPO

# In a child, so that this process keeps its limits.
_CHILD = """
import json, resource, sys
from shared import limits
soft, hard = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
print(json.dumps(limits.raise_open_files(int(sys.argv[2]))))
"""


def raised(soft: int, hard: int, wanted: int) -> list[int]:
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps([soft, hard]), str(wanted)], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])  # after what the function logs


def test_the_soft_limit_rises_to_the_hard_one() -> None:
    # The hard limit too where the process may raise it (CAP_SYS_RESOURCE), else the soft one meets it.
    soft, hard = raised(256, 4096, 1 << 20)
    assert soft == hard and hard in (4096, 1 << 20)


def test_the_soft_limit_rises_no_further_than_wanted() -> None:
    assert raised(256, 4096, 2048) == [2048, 4096]


def test_a_limit_already_high_enough_stays() -> None:
    assert raised(3000, 4096, 2048) == [3000, 4096]
