"""crio-py's configuration: one typed object, built once at start-up.

Sources, later ones winning: built-in defaults, the main TOML file
(/etc/criopy/criopy.conf), every `*.conf` file of the drop-in directory
(/etc/criopy/criopy.conf.d/) in lexical order, environment variables, and
command-line flags. Tables and keys follow CRI-O's crio.conf wherever an
option has a counterpart there (`[crio.runtime] cgroup_manager`,
`[crio.network] network_dir`...); options of crio-py's own live under
`[criopy.*]`. An unknown key or a wrong type stops start-up with a message
naming the file, the key and the problem.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import tomli_w

from shared.errors import ConfigError

DEFAULT_CONFIG_FILE = "/etc/criopy/criopy.conf"
DEFAULT_CONFIG_DIR = "/etc/criopy/criopy.conf.d"

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


@dataclass
class LogConfig:
    log_format: str = _doc("Log format: 'json', 'console', or 'auto' (console on a terminal).", default="auto")
    service_log_levels: dict[str, str] = _doc(
        "Log level of single services, over crio.runtime.log_level (e.g. { netd = \"debug\" }).",
        default_factory=dict)

    def level_of(self, service: str, default: str) -> str:
        return self.service_log_levels.get(service, default)


@dataclass
class CriopyConfig:
    bus: BusConfig = field(default_factory=BusConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
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

    def bus_endpoint(self, service: str) -> str:
        return f"ipc://{self.bus_dir() / (service + '.sock')}"

    def events_endpoint(self, service: str) -> str:
        return f"ipc://{self.bus_dir() / (service + '-events.sock')}"

    def stream_socket(self, service: str) -> Path:
        """The unix socket of a daemon's exec, attach or port-forward streams (shared/bus/streams.py)."""
        return self.bus_dir() / f"{service}-streams.sock"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


# Overrides from the environment and flags: option path -> (flag, variable).
OVERRIDES: dict[str, tuple[str, str]] = {
    "crio.root": ("--root", "CRIOPY_ROOT"),
    "crio.runroot": ("--runroot", "CRIOPY_RUNROOT"),
    "crio.log_dir": ("--log-dir", "CRIOPY_LOG_DIR"),
    "crio.api.listen": ("--listen", "CRIOPY_LISTEN"),
    "crio.runtime.log_level": ("--log-level", "CRIOPY_LOG_LEVEL"),
    "crio.runtime.cgroup_manager": ("--cgroup-manager", "CRIOPY_CGROUP_MANAGER"),
    "crio.network.network_dir": ("--cni-config-dir", "CRIOPY_CNI_CONFIG_DIR"),
    "crio.network.netns_dir": ("--netns-dir", "CRIOPY_NETNS_DIR"),
    "crio.image.registries_conf": ("--registries-conf", "CRIOPY_REGISTRIES_CONF"),
    "criopy.log.log_format": ("--log-format", "CRIOPY_LOG_FORMAT"),
}


# ---------------------------------------------------------------------------
# Building and checking


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _check_value(tp: Any, value: Any, where: str) -> Any:
    """Check one value against a field's type and return it (tables become dataclasses)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: must be a table, not {type(value).__name__}")
        return _build(tp, value, where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: must be a list of {_type_name(item_tp)}, not {type(value).__name__}")
        return [_check_value(item_tp, item, f"{where}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        _key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: must be a table, not {type(value).__name__}")
        return {k: _check_value(value_tp, v, f"{where}.{k}") for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):
        raise TypeError("union types are not used in the configuration")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: must be an integer, not a boolean")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: must be {_type_name(tp)}, not {type(value).__name__} ({value!r:.60})")
    return value


def _build(cls: type, data: Mapping[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"{where}.{key}: unknown key (known here: {known})".lstrip("."))
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _check_value(hints[key], value, f"{where}.{key}".lstrip("."))
    return cls(**kwargs)


def _merge(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None


def _set_path(data: dict[str, Any], dotted: str, value: Any) -> None:
    *tables, key = dotted.split(".")
    node = data
    for t in tables:
        node = node.setdefault(t, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: {t} is not a table")
    node[key] = value


def parse_override_value(text: str) -> Any:
    """A command-line or environment value: a TOML literal if it parses as one, else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


_LOG_LEVELS = ("debug", "info", "warning", "warn", "error", "fatal", "panic")


def _validate(config: Config) -> None:
    rt = config.crio.runtime
    if rt.cgroup_manager not in ("cgroupfs", "systemd"):
        raise ConfigError(f"crio.runtime.cgroup_manager: must be 'cgroupfs' or 'systemd', not {rt.cgroup_manager!r}")
    if rt.default_runtime not in rt.runtimes:
        raise ConfigError(f"crio.runtime.default_runtime: {rt.default_runtime!r} is not in crio.runtime.runtimes")
    if rt.log_level.lower() not in _LOG_LEVELS:
        raise ConfigError(f"crio.runtime.log_level: unknown level {rt.log_level!r}")
    from shared.services import SERVICE_CLASSES

    for service, level in config.criopy.log.service_log_levels.items():
        if service not in SERVICE_CLASSES and service != "supervisor":
            raise ConfigError(f"criopy.log.service_log_levels.{service}: no such service")
        if level.lower() not in _LOG_LEVELS:
            raise ConfigError(f"criopy.log.service_log_levels.{service}: unknown level {level!r}")
    if config.criopy.log.log_format not in ("auto", "json", "console"):
        raise ConfigError(f"criopy.log.log_format: must be auto, json or console, not {config.criopy.log.log_format!r}")
    if config.crio.tracing.tracing_exporter not in ("otlp", "console"):
        raise ConfigError(f"crio.tracing.tracing_exporter: must be 'otlp' or 'console'")
    try:
        int(config.crio.api.listen_mode, 8)
    except ValueError:
        raise ConfigError(f"crio.api.listen_mode: not an octal mode: {config.crio.api.listen_mode!r}") from None
    if not os.path.isabs(config.crio.root) or not os.path.isabs(config.crio.runroot):
        raise ConfigError("crio.root and crio.runroot must be absolute paths")


@dataclass
class ConfigSources:
    """Where the configuration comes from; handed to child services unchanged."""

    config_file: str | None = None
    config_dir: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # option path -> value, from flags

    def argv(self) -> list[str]:
        """Command-line flags that rebuild these sources in a child process."""
        args: list[str] = []
        if self.config_file is not None:
            args += ["--config", self.config_file]
        if self.config_dir is not None:
            args += ["--config-dir", self.config_dir]
        for path, value in self.overrides.items():
            args += ["--set", f"{path}={_toml_literal(value)}"]
        return args


def _toml_literal(value: Any) -> str:
    if isinstance(value, dict):  # inline, so it fits on one option's line
        items = ", ".join(f"{json.dumps(str(k))} = {_toml_literal(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


def load(sources: ConfigSources, environ: Mapping[str, str] | None = None) -> Config:
    """Build the effective configuration from files, environment and flags."""
    env = os.environ if environ is None else environ
    config_file = sources.config_file or env.get("CRIOPY_CONFIG") or DEFAULT_CONFIG_FILE
    config_dir = sources.config_dir or env.get("CRIOPY_CONFIG_DIR") or DEFAULT_CONFIG_DIR
    explicit_file = bool(sources.config_file or env.get("CRIOPY_CONFIG"))

    # Files merge into the defaults table by table, so a drop-in that adds a
    # runtime handler keeps the default one.
    data: dict[str, Any] = Config().to_dict()
    files: list[Path] = []
    main = Path(config_file)
    if main.exists():
        files.append(main)
    elif explicit_file:
        raise ConfigError(f"{main}: configuration file does not exist")
    dropins = Path(config_dir)
    if dropins.is_dir():
        files.extend(sorted(p for p in dropins.iterdir() if p.suffix == ".conf" and p.is_file()))

    for path in files:
        layer = _read_toml(path)
        try:
            _build(Config, layer, "")  # check this file on its own so errors name it
        except ConfigError as e:
            raise ConfigError(f"{path}: {e.message}") from None
        data = _merge(data, layer)

    overlay: dict[str, Any] = {}
    for dotted, (_flag, var) in OVERRIDES.items():
        if var in env:
            _set_path(overlay, dotted, parse_override_value(env[var]))
    for dotted, value in sources.overrides.items():
        _set_path(overlay, dotted, value)
    try:
        _build(Config, overlay, "")
    except ConfigError as e:
        raise ConfigError(f"command line or environment: {e.message}") from None
    data = _merge(data, overlay)

    config = _build(Config, data, "")
    _validate(config)
    return config


def defaults_with_comments() -> str:
    """The default configuration as TOML, each option preceded by its description."""
    lines: list[str] = ["# crio-py configuration: every option with its default."]

    def emit(obj: Any, table: str) -> None:
        scalars = []
        subtables = []
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                subtables.append((f.name, value))
            elif isinstance(value, dict) and value and all(dataclasses.is_dataclass(v) for v in value.values()):
                subtables.extend((f"{f.name}.{k}", v) for k, v in value.items())
            else:
                scalars.append((f, value))
        if scalars:
            lines.append("")
            if table:
                lines.append(f"[{table}]")
            for f, value in scalars:
                lines.append(f"# {f.metadata.get('doc', '')}")
                lines.append(f"{f.name} = {_toml_literal(value)}")
        for name, sub in subtables:
            emit(sub, f"{table}.{name}" if table else name)

    emit(Config(), "")
    return "\n".join(lines) + "\n"
