"""What a simulated module offers to the endpoint that serves it.

An endpoint (a pymodbus SunSpec server or an ORES-HTTP aiohttp server) knows nothing of physics: it asks its
module for ``info`` and ``telemetry()`` and passes setpoints to ``apply()``.  ``StaticModule`` is the
simplest module: fixed values that a test can change, and a record of every setpoint received.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

from devices.drivers.base import Address
from devices.model import DeviceInfo, DeviceKind, Setpoint, Telemetry


@runtime_checkable
class SimulatedModule(Protocol):
    """A module behind a simulated endpoint (values follow ``devices.model``'s sign convention)."""

    @property
    def info(self) -> DeviceInfo: ...

    def telemetry(self) -> Telemetry:
        """The module's measurements now."""

    def apply(self, setpoint: Setpoint, *, revert_after_s: float | None = None) -> None:
        """Take a setpoint; raise ``ValueError`` with a reason if it is out of range for this module.
        With ``revert_after_s`` the module returns to its default after that long without a new setpoint."""


@dataclass
class StaticModule:
    """A module with fixed telemetry for tests; setpoints are recorded and reflected where obvious."""

    info: DeviceInfo
    sample: Telemetry = field(default_factory=lambda: Telemetry(ts=0.0))
    received: list[tuple[Setpoint, float | None]] = field(default_factory=list)

    def telemetry(self) -> Telemetry:
        return replace(self.sample, ts=time.time())

    def apply(self, setpoint: Setpoint, *, revert_after_s: float | None = None) -> None:
        kind = self.info.kind
        if setpoint.release:
            defaults = {
                DeviceKind.MICROINVERTER: {"power_limit_pct": 100.0},
                DeviceKind.SMARTPLUG: {"on": True},
            }.get(kind, {})
            self.sample = replace(self.sample, **defaults)  # type: ignore[arg-type]
            self.received.append((setpoint, None))
            return
        if setpoint.power_limit_pct is not None:
            if kind is not DeviceKind.MICROINVERTER:
                raise ValueError("power_limit_pct applies to microinverters only")
            if not 0 <= setpoint.power_limit_pct <= 100:
                raise ValueError("power_limit_pct must be 0..100")
            self.sample = replace(self.sample, power_limit_pct=setpoint.power_limit_pct)
        if setpoint.battery_power_w is not None and kind is not DeviceKind.ENERGYSTORAGE:
            raise ValueError("battery_power_w applies to energystorage only")
        if setpoint.on is not None:
            if kind is not DeviceKind.SMARTPLUG:
                raise ValueError("on applies to smart plugs only")
            self.sample = replace(self.sample, on=setpoint.on)
        self.received.append((setpoint, revert_after_s))


class SimServer(Protocol):
    """A running endpoint serving one simulated module on the network.

    Both ``devices.sim.sunspec_server.start_sunspec_server`` and
    ``devices.sim.ores_http_server.start_ores_http_server`` return one; they bind ``port=0`` to an ephemeral
    port and report the real one in ``address``.
    """

    @property
    def address(self) -> Address:
        """Where the hub reaches the module (``modbus://…`` or ``http://…``)."""

    @property
    def module(self) -> SimulatedModule: ...

    async def stop(self) -> None:
        """Close the listening socket and every connection.  Safe to call twice."""
