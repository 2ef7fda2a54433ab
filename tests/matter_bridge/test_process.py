"""Tests of matter_bridge.process with the real Node.js bridge: handshake, requests, bad input, crash restart
with replay, clean stop (also while starting or restarting) and the ways a start can fail."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import psutil
import pytest

from matter_bridge.process import JS_DIR, BridgeOptions, MatterProcess, State, bridge_installed
from matter_bridge.protocol import (
    MAX_LINE_BYTES,
    BridgeCommandError,
    BridgeEvent,
    BridgeUnavailable,
    BridgeWarning,
    ErrorReply,
    Fabric,
    FabricsChanged,
    Hello,
    MatterError,
    Op,
    Ready,
    Result,
    StartOp,
    Status,
    Stopped,
    Window,
    add_op,
    close_window_op,
    open_window_op,
    start_op,
    status_op,
    update_op,
)
from tests.hub.test_api import until
from tests.matter_bridge.conftest import free_udp_port

NODE = "/usr/bin/node"
DEADLINE_S = 30.0
E = TypeVar("E", bound=BridgeEvent)

pytestmark = pytest.mark.skipif(
    not Path(NODE).exists() or bridge_installed() is not None,
    reason=f"needs {NODE} and the bridge's node_modules",
)


def children() -> list[psutil.Process]:
    found: list[psutil.Process] = psutil.Process().children(recursive=True)
    return found


def gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def state(process: MatterProcess) -> State:
    """The state now (a plain read, so mypy does not keep an earlier narrowing across awaits)."""
    return process.state


def status_of(process: MatterProcess) -> Status:
    assert process.status is not None
    return process.status


class Events:
    """The on_event callback: records every event and lets a test wait for a condition on them."""

    def __init__(self) -> None:
        self.seen: list[BridgeEvent] = []
        self._changed = asyncio.Event()

    def __call__(self, event: BridgeEvent) -> None:
        self.seen.append(event)
        self._changed.set()

    def of(self, kind: type[E]) -> list[E]:
        return [e for e in self.seen if isinstance(e, kind)]

    async def wait_for(self, condition: Callable[[], bool], timeout: float = DEADLINE_S) -> None:
        async with asyncio.timeout(timeout):
            while not condition():
                self._changed.clear()
                await self._changed.wait()

    def endpoints(self, since: int = 0) -> dict[str, int]:
        """id → endpoint number from the add results after the ``since``-th Hello."""
        hellos = [i for i, e in enumerate(self.seen) if isinstance(e, Hello)]
        start = hellos[since] if since < len(hellos) else len(self.seen)
        return {
            e.data["id"]: e.data["endpoint"]
            for e in self.seen[start:]
            if isinstance(e, Result) and e.op == "add" and e.seq is None
        }


class Modules:
    """initial_ops: the hub's current endpoints; counts how often it was asked."""

    def __init__(self) -> None:
        self.calls = 0
        self.ops: list[Op] = [
            add_op(
                "plug-1",
                "plug",
                {"name": "Plug", "serial": "PLUG1", "uniqueId": "u-plug-1", "reachable": True},
                {"onOff": {"onOff": True}, "electricalPowerMeasurement": {"activePower": 40_000}},
            ),
            add_op(
                "bat-1",
                "battery",
                {"name": "Battery", "serial": "BAT1", "uniqueId": "u-bat-1"},
                {"powerSource": {"batPercentRemaining": 150, "batChargeState": 1}},
            ),
        ]

    def __call__(self) -> list[Op]:
        self.calls += 1
        return list(self.ops)


Make = Callable[..., tuple[MatterProcess, Events, Modules]]


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Make]:
    made: list[MatterProcess] = []

    def factory(**kwargs: Any) -> tuple[MatterProcess, Events, Modules]:
        events, modules = Events(), Modules()
        start: Callable[[], StartOp] = start_op
        settings: dict[str, Any] = {
            "node": NODE,
            "backoff_s": (0.05, 0.2),
            "ready_timeout_s": DEADLINE_S,
            "stop_timeout_s": 10.0,
        }
        settings.update(kwargs)
        options = BridgeOptions(storage_dir=tmp_path / "matter", port=free_udp_port())
        process = MatterProcess(options, on_event=events, initial_ops=modules, start_op=start, **settings)
        made.append(process)
        return process, events, modules

    yield factory
    for process in made:
        await process.stop()
    assert not children(), "a bridge process was left running"


def test_options_are_key_value_words(tmp_path: Path) -> None:
    argv = BridgeOptions(storage_dir=tmp_path, port=5541, ipv4=False, interface="veth-a").argv()
    assert f"storage={tmp_path}" in argv
    assert {"port=5541", "ipv4=0", "interface=veth-a", "vendor-id=65521", "product-name=ORES Hub"} <= set(
        argv
    )
    assert all("=" in word and not word.startswith("-") for word in argv)
    assert not any(w.startswith("interface=") for w in BridgeOptions(storage_dir=tmp_path).argv())


def test_bridge_installed_says_why_not(tmp_path: Path) -> None:
    assert bridge_installed() is None
    assert bridge_installed(JS_DIR) is None
    missing = tmp_path / "js"
    reason = bridge_installed(missing)
    assert reason is not None and "bridge.mjs" in reason
    missing.mkdir()
    (missing / "bridge.mjs").write_text("")
    reason = bridge_installed(missing)
    assert reason is not None and "npm ci" in reason


async def test_start_fails_clearly_without_node_or_js(make: Make, tmp_path: Path) -> None:
    process, _, modules = make(node=str(tmp_path / "no-node"))
    with pytest.raises(MatterError, match=r"no-node.*not found"):
        await process.start()
    assert process.state == "failed" and process.pid is None and modules.calls == 0

    process, _, _ = make(launcher=("/nonexistent/ip", "netns", "exec", "x"))
    with pytest.raises(MatterError, match="/nonexistent/ip"):
        await process.start()
    assert process.state == "failed"

    process, _, _ = make(js_dir=tmp_path / "js")
    with pytest.raises(MatterError, match=r"bridge\.mjs"):
        await process.start()
    assert process.state == "failed"
    await process.stop()  # nothing to stop: fine
    assert process.state == "failed"


async def test_child_exiting_before_ready_fails_the_start(make: Make) -> None:
    # The launcher runs instead of node: it complains on stderr and exits, like a bad node install would.
    process, _, _ = make(launcher=("sh", "-c", "echo 'bad argument x' >&2; exit 3", "sh"))
    with pytest.raises(MatterError) as info:
        await process.start()
    assert "exit code 3" in str(info.value) and "bad argument x" in str(info.value)
    assert process.state == "failed" and process.restarts == 0


async def test_no_ready_in_time_kills_the_child(make: Make) -> None:
    process, _, _ = make(launcher=("sh", "-c", "exec sleep 60", "sh"), ready_timeout_s=0.3)
    with pytest.raises(MatterError, match=r"no ready .* within 0.3 s"):
        await process.start()
    assert process.state == "failed" and process.pid is None
    assert not children()


async def test_start_requests_bad_input_and_clean_stop(make: Make, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="matter_bridge")
    process, events, modules = make()
    await process.start()
    assert process.state == "running" and modules.calls == 1
    hello = events.of(Hello)[0]
    assert process.pid == hello.pid and hello.protocol == 1
    assert events.endpoints() == {"plug-1": 2, "bat-1": 3}  # add results come through on_event
    assert len(events.of(Ready)) == 1
    assert process.status is not None and process.status.manual_code == "34970112332"
    assert not process.status.commissioned and not process.status.window_open

    # Requests get their results; a refused op raises with the bridge's reason.
    status = await process.request(status_op())
    assert status["manualPairingCode"] == "34970112332"
    assert await process.request(update_op("bat-1", {"powerSource": {"batPercentRemaining": 160}})) == {}
    with pytest.raises(BridgeCommandError) as info:
        await process.request(update_op("bat-1", {"powerSource": {"batPercentRemaining": 999}}))
    assert info.value.op == "update" and "999" in info.value.reason
    with pytest.raises(BridgeCommandError, match="no endpoint"):
        await process.request(update_op("nope", {"onOff": {"onOff": False}}))

    # Fire and forget: the reply (no seq) comes back as an event.
    assert process.send(update_op("plug-1", {"onOff": {"onOff": False}}))
    await events.wait_for(lambda: any(e.op == "update" and e.seq is None for e in events.of(Result)))

    # Junk on the bridge's input: it answers with errors, both sides live on.
    process._write_raw(b'not json\n[1]\n{"op":"warp"}\n')
    await events.wait_for(lambda: len(events.of(ErrorReply)) == 3)
    assert [e.seq for e in events.of(ErrorReply)] == [None, None, None]
    assert "unknown op" in events.of(ErrorReply)[2].reason
    # An op name of 1 MiB: the bridge echoes it in an error line longer than we accept, which is skipped.
    process._write_raw(b'{"op":"' + b"x" * MAX_LINE_BYTES + b'"}\n')
    status = await process.request(status_op())
    assert status["window"] == "closed"
    assert any("over-long line" in r.getMessage() for r in caplog.records)
    assert len(events.of(ErrorReply)) == 3
    assert any(r.name == "matter_bridge.js" for r in caplog.records)  # stderr is logged

    # Commissioning window: status follows the Window events and results.
    opened = await process.request(open_window_op(60))
    assert opened["window"] == "open" and process.status.window_open
    assert events.of(Window)[-1] == Window(True, 60, None)
    await process.request(close_window_op())
    assert not process.status.window_open
    assert events.of(Window)[-1] == Window(False, None, "request")

    pid = process.pid
    assert pid is not None
    await process.stop()
    assert isinstance(events.seen[-1], Stopped)
    assert process.state == "stopped" and process.pid is None and process.last_exit == "exit code 0"
    assert gone(pid) and not children()
    assert process.restarts == 0
    await process.stop()  # idempotent
    assert not process.send(update_op("plug-1", {"onOff": {"onOff": True}}))
    with pytest.raises(BridgeUnavailable):
        await process.request(status_op())


async def test_crash_restarts_and_replays_current_state(make: Make) -> None:
    process, events, modules = make()
    await process.start()
    first = events.endpoints()
    assert first == {"plug-1": 2, "bat-1": 3}
    old = process.pid
    assert old is not None

    # The hub's state changed while the bridge ran (without telling it): the replay must show it.
    modules.ops.append(add_op("meter-1", "meter", {"name": "Grid"}, {}))

    # Freeze the child so a request stays pending, then kill it: the request fails, the child comes back.
    os.kill(old, signal.SIGSTOP)
    pending = asyncio.create_task(process.request(status_op()))
    os.kill(old, signal.SIGKILL)
    with pytest.raises(BridgeUnavailable):
        await pending
    await events.wait_for(lambda: len(events.of(Ready)) == 2)
    await until(lambda: process.state == "running")

    assert process.restarts == 1 and process.last_exit == "killed by SIGKILL"
    assert process.pid is not None and process.pid != old and gone(old)
    assert len(events.of(Hello)) == 2 and events.of(Hello)[1].pid == process.pid
    assert modules.calls == 2
    assert events.endpoints(since=1) == {**first, "meter-1": 4}  # same numbers for the same ids
    assert (
        await process.request(update_op("meter-1", {"electricalPowerMeasurement": {"activePower": 5}})) == {}
    )

    await process.stop()
    assert isinstance(events.seen[-1], Stopped) and process.last_exit == "exit code 0"
    assert not children()


async def test_stop_while_restarting(make: Make) -> None:
    process, events, modules = make(backoff_s=(60.0, 60.0))
    await process.start()
    pid = process.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    await until(lambda: process.state == "restarting")
    assert not process.send(update_op("plug-1", {"onOff": {"onOff": True}}))
    with pytest.raises(BridgeUnavailable):
        await process.request(status_op())
    await process.stop()  # does not wait out the backoff
    assert process.state == "stopped" and process.restarts == 1 and modules.calls == 1
    assert len(events.of(Hello)) == 1 and gone(pid) and not children()


async def test_stop_during_start(make: Make) -> None:
    process, events, _ = make()
    starting = asyncio.create_task(process.start())
    await until(lambda: process.pid is not None)
    pid = process.pid
    assert pid is not None and process.state == "starting"
    await process.stop()
    with pytest.raises(MatterError, match="stopped before it was ready"):
        await starting
    assert state(process) == "stopped" and process.pid is None
    assert gone(pid) and not children()
    assert not events.of(Ready)


# ---- a stand-in bridge (plain node, no matter.js: starts in milliseconds) for the paths the real one never takes

FAKE_BRIDGE = r"""
import { createInterface } from "node:readline";
const mode = process.env.FAKE_MODE ?? "";
const out = o => process.stdout.write(JSON.stringify(o) + "\n");
const fabrics = [];
const status = () => ({
    manualPairingCode: "1", qrPairingCode: "MT:1", commissioned: fabrics.length > 0, window: "closed", fabrics,
});
if (mode.includes("ignore-term")) process.on("SIGTERM", () => out({ event: "warning", reason: "ignored SIGTERM" }));
createInterface({ input: process.stdin }).on("line", line => {
    const msg = JSON.parse(line);
    const seq = msg.seq ?? null;
    if (msg.op === "start" && mode.includes("refuse-start")) {
        out({ event: "error", seq, op: "start", reason: "port 5540 in use" });
    } else if (msg.op === "start") {
        out({ event: "ready", ...status() });
        out({ event: "result", seq, op: "start", ...status() });
    } else if (msg.op === "status") {
        out({ event: "result", seq, op: "status", ...status() });
    } else if (msg.op === "fake_commission") {
        fabrics.push({ fabricIndex: 1, fabricId: "7", nodeId: "9", vendorId: 65521, label: "HA" });
        out({ event: "commissioned" });
        out({ event: "fabrics", fabricIndex: 1, action: "added" });
        out({ event: "result", seq, op: msg.op });
    } else {
        out({ event: "result", seq, op: msg.op ?? null });
    }
});
setInterval(() => {}, 1 << 30); // stays up after stdin closes: only signals end it
out({ event: "hello", pid: process.pid, protocol: mode.includes("protocol-2") ? 2 : 1, matterjs: "fake" });
"""


@pytest.fixture
def fake_js(tmp_path: Path) -> Path:
    js = tmp_path / "fake-js"
    (js / "node_modules" / "@matter" / "main").mkdir(parents=True)
    (js / "bridge.mjs").write_text(FAKE_BRIDGE)
    return js


def fake(mode: str) -> tuple[str, ...]:
    return ("env", f"FAKE_MODE={mode}")


async def test_stop_escalates_to_sigterm(make: Make, fake_js: Path) -> None:
    process, events, _ = make(js_dir=fake_js, launcher=fake("plain"), stop_timeout_s=0.1)
    await process.start()
    with pytest.raises(MatterError, match="already running"):
        await process.start()
    await process.stop()  # the stand-in ignores the closed stdin; SIGTERM ends it
    assert process.last_exit == "killed by SIGTERM" and process.state == "stopped"
    assert not events.of(Stopped) and not children()
    # A stopped process can be started again.
    await process.start()
    assert state(process) == "running" and len(events.of(Hello)) == 2 and process.restarts == 0
    await process.stop()
    assert not children()


async def test_stop_escalates_to_sigkill(make: Make, fake_js: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("matter_bridge.process.TERM_GRACE_S", 0.1)
    process, events, _ = make(js_dir=fake_js, launcher=fake("ignore-term"), stop_timeout_s=0.1)
    await process.start()
    await process.stop()
    assert process.last_exit == "killed by SIGKILL" and process.state == "stopped"
    assert any(e.reason == "ignored SIGTERM" for e in events.of(BridgeWarning))
    assert not children()


async def test_refused_start_and_wrong_protocol_fail_the_start(make: Make, fake_js: Path) -> None:
    process, _, _ = make(js_dir=fake_js, launcher=fake("refuse-start"))
    with pytest.raises(MatterError, match="port 5540 in use"):
        await process.start()
    assert process.state == "failed" and not children()

    process, _, modules = make(js_dir=fake_js, launcher=fake("protocol-2"))
    with pytest.raises(MatterError, match="protocol 2"):
        await process.start()
    assert process.state == "failed" and modules.calls == 0 and not children()


async def test_status_follows_fabric_changes(make: Make, fake_js: Path) -> None:
    process, events, _ = make(js_dir=fake_js, launcher=fake("plain"), stop_timeout_s=0.1)
    await process.start()
    assert process.status is not None and process.status.fabrics == ()
    assert process.send(cast(Op, {"op": "fake_commission"}))
    await events.wait_for(lambda: bool(events.of(FabricsChanged)))
    assert process.status.commissioned  # from the commissioned event
    # The fabric list comes from a status request the process makes by itself.
    await until(lambda: process.status is not None and len(process.status.fabrics) == 1)
    assert status_of(process).fabrics == (Fabric(1, "7", "9", 65521, "HA"),)
    await process.stop()
