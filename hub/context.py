"""The hub's running parts, gathered in one object that the API handlers reach through ``hub_key``."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from hub.auth import AuthStore
from hub.config import HubConfig, SettingsStore
from hub.control import ControlArbiter
from hub.history import History
from hub.notify import Alerts
from hub.poller import LinkManager
from hub.registry import Registry
from hub.state import EventBus, LiveState
from hub.trust import TrustStore

if TYPE_CHECKING:
    from hub.firmware_store import FirmwareStore
    from hub.onboarding import Onboarding
    from hub.rollout import RolloutManager
    from matter_bridge.service import MatterService


@dataclass(slots=True)
class HubContext:
    config: HubConfig
    settings: SettingsStore
    registry: Registry
    history: History
    auth: AuthStore
    bus: EventBus
    state: LiveState
    arbiter: ControlArbiter
    links: LinkManager
    alerts: Alerts
    trust: TrustStore
    onboarding: Onboarding = field(init=False)
    #: Verified firmware releases and their rollouts (built by ``hub.api.firmware_routes.attach``).
    firmware: FirmwareStore = field(init=False)
    rollouts: RolloutManager = field(init=False)
    started_at: float = field(default_factory=time.time)
    #: State of each discovery source ("running", "off", "unavailable: ...") and their re-scan functions.
    discovery_status: dict[str, str] = field(default_factory=dict)
    discovery_rescans: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    #: The hub's mDNS responder (an ``AsyncZeroconf``) while discovery runs.
    zeroconf: Any = None
    #: The last ``/app/monitor`` body and the versions it was built from (see ``hub.api.routes``).
    monitor_cache: tuple[tuple[object, ...], float, bytes] | None = None
    #: The Matter bridge (``matter_bridge.service``) while it is enabled.
    matter: MatterService | None = None


hub_key: web.AppKey[HubContext] = web.AppKey("hub", HubContext)
