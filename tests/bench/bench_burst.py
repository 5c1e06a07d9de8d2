"""A node restart's burst: fifty pods of one container created at once, then stopped and removed at once.

As the kubelet does after a node restart, every pod's RunPodSandbox,
CreateContainer and StartContainer run in parallel (one thread per pod), then
every pod's StopPodSandbox and RemovePodSandbox. Reports the median and p99 of
each CRI call, and the total time of each half of the burst.
"""

from __future__ import annotations

import concurrent.futures
import sys
import time

from tests.bench.bench_pods import CrioPods, bench_stack, report

BURST = 50


def burst(pods: CrioPods, size: int = BURST) -> list[str]:
    with concurrent.futures.ThreadPoolExecutor(size) as pool:
        started = time.perf_counter()
        pod_ids = list(pool.map(lambda _: pods.start(), range(size)))
        start_total = time.perf_counter() - started
        started = time.perf_counter()
        list(pool.map(pods.stop, pod_ids))
        stop_total = time.perf_counter() - started
    lines = [report(method, durations) for method, durations in pods.calls.items()]
    lines += [f"{size} pods started at once: {start_total:.2f} s in all",
              f"{size} pods stopped and removed at once: {stop_total:.2f} s in all"]
    return lines


def main() -> None:
    with bench_stack() as (pods, _work, _conflist):
        # A first pod outside the burst: what is made once (the pin directory, the bridge) is made.
        pods.stop(pods.start())
        pods.calls.clear()
        lines = burst(pods)
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
