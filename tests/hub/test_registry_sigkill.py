"""Crash test for hub.registry: SIGKILL a real writer process at random moments, then check the file.

A child process (``_registry_writer.py``) writes through ``Registry`` and prints ``ACK`` after each write
returned.  The test reads its output until it has seen a random number of ACKs (or of ``BEGIN`` lines, to
kill in the middle of a write), kills it with SIGKILL and checks that the file still parses, that
``Registry`` opens it (cleaning any leftover temp file) and that every acknowledged write is in it.  All
rounds share one file, so recovery after a kill is itself exercised again and again.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest

from hub.registry import Registry

WRITER = Path(__file__).with_name("_registry_writer.py")
ROUNDS = 15
READ_DEADLINE_S = 15.0


def _load_writer() -> ModuleType:
    spec = importlib.util.spec_from_file_location("_registry_writer", WRITER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


writer = _load_writer()


@dataclass
class Seen:
    """What the parent has read from the children so far (across rounds)."""

    acked: dict[str, int] = field(default_factory=dict)  # device_id -> highest acknowledged seq
    temp_files_seen: int = 0  # rounds whose kill left a temp file (informative: depends on timing)


class LineReader:
    """Reads lines from a pipe with a deadline, so a stuck child fails the test instead of hanging it."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self._fd = proc.stdout.fileno()
        self._buf = b""
        self._proc = proc

    def lines(self, deadline: float) -> list[str]:
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail("writer produced no output in time")
            ready, _, _ = select.select([self._fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(self._fd, 65536)
            if not chunk:
                stderr = self._proc.stderr.read().decode() if self._proc.stderr else ""
                pytest.fail(f"writer exited early (rc={self._proc.wait()}): {stderr}")
            self._buf += chunk
        *complete, self._buf = self._buf.split(b"\n")
        return [line.decode() for line in complete]


def run_round(db: Path, mode: str, round_no: int, *, kill_on: str, target: int, seen: Seen) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(WRITER), str(db), mode, str(round_no)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        reader = LineReader(proc)
        deadline = time.monotonic() + READ_DEADLINE_S
        count = 0
        done = False
        while not done:
            for line in reader.lines(deadline):
                word, device_id, seq = line.split()
                assert word in ("BEGIN", "ACK"), line
                if word == "ACK":
                    seen.acked[device_id] = max(seen.acked.get(device_id, -1), int(seq))
                if word == kill_on:
                    count += 1
                    if count == target:
                        proc.send_signal(signal.SIGKILL)
                        done = True
                        break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    assert proc.returncode == -signal.SIGKILL


def check_file(db: Path, mode: str, seen: Seen) -> None:
    # 1. the file itself is complete JSON
    document = json.loads(db.read_bytes())
    assert isinstance(document.get("devices"), dict)

    # 2. the registry opens it and removes any temp file a killed write left behind
    seen.temp_files_seen += bool(list(db.parent.glob("*.tmp")))
    registry = Registry(db)
    try:
        assert list(db.parent.glob("*.tmp")) == []
        stored = {record.device_id: record for record in registry.all()}
        assert len(document["devices"]) == len(stored)

        # 3. every acknowledged write is there (a later, unacknowledged write of the same device may be too)
        for device_id, acked_seq in seen.acked.items():
            assert device_id in stored, f"acknowledged {device_id} is missing after SIGKILL ({mode})"
            stored_seq = writer.seq_of(stored[device_id].address)
            assert stored_seq >= acked_seq, (
                f"{device_id}: stored write {stored_seq} older than ack {acked_seq}"
            )
            if device_id.startswith("killtest_U"):
                assert stored_seq % writer.UPDATE_DEVICES == int(device_id[-1])
            else:
                assert stored_seq == acked_seq  # written once only

        # 4. every stored record is a complete record some child wrote (writes we did not read are allowed)
        for device_id, record in stored.items():
            assert device_id.startswith("killtest_"), device_id
            assert record.identity.device_id == device_id
    finally:
        registry.close()


@pytest.mark.slow
def test_sigkill_never_loses_an_acknowledged_write(tmp_path: Path) -> None:
    rng = random.Random(0x0E5)
    db = tmp_path / "registry.json"
    seen = Seen()
    modes = ["register", "update", "concurrent"]
    for round_no in range(ROUNDS):
        mode = modes[round_no % len(modes)]
        kill_on = "ACK" if rng.random() < 0.5 else "BEGIN"
        target = rng.randint(5, 120) if mode == "update" else rng.randint(1, 30)
        run_round(db, mode, round_no + 1, kill_on=kill_on, target=target, seen=seen)
        check_file(db, mode, seen)
    assert len(seen.acked) > ROUNDS  # the test did exercise many writes
    print("rounds leaving a temp file:", seen.temp_files_seen)
