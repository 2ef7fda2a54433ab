"""Tests for ``hub.rollout`` on a real hub (registry, poller, event bus) with real ORES-HTTP simulated modules
that run ``SimFirmware`` (A/B slots, their own verification, reboots, failure injection).

Releases are signed with real Ed25519 keys and stored through the real ``FirmwareStore``.  A module's
reboot is held with an injected clock where a test needs a module to stay down at a known point.  Every
test also checks what reached the modules: the simulated firmware records each ``begin``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from devices.model import DeviceKind, make_device_id
from devices.sim.base import StaticModule
from devices.sim.firmware import SimFirmware, SimFirmwareError
from devices.sim.ores_http_server import OresHttpSimServer, start_ores_http_server
from firmware.manifest import UntrustedKey
from hub.firmware_store import StoredImage
from hub.rollout import (
    ModuleUpdate,
    Rollout,
    RolloutConfig,
    RolloutError,
    RolloutManager,
    RolloutState,
    UpdateStatus,
)
from hub.state import Event
from tests.firmware import Vendor, document, sign_document
from tests.hub.conftest import Hub, make_module

VENDOR = "Test Vendor"
INVERTER = "T-microinverter"
BATTERY = "T-energystorage"
DEADLINE_S = 30.0
FAST = RolloutConfig(
    health_poll_s=0.05,
    status_poll_s=0.05,
    retry_backoff_s=0.05,
    max_backoff_s=0.2,
    call_timeout_s=2.0,
    reboot_timeout_s=15.0,
    retries=20,
)


class ManualClock:
    """A clock that only moves when the test says so (holds a simulated reboot)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordingFirmware(SimFirmware):
    """``SimFirmware`` that records what reached it, and can cut the connection once mid-transfer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.begins: list[int] = []  # the resume offset each accepted begin returned
        self.begin_calls = 0
        self.accepted = 0  # image bytes taken
        self.interrupt_after: int | None = None
        self.on_interrupt: Callable[[], None] | None = None

    def begin(self, manifest_bytes: bytes, signature: bytes | str) -> int:
        self.begin_calls += 1
        offset = super().begin(manifest_bytes, signature)
        self.begins.append(offset)
        return offset

    def chunk(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        if self.interrupt_after is not None and self.accepted >= self.interrupt_after:
            self.interrupt_after = None
            assert self.on_interrupt is not None
            self.on_interrupt()
            raise SimFirmwareError("rebooting", "connection lost (injected by the test)")
        received = super().chunk(offset, data)
        self.accepted += len(data)
        return received


@dataclass
class Sim:
    device_id: str
    module: StaticModule
    firmware: RecordingFirmware
    server: OresHttpSimServer
    clock: ManualClock | None = None


@dataclass
class Home:
    hub: Hub
    vendor: Vendor
    sims: list[Sim] = field(default_factory=list)
    plain: list[OresHttpSimServer] = field(default_factory=list)

    @property
    def rollouts(self) -> RolloutManager:
        return self.hub.ctx.rollouts

    async def add(
        self,
        kind: DeviceKind,
        serial: str,
        *,
        version: str = "1.0.0",
        fail_versions: frozenset[str] = frozenset(),
        hold_reboots: bool = False,
        **sample: Any,
    ) -> Sim:
        module = make_module(kind, serial, **sample)
        clock = ManualClock() if hold_reboots else None
        firmware = RecordingFirmware(
            VENDOR,
            module.info.identity.model,
            version,
            trusted=self.vendor.trust(),
            reboot_s=0.1 if clock is None else 60.0,
            fail_versions=fail_versions,
            clock=clock or time.monotonic,
        )
        server = await start_ores_http_server(module, firmware=firmware)
        sim = Sim(make_device_id(VENDOR, serial), module, firmware, server, clock)
        self.sims.append(sim)
        await self.register(str(server.address))
        return sim

    async def add_plain(self, kind: DeviceKind, serial: str, **sample: Any) -> str:
        server = await start_ores_http_server(make_module(kind, serial, **sample))
        self.plain.append(server)
        await self.register(str(server.address))
        return make_device_id(VENDOR, serial)

    async def register(self, address: str) -> None:
        status, body = await self.hub.request("POST", "/device/register", json_body={"address": address})
        assert status == 201, body
        device_id = body["device_id"]
        await until(lambda: self.hub.ctx.state.devices[device_id].online)

    async def store(
        self, image: bytes, *, version: str = "1.1.0", models: tuple[str, ...] = (INVERTER,)
    ) -> StoredImage:
        manifest, sig = sign_document(
            document(self.vendor, image, version=version, models=list(models)), self.vendor
        )

        async def feed() -> AsyncIterator[bytes]:
            for start in range(0, len(image), 65536):
                yield image[start : start + 65536]

        stored, _ = await self.hub.ctx.firmware.add(manifest, sig, feed())
        return stored

    async def run(self, sha256: str, **kwargs: Any) -> Rollout:
        kwargs.setdefault("health_window_s", 0.2)
        rollout = await self.rollouts.start_rollout(sha256, **kwargs)
        await until(finished(self.rollouts, rollout.rollout_id))
        return rollout_of(self.rollouts, rollout.rollout_id)


async def until(condition: Callable[[], object], deadline_s: float = DEADLINE_S) -> None:
    """Poll ``condition`` until it holds; fail the test after the deadline."""
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.02)


def rollout_of(manager: RolloutManager, rollout_id: str) -> Rollout:
    rollout = manager.get(rollout_id)
    assert rollout is not None
    return rollout


def module_of(rollout: Rollout, device_id: str) -> ModuleUpdate:
    mod = rollout.module(device_id)
    assert mod is not None
    return mod


def finished(manager: RolloutManager, rollout_id: str) -> Callable[[], bool]:
    return lambda: rollout_of(manager, rollout_id).state is not RolloutState.RUNNING


def reason_code(mod: ModuleUpdate) -> str | None:
    return None if mod.reason is None else mod.reason.code


class Events:
    """Every event of the bus, in order, while the test runs."""

    def __init__(self, hub: Hub) -> None:
        self._sub = hub.ctx.bus.subscribe(100_000)
        self.items: list[Event] = []
        self._task = asyncio.create_task(self._collect())

    async def _collect(self) -> None:
        async for event in self._sub:
            self.items.append(event)

    def status(self, device_id: str | None = None) -> list[dict[str, Any]]:
        return [
            e.data
            for e in self.items
            if e.type == "firmware.status" and (device_id is None or e.data["device_id"] == device_id)
        ]

    def index(self, device_id: str, predicate: Callable[[dict[str, Any]], bool]) -> int:
        """Position (among all firmware.status events) of the first event of ``device_id`` that matches."""
        for i, data in enumerate(self.status()):
            if data["device_id"] == device_id and predicate(data):
                return i
        raise AssertionError(f"no matching event for {device_id}")

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._sub.close()


def status_is(status: str) -> Callable[[dict[str, Any]], bool]:
    return lambda data: data["status"] == status


@pytest.fixture(scope="module")
def vendor() -> Vendor:
    return Vendor.new(VENDOR)


@pytest.fixture
async def home(hub: Hub, vendor: Vendor) -> AsyncIterator[Home]:
    hub.ctx.rollouts.config = FAST
    await hub.ctx.trust.add(VENDOR, vendor.private_key.public_key(), {"firmware"})
    h = Home(hub, vendor)
    try:
        yield h
    finally:
        await hub.ctx.rollouts.stop()
        for sim in h.sims:
            await sim.server.stop()
        for server in h.plain:
            await server.stop()


@pytest.fixture
async def events(hub: Hub) -> AsyncIterator[Events]:
    ev = Events(hub)
    yield ev
    await ev.close()


IMAGE = os.urandom(150_000)


async def test_canary_first_then_batches_of_two(home: Home, events: Events) -> None:
    sims = [await home.add(DeviceKind.MICROINVERTER, f"MI-{n}") for n in range(4)]
    image = await home.store(IMAGE)
    rollout = await home.run(image.sha256, model=INVERTER, batch_size=2)

    assert rollout.state is RolloutState.SUCCEEDED, rollout
    assert [m.status for m in rollout.modules] == [UpdateStatus.HEALTHY] * 4
    assert [m.from_version for m in rollout.modules] == ["1.0.0"] * 4
    canary = [m.device_id for m in rollout.modules if m.canary]
    assert canary == [sims[0].device_id]
    for sim in sims:
        assert sim.firmware.running_version == "1.1.0"
        assert sim.firmware.begins == [0] and sim.firmware.accepted == len(IMAGE)
        record = home.hub.ctx.registry.get(sim.device_id)
        assert record is not None and record.identity.firmware_version == "1.1.0"
    ids = [s.device_id for s in sims]
    canary_healthy = events.index(ids[0], status_is("healthy"))
    second_batch = [events.index(d, status_is("transferring")) for d in ids[1:3]]
    assert all(i > canary_healthy for i in second_batch)  # nothing else started before the canary was healthy
    last_start = events.index(ids[3], status_is("transferring"))
    assert all(last_start > events.index(d, status_is("healthy")) for d in ids[1:3])  # a batch at a time
    progress = [d["progress_pct"] for d in events.status(ids[3]) if d["status"] == "transferring"]
    assert progress == sorted(progress) and progress[-1] == 100
    saved = json.loads((home.hub.ctx.config.data_dir / "firmware" / "rollouts.json").read_bytes())
    assert [m["status"] for m in saved["rollouts"][0]["modules"]] == ["healthy"] * 4


async def test_unhealthy_canary_is_rolled_back_and_the_rest_aborted(home: Home) -> None:
    sims = [
        await home.add(DeviceKind.MICROINVERTER, f"MI-{n}", fail_versions=frozenset({"1.1.0"}))
        for n in range(3)
    ]
    image = await home.store(IMAGE)
    rollout = await home.run(image.sha256, device_ids=[s.device_id for s in sims])

    assert rollout.state is RolloutState.ABORTED
    canary, *rest = rollout.modules
    assert canary.canary and canary.status is UpdateStatus.ROLLED_BACK
    assert canary.reason is not None and canary.reason.code == "unhealthy"
    assert sims[0].firmware.running_version == "1.0.0" and sims[0].firmware.boot_count == 2
    for mod, sim in zip(rest, sims[1:], strict=True):
        assert mod.status is UpdateStatus.FAILED and mod.reason is not None and mod.reason.code == "aborted"
        assert sim.firmware.begin_calls == 0
    record = home.hub.ctx.registry.get(sims[0].device_id)
    assert record is not None and record.identity.firmware_version == "1.0.0"


async def test_interrupted_transfer_resumes_where_the_module_stands(home: Home) -> None:
    sim = await home.add(DeviceKind.MICROINVERTER, "MI-1")
    image_bytes = os.urandom(1_000_000)
    image = await home.store(image_bytes)
    port = sim.server.address.port
    stopping: list[asyncio.Task[None]] = []
    sim.firmware.interrupt_after = 3 * 65536
    sim.firmware.on_interrupt = lambda: stopping.append(
        asyncio.get_running_loop().create_task(sim.server.stop())
    )

    rollout = await home.rollouts.start_rollout(image.sha256, device_ids=[sim.device_id], health_window_s=0.2)
    await until(lambda: stopping)
    await stopping[0]  # the module is gone mid-transfer
    sim.server = await start_ores_http_server(sim.module, port=port, firmware=sim.firmware)
    await until(finished(home.rollouts, rollout.rollout_id))

    done = home.rollouts.get(rollout.rollout_id)
    assert done is not None and done.state is RolloutState.SUCCEEDED, done
    assert sim.firmware.begins == [0, 3 * 65536]  # resumed at the module's offset, not from the start
    assert sim.firmware.accepted == len(image_bytes)  # every byte sent exactly once
    assert sim.firmware.running_version == "1.1.0"


async def test_battery_below_safe_soc_is_not_updated(home: Home) -> None:
    await home.add_plain(DeviceKind.METER, "M-1", grid_ok=True)
    low = await home.add(DeviceKind.ENERGYSTORAGE, "B-LOW", soc_pct=20.0)
    ok = await home.add(DeviceKind.ENERGYSTORAGE, "B-OK", soc_pct=80.0)
    image = await home.store(IMAGE, models=(BATTERY,))
    rollout = await home.run(image.sha256, model=BATTERY)

    assert rollout.state is RolloutState.FINISHED
    refused = module_of(rollout, low.device_id)
    assert refused.status is UpdateStatus.FAILED and reason_code(refused) == "battery_low"
    assert refused.reason is not None and "20 %" in refused.reason.message and not refused.canary
    assert low.firmware.begin_calls == 0 and low.firmware.running_version == "1.0.0"
    updated = module_of(rollout, ok.device_id)
    assert updated.status is UpdateStatus.HEALTHY and updated.canary  # the next module became the canary
    assert ok.firmware.running_version == "1.1.0"


async def test_no_battery_update_during_a_grid_outage(home: Home) -> None:
    await home.add_plain(DeviceKind.METER, "M-1", grid_ok=False)
    battery = await home.add(DeviceKind.ENERGYSTORAGE, "B-1", soc_pct=90.0)
    inverter = await home.add(DeviceKind.MICROINVERTER, "MI-1")
    await until(lambda: home.hub.ctx.state.devices[make_device_id(VENDOR, "M-1")].telemetry is not None)
    image = await home.store(IMAGE, models=(BATTERY, INVERTER))
    rollout = await home.run(image.sha256, device_ids=[battery.device_id, inverter.device_id])

    mod = module_of(rollout, battery.device_id)
    assert mod.status is UpdateStatus.FAILED and reason_code(mod) == "grid_outage"
    assert battery.firmware.begin_calls == 0
    # Only batteries wait for the grid: the inverter is updated.
    assert module_of(rollout, inverter.device_id).status is UpdateStatus.HEALTHY


async def test_never_all_inverters_down_at_once(home: Home, events: Events) -> None:
    first = await home.add(DeviceKind.MICROINVERTER, "MI-A", hold_reboots=True)
    second = await home.add(DeviceKind.MICROINVERTER, "MI-B")
    image = await home.store(IMAGE)
    r1 = await home.rollouts.start_rollout(image.sha256, device_ids=[first.device_id], health_window_s=0.2)
    await until(lambda: first.firmware.rebooting)  # the first inverter is down, and stays down
    r2 = await home.rollouts.start_rollout(image.sha256, device_ids=[second.device_id], health_window_s=0.2)
    await until(
        lambda: (
            (detail := module_of(rollout_of(home.rollouts, r2.rollout_id), second.device_id).detail)
            and "waiting" in detail
        )
    )
    assert second.firmware.boot_count == 0 and second.firmware.inactive_version is None
    assert first.clock is not None
    first.clock.now += 120.0  # the first inverter comes back
    for rid in (r1.rollout_id, r2.rollout_id):
        await until(finished(home.rollouts, rid))
        assert rollout_of(home.rollouts, rid).state is RolloutState.SUCCEEDED
    back = events.index(
        first.device_id, lambda d: d["status"] == "rebooting" and "checking health" in (d["detail"] or "")
    )
    assert events.index(second.device_id, status_is("installing")) > back


async def test_downgrade_and_wrong_model_never_reach_the_module(home: Home) -> None:
    newer = await home.add(DeviceKind.MICROINVERTER, "MI-2", version="2.0.0")
    inverter = await home.add(DeviceKind.MICROINVERTER, "MI-1")
    image = await home.store(IMAGE)
    with pytest.raises(RolloutError) as err:
        await home.rollouts.start_rollout(image.sha256, device_ids=[newer.device_id])
    assert err.value.code == "downgrade"
    battery_image = await home.store(os.urandom(1000), models=(BATTERY,))
    with pytest.raises(RolloutError) as err:
        await home.rollouts.start_rollout(battery_image.sha256, device_ids=[inverter.device_id])
    assert err.value.code == "wrong_model"
    with pytest.raises(RolloutError) as err:
        await home.rollouts.start_rollout(battery_image.sha256, model=INVERTER)
    assert err.value.code == "wrong_model"
    # The registry may be stale: the module's own version is asked before anything is sent.
    record = home.hub.ctx.registry.get(newer.device_id)
    assert record is not None
    await home.hub.ctx.registry.update(
        newer.device_id, identity=replace(record.identity, firmware_version="1.0.0")
    )
    rollout = await home.run(image.sha256, device_ids=[newer.device_id])
    mod = rollout.modules[0]
    assert mod.status is UpdateStatus.FAILED and reason_code(mod) == "downgrade"
    assert newer.firmware.begin_calls == 0 and inverter.firmware.begin_calls == 0


async def test_a_removed_key_is_refused_at_rollout_time(home: Home) -> None:
    held = await home.add(DeviceKind.MICROINVERTER, "MI-1", hold_reboots=True)
    other = await home.add(DeviceKind.MICROINVERTER, "MI-2")
    image = await home.store(IMAGE)
    rollout = await home.rollouts.start_rollout(
        image.sha256, device_ids=[held.device_id, other.device_id], health_window_s=0.2
    )
    await until(lambda: held.firmware.rebooting)
    assert await home.hub.ctx.trust.remove(home.vendor.key_id)  # removed while the canary reboots
    assert held.clock is not None
    held.clock.now += 120.0
    await until(finished(home.rollouts, rollout.rollout_id))
    done = home.rollouts.get(rollout.rollout_id)
    assert done is not None
    assert (
        module_of(done, held.device_id).status is UpdateStatus.HEALTHY
    )  # it was installed before the removal
    refused = module_of(done, other.device_id)
    assert refused.status is UpdateStatus.FAILED and reason_code(refused) == "untrusted_key"
    assert other.firmware.begin_calls == 0
    with pytest.raises(UntrustedKey):
        await home.rollouts.start_rollout(image.sha256, device_ids=[other.device_id])
    assert other.firmware.begin_calls == 0


async def test_restart_mid_rollout_reports_and_resumes_the_true_state(home: Home) -> None:
    held = await home.add(DeviceKind.MICROINVERTER, "MI-1", hold_reboots=True)
    other = await home.add(DeviceKind.MICROINVERTER, "MI-2")
    image = await home.store(IMAGE)
    ctx = home.hub.ctx
    rollout = await ctx.rollouts.start_rollout(
        image.sha256, device_ids=[held.device_id, other.device_id], health_window_s=0.2
    )
    await until(lambda: held.firmware.rebooting)
    await until(
        lambda: (
            module_of(rollout_of(ctx.rollouts, rollout.rollout_id), held.device_id).status
            is UpdateStatus.REBOOTING
        )
    )
    await ctx.rollouts.stop()  # the hub goes away; its file is all that is left
    path = ctx.config.data_dir / "firmware" / "rollouts.json"
    saved = json.loads(path.read_bytes())["rollouts"][0]
    assert saved["state"] == "running"
    assert [m["status"] for m in saved["modules"]] == ["rebooting", "queued"]
    assert held.clock is not None
    held.clock.now += 120.0  # meanwhile the module finished its reboot

    again = RolloutManager(ctx.firmware, ctx.registry, ctx.state, path, config=FAST, links=ctx.links)
    try:
        await again.start()
        await until(finished(again, rollout.rollout_id))
    finally:
        await again.stop()
    done = again.get(rollout.rollout_id)
    assert done is not None and done.state is RolloutState.SUCCEEDED
    assert held.firmware.begins == [0] and held.firmware.boot_count == 1  # not sent or installed twice
    assert other.firmware.running_version == "1.1.0"


async def test_only_inverter_of_a_site_may_be_updated(home: Home) -> None:
    sim = await home.add(DeviceKind.MICROINVERTER, "MI-1")
    image = await home.store(IMAGE)
    rollout = await home.run(image.sha256, device_ids=[sim.device_id])
    assert rollout.state is RolloutState.SUCCEEDED and sim.firmware.running_version == "1.1.0"
