"""Assembling the hub: build every part, wire them into one aiohttp application, run its background work.

``build_app`` opens the stores in the data directory (registry, tokens, settings, history), creates the live
state, arbiter and link manager, and registers the API routes and the error middleware.  The background work
(history writer, one poller per module, the alert evaluator, token last-use flushing, discovery and the
Matter bridge) runs inside the app's ``cleanup_ctx``, so it starts with the server and stops with it; push
streams end when the event bus closes at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from devices.drivers import load_builtin_drivers
from hub.api import firmware_routes
from hub.api import matter_routes as _matter_routes  # noqa: F401  (registers the /matter operations)
from hub.api.errors import error_middleware
from hub.api.routes import apply_hub_settings, router
from hub.api.routing import MAX_BODY_BYTES
from hub.auth import AuthStore, setup_auth
from hub.config import HubConfig, SettingsStore
from hub.context import HubContext, hub_key
from hub.control import ControlArbiter
from hub.history import History
from hub.notify import Alerts
from hub.onboarding import Onboarding
from hub.poller import LinkManager, PollConfig
from hub.registry import Registry
from hub.state import EventBus, LiveState
from hub.trust import TrustStore

_LOGGER = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"


def build_context(config: HubConfig) -> HubContext:
    data = config.data_dir
    data.mkdir(parents=True, exist_ok=True)
    data.chmod(0o700)
    settings = SettingsStore(data / "settings.json")
    registry = Registry(data / "registry.json")
    history = History(data / "history.sqlite3")
    auth = AuthStore(data / "auth.json")
    bus = EventBus()
    state = LiveState(bus)
    arbiter = ControlArbiter()
    links = LinkManager(registry, state, history, arbiter, PollConfig())
    alerts = Alerts(bus)
    trust = TrustStore(data / "trust.json")
    hub = HubContext(config, settings, registry, history, auth, bus, state, arbiter, links, alerts, trust)
    hub.onboarding = Onboarding(hub)
    firmware_routes.attach(hub)
    apply_hub_settings(hub)
    alerts.low_soc_pct = settings.app.low_soc_alert_pct
    alerts.max_temperature_c = settings.app.max_temperature_alert_c
    return hub


def build_app(config: HubConfig) -> web.Application:
    load_builtin_drivers()
    hub = build_context(config)
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_BYTES)
    app[hub_key] = hub
    setup_auth(app, hub.auth)
    router.add_routes(app)
    openapi = router.openapi()

    async def openapi_json(_: web.Request) -> web.Response:
        return web.json_response(openapi)

    async def index(_: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    app.router.add_get("/openapi.json", openapi_json)
    if (STATIC_DIR / "index.html").exists():
        app.router.add_get("/", index)
    app.cleanup_ctx.append(_lifecycle)
    app.cleanup_ctx.append(_discovery)
    app.cleanup_ctx.append(_matter)
    return app


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    hub = app[hub_key]
    if hub.config.trust_demo_vendor:
        await _trust_demo_vendors(hub)
    await hub.history.start()
    hub.links.start_all()
    hub.onboarding.start()
    await hub.rollouts.start()
    evaluator = asyncio.create_task(_evaluate_alerts(hub), name="alerts")
    try:
        yield
    finally:
        evaluator.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await evaluator
        await hub.rollouts.stop()
        hub.bus.close()
        await hub.onboarding.stop()
        await hub.links.stop()
        await hub.history.stop()
        hub.registry.close()
        await hub.auth.close()
        await hub.trust.close()


async def _evaluate_alerts(hub: HubContext) -> None:
    while True:
        await asyncio.sleep(hub.settings.hub.poll_interval_s)
        try:
            hub.alerts.evaluate(hub.state, offline_after=hub.settings.hub.offline_after)
        except Exception:
            _LOGGER.exception("alert evaluation failed")


async def _trust_demo_vendors(hub: HubContext) -> None:
    """Demo mode only: trust the public demo vendor keys (see ``devices.attest.demo_vendor_key``)."""
    from devices.attest import DEMO_VENDOR, demo_vendor_key
    from devices.sim.physics import DEMO_VENDORS

    for vendor in (DEMO_VENDOR, *DEMO_VENDORS):
        await hub.trust.ensure(vendor, demo_vendor_key(vendor).public_key(), {"device", "firmware"})
    _LOGGER.warning("demo mode: trusting the PUBLIC demo vendor keys; never do this on a real installation")


async def _matter(app: web.Application) -> AsyncIterator[None]:
    """Run the Matter bridge (when ``config.matter.enabled``); a bridge that cannot run never stops the hub."""
    hub = app[hub_key]
    if not hub.config.matter.enabled:
        yield
        return
    from matter_bridge.service import MatterService

    hub.matter = MatterService(hub, hub.config.matter)
    await hub.matter.start()
    try:
        yield
    finally:
        await hub.matter.stop()


async def _discovery(app: web.Application) -> AsyncIterator[None]:
    """Browse mDNS and scan BLE for modules while the hub runs (when ``config.discovery`` is on)."""
    hub = app[hub_key]
    if not hub.config.discovery:
        hub.discovery_status.update(mdns="off", ble="off")
        yield
        return
    from discovery.base import DiscoveryError
    from discovery.ble import BleScanner
    from discovery.mdns import MdnsBrowser, open_zeroconf

    loopback = hub.config.host in ("127.0.0.1", "localhost", "::1")
    try:
        zeroconf = open_zeroconf(["127.0.0.1"] if loopback else None)
    except DiscoveryError as err:
        hub.discovery_status.update(mdns=f"unavailable: {err}", ble="off")
        _LOGGER.warning("mDNS discovery unavailable, continuing without it: %s", err)
        yield
        return
    hub.zeroconf = zeroconf
    browser = MdnsBrowser(hub.onboarding, zeroconf=zeroconf)
    scanner = BleScanner(hub.onboarding)
    await browser.start()
    hub.discovery_status["mdns"] = "running" + (" (loopback only)" if loopback else "")
    hub.discovery_rescans.append(browser.rescan)
    try:
        await scanner.start()
        hub.discovery_status["ble"] = (
            "running" if scanner.running else f"unavailable: {scanner.unavailable_reason}"
        )
    except Exception as err:  # no adapter, no permission: the hub runs on without BLE
        hub.discovery_status["ble"] = f"unavailable: {err}"
    try:
        yield
    finally:
        await scanner.stop()
        await browser.stop()
        await zeroconf.async_close()
        hub.zeroconf = None
