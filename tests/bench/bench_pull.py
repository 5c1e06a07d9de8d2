"""Pull throughput: imaged against `skopeo copy` of the same image from the same local registry.

Both fetch a multi-layer image of about 100 MiB from docker-registry on
loopback and verify every blob into a local directory (imaged into a fresh
blob store, skopeo into a `dir:` destination). Each runs several times,
alternating, and the medians give the ratio: > 1 means imaged is faster.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import structlog

from services.imaged.service import Imaged
from shared.config import Config
from tests.support import images
from tests.support.registry import start_registry

TOTAL_MB = 100
LAYERS = 6
RUNS = 3
SKOPEO = "/usr/bin/skopeo"
POLICY = '{"default": [{"type": "insecureAcceptAnything"}]}'


async def _imaged_pull(work: Path, registry_host: str, ref: str) -> float:
    config = Config()
    config.crio.root = str(work / "root")
    config.crio.runroot = str(work / "run")
    config.crio.image.registries_conf = ""
    config.crio.image.insecure_registries = [registry_host]
    service = Imaged(config)
    await service.start()
    try:
        start = time.perf_counter()
        await service.pull(reference=ref)
        return time.perf_counter() - start
    finally:
        await service.stop()


def _skopeo_pull(work: Path, ref: str) -> float:
    policy = work / "policy.json"
    policy.write_text(POLICY)
    dest = work / "skopeo-dir"
    start = time.perf_counter()
    subprocess.run([SKOPEO, "--policy", str(policy), "copy", "--src-tls-verify=false", "--quiet",
                    f"docker://{ref}", f"dir:{dest}"], check=True, timeout=600, capture_output=True)
    return time.perf_counter() - start


def _skopeo_startup() -> float:
    start = time.perf_counter()
    subprocess.run([SKOPEO, "--version"], check=True, timeout=60, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    # The report, not imaged's per-pull log lines.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    if shutil.which(SKOPEO) is None:
        raise RuntimeError(f"{SKOPEO} is missing (Debian package skopeo)")
    base = Path(tempfile.mkdtemp(prefix="criopy-bench-"))
    try:
        with start_registry(base / "registry") as registry:
            pushed = images.push_big_image(registry, "bench/big", "latest", total_mb=TOTAL_MB, layers=LAYERS)
            size_mb = pushed.size / (1024 * 1024)
            print(f"image {pushed.ref}: {len(pushed.layer_digests)} layers, {size_mb:.1f} MiB compressed")
            ours: list[float] = []
            theirs: list[float] = []
            for run in range(RUNS):
                work = base / f"run{run}"
                work.mkdir()
                ours.append(asyncio.run(_imaged_pull(work / "imaged", registry.host, pushed.ref)))
                theirs.append(_skopeo_pull(work, pushed.ref))
                shutil.rmtree(work)
                print(f"run {run + 1}: imaged {ours[-1]:.2f} s, skopeo {theirs[-1]:.2f} s")
        t_ours, t_theirs = statistics.median(ours), statistics.median(theirs)
        # skopeo's time includes starting its process; imaged's does not (it is a running daemon).
        t_startup = statistics.median(_skopeo_startup() for _ in range(RUNS))
        t_fair = max(t_theirs - t_startup, 1e-6)
        print(f"imaged: {size_mb / t_ours:.0f} MiB/s (median {t_ours:.2f} s)")
        print(f"skopeo copy: {size_mb / t_theirs:.0f} MiB/s (median {t_theirs:.2f} s; "
              f"{size_mb / t_fair:.0f} MiB/s without its {t_startup:.2f} s start-up)")
        print(f"ratio imaged/skopeo throughput: {t_theirs / t_ours:.2f}; without skopeo's start-up: "
              f"{t_fair / t_ours:.2f} (>= 1.00: imaged at least as fast)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
