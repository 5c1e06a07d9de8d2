"""netd in a child process, for tests that kill it or restrict its capabilities.

    python -m tests.netd.netd_child CONFIG.toml [--restrict] [--churn WORKERS]

--restrict keeps only Netd's declared capabilities (as the daemon runner does)
before anything else. Without --churn it reads JSON requests, one a line
({"method": "attach", "params": {...}}), and answers each with a JSON line.
With --churn, WORKERS tasks attach and detach pods in a loop, printing a line
per finished call, until killed.
"""

from __future__ import annotations

import asyncio
import json
import sys

import structlog

from services.netd.service import Netd
from shared import config_load, privileges
from shared.errors import CriopyError


async def serve(netd: Netd) -> None:
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            return
        request = json.loads(line)
        try:
            result = await getattr(netd, request["method"])(**request.get("params", {}))
            reply = {"result": result}
        except CriopyError as e:
            reply = {"error": e.to_wire()}
        print(json.dumps(reply), flush=True)


async def churn(netd: Netd, workers: int) -> None:
    async def worker(w: int) -> None:
        for k in range(1_000_000):
            pod = f"churn-{w}-{k}"
            await netd.attach(pod_id=pod, pod_name=pod, pod_namespace="churn", pod_uid=pod)
            print(f"attached {pod}", flush=True)
            await netd.detach(pod_id=pod)
            print(f"detached {pod}", flush=True)

    await asyncio.gather(*(worker(w) for w in range(workers)))


async def main(argv: list[str]) -> None:
    # stdout carries the replies; logs go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    if "--restrict" in argv:
        privileges.restrict_to(Netd.declared_capabilities())
    cfg = config_load.load(config_load.ConfigSources(config_file=argv[1], config_dir="/nonexistent"), environ={})
    netd = Netd(cfg)
    await netd.start()
    print(json.dumps({"ready": True, "capabilities": sorted(privileges.read_status_sets()["CapEff"])}), flush=True)
    try:
        if "--churn" in argv:
            await churn(netd, int(argv[argv.index("--churn") + 1]))
        else:
            await serve(netd)
    finally:
        await netd.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv))
