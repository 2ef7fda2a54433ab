"""The README's first command, for real: ``ores-hub --demo`` in its own process.

The demo must start the simulated home, register every module by itself, serve consistent live values, stop
cleanly on SIGTERM, and come back after a restart (and after SIGKILL) with the same modules, no duplicates
and the paired token still valid.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DEMO_MODULES = 8  # 3 microinverters, 1 battery, 1 meter, 3 smart plugs


class HubProcess:
    def __init__(self, data_dir: Path, *extra: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hub.cli", "--port", "0", "--data-dir", str(data_dir), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        self.stdout: IO[str] = self.proc.stdout
        self.lines: list[str] = []
        self.base = self.expect(r"listening on (http://\S+)").group(1)

    def expect(self, pattern: str) -> re.Match[str]:
        regex = re.compile(pattern)
        for line in self.stdout:
            self.lines.append(line)
            m = regex.search(line)
            if m:
                return m
        raise AssertionError(f"hub exited before printing {pattern!r}:\n{''.join(self.lines)}")

    def call(self, path: str, token: str | None = None, body: Any = None, method: str = "GET") -> Any:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.load(resp)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout=30)
        finally:
            self.stdout.close()
        return rc


@pytest.fixture
def procs() -> Iterator[list[HubProcess]]:
    started: list[HubProcess] = []
    yield started
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()
        p.stdout.close()


def wait_for(cond: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_demo_onboards_the_simulated_home_and_survives_restarts(
    tmp_path: Path, procs: list[HubProcess]
) -> None:
    data = tmp_path / "demo"
    hub = HubProcess(data, "--demo")
    procs.append(hub)
    code = hub.expect(r"Pairing code: (\d{4}-\d{4})").group(1)
    count = int(hub.expect(r"Onboarding (\d+) simulated modules").group(1))
    assert count == DEMO_MODULES
    for _ in range(count):
        hub.expect(r"registered\s+\w+")
    token = hub.call("/auth/pair", body={"code": code, "name": "test"}, method="POST")["token"]

    def all_online() -> Any:
        monitor = hub.call("/app/monitor", token)
        return monitor if all(d["online"] for d in monitor["devices"]) else None

    monitor = wait_for(all_online)
    kinds = sorted(d["kind"] for d in monitor["devices"])
    assert (
        kinds
        == ["energystorage", "meter", "microinverter", "microinverter", "microinverter"] + ["smartplug"] * 3
    )
    assert {d["protocol"] for d in monitor["devices"]} == {"sunspec-modbus", "ores-http"}
    site = monitor["site"]
    assert site["grid_ok"] is True
    # The home's balance holds with the hub's sign convention: load = pv + battery + grid.
    assert site["load_w"] == pytest.approx(site["pv_w"] + site["battery_w"] + site["grid_w"])
    battery = next(d for d in monitor["devices"] if d["kind"] == "energystorage")
    assert 0 <= battery["telemetry"]["soc_pct"] <= 100
    ids = {d["device_id"] for d in monitor["devices"]}
    assert hub.stop() == 0

    # A restart re-registers the same modules at their new addresses: same ids, no duplicates, same token.
    hub2 = HubProcess(data, "--demo")
    procs.append(hub2)
    hub2.expect(r"Paired clients exist")
    for _ in range(DEMO_MODULES):
        hub2.expect(r"(?:registered|found)\s+\w+")
    listing = hub2.call("/device/register", token)
    assert {d["device_id"] for d in listing["devices"]} == ids
    assert len(listing["devices"]) == DEMO_MODULES
    # The ORES-HTTP modules proved their identity (and were provisioned again after their restart); the
    # SunSpec ones are registered by the demo's explicit approval, unauthenticated.
    by_protocol = {(d["protocol"], d["authenticated"]) for d in listing["devices"]}
    assert by_protocol == {("ores-http", True), ("sunspec-modbus", False)}

    def all_online_again() -> Any:
        monitor = hub2.call("/app/monitor", token)
        return all(d["online"] for d in monitor["devices"])

    wait_for(all_online_again)
    security = hub2.call("/device/security/authenticate", token)
    assert all(d["provisioned"] for d in security["devices"] if d["protocol"] == "ores-http")

    # SIGKILL mid-flight: the registry survives; everything acknowledged is there after a restart.
    assert hub2.stop(signal.SIGKILL) == -signal.SIGKILL
    hub3 = HubProcess(data)
    procs.append(hub3)
    listing = hub3.call("/device/register", token)
    assert {d["device_id"] for d in listing["devices"]} == ids


def test_sigkill_during_registration_loses_no_acknowledged_module(
    tmp_path: Path, procs: list[HubProcess]
) -> None:
    data = tmp_path / "kill"
    hub = HubProcess(data, "--demo")
    procs.append(hub)
    hub.expect(r"Onboarding \d+ simulated modules")
    acked = [hub.expect(r"registered\s+\w+\s+(\S+)").group(1) for _ in range(3)]
    hub.proc.send_signal(signal.SIGKILL)
    hub.proc.wait()
    # Read what it printed before dying: every "registered" line is an acknowledged registration.
    for line in hub.stdout:
        m = re.search(r"registered\s+\w+\s+(\S+)", line)
        if m:
            acked.append(m.group(1))
    hub.stdout.close()
    json.loads((data / "registry.json").read_text())  # never torn
    hub2 = HubProcess(data)
    procs.append(hub2)
    code = hub2.expect(r"Pairing code: (\d{4}-\d{4})").group(1)
    token = hub2.call("/auth/pair", body={"code": code, "name": "t"}, method="POST")["token"]
    listing = hub2.call("/device/register", token)
    assert set(acked) <= {d["device_id"] for d in listing["devices"]}
    try:
        hub2.call("/device/register", "wrong-token")
    except urllib.error.HTTPError as err:
        assert err.code == 401
    else:
        raise AssertionError("a wrong token was accepted")


def test_demo_pushes_a_signed_update_end_to_end(tmp_path: Path, procs: list[HubProcess]) -> None:
    """The vendor tool signs an image with a demo vendor's key; the API uploads it and rolls it out to the
    simulated ORES-HTTP microinverter, which verifies it, reboots into it and stays healthy."""
    hub = HubProcess(tmp_path / "fw", "--demo")
    procs.append(hub)
    code = hub.expect(r"Pairing code: (\d{4}-\d{4})").group(1)
    for _ in range(DEMO_MODULES):
        hub.expect(r"registered\s+\w+")
    token = hub.call("/auth/pair", body={"code": code, "name": "installer"}, method="POST")["token"]
    target = next(
        d
        for d in hub.call("/device/register", token)["devices"]
        if d["protocol"] == "ores-http" and d["kind"] == "microinverter"
    )
    ident = target["identity"]
    key, image = tmp_path / "vendor.pem", tmp_path / "fw.bin"
    image.write_bytes(os.urandom(300_000))
    tool = [sys.executable, "-m", "firmware.tool"]
    subprocess.run(
        [*tool, "keygen", "--demo-vendor", ident["vendor"], "--out", str(key)],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [*tool, "sign", "--key", str(key), "--image", str(image), "--vendor", ident["vendor"],
         "--model", ident["model"], "--version", "9.0.0", "--out", str(tmp_path / "fw.manifest.json")],
        check=True, capture_output=True,
    )  # fmt: skip

    async def upload_and_roll_out() -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            form = aiohttp.FormData()
            form.add_field("manifest", (tmp_path / "fw.manifest.json").read_bytes(), filename="m.json")
            form.add_field("signature", (tmp_path / "fw.manifest.json.sig").read_bytes(), filename="m.sig")
            form.add_field(
                "image", image.read_bytes(), filename="fw.bin", content_type="application/octet-stream"
            )
            async with session.post(hub.base + "/device/firmware/update", data=form) as resp:
                stored = await resp.json()
                assert resp.status == 201, stored
            body = {"sha256": stored["sha256"], "device_ids": [target["device_id"]], "health_window_s": 2}
            async with session.post(hub.base + "/device/firmware/update/rollouts", json=body) as resp:
                rollout = await resp.json()
                assert resp.status == 202, rollout
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                url = f"{hub.base}/device/firmware/update/rollouts/{rollout['rollout_id']}"
                async with session.get(url) as resp:
                    state = await resp.json()
                if all(m["status"] in ("healthy", "failed", "rolled_back") for m in state["modules"]):
                    return dict(state)
                await asyncio.sleep(0.2)
            raise AssertionError(f"rollout did not finish: {state}")

    state = asyncio.run(upload_and_roll_out())
    assert [m["status"] for m in state["modules"]] == ["healthy"], state
    after = hub.call(f"/microinverter/status?device_id={target['device_id']}", token)["devices"][0]
    assert after["identity"]["firmware_version"] == "9.0.0"
