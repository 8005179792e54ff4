"""Operators: the connectors that hand messages to a network (interface in `base`)."""

from __future__ import annotations

from gateway.clock import Clock
from gateway.config import ConfigError, OperatorConfig
from gateway.operators.base import Operator
from gateway.operators.simulated import SimulatedOperator


def create(config: OperatorConfig, clock: Clock) -> Operator:
    """The operator named by `operator.kind`."""
    if config.kind == "simulated":
        return SimulatedOperator(config, clock)
    raise ConfigError(f"setting operator.kind: unknown operator {config.kind!r} "
                      "(available: simulated)")
