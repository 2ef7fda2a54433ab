"""End-to-end prototype: matter.js bridge (netns ores-a) commissioned and driven by python-matter-server 7.0.1
(netns ores-b) through its websocket client API, from the root namespace.

Run as root after `sh netns.sh up`:  venv/bin/python e2e.py [--workdir run/e2e] [--samples 20]
Prints one JSON line per step and writes WORKDIR/results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import aiohttp
from chip.clusters import Objects as Clusters
from matter_server.client import MatterClient
from matter_server.common.models import EventType

HERE = Path(__file__).resolve().parent
NS_BRIDGE = "ores-a"
NS_CTRL = "ores-b"
RESULTS: dict[str, Any] = {}


def log(step: str, **kw: Any) -> None:
    kw["step"] = step
    print(json.dumps(kw, default=str), flush=True)
    RESULTS.setdefault(step, []).append(kw)


class Bridge:
    """The matter.js child: JSON lines in on stdin, JSON lines out on stdout, logs on stderr."""

    def __init__(self, storage: Path, logfile: Path) -> None:
        self.storage = storage
        self.logfile = logfile
        self.proc: asyncio.subprocess.Process | None = None
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self._seq = 0

    async def start(self) -> None:
        self.events.clear()
        self.proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", NS_BRIDGE,
            "node", str(HERE / "bridge" / "bridge.mjs"), f"storage={self.storage}",
            f"log-level={os.environ.get('E2E_BRIDGE_LOG', 'notice')}", "ipv4=0",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=open(self.logfile, "ab"),  # noqa: SIM115
        )
        self._tasks = [asyncio.create_task(self._read())]

    async def _read(self) -> None:
        assert self.proc and self.proc.stdout
        while line := await self.proc.stdout.readline():
            now = time.monotonic()
            try:
                msg = json.loads(line)
            except ValueError:
                msg = {"event": "unparsable", "line": line.decode(errors="replace")}
            if msg.get("event") not in ("result",):
                with open(self.logfile.with_suffix(".events.jsonl"), "a") as f:
                    f.write(json.dumps({"t": round(now, 3), **msg}) + "\n")
            async with self.changed:
                self.events.append((now, msg))
                self.changed.notify_all()

    async def send(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send one message and wait for its result/error reply."""
        self._seq += 1
        msg = {**msg, "seq": self._seq}
        assert self.proc and self.proc.stdin
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        await self.proc.stdin.drain()
        _, reply = await self.wait_for(lambda m: m.get("seq") == msg["seq"], 30)
        if reply["event"] == "error":
            raise RuntimeError(f"bridge refused {msg}: {reply['reason']}")
        return reply

    async def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float, since: int = 0
    ) -> tuple[float, dict[str, Any]]:
        async def scan() -> tuple[float, dict[str, Any]]:
            async with self.changed:
                while True:
                    for t, m in self.events[since:]:
                        if pred(m):
                            return t, m
                    await self.changed.wait()

        return await asyncio.wait_for(scan(), timeout)

    def rss_kb(self) -> int:
        assert self.proc
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return -1

    async def kill9(self) -> None:
        assert self.proc
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def stop(self) -> int:
        assert self.proc and self.proc.stdin
        self.proc.stdin.close()  # EOF = clean shutdown
        try:
            rc = await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            rc = await self.proc.wait()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        return rc


ENDPOINTS = [
    {"op": "add", "id": "battery-1", "kind": "battery",
     "info": {"name": "Battery", "vendor": "Sim", "product": "SimBattery 5", "serial": "BAT0001"},
     "values": {"powerSource": {"batPercentRemaining": 144, "batChargeState": 1},
                "electricalPowerMeasurement": {"activePower": -1200000}}},
    {"op": "add", "id": "pv-1", "kind": "solar",
     "info": {"name": "Micro-inverter", "vendor": "Sim", "product": "SimMI 800", "serial": "MI0001"},
     "values": {"electricalPowerMeasurement": {"activePower": 250000}}},
    {"op": "add", "id": "plug-1", "kind": "plug",
     "info": {"name": "Plug", "vendor": "Sim", "product": "SimPlug", "serial": "PLUG0001"}},
    {"op": "add", "id": "meter-1", "kind": "meter",
     "info": {"name": "Grid meter", "vendor": "Sim", "product": "SimMeter", "serial": "MTR0001"},
     "values": {"electricalPowerMeasurement": {"activePower": 432000}}},
]


async def start_bridge(bridge: Bridge) -> dict[str, Any]:
    await bridge.start()
    for ep in ENDPOINTS:
        await bridge.send(ep)
    return await bridge.send({"op": "start"})


async def wait_path(url_sock: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(url_sock))) as s:
                async with s.ws_connect("http://matter-server/ws") as ws:
                    await ws.receive_json(timeout=5)  # server_info greeting
                    return
        except (OSError, aiohttp.ClientError, asyncio.TimeoutError):
            await asyncio.sleep(0.2)
    raise TimeoutError("matter-server websocket not reachable")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=str(HERE / "run" / "e2e"))
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--scale", type=int, default=20,
                    help="bridged modules present at commissioning (>= 4); a 1 Hz load phase runs over all (0: skip)")
    ap.add_argument("--load-seconds", type=int, default=20)
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    kinds = ["battery", "solar", "meter", "plug"]
    for i in range(max(0, args.scale - len(ENDPOINTS))):
        ENDPOINTS.append({"op": "add", "id": f"x-{i}", "kind": kinds[i % 4]})
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    procs: list[asyncio.subprocess.Process] = []

    # --- controller side: PAA dir, matter-server, Unix-socket forwarder (all in ores-b)
    paa = work / "paa-src"
    rc = await (await asyncio.create_subprocess_exec("node", str(HERE / "bridge" / "export-paa.mjs"), str(paa))).wait()
    assert rc == 0
    if os.environ.get("E2E_PAA_DROP"):  # experiment: which PAA does the matter.js DAC chain need?
        (paa / os.environ["E2E_PAA_DROP"]).unlink()
    t0 = time.monotonic()
    procs.append(await asyncio.create_subprocess_exec(
        "sh", str(HERE / "run-matter-server.sh"), NS_CTRL, str(work / "ctrl"), str(paa),
        "--port", "5580", "--primary-interface", "veth-b", "--log-level-sdk", os.environ.get("E2E_SDK_LOG", "error"),
        stdout=open(work / "matter-server.log", "wb"), stderr=asyncio.subprocess.STDOUT,  # noqa: SIM115
        start_new_session=True,
    ))
    sock = work / "ms.sock"
    procs.append(await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", NS_CTRL, sys.executable, str(HERE / "uds_forward.py"), str(sock), "::1", "5580",
        stdout=asyncio.subprocess.DEVNULL, start_new_session=True,
    ))
    await wait_path(sock, 60)
    log("matter_server_ready", seconds=round(time.monotonic() - t0, 2))

    bridge = Bridge(work / "bridge-storage", work / "bridge.log")
    try:
        t0 = time.monotonic()
        ready = await start_bridge(bridge)
        log("bridge_ready", seconds=round(time.monotonic() - t0, 2), manual=ready["manualPairingCode"],
            qr=ready["qrPairingCode"], commissioned=ready["commissioned"], rss_kb=bridge.rss_kb())

        session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock)))
        client = MatterClient("http://matter-server/ws", session)
        await client.connect()
        init_ready = asyncio.Event()
        listen_task = asyncio.create_task(client.start_listening(init_ready))
        await init_ready.wait()

        # --- commission
        t0 = time.monotonic()
        node_data = await client.commission_with_code(ready["manualPairingCode"], network_only=True)
        commission_s = time.monotonic() - t0
        node_id = node_data.node_id
        log("commissioned", node_id=node_id, seconds=round(commission_s, 3), rss_kb=bridge.rss_kb())
        await bridge.wait_for(lambda m: m.get("event") == "fabrics", 5)

        # --- layout: endpoints and device types (Descriptor 0x001D attr 0 = DeviceTypeList, 3 = PartsList)
        node = client.get_node(node_id)
        layout = {}
        for ep_id in sorted(node.endpoints):
            dts = node.get_attribute_value(ep_id, None, Clusters.Descriptor.Attributes.DeviceTypeList)
            layout[ep_id] = [f"0x{d.deviceType:04X}" for d in dts]
        log("layout", endpoints=layout, is_bridge=node.is_bridge_device,
            parts=node.get_attribute_value(1, None, Clusters.Descriptor.Attributes.PartsList))
        labels = {ep: node.get_attribute_value(ep, None, Clusters.BridgedDeviceBasicInformation.Attributes.NodeLabel)
                  for ep in layout if ep > 1}
        log("labels", labels=labels)
        ep_of = {e["id"]: n for e, n in zip(ENDPOINTS, range(2, 2 + len(ENDPOINTS)))}

        # --- read battery percentage (Power Source 0x002F attr 0x000C, half-percent units)
        raw = await client.read_attribute(node_id, f"{ep_of['battery-1']}/47/12")
        log("battery_read", raw=raw, percent=list(raw.values())[0] / 2)
        log("solar_power_cached_mW", value=node.get_attribute_value(
            ep_of["pv-1"], None, Clusters.ElectricalPowerMeasurement.Attributes.ActivePower))

        # --- On/Off command to the plug: the bridge must report it
        n = len(bridge.events)
        t0 = time.monotonic()
        await client.send_device_command(node_id, ep_of["plug-1"], Clusters.OnOff.Commands.On())
        t_cmd, ev = await bridge.wait_for(lambda m: m.get("event") == "command", 5, since=n)
        log("onoff_command", bridge_event=ev, command_to_bridge_ms=round((t_cmd - t0) * 1000, 1),
            round_trip_ms=round((time.monotonic() - t0) * 1000, 1))
        await client.send_device_command(node_id, ep_of["plug-1"], Clusters.OnOff.Commands.Off())

        # --- subscription latency: push solar power through the bridge, wait for attribute_updated
        got: asyncio.Queue[tuple[float, Any]] = asyncio.Queue()
        path = f"{ep_of['pv-1']}/144/8"

        def on_attr(_evt: EventType, value: Any) -> None:
            got.put_nowait((time.monotonic(), value))

        unsub = client.subscribe_events(on_attr, EventType.ATTRIBUTE_UPDATED, node_id, path)

        async def one_update(value: int) -> float:
            t_push = time.monotonic()
            await bridge.send({"op": "update", "id": "pv-1",
                               "values": {"electricalPowerMeasurement": {"activePower": value}}})
            while True:
                t_evt, v = await asyncio.wait_for(got.get(), 5)
                if v == value:
                    return t_evt - t_push

        lat_sparse = []
        for i in range(args.samples):
            await asyncio.sleep(1.1)  # pacing > the controller's MinIntervalFloor (1 s)
            lat_sparse.append(await one_update(300000 + i))
        lat_burst = [await one_update(400000 + i) for i in range(5)]  # back-to-back: throttled by min interval
        unsub()

        def stats(xs: list[float]) -> dict[str, float]:
            xs = sorted(x * 1000 for x in xs)
            return {"n": len(xs), "min_ms": round(xs[0], 1), "p50_ms": round(statistics.median(xs), 1),
                    "p99_ms": round(xs[min(len(xs) - 1, int(len(xs) * 0.99))], 1), "max_ms": round(xs[-1], 1)}

        log("report_latency_sparse", **stats(lat_sparse))
        log("report_latency_back_to_back", values_ms=[round(x * 1000, 1) for x in lat_burst])
        log("bridge_rss", rss_kb=bridge.rss_kb())

        # --- a module onboarded after commissioning appears (and disappears) without re-commissioning
        ep_events: asyncio.Queue[tuple[float, str, Any]] = asyncio.Queue()

        def on_ep(evt: EventType, data: Any) -> None:
            ep_events.put_nowait((time.monotonic(), evt.value, data))

        unsub_a = client.subscribe_events(on_ep, EventType.ENDPOINT_ADDED)
        unsub_r = client.subscribe_events(on_ep, EventType.ENDPOINT_REMOVED)
        t0 = time.monotonic()
        added = await bridge.send({"op": "add", "id": "plug-2", "kind": "plug", "info": {"name": "Late plug"}})
        t_evt, kind, data = await asyncio.wait_for(ep_events.get(), 30)
        log("endpoint_added", bridge_endpoint=added["endpoint"], event=kind, data=data,
            seconds=round(t_evt - t0, 2),
            label=client.get_node(node_id).get_attribute_value(
                added["endpoint"], None, Clusters.BridgedDeviceBasicInformation.Attributes.NodeLabel))
        t0 = time.monotonic()
        await bridge.send({"op": "remove", "id": "plug-2"})
        t_evt, kind, data = await asyncio.wait_for(ep_events.get(), 30)
        log("endpoint_removed", event=kind, data=data, seconds=round(t_evt - t0, 2))
        unsub_a()
        unsub_r()

        # --- scale: 20 bridged modules, all updated at 1 Hz; bridge CPU, RSS and report latency under load
        if args.scale:
            log("scale_start", bridged=len(client.get_node(node_id).endpoints) - 2, rss_kb=bridge.rss_kb())
            assert bridge.proc
            def cpu_ticks() -> int:
                f = Path(f"/proc/{bridge.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
                return int(f[11]) + int(f[12])
            ids = [e["id"] for e in ENDPOINTS if e["kind"] != "plug"]
            unsub3 = client.subscribe_events(on_attr, EventType.ATTRIBUTE_UPDATED, node_id, path)
            lat_load: list[float] = []
            c0, w0 = cpu_ticks(), time.monotonic()
            for r in range(args.load_seconds):
                t_round = time.monotonic()
                for ident in ids:  # pv-1 is in the list; its value is the one we time
                    if ident == "pv-1":
                        continue
                    await bridge.send({"op": "update", "id": ident,
                                       "values": {"electricalPowerMeasurement": {"activePower": 1000 * r}}})
                lat_load.append(await one_update(500000 + r))
                await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - t_round)))
            c1, w1 = cpu_ticks(), time.monotonic()
            unsub3()
            log("scale_load", modules=args.scale, updated_per_s=len(ids),
                bridge_cpu_percent=round((c1 - c0) / os.sysconf("SC_CLK_TCK") / (w1 - w0) * 100, 1),
                rss_kb=bridge.rss_kb(), **stats(lat_load))

        # --- multi-admin: pairing refused while the window is closed; open it from the hub side; a second
        # controller (fabric 2) joins; fabrics listed and one removed from the hub side
        if os.environ.get("E2E_MULTI_ADMIN", "1") == "1":
            procs.append(await asyncio.create_subprocess_exec(
                "sh", str(HERE / "run-matter-server.sh"), NS_CTRL, str(work / "ctrl2"), str(paa),
                "--port", "5581", "--fabricid", "2", "--primary-interface", "veth-b",
                stdout=open(work / "matter-server-2.log", "wb"), stderr=asyncio.subprocess.STDOUT,  # noqa: SIM115
                start_new_session=True,
            ))
            sock2 = work / "ms2.sock"
            procs.append(await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", NS_CTRL, sys.executable, str(HERE / "uds_forward.py"), str(sock2), "::1", "5581",
                stdout=asyncio.subprocess.DEVNULL, start_new_session=True,
            ))
            await wait_path(sock2, 60)
            session2 = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sock2)))
            client2 = MatterClient("http://matter-server/ws", session2)
            await client2.connect()
            ready2_evt = asyncio.Event()
            listen2 = asyncio.create_task(client2.start_listening(ready2_evt))
            await ready2_evt.wait()
            t0 = time.monotonic()
            try:  # direct PASE to the bridge's address: does a closed window refuse fast?
                await client2.commission_on_network(20202021, "fd5e:1::1")
                refused_ip = "NOT refused"
            except Exception as err:  # noqa: BLE001
                refused_ip = f"{type(err).__name__}: {err}"
            log("pairing_window_closed_by_ip", result=refused_ip, seconds=round(time.monotonic() - t0, 2))
            if os.environ.get("E2E_CODE_REFUSAL", "1") == "1":  # via mDNS discovery: only fails after 30 s
                t0 = time.monotonic()
                try:
                    await client2.commission_with_code(ready["manualPairingCode"], network_only=True)
                    refused = "NOT refused"
                except Exception as err:  # noqa: BLE001
                    refused = f"{type(err).__name__}: {err}"
                log("pairing_window_closed", result=refused, seconds=round(time.monotonic() - t0, 2))
            win = await bridge.send({"op": "open_window", "timeout_s": 120})
            t0 = time.monotonic()
            nd2 = await client2.commission_with_code(win["manualPairingCode"], network_only=True)
            log("second_fabric_commissioned", node_id=nd2.node_id, seconds=round(time.monotonic() - t0, 2))
            await bridge.wait_for(lambda m: m.get("event") == "window" and m.get("state") == "closed", 10)
            fabrics = (await bridge.send({"op": "fabrics"}))["fabrics"]
            log("fabrics_bridge_side", fabrics=fabrics)
            log("fabrics_controller_side", fabrics=[(f.fabric_id, f.fabric_index, f.vendor_id)
                                                    for f in await client.get_matter_fabrics(node_id)])
            second = [f for f in fabrics if f["fabricId"] == "2"][0]
            after = (await bridge.send({"op": "remove_fabric", "fabricIndex": second["fabricIndex"]}))["fabrics"]
            await asyncio.sleep(1)
            log("fabric_removed", bridge_side=after,
                controller_side=[(f.fabric_id, f.fabric_index) for f in await client.get_matter_fabrics(node_id)])
            # controller 1 still in control
            n = len(bridge.events)
            await client.send_device_command(node_id, ep_of["plug-1"], Clusters.OnOff.Commands.On())
            _, ev = await bridge.wait_for(lambda m: m.get("event") == "command", 5, since=n)
            log("fabric1_still_works", bridge_event=ev)
            await client2.disconnect()
            listen2.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listen2
            await session2.close()

        # --- restart the bridge with the same storage (clean stop, then SIGKILL); does the controller come back
        # by itself, without re-commissioning, and how fast?
        avail: asyncio.Queue[tuple[float, bool]] = asyncio.Queue()

        def on_node(_evt: EventType, data: Any) -> None:
            avail.put_nowait((time.monotonic(), data.available))

        unsub_node = client.subscribe_events(on_node, EventType.NODE_UPDATED, node_id)
        unsub2 = client.subscribe_events(on_attr, EventType.ATTRIBUTE_UPDATED, node_id, path)
        subs_file = bridge.storage / "ores-bridge" / "root.subscriptions.subscriptions"
        modes = [m for m in os.environ.get("E2E_RESTARTS", "clean,sigkill").split(",") if m]
        for k, mode in enumerate(modes):
            log("restart_begin", mode=mode, in_memory=(await bridge.send({"op": "x_subscriptions"}))["subscriptions"],
                persisted=subs_file.read_text()[:300] if subs_file.exists() else None)
            if mode == "sigkill":
                await bridge.kill9()
            else:
                log("clean_stop", rc=await bridge.stop())
            t_kill = time.monotonic()
            await asyncio.sleep(1.0)  # a supervisor's restart backoff
            t0 = time.monotonic()
            ready2 = await start_bridge(bridge)
            log("bridge_restarted", mode=mode, seconds=round(time.monotonic() - t0, 2),
                commissioned=ready2["commissioned"], fabrics=ready2["fabrics"])
            while not got.empty():
                got.get_nowait()
            value = 777000 + k
            t_push = time.monotonic()
            await bridge.send({"op": "update", "id": "pv-1", "values": {"electricalPowerMeasurement": {"activePower": value}}})
            deadline = t_push + 150
            seen = None
            while time.monotonic() < deadline:
                try:
                    t_evt, v = await asyncio.wait_for(got.get(), deadline - time.monotonic())
                except TimeoutError:
                    break
                if v == value:
                    seen = t_evt
                    break
            t_avail = None
            node_obj = client.get_node(node_id)
            deadline = time.monotonic() + 120
            while not node_obj.available and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # the client updates node.available from node_updated events
            if node_obj.available:
                t_avail = time.monotonic()
            avail_events = []
            while not avail.empty():
                t, a = avail.get_nowait()
                avail_events.append({"t_after_stop_s": round(t - t_kill, 2), "available": a})
            log("reconnect", mode=mode, value_seen=seen is not None,
                available_after_stop_s=round(t_avail - t_kill, 2) if t_avail else None,
                after_restart_s=round(seen - t_push, 2) if seen else None,
                after_stop_s=round(seen - t_kill, 2) if seen else None, node_events=avail_events,
                nodes=len(client.get_nodes()))
        unsub2()
        unsub_node()
        # command path after the restart
        n = len(bridge.events)
        await client.send_device_command(node_id, ep_of["plug-1"], Clusters.OnOff.Commands.Toggle())
        _, ev = await bridge.wait_for(lambda m: m.get("event") == "command", 10, since=n)
        log("command_after_restart", bridge_event=ev)

        await client.disconnect()
        listen_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listen_task
        await session.close()
        log("bridge_clean_stop", rc=await bridge.stop())
    finally:
        if bridge.proc and bridge.proc.returncode is None:
            bridge.proc.kill()
            await bridge.proc.wait()
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), 10)
            except TimeoutError:
                os.killpg(p.pid, signal.SIGKILL)
                await p.wait()
        (work / "results.json").write_text(json.dumps(RESULTS, indent=1, default=str))


if __name__ == "__main__":
    asyncio.run(main())
