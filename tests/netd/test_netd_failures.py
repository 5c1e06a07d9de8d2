"""A failing, hanging or garbling plugin makes ADD fail, name the plugin, and undo everything."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shared.errors import DeadlineExceeded, Internal
from tests.netd.netd_env import NetEnv

pytestmark = pytest.mark.root

PREAMBLE = """\
stdin=$(cat)
case "$CNI_COMMAND" in
VERSION) echo '{"cniVersion":"1.0.0","supportedVersions":["0.3.1","0.4.0","1.0.0"]}'; exit 0;;
DEL|CHECK) exit 0;;
esac
"""

FAKES = {
    "failer": PREAMBLE + """\
echo '{"cniVersion":"1.0.0","code":11,"msg":"no luck today","details":"fake failure"}'
exit 1
""",
    "garbler": PREAMBLE + 'echo "this is { not json"\n',
    "silent-crasher": PREAMBLE + 'echo "segfault-ish" >&2\nexit 139\n',
}

RECORDER = """#!{python}
import json, os, sys
conf = json.load(sys.stdin)
cmd = os.environ["CNI_COMMAND"]
if cmd == "VERSION":
    print(json.dumps({{"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]}}))
    sys.exit(0)
env = {{k: v for k, v in os.environ.items() if k.startswith("CNI_")}}
with open({log!r}, "a") as f:
    f.write(json.dumps({{"plugin": {name!r}, "env": env, "conf": conf}}) + "\\n")
if cmd == "ADD":
    print(json.dumps(conf["prevResult"]))
"""


def _assert_nothing_left(net_env: NetEnv) -> None:
    inv = net_env.inventory()
    assert inv["netns"] == [], inv
    assert inv["mounts"] == [], inv
    assert inv["veths"] == [], inv
    assert inv["ipam"] == [], inv
    assert inv["rules"] == [], inv
    state = net_env.root / "state" / "netd"
    assert list((state / "pods").glob("*.json")) == []
    assert not (state / "cni-cache" / "results").exists() or list((state / "cni-cache" / "results").iterdir()) == []


async def _attach(netd, pod_id: str, **kw):
    return await netd.attach(pod_id=pod_id, pod_name="n", pod_namespace="ns", pod_uid="u", **kw)


@pytest.mark.parametrize("fake, kind, words", [
    ("failer", Internal, ["'failer' ADD failed", "no luck today", "fake failure", "CNI error 11"]),
    ("garbler", Internal, ["'garbler' ADD printed invalid JSON", "this is { not json"]),
    ("silent-crasher", Internal, ["'silent-crasher' ADD failed with exit status 139", "segfault-ish"]),
])
async def test_plugin_failure_undoes_everything(net_env: NetEnv, fake: str, kind, words) -> None:
    net_env.fake_plugin(fake, FAKES[fake])
    net_env.write_conflist([net_env.bridge_plugin(), {"type": fake}, {"type": "loopback"}])
    netd = net_env.netd()
    await netd.start()
    with pytest.raises(kind) as info:
        await _attach(netd, "doomed")
    for word in words:
        assert word in info.value.message
    assert await netd.pod_network(pod_id="doomed") is None
    _assert_nothing_left(net_env)
    # The same pod can be attached once the plugin is fixed.
    net_env.write_conflist()
    pod = await _attach(netd, "doomed")
    assert pod["ips"]
    await netd.detach(pod_id="doomed")
    _assert_nothing_left(net_env)


async def test_hanging_plugin_is_killed_at_the_timeout(net_env: NetEnv) -> None:
    pids = net_env.root / "hanger.pids"
    net_env.fake_plugin("hanger", PREAMBLE + f"echo $$ >> {pids}\nsleep 300 &\necho $! >> {pids}\nwait\n")
    net_env.write_conflist([net_env.bridge_plugin(), {"type": "hanger"}])
    net_env.config.crio.network.cni_timeout = 1.0
    netd = net_env.netd()
    await netd.start()
    with pytest.raises(DeadlineExceeded) as info:
        await _attach(netd, "stuck")
    assert "'hanger' ADD timed out after 1s" in info.value.message
    _assert_nothing_left(net_env)
    for pid in pids.read_text().split():
        try:
            with open(f"/proc/{pid}/status") as f:
                state = next(line for line in f if line.startswith("State:"))
            assert "Z" in state, f"plugin process {pid} survived the timeout"
        except FileNotFoundError:
            pass


async def test_unsupported_cni_version_names_the_plugin(net_env: NetEnv) -> None:
    # The Debian firewall plugin speaks 0.4.0 and 1.0.0 only.
    net_env.write_conflist([net_env.bridge_plugin(), {"type": "firewall"}], cni_version="0.3.1")
    netd = net_env.netd()
    await netd.start()
    with pytest.raises(Internal, match="'firewall' does not support cniVersion 0.3.1"):
        await _attach(netd, "old")
    _assert_nothing_left(net_env)


async def test_chain_env_prev_result_and_runtime_config(net_env: NetEnv) -> None:
    log = net_env.root / "calls.jsonl"
    for name in ("wants-ports", "wants-nothing"):
        path = net_env.plugin_dir / name
        path.write_text(RECORDER.format(python=sys.executable, log=str(log), name=name))
        path.chmod(0o755)
    net_env.write_conflist([
        net_env.bridge_plugin(),
        {"type": "wants-ports", "capabilities": {"portMappings": True, "bandwidth": False}},
        {"type": "wants-nothing"},
    ])
    netd = net_env.netd()
    await netd.start()
    pod = await netd.attach(pod_id="rec", pod_name="web-0", pod_namespace="shop", pod_uid="1234-5678",
                            port_mappings=[{"container_port": 80, "host_port": 30080, "protocol": "udp",
                                            "host_ip": "127.0.0.1"}],
                            bandwidth={"ingress_rate": 1000000})
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(c["plugin"], c["env"]["CNI_COMMAND"]) for c in calls] == [("wants-ports", "ADD"), ("wants-nothing", "ADD")]
    ports, nothing = calls
    env = ports["env"]
    assert env["CNI_CONTAINERID"] == "rec"
    assert env["CNI_NETNS"] == pod["netns_path"]
    assert env["CNI_IFNAME"] == "eth0"
    assert env["CNI_ARGS"] == ("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;"
                               "K8S_POD_INFRA_CONTAINER_ID=rec;K8S_POD_UID=1234-5678")
    assert env["CNI_PATH"].split(os.pathsep) == net_env.config.crio.network.plugin_dirs
    assert ports["conf"]["name"] == net_env.network and ports["conf"]["cniVersion"] == "1.0.0"
    # Only the capabilities a plugin asks for reach it.
    assert ports["conf"]["runtimeConfig"] == {"portMappings": [
        {"hostPort": 30080, "containerPort": 80, "protocol": "udp", "hostIP": "127.0.0.1"}]}
    assert "runtimeConfig" not in nothing["conf"]
    # prevResult chains: the bridge's result, passed through by the recorder.
    assert ports["conf"]["prevResult"]["ips"][0]["address"].startswith(pod["ips"][0] + "/")
    assert nothing["conf"]["prevResult"] == ports["conf"]["prevResult"]

    log.unlink()
    await netd.detach(pod_id="rec")
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(c["plugin"], c["env"]["CNI_COMMAND"]) for c in calls] == [("wants-nothing", "DEL"), ("wants-ports", "DEL")]
    assert calls[0]["conf"]["prevResult"] == ports["conf"]["prevResult"]  # the cached final result
    _assert_nothing_left(net_env)


async def test_bandwidth_reaches_the_real_plugin(net_env: NetEnv) -> None:
    net_env.write_conflist([net_env.bridge_plugin(), {"type": "bandwidth", "capabilities": {"bandwidth": True}}])
    netd = net_env.netd()
    await netd.start()
    pod = await _attach(netd, "slow", bandwidth={"ingress_rate": 8_000_000, "ingress_burst": 800_000,
                                                 "egress_rate": 4_000_000})
    host_veth = next(i["name"] for i in pod["interfaces"] if i["name"].startswith("veth"))
    qdisc = subprocess.run(["tc", "qdisc", "show", "dev", host_veth], capture_output=True, text=True).stdout
    assert "tbf" in qdisc
    links = subprocess.run(["ip", "-o", "link", "show", "type", "ifb"], capture_output=True, text=True).stdout
    assert "bwp" in links  # egress shaping goes through an ifb device
    await netd.detach(pod_id="slow")
    links = subprocess.run(["ip", "-o", "link", "show", "type", "ifb"], capture_output=True, text=True).stdout
    assert "bwp" not in links
    _assert_nothing_left(net_env)


async def test_failed_cleanup_is_kept_and_finished_by_detach(net_env: NetEnv) -> None:
    broken = net_env.root / "del-is-broken"
    broken.write_text("")
    net_env.fake_plugin("stubborn", f"""\
stdin=$(cat)
case "$CNI_COMMAND" in
VERSION) echo '{{"cniVersion":"1.0.0","supportedVersions":["1.0.0"]}}'; exit 0;;
DEL) if [ -e {broken} ]; then echo '{{"code":999,"msg":"cannot delete yet"}}'; exit 1; fi; exit 0;;
esac
echo '{{"code":999,"msg":"cannot add"}}'
exit 1
""")
    net_env.write_conflist([net_env.bridge_plugin(), {"type": "stubborn"}])
    netd = net_env.netd()
    await netd.start()
    with pytest.raises(Internal) as info:
        await _attach(netd, "sticky")
    assert "'stubborn' ADD failed: cannot add" in info.value.message
    assert "cleanup incomplete" in info.value.message and "cannot delete yet" in info.value.message
    # Kept for a retry, not forgotten: the namespace and the record are still there.
    [pod] = await netd.list_pod_networks()
    assert pod["pod_id"] == "sticky" and pod["state"] == "detaching"
    assert await netd.pod_network(pod_id="sticky") is None
    with pytest.raises(Internal, match="cannot delete yet"):
        await netd.detach(pod_id="sticky")
    broken.unlink()
    assert (await netd.detach(pod_id="sticky"))["detached"] is True
    _assert_nothing_left(net_env)
