"""The metrics' pure helpers."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway.metrics import observe_many


def test_observing_many_amounts_at_once_counts_as_observing_each() -> None:
    amounts = [0.0, 0.004, 0.005, 0.0051, 1.0, 2.5, 7.0, 1e9, -1.0, 0.5, 0.5]
    one, many = CollectorRegistry(), CollectorRegistry()
    each = Histogram("t", "time", buckets=(0.005, 0.5, 1.0, 5.0), registry=one)
    batch = Histogram("t", "time", buckets=(0.005, 0.5, 1.0, 5.0), registry=many)
    for amount in amounts:
        each.observe(amount)
    observe_many(batch, amounts)
    observe_many(batch, [])
    assert samples(many) == samples(one)


def samples(registry: CollectorRegistry) -> list[str]:
    return [line for line in generate_latest(registry).decode().splitlines()
            if "_created" not in line]
