"""A real kubelet in standalone mode runs static pods on crio-py.

No API server: the kubelet reads pod manifests from a directory and talks to
crio-py exactly as on a node (sandboxes, pulls, containers, exec and HTTP
probes, restarts with back-off, PLEG relists, stats). The outcome is read
through crictl and the kubelet's own /pods endpoint; any error the kubelet logs
about the runtime fails the test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from tests.clients.conftest import Crictl, Images
from tests.support.registry import free_port
from tests.support.stack import Stack, unmount_below

pytestmark = pytest.mark.root

NODE = "criopy-node"
LEGACY_LOG_LINKS = Path("/var/log/containers")
# klog error lines about the runtime, e.g. `E1129 17:04:08.699237 ... rpc error: code = ...`
RUNTIME_ERROR = re.compile(r"^E\d{4} .*rpc error", re.MULTILINE)


def manifests(image: str) -> dict[str, dict[str, Any]]:
    return {
        "web": {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "default"},
            "spec": {"containers": [{
                "name": "httpd", "image": image, "imagePullPolicy": "IfNotPresent",
                "command": ["sh", "-c", "exec httpd -f -p 8080 -h /etc"],
                "livenessProbe": {"httpGet": {"path": "/passwd", "port": 8080},
                                  "periodSeconds": 2, "failureThreshold": 2},
                "readinessProbe": {"exec": {"command": ["cat", "/etc/passwd"]}, "periodSeconds": 2},
            }]},
        },
        "crasher": {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "crasher", "namespace": "default"},
            "spec": {"restartPolicy": "Always", "containers": [{
                "name": "crash", "image": image, "imagePullPolicy": "IfNotPresent",
                "command": ["sh", "-c", "echo about to fail; exit 3"],
            }]},
        },
        "hostnet": {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "hostnet", "namespace": "default"},
            "spec": {
                "hostNetwork": True,
                "volumes": [{"name": "work", "emptyDir": {}}],
                "initContainers": [{
                    "name": "init", "image": image, "imagePullPolicy": "IfNotPresent",
                    "command": ["sh", "-c", "echo init done > /work/ready"],
                    "volumeMounts": [{"name": "work", "mountPath": "/work"}],
                }],
                "containers": [{
                    "name": "main", "image": image, "imagePullPolicy": "IfNotPresent",
                    "command": ["sh", "-c", "cat /work/ready; exec sleep 3600"],
                    "volumeMounts": [{"name": "work", "mountPath": "/work"}],
                    "resources": {"limits": {"cpu": "200m", "memory": "64Mi"},
                                  "requests": {"cpu": "100m", "memory": "32Mi"}},
                }],
            },
        },
    }


class Kubelet:
    def __init__(self, binary: str, stack: Stack, image: str) -> None:
        self.base = stack.dirs.base / "kubelet"
        self.root_dir = self.base / "root"
        self.manifest_dir = self.base / "manifests"
        self.log_path = self.base / "kubelet.log"
        for d in (self.root_dir, self.manifest_dir, self.base / "pod-logs"):
            d.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        endpoint = f"unix://{stack.dirs.socket}"
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "staticPodPath": str(self.manifest_dir),
            "containerRuntimeEndpoint": endpoint, "imageServiceEndpoint": endpoint,
            "cgroupDriver": "cgroupfs", "cgroupsPerQOS": False, "enforceNodeAllocatable": [],
            "failSwapOn": False, "address": "127.0.0.1", "port": self.port, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": free_port(),
            "authentication": {"anonymous": {"enabled": True}, "webhook": {"enabled": False}},
            "authorization": {"mode": "AlwaysAllow"},
            "syncFrequency": "5s", "fileCheckFrequency": "2s",
            "podLogsDir": str(self.base / "pod-logs"),
        }
        self.config_path = self.base / "kubelet.yaml"
        self.config_path.write_text(json.dumps(config))  # JSON is YAML
        for name, manifest in manifests(image).items():
            (self.manifest_dir / f"{name}.yaml").write_text(json.dumps(manifest))
        self.process = subprocess.Popen(
            [binary, "--config", str(self.config_path), "--root-dir", str(self.root_dir),
             "--hostname-override", NODE, "--v", "2"],
            stdout=subprocess.DEVNULL, stderr=open(self.log_path, "wb"), stdin=subprocess.DEVNULL)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pods(self) -> dict[str, dict[str, Any]]:
        """The kubelet's view of its pods (its /pods endpoint), by pod name without the node suffix."""
        reply = httpx.get(f"https://127.0.0.1:{self.port}/pods", verify=False, timeout=10)
        reply.raise_for_status()
        return {p["metadata"]["name"].removesuffix(f"-{NODE}"): p for p in reply.json()["items"]}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        unmount_below(self.root_dir)
        # The kubelet links every container's log into this fixed directory.
        if LEGACY_LOG_LINKS.is_dir():
            for link in LEGACY_LOG_LINKS.iterdir():
                if link.is_symlink() and os.readlink(link).startswith(str(self.base) + "/"):
                    link.unlink()


@pytest.fixture
def kubelet(kubelet_binary: str, stack: Stack, test_images: Images, crictl: Crictl) -> Iterator[Kubelet]:
    running = Kubelet(kubelet_binary, stack, test_images.busybox)
    try:
        yield running
    finally:
        running.stop()
        # Without the kubelet the static pods stay: remove them as an operator would.
        for pod_id in crictl.out("pods", "-q").split():
            crictl.run("stopp", pod_id, check=False)
            crictl.run("rmp", pod_id, check=False)


def wait_for(predicate, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.time() + timeout
    last: Any = None
    while time.time() < deadline:
        try:
            last = predicate()
        except (httpx.HTTPError, KeyError, AssertionError) as e:
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def condition(pod: dict[str, Any], kind: str) -> str:
    for c in pod.get("status", {}).get("conditions", []):
        if c["type"] == kind:
            return c["status"]
    return ""


def containers(crictl: Crictl, pod_name: str) -> list[dict[str, Any]]:
    pods = [p["id"] for p in crictl.json("pods", "--name", f"{pod_name}-{NODE}")["items"]]
    found = []
    for pod_id in pods:
        found += crictl.json("ps", "-a", "--pod", pod_id)["containers"]
    return found


def test_static_pods_under_a_standalone_kubelet(kubelet: Kubelet, crictl: Crictl):
    try:
        # A web server with HTTP liveness and exec readiness probes becomes and stays Ready.
        wait_for(lambda: condition(kubelet.pods()["web"], "Ready") == "True", 120, "web to be Ready")
        time.sleep(10)  # several probe periods
        web = kubelet.pods()["web"]
        assert condition(web, "Ready") == "True"
        assert web["status"]["containerStatuses"][0]["restartCount"] == 0
        [httpd] = containers(crictl, "web")
        assert httpd["state"] == "CONTAINER_RUNNING" and httpd["metadata"]["attempt"] == 0

        # A container that exits non-zero is restarted, with back-off between attempts.
        crashes = wait_for(lambda: [c for c in containers(crictl, "crasher") if c["metadata"]["attempt"] >= 2],
                           120, "the crashing container to be restarted twice")
        assert crashes
        for c in containers(crictl, "crasher"):
            status = crictl.json("inspect", c["id"])["status"]
            if status["state"] == "CONTAINER_EXITED":
                assert status["exitCode"] == 3
        # The kubelet's pod status follows the runtime's containers a sync later.
        wait_for(lambda: kubelet.pods()["crasher"]["status"]["containerStatuses"][0]["restartCount"] >= 2,
                 60, "the kubelet to count two restarts")
        assert "back-off" in kubelet.logs() and "CrashLoopBackOff" in kubelet.logs()

        # Host network, an init container that ran first, and CPU/memory limits in the cgroup.
        wait_for(lambda: condition(kubelet.pods()["hostnet"], "Ready") == "True", 120, "hostnet to be Ready")
        by_name = {c["metadata"]["name"]: c for c in containers(crictl, "hostnet")}
        init = crictl.json("inspect", by_name["init"]["id"])
        assert init["status"]["state"] == "CONTAINER_EXITED" and init["status"]["exitCode"] == 0
        main = crictl.json("inspect", by_name["main"]["id"])
        assert main["status"]["state"] == "CONTAINER_RUNNING"
        assert crictl.out("logs", by_name["main"]["id"]) == "init done"
        resources = main["info"]["runtimeSpec"]["linux"]["resources"]
        assert resources["memory"]["limit"] == 64 << 20
        assert resources["cpu"]["quota"] == 20000 and resources["cpu"]["period"] == 100000
        [pod_id] = [p["id"] for p in crictl.json("pods", "--name", f"hostnet-{NODE}")["items"]]
        assert crictl.json("inspectp", pod_id)["status"]["linux"]["namespaces"]["options"]["network"] == "NODE"
    finally:
        errors = RUNTIME_ERROR.findall(kubelet.logs())
    assert not errors, "the kubelet logged runtime errors:\n" + "\n".join(
        line for line in kubelet.logs().splitlines() if RUNTIME_ERROR.match(line))
