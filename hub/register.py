"""Registering a module by address: probe, check identity against what is known, store, start polling.

Used by ``POST /device/register`` and by the demo start-up, so both follow one path.  A module is
identified by vendor + serial: the same module at a new address keeps its id, name and history; a different
module answering at an address that is already registered is refused (``AddressInUse``) and raises an
alert, because that is what a swapped or spoofed device looks like.
"""

from __future__ import annotations

import ipaddress

from devices.drivers.base import Address
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
    if address.scheme == "ble":
        return  # a radio neighbour: local by nature
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
    """Probe ``address``, authenticate what answers if it can, and register it.  Returns the record and
    whether it is new.  Typing an address is an explicit approval, so unauthenticated modules are accepted."""
    check_address(address, hub.config.device_networks, hub.config.allow_local_names)
    driver, info, proven = await hub.onboarding.identify(address, protocol, claimed=None)
    module_provisioned = getattr(driver, "provisioned", None)
    await driver.close()
    clash = hub.registry.find_by_address(str(address))
    if clash is not None and clash.device_id != info.device_id:
        hub.alerts.raise_(
            "identity_mismatch",
            "critical",
            clash.device_id,
            f"{address} now answers as {info.device_id}, registered as {clash.device_id}",
        )
        raise AddressInUse(str(address), clash.device_id, info.device_id)
    return await hub.onboarding.register(
        address, driver.protocol, info, proven, name=name, by="address", module_provisioned=module_provisioned
    )
