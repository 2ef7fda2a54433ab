"""Drivers: one plugin per module protocol, all behind ``devices.drivers.base.Driver``.

``load_builtin_drivers()`` registers the built-in drivers in their probe order: ORES-HTTP first (cheap to
rule out, and it can authenticate), then SunSpec Modbus TCP.
"""

from devices.drivers.base import Address, Driver, probe_address, register_driver, registered_drivers

__all__ = [
    "Address",
    "Driver",
    "load_builtin_drivers",
    "probe_address",
    "register_driver",
    "registered_drivers",
]


def load_builtin_drivers() -> None:
    """Import (and so register) the built-in driver plugins.  Idempotent."""
    from devices.drivers import ble, ores_http, sunspec

    register_driver(ores_http.OresHttpDriver)
    register_driver(sunspec.SunSpecDriver)
    register_driver(ble.BleGattDriver)
