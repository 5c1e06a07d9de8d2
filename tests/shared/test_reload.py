"""Reloading the configuration in place."""

from __future__ import annotations

from pathlib import Path

import msgpack

from shared.config_load import ConfigSources, load
from shared.reload import reload_into


def test_a_new_runtime_handler_is_applied_and_its_report_travels_over_the_bus(tmp_path: Path) -> None:
    main = tmp_path / "criopy.conf"
    main.write_text("")
    dropins = tmp_path / "d"
    dropins.mkdir()
    sources = ConfigSources(config_file=str(main), config_dir=str(dropins))
    config = load(sources, environ={})
    (dropins / "10-kata.conf").write_text('[crio.runtime.runtimes.kata]\nruntime_path = "/usr/bin/kata"\n'
                                          '[crio]\nroot = "/elsewhere"\n')
    result = reload_into(config, sources)
    assert set(config.crio.runtime.runtimes) == {"runc", "kata"}
    assert config.crio.runtime.runtimes["kata"].runtime_path == "/usr/bin/kata"
    assert config.crio.root == "/var/lib/criopy"  # needs a restart: not applied
    report = result.describe()
    assert report["needs_restart"] == ["crio.root"]
    assert report["applied"]["crio.runtime.runtimes"]["new"]["kata"]["runtime_path"] == "/usr/bin/kata"
    assert msgpack.unpackb(msgpack.packb(report)) == report
