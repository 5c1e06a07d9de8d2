"""The runtime view's lists and lookups against runtimed's own, for the same records and the same filters."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cri_api.v1 import api_pb2

from services.frontend.container_status import container_filter
from services.frontend.runtime_convert import to_message
from services.frontend.runtime_view import RuntimeView
from services.frontend.sandbox_status import sandbox_filter
from services.runtimed import state_feed, status
from services.runtimed.records import CONTAINERS, SANDBOXES, Records
from shared.errors import NotFound


def _pod(pod_id: str, name: str, state: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"id": pod_id, "name": name, "state": state, "created_at": 5, "runtime_handler": "runc",
            "ips": ["10.0.0.7", "fd00::7"], "config": {"metadata": {"name": name, "namespace": "ns", "uid": "u"},
                                                        "labels": labels, "annotations": {"a": name}}}


def _container(cid: str, pod_id: str, name: str, state: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"id": cid, "name": name, "sandbox_id": pod_id, "state": state, "created_at": 6, "started_at": 7,
            "exit_code": 0, "image_name": "busybox", "image_ref": "sha256:" + "cd" * 32, "image_id": "sha256:" + "cd" * 32,
            "log_path": f"/logs/{name}.log", "mounts": [{"container_path": "/data", "host_path": "/srv"}],
            "resources": {"cpu_shares": 512}, "uid": 0, "gid": 0,
            "config": {"metadata": {"name": name, "attempt": 1}, "labels": labels, "annotations": {}}}


@pytest.fixture
def records(tmp_path: Path) -> SimpleNamespace:
    """runtimed's records (some not visible), and a context its status module can read them with."""
    pods = [_pod("aa" + "1" * 62, "web", "ready", {"app": "web", "tier": "front"}),
            _pod("ab" + "2" * 62, "db", "notready", {"app": "db"}),
            _pod("b" + "3" * 63, "half", "creating", {"app": "web"})]
    containers = [_container("c1" + "0" * 62, pods[0]["id"], "nginx", "running", {"role": "server"}),
                  _container("c2" + "0" * 62, pods[0]["id"], "init", "exited", {"role": "init"}),
                  _container("c3" + "0" * 62, pods[1]["id"], "pg", "created", {"role": "server"}),
                  _container("d4" + "0" * 62, pods[1]["id"], "gone", "removing", {"role": "server"})]
    table = Records(str(tmp_path))
    table.sandboxes.update({p["id"]: p for p in pods})
    table.containers.update({c["id"]: c for c in containers})
    return SimpleNamespace(records=table, exit_dir=str(tmp_path))


def _view(ctx: SimpleNamespace) -> RuntimeView:
    """The view as the feed's snapshot would make it."""
    views = {}
    for kind in (SANDBOXES, CONTAINERS):
        for rec in ctx.records.table(kind).values():
            found = state_feed.view(ctx, kind, rec)
            if found is not None:
                views[state_feed.key(kind, rec["id"])] = found
    view = RuntimeView()
    view.reset(views)
    return view


POD_FILTERS = [
    None,
    api_pb2.PodSandboxFilter(),
    api_pb2.PodSandboxFilter(id="a"),
    api_pb2.PodSandboxFilter(id="ab"),
    api_pb2.PodSandboxFilter(state=api_pb2.PodSandboxStateValue(state=api_pb2.SANDBOX_READY)),
    api_pb2.PodSandboxFilter(state=api_pb2.PodSandboxStateValue(state=api_pb2.SANDBOX_NOTREADY)),
    api_pb2.PodSandboxFilter(label_selector={"app": "web"}),
    api_pb2.PodSandboxFilter(label_selector={"app": "web", "tier": "back"}),
    api_pb2.PodSandboxFilter(id="b"),
]

CONTAINER_FILTERS = [
    None,
    api_pb2.ContainerFilter(),
    api_pb2.ContainerFilter(id="c"),
    api_pb2.ContainerFilter(pod_sandbox_id="aa"),
    api_pb2.ContainerFilter(pod_sandbox_id="a"),
    # CREATED is the enum's zero: set, it still filters.
    api_pb2.ContainerFilter(state=api_pb2.ContainerStateValue(state=api_pb2.CONTAINER_CREATED)),
    api_pb2.ContainerFilter(state=api_pb2.ContainerStateValue(state=api_pb2.CONTAINER_EXITED)),
    api_pb2.ContainerFilter(label_selector={"role": "server"}),
    api_pb2.ContainerFilter(pod_sandbox_id="ab", label_selector={"role": "server"}),
    api_pb2.ContainerFilter(id="d4"),
]


@pytest.mark.parametrize("flt", POD_FILTERS)
async def test_pod_lists_match_runtimed(records: SimpleNamespace, flt: api_pb2.PodSandboxFilter | None) -> None:
    expected = await status.list_sandboxes(records, sandbox_filter(flt) if flt is not None else None)
    assert list(_view(records).list_pods(flt).items) == [to_message(e, api_pb2.PodSandbox) for e in expected]


@pytest.mark.parametrize("flt", CONTAINER_FILTERS)
async def test_container_lists_match_runtimed(records: SimpleNamespace, flt: api_pb2.ContainerFilter | None) -> None:
    expected = await status.list_containers(records, container_filter(flt) if flt is not None else None)
    assert list(_view(records).list_containers(flt).containers) == [to_message(e, api_pb2.Container) for e in expected]


async def test_statuses_match_runtimed_by_id_and_unique_prefix(records: SimpleNamespace) -> None:
    view = _view(records)
    for pod_id in ("aa" + "1" * 62, "aa1", "ab"):
        expected = (await status.sandbox_status_call(records, pod_id, False))["status"]
        assert view.pod_status(pod_id).status == to_message(expected, api_pb2.PodSandboxStatus)
    for cid in ("c1" + "0" * 62, "c2", "c3000"):
        expected = (await status.container_status_call(records, cid, False))["status"]
        assert view.container_status(cid).status == to_message(expected, api_pb2.ContainerStatus)
    pod = view.pod_status("aa").status
    assert pod.network.ip == "10.0.0.7" and [i.ip for i in pod.network.additional_ips] == ["fd00::7"]
    # Unknown, ambiguous, or not visible: NotFound, with runtimed's message.
    for missing in ("a", "b" + "3" * 63, "zz"):
        with pytest.raises(NotFound, match=f"pod sandbox {missing} not found"):
            view.pod_status(missing)
    for missing in ("c", "d4", "zz"):
        with pytest.raises(NotFound, match=f"container {missing} not found"):
            view.container_status(missing)


def test_a_change_replaces_the_answers_made_before_it(records: SimpleNamespace) -> None:
    view = _view(records)
    before = view.list_containers(None)
    assert view.list_containers(None) is before  # one message, made once
    running = api_pb2.ContainerFilter(state=api_pb2.ContainerStateValue(state=api_pb2.CONTAINER_RUNNING))
    assert [c.id[:2] for c in view.list_containers(running).containers] == ["c1"]
    assert view.list_containers(running) is view.list_containers(api_pb2.ContainerFilter.FromString(
        running.SerializeToString()))  # the same filter, asked again
    nginx = records.records.containers["c1" + "0" * 62]
    nginx.update(state="exited", exit_code=137, finished_at=9)
    view.apply(state_feed.key(CONTAINERS, nginx["id"]), state_feed.view(records, CONTAINERS, nginx))
    after = view.list_containers(None)
    assert after is not before
    assert {c.id[:2]: c.state for c in after.containers}["c1"] == api_pb2.CONTAINER_EXITED
    assert view.container_status("c1").status.exit_code == 137
    assert view.list_containers(running).containers == []
    view.apply(state_feed.key(SANDBOXES, "aa" + "1" * 62), None)
    assert [p.id[:2] for p in view.list_pods(None).items] == ["ab"]
