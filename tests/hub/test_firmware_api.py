"""End-to-end tests of ``/device/firmware/update`` on the real hub, with real signatures and real ORES-HTTP
simulated modules running ``SimFirmware``.

Uploads go over HTTP as multipart bodies (and, for the cut-off cases, as raw bytes on a socket); each attack
of the firmware issue is refused with its precise code and leaves nothing in the firmware directory, and no
refused release ever reaches a module (the simulated firmware records every ``begin``).  The restart test
runs the hub as a real process and kills it with SIGKILL mid-rollout, twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devices.model import DeviceKind
from devices.sim.base import StaticModule
from devices.sim.firmware import SimFirmware, SimFirmwareError
from devices.sim.ores_http_server import OresHttpSimServer, start_ores_http_server
from firmware.manifest import public_key_b64
from tests.firmware import Vendor, document, sign_document
from tests.hub.conftest import Hub, make_module

VENDOR = "Test Vendor"
INVERTER = "T-microinverter"
BASE = "/device/firmware/update"
IMAGE = os.urandom(200_000)
DEADLINE_S = 60.0
REPO = Path(__file__).resolve().parents[2]


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordingFirmware(SimFirmware):
    """``SimFirmware`` that records every ``begin`` and can stop taking chunks (as if the link were down)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.begin_calls = 0
        self.begins: list[int] = []
        self.accepted = 0
        self.hold_after: int | None = None
        self.holding = False

    def begin(self, manifest_bytes: bytes, signature: bytes | str) -> int:
        self.begin_calls += 1
        offset = super().begin(manifest_bytes, signature)
        self.begins.append(offset)
        return offset

    def chunk(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        if self.hold_after is not None and self.accepted >= self.hold_after:
            self.holding = True
            raise SimFirmwareError("rebooting", "not answering (held by the test)")
        received = super().chunk(offset, data)
        self.accepted += len(data)
        return received


async def until(condition: Callable[[], object], deadline_s: float = DEADLINE_S) -> None:
    end = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > end:
            pytest.fail("condition not reached in time")
        await asyncio.sleep(0.02)


def release(vendor: Vendor, image: bytes = IMAGE, **overrides: Any) -> tuple[bytes, str]:
    overrides.setdefault("models", [INVERTER])
    overrides.setdefault("version", "1.1.0")
    return sign_document(document(vendor, image, **overrides), vendor)


def form(manifest: bytes, signature: str | bytes, image: bytes) -> aiohttp.FormData:
    data = aiohttp.FormData()
    data.add_field("manifest", manifest, filename="fw.manifest.json", content_type="application/json")
    data.add_field("signature", signature)
    data.add_field("image", image, filename="fw.bin", content_type="application/octet-stream")
    return data


async def upload(
    hub: Hub, manifest: bytes, sig: str | bytes, image: bytes, *, token: str | None = None
) -> tuple[int, Any]:
    token = hub.token if token is None else token
    async with hub.session.post(
        hub.url(BASE), data=form(manifest, sig, image), headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        return resp.status, await resp.json()


@pytest.fixture(scope="module")
def vendor() -> Vendor:
    return Vendor.new(VENDOR)


class Sims:
    def __init__(self, vendor: Vendor) -> None:
        self.vendor = vendor
        self.servers: list[OresHttpSimServer] = []

    async def start(
        self, serial: str, *, clock: ManualClock | None = None, port: int = 0, **kwargs: Any
    ) -> tuple[OresHttpSimServer, RecordingFirmware]:
        module: StaticModule = make_module(DeviceKind.MICROINVERTER, serial)
        firmware = RecordingFirmware(
            VENDOR,
            INVERTER,
            "1.0.0",
            trusted=self.vendor.trust(),
            reboot_s=0.1 if clock is None else 60.0,
            clock=clock or time.monotonic,
            **kwargs,
        )
        server = await start_ores_http_server(module, firmware=firmware, port=port)
        self.servers.append(server)
        return server, firmware

    async def stop(self) -> None:
        for server in self.servers:
            await server.stop()


@pytest.fixture
async def sims(vendor: Vendor) -> AsyncIterator[Sims]:
    s = Sims(vendor)
    yield s
    await s.stop()


@pytest.fixture
async def fw_hub(hub: Hub, vendor: Vendor) -> Hub:
    status, body = await hub.request(
        "POST",
        "/hub/trust",
        json_body={
            "vendor": VENDOR,
            "public_key": public_key_b64(vendor.private_key.public_key()),
            "purposes": ["firmware"],
        },
    )
    assert status == 201, body
    return hub


async def register(hub: Hub, server: OresHttpSimServer) -> str:
    status, body = await hub.request("POST", "/device/register", json_body={"address": str(server.address)})
    assert status == 201, body
    return str(body["device_id"])


def leftovers(hub: Hub) -> set[str]:
    directory = hub.ctx.config.data_dir / "firmware"
    return {p.name for p in directory.iterdir() if p.name != "rollouts.json"}


async def wait_rollout(hub: Hub, rollout_id: str) -> dict[str, Any]:
    body: dict[str, Any] = {}

    async def done() -> bool:
        nonlocal body
        status, body = await hub.request("GET", f"{BASE}/rollouts/{rollout_id}")
        assert status == 200, body
        return bool(body["state"] != "running")

    end = time.monotonic() + DEADLINE_S
    while not await done():
        if time.monotonic() > end:
            pytest.fail(f"rollout did not finish: {body}")
        await asyncio.sleep(0.05)
    return body


# ----------------------------------------------------------------------------------------------- the happy path


async def test_upload_and_rollout_to_three_modules_end_to_end(
    fw_hub: Hub, sims: Sims, vendor: Vendor
) -> None:
    hub = fw_hub
    modules = [await sims.start(f"MI-{n}") for n in range(3)]
    device_ids = [await register(hub, server) for server, _ in modules]

    events: list[tuple[str, dict[str, Any]]] = []
    stream_open = asyncio.Event()

    async def listen() -> None:
        async with hub.session.get(hub.url("/app/monitor/stream"), headers=hub.headers()) as resp:
            stream_open.set()
            name = ""
            async for raw in resp.content:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: ") and name.startswith("firmware."):
                    events.append((name, json.loads(line[6:])))

    listener = asyncio.create_task(listen())
    try:
        await stream_open.wait()
        manifest, sig = release(vendor)
        status, stored = await upload(hub, manifest, sig, IMAGE)
        assert status == 201, stored
        sha = hashlib.sha256(IMAGE).hexdigest()
        assert stored["sha256"] == sha and stored["version"] == "1.1.0" and stored["trusted"]
        status, again = await upload(hub, manifest, sig, IMAGE)
        assert status == 200 and again["sha256"] == sha

        status, started = await hub.request(
            "POST",
            f"{BASE}/rollouts",
            json_body={"sha256": sha, "model": INVERTER, "batch_size": 2, "health_window_s": 0.2},
        )
        assert status == 202, started
        assert [m["status"] for m in started["modules"]] == ["queued"] * 3
        final = await wait_rollout(hub, started["rollout_id"])
        await until(lambda: any(n == "firmware.rollout" and d["state"] != "running" for n, d in events))
    finally:
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener

    assert final["state"] == "succeeded", final
    assert [m["status"] for m in final["modules"]] == ["healthy"] * 3
    assert [m["canary"] for m in final["modules"]] == [True, False, False]
    for _, firmware in modules:
        assert firmware.running_version == "1.1.0" and firmware.begins == [0]
    status, listing = await hub.request("GET", "/device/register")
    versions = {d["device_id"]: d["identity"]["firmware_version"] for d in listing["devices"]}
    assert all(versions[d] == "1.1.0" for d in device_ids)
    # Live in the push stream: each module went through the statuses in order.
    seen = {
        d: [e["status"] for n, e in events if n == "firmware.status" and e["device_id"] == d]
        for d in device_ids
    }
    for statuses in seen.values():
        order = ["transferring", "verifying", "installing", "rebooting", "healthy"]
        firsts = [statuses.index(s) for s in order]
        assert firsts == sorted(firsts), statuses
    canary_done = next(
        i
        for i, (n, e) in enumerate(events)
        if e.get("device_id") == device_ids[0] and e.get("status") == "healthy"
    )
    others_start = [
        i
        for i, (n, e) in enumerate(events)
        if e.get("device_id") in device_ids[1:] and e.get("status") == "transferring"
    ]
    assert min(others_start) > canary_done

    status, catalogue = await hub.request("GET", BASE, token=await hub.token_for("viewer"))
    assert status == 200 and [i["sha256"] for i in catalogue["images"]] == [sha]
    assert catalogue["rollouts"][0]["state"] == "succeeded"


async def test_roles_and_api_errors(fw_hub: Hub, sims: Sims, vendor: Vendor) -> None:
    hub = fw_hub
    server, firmware = await sims.start("MI-1")
    device_id = await register(hub, server)
    viewer = await hub.token_for("viewer")
    homeowner = await hub.token_for("homeowner")
    manifest, sig = release(vendor)
    status, body = await upload(hub, manifest, sig, IMAGE, token=homeowner)
    assert status == 403, body
    status, stored = await upload(hub, manifest, sig, IMAGE)
    assert status == 201
    sha = stored["sha256"]
    start = {"sha256": sha, "device_ids": [device_id], "health_window_s": 0.2}
    assert (await hub.request("POST", f"{BASE}/rollouts", token=viewer, json_body=start))[0] == 403
    status, body = await hub.request("POST", f"{BASE}/rollouts", json_body={**start, "sha256": "0" * 64})
    assert status == 404 and body["error"]["code"] == "image_not_found"
    status, body = await hub.request(
        "POST", f"{BASE}/rollouts", json_body={**start, "device_ids": ["nobody"]}
    )
    assert status == 404 and body["error"]["code"] == "not_found"
    status, body = await hub.request("POST", f"{BASE}/rollouts", json_body={**start, "model": INVERTER})
    assert status == 422 and body["error"]["code"] == "invalid_body"
    status, body = await hub.request("GET", f"{BASE}/rollouts/nope")
    assert status == 404
    status, body = await hub.request("GET", f"{BASE}/images/{sha}", token=viewer)
    assert status == 200 and body["sha256"] == sha and body["in_use"] is False
    status, body = await hub.request("DELETE", f"{BASE}/images/{sha}", token=viewer)
    assert status == 403
    status, body = await hub.request("DELETE", f"{BASE}/images/{sha}")
    assert status == 200 and body == {"sha256": sha, "deleted": True}
    assert (await hub.request("GET", f"{BASE}/images/{sha}"))[0] == 404
    assert leftovers(hub) == set() and firmware.begin_calls == 0
    status, body = await hub.request("POST", f"{BASE}/rollouts/nope/cancel")
    assert status == 404


async def test_a_running_rollout_can_be_cancelled_and_keeps_its_image(
    fw_hub: Hub, sims: Sims, vendor: Vendor
) -> None:
    hub = fw_hub
    clock = ManualClock()
    held = await sims.start("MI-1", clock=clock)
    other = await sims.start("MI-2")
    ids = [await register(hub, held[0]), await register(hub, other[0])]
    status, stored = await upload(hub, *release(vendor), IMAGE)
    assert status == 201
    status, started = await hub.request(
        "POST",
        f"{BASE}/rollouts",
        json_body={"sha256": stored["sha256"], "device_ids": ids, "health_window_s": 0.2},
    )
    assert status == 202
    await until(lambda: held[1].rebooting)
    status, body = await hub.request("DELETE", f"{BASE}/images/{stored['sha256']}")
    assert status == 409 and body["error"]["code"] == "in_use"
    status, body = await hub.request("POST", f"{BASE}/rollouts/{started['rollout_id']}/cancel")
    assert status == 200 and body["modules"][1]["reason"]["code"] == "cancelled"
    clock.now += 120.0
    final = await wait_rollout(hub, started["rollout_id"])
    assert final["state"] == "aborted"
    assert [m["status"] for m in final["modules"]] == ["healthy", "failed"]
    assert other[1].begin_calls == 0


# ----------------------------------------------------------------------------------------------- attacks


@pytest.mark.parametrize(
    ("attack", "status", "code"),
    [
        ("flipped_byte", 422, "hash_mismatch"),
        ("untrusted_key", 422, "untrusted_key"),
        ("tampered_manifest", 422, "bad_signature"),
        ("truncated", 422, "size_mismatch"),
        ("longer_than_declared", 413, "size_mismatch"),
        ("over_the_limit", 413, "too_large"),
        ("newer_hub", 422, "hub_too_old"),
    ],
)
async def test_refused_uploads_leave_nothing_and_reach_no_module(
    fw_hub: Hub, sims: Sims, vendor: Vendor, *, attack: str, status: int, code: str
) -> None:
    hub = fw_hub
    server, firmware = await sims.start("MI-1")
    await register(hub, server)
    manifest, sig = release(vendor)
    image = IMAGE
    if attack == "flipped_byte":
        flipped = bytearray(IMAGE)
        flipped[len(IMAGE) // 2] ^= 0x40
        image = bytes(flipped)
    elif attack == "untrusted_key":
        manifest, sig = release(Vendor.new(VENDOR))
    elif attack == "tampered_manifest":
        manifest = manifest.replace(b'"1.1.0"', b'"1.9.0"')
    elif attack == "truncated":
        image = IMAGE[:-1000]
    elif attack == "longer_than_declared":
        image = IMAGE + b"\0" * 100_000
    elif attack == "over_the_limit":
        hub.ctx.firmware.max_image_bytes = 100_000
    elif attack == "newer_hub":
        manifest, sig = release(vendor, min_hub_version="99.0.0")
    got, body = await upload(hub, manifest, sig, image)
    assert (got, body["error"]["code"]) == (status, code), body
    assert leftovers(hub) == set()
    assert len(hub.ctx.firmware) == 0
    assert firmware.begin_calls == 0


async def test_another_models_image_and_a_downgrade_are_refused_at_rollout(
    fw_hub: Hub, sims: Sims, vendor: Vendor
) -> None:
    hub = fw_hub
    server, firmware = await sims.start("MI-1")
    device_id = await register(hub, server)
    other_model = os.urandom(3000)
    status, stored = await upload(
        hub,
        *release(vendor, other_model, models=["T-energystorage"]),
        other_model,
    )
    assert status == 201
    status, body = await hub.request(
        "POST", f"{BASE}/rollouts", json_body={"sha256": stored["sha256"], "device_ids": [device_id]}
    )
    assert status == 422 and body["error"]["code"] == "wrong_model", body
    assert body["error"]["details"][0]["device_id"] == device_id
    older = os.urandom(3000)
    status, stored = await upload(hub, *release(vendor, older, version="0.9.0"), older)
    assert status == 201
    status, body = await hub.request(
        "POST", f"{BASE}/rollouts", json_body={"sha256": stored["sha256"], "model": INVERTER}
    )
    assert status == 202  # by model: the module that runs a newer version is listed, not touched
    final = await wait_rollout(hub, body["rollout_id"])
    assert final["modules"][0]["status"] == "failed" and final["modules"][0]["reason"]["code"] == "downgrade"
    assert firmware.begin_calls == 0


async def test_a_removed_key_is_refused_at_rollout_time(fw_hub: Hub, sims: Sims, vendor: Vendor) -> None:
    hub = fw_hub
    server, firmware = await sims.start("MI-1")
    device_id = await register(hub, server)
    status, stored = await upload(hub, *release(vendor), IMAGE)
    assert status == 201
    assert (await hub.request("DELETE", f"/hub/trust/{vendor.key_id}"))[0] == 200
    status, image = await hub.request("GET", f"{BASE}/images/{stored['sha256']}")
    assert image["trusted"] is False and image["refusal"]["code"] == "untrusted_key"
    status, body = await hub.request(
        "POST", f"{BASE}/rollouts", json_body={"sha256": stored["sha256"], "device_ids": [device_id]}
    )
    assert status == 422 and body["error"]["code"] == "untrusted_key"
    assert firmware.begin_calls == 0


async def test_an_image_that_boots_unhealthy_is_rolled_back(fw_hub: Hub, sims: Sims, vendor: Vendor) -> None:
    hub = fw_hub
    modules = [await sims.start(f"MI-{n}", fail_versions=frozenset({"1.1.0"})) for n in range(2)]
    ids = [await register(hub, server) for server, _ in modules]
    status, stored = await upload(hub, *release(vendor), IMAGE)
    status, started = await hub.request(
        "POST",
        f"{BASE}/rollouts",
        json_body={"sha256": stored["sha256"], "device_ids": ids, "health_window_s": 0.3},
    )
    assert status == 202
    final = await wait_rollout(hub, started["rollout_id"])
    assert final["state"] == "aborted" and final["reason"]["code"] == "aborted"
    canary, rest = final["modules"]
    assert canary["status"] == "rolled_back" and canary["reason"]["code"] == "unhealthy"
    assert rest["status"] == "failed" and rest["reason"]["code"] == "aborted"
    assert modules[0][1].running_version == "1.0.0" and modules[1][1].begin_calls == 0


# ----------------------------------------------------------------------------------------------- raw uploads


def _multipart_head(boundary: str, manifest: bytes, sig: str) -> bytes:
    return (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="manifest"; filename="m.json"\r\n'
            "Content-Type: application/json\r\n\r\n"
        ).encode()
        + manifest
        + (
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="signature"\r\n\r\n{sig}'
            f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="fw.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
    )


async def _open(hub: Hub, *, length: int | None) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    reader, writer = await asyncio.open_connection(hub.server.host, hub.server.port)
    boundary = "b0undary1234"
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    writer.write(
        (
            f"POST {BASE} HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {hub.token}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n{framing}\r\n\r\n"
        ).encode()
    )
    return reader, writer, boundary


async def test_an_endless_upload_is_cut_off_once_past_its_size(fw_hub: Hub, vendor: Vendor) -> None:
    hub = fw_hub
    manifest, sig = release(vendor)
    reader, writer, boundary = await _open(hub, length=None)
    total = 512 * 1024 * 1024
    sent = 0
    block = os.urandom(64 * 1024)

    def chunk(data: bytes) -> bytes:
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    async def send() -> None:
        nonlocal sent
        writer.write(chunk(_multipart_head(boundary, manifest, sig)))
        while sent < total:
            writer.write(chunk(block))
            sent += len(block)
            await writer.drain()

    sender = asyncio.create_task(send())
    try:
        status_line = await asyncio.wait_for(reader.readline(), DEADLINE_S)
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sender
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert status_line.split()[1] == b"413", status_line
    assert sent < total // 8  # the hub answered long before the client was done
    await until(lambda: leftovers(hub) == set())


async def test_an_oversized_content_length_is_refused_before_reading(fw_hub: Hub) -> None:
    hub = fw_hub
    reader, writer, _ = await _open(hub, length=hub.ctx.firmware.max_image_bytes * 2)
    try:
        head = await asyncio.wait_for(reader.read(4096), DEADLINE_S)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert head.split()[1] == b"413" and b'"too_large"' in head


async def test_an_upload_cut_off_by_the_client_leaves_nothing(fw_hub: Hub, vendor: Vendor) -> None:
    hub = fw_hub
    manifest, sig = release(vendor)
    head = _multipart_head("b0undary1234", manifest, sig)
    _, writer, _ = await _open(hub, length=len(head) + len(IMAGE) + 100)
    writer.write(head + IMAGE[:100_000])
    await writer.drain()
    directory = hub.ctx.config.data_dir / "firmware"
    await until(lambda: any(p.name.startswith(".upload-") for p in directory.iterdir()))
    writer.close()  # the connection drops mid-image
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()
    await until(lambda: leftovers(hub) == set())
    assert len(hub.ctx.firmware) == 0


async def test_the_upload_is_documented_as_multipart(hub: Hub) -> None:
    status, doc = await hub.request("GET", "/openapi.json")
    assert status == 200
    post = doc["paths"][BASE]["post"]
    schema = post["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["required"] == ["manifest", "signature", "image"]
    assert schema["properties"]["image"]["format"] == "binary"
    assert {"201", "200", "413", "422"} <= set(post["responses"]) and post["x-required-role"] == "installer"
    assert "202" in doc["paths"][f"{BASE}/rollouts"]["post"]["responses"]


# ----------------------------------------------------------------------------------------------- hub killed


class HubProcess:
    """``ores-hub`` in its own process on a loopback port."""

    def __init__(self, data_dir: Path, log: Path) -> None:
        self.data_dir = data_dir
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.code: str | None = None

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONASYNCIODEBUG"}
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "hub.cli",
                "--port",
                "0",
                "--data-dir",
                str(self.data_dir),
                "--no-discovery",
                "--device-network",
                "127.0.0.0/8",
                "--log-level",
                "WARNING",
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                cwd=REPO,
                env=env,
            )
        assert self.proc.stdout is not None
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.proc.stdout.readline(), DEADLINE_S)
            if not raw:
                raise AssertionError(f"hub exited: {''.join(lines)}{self.log.read_text()}")
            line = raw.decode()
            lines.append(line)
            if m := re.search(r"listening on (http://\S+)", line):
                self.url = m.group(1)
            if m := re.search(r"Pairing code: (\S+)", line):
                self.code = m.group(1)
            if self.url and ("Pairing code" in line or "Paired clients exist" in line):
                return

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
            await self.proc.wait()


@pytest.mark.slow
async def test_hub_killed_mid_rollout_reports_the_true_state_and_resumes(
    tmp_path: Path, sims: Sims, vendor: Vendor
) -> None:
    data_dir = tmp_path / "hub"
    rollouts_file = data_dir / "firmware" / "rollouts.json"
    hub = HubProcess(data_dir, tmp_path / "hub.log")
    clock = ManualClock()
    first = await sims.start("MI-1")
    second = await sims.start("MI-2", clock=clock)
    third = await sims.start("MI-3")
    first[1].hold_after = 2 * 64 * 1024
    session = aiohttp.ClientSession()

    async def call(method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        async with session.request(method, hub.url + path, json=body, headers=headers, **kw) as resp:
            return resp.status, await resp.json()

    def saved(device_id: str) -> str:
        doc = json.loads(rollouts_file.read_bytes())
        return str(next(m["status"] for m in doc["rollouts"][0]["modules"] if m["device_id"] == device_id))

    try:
        await hub.start()
        async with session.post(hub.url + "/auth/pair", json={"code": hub.code, "name": "t"}) as resp:
            headers = {"Authorization": f"Bearer {(await resp.json())['token']}"}
        status, _ = await call(
            "POST",
            "/hub/trust",
            {
                "vendor": VENDOR,
                "public_key": public_key_b64(vendor.private_key.public_key()),
                "purposes": ["firmware"],
            },
        )
        assert status == 201
        ids = []
        for server, _ in (first, second, third):
            status, body = await call("POST", "/device/register", {"address": str(server.address)})
            assert status == 201, body
            ids.append(body["device_id"])
        status, stored = await call("POST", BASE, data=form(*release(vendor), IMAGE))
        assert status == 201, stored
        status, rollout = await call(
            "POST",
            f"{BASE}/rollouts",
            {"sha256": stored["sha256"], "device_ids": ids, "batch_size": 2, "health_window_s": 0.2},
        )
        assert status == 202, rollout
        rid = rollout["rollout_id"]

        # Kill 1: the canary is mid-transfer.
        await until(lambda: first[1].holding)
        await hub.kill()
        assert saved(ids[0]) == "transferring" and first[1].running_version == "1.0.0"
        first[1].hold_after = None
        await hub.start()
        # Kill 2: the second module is rebooting into the new image (its reboot is held).
        await until(lambda: second[1].rebooting)
        await until(lambda: saved(ids[1]) in ("installing", "rebooting"))
        await hub.kill()
        assert saved(ids[0]) == "healthy"
        await hub.start()
        # The restarted hub asks the module, and says what it found.
        end = time.monotonic() + DEADLINE_S
        while True:
            status, body = await call("GET", f"{BASE}/rollouts/{rid}")
            mod = body["modules"][1]
            if mod["status"] == "rebooting" and "not answering" in (mod["detail"] or ""):
                break
            assert time.monotonic() < end, body
            await asyncio.sleep(0.05)
        clock.now += 120.0  # the module finishes its reboot
        end = time.monotonic() + DEADLINE_S
        while body["state"] == "running":
            assert time.monotonic() < end, body
            await asyncio.sleep(0.05)
            status, body = await call("GET", f"{BASE}/rollouts/{rid}")
    finally:
        await hub.kill()
        await session.close()

    assert body["state"] == "succeeded", body
    assert [m["status"] for m in body["modules"]] == ["healthy"] * 3
    resumed = first[1].begins[1:]  # every begin after the first, also the killed hub's retries
    assert first[1].begins[0] == 0 and resumed and set(resumed) == {2 * 64 * 1024}  # resumed, never from 0
    assert first[1].accepted == len(IMAGE)
    assert second[1].boot_count == 1 and second[1].begins == [0]  # installed once, not sent again
    assert all(fw.running_version == "1.1.0" for _, fw in (first, second, third))
