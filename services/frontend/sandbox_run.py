"""RunPodSandbox: runtimed reserves the pod -> netd attaches it to the network while runtimed
prepares what needs no network -> runtimed makes it.

A retry with the same pod name while the first call still runs waits for it
in runtimed and returns the same pod id. Each step is undone when a later one
fails; the story runs on when the kubelet gives up, so its retry finds the pod.
"""

from __future__ import annotations

from cri_api.v1 import api_pb2

from services.frontend.registry import CallContext, cri_method
from services.frontend.runtime_convert import Story, detached, note_if_stalled, remaining, to_dict
from shared.errors import InvalidArgument
from shared.together import together


@cri_method("RunPodSandbox")
async def run_pod_sandbox(request: api_pb2.RunPodSandboxRequest, call: CallContext) -> api_pb2.RunPodSandboxResponse:
    config = request.config
    if not config.metadata.name or not config.metadata.namespace or not config.metadata.uid:
        raise InvalidArgument("pod sandbox metadata needs a name, a namespace and a uid")
    key = f"pod {config.metadata.namespace}/{config.metadata.name}/{config.metadata.uid}/{config.metadata.attempt}"
    note_if_stalled(key)
    reserved = await call.daemon("runtimed", "reserve_sandbox", config=to_dict(config),
                                 runtime_handler=request.runtime_handler, timeout=remaining(call),
                                 token=call.request_id, holder=call.daemons.instance)
    pod_id = reserved["id"]
    if not reserved["created"]:
        return api_pb2.RunPodSandboxResponse(pod_sandbox_id=pod_id)
    host_network = config.linux.security_context.namespace_options.network == api_pb2.NamespaceMode.NODE
    story = Story(call, key)

    async def make() -> None:
        netns_path, ips = None, []
        try:
            if not host_network:
                network, _ = await together(
                    story.step("netd", "attach", pod_id=pod_id, pod_name=config.metadata.name,
                               pod_namespace=config.metadata.namespace, pod_uid=config.metadata.uid,
                               port_mappings=[to_dict(p) for p in config.port_mappings]),
                    story.step("runtimed", "prepare_sandbox", sandbox_id=pod_id))
                netns_path, ips = network["netns_path"], network.get("ips") or []
            await story.step("runtimed", "create_sandbox", sandbox_id=pod_id, netns_path=netns_path, ips=ips)
        except BaseException:
            if not host_network:
                await story.undo("netd", "detach", pod_id=pod_id)
            await story.undo("runtimed", "release_sandbox", sandbox_id=pod_id)
            raise

    await detached(story, make)
    return api_pb2.RunPodSandboxResponse(pod_sandbox_id=pod_id)
