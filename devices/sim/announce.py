"""Simulated modules announcing themselves over mDNS, the way a real ORES module does.

``ModuleAnnouncer`` registers one ``_ores._tcp.local.`` service for a running ``SimServer``: instance name
``<vendor>-<serial>``, the server's port and address, and the TXT record of docs/discovery.md built from the
module's ``DeviceInfo`` (``tp=ores-http`` with ``path`` for an ORES-HTTP server, ``tp=sunspec-modbus`` with
``unit`` for a SunSpec server).  ``set_provisioned`` flips an ORES-HTTP module's ``prov`` flag in place; ``stop`` unregisters
the service so goodbye packets are sent.  ``announce_all`` starts one announcer per server.  The shared
``AsyncZeroconf`` instance belongs to the caller.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
from collections.abc import Awaitable, Iterable, Sequence

from zeroconf import ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from devices.sim.base import SimServer
from discovery.mdns import (
    DEFAULT_PATH,
    MODULE_SERVICE_TYPE,
    TP_ORES_HTTP,
    TP_SUNSPEC,
    instance_name,
    module_txt,
    register_service,
    withdraw_service,
)

__all__ = ["ModuleAnnouncer", "announce_all"]

_LOGGER = logging.getLogger(__name__)

_TRANSPORT_BY_SCHEME = {"http": TP_ORES_HTTP, "modbus": TP_SUNSPEC}


class ModuleAnnouncer:
    """Announce one simulated module's endpoint as an ``_ores._tcp.local.`` service.

    ``addresses`` defaults to the server's own host, which must then be an IP literal (not ``0.0.0.0``).
    ``probe=False`` skips the name-conflict probe (about a second) when names are known to be unique.
    Raises ``ValueError`` when the module cannot be announced validly (unknown scheme, values too long).
    """

    def __init__(
        self,
        server: SimServer,
        *,
        zeroconf: AsyncZeroconf,
        provisioned: bool = False,
        addresses: Sequence[str] | None = None,
        service_type: str = MODULE_SERVICE_TYPE,
        probe: bool = True,
    ) -> None:
        address = server.address
        transport = _TRANSPORT_BY_SCHEME.get(address.scheme)
        if transport is None:
            raise ValueError(f"cannot announce a {address.scheme}:// endpoint over mDNS")
        hosts = list(addresses) if addresses is not None else [address.host]
        for host in hosts:
            ip = ipaddress.ip_address(host)  # ValueError for a host name
            if ip.is_unspecified:
                raise ValueError(f"{host} is not an address to announce: pass addresses=[...]")
        if not hosts:
            raise ValueError("at least one address is needed")
        identity = server.module.info.identity
        self._server = server
        self._aiozc = zeroconf
        self._type = service_type
        self._probe = probe
        self._hosts = hosts
        self._txt_for = functools.partial(
            module_txt,
            kind=server.module.info.kind,
            vendor=identity.vendor,
            model=identity.model,
            serial=identity.serial,
            transport=transport,
            path=address.path or DEFAULT_PATH,
            unit=address.unit,
        )
        self._provisioned = provisioned
        self._txt = self._txt_for(provisioned=provisioned)
        label = instance_name(identity.vendor, identity.serial)
        self._service_name = f"{label}.{service_type}"
        self._host_name = f"{label}.local."
        self._info: ServiceInfo | None = None
        self._announcements: list[Awaitable[object]] = []

    @property
    def name(self) -> str:
        """The full service name (with a ``-2`` style suffix if probing found the name taken)."""
        return self._info.name if self._info is not None else self._service_name

    @property
    def txt(self) -> dict[str, str]:
        return dict(self._txt)

    @property
    def provisioned(self) -> bool:
        return self._provisioned

    @property
    def server(self) -> SimServer:
        return self._server

    def _make_info(self) -> ServiceInfo:
        return ServiceInfo(
            self._type,
            self.name,
            port=self._server.address.port,
            properties=dict(self._txt),
            server=self._host_name,
            parsed_addresses=self._hosts,
        )

    async def start(self) -> None:
        """Register the service; the first announcement is on the wire when this returns.  Idempotent."""
        if self._info is not None:
            return
        info = self._make_info()
        self._announcements.append(await register_service(self._aiozc, info, probe=self._probe))
        self._info = info
        _LOGGER.debug("announcing %s at %s", info.name, self._server.address)

    async def set_provisioned(self, provisioned: bool) -> None:
        """Change the ``prov`` flag and re-announce the TXT record if it changed (SunSpec modules have none)."""
        self._provisioned = provisioned
        txt = self._txt_for(provisioned=provisioned)
        if txt == self._txt:
            return
        self._txt = txt
        if self._info is None:
            return
        info = self._make_info()
        self._announcements.append(await self._aiozc.async_update_service(info))
        self._info = info

    async def stop(self) -> None:
        """Unregister the service and wait until its goodbye packets are sent.  Idempotent."""
        info, self._info = self._info, None
        await withdraw_service(self._aiozc, info, self._announcements)


async def announce_all(
    servers: Iterable[SimServer],
    *,
    zeroconf: AsyncZeroconf,
    provisioned: bool = False,
    service_type: str = MODULE_SERVICE_TYPE,
    probe: bool = True,
) -> list[ModuleAnnouncer]:
    """Start one announcer per server, concurrently; if any fails, stop the others and re-raise."""
    announcers = [
        ModuleAnnouncer(s, zeroconf=zeroconf, provisioned=provisioned, service_type=service_type, probe=probe)
        for s in servers
    ]
    results = await asyncio.gather(*(a.start() for a in announcers), return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        await asyncio.gather(*(a.stop() for a in announcers), return_exceptions=True)
        raise errors[0]
    return announcers
