"""The Matter bridge inside the hub: modules in, commands out, commissioning state for the API.

``MatterService`` owns the bridge process (``matter_bridge.process``) and keeps its endpoints equal to the
hub's registry: at every (re)start of the process it replays one ``add`` per module, then asks for a start;
while it runs, it adds and removes endpoints as modules are registered or removed (one at a time, spaced, so
controllers are not flooded), and turns every change of a module's live state into one ``update`` that carries
only the attributes that changed (``matter_bridge.mapping``).  On/Off commands from controllers become direct
commands in the hub's control arbiter (the api layer, with the longest allowed time-to-live), written to the
real plug at once; a refused command puts the plug's real state back into Matter.  The setup passcode and
discriminator are random per hub and kept, with the node's Matter state, in ``<data_dir>/matter`` (mode 0700).
The window opens by itself only at the first start of a hub that was never commissioned.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from devices.errors import DeviceError
from devices.model import Setpoint
from hub.config import MatterConfig
from hub.control import ControlSource
from hub.storage import atomic_write_bytes
from matter_bridge import mapping
from matter_bridge.process import BridgeOptions, MatterProcess, bridge_installed
from matter_bridge.protocol import (
    BridgeCommandError,
    BridgeEvent,
    BridgeUnavailable,
    BridgeWarning,
    Command,
    FabricsChanged,
    MatterError,
    Op,
    Ready,
    Result,
    StartOp,
    Status,
    Window,
    add_op,
    close_window_op,
    endpoints_op,
    open_window_op,
    remove_fabric_op,
    remove_op,
    status_op,
    update_op,
)

if TYPE_CHECKING:
    from hub.context import HubContext
    from hub.registry import DeviceRecord

__all__ = ["MatterService", "valid_passcode"]

_LOGGER = logging.getLogger(__name__)

#: Passcodes the Matter specification forbids (trivial ones).
_INVALID_PASSCODES: Final = frozenset(
    {0, 11111111, 22222222, 33333333, 44444444, 55555555, 66666666, 77777777, 88888888, 99999999}
    | {12345678, 87654321}
)
#: Spacing between endpoints added while the node runs (controllers re-read each new endpoint).
ADD_SPACING_S: Final = 0.25
#: How often the registry is compared with the bridge's endpoints (names, added and removed modules).
RECONCILE_S: Final = 2.0


def valid_passcode(code: int) -> bool:
    return 1 <= code <= 99999998 and code not in _INVALID_PASSCODES


@dataclass(slots=True)
class _Endpoint:
    """What the bridge has of one module."""

    device_id: str
    id: str
    kind: mapping.EndpointKind
    info: dict[str, Any]
    values: mapping.Values = field(default_factory=dict)
    number: int | None = None
    added: bool = False  # the bridge confirmed it (or it went out with the start-up adds)


class MatterService:
    """The hub's Matter bridge (see the module docstring)."""

    def __init__(
        self,
        hub: HubContext,
        config: MatterConfig,
        *,
        process_factory: Callable[..., MatterProcess] = MatterProcess,
    ) -> None:
        self._hub = hub
        self.config = config
        self._factory = process_factory
        self.dir = hub.config.data_dir / "matter"
        self.process: MatterProcess | None = None
        #: "off", "unavailable" (cannot run here), or the process's own state.
        self._state = "off" if not config.enabled else "stopped"
        self.reason: str | None = None
        self.passcode: int | None = None
        self.discriminator: int | None = None
        self._setup: dict[str, Any] = {}
        self._endpoints: dict[str, _Endpoint] = {}  # by device id
        self._by_endpoint_id: dict[str, str] = {}
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._worker: asyncio.Task[None] | None = None
        self._starting: asyncio.Task[None] | None = None
        self._first_attempt = asyncio.Event()
        self._unwatch: Callable[[], None] | None = None

    # ------------------------------------------------------------------------------------------ lifecycle

    @property
    def state(self) -> str:
        if self.process is not None and self._state not in ("off", "unavailable"):
            return str(self.process.state)
        return self._state

    @property
    def status(self) -> Status | None:
        return self.process.status if self.process is not None else None

    async def start(self) -> None:
        """Start the bridge; on a machine where it cannot run, log why and leave the hub running without it."""
        if not self.config.enabled:
            self._first_attempt.set()
            return
        why = bridge_installed()
        if why is not None:
            self._unavailable(why)
            self._first_attempt.set()
            return
        self._load_setup()
        storage = self.dir / "node"
        storage.mkdir(parents=True, exist_ok=True)
        storage.chmod(0o700)
        from hub import __version__

        options = BridgeOptions(
            storage_dir=storage,
            port=self.config.port,
            passcode=self._setup["passcode"],
            discriminator=self._setup["discriminator"],
            vendor_id=self.config.vendor_id,
            product_id=self.config.product_id,
            vendor_name="ORES",
            product_name="ORES Hub",
            serial=self._hub.settings.hub_id,
            version=__version__,
            log_level=self.config.log_level,
            ipv4=self.config.ipv4,
            interface=self.config.interface,
        )
        self.process = self._factory(
            options,
            on_event=self._on_event,
            initial_ops=self._initial_ops,
            start_op=self._start_op,
            launcher=self.config.launcher,
            node=self.config.node,
        )
        self._unwatch = self._hub.state.watch(self._changed)
        self._worker = asyncio.create_task(self._work(), name="matter-sync")
        # The hub serves at once; the node comes up beside it (``started`` waits for it).
        self._starting = asyncio.create_task(self._start_process(self.process), name="matter-start")

    async def _start_process(self, process: MatterProcess) -> None:
        """Start the bridge; retry with backoff (1 s … 1 min) while it fails for a reason that may pass (a port
        in use, a crash at start), give up when it cannot run here at all (no Node.js, no packages)."""
        delay = 1.0
        while True:
            try:
                await process.start()
            except MatterError as err:
                self._unavailable(str(err))
                self._first_attempt.set()
                program = self.config.launcher[0] if self.config.launcher else self.config.node
                if bridge_installed() is not None or shutil.which(program) is None:
                    return
                _LOGGER.warning("Matter bridge: trying again in %.0f s", delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 60.0)
                continue
            self._state = "running"
            self.reason = None
            self._first_attempt.set()
            return

    async def started(self) -> None:
        """Wait until the first attempt to start the bridge succeeded or failed (``state`` tells which)."""
        await self._first_attempt.wait()

    def _unavailable(self, why: str) -> None:
        self._state = "unavailable"
        self.reason = why
        _LOGGER.warning("Matter bridge unavailable, the hub runs on without it: %s", why)

    async def stop(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        tasks = [t for t in (self._starting, self._worker, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._worker = None
        self._tasks.clear()
        if self.process is not None:
            await self.process.stop()

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------------------------------ setup

    def _load_setup(self) -> None:
        """Passcode and discriminator: random at the first start, then kept (controllers hold them)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.dir.chmod(0o700)
        path = self.dir / "setup.json"
        setup: dict[str, Any] = {}
        with contextlib.suppress(FileNotFoundError, ValueError):
            loaded = json.loads(path.read_bytes())
            if isinstance(loaded, dict):
                setup = loaded
        passcode, disc = setup.get("passcode"), setup.get("discriminator")
        if not (isinstance(passcode, int) and valid_passcode(passcode)):
            setup = {}
        if not (isinstance(disc, int) and 0 <= disc <= 4095):
            setup = {}
        if not setup:
            while not valid_passcode(passcode := secrets.randbelow(99999998) + 1):
                pass
            setup = {
                "passcode": passcode,
                "discriminator": secrets.randbelow(4096),
                "initial_window_done": False,
            }
            self._save_setup(setup)
        self._setup = setup
        self.passcode = setup["passcode"]
        self.discriminator = setup["discriminator"]

    def _save_setup(self, setup: dict[str, Any]) -> None:
        path = self.dir / "setup.json"
        atomic_write_bytes(path, json.dumps(setup, indent=1).encode())
        path.chmod(0o600)

    # ------------------------------------------------------------------------------------------ endpoints

    def _wanted(self) -> dict[str, DeviceRecord]:
        return {r.device_id: r for r in self._hub.registry.all() if mapping.endpoint_kind(r.kind) is not None}

    def _make_endpoint(self, record: DeviceRecord) -> _Endpoint:
        kind = mapping.endpoint_kind(record.kind)
        assert kind is not None
        live = self._hub.state.devices.get(record.device_id)
        online = live is not None and live.online
        info = mapping.endpoint_info(record, self._hub.settings.hub_id, reachable=online)
        values = mapping.endpoint_values(record.kind, live.telemetry if live else None, online=online)
        return _Endpoint(record.device_id, mapping.endpoint_id(record.device_id), kind, info, values)

    def _initial_ops(self) -> list[Op]:
        """Every module as an ``add``: the process sends these at each (re)start, before ``start``."""
        self._endpoints.clear()
        self._by_endpoint_id.clear()
        ops: list[Op] = []
        for record in self._wanted().values():
            ep = self._make_endpoint(record)
            ep.added = True
            self._endpoints[ep.device_id] = ep
            self._by_endpoint_id[ep.id] = ep.device_id
            ops.append(add_op(ep.id, ep.kind, ep.info, ep.values))  # type: ignore[arg-type]
        return ops

    def _start_op(self) -> StartOp:
        window = 0
        if not self._setup.get("initial_window_done") and self.config.initial_window_s > 0:
            window = self.config.initial_window_s
        op: StartOp = {"op": "start"}
        if window:
            op["window_s"] = window
        return op

    def _changed(self, device_id: str) -> None:
        """LiveState watcher: a module's state changed; push what changed (quick, on the loop)."""
        ep = self._endpoints.get(device_id)
        live = self._hub.state.devices.get(device_id)
        if ep is None or live is None:
            if ep is not None or (live is not None and mapping.endpoint_kind(live.kind) is not None):
                self._wake.set()  # added or removed: the worker reconciles
            return
        process = self.process
        if not ep.added or process is None or process.state != "running":
            return  # the next start replays current values
        new = mapping.endpoint_values(live.kind, live.telemetry, online=live.online)
        changed = mapping.diff_values(ep.values, new)
        if changed and process.send(update_op(ep.id, changed)):
            for behavior, attrs in changed.items():
                ep.values.setdefault(behavior, {}).update(attrs)

    async def _work(self) -> None:
        """Add and remove endpoints as the registry changes; refresh names.  One at a time, spaced."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RECONCILE_S)
            self._wake.clear()
            process = self.process
            if process is None or process.state != "running":
                continue
            try:
                await self._reconcile(process)
            except (BridgeUnavailable, MatterError) as err:
                _LOGGER.debug("Matter reconcile interrupted: %s", err)

    async def _reconcile(self, process: MatterProcess) -> None:
        wanted = self._wanted()
        for device_id in [d for d in self._endpoints if d not in wanted]:
            gone = self._endpoints.pop(device_id)
            self._by_endpoint_id.pop(gone.id, None)
            try:
                await process.request(remove_op(gone.id))
                _LOGGER.info("Matter: removed %s (endpoint %s)", device_id, gone.number)
            except BridgeCommandError as err:
                _LOGGER.warning("Matter: removing %s failed: %s", device_id, err)
        for device_id, record in wanted.items():
            ep = self._endpoints.get(device_id)
            if ep is None:
                ep = self._make_endpoint(record)
                self._endpoints[device_id] = ep
                self._by_endpoint_id[ep.id] = device_id
                try:
                    result = await process.request(add_op(ep.id, ep.kind, ep.info, ep.values))  # type: ignore[arg-type]
                except BridgeCommandError as err:
                    _LOGGER.warning("Matter: adding %s failed: %s", device_id, err)
                    self._endpoints.pop(device_id, None)
                    self._by_endpoint_id.pop(ep.id, None)
                    continue
                ep.added = True
                ep.number = _as_int(result.get("endpoint"))
                _LOGGER.info("Matter: added %s as endpoint %s", device_id, ep.number)
                self._changed(device_id)  # a sample may have arrived while it was being added
                await asyncio.sleep(ADD_SPACING_S)
                continue
            fresh = mapping.endpoint_info(record, self._hub.settings.hub_id, reachable=ep.info["reachable"])
            label = {"nodeLabel": fresh["name"][:32]} if fresh["name"] != ep.info["name"] else {}
            if label:
                with contextlib.suppress(BridgeCommandError):
                    await process.request(update_op(ep.id, {"bridgedDeviceBasicInformation": label}))
                    ep.info = fresh

    async def _refresh_numbers(self, process: MatterProcess) -> None:
        with contextlib.suppress(MatterError):
            result = await process.request(endpoints_op())
            for item in result.get("endpoints") or []:
                if not isinstance(item, dict):
                    continue
                device_id = self._by_endpoint_id.get(str(item.get("id")))
                ep = self._endpoints.get(device_id) if device_id else None
                if ep is not None:
                    ep.number = _as_int(item.get("endpoint"))

    # ------------------------------------------------------------------------------------------ events

    def _on_event(self, event: BridgeEvent) -> None:
        if isinstance(event, Ready):
            process = self.process
            if process is not None:
                self._spawn(self._refresh_numbers(process), "matter-endpoints")
            # At a start the adds carried every value; after a factory reset (last fabric removed) the node
            # went back to those first values.  Either way: send everything again.
            for ep in self._endpoints.values():
                ep.values = {}
                self._changed(ep.device_id)
            if event.status.commissioned or event.status.window_open:
                self._mark_initial_window_done()
            self._wake.set()
            self._hub.bus.publish("matter.ready", commissioned=event.status.commissioned)
        elif isinstance(event, Command):
            self._command(event)
        elif isinstance(event, Window):
            self._hub.bus.publish("matter.window", open=event.open, reason=event.reason)
        elif isinstance(event, FabricsChanged):
            _LOGGER.info("Matter: fabric %s %s", event.fabric_index, event.action)
            self._mark_initial_window_done()
            self._hub.bus.publish("matter.fabrics", fabric_index=event.fabric_index, action=event.action)
        elif isinstance(event, BridgeWarning):
            _LOGGER.warning("Matter bridge: %s", event.reason)
        elif isinstance(event, Result) and event.op == "add":
            device_id = self._by_endpoint_id.get(str(event.data.get("id")))
            if device_id in self._endpoints:
                self._endpoints[device_id].number = _as_int(event.data.get("endpoint"))

    def _mark_initial_window_done(self) -> None:
        if not self._setup.get("initial_window_done"):
            self._setup["initial_window_done"] = True
            try:
                self._save_setup(self._setup)
            except OSError as err:
                _LOGGER.warning("could not save the Matter setup: %s", err)

    def _command(self, event: Command) -> None:
        device_id = self._by_endpoint_id.get(event.id)
        ep = self._endpoints.get(device_id) if device_id else None
        if device_id is None or ep is None or event.cluster != "onOff" or ep.kind != "plug":
            _LOGGER.warning("Matter: ignored %s.%s for %s", event.cluster, event.command, event.id)
            return
        if event.command not in ("on", "off"):
            _LOGGER.warning("Matter: unknown onOff command %r for %s", event.command, device_id)
            return
        on = event.command == "on"
        # The bridge changed OnOff optimistically: that is now what Matter shows.
        ep.values.setdefault("onOff", {})["onOff"] = on
        self._spawn(self._switch(device_id, on), f"matter-switch-{device_id}")

    async def _switch(self, device_id: str, on: bool) -> None:
        """Switch a plug through the hub's control path: a direct (api-layer) command, written now."""
        hub = self._hub
        record = hub.registry.get(device_id)
        link = hub.links.links.get(device_id)
        if record is None or not record.capabilities.controllable or link is None:
            self._restore(device_id)
            return
        ttl = hub.settings.hub.max_ttl_s
        previous = hub.arbiter.effective(device_id)
        hub.arbiter.command(device_id, Setpoint(on=on), ttl, "matter")
        try:
            await link.write()
        except (DeviceError, TimeoutError) as err:
            if link.live.online:
                # The plug is there and refused: undo, and show its real state again.
                if previous.source is ControlSource.API and previous.expires_at is not None:
                    hub.arbiter.command(
                        device_id, previous.setpoint, previous.expires_at - time.time(), previous.issued_by
                    )
                else:
                    hub.arbiter.release(device_id)
                self._restore(device_id)
            _LOGGER.warning("Matter: switching %s %s failed: %s", device_id, "on" if on else "off", err)
            return
        hub.bus.publish("control.changed", device_id=device_id, source="api", by="matter")

    def _restore(self, device_id: str) -> None:
        """Forget what Matter shows of the plug's relay and push its real state."""
        ep = self._endpoints.get(device_id)
        if ep is not None:
            ep.values.get("onOff", {}).pop("onOff", None)
            live = self._hub.state.devices.get(device_id)
            real = live.telemetry.on if live is not None and live.telemetry is not None else None
            if real is not None and self.process is not None:
                self.process.send(update_op(ep.id, {"onOff": {"onOff": real}}))
                ep.values.setdefault("onOff", {})["onOff"] = real

    # ------------------------------------------------------------------------------------------ API

    def _running(self) -> MatterProcess:
        if self.process is None or self.process.state != "running":
            raise BridgeUnavailable(f"the Matter bridge is {self.state}")
        return self.process

    async def open_window(self, timeout_s: int) -> None:
        await self._running().request(open_window_op(timeout_s))

    async def close_window(self) -> None:
        await self._running().request(close_window_op())

    async def remove_fabric(self, fabric_index: int) -> None:
        await self._running().request(remove_fabric_op(fabric_index))

    async def refresh_status(self) -> None:
        with contextlib.suppress(MatterError):
            await self._running().request(status_op())

    def devices(self) -> list[tuple[str, str, int | None, str]]:
        """(device id, endpoint id, endpoint number, kind) of every bridged module."""
        return [(e.device_id, e.id, e.number, e.kind) for e in self._endpoints.values()]


def _as_int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
