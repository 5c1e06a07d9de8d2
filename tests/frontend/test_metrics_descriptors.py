"""Which metric families ListMetricDescriptors describes, by configuration."""

from __future__ import annotations

from services.frontend import metrics_descriptors as md
from shared.config import Config


def test_families_follow_included_pod_metrics():
    config = Config()
    assert md.included_families(config) == []
    assert [d.name for d in md.descriptors([])] == ["container_last_seen"]
    config.crio.stats.included_pod_metrics = ["memory", "bogus", "network", "memory"]
    assert md.included_families(config) == ["memory", "network"]
    names = [d.name for d in md.descriptors(md.included_families(config))]
    assert "container_memory_working_set_bytes" in names and "container_network_transmit_bytes_total" in names
    assert not any(n.startswith("container_cpu_") for n in names)
    for d in md.descriptors(list(md.FAMILIES)[1:]):
        assert list(d.label_keys[:5]) == ["id", "image", "namespace", "pod", "container"] and d.help
