"""The `criopy` command: run, service, status, restart, config, version."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any, Sequence

from shared import config_load as configuration
from shared import identities, instance_lock
from shared.config import Config
from shared.config_load import ConfigSources
from shared.errors import ConfigError, CriopyError
from shared.services import START_ORDER
from shared.version import RUNTIME_API_VERSION, RUNTIME_NAME, VERSION


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="criopy", description="crio-py: a Kubernetes CRI runtime.")
    parser.add_argument("--config", help=f"configuration file (default {configuration.DEFAULT_CONFIG_FILE})")
    parser.add_argument("--config-dir", help=f"drop-in directory (default {configuration.DEFAULT_CONFIG_DIR})")
    parser.add_argument("--set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                        help="set any option, e.g. --set crio.runtime.log_level=debug (repeatable)")
    for dotted, (flag, var) in configuration.OVERRIDES.items():
        parser.add_argument(flag, dest=f"opt:{dotted}", metavar="VALUE", help=f"{dotted} (env {var})")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="run all five services in the foreground")
    service = commands.add_parser("service", help="run a single service")
    service.add_argument("name", choices=START_ORDER)
    status = commands.add_parser("status", help="report each service")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    restart = commands.add_parser("restart", help="restart one service of a running `criopy run`")
    restart.add_argument("name", choices=START_ORDER)
    commands.add_parser("reload", help="reload the configuration of a running `criopy run` (like SIGHUP)")
    config = commands.add_parser("config", help="print the effective configuration as TOML")
    config.add_argument("--defaults", action="store_true", help="print the defaults, each option commented")
    commands.add_parser("version", help="print the version")
    return parser


def _sources(args: argparse.Namespace) -> ConfigSources:
    overrides: dict[str, Any] = {}
    for dotted in configuration.OVERRIDES:
        value = getattr(args, f"opt:{dotted}")
        if value is not None:
            overrides[dotted] = configuration.parse_override_value(value)
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected TABLE.KEY=VALUE")
        overrides[key.strip()] = configuration.parse_override_value(value.strip())
    return ConfigSources(config_file=args.config, config_dir=args.config_dir, overrides=overrides)


async def _ask(config: Config, target: str, method: str, timeout: float, **params: Any) -> Any:
    from shared.bus.client import BusClient

    client = BusClient.for_service(config, target)
    client.connect()
    try:
        return await client.call(method, deadline=time.time() + timeout, **params)
    finally:
        await client.close()


def _status_without_supervisor(config: Config) -> dict[str, Any]:
    """Under systemd: each service's pid from its lock, the rest from /proc; readiness is systemd's to say."""
    report: dict[str, Any] = {}
    for name in START_ORDER:
        pid = instance_lock.holder(config.lock_file(name))
        entry: dict[str, Any] = {"service": name, "state": "down", "pid": pid, "ready": None}
        if pid is not None:
            try:
                entry.update(state="up", **identities.describe_process(pid))
            except (OSError, KeyError, ValueError):
                pass
        else:
            entry["error"] = "not running"
        report[name] = entry
    return report


async def _status(config: Config) -> dict[str, Any]:
    """Each service as the supervisor sees it; the `criopy` command asks nothing of the services themselves."""
    supervisor = instance_lock.holder(config.lock_file("supervisor"))
    if supervisor is None:
        return _status_without_supervisor(config)
    try:
        children = await _ask(config, "supervisor", "services", config.criopy.bus.health_timeout)
    except CriopyError as e:
        return {name: {"service": name, "state": "unknown",
                       "error": f"criopy run (pid {supervisor}) does not answer: {e.message}"} for name in START_ORDER}
    return {child["name"]: child for child in children}


def _ids(number: int | None, name: str | None) -> str:
    return "-" if number is None else f"{number}({name})" if name and name != str(number) else str(number)


def _print_status(report: dict[str, Any]) -> None:
    out = sys.stdout
    out.write(f"{'SERVICE':<10} {'STATE':<8} {'PID':>7} {'UPTIME':>9} {'VERSION':<8} {'RESTARTS':>8}  "
              f"{'UID':<20} {'GID':<20} {'GROUPS':<28} CAPABILITIES\n")
    for name, h in report.items():
        pid = h.get("pid") or "-"
        uptime = f"{h['uptime']:.0f}s" if "uptime" in h else "-"
        caps = ",".join(c.removeprefix("CAP_") for c in h.get("capabilities", [])) or ("none" if "uid" in h else "-")
        restarts = h.get("restarts", "-")
        groups = ",".join(h.get("group_names", [])) or ("none" if "uid" in h else "-")
        out.write(f"{name:<10} {h['state']:<8} {pid:>7} {uptime:>9} {h.get('version', '-'):<8} {restarts:>8}  "
                  f"{_ids(h.get('uid'), h.get('user')):<20} {_ids(h.get('gid'), h.get('group')):<20} "
                  f"{groups:<28} {caps}\n")
        if h.get("error"):
            out.write(f"{'':<10} {h['error']}\n")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "version":
            sys.stdout.write(f"{RUNTIME_NAME} {VERSION} (CRI {RUNTIME_API_VERSION})\n")
            return 0
        if args.command == "config" and args.defaults:
            sys.stdout.write(configuration.defaults_with_comments())
            return 0
        sources = _sources(args)
        config = configuration.load(sources)
        if args.command == "config":
            sys.stdout.write(config.to_toml())
            return 0
        if args.command in ("service", "run"):
            # What the services create is readable by those that must read it, whatever the caller's umask.
            os.umask(0o022)
        if args.command == "service":
            from shared.daemon import run_service

            return run_service(args.name, config, sources)
        if args.command == "run":
            from shared import limits, log, malloc, tracing
            from shared.forkserver import ForkServer
            from shared.supervisor import run_supervisor

            malloc.limit_arenas()
            open_files = limits.raise_open_files()  # the services, conmon and the containers inherit it
            # Before anything is set up here (logs, lock, threads), so that the services forked from it start clean.
            forks = ForkServer.start() if config.criopy.supervisor.fork_services else None
            log.configure("supervisor", config.crio.runtime.log_level, config.criopy.log.log_format)
            log.get_logger("criopy").info("open_files_limit", soft=open_files[0], hard=open_files[1])
            tracing.configure("supervisor", config.crio.tracing)
            return run_supervisor(config, sources, forks)
        if args.command in ("status", "restart", "reload"):
            from shared import log

            log.configure("criopy", "warning", "auto")
        if args.command in ("status", "restart", "reload") and os.geteuid() != 0:
            sys.stderr.write(f"criopy: {args.command} must run as root: criopy run answers root alone\n")
            return 1
        if args.command == "status":
            report = asyncio.run(_status(config))
            if args.json:
                sys.stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
            else:
                _print_status(report)
            return 0 if all(h["state"] == "up" for h in report.values()) else 1
        if args.command == "reload":
            changes = asyncio.run(_ask(config, "supervisor", "reload", 10.0))
            sys.stdout.write(json.dumps(changes, indent=2, sort_keys=True, default=str) + "\n")
            return 0
        if args.command == "restart":
            result = asyncio.run(_ask(config, "supervisor", "restart", 10.0, service=args.name))
            sys.stdout.write(f"restarting {args.name} (pid was {result.get('pid')})\n")
            return 0
    except ConfigError as e:
        sys.stderr.write(f"criopy: configuration error: {e.message}\n")
        return 2
    except CriopyError as e:
        sys.stderr.write(f"criopy: {e.message}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
