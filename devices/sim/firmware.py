"""Simulated module firmware: two A/B slots, the module's own verification, a reboot delay and failure injection.

``SimFirmware`` is the module side of a firmware update (docs/module-protocol.md §9, docs/ble.md §3.9).  It
holds the running (active) slot and the other (inactive) slot, each as a version and the image's SHA-256 (the
image bytes themselves are streamed through an ``ImageVerifier`` and not kept, so memory stays constant
whatever the image size).  ``begin`` verifies a signed manifest with ``firmware.verify`` against the module's
own embedded vendor key(s), model and running version — a module refuses what the hub should have refused
already — and starts (or resumes) receiving its image into the inactive slot; ``chunk`` takes the image in
order; ``install`` finishes the verification (size and hash) and reboots into the inactive slot; ``rollback``
boots the other slot again.  The reboot lasts ``reboot_s`` seconds of an injectable clock and completes
lazily, when the firmware is next looked at, so no task or timer runs.  A version listed in
``fail_versions`` boots "unhealthy": ``FirmwareModule``, the wrapper the simulated endpoints serve, then
reports ``OperatingState.FAULT`` in its telemetry until it is rolled back.  Every refusal is a
``SimFirmwareError`` with the stable code the protocols put on the wire.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final, Protocol, runtime_checkable

from devices.drivers.base import FirmwareSlots
from devices.model import DeviceInfo, OperatingState, Setpoint, Telemetry
from devices.ores_http_wire import Fault
from devices.sim.base import SimulatedModule
from firmware.manifest import (
    FirmwareError,
    InvalidVersion,
    Manifest,
    VendorMismatch,
    Version,
)
from firmware.verify import ImageVerifier, TrustedKey, check_compatible, verify_signed

__all__ = [
    "DEFAULT_REBOOT_S",
    "DEFAULT_SLOT_BYTES",
    "FirmwareModule",
    "SimFirmware",
    "SimFirmwareError",
]

_LOGGER = logging.getLogger(__name__)

#: How long a simulated module is gone while it reboots, in seconds of its clock.
DEFAULT_REBOOT_S: Final = 2.0
#: The size of a simulated firmware slot: the largest image the module accepts (``too_large`` beyond).
DEFAULT_SLOT_BYTES: Final = 16 * 1024 * 1024

# Firmware states (``FirmwareSlots.state``).
IDLE: Final = "idle"
RECEIVING: Final = "receiving"
VERIFYING: Final = "verifying"
INSTALLING: Final = "installing"
REBOOTING: Final = "rebooting"
FAILED: Final = "failed"


class SimFirmwareError(Exception):
    """The module refused a firmware operation.  ``code`` is the wire code: one of ``firmware.manifest``'s
    rejection codes (``bad_signature``, ``wrong_model``, ``not_newer``, ``hash_mismatch``, ...) or a transfer
    code (``wrong_offset``, ``no_update``, ``no_previous``, ``rebooting``).  ``received_bytes`` is the resume
    point when it matters (``wrong_offset``, an incomplete image at ``install``)."""

    def __init__(self, code: str, message: str, *, received_bytes: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.received_bytes = received_bytes


@dataclass(frozen=True, slots=True)
class _Slot:
    """What a slot holds: a verified image's version and SHA-256."""

    version: Version
    sha256: str


@dataclass(slots=True)
class _Transfer:
    """The image being received into the inactive slot (mutable: the verifier advances)."""

    manifest: Manifest
    canonical: bytes
    verifier: ImageVerifier


class SimFirmware:
    """The A/B firmware slots of one simulated module (see the module docstring).

    ``trusted`` maps key ids to the vendor keys embedded in the module (``firmware.verify``'s shape);
    ``clock`` is the time source of the reboot delay and uptime (inject one to drive the reboot in tests);
    ``max_image`` is the slot size.  Raises ``ValueError`` for a running version that is not semantic.
    Thread-safe: every operation holds one lock.
    """

    def __init__(
        self,
        vendor: str,
        model: str,
        running_version: str,
        *,
        trusted: Mapping[str, TrustedKey],
        reboot_s: float = DEFAULT_REBOOT_S,
        fail_versions: frozenset[str] = frozenset(),
        unhealthy_tag: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_image: int = DEFAULT_SLOT_BYTES,
    ) -> None:
        if not reboot_s >= 0:
            raise ValueError("reboot_s must be >= 0")
        if max_image < 1:
            raise ValueError("max_image must be positive")
        try:
            running = Version.parse(running_version)
            failing = frozenset(Version.parse(v) for v in fail_versions)
            if unhealthy_tag is not None and not unhealthy_tag.isalnum():
                raise InvalidVersion(f"unhealthy_tag must be alphanumeric, not {unhealthy_tag!r}")
        except InvalidVersion as err:
            raise ValueError(f"a simulated module's firmware versions must be semantic: {err}") from err
        self._vendor = vendor
        self._model = model
        self._trusted = dict(trusted)
        self._reboot_s = reboot_s
        self._fail_versions = failing
        self._unhealthy_tag = unhealthy_tag
        self._clock = clock
        self._max_image = max_image
        self._lock = threading.RLock()
        self._active = _Slot(running, "")
        self._inactive: _Slot | None = None
        self._transfer: _Transfer | None = None
        self._state = IDLE
        self._error: tuple[str, str] | None = None
        self._booted_at = clock()
        self._reboot_until: float | None = None
        self._boot_count = 0

    def __repr__(self) -> str:
        return f"SimFirmware({self._vendor!r}, {self._model!r}, {str(self.running_version)!r})"

    # ------------------------------------------------------------------ state

    def _boots_unhealthy(self, version: Version) -> bool:
        """Failure injection: listed versions, and (with ``unhealthy_tag``) any version whose pre-release
        identifiers include that tag, e.g. ``2.0.0-unhealthy``."""
        if version in self._fail_versions:
            return True
        core = str(version).split("+", 1)[0]
        if self._unhealthy_tag is None or "-" not in core:
            return False
        return self._unhealthy_tag in core.split("-", 1)[1].split(".")

    @property
    def vendor(self) -> str:
        return self._vendor

    @property
    def model(self) -> str:
        return self._model

    @property
    def running_version(self) -> str:
        """The version in the active slot (the one running, or the one booting while ``rebooting``)."""
        with self._lock:
            self._tick()
            return str(self._active.version)

    @property
    def inactive_version(self) -> str | None:
        """The version of the valid image in the inactive slot (``None``: empty, or being overwritten)."""
        with self._lock:
            self._tick()
            return None if self._inactive is None else str(self._inactive.version)

    @property
    def rebooting(self) -> bool:
        """The module is rebooting: its endpoints do not answer."""
        with self._lock:
            self._tick()
            return self._reboot_until is not None

    @property
    def reboot_remaining_s(self) -> float:
        """Seconds until the reboot in progress completes (0 when not rebooting)."""
        with self._lock:
            self._tick()
            return 0.0 if self._reboot_until is None else max(0.0, self._reboot_until - self._clock())

    @property
    def healthy(self) -> bool:
        """``False`` while the active slot holds a version of ``fail_versions`` (it booted unhealthy)."""
        with self._lock:
            self._tick()
            return not self._boots_unhealthy(self._active.version)

    @property
    def uptime_s(self) -> float:
        """Seconds since the running firmware booted (0 while rebooting)."""
        with self._lock:
            self._tick()
            if self._reboot_until is not None:
                return 0.0
            return max(0.0, self._clock() - self._booted_at)

    @property
    def boot_count(self) -> int:
        """How many times the module rebooted into a slot (an install or a rollback)."""
        with self._lock:
            self._tick()
            return self._boot_count

    @property
    def target_version(self) -> str | None:
        """The version of the image being received, if any."""
        with self._lock:
            self._tick()
            return None if self._transfer is None else str(self._transfer.manifest.version)

    def status(self) -> FirmwareSlots:
        """The slots and the state of an update, as ``GET /firmware`` reports them.  ``error`` is
        ``"code: message"`` of the last refused or failed operation (``None`` after a successful one)."""
        with self._lock:
            self._tick()
            transfer = self._transfer
            received = transfer.verifier.received if transfer is not None and self._state == RECEIVING else 0
            return FirmwareSlots(
                active_version=str(self._active.version),
                inactive_version=None if self._inactive is None else str(self._inactive.version),
                state=self._state,
                received_bytes=received,
                error=None if self._error is None else f"{self._error[0]}: {self._error[1]}",
            )

    # ------------------------------------------------------------------ operations

    def begin(self, manifest_bytes: bytes, signature: bytes | str) -> int:
        """Verify a signed manifest (signature by the module's vendor key, vendor, model, strictly newer than
        the running version) and get ready to receive its image.  Returns how many bytes of that image are
        already here: the same manifest again resumes the transfer in progress, any other one restarts it
        at 0 and erases the inactive slot.  A refused manifest changes nothing."""
        with self._lock:
            self._ready("begin")
            try:
                manifest = verify_signed(
                    manifest_bytes, signature, self._trusted, max_image_bytes=self._max_image
                )
                if manifest.vendor != self._vendor:
                    raise VendorMismatch(
                        f"image is from {manifest.vendor!r}; this module is {self._vendor!r}"
                    )
                check_compatible(
                    manifest, model=self._model, running_version=str(self._active.version), hub_version=None
                )
            except FirmwareError as err:
                raise self._refuse(err.code, err.message) from err
            canonical = manifest.canonical_bytes()
            transfer = self._transfer
            if transfer is not None and self._state == RECEIVING and transfer.canonical == canonical:
                self._error = None
                _LOGGER.debug(
                    "%r: resuming %s at %d bytes", self, manifest.version, transfer.verifier.received
                )
                return transfer.verifier.received
            self._transfer = _Transfer(manifest, canonical, ImageVerifier(manifest))
            self._inactive = None  # the new image overwrites the inactive slot
            self._state = RECEIVING
            self._error = None
            _LOGGER.info("%r: receiving %s (%d bytes)", self, manifest.version, manifest.size)
            return 0

    def chunk(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        """Take the next ``data`` of the image; ``offset`` must be the number of bytes received so far
        (``wrong_offset`` otherwise, telling the resume point).  Returns the new count.  More bytes than the
        manifest's size fail the transfer (``size_mismatch``)."""
        with self._lock:
            transfer = self._receiving("chunk")
            received = transfer.verifier.received
            if offset != received:
                raise self._refuse(
                    "wrong_offset",
                    f"chunk at offset {offset}, but {received} bytes have been received: resume at {received}",
                    received_bytes=received,
                )
            try:
                transfer.verifier.update(data)
            except FirmwareError as err:
                raise self._fail(err.code, err.message) from err
            self._error = None
            return transfer.verifier.received

    def install(self) -> None:
        """Finish verifying the image (size, then SHA-256), make the inactive slot bootable and reboot into
        it.  An incomplete image is refused with ``size_mismatch`` and can still be resumed; a wrong hash
        fails the transfer (``hash_mismatch``) and leaves the running firmware as it was."""
        with self._lock:
            transfer = self._receiving("install")
            manifest = transfer.manifest
            received = transfer.verifier.received
            if received < manifest.size:
                raise self._refuse(
                    "size_mismatch",
                    f"image is incomplete: {received} of {manifest.size} bytes received; resume at {received}",
                    received_bytes=received,
                )
            self._state = VERIFYING
            try:
                transfer.verifier.finish()
            except FirmwareError as err:
                raise self._fail(err.code, err.message) from err
            self._state = INSTALLING
            self._inactive = _Slot(manifest.version, manifest.sha256)
            self._transfer = None
            self._error = None
            _LOGGER.info("%r: installed %s, rebooting", self, manifest.version)
            self._start_reboot()

    def rollback(self) -> None:
        """Boot the image in the inactive slot again (``no_previous`` when it holds none, also while a new
        image is being received into it)."""
        with self._lock:
            self._ready("rollback")
            if self._inactive is None:
                raise self._refuse("no_previous", "the inactive slot holds no firmware to roll back to")
            self._error = None
            self._transfer = None
            _LOGGER.info("%r: rolling back to %s", self, self._inactive.version)
            self._start_reboot()

    # ------------------------------------------------------------------ internals (lock held)

    def _tick(self) -> None:
        """Complete a reboot whose time is up: the inactive slot becomes the active one."""
        until = self._reboot_until
        if until is None or self._clock() < until:
            return
        assert self._inactive is not None
        self._active, self._inactive = self._inactive, self._active
        self._reboot_until = None
        self._booted_at = until
        self._boot_count += 1
        self._state = IDLE
        healthy = not self._boots_unhealthy(self._active.version)
        _LOGGER.info("%r: booted %s (%s)", self, self._active.version, "healthy" if healthy else "unhealthy")

    def _start_reboot(self) -> None:
        self._state = REBOOTING
        self._reboot_until = self._clock() + self._reboot_s
        self._tick()  # a zero delay completes at once

    def _ready(self, what: str) -> None:
        self._tick()
        if self._reboot_until is not None:
            raise SimFirmwareError("rebooting", f"cannot {what}: the module is rebooting")

    def _receiving(self, what: str) -> _Transfer:
        self._ready(what)
        transfer = self._transfer
        if transfer is None or self._state != RECEIVING:
            raise self._refuse("no_update", f"cannot {what}: no image transfer in progress (begin first)")
        return transfer

    def _refuse(self, code: str, message: str, *, received_bytes: int | None = None) -> SimFirmwareError:
        """A refusal that leaves the state as it is."""
        self._error = (code, message)
        _LOGGER.info("%r: refused: %s: %s", self, code, message)
        return SimFirmwareError(code, message, received_bytes=received_bytes)

    def _fail(self, code: str, message: str) -> SimFirmwareError:
        """A failure of the transfer in progress: it is dropped, the inactive slot stays empty."""
        self._transfer = None
        self._state = FAILED
        self._error = (code, message)
        _LOGGER.warning("%r: update failed: %s: %s", self, code, message)
        return SimFirmwareError(code, message)


@runtime_checkable
class _HasFaults(Protocol):
    def faults(self) -> Sequence[Fault]: ...


class FirmwareModule:
    """A ``SimulatedModule`` as its firmware makes it look: the identity reports the running firmware
    version, and while the running image is unhealthy the telemetry state is ``FAULT`` and ``faults()``
    lists ``firmware_unhealthy``.  The simulated endpoints serve this wrapper when given a ``SimFirmware``;
    setpoints go to the wrapped module unchanged."""

    __slots__ = ("_firmware", "_module")

    def __init__(self, module: SimulatedModule, firmware: SimFirmware) -> None:
        self._module = module
        self._firmware = firmware

    @property
    def module(self) -> SimulatedModule:
        return self._module

    @property
    def firmware(self) -> SimFirmware:
        return self._firmware

    @property
    def info(self) -> DeviceInfo:
        info = self._module.info
        return replace(info, identity=replace(info.identity, firmware_version=self._firmware.running_version))

    def telemetry(self) -> Telemetry:
        sample = self._module.telemetry()
        return sample if self._firmware.healthy else sample.with_state(OperatingState.FAULT)

    def apply(self, setpoint: Setpoint, *, revert_after_s: float | None = None) -> None:
        self._module.apply(setpoint, revert_after_s=revert_after_s)

    def faults(self) -> Sequence[Fault]:
        inner = self._module
        if isinstance(inner, _HasFaults):
            faults = list(inner.faults())
        elif inner.telemetry().state is OperatingState.FAULT:
            faults = [Fault("fault", "the module reports a fault")]
        else:
            faults = []
        if not self._firmware.healthy:
            faults.append(
                Fault(
                    "firmware_unhealthy",
                    f"firmware {self._firmware.running_version} failed its self-test after booting",
                )
            )
        return faults
