"""Tests for hub.registry: records, CRUD, re-registration at a new address, corrupt files, concurrency."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path

import pytest

from devices.model import Capabilities, DeviceInfo, DeviceKind, Identity
from hub.registry import (
    DeviceRecord,
    Registry,
    RegistryClosed,
    RegistryCorrupt,
    RegistryLocked,
    UnknownDevice,
    open_db,
)


def make_record(serial: str, address: str, *, kind: DeviceKind = DeviceKind.MICROINVERTER) -> DeviceRecord:
    info = DeviceInfo(
        kind, Identity("Acme Solar", "MI-600", serial, "1.2.3"), Capabilities(rated_power_w=600)
    )
    return DeviceRecord.from_info(info, address, "ores-http", registered_at=1_700_000_000.0)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "registry.json"


def test_record_round_trip_is_json_friendly() -> None:
    record = make_record("SN1", "http://10.0.0.5:8080/ores/v1")
    record = replace(record, settings={"priority": 3, "setpoint": {"on": True}})
    encoded = json.loads(json.dumps(record.to_dict()))
    assert DeviceRecord.from_dict(encoded) == record
    assert record.device_id == "acme-solar_SN1"
    assert encoded["kind"] == "microinverter"
    assert encoded["capabilities"]["rated_power_w"] == 600


def test_record_tolerates_unknown_keys_and_enum_values() -> None:
    data = make_record("SN1", "http://10.0.0.5:8080/ores/v1").to_dict()
    data["kind"] = "heat-pump"
    data["future_field"] = {"x": 1}
    data["identity"]["hardware_rev"] = "B"
    data["capabilities"]["max_ramp_w_s"] = 10
    record = DeviceRecord.from_dict(data)
    assert record.kind is DeviceKind.UNKNOWN
    assert record.identity.serial == "SN1"
    assert record.capabilities.rated_power_w == 600


def test_record_rejects_missing_identity() -> None:
    data = make_record("SN1", "http://10.0.0.5:8080/ores/v1").to_dict()
    del data["identity"]
    with pytest.raises(ValueError, match="identity"):
        DeviceRecord.from_dict(data)


def test_record_settings_are_a_private_copy() -> None:
    nested = [1, 2]
    settings = {"priority": 1, "nested": nested}
    record = replace(make_record("SN1", "http://h:1"), settings=settings)
    nested.append(3)
    assert record.settings["nested"] == [1, 2]
    with pytest.raises(TypeError):
        record.settings["priority"] = 2  # type: ignore[index]
    with pytest.raises(ValueError, match="JSON"):
        replace(record, settings={"bad": object()})


async def test_crud_and_persistence(db_path: Path) -> None:
    registry = Registry(db_path)
    a = make_record("A", "http://10.0.0.1:80/ores/v1")
    b = make_record("B", "modbus://10.0.0.2:502?unit=3", kind=DeviceKind.ENERGYSTORAGE)
    stored_a, created_a = await registry.upsert(a)
    _, created_b = await registry.upsert(b)
    assert created_a and created_b
    assert registry.get(a.device_id) == stored_a == a
    assert [r.device_id for r in registry.all()] == [a.device_id, b.device_id]
    assert registry.find_by_address("modbus://10.0.0.2:502?unit=3") == b
    assert registry.find_by_address("http://10.0.0.1/ores/v1/") == a  # compared in normalised form
    assert registry.find_by_address("http://10.0.0.1:80") == a  # default base path
    assert registry.find_by_address("http://10.0.0.9:80") is None

    updated = await registry.update(b.device_id, name="Garage battery", settings={"reserve_soc_pct": 20})
    assert updated.name == "Garage battery"
    assert updated.settings == {"reserve_soc_pct": 20}
    assert registry.get(b.device_id) == updated

    assert await registry.remove(a.device_id) is True
    assert await registry.remove(a.device_id) is False
    assert registry.get(a.device_id) is None
    registry.close()
    registry.close()  # twice is fine
    with pytest.raises(RegistryClosed):
        await registry.remove(b.device_id)

    reopened = Registry(db_path)
    try:
        assert reopened.all() == [updated]
        # the file is plain tinydb JSON that another reader can parse
        assert len(stored_documents(db_path)) == 1
    finally:
        reopened.close()


async def test_update_validates(db_path: Path) -> None:
    registry = Registry(db_path)
    try:
        record, _ = await registry.upsert(make_record("A", "http://10.0.0.1:80/ores/v1"))
        with pytest.raises(UnknownDevice):
            await registry.update("nobody_X", name="x")
        with pytest.raises(ValueError, match="cannot be changed"):
            await registry.update(record.device_id, device_id="other")
        with pytest.raises(ValueError, match="wrong type"):
            await registry.update(record.device_id, authenticated="yes")
        with pytest.raises(ValueError, match="JSON"):
            await registry.update(record.device_id, settings={"f": {1, 2}})
        assert registry.get(record.device_id) == record
    finally:
        registry.close()


async def test_reregistration_at_new_address_updates_in_place(db_path: Path) -> None:
    registry = Registry(db_path)
    first, created = await registry.upsert(make_record("A", "http://10.0.0.1:80/ores/v1"))
    assert created
    renamed = await registry.update(first.device_id, name="Roof east", settings={"priority": 2})

    # The same module answers at a new address with newer firmware: same identity, same record.
    moved_info = DeviceInfo(
        DeviceKind.MICROINVERTER, Identity("Acme Solar", "MI-600", "A", "1.3.0"), Capabilities(600)
    )
    moved = DeviceRecord.from_info(moved_info, "http://10.0.0.77:80/ores/v1", "ores-http")
    stored, created = await registry.upsert(moved)
    assert not created
    assert stored.address == "http://10.0.0.77:80/ores/v1"
    assert stored.identity.firmware_version == "1.3.0"
    assert stored.name == "Roof east"  # user-owned fields are kept
    assert stored.settings == {"priority": 2}
    assert stored.registered_at == renamed.registered_at
    assert len(registry.all()) == 1
    assert registry.find_by_address("http://10.0.0.1:80/ores/v1") is None

    # Registering exactly the same again changes nothing.
    again, created = await registry.upsert(moved)
    assert (again, created) == (stored, False)
    registry.close()

    reopened = Registry(db_path)
    try:
        assert reopened.all() == [stored]
        assert len(stored_documents(db_path)) == 1
    finally:
        reopened.close()


async def test_upsert_rejects_id_not_matching_identity(db_path: Path) -> None:
    registry = Registry(db_path)
    try:
        record = make_record("A", "http://10.0.0.1:80/ores/v1")
        forged = replace(record, device_id="acme-solar_B")
        with pytest.raises(ValueError, match="does not match"):
            await registry.upsert(forged)
        assert registry.all() == []
    finally:
        registry.close()


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"devices": {"1": {"device_id": "x"}}}', b"[1, 2]", b"\xff\xfe\x00garbage"],
    ids=["torn-json", "invalid-record", "not-a-document", "binary"],
)
def test_corrupt_file_is_refused_and_kept(db_path: Path, content: bytes) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(content)
    with pytest.raises(RegistryCorrupt, match=str(db_path)):
        Registry(db_path)
    assert db_path.read_bytes() == content  # never silently discarded
    # the failed open released its lock: once repaired, the file opens
    db_path.write_bytes(b"")
    Registry(db_path).close()


def test_second_open_is_refused_while_first_is_open(db_path: Path) -> None:
    first = Registry(db_path)
    try:
        with pytest.raises(RegistryLocked):
            Registry(db_path)
    finally:
        first.close()
    Registry(db_path).close()


async def test_leftover_temp_files_are_cleaned_and_ignored(db_path: Path) -> None:
    registry = Registry(db_path)
    record, _ = await registry.upsert(make_record("A", "http://10.0.0.1:80/ores/v1"))
    registry.close()
    leftover = db_path.with_name(f".{db_path.name}.abc123.tmp")
    leftover.write_bytes(b'{"devices": {"1": {"half')
    unrelated = db_path.with_name("notes.tmp")
    unrelated.write_text("keep me")

    reopened = Registry(db_path)
    try:
        assert not leftover.exists()
        assert unrelated.exists()
        assert reopened.all() == [record]
    finally:
        reopened.close()


async def test_concurrent_upserts_all_persist(db_path: Path) -> None:
    registry = await Registry.open(db_path)
    records = [make_record(f"C{i:03d}", f"http://10.0.1.{i}:80/ores/v1") for i in range(60)]
    results = await asyncio.gather(*(registry.upsert(r) for r in records))
    assert all(created for _, created in results)
    # concurrent updates of the same records, interleaved with new addresses
    await asyncio.gather(*(registry.update(r.device_id, name=f"n{i}") for i, r in enumerate(records)))
    registry.close()

    reopened = Registry(db_path)
    try:
        stored = {r.device_id: r for r in reopened.all()}
        assert len(stored) == len(records)
        for i, r in enumerate(records):
            assert stored[r.device_id].address == r.address
            assert stored[r.device_id].name == f"n{i}"
    finally:
        reopened.close()


async def test_cancelled_write_still_lands_consistently(db_path: Path) -> None:
    registry = Registry(db_path)
    record = make_record("A", "http://10.0.0.1:80/ores/v1")
    task = asyncio.create_task(registry.upsert(record))
    await asyncio.sleep(0)  # one scheduler turn: the task runs up to its worker-thread await
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    # the worker thread finished the write anyway; the next write waits for it and sees its result
    stored, created = await registry.upsert(record)
    assert not created
    registry.close()
    reopened = Registry(db_path)
    try:
        assert reopened.all() == [stored]
        assert len(stored_documents(db_path)) == 1
    finally:
        reopened.close()


def test_open_db_is_atomic_tinydb(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    db = open_db(path)
    db.table("tokens").insert({"token": "abc"})
    db.close()
    assert json.loads(path.read_text()) == {"tokens": {"1": {"token": "abc"}}}
    assert list(tmp_path.glob("*.tmp")) == []


def stored_documents(path: Path) -> dict[str, object]:
    """The registry file's device documents, read as plain JSON (not through tinydb)."""
    documents: dict[str, object] = json.loads(path.read_text())["devices"]
    return documents
