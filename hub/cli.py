"""The ``ores-hub`` command: run the hub, optionally with a simulated home on loopback.

``ores-hub --demo`` starts the simulated modules (real SunSpec Modbus TCP and ORES-HTTP endpoints on
127.0.0.1), starts the hub, registers every simulated module through the same path as
``POST /device/register``, and prints where the hub listens and how to pair.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import ipaddress
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from aiohttp import web

from devices.errors import DeviceError
from devices.sim.base import SimServer
from hub import __version__
from hub.app import build_app
from hub.auth import AuthError
from hub.config import DEFAULT_DEVICE_NETWORKS, TEST_PRODUCT_ID, TEST_VENDOR_ID, HubConfig, MatterConfig
from hub.context import HubContext, hub_key
from hub.register import register_module
from hub.registry import RegistryError

_LOGGER = logging.getLogger("ores-hub")


def default_data_dir() -> Path:
    env = os.environ.get("ORES_DATA_DIR")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "ores-hub"


def _network(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def _id16(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from err
    if not 1 <= value <= 0xFFFE:
        raise argparse.ArgumentTypeError("must be 0x0001..0xFFFE")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ores-hub", description="ORES Hub: local control unit for home energy")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for LAN)"
    )
    p.add_argument("--port", type=int, default=8080, help="HTTP port (default 8080; 0 picks a free one)")
    p.add_argument("--data-dir", type=Path, default=None, help="where the hub keeps its state")
    p.add_argument("--demo", action="store_true", help="run with a simulated home on loopback")
    p.add_argument("--speedup", type=float, default=60.0, help="demo: simulated seconds per real second")
    p.add_argument(
        "--device-network",
        action="append",
        type=_network,
        metavar="CIDR",
        help="a network where modules may live (repeatable; default: loopback, private and link-local ranges)",
    )
    p.add_argument(
        "--no-discovery",
        action="store_true",
        help="don't browse mDNS / scan BLE for modules or advertise the hub",
    )
    p.add_argument(
        "--trust-demo-vendors",
        action="store_true",
        help="trust the PUBLIC demo vendor keys (implied by --demo; for tests and benchmarks only)",
    )
    p.add_argument("--no-matter", action="store_true", help="don't run the Matter bridge")
    p.add_argument("--matter-port", type=int, default=5540, help="Matter's UDP port (default 5540)")
    p.add_argument(
        "--matter-interface", default=None, metavar="IFACE", help="advertise Matter on this interface only"
    )
    p.add_argument(
        "--matter-vendor-id",
        type=_id16,
        default=TEST_VENDOR_ID,
        help="Matter vendor id (default 0xFFF1, the test vendor: fine at home, not for a certified product)",
    )
    p.add_argument(
        "--matter-product-id", type=_id16, default=TEST_PRODUCT_ID, help="Matter product id (default 0x8000)"
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.add_argument("--version", action="version", version=f"ores-hub {__version__}")
    return p.parse_args(argv)


async def run(args: argparse.Namespace, *, ready: asyncio.Event | None = None) -> None:
    data_dir = args.data_dir or (Path("ores-demo-data") if args.demo else default_data_dir())
    networks = tuple(args.device_network) if args.device_network else DEFAULT_DEVICE_NETWORKS
    config = HubConfig(
        data_dir=data_dir,
        host=args.host,
        port=args.port,
        demo=args.demo,
        speedup=args.speedup,
        device_networks=networks,
        allow_local_names=not args.device_network,
        discovery=not args.no_discovery,
        trust_demo_vendor=args.demo or args.trust_demo_vendors,
        matter=MatterConfig(
            enabled=not args.no_matter,
            port=args.matter_port,
            interface=args.matter_interface,
            vendor_id=args.matter_vendor_id,
            product_id=args.matter_product_id,
        ),
    )
    sims: list[SimServer] = []
    if args.demo:
        from devices.sim.home import serve_demo_home

        sims = await serve_demo_home(speedup=args.speedup)
    try:
        app = build_app(config)
    except (RegistryError, AuthError, ValueError, OSError) as err:
        for sim in sims:
            await sim.stop()
        raise SystemExit(f"ores-hub: cannot start: {err}") from err
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    # Everything built so far lives as long as the hub: move it out of the collector's way, so full
    # collections stay short (they were the main source of tail latency under load; see bench/api.py).
    gc.collect()
    gc.freeze()
    port = _bound_port(site, args.port)
    hub = app[hub_key]
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{port}"
    print(
        f"ORES Hub {__version__} listening on {url}  (API: {url}/openapi.json, dashboard: {url}/)", flush=True
    )
    print(f"Data directory: {data_dir.resolve()}", flush=True)
    _print_pairing(hub, url)
    if hub.matter is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hub.matter.started(), 90)
    _print_matter(hub)
    advertiser = await _advertise(hub, args.host, port)
    announcers: list[Any] = []
    sim_zeroconf: Any = None
    if sims and hub.zeroconf is not None:
        from discovery.mdns import open_zeroconf

        sim_zeroconf = open_zeroconf(["127.0.0.1"])  # the simulated modules' own mDNS responder
        announcers = await _onboard_sims(hub, sims, sim_zeroconf)
    elif sims:
        await _register_sims(hub, sims)
    if ready is not None:
        ready.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        print("Stopping ...", flush=True)
        for announcer in announcers:
            await announcer.stop()
        if sim_zeroconf is not None:
            await sim_zeroconf.async_close()
        if advertiser is not None:
            await advertiser.stop()
        await runner.cleanup()
        for sim in sims:
            await sim.stop()


def _print_matter(hub: HubContext) -> None:
    """The Matter bridge's state and, while its window is open, how to add the hub to a smart home app."""
    service = hub.matter
    if service is None:
        return
    status = service.status
    if service.state != "running" or status is None:
        print(f"Matter: {service.state}" + (f" ({service.reason})" if service.reason else ""), flush=True)
        return
    fabrics = len(status.fabrics)
    print(
        f"Matter bridge running: {len(service.devices())} modules bridged, {fabrics} controller(s)",
        flush=True,
    )
    if status.window_open:
        import segno

        print(f"Matter: add the hub in your smart home app with code {status.manual_code}", flush=True)
        with contextlib.suppress(OSError, UnicodeError):
            segno.make(status.qr_payload, error="m").terminal(compact=True)
    else:
        print("Matter: to add a controller, open the window: POST /matter/window (installer)", flush=True)


async def _advertise(hub: HubContext, host: str, port: int) -> Any:
    """Announce the hub as ``_ores-hub._tcp.local.`` so apps and modules can find it."""
    if hub.zeroconf is None:
        return None
    from zeroconf import get_all_addresses  # type: ignore[attr-defined]

    from discovery.mdns import HubAdvertiser

    if host in ("0.0.0.0", "::", ""):
        addresses = [a for a in get_all_addresses() if not a.startswith("127.")] or ["127.0.0.1"]
    else:
        addresses = ["127.0.0.1" if host == "localhost" else host]
    advertiser = HubAdvertiser(
        zeroconf=hub.zeroconf,
        hub_id=hub.settings.hub_id,
        name=hub.settings.hub.site_name,
        port=port,
        addresses=addresses,
    )
    await advertiser.start()
    tasks: set[asyncio.Task[None]] = set()

    def window_changed(is_open: bool) -> None:
        task = asyncio.create_task(advertiser.update(pairing_open=is_open))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    hub.onboarding.on_window_change = window_changed
    return advertiser


async def _onboard_sims(hub: HubContext, sims: list[SimServer], zeroconf: Any) -> list[Any]:
    """The demo: the simulated modules announce themselves and the hub onboards them with no typing.

    Policy ``auto`` with a pairing window registers every module that proves its identity; the legacy
    SunSpec modules cannot, so the demo approves them explicitly, as a user would tap "approve"."""
    from devices.sim.announce import announce_all

    ob = hub.onboarding
    if hub.settings.hub.onboarding_policy != "auto":
        await hub.settings.save(hub=hub.settings.hub.model_copy(update={"onboarding_policy": "auto"}))
    ob.open_window(600)
    waiting = {sim.module.info.device_id for sim in sims}
    sub = hub.bus.subscribe()
    print(
        f"Onboarding {len(sims)} simulated modules over mDNS (policy auto, pairing window open):", flush=True
    )
    announcers = await announce_all(sims, zeroconf=zeroconf)
    try:
        async with asyncio.timeout(60):
            while waiting:
                event = await sub.get()
                if event is None:
                    break
                await _demo_event(hub, event.type, event.data, waiting)
    except TimeoutError:
        print(f"  not onboarded within 60 s: {', '.join(sorted(waiting))}", flush=True)
    finally:
        sub.close()
    return announcers


async def _demo_event(hub: HubContext, kind: str, data: dict[str, Any], waiting: set[str]) -> None:
    from hub.onboarding import OnboardingError

    if kind == "discovery.updated":
        cand = data["candidate"]
        if cand["status"] == "unverified" and cand["candidate_id"] in waiting:
            try:
                await hub.onboarding.approve(cand["candidate_id"], name=None, by="demo approval")
            except (DeviceError, OnboardingError) as err:
                print(f"  could not approve {cand['candidate_id']}: {err}", flush=True)
        return
    device_id = data.get("device_id")
    if kind in ("device.registered", "device.moved") and device_id in waiting:
        waiting.discard(device_id)
        record = hub.registry.get(device_id)
        if record is not None:
            verb = "registered" if kind == "device.registered" else "found"
            how = "authenticated" if record.authenticated else "unauthenticated, approved"
            print(
                f"  {verb:<10} {record.kind.value:<13} {record.device_id:<28} {record.protocol:<15} "
                f"{record.address}  ({how})",
                flush=True,
            )


def _bound_port(site: web.TCPSite, fallback: int) -> int:
    server = site._server  # aiohttp keeps the asyncio server here; no public accessor exists
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else fallback


def _print_pairing(hub: HubContext, url: str) -> None:
    code = hub.auth.pairing_code
    if code is None:
        print(
            "Paired clients exist; issue a new pairing code from the app (POST /auth/pairing-code).",
            flush=True,
        )
        return
    print(f"Pairing code: {code}   (one use; it makes the installer token)", flush=True)
    print(
        f"Pair:  curl -s -X POST {url}/auth/pair -H 'Content-Type: application/json' "
        f'-d \'{{"code": "{code}", "name": "my laptop"}}\'',
        flush=True,
    )


async def _register_sims(hub: HubContext, sims: list[SimServer]) -> None:
    from devices.errors import DeviceError
    from hub.register import RegistrationError

    async def one(sim: SimServer) -> None:
        try:
            record, _ = await register_module(hub, sim.address)
        except (DeviceError, RegistrationError) as err:
            _LOGGER.error("could not register simulated module at %s: %s", sim.address, err)
            return
        print(
            f"  registered {record.kind.value:<13} {record.device_id:<32} {record.protocol:<15} {record.address}"
        )

    print(f"Registering {len(sims)} simulated modules:", flush=True)
    await asyncio.gather(*(one(sim) for sim in sims))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    # pymodbus logs every server start and client retry at INFO; its warnings are what matter to us.
    logging.getLogger("pymodbus").setLevel(max(logging.WARNING, logging.getLevelName(args.log_level)))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
