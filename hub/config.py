"""The hub's configuration: start-up options and the settings users change at run time.

``HubConfig`` is fixed at start (command line): where to listen, where data lives.  ``HubSettings`` (changed
through ``/hub/configure``, installer role) and ``AppSettings`` (``/app/settings``, homeowner role) are
pydantic models, validated on every change and persisted atomically in ``settings.json`` in the data
directory.  Their JSON schemas are the API's schemas, so the OpenAPI document describes them exactly.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hub.storage import atomic_write_bytes

#: Where modules may live: loopback, private and link-local ranges.  The hub never probes a public address,
#: so the registration endpoint cannot be turned into a scanner of the internet (SSRF).
DEFAULT_DEVICE_NETWORKS = (
    "127.0.0.0/8",
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "169.254.0.0/16",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
)


_HUB_ID = re.compile(r"hub-[0-9a-f]{16}")

#: The Matter test vendor id and a product id from its test range: fine for development and for a hub you
#: build yourself, not for a certified product (see docs/matter.md).
TEST_VENDOR_ID = 0xFFF1
TEST_PRODUCT_ID = 0x8000


@dataclass(frozen=True, slots=True)
class MatterConfig:
    """How the hub runs its Matter bridge (``matter_bridge``).

    launcher: argv prefix for the Node.js process (tests use ``ip netns exec NS``); node: the node binary.
    interface: advertise on this network interface only (None: all).  initial_window_s: how long the
    commissioning window stays open at the first start of a never-commissioned hub (0: never by itself).
    """

    enabled: bool = False
    port: int = 5540
    launcher: tuple[str, ...] = ()
    node: str = "node"
    interface: str | None = None
    ipv4: bool = True
    vendor_id: int = TEST_VENDOR_ID
    product_id: int = TEST_PRODUCT_ID
    initial_window_s: int = 900
    log_level: str = "notice"


@dataclass(frozen=True, slots=True)
class HubConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    demo: bool = False
    speedup: float = 1.0
    device_networks: tuple[str, ...] = DEFAULT_DEVICE_NETWORKS
    #: Accept ``NAME.local`` host names (resolved by mDNS on the LAN) besides IP literals.
    allow_local_names: bool = True
    #: Browse mDNS and scan BLE for modules, and advertise the hub (off in unit tests that don't need it).
    discovery: bool = False
    #: Trust the public, insecure demo vendor key (only for ``--demo``).
    trust_demo_vendor: bool = False
    #: The Matter bridge (off unless enabled: the command line turns it on).
    matter: MatterConfig = MatterConfig()


class HubSettings(BaseModel):
    """Installer-level settings of the hub."""

    model_config = ConfigDict(extra="forbid")

    site_name: str = Field("My home", min_length=1, max_length=64)
    poll_interval_s: float = Field(1.0, ge=0.2, le=60, description="How often every module is read, s")
    timeout_s: float = Field(2.0, ge=0.2, le=30, description="Bound on every call to a module, s")
    offline_after: int = Field(
        3, ge=1, le=100, description="Consecutive failed polls before a module is offline"
    )
    cyclic_write_s: float = Field(10.0, ge=1, le=3600, description="Rewrite period of active setpoints, s")
    default_ttl_s: float = Field(900.0, ge=1, le=86400, description="Time-to-live of a control command, s")
    max_ttl_s: float = Field(86400.0, ge=1, le=7 * 86400, description="Longest allowed time-to-live, s")
    module_revert_s: float = Field(
        60.0, ge=5, le=3600, description="Modules revert to their default if the hub is silent this long, s"
    )
    retention_raw_h: float = Field(
        48.0, ge=1, le=24 * 31, description="How long per-poll samples are kept, h"
    )
    retention_1m_days: float = Field(35.0, ge=1, le=3650, description="How long 1-minute aggregates are kept")
    retention_15m_days: float = Field(
        1830.0, ge=1, le=36500, description="How long 15-minute aggregates are kept"
    )
    onboarding_policy: Literal["approve", "auto"] = Field(
        "approve",
        description="approve: a user approves each discovered module; auto: modules that prove their identity "
        "with a trusted vendor certificate are registered at once while a pairing window is open",
    )

    @model_validator(mode="after")
    def _consistent(self) -> HubSettings:
        if self.default_ttl_s > self.max_ttl_s:
            raise ValueError("default_ttl_s must not exceed max_ttl_s")
        if self.timeout_s > self.module_revert_s:
            raise ValueError("timeout_s must not exceed module_revert_s")
        return self


class AppSettings(BaseModel):
    """Homeowner preferences used by the app and by alerts."""

    model_config = ConfigDict(extra="forbid")

    display_name: str = Field("Home", min_length=1, max_length=64)
    power_unit: Literal["W", "kW"] = "kW"
    currency: str = Field("USD", pattern=r"^[A-Z]{3}$")
    import_price_per_kwh: float = Field(0.30, ge=0, le=100)
    export_price_per_kwh: float = Field(0.05, ge=0, le=100)
    low_soc_alert_pct: float = Field(15.0, ge=0, le=100, description="Alert when a battery falls to this SoC")
    max_temperature_alert_c: float = Field(60.0, ge=20, le=120)
    notifications_enabled: bool = True


class SettingsStore:
    """Both settings documents and the hub's id, persisted together and atomically.

    The hub id is made once, at first start, and never changes: modules learn it when they are provisioned
    and sign it into every authentication answer, so an answer meant for one hub is useless to another.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = asyncio.Lock()
        self.hub = HubSettings()
        self.app = AppSettings()
        self.hub_id = ""
        raw: dict[str, Any] = {}
        if path.exists():
            try:
                raw = json.loads(path.read_bytes())
                self.hub = HubSettings.model_validate(raw.get("hub", {}))
                self.app = AppSettings.model_validate(raw.get("app", {}))
            except (ValueError, ValidationError, AttributeError) as err:
                raise ValueError(f"{path} is not a valid settings file: {err}") from err
        hub_id = raw.get("hub_id")
        if isinstance(hub_id, str) and _HUB_ID.fullmatch(hub_id):
            self.hub_id = hub_id
        else:
            self.hub_id = "hub-" + secrets.token_hex(8)
            atomic_write_bytes(self._path, self._document(self.hub, self.app))

    def _document(self, hub: HubSettings, app: AppSettings) -> bytes:
        doc = {"hub_id": self.hub_id, "hub": hub.model_dump(), "app": app.model_dump()}
        return json.dumps(doc, indent=1).encode()

    async def save(self, *, hub: HubSettings | None = None, app: AppSettings | None = None) -> None:
        async with self._lock:
            new_hub = hub or self.hub
            new_app = app or self.app
            await asyncio.to_thread(atomic_write_bytes, self._path, self._document(new_hub, new_app))
            self.hub, self.app = new_hub, new_app
