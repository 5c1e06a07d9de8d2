"""crio-py's configuration: one typed object, built once at start-up (config_load.py).

Tables and keys follow CRI-O's crio.conf wherever an option has a counterpart
there (`[crio.runtime] cgroup_manager`, `[crio.network] network_dir`...);
options of crio-py's own live under `[criopy.*]`. Each field carries its
one-line description, printed by `criopy config --defaults`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

# The capabilities CRI-O grants a container by default.
DEFAULT_CAPABILITIES = [
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "SETGID", "SETUID",
    "SETPCAP", "NET_BIND_SERVICE", "KILL",
]


def _doc(text: str, **kwargs: Any) -> Any:
    """A field with its one-line description (printed by `criopy config --defaults`)."""
    return field(metadata={"doc": text}, **kwargs)


@dataclass
class ApiConfig:
    listen: str = _doc("Path of the CRI gRPC unix socket.", default="/run/criopy/criopy.sock")
    listen_mode: str = _doc("File mode of the CRI socket (octal).", default="0660")
    listen_group: str = _doc(
        "Group of the CRI socket; empty: root's, so that only root may connect (as to CRI-O's socket).", default="")
    stream_address: str = _doc("Address the streaming server (exec/attach/port-forward) listens on.", default="127.0.0.1")
    stream_port: str = _doc("Port of the streaming server; 0 picks a free one.", default="0")
    stream_enable_tls: bool = _doc("Serve the streaming server over TLS.", default=False)
    stream_tls_cert: str = _doc("Certificate file for the streaming server.", default="")
    stream_tls_key: str = _doc("Key file for the streaming server.", default="")
    stream_idle_timeout: str = _doc("Idle time after which a streaming session is closed.", default="4h")
    grpc_max_send_msg_size: int = _doc("Largest gRPC message the frontend sends, in bytes.", default=80 * 1024 * 1024)
    grpc_max_recv_msg_size: int = _doc("Largest gRPC message the frontend accepts, in bytes.", default=80 * 1024 * 1024)


@dataclass
class RuntimeHandler:
    runtime_path: str = _doc("Path of the OCI runtime binary.", default="/usr/bin/runc")
    runtime_type: str = _doc("Kind of runtime; only 'oci' is supported.", default="oci")
    runtime_root: str = _doc("Root directory of the runtime's state; empty: under runtimed's state.", default="")
    monitor_path: str = _doc("Path of the conmon binary that monitors each container.", default="/usr/bin/conmon")
    privileged_without_host_devices: bool = _doc("Privileged containers of this handler get no host devices.", default=False)
    container_create_timeout: float = _doc(
        "Seconds conmon and `runc create` may take to create a container; then both are killed.", default=240.0)


@dataclass
class RuntimeConfig:
    default_runtime: str = _doc("Runtime handler used when the CRI names none.", default="runc")
    runtimes: dict[str, RuntimeHandler] = _doc(
        "Runtime handlers by name.", default_factory=lambda: {"runc": RuntimeHandler()})
    cgroup_manager: str = _doc("Cgroup driver: 'cgroupfs' or 'systemd'.", default="cgroupfs")
    conmon_cgroup: str = _doc("Cgroup that conmon is put in: 'pod' or a path.", default="pod")
    log_level: str = _doc("Log level of every service: debug, info, warning, error.", default="info")
    log_size_max: int = _doc("Largest container log file before conmon truncates it; -1 is unlimited.", default=-1)
    default_capabilities: list[str] = _doc(
        "Capabilities a container gets unless its security context says otherwise.",
        default_factory=lambda: list(DEFAULT_CAPABILITIES))
    default_sysctls: list[str] = _doc("Sysctls (key=value) applied to every pod.", default_factory=list)
    default_env: list[str] = _doc("Environment (KEY=value) added to every container.", default_factory=list)
    default_ulimits: list[str] = _doc(
        "Resource limits every container gets, as CRI-O writes them: '<name>=<soft>:<hard>' (nofile=1024:2048).",
        default_factory=list)
    seccomp_profile: str = _doc("Path of the RuntimeDefault seccomp profile; empty: the built-in one.", default="")
    apparmor_profile: str = _doc("AppArmor profile for RuntimeDefault.", default="crio-default")
    allowed_devices: list[str] = _doc("Devices a pod may ask for by annotation.", default_factory=lambda: ["/dev/fuse"])
    container_exits_dir: str = _doc("Where conmon writes exit files; empty: under runtimed's run directory.", default="")
    pinns_path: str = _doc("Unused: namespaces are pinned by runtimed itself.", default="")
    infra_command: str = _doc("Init process of pods that share a PID namespace.", default="/usr/bin/catatonit")
    pids_limit: int = _doc("Largest number of processes in a container; 0 or -1: no limit.", default=0)


@dataclass
class ImageConfig:
    default_transport: str = _doc("Transport of image references.", default="docker://")
    global_auth_file: str = _doc("Registry credentials in the containers auth.json format.", default="")
    registries_conf: str = _doc(
        "Registries configuration (containers-registries.conf v2).", default="/etc/containers/registries.conf")
    pause_image: str = _doc("Image of the infra container, when one is needed.", default="registry.k8s.io/pause:3.10")
    insecure_registries: list[str] = _doc("Registries reached over plain HTTP.", default_factory=list)
    max_parallel_downloads: int = _doc("Layers downloaded at once per pull.", default=3)
    image_platform: str = _doc("Platform picked from a multi-platform image; empty: this machine's.", default="")
    allow_device_nodes: bool = _doc("Create device nodes found in image layers.", default=False)


@dataclass
class NetworkConfig:
    cni_default_network: str = _doc("Name of the CNI network to use; empty: the first one found.", default="")
    network_dir: str = _doc("Directory of CNI network configurations.", default="/etc/cni/net.d/")
    plugin_dirs: list[str] = _doc(
        "Directories searched for CNI plugins.", default_factory=lambda: ["/opt/cni/bin/", "/usr/lib/cni/"])
    netns_dir: str = _doc("Directory where pod network namespaces are pinned.", default="/var/run/netns")
    cni_timeout: float = _doc("Seconds a CNI plugin call may take.", default=60.0)


@dataclass
class MetricsConfig:
    enable_metrics: bool = _doc("Serve Prometheus metrics.", default=False)
    metrics_host: str = _doc("Address of the metrics endpoint.", default="127.0.0.1")
    metrics_port: int = _doc("Port of the metrics endpoint.", default=9090)


@dataclass
class TracingConfig:
    enable_tracing: bool = _doc("Export OpenTelemetry traces.", default=False)
    tracing_exporter: str = _doc("Exporter when tracing is on: 'otlp' (gRPC) or 'console'.", default="otlp")
    tracing_endpoint: str = _doc("OTLP gRPC endpoint (host:port).", default="127.0.0.1:4317")
    tracing_sampling_rate_per_million: int = _doc("Traces sampled per million.", default=1_000_000)


@dataclass
class StatsConfig:
    stats_collection_period: int = _doc(
        "Seconds between stats collections; 0 collects on each request (the only mode crio-py has).", default=0)
    included_pod_metrics: list[str] = _doc(
        "Metric families served by ListPodSandboxMetrics: cpu, memory, network, process, disk, oom, spec.",
        default_factory=list)


@dataclass
class CrioConfig:
    root: str = _doc("Directory of persistent state; each service keeps its own subdirectory.", default="/var/lib/criopy")
    runroot: str = _doc("Directory of runtime files (sockets, pid files).", default="/run/criopy")
    log_dir: str = _doc("Default directory of container logs.", default="/var/log/criopy/pods")
    api: ApiConfig = field(default_factory=ApiConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    stats: StatsConfig = field(default_factory=StatsConfig)


@dataclass
class BusConfig:
    socket_dir: str = _doc("Directory of the bus sockets; empty: <runroot>/bus.", default="")
    max_message_bytes: int = _doc("Largest bus message a daemon accepts.", default=16 * 1024 * 1024)
    default_timeout: float = _doc("Seconds a call may take when the CRI caller set no deadline.", default=120.0)
    health_timeout: float = _doc("Seconds a health probe waits for a daemon.", default=1.0)


@dataclass
class SupervisorConfig:
    restart_backoff_initial: float = _doc("Seconds before a crashed service is restarted the first time.", default=0.5)
    restart_backoff_max: float = _doc("Longest wait between restarts of a crashing service.", default=30.0)
    stop_timeout: float = _doc("Seconds a service has to stop before it is killed.", default=10.0)
    fork_services: bool = _doc(
        "`criopy run` forks the services from a process holding their common modules (shared pages, less memory) "
        "instead of starting a new interpreter for each.", default=True)


@dataclass
class UsersConfig:
    frontend: str = _doc(
        "User the frontend runs as once its socket is bound. 'root': it stays root, and the daemons take "
        "root's calls as the frontend's (for running single services by hand).", default="criopy-frontend")
    imaged: str = _doc("User imaged runs as. 'root': it stays root (for running it by hand).", default="criopy-imaged")


@dataclass
class LogConfig:
    log_format: str = _doc("Log format: 'json', 'console', or 'auto' (console on a terminal).", default="auto")
    service_log_levels: dict[str, str] = _doc(
        "Log level of single services, over crio.runtime.log_level (e.g. { netd = \"debug\" }).",
        default_factory=dict)

    def level_of(self, service: str, default: str) -> str:
        return self.service_log_levels.get(service, default)


@dataclass
class FrontendConfig:
    read_model: bool = _doc(
        "Answer ListPodSandbox, ListContainers, the non-verbose PodSandboxStatus, ContainerStatus and ImageStatus, "
        "ListImages and Status from the frontend's memory, kept by the daemons' events; false: ask the daemons.",
        default=True)
    cache_ttl: float = _doc(
        "Seconds an ImageFsInfo or stats answer is reused while no pod, container or image changed (with read_model).",
        default=1.0)
    health_interval: float = _doc(
        "Seconds between the health probes of runtimed and netd that Status answers from (with read_model).",
        default=1.0)


@dataclass
class CriopyConfig:
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    bus: BusConfig = field(default_factory=BusConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    users: UsersConfig = field(default_factory=UsersConfig)
    log: LogConfig = field(default_factory=LogConfig)


@dataclass
class Config:
    crio: CrioConfig = field(default_factory=CrioConfig)
    criopy: CriopyConfig = field(default_factory=CriopyConfig)

    # Paths derived from the options; one place so no module builds them itself.
    def state_dir(self, service: str) -> Path:
        return Path(self.crio.root) / service

    def run_dir(self, service: str) -> Path:
        return Path(self.crio.runroot) / service

    def bus_dir(self) -> Path:
        return Path(self.criopy.bus.socket_dir or os.path.join(self.crio.runroot, "bus"))

    def service_bus_dir(self, service: str) -> Path:
        """A daemon's (or the supervisor's) own directory of sockets: only its callers may enter it."""
        return self.bus_dir() / service

    def bus_endpoint(self, service: str) -> str:
        return f"ipc://{self.service_bus_dir(service) / 'bus.sock'}"

    def events_endpoint(self, service: str) -> str:
        return f"ipc://{self.service_bus_dir(service) / 'events.sock'}"

    def stream_socket(self, service: str) -> Path:
        """The unix socket of a daemon's exec, attach or port-forward streams (shared/bus/streams.py)."""
        return self.service_bus_dir(service) / "streams.sock"

    def lock_file(self, service: str) -> Path:
        """What a running instance of `service` (or of the supervisor) holds locked, with its pid inside.

        The frontend's lies beside the CRI socket it guards; a daemon's in its own directory of sockets,
        where it may write whichever user it starts as.
        """
        if service == "frontend":
            return Path(self.crio.api.listen + ".lock")
        return self.service_bus_dir(service) / "lock"

    def notify_socket(self) -> Path:
        """Where the supervisor hears its services say they are ready (systemd's notify protocol)."""
        return self.bus_dir() / "notify.sock"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())
