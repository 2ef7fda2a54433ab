"""Telemetry history: raw samples plus 1-minute and 15-minute aggregates in SQLite, with retention.

``History.record`` is a cheap, non-blocking enqueue that the event loop may call hundreds of times a second;
it never touches SQLite.  One writer thread owns the only writing connection (WAL mode,
``synchronous=NORMAL``): it drains the queue in batches, inserting raw samples with ``executemany`` and
folding the batch into the current 1-minute and 15-minute buckets (upserts) in the same transaction, and
applies retention now and then.
Aggregates keep sums and counts, so averages stay exact however a bucket was split across batches; the energy
of a bucket is the sum of the energy-counter increases of its samples (a counter that goes down is taken as a
reset and contributes nothing).  Queries open their own read-only connections in worker threads, so readers
never wait for the writer.  ``flush`` waits until everything recorded before it is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypeAlias

from devices.model import OperatingState, Telemetry

__all__ = [
    "AGGREGATE_FIELDS",
    "AUTO_FIELDS",
    "RAW_FIELDS",
    "History",
    "HistoryError",
    "Resolution",
    "Retention",
    "pick_resolution",
]

_LOGGER = logging.getLogger(__name__)

Resolution: TypeAlias = Literal["raw", "1m", "15m", "auto"]

SCHEMA_VERSION: Final = 1

#: Fields of a raw row (besides ``ts``), named as in ``Telemetry``.
RAW_FIELDS: Final[tuple[str, ...]] = (
    "power_w",
    "energy_out_wh",
    "energy_in_wh",
    "voltage_v",
    "current_a",
    "frequency_hz",
    "temperature_c",
    "soc_pct",
    "soh_pct",
    "power_limit_pct",
    "on",
    "grid_ok",
    "state",
)

#: Fields of an aggregate row (besides ``ts``, the bucket start).  ``power_w``, ``soc_pct`` and
#: ``temperature_c`` are averages; ``energy_out_wh``/``energy_in_wh`` the last counter values in the bucket;
#: ``energy_out_delta_wh``/``energy_in_delta_wh`` the energy delivered/taken during the bucket.
AGGREGATE_FIELDS: Final[tuple[str, ...]] = (
    "count",
    "power_w",
    "power_w_min",
    "power_w_max",
    "soc_pct",
    "temperature_c",
    "energy_out_wh",
    "energy_in_wh",
    "energy_out_delta_wh",
    "energy_in_delta_wh",
)

#: Fields that mean the same at every resolution: the only ones ``resolution="auto"`` accepts.
AUTO_FIELDS: Final[tuple[str, ...]] = ("power_w", "soc_pct", "temperature_c", "energy_out_wh", "energy_in_wh")

_RAW_MAX_SPAN_S: Final = 2 * 3600.0
_MINUTE_MAX_SPAN_S: Final = 3 * 86400.0
_BUCKET_S: Final[dict[str, int]] = {"1m": 60, "15m": 900}
_AGG_TABLE: Final[dict[str, str]] = {"1m": "agg_1m", "15m": "agg_15m"}

# Stable on-disk codes for OperatingState (never renumber; add new states at new codes).
_STATE_CODES: Final[dict[OperatingState, int]] = {
    OperatingState.OFF: 0,
    OperatingState.STARTING: 1,
    OperatingState.RUNNING: 2,
    OperatingState.THROTTLED: 3,
    OperatingState.STANDBY: 4,
    OperatingState.FAULT: 5,
    OperatingState.OFFLINE: 6,
    OperatingState.UNKNOWN: 255,
}
_STATE_BY_CODE: Final[dict[int, OperatingState]] = {code: state for state, code in _STATE_CODES.items()}

# Raw-field name -> column name (``on`` is an SQL keyword).
_RAW_COLUMNS: Final[dict[str, str]] = {name: name for name in RAW_FIELDS} | {"on": "relay_on"}

# Aggregate-field name -> SQL expression over an aggregate table.
_AGG_EXPRESSIONS: Final[dict[str, str]] = {
    "count": "n",
    "power_w": "CASE WHEN power_n > 0 THEN power_sum / power_n END",
    "power_w_min": "power_min",
    "power_w_max": "power_max",
    "soc_pct": "CASE WHEN soc_n > 0 THEN soc_sum / soc_n END",
    "temperature_c": "CASE WHEN temp_n > 0 THEN temp_sum / temp_n END",
    "energy_out_wh": "out_last",
    "energy_in_wh": "in_last",
    "energy_out_delta_wh": "out_delta",
    "energy_in_delta_wh": "in_delta",
}

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS devices (
    id INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS samples (
    device INTEGER NOT NULL REFERENCES devices(id),
    ts REAL NOT NULL,
    power_w REAL, energy_out_wh REAL, energy_in_wh REAL, voltage_v REAL, current_a REAL,
    frequency_hz REAL, temperature_c REAL, soc_pct REAL, soh_pct REAL, power_limit_pct REAL,
    relay_on INTEGER, grid_ok INTEGER, state INTEGER
);
CREATE INDEX IF NOT EXISTS samples_device_ts ON samples(device, ts);
"""

_AGG_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS {table} (
    device INTEGER NOT NULL REFERENCES devices(id),
    bucket INTEGER NOT NULL,
    n INTEGER NOT NULL,
    power_sum REAL NOT NULL, power_n INTEGER NOT NULL, power_min REAL, power_max REAL,
    soc_sum REAL NOT NULL, soc_n INTEGER NOT NULL,
    temp_sum REAL NOT NULL, temp_n INTEGER NOT NULL,
    out_last REAL, in_last REAL, last_ts REAL NOT NULL,
    out_delta REAL NOT NULL, in_delta REAL NOT NULL,
    PRIMARY KEY (device, bucket)
) WITHOUT ROWID;
"""

_INSERT_SAMPLE: Final = (
    "INSERT INTO samples (device, ts, power_w, energy_out_wh, energy_in_wh, voltage_v, current_a,"
    " frequency_hz, temperature_c, soc_pct, soh_pct, power_limit_pct, relay_on, grid_ok, state)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

# Merge a batch's partial aggregate into a stored bucket.  In DO UPDATE, bare names are the stored row and
# every expression sees the stored values from before the update.
_UPSERT_AGG: Final = """
INSERT INTO {table} (device, bucket, n, power_sum, power_n, power_min, power_max, soc_sum, soc_n,
                     temp_sum, temp_n, out_last, in_last, last_ts, out_delta, in_delta)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (device, bucket) DO UPDATE SET
    n = n + excluded.n,
    power_sum = power_sum + excluded.power_sum,
    power_n = power_n + excluded.power_n,
    power_min = coalesce(min(power_min, excluded.power_min), power_min, excluded.power_min),
    power_max = coalesce(max(power_max, excluded.power_max), power_max, excluded.power_max),
    soc_sum = soc_sum + excluded.soc_sum,
    soc_n = soc_n + excluded.soc_n,
    temp_sum = temp_sum + excluded.temp_sum,
    temp_n = temp_n + excluded.temp_n,
    out_last = CASE WHEN excluded.last_ts >= last_ts THEN coalesce(excluded.out_last, out_last)
                    ELSE coalesce(out_last, excluded.out_last) END,
    in_last = CASE WHEN excluded.last_ts >= last_ts THEN coalesce(excluded.in_last, in_last)
                   ELSE coalesce(in_last, excluded.in_last) END,
    last_ts = max(last_ts, excluded.last_ts),
    out_delta = out_delta + excluded.out_delta,
    in_delta = in_delta + excluded.in_delta
"""


class HistoryError(Exception):
    """The history store cannot do what was asked (cannot open its file, not running, write failed)."""


@dataclass(frozen=True, slots=True)
class Retention:
    """How long each table keeps its rows, in seconds (raw 48 h, 1-minute 35 days, 15-minute 5 years)."""

    raw_s: float = 48 * 3600.0
    one_minute_s: float = 35 * 86400.0
    fifteen_minute_s: float = 5 * 365 * 86400.0

    def __post_init__(self) -> None:
        for name in ("raw_s", "one_minute_s", "fifteen_minute_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"retention {name} must be a positive number of seconds")


def pick_resolution(start: float, end: float) -> Literal["raw", "1m", "15m"]:
    """The resolution ``"auto"`` uses for a range: raw up to 2 h, 1 minute up to 3 days, else 15 minutes."""
    span = end - start
    if span <= _RAW_MAX_SPAN_S:
        return "raw"
    if span <= _MINUTE_MAX_SPAN_S:
        return "1m"
    return "15m"


# --------------------------------------------------------------------------------------------------------
# Writer-side helpers (run in the writer thread only)
# --------------------------------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    """A finite float, or None (NaN and infinities are not measurements)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _flag(value: Any) -> int | None:
    return None if value is None else int(bool(value))


class _Partial:
    """The part of one bucket contributed by one batch."""

    __slots__ = (
        "in_delta",
        "in_last",
        "last_ts",
        "n",
        "out_delta",
        "out_last",
        "power_max",
        "power_min",
        "power_n",
        "power_sum",
        "soc_n",
        "soc_sum",
        "temp_n",
        "temp_sum",
    )

    def __init__(self, ts: float) -> None:
        self.n = 0
        self.power_sum = 0.0
        self.power_n = 0
        self.power_min: float | None = None
        self.power_max: float | None = None
        self.soc_sum = 0.0
        self.soc_n = 0
        self.temp_sum = 0.0
        self.temp_n = 0
        self.out_last: float | None = None
        self.in_last: float | None = None
        self.last_ts = ts
        self.out_delta = 0.0
        self.in_delta = 0.0

    def add(
        self,
        *,
        ts: float,
        power: float | None,
        soc: float | None,
        temp: float | None,
        out: float | None,
        in_: float | None,
        out_delta: float,
        in_delta: float,
    ) -> None:
        self.n += 1
        if power is not None:
            self.power_sum += power
            self.power_n += 1
            self.power_min = power if self.power_min is None else min(self.power_min, power)
            self.power_max = power if self.power_max is None else max(self.power_max, power)
        if soc is not None:
            self.soc_sum += soc
            self.soc_n += 1
        if temp is not None:
            self.temp_sum += temp
            self.temp_n += 1
        if ts >= self.last_ts:
            self.last_ts = ts
            self.out_last = self.out_last if out is None else out
            self.in_last = self.in_last if in_ is None else in_
        else:  # an older sample only fills gaps
            self.out_last = out if self.out_last is None else self.out_last
            self.in_last = in_ if self.in_last is None else self.in_last
        self.out_delta += out_delta
        self.in_delta += in_delta

    def row(self, device: int, bucket: int) -> tuple[Any, ...]:
        return (
            device,
            bucket,
            self.n,
            self.power_sum,
            self.power_n,
            self.power_min,
            self.power_max,
            self.soc_sum,
            self.soc_n,
            self.temp_sum,
            self.temp_n,
            self.out_last,
            self.in_last,
            self.last_ts,
            self.out_delta,
            self.in_delta,
        )


# (ts, value) of the last counter reading seen for one device and one counter.
_Counter: TypeAlias = tuple[float, float]


def _counter_step(previous: _Counter | None, ts: float, value: float | None) -> tuple[float, _Counter | None]:
    """The energy added since the previous reading, and the new reference reading."""
    if value is None:
        return 0.0, previous
    if previous is None:
        return 0.0, (ts, value)
    prev_ts, prev_value = previous
    if ts <= prev_ts:  # late or duplicate sample: it cannot tell us about new energy
        return 0.0, previous
    if value < prev_value:  # counter reset (module replaced, firmware reset): start again from here
        return 0.0, (ts, value)
    return value - prev_value, (ts, value)


@dataclass(slots=True)
class _Request:
    """A control message for the writer thread, answered through an asyncio future."""

    kind: Literal["flush", "retention", "stop"]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    now: float = 0.0


_Item: TypeAlias = tuple[str, Telemetry] | _Request


def _answer(request: _Request, result: Any = None, error: BaseException | None = None) -> None:
    def deliver() -> None:
        if request.future.done():
            return
        if error is not None:
            request.future.set_exception(error)
        else:
            request.future.set_result(result)

    with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
        request.loop.call_soon_threadsafe(deliver)


# --------------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------------


class History:
    """Telemetry time series in one SQLite file.

    Lifecycle: ``await start()``, then ``record()`` from anywhere on the loop, ``await flush()`` when a
    caller needs its samples committed, queries at any time after start, ``await stop()`` (flushes, joins
    the writer thread).  ``record()`` before ``start()`` is queued; after ``stop()`` it is dropped.
    """

    def __init__(
        self,
        path: Path,
        *,
        retention: Retention = Retention(),
        flush_interval_s: float = 0.5,
        max_batch: int = 5000,
        retention_interval_s: float | None = 3600.0,
        max_pending: int = 200_000,
    ) -> None:
        """``retention_interval_s`` sets how often the writer applies retention on its own (the first time
        one minute after start, or sooner if the interval is shorter); ``None`` leaves it to
        ``apply_retention``.  Beyond ``max_pending`` queued samples, ``record`` drops samples (counted in
        ``dropped``) rather than let memory grow without bound."""
        if flush_interval_s <= 0 or max_batch < 1 or max_pending < 1:
            raise ValueError("flush_interval_s, max_batch and max_pending must be positive")
        if retention_interval_s is not None and retention_interval_s <= 0:
            raise ValueError("retention_interval_s must be positive or None")
        self._path = Path(path)
        self._retention = retention
        self._flush_interval_s = flush_interval_s
        self._max_batch = max_batch
        self._retention_interval_s = retention_interval_s
        self._max_pending = max_pending
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._crashed = False
        self._dropped = 0
        self._warned_full = False
        # writer-thread state
        self._device_keys: dict[str, int] = {}
        self._counters: dict[tuple[int, str], _Counter | None] = {}
        self._write_error: BaseException | None = None

    @property
    def path(self) -> Path:
        return self._path

    @property
    def retention(self) -> Retention:
        return self._retention

    def set_retention(self, retention: Retention) -> None:
        """Change how long rows are kept; the writer uses it at its next retention pass."""
        self._retention = retention

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopped

    @property
    def dropped(self) -> int:
        """Samples dropped because the queue was full or the store was stopped."""
        return self._dropped

    # -- lifecycle ---------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open (or create) the database and start the writer thread.

        Raises ``HistoryError`` if the file cannot be opened as a history database.
        """
        if self._stopped:
            raise HistoryError("a stopped History cannot be restarted; create a new one")
        if self._thread is not None:
            return
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        thread = threading.Thread(
            target=self._run, args=(loop, ready), name="ores-history-writer", daemon=True
        )
        self._thread = thread
        thread.start()
        try:
            await ready
        except BaseException:  # failed to open, or cancelled while opening: leave no thread behind
            self._stopped = True
            self._queue.put(_Request("stop", loop, loop.create_future()))
            await asyncio.to_thread(thread.join)
            self._thread = None
            raise

    async def stop(self) -> None:
        """Commit everything recorded so far, stop the writer thread and wait for it.  Safe to call twice."""
        thread = self._thread
        if self._stopped:
            if thread is not None:
                await asyncio.to_thread(thread.join)
            return
        self._stopped = True
        if thread is None:
            return
        if thread.is_alive():
            try:
                await self._request("stop")
            except HistoryError as err:
                _LOGGER.warning("history: last writes before stop failed: %s", err)
        await asyncio.to_thread(thread.join)

    async def flush(self) -> None:
        """Wait until every sample recorded before this call is committed.

        Raises ``HistoryError`` if a batch failed to commit since the last flush (its samples are lost) or
        the writer thread failed.
        """
        if self._crashed:
            raise HistoryError("history writer thread failed")
        if self._stopped:
            return
        if self._thread is None:
            raise HistoryError("history is not started")
        await self._request("flush")

    async def apply_retention(self, now: float | None = None) -> dict[str, int]:
        """Delete rows older than the retention periods, counted back from ``now`` (default: the clock).

        Samples recorded before the call are committed first.  Returns rows deleted per table, keyed by
        resolution (``"raw"``, ``"1m"``, ``"15m"``).
        """
        if self._thread is None or self._stopped:
            raise HistoryError("history is not running")
        result: dict[str, int] = await self._request("retention", time.time() if now is None else now)
        return result

    # -- writing -----------------------------------------------------------------------------------------

    def record(self, device_id: str, telemetry: Telemetry) -> None:
        """Queue one sample for writing.  Never blocks and never touches the database."""
        if self._stopped:
            self._dropped += 1
            return
        if self._queue.qsize() >= self._max_pending:
            self._dropped += 1
            if not self._warned_full:
                self._warned_full = True
                _LOGGER.warning("history: %d samples waiting; dropping new samples", self._max_pending)
            return
        self._warned_full = False
        self._queue.put((device_id, telemetry))

    async def _request(self, kind: Literal["flush", "retention", "stop"], now: float = 0.0) -> Any:
        loop = asyncio.get_running_loop()
        request = _Request(kind, loop, loop.create_future(), now)
        self._queue.put(request)
        thread = self._thread
        while True:
            try:
                done, _ = await asyncio.wait({request.future}, timeout=1.0)
            except asyncio.CancelledError:
                request.future.cancel()  # the writer will find it done and not answer
                raise
            if done:
                return request.future.result()
            if thread is None or not thread.is_alive():  # the writer died: never answer would hang us
                if request.future.done():
                    return request.future.result()
                raise HistoryError("history writer thread is not running")

    # -- the writer thread -------------------------------------------------------------------------------

    def _connect_writer(self) -> sqlite3.Connection:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self._path, timeout=30.0, isolation_level=None, check_same_thread=True)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise HistoryError(f"{self._path}: cannot use WAL journal mode (got {mode})")
            conn.execute("PRAGMA synchronous=NORMAL")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise HistoryError(
                    f"{self._path} has schema {version}, newer than this hub's {SCHEMA_VERSION}"
                )
            aggregates = "".join(_AGG_SCHEMA.format(table=table) for table in _AGG_TABLE.values())
            conn.executescript(
                f"BEGIN IMMEDIATE; {_SCHEMA} {aggregates} PRAGMA user_version={SCHEMA_VERSION}; COMMIT;"
            )
        except BaseException:
            conn.close()
            raise
        return conn

    def _run(self, loop: asyncio.AbstractEventLoop, ready: asyncio.Future[None]) -> None:
        try:
            conn = self._connect_writer()
        except (sqlite3.Error, OSError, HistoryError) as err:
            error = err if isinstance(err, HistoryError) else HistoryError(f"cannot open {self._path}: {err}")
            if error is not err:
                error.__cause__ = err
            _answer(_Request("flush", loop, ready), error=error)
            return
        _answer(_Request("flush", loop, ready))
        stop: _Request | None = None
        try:
            stop = self._serve(conn)
        except Exception:
            self._crashed = True
            _LOGGER.exception("history writer thread failed; telemetry is no longer stored")
        finally:
            self._stopped = True
            try:
                if stop is not None:
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as err:
                _LOGGER.debug("history: checkpoint at stop failed: %s", err)
            conn.close()
            if stop is not None:
                _answer(stop, error=self._take_error())
            self._fail_pending()

    def _serve(self, conn: sqlite3.Connection) -> _Request:
        batch: list[tuple[str, Telemetry]] = []
        batch_deadline = math.inf
        if self._retention_interval_s is None:
            next_retention = math.inf
        else:
            next_retention = time.monotonic() + min(60.0, self._retention_interval_s)
        while True:
            wake = min(batch_deadline, next_retention)
            timeout = None if wake == math.inf else max(0.0, wake - time.monotonic())
            try:
                item: _Item | None = self._queue.get(timeout=timeout)
            except queue.Empty:
                item = None
            if isinstance(item, tuple):
                if not batch:
                    batch_deadline = time.monotonic() + self._flush_interval_s
                batch.append(item)
                if len(batch) < self._max_batch and time.monotonic() < batch_deadline:
                    continue
            if batch:
                self._commit(conn, batch)
                batch = []
                batch_deadline = math.inf
            if time.monotonic() >= next_retention:
                assert self._retention_interval_s is not None
                next_retention = time.monotonic() + self._retention_interval_s
                self._retention_safely(conn, time.time())
            if isinstance(item, _Request):
                if item.kind == "stop":
                    return item
                if item.kind == "flush":
                    _answer(item, error=self._take_error())
                else:
                    error = self._take_error()
                    if error is None:
                        try:
                            _answer(item, self._apply_retention(conn, item.now))
                        except sqlite3.Error as err:
                            _answer(item, error=HistoryError(f"retention failed: {err}"))
                    else:
                        _answer(item, error=error)

    def _take_error(self) -> BaseException | None:
        error, self._write_error = self._write_error, None
        return error

    def _fail_pending(self) -> None:
        """Answer every request still queued after the writer ended, so no caller waits for ever."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Request):
                if item.kind == "stop":
                    _answer(item)
                else:
                    _answer(item, error=HistoryError("history writer thread is not running"))
            else:
                self._dropped += 1

    def _device_key(self, conn: sqlite3.Connection, device_id: str) -> int:
        key = self._device_keys.get(device_id)
        if key is None:
            conn.execute("INSERT OR IGNORE INTO devices (device_id) VALUES (?)", (device_id,))
            key = int(conn.execute("SELECT id FROM devices WHERE device_id = ?", (device_id,)).fetchone()[0])
            self._device_keys[device_id] = key
        return key

    def _counter(self, conn: sqlite3.Connection, device: int, column: str) -> _Counter | None:
        """The last stored reading of a counter (loaded once per device after start)."""
        slot = (device, column)
        if slot not in self._counters:
            row = conn.execute(
                f"SELECT ts, {column} FROM samples WHERE device = ? AND {column} IS NOT NULL"
                " ORDER BY ts DESC LIMIT 1",
                (device,),
            ).fetchone()
            self._counters[slot] = None if row is None else (float(row[0]), float(row[1]))
        return self._counters[slot]

    def _commit(self, conn: sqlite3.Connection, batch: Sequence[tuple[str, Telemetry]]) -> None:
        counters_before = dict(self._counters)
        keys_before = dict(self._device_keys)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._write_batch(conn, batch)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as err:
            self._counters = counters_before
            self._device_keys = keys_before
            self._write_error = HistoryError(f"could not store {len(batch)} samples: {err}")
            self._write_error.__cause__ = err
            _LOGGER.error("history: could not store %d samples: %s", len(batch), err)

    def _write_batch(self, conn: sqlite3.Connection, batch: Iterable[tuple[str, Telemetry]]) -> None:
        rows: list[tuple[Any, ...]] = []
        partials: dict[str, dict[tuple[int, int], _Partial]] = {"1m": {}, "15m": {}}
        for device_id, sample in batch:
            try:
                ts = _num(sample.ts)
                state = _STATE_CODES.get(OperatingState(sample.state), _STATE_CODES[OperatingState.UNKNOWN])
            except (AttributeError, TypeError, ValueError):
                ts = None
            if ts is None or not isinstance(device_id, str):
                _LOGGER.warning("history: ignoring malformed sample for %r: %r", device_id, sample)
                continue
            device = self._device_key(conn, device_id)
            power = _num(sample.power_w)
            out = _num(sample.energy_out_wh)
            in_ = _num(sample.energy_in_wh)
            soc = _num(sample.soc_pct)
            temp = _num(sample.temperature_c)
            rows.append(
                (
                    device,
                    ts,
                    power,
                    out,
                    in_,
                    _num(sample.voltage_v),
                    _num(sample.current_a),
                    _num(sample.frequency_hz),
                    temp,
                    soc,
                    _num(sample.soh_pct),
                    _num(sample.power_limit_pct),
                    _flag(sample.on),
                    _flag(sample.grid_ok),
                    state,
                )
            )
            out_delta, self._counters[(device, "energy_out_wh")] = _counter_step(
                self._counter(conn, device, "energy_out_wh"), ts, out
            )
            in_delta, self._counters[(device, "energy_in_wh")] = _counter_step(
                self._counter(conn, device, "energy_in_wh"), ts, in_
            )
            for resolution, width in _BUCKET_S.items():
                bucket = int(ts // width) * width
                partial = partials[resolution].get((device, bucket))
                if partial is None:
                    partial = partials[resolution][(device, bucket)] = _Partial(ts)
                partial.add(
                    ts=ts,
                    power=power,
                    soc=soc,
                    temp=temp,
                    out=out,
                    in_=in_,
                    out_delta=out_delta,
                    in_delta=in_delta,
                )
        conn.executemany(_INSERT_SAMPLE, rows)
        for resolution, table in _AGG_TABLE.items():
            conn.executemany(
                _UPSERT_AGG.format(table=table),
                [partial.row(device, bucket) for (device, bucket), partial in partials[resolution].items()],
            )

    def _retention_safely(self, conn: sqlite3.Connection, now: float) -> None:
        try:
            deleted = self._apply_retention(conn, now)
        except sqlite3.Error as err:
            _LOGGER.error("history: retention failed: %s", err)
            return
        _LOGGER.debug("history: retention deleted %s", deleted)

    def _apply_retention(self, conn: sqlite3.Connection, now: float) -> dict[str, int]:
        keep = self._retention
        limits = (
            ("raw", "DELETE FROM samples WHERE device = ? AND ts < ?", now - keep.raw_s),
            ("1m", "DELETE FROM agg_1m WHERE device = ? AND bucket < ?", now - keep.one_minute_s),
            ("15m", "DELETE FROM agg_15m WHERE device = ? AND bucket < ?", now - keep.fifteen_minute_s),
        )
        deleted = {"raw": 0, "1m": 0, "15m": 0}
        conn.execute("BEGIN IMMEDIATE")
        try:
            devices = [int(row[0]) for row in conn.execute("SELECT id FROM devices")]
            for name, statement, cutoff in limits:
                for device in devices:  # per device, so each delete is a range scan of the (device, ts) key
                    deleted[name] += conn.execute(statement, (device, cutoff)).rowcount
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return deleted

    # -- queries -----------------------------------------------------------------------------------------

    async def query(  # noqa: PLR0917 - the documented positional signature
        self,
        device_id: str,
        start: float,
        end: float,
        resolution: Resolution = "auto",
        fields: list[str] | None = None,
        limit: int = 10000,
    ) -> list[dict[str, Any]]:
        """Rows of one device between ``start`` and ``end`` (POSIX s, inclusive), oldest first.

        Raw rows are samples with ``ts`` in the range; aggregate rows are the buckets that overlap it, with
        ``ts`` the bucket start.  ``fields`` selects columns (``ts`` is always included): any of
        ``RAW_FIELDS`` for raw, ``AGGREGATE_FIELDS`` for 1m/15m, ``AUTO_FIELDS`` for auto (which picks the
        resolution with ``pick_resolution``).  At most ``limit`` rows (the oldest).  Unknown device: ``[]``.
        Raises ``ValueError`` for a bad range, resolution, field or limit.
        """
        start, end = _check_range(start, end)
        if resolution not in ("raw", "1m", "15m", "auto"):
            raise ValueError(f"unknown resolution {resolution!r}: use raw, 1m, 15m or auto")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError("limit must be a positive integer")
        chosen = pick_resolution(start, end) if resolution == "auto" else resolution
        allowed = AUTO_FIELDS if resolution == "auto" else RAW_FIELDS if chosen == "raw" else AGGREGATE_FIELDS
        if fields is None:
            selected = list(RAW_FIELDS if chosen == "raw" else AGGREGATE_FIELDS)
        else:
            if isinstance(fields, str) or not all(isinstance(f, str) for f in fields):
                raise ValueError("fields must be a list of field names")
            for name in fields:
                if name not in allowed:
                    raise ValueError(
                        f"unknown field {name!r} for resolution {resolution}: use {', '.join(allowed)}"
                    )
            selected = list(dict.fromkeys(fields))
        return await asyncio.to_thread(
            self._query_sync, device_id, start, end, resolution=chosen, selected=selected, limit=limit
        )

    async def energy(self, device_id: str, start: float, end: float) -> dict[str, Any]:
        """Energy delivered (``energy_out_wh``) and taken (``energy_in_wh``) by a device in [start, end).

        Sums the counter increases of the 1-minute buckets, and of the 15-minute buckets for the part of
        the range older than the 1-minute data kept (exactly, also when retention cut into a quarter
        hour).  The range's edges are rounded to whole buckets: a bucket counts when its start lies in
        the range.  ``buckets`` is how many buckets were summed (0: no data, e.g. an unknown device).
        Raises ``ValueError`` for a bad range.
        """
        start, end = _check_range(start, end)
        return await asyncio.to_thread(self._energy_sync, device_id, start, end)

    def _connect_reader(self) -> sqlite3.Connection:
        uri = self._path.resolve().as_uri() + "?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=10.0)
        except sqlite3.Error as err:
            raise HistoryError(f"cannot read history {self._path}: {err}") from err
        try:
            conn.execute("PRAGMA query_only=ON")
        except sqlite3.Error as err:
            conn.close()
            raise HistoryError(f"cannot read history {self._path}: {err}") from err
        return conn

    def _query_sync(
        self, device_id: str, start: float, end: float, *, resolution: str, selected: list[str], limit: int
    ) -> list[dict[str, Any]]:
        conn = self._connect_reader()
        try:
            device = _lookup_device(conn, device_id)
            if device is None:
                return []
            if resolution == "raw":
                columns = ", ".join(_RAW_COLUMNS[name] for name in selected)
                sql = (
                    f"SELECT ts{', ' if selected else ''}{columns} FROM samples"
                    " WHERE device = ? AND ts >= ? AND ts <= ? ORDER BY ts LIMIT ?"
                )
                params: tuple[Any, ...] = (device, start, end, limit)
            else:
                width = _BUCKET_S[resolution]
                columns = ", ".join(f"{_AGG_EXPRESSIONS[name]}" for name in selected)
                sql = (
                    f"SELECT bucket{', ' if selected else ''}{columns} FROM {_AGG_TABLE[resolution]}"
                    " WHERE device = ? AND bucket > ? AND bucket <= ? ORDER BY bucket LIMIT ?"
                )
                params = (device, start - width, end, limit)
            rows = conn.execute(sql, params).fetchall()
        except sqlite3.Error as err:
            raise HistoryError(f"history query failed: {err}") from err
        finally:
            conn.close()
        convert = _raw_value if resolution == "raw" else _agg_value
        return [
            {"ts": float(row[0]), **{name: convert(name, row[i + 1]) for i, name in enumerate(selected)}}
            for row in rows
        ]

    def _energy_sync(self, device_id: str, start: float, end: float) -> dict[str, Any]:
        result: dict[str, Any] = {
            "device_id": device_id,
            "start": start,
            "end": end,
            "energy_out_wh": 0.0,
            "energy_in_wh": 0.0,
            "buckets": 0,
        }
        conn = self._connect_reader()
        try:
            device = _lookup_device(conn, device_id)
            if device is None:
                return result
            sums = _DeltaSums(conn, device)
            first_minute = conn.execute(
                "SELECT min(bucket) FROM agg_1m WHERE device = ?", (device,)
            ).fetchone()[0]
            if first_minute is None:  # no 1-minute data left: quarter hours only
                sums.add("agg_15m", start, end)
            else:
                # 1-minute buckets from the first one kept; quarter hours wholly before it ...
                sums.add("agg_1m", max(start, first_minute), end)
                sums.add("agg_15m", start, min(end, first_minute - 899))
                # ... and of the quarter hour holding that first minute, the part the minutes no longer
                # cover: its total minus its minutes (zero when no retention cut into it).
                quarter = first_minute - first_minute % 900
                if first_minute != quarter and start <= quarter < end:
                    sums.add("agg_15m", quarter, quarter + 1)
                    sums.subtract("agg_1m", first_minute, quarter + 900)
            result.update(sums.result())
        except sqlite3.Error as err:
            raise HistoryError(f"history query failed: {err}") from err
        finally:
            conn.close()
        return result


class _DeltaSums:
    """Adds up the energy deltas of aggregate buckets whose start lies in given ranges."""

    def __init__(self, conn: sqlite3.Connection, device: int) -> None:
        self._conn = conn
        self._device = device
        self._out = 0.0
        self._in = 0.0
        self._buckets = 0

    def _sum(self, table: str, lo: float, hi: float) -> tuple[float, float, int]:
        if lo >= hi:
            return 0.0, 0.0, 0
        out, in_, count = self._conn.execute(
            f"SELECT coalesce(sum(out_delta), 0), coalesce(sum(in_delta), 0), count(*) FROM {table}"
            " WHERE device = ? AND bucket >= ? AND bucket < ?",
            (self._device, lo, hi),
        ).fetchone()
        return float(out), float(in_), int(count)

    def add(self, table: str, lo: float, hi: float) -> None:
        out, in_, count = self._sum(table, lo, hi)
        self._out += out
        self._in += in_
        self._buckets += count

    def subtract(self, table: str, lo: float, hi: float) -> None:
        out, in_, _ = self._sum(table, lo, hi)
        self._out -= out
        self._in -= in_

    def result(self) -> dict[str, Any]:
        return {"energy_out_wh": self._out, "energy_in_wh": self._in, "buckets": self._buckets}


def _check_range(start: float, end: float) -> tuple[float, float]:
    try:
        start_f, end_f = float(start), float(end)
    except (TypeError, ValueError) as err:
        raise ValueError("start and end must be numbers (POSIX seconds)") from err
    if not (math.isfinite(start_f) and math.isfinite(end_f)):
        raise ValueError("start and end must be finite")
    if end_f < start_f:
        raise ValueError(f"end ({end_f}) is before start ({start_f})")
    return start_f, end_f


def _lookup_device(conn: sqlite3.Connection, device_id: str) -> int | None:
    try:
        row = conn.execute("SELECT id FROM devices WHERE device_id = ?", (device_id,)).fetchone()
    except sqlite3.OperationalError as err:
        if "no such table" in str(err):  # the writer has not created the schema yet
            return None
        raise
    return None if row is None else int(row[0])


def _raw_value(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in ("on", "grid_ok"):
        return bool(value)
    if name == "state":
        return _STATE_BY_CODE.get(int(value), OperatingState.UNKNOWN).value
    return float(value)


def _agg_value(name: str, value: Any) -> Any:
    if value is None:
        return None
    return int(value) if name == "count" else float(value)
