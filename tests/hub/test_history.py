"""Tests for hub.history: raw samples, aggregates against hand computations, retention, queries, threads."""

from __future__ import annotations

import math
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devices.model import OperatingState, Telemetry
from hub.history import AUTO_FIELDS, History, HistoryError, Retention, pick_resolution

# A 15-minute boundary (so also a minute boundary), recent enough to look like real data.
T0 = 1_750_000_500.0 - (1_750_000_500.0 % 900)


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ores-history-writer" and t.is_alive()]


@pytest.fixture
async def history(tmp_path: Path) -> AsyncIterator[History]:
    store = History(tmp_path / "history.sqlite3", retention_interval_s=None)
    await store.start()
    try:
        yield store
    finally:
        await store.stop()


def sample(ts: float, **values: object) -> Telemetry:
    return Telemetry(ts=ts, **values)  # type: ignore[arg-type]


async def test_record_flush_query_raw(history: History) -> None:
    history.record(
        "inv",
        sample(
            T0,
            power_w=512.5,
            energy_out_wh=1234.5,
            energy_in_wh=0.0,
            voltage_v=230.1,
            current_a=2.2,
            frequency_hz=50.01,
            temperature_c=41.0,
            power_limit_pct=80.0,
            state=OperatingState.THROTTLED,
        ),
    )
    history.record("plug", sample(T0, power_w=-60.0, on=True, grid_ok=None, state=OperatingState.RUNNING))
    history.record("inv", sample(T0 + 1, power_w=math.nan, state=OperatingState.OFFLINE))
    history.record("bat", sample(T0 + 2, power_w=-800.0, soc_pct=55.5, soh_pct=97.0, grid_ok=False))
    await history.flush()

    rows = await history.query("inv", T0, T0 + 10, "raw")
    assert [row["ts"] for row in rows] == [T0, T0 + 1]
    first, second = rows
    assert first["power_w"] == 512.5
    assert first["energy_out_wh"] == 1234.5
    assert first["voltage_v"] == 230.1
    assert first["frequency_hz"] == 50.01
    assert first["power_limit_pct"] == 80.0
    assert first["state"] == "throttled"
    assert first["on"] is None and first["soc_pct"] is None
    assert second["power_w"] is None  # NaN is not a measurement
    assert second["state"] == "offline"

    plug = await history.query("plug", T0, T0, "raw", fields=["power_w", "on", "grid_ok"])
    assert plug == [{"ts": T0, "power_w": -60.0, "on": True, "grid_ok": None}]
    bat = await history.query("bat", T0, T0 + 10, "raw", fields=["soc_pct", "soh_pct", "grid_ok"])
    assert bat == [{"ts": T0 + 2, "soc_pct": 55.5, "soh_pct": 97.0, "grid_ok": False}]

    assert await history.query("nobody", T0, T0 + 10, "raw") == []
    assert await history.query("inv", T0 + 2, T0 + 10, "raw") == []  # range excludes both samples
    assert len(await history.query("inv", T0, T0 + 10, "raw", limit=1)) == 1


async def test_aggregates_match_hand_computation(history: History) -> None:
    # s1, s2 in minute T0-60 (15-min bucket T0-900); s3..s8 in minutes T0, T0+60, T0+120 (15-min bucket T0).
    # Written in three batches, so buckets are merged across transactions.
    history.record(
        "inv",
        sample(T0 - 30, power_w=100, energy_out_wh=1000.0, energy_in_wh=10.0, soc_pct=50, temperature_c=20),
    )
    history.record(
        "inv",
        sample(T0 - 10, power_w=300, energy_out_wh=1000.5, energy_in_wh=10.0, soc_pct=52, temperature_c=22),
    )
    await history.flush()
    history.record("inv", sample(T0 + 0, power_w=200, energy_out_wh=1001.5, energy_in_wh=10.25, soc_pct=54))
    history.record(
        "inv", sample(T0 + 30, power_w=-50, energy_out_wh=1001.5, energy_in_wh=10.75, temperature_c=24)
    )
    await history.flush()
    history.record(
        "inv",
        sample(T0 + 60, power_w=400, energy_out_wh=1003.0, energy_in_wh=10.75, soc_pct=56, temperature_c=26),
    )
    history.record("inv", sample(T0 + 61, state=OperatingState.OFFLINE))  # nothing measured
    history.record(
        "inv", sample(T0 + 120, power_w=10, energy_out_wh=2.0, energy_in_wh=11.0, soc_pct=58)
    )  # reset
    history.record("inv", sample(T0 + 150, power_w=20, energy_out_wh=2.5, energy_in_wh=11.0))
    await history.flush()

    minutes = await history.query("inv", T0 - 60, T0 + 120, "1m")
    expected_minutes = [
        # ts, count, avg, min, max, soc, temp, out_last, in_last, out_delta, in_delta
        (T0 - 60, 2, 200.0, 100.0, 300.0, 51.0, 21.0, 1000.5, 10.0, 0.5, 0.0),
        (T0, 2, 75.0, -50.0, 200.0, 54.0, 24.0, 1001.5, 10.75, 1.0, 0.75),
        (T0 + 60, 2, 400.0, 400.0, 400.0, 56.0, 26.0, 1003.0, 10.75, 1.5, 0.0),
        (T0 + 120, 2, 15.0, 10.0, 20.0, 58.0, None, 2.5, 11.0, 0.5, 0.25),
    ]
    assert [_agg_tuple(row) for row in minutes] == [pytest.approx(e) for e in expected_minutes]

    quarters = await history.query("inv", T0 - 900, T0 + 899, "15m")
    expected_quarters = [
        (T0 - 900, 2, 200.0, 100.0, 300.0, 51.0, 21.0, 1000.5, 10.0, 0.5, 0.0),
        # power 200, -50, 400, 10, 20 -> 580 / 5; soc 54, 56, 58; temp 24, 26
        (T0, 6, 116.0, -50.0, 400.0, 56.0, 25.0, 2.5, 11.0, 3.0, 1.0),
    ]
    assert [_agg_tuple(row) for row in quarters] == [pytest.approx(e) for e in expected_quarters]

    whole = await history.energy("inv", T0 - 900, T0 + 900)
    assert whole["energy_out_wh"] == pytest.approx(3.5)
    assert whole["energy_in_wh"] == pytest.approx(1.0)
    part = await history.energy("inv", T0, T0 + 120)  # minutes T0 and T0+60 only
    assert (part["energy_out_wh"], part["energy_in_wh"]) == (pytest.approx(2.5), pytest.approx(0.75))
    assert part["buckets"] == 2
    nobody = await history.energy("nobody", T0 - 900, T0 + 900)
    assert (nobody["energy_out_wh"], nobody["energy_in_wh"], nobody["buckets"]) == (0.0, 0.0, 0)


async def test_counter_reference_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    first = History(path, retention_interval_s=None)
    await first.start()
    first.record("inv", sample(T0, energy_out_wh=100.0, energy_in_wh=5.0))
    await first.stop()

    second = History(path, retention_interval_s=None)
    await second.start()
    try:
        second.record("inv", sample(T0 + 90, energy_out_wh=102.5, energy_in_wh=5.5))
        await second.flush()
        rows = await second.query(
            "inv", T0, T0 + 90, "1m", fields=["energy_out_delta_wh", "energy_in_delta_wh"]
        )
        assert rows == [
            {"ts": T0, "energy_out_delta_wh": 0.0, "energy_in_delta_wh": 0.0},
            {"ts": T0 + 60, "energy_out_delta_wh": 2.5, "energy_in_delta_wh": 0.5},
        ]
    finally:
        await second.stop()


async def test_retention_deletes_old_rows_only(tmp_path: Path) -> None:
    keep = Retention(raw_s=3600, one_minute_s=86400, fifteen_minute_s=10 * 86400)
    store = History(tmp_path / "history.sqlite3", retention=keep, retention_interval_s=None)
    await store.start()
    try:
        now = T0
        ages = {"fresh": 1800, "2h": 2 * 3600, "2d": 2 * 86400, "20d": 20 * 86400}
        for age in ages.values():
            store.record("inv", sample(now - age, power_w=1.0))
        result = await store.apply_retention(now)  # commits what was recorded first
        assert result == {"raw": 3, "1m": 2, "15m": 1}

        raw = await store.query("inv", now - 30 * 86400, now, "raw")
        assert [row["ts"] for row in raw] == [now - ages["fresh"]]
        minutes = await store.query("inv", now - 30 * 86400, now, "1m")
        assert [row["ts"] for row in minutes] == [now - ages["2h"], now - ages["fresh"]]
        quarters = await store.query("inv", now - 30 * 86400, now, "15m")
        assert [row["ts"] for row in quarters] == [now - ages["2d"], now - ages["2h"], now - ages["fresh"]]
        assert await store.apply_retention(now) == {"raw": 0, "1m": 0, "15m": 0}
    finally:
        await store.stop()
    with pytest.raises(ValueError):
        Retention(raw_s=0)


async def test_energy_uses_quarter_hours_where_minutes_expired(tmp_path: Path) -> None:
    keep = Retention(raw_s=3600, one_minute_s=86400, fifteen_minute_s=10 * 86400)
    store = History(tmp_path / "history.sqlite3", retention=keep, retention_interval_s=None)
    await store.start()
    try:
        old, recent = T0 - 3 * 86400, T0 - 3600
        store.record("m", sample(old, energy_out_wh=10.0))
        store.record("m", sample(old + 300, energy_out_wh=12.0))  # +2 Wh, minute data will expire
        store.record("m", sample(recent, energy_out_wh=15.0))  # +3 Wh
        store.record("m", sample(recent + 60, energy_out_wh=16.0))  # +1 Wh
        await store.apply_retention(T0)
        assert await store.query("m", old, old + 600, "1m") == []
        total = await store.energy("m", old - 900, T0)
        assert total["energy_out_wh"] == pytest.approx(6.0)
        only_recent = await store.energy("m", recent, T0)
        assert only_recent["energy_out_wh"] == pytest.approx(4.0)
    finally:
        await store.stop()


async def test_energy_is_exact_when_retention_cuts_into_a_quarter_hour(tmp_path: Path) -> None:
    keep = Retention(raw_s=3600, one_minute_s=86400, fifteen_minute_s=10 * 86400)
    store = History(tmp_path / "history.sqlite3", retention=keep, retention_interval_s=None)
    await store.start()
    try:
        q = T0 - 2 * 86400  # a quarter-hour boundary
        for offset, counter in ((0, 0.0), (120, 1.0), (420, 3.0), (600, 6.0)):  # deltas 1, 2, 3
            store.record("m", sample(q + offset, energy_in_wh=counter))
        await store.flush()
        whole = await store.energy("m", q, q + 900)
        assert (whole["energy_in_wh"], whole["buckets"]) == (pytest.approx(6.0), 4)

        deleted = await store.apply_retention(q + 300 + 86400)  # minutes q and q+120 go, q+420 stays
        assert deleted["1m"] == 2
        assert [r["ts"] for r in await store.query("m", q, q + 900, "1m", fields=[])] == [q + 420, q + 600]
        after = await store.energy("m", q, q + 900)
        assert after["energy_in_wh"] == pytest.approx(6.0)  # 2 + 3 from minutes, 1 from the quarter hour
        later = await store.energy("m", q + 400, q + 900)
        assert later["energy_in_wh"] == pytest.approx(5.0)
    finally:
        await store.stop()


async def test_queries_by_range_and_resolution(history: History) -> None:
    for i in range(0, 3 * 86400, 300):  # one sample every 5 minutes over three days
        history.record("inv", sample(T0 + i, power_w=float(i % 1000), soc_pct=50.0))
    await history.flush()

    raw = await history.query("inv", T0, T0 + 3600, "auto")
    assert pick_resolution(T0, T0 + 3600) == "raw"
    assert [row["ts"] for row in raw] == [T0 + i for i in range(0, 3601, 300)]
    assert set(raw[0]) >= {"ts", "power_w", "voltage_v", "state"}

    day = await history.query("inv", T0, T0 + 86400, "auto", fields=["power_w"])
    assert pick_resolution(T0, T0 + 86400) == "1m"
    assert len(day) == 86400 // 300 + 1
    assert day[1] == {"ts": T0 + 300, "power_w": 300.0}

    week = await history.query("inv", T0, T0 + 7 * 86400, "auto")
    assert pick_resolution(T0, T0 + 7 * 86400) == "15m"
    assert len(week) == 3 * 86400 // 900
    assert week[0]["count"] == 3 and week[0]["power_w"] == pytest.approx(300.0)
    assert week[0]["power_w_min"] == 0.0 and week[0]["power_w_max"] == 600.0

    # aggregate rows are the buckets that overlap the range
    overlap = await history.query("inv", T0 + 30, T0 + 300, "1m", fields=["count"])
    assert overlap == [{"ts": T0, "count": 1}, {"ts": T0 + 300, "count": 1}]
    assert await history.query("inv", T0 + 30, T0 + 30, "1m", fields=[]) == [{"ts": T0}]
    assert len(await history.query("inv", T0, T0 + 7 * 86400, "15m", limit=5)) == 5


@pytest.mark.parametrize(
    ("args", "kwargs", "reason"),
    [
        ((T0 + 1, T0), {}, "before start"),
        ((T0, math.inf), {}, "finite"),
        ((T0, T0 + 1, "5m"), {}, "resolution"),
        ((T0, T0 + 1, "raw"), {"fields": ["power_w", "watts"]}, "unknown field 'watts'"),
        ((T0, T0 + 1, "1m"), {"fields": ["voltage_v"]}, "unknown field 'voltage_v'"),
        ((T0, T0 + 1, "raw"), {"fields": ["count"]}, "unknown field 'count'"),
        ((T0, T0 + 1, "auto"), {"fields": ["voltage_v"]}, "unknown field"),
        ((T0, T0 + 1, "raw"), {"limit": 0}, "limit"),
    ],
)
async def test_query_validates_arguments(
    history: History, args: tuple[object, ...], kwargs: dict[str, object], reason: str
) -> None:
    with pytest.raises(ValueError, match=reason):
        await history.query("inv", *args, **kwargs)  # type: ignore[arg-type]


async def test_auto_fields_exist_at_every_resolution(history: History) -> None:
    history.record(
        "inv", sample(T0, power_w=1.0, soc_pct=2.0, temperature_c=3.0, energy_out_wh=4.0, energy_in_wh=5.0)
    )
    await history.flush()
    for span in (60, 86400, 30 * 86400):
        rows = await history.query("inv", T0, T0 + span, "auto", fields=list(AUTO_FIELDS))
        assert rows == [
            {
                "ts": T0,
                "power_w": 1.0,
                "soc_pct": 2.0,
                "temperature_c": 3.0,
                "energy_out_wh": 4.0,
                "energy_in_wh": 5.0,
            }
        ]


async def test_energy_validates_range(history: History) -> None:
    with pytest.raises(ValueError, match="before start"):
        await history.energy("inv", T0, T0 - 1)


async def test_database_is_in_wal_mode(history: History) -> None:
    history.record("inv", sample(T0, power_w=1.0))
    await history.flush()
    with sqlite3.connect(history.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


async def test_record_does_not_touch_sqlite(tmp_path: Path) -> None:
    store = History(tmp_path / "history.sqlite3", retention_interval_s=None)
    # Before start there is no database at all, yet record() accepts samples.
    store.record("inv", sample(T0, power_w=1.0))
    assert not store.path.exists()
    await store.start()
    try:
        await store.flush()
        assert len(await store.query("inv", T0, T0, "raw")) == 1

        # Another connection holds the write lock: the writer cannot commit, record() still returns at once.
        blocker = sqlite3.connect(store.path, isolation_level=None)
        try:
            blocker.execute("BEGIN IMMEDIATE")
            for i in range(1, 501):
                store.record("inv", sample(T0 + i, power_w=float(i)))
            assert len(await store.query("inv", T0, T0 + 600, "raw")) == 1  # nothing new could be written
            blocker.execute("ROLLBACK")
        finally:
            blocker.close()
        await store.flush()
        rows = await store.query("inv", T0, T0 + 600, "raw", fields=["power_w"])
        assert [row["power_w"] for row in rows] == [1.0] + [float(i) for i in range(1, 501)]
        minutes = await store.query("inv", T0, T0 + 600, "1m", fields=["count"])
        assert sum(row["count"] for row in minutes) == 501
    finally:
        await store.stop()


async def test_stop_flushes_and_leaves_no_thread(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    before = set(threading.enumerate())
    store = History(path, retention_interval_s=None, flush_interval_s=60.0)
    await store.start()
    assert len(writer_threads()) == 1 and store.running
    for i in range(100):
        store.record("inv", sample(T0 + i, power_w=float(i)))
    await store.stop()  # long flush interval: only stop() can have written these
    assert writer_threads() == []
    assert not store.running
    new_threads = set(threading.enumerate()) - before
    assert [t.name for t in new_threads if not t.name.startswith("asyncio_")] == []  # executor workers aside
    await store.stop()  # twice is fine
    await store.flush()  # nothing pending after stop
    store.record("inv", sample(T0 + 1000, power_w=1.0))
    assert store.dropped == 1
    assert len(await store.query("inv", T0, T0 + 1000, "raw")) == 100
    with pytest.raises(HistoryError):
        await store.start()


async def test_start_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    path.write_bytes(b"this is not an SQLite database, but it is long enough to look like a header" * 20)
    store = History(path)
    with pytest.raises(HistoryError, match="cannot open"):
        await store.start()
    assert writer_threads() == []
    await store.stop()


async def test_flush_before_start_is_an_error(tmp_path: Path) -> None:
    store = History(tmp_path / "history.sqlite3")
    with pytest.raises(HistoryError, match="not started"):
        await store.flush()
    with pytest.raises(HistoryError, match="not running"):
        await store.apply_retention(T0)


def _agg_tuple(row: dict[str, object]) -> tuple[object, ...]:
    keys = (
        "ts",
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
    return tuple(row[key] for key in keys)
