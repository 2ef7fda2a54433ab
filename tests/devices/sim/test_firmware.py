"""Tests of the simulated A/B firmware slots (``devices.sim.firmware``) with real signed releases.

Each release is a real Ed25519-signed manifest made with ``firmware.manifest``'s own helpers.  The reboot delay
runs on a manual clock, so nothing sleeps: a test advances the clock past ``reboot_s`` and the reboot completes.
Covered: a whole update, resume after an interruption, every refusal the module makes on its own (another model,
vendor, key, a bad signature, a downgrade, the same version, an image too large for the slot), a tampered or
truncated or overlong image, an image that boots unhealthy and its rollback, and the ``FirmwareModule`` view the
endpoints serve.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devices.drivers.base import FirmwareSlots
from devices.model import Capabilities, DeviceInfo, DeviceKind, Identity, OperatingState, Telemetry
from devices.sim.base import StaticModule
from devices.sim.firmware import FirmwareModule, SimFirmware, SimFirmwareError
from firmware.manifest import Manifest, key_id, sign_manifest
from firmware.verify import VendorKey

VENDOR = "Acme Solar"
MODEL = "MI-600"
REBOOT_S = 2.0


@dataclass
class ManualClock:
    """A time source a test moves by hand."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class Signer:
    vendor: str
    key: Ed25519PrivateKey

    @classmethod
    def new(cls, vendor: str = VENDOR) -> Signer:
        return cls(vendor, Ed25519PrivateKey.generate())

    def trust(self) -> dict[str, VendorKey]:
        public = self.key.public_key()
        return {key_id(public): VendorKey(self.vendor, public)}

    def release(
        self, image: bytes, version: str, *, models: tuple[str, ...] = (MODEL,), vendor: str | None = None
    ) -> tuple[bytes, bytes]:
        """The manifest file (canonical bytes) for ``image`` and its raw signature."""
        manifest = Manifest.create(
            vendor=vendor or self.vendor,
            models=models,
            version=version,
            size=len(image),
            sha256=hashlib.sha256(image).hexdigest(),
            key_id=key_id(self.key.public_key()),
        )
        return manifest.canonical_bytes(), sign_manifest(manifest, self.key)


def image_of(size: int, seed: int = 7) -> bytes:
    return bytes((seed + i * 31) % 251 for i in range(size))


@pytest.fixture
def signer() -> Signer:
    return Signer.new()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def module_firmware(signer: Signer, clock: ManualClock, **kwargs: object) -> SimFirmware:
    return SimFirmware(
        VENDOR,
        MODEL,
        "1.0.0",
        trusted=signer.trust(),
        reboot_s=REBOOT_S,
        clock=clock,
        **kwargs,  # type: ignore[arg-type]
    )


def send(firmware: SimFirmware, image: bytes, *, start: int = 0, step: int = 1000) -> int:
    received = start
    for offset in range(start, len(image), step):
        received = firmware.chunk(offset, image[offset : offset + step])
    return received


def refusal(call: object, code: str) -> SimFirmwareError:
    assert callable(call)
    with pytest.raises(SimFirmwareError) as info:
        call()
    assert info.value.code == code, info.value
    return info.value


# --------------------------------------------------------------------------------------------- updates


def test_a_whole_update_boots_the_new_version_after_the_reboot(signer: Signer, clock: ManualClock) -> None:
    firmware = module_firmware(signer, clock)
    assert firmware.status() == FirmwareSlots("1.0.0", None, "idle", 0, None)
    image = image_of(5000)
    manifest, signature = signer.release(image, "1.1.0")
    clock.advance(50.0)
    assert firmware.uptime_s == 50.0

    assert firmware.begin(manifest, signature) == 0
    assert firmware.target_version == "1.1.0"
    assert firmware.chunk(0, image[:1200]) == 1200
    assert firmware.status() == FirmwareSlots("1.0.0", None, "receiving", 1200, None)
    assert send(firmware, image, start=1200) == 5000
    firmware.install()

    assert firmware.rebooting
    assert firmware.status().state == "rebooting"
    assert firmware.running_version == "1.0.0"  # the new slot runs once the reboot is over
    assert firmware.uptime_s == 0.0
    assert firmware.reboot_remaining_s == REBOOT_S
    clock.advance(REBOOT_S - 0.5)
    assert firmware.rebooting
    clock.advance(0.5)
    assert not firmware.rebooting
    assert firmware.running_version == "1.1.0"
    assert firmware.status() == FirmwareSlots("1.1.0", "1.0.0", "idle", 0, None)
    assert firmware.healthy
    assert firmware.boot_count == 1
    assert firmware.uptime_s == 0.0
    clock.advance(3.0)
    assert firmware.uptime_s == 3.0


def test_an_interrupted_transfer_resumes_with_the_same_manifest(signer: Signer, clock: ManualClock) -> None:
    firmware = module_firmware(signer, clock)
    image = image_of(8000)
    manifest, signature = signer.release(image, "1.1.0")
    firmware.begin(manifest, signature)
    assert send(firmware, image[:4000]) == 4000  # the link drops here

    # The hub comes back and announces the same release (re-signed: Ed25519 is deterministic anyway).
    assert firmware.begin(manifest, signature) == 4000
    wrong = refusal(lambda: firmware.chunk(0, image[:1000]), "wrong_offset")
    assert wrong.received_bytes == 4000
    assert "resume at 4000" in wrong.message
    assert (firmware.status().error or "").startswith("wrong_offset: ")
    assert send(firmware, image, start=4000) == 8000
    assert firmware.status().error is None
    assert firmware.begin(manifest, signature) == 8000  # complete but not installed: nothing more to send
    firmware.install()
    clock.advance(REBOOT_S)
    assert firmware.running_version == "1.1.0"


def test_another_release_restarts_the_transfer_and_erases_the_inactive_slot(
    signer: Signer, clock: ManualClock
) -> None:
    firmware = module_firmware(signer, clock)
    first, second = image_of(3000, 1), image_of(3000, 2)
    firmware.begin(*signer.release(first, "1.1.0"))
    send(firmware, first)
    firmware.install()
    clock.advance(REBOOT_S)
    assert firmware.inactive_version == "1.0.0"

    manifest, signature = signer.release(second, "1.2.0")
    assert firmware.begin(manifest, signature) == 0
    assert firmware.inactive_version is None  # being overwritten: nothing to roll back to now
    send(firmware, second[:1000])
    other, other_signature = signer.release(first, "1.3.0")
    assert firmware.begin(other, other_signature) == 0  # a different release starts over
    refusal(firmware.rollback, "no_previous")


def test_a_zero_reboot_delay_boots_at_once(signer: Signer, clock: ManualClock) -> None:
    firmware = SimFirmware(VENDOR, MODEL, "1.0.0", trusted=signer.trust(), reboot_s=0.0, clock=clock)
    image = image_of(100)
    firmware.begin(*signer.release(image, "2.0.0"))
    firmware.chunk(0, image)
    firmware.install()
    assert not firmware.rebooting
    assert firmware.running_version == "2.0.0"


# --------------------------------------------------------------------------------------------- refusals


def test_the_module_refuses_releases_it_must_not_install(signer: Signer, clock: ManualClock) -> None:
    firmware = module_firmware(signer, clock)
    image = image_of(2000)
    stranger = Signer.new()
    other_vendor = Signer.new("Other Vendor")
    good_manifest, good_signature = signer.release(image, "1.1.0")
    cases: list[tuple[bytes, bytes, str]] = [
        (*signer.release(image, "1.1.0", models=("MI-800",)), "wrong_model"),
        (*signer.release(image, "0.9.0"), "downgrade"),
        (*signer.release(image, "1.0.0"), "not_newer"),
        (*signer.release(image, "1.0.0+build7"), "not_newer"),
        (*stranger.release(image, "1.1.0"), "untrusted_key"),
        (good_manifest, stranger.key.sign(good_manifest), "bad_signature"),
        (good_manifest, bytes(64), "bad_signature"),
        (good_manifest, b"", "bad_signature"),
        (good_manifest.replace(b"1.1.0", b"9.1.0"), good_signature, "bad_signature"),
        (b"{not json", good_signature, "bad_manifest"),
    ]
    # A key trusted for another vendor: the module embeds it, but the manifest claims another vendor.
    mixed = SimFirmware(
        VENDOR, MODEL, "1.0.0", trusted={**signer.trust(), **other_vendor.trust()}, clock=clock
    )
    manifest, signature = other_vendor.release(image, "1.1.0")
    refusal(lambda: mixed.begin(manifest, signature), "vendor_mismatch")
    manifest, signature = other_vendor.release(image, "1.1.0", vendor=VENDOR)
    refusal(lambda: mixed.begin(manifest, signature), "vendor_mismatch")

    # A transfer in progress survives every refusal.
    firmware.begin(good_manifest, good_signature)
    firmware.chunk(0, image[:500])
    for manifest, signature, code in cases:
        error = refusal(lambda m=manifest, s=signature: firmware.begin(m, s), code)  # type: ignore[misc]
        assert firmware.status().state == "receiving"
        assert firmware.status().received_bytes == 500
        assert firmware.status().error == f"{code}: {error.message}"
    assert firmware.begin(good_manifest, good_signature) == 500


def test_an_image_too_large_for_the_slot_is_refused(signer: Signer, clock: ManualClock) -> None:
    firmware = module_firmware(signer, clock, max_image=1024)
    manifest, signature = signer.release(image_of(1025), "1.1.0")
    refusal(lambda: firmware.begin(manifest, signature), "too_large")
    assert firmware.status().state == "idle"


def test_a_tampered_image_fails_at_install_and_changes_no_slot(signer: Signer, clock: ManualClock) -> None:
    firmware = module_firmware(signer, clock)
    image = image_of(3000)
    manifest, signature = signer.release(image, "1.1.0")
    tampered = bytearray(image)
    tampered[1234] ^= 0x01
    firmware.begin(manifest, signature)
    send(firmware, bytes(tampered))
    error = refusal(firmware.install, "hash_mismatch")
    assert "SHA-256" in error.message
    assert not firmware.rebooting
    assert firmware.running_version == "1.0.0"
    status = firmware.status()
    assert (status.active_version, status.inactive_version, status.state) == ("1.0.0", None, "failed")
    assert status.error is not None and status.error.startswith("hash_mismatch: ")
    refusal(lambda: firmware.chunk(0, image[:10]), "no_update")
    refusal(firmware.install, "no_update")
    assert firmware.begin(manifest, signature) == 0  # the same release again starts over
    send(firmware, image)
    firmware.install()
    clock.advance(REBOOT_S)
    assert firmware.running_version == "1.1.0"


def test_an_incomplete_image_is_refused_but_can_be_resumed(signer: Signer, clock: ManualClock) -> None:
    firmware = module_firmware(signer, clock)
    image = image_of(3000)
    firmware.begin(*signer.release(image, "1.1.0"))
    send(firmware, image[:2000])
    error = refusal(firmware.install, "size_mismatch")
    assert error.received_bytes == 2000
    assert firmware.status().state == "receiving"
    send(firmware, image, start=2000)
    firmware.install()
    assert firmware.rebooting


def test_bytes_beyond_the_manifest_size_fail_the_transfer(signer: Signer, clock: ManualClock) -> None:
    firmware = module_firmware(signer, clock)
    image = image_of(3000)
    firmware.begin(*signer.release(image, "1.1.0"))
    send(firmware, image)
    refusal(lambda: firmware.chunk(3000, b"x"), "size_mismatch")
    assert firmware.status().state == "failed"
    refusal(firmware.install, "no_update")


def test_nothing_happens_without_a_transfer_or_while_rebooting(signer: Signer, clock: ManualClock) -> None:
    firmware = module_firmware(signer, clock)
    refusal(lambda: firmware.chunk(0, b"abc"), "no_update")
    refusal(firmware.install, "no_update")
    refusal(firmware.rollback, "no_previous")
    image = image_of(100)
    manifest, signature = signer.release(image, "1.1.0")
    firmware.begin(manifest, signature)
    firmware.chunk(0, image)
    firmware.install()
    for call in (
        lambda: firmware.begin(manifest, signature),
        lambda: firmware.chunk(0, b""),
        firmware.install,
    ):
        refusal(call, "rebooting")
    refusal(firmware.rollback, "rebooting")


def test_versions_must_be_semantic() -> None:
    with pytest.raises(ValueError, match="semantic"):
        SimFirmware(VENDOR, MODEL, "1.0", trusted={})
    with pytest.raises(ValueError, match="semantic"):
        SimFirmware(VENDOR, MODEL, "1.0.0", trusted={}, fail_versions=frozenset({"v2"}))
    with pytest.raises(ValueError, match="reboot_s"):
        SimFirmware(VENDOR, MODEL, "1.0.0", trusted={}, reboot_s=-1.0)


# --------------------------------------------------------------------------------------------- health


INVERTER = DeviceInfo(
    DeviceKind.MICROINVERTER, Identity(VENDOR, MODEL, "MI-0001", "0.0.1"), Capabilities(rated_power_w=600.0)
)


def test_an_unhealthy_image_reports_fault_until_it_is_rolled_back(signer: Signer, clock: ManualClock) -> None:
    firmware = module_firmware(signer, clock, fail_versions=frozenset({"1.1.0"}))
    module = StaticModule(INVERTER, Telemetry(ts=0.0, power_w=300.0))
    served = FirmwareModule(module, firmware)
    assert served.info.identity.firmware_version == "1.0.0"  # the running version, not the module's own
    assert served.telemetry().state is OperatingState.RUNNING
    assert served.faults() == []

    image = image_of(4000)
    firmware.begin(*signer.release(image, "1.1.0"))
    send(firmware, image)
    firmware.install()
    clock.advance(REBOOT_S)
    assert firmware.running_version == "1.1.0"
    assert not firmware.healthy
    assert served.info.identity.firmware_version == "1.1.0"
    assert served.telemetry().state is OperatingState.FAULT
    assert [fault.code for fault in served.faults()] == ["firmware_unhealthy"]

    firmware.rollback()
    assert firmware.rebooting
    clock.advance(REBOOT_S)
    assert firmware.running_version == "1.0.0"
    assert firmware.healthy
    assert firmware.status() == FirmwareSlots("1.0.0", "1.1.0", "idle", 0, None)
    assert firmware.boot_count == 2
    assert served.telemetry().state is OperatingState.RUNNING
    assert served.faults() == []


def test_the_wrapper_keeps_the_modules_own_faults(signer: Signer, clock: ManualClock) -> None:
    firmware = module_firmware(signer, clock)
    module = StaticModule(INVERTER, Telemetry(ts=0.0, state=OperatingState.FAULT, power_w=0.0))
    served = FirmwareModule(module, firmware)
    assert [fault.code for fault in served.faults()] == ["fault"]
    assert served.module is module and served.firmware is firmware
