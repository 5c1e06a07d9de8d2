"""`make bench`: run every benchmark module in this directory (bench_*.py) and print its report."""

from __future__ import annotations

import importlib
import logging
import pkgutil
import sys
from pathlib import Path

import structlog


def main() -> int:
    # The report is what this prints: crio-py's own code run here (the status the fixtures ask) logs only problems.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    names = sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.name.startswith("bench_"))
    selected = [n for n in names if not sys.argv[1:] or n in sys.argv[1:]]
    failed = 0
    for name in selected:
        module = importlib.import_module(f"tests.bench.{name}")
        sys.stdout.write(f"== {name}\n")
        try:
            module.main()
        except Exception as e:  # one broken benchmark does not hide the others
            failed += 1
            sys.stdout.write(f"{name} failed: {e!r}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
