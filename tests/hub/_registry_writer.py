"""Child process for the registry SIGKILL test: writes to a Registry and reports each acknowledged write.

Usage: ``python _registry_writer.py DB_PATH MODE ROUND``.  MODE is ``register`` (new modules one after
another), ``update`` (rapid re-registration of five modules at ever new addresses) or ``concurrent`` (new
modules in concurrent batches of eight).  Each write's sequence number is encoded in the address host, so
the parent can tell which write a stored record came from.  Before a write it prints
``BEGIN <device_id> <seq>``, after the write returned ``ACK <device_id> <seq>``, each line flushed at once.
It writes until it is killed (or a generous cap is reached).
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from devices.model import Capabilities, DeviceInfo, DeviceKind, Identity
from hub.registry import DeviceRecord, Registry

SEQ_PER_ROUND = 100_000
UPDATE_DEVICES = 5
CAP = 20_000


def address_for(seq: int) -> str:
    return f"http://10.{(seq >> 16) & 255}.{(seq >> 8) & 255}.{seq & 255}:8080/ores/v1"


def seq_of(address: str) -> int:
    host = address.split("//", 1)[1].split(":", 1)[0]
    _, a, b, c = (int(part) for part in host.split("."))
    return (a << 16) | (b << 8) | c


def record_for(serial: str, seq: int) -> DeviceRecord:
    info = DeviceInfo(
        DeviceKind.SMARTPLUG, Identity("KillTest", "P1", serial), Capabilities(rated_power_w=3000)
    )
    return DeviceRecord.from_info(info, address_for(seq), "ores-http")


def say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def write_one(registry: Registry, serial: str, seq: int) -> None:
    record = record_for(serial, seq)
    say(f"BEGIN {record.device_id} {seq}")
    await registry.upsert(record)
    say(f"ACK {record.device_id} {seq}")


async def main(path: Path, mode: str, round_no: int) -> None:
    registry = await Registry.open(path)
    base = round_no * SEQ_PER_ROUND
    try:
        if mode == "register":
            for i in range(CAP):
                await write_one(registry, f"R{round_no:02d}-{i:05d}", base + i)
        elif mode == "update":
            for i in range(CAP):
                await write_one(registry, f"U{i % UPDATE_DEVICES}", base + i)
        elif mode == "concurrent":
            for start in range(0, CAP, 8):
                await asyncio.gather(
                    *(
                        write_one(registry, f"C{round_no:02d}-{i:05d}", base + i)
                        for i in range(start, start + 8)
                    )
                )
        else:
            raise SystemExit(f"unknown mode {mode!r}")
    finally:
        registry.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
