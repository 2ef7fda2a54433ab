"""Registering a module by address: probe, check identity against what is known, store, start polling.

Used by ``POST /device/register`` and by the demo start-up, so both follow one path.  A module is
identified by vendor + serial: the same module at a new address keeps its id, name and history; a different
module answering at an address that is already registered is refused (``AddressInUse``) and raises an
alert, because that is what a swapped or spoofed device looks like.
"""

from __future__ import annotations

import ipaddress
import time

from devices.drivers.base import Address, probe_address
from devices.model import DeviceKind
from hub.context import HubContext
from hub.registry import DeviceRecord


class RegistrationError(Exception):
    """Root of registration failures (device errors from the probe pass through unchanged)."""


class AddressInUse(RegistrationError):
    def __init__(self, address: str, registered: str, found: str) -> None:
        super().__init__(f"{address} is registered to {registered}, but {found} answers there")
        self.address = address
        self.registered = registered
        self.found = found


class UnknownKind(RegistrationError):
    pass


class AddressNotAllowed(RegistrationError):
    """The address is outside the networks where the hub looks for modules."""


def check_address(address: Address, networks: tuple[str, ...], allow_local_names: bool) -> None:
    """Refuse addresses the hub must not contact: public IPs and arbitrary host names."""
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        if allow_local_names and address.host.lower().endswith(".local") and len(address.host) > 6:
            return
        raise AddressNotAllowed(
            f"{address.host!r} is not an IP address" + (" or a .local name" if allow_local_names else "")
        ) from None
    if not any(ip in ipaddress.ip_network(net) for net in networks):
        raise AddressNotAllowed(f"{ip} is outside the networks modules may use ({', '.join(networks)})")


async def register_module(
    hub: HubContext, address: Address, *, protocol: str | None = None, name: str | None = None
) -> tuple[DeviceRecord, bool]:
    """Probe ``address`` and register what answers.  Returns the record and whether it is new."""
    check_address(address, hub.config.device_networks, hub.config.allow_local_names)
    driver, info = await probe_address(address, protocol=protocol, timeout=hub.settings.hub.timeout_s)
    await driver.close()
    if info.kind is DeviceKind.UNKNOWN:
        raise UnknownKind("the module did not say what kind of device it is")
    clash = hub.registry.find_by_address(str(address))
    if clash is not None and clash.device_id != info.device_id:
        hub.alerts.raise_(
            "identity_mismatch",
            "critical",
            clash.device_id,
            f"{address} now answers as {info.device_id}, registered as {clash.device_id}",
        )
        raise AddressInUse(str(address), clash.device_id, info.device_id)
    existing = hub.registry.get(info.device_id)
    caps = info.capabilities
    record = DeviceRecord(
        device_id=info.device_id,
        kind=info.kind,
        identity=info.identity,
        capabilities=caps,
        address=str(address),
        protocol=driver.protocol,
        name=name or (existing.name if existing else f"{info.identity.model} {info.identity.serial}"),
        authenticated=False,
        registered_at=existing.registered_at if existing else time.time(),
        settings=existing.settings if existing else {},
    )
    record, created = await hub.registry.upsert(record)
    hub.links.add(record)
    hub.bus.publish("device.registered" if created else "device.updated", device_id=record.device_id)
    return record, created
