"""Operators: the connectors that hand messages to a network (interface in `base`)."""

from __future__ import annotations

from gateway.clock import Clock
from gateway.config import (
    ConfigError,
    OperatorConfig,
    SimulatedOperatorConfig,
    SmppOperatorConfig,
)
from gateway.metrics import Metrics
from gateway.operators.base import Operator


def create(config: OperatorConfig, clock: Clock, metrics: Metrics | None = None) -> Operator:
    """The operator named by `operator.kind`."""
    if isinstance(config, SimulatedOperatorConfig):
        # Imported when picked, as uvicorn picks its loops: a connector's dependencies
        # (an SMPP library) are loaded only by the gateways that use it.
        from gateway.operators.simulated import SimulatedOperator

        return SimulatedOperator(config, clock)
    if isinstance(config, SmppOperatorConfig):
        from gateway.operators.smpp.connector import SmppOperator

        return SmppOperator(config.smpp, clock, metrics)
    raise ConfigError(f"setting operator.kind: unknown operator {config.kind!r} "
                      "(available: simulated, smpp)")
