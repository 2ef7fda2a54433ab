"""Onboarding: from a module heard on the network (or typed in by address) to a registered, trusted module.

Discovery sources report ``Sighting``s here (this class is their ``SightingSink``).  Each new announcement
becomes a *candidate*, which a small pool of workers examines: probe it with the driver its announcement
names, check that the module says it is who the announcement claims, and — for modules that can — run the
challenge–response authentication against the vendor keys the hub trusts.  A candidate ends *verified*
(identity proven), *unverified* (identified but nothing proven: legacy SunSpec, or an ORES module without a
certificate) or *rejected* (with the reason).  Policy decides what happens next: ``approve`` waits for a user
to approve; ``auto`` registers verified modules at once while a pairing window, opened by a user, is open.
Unverified modules are only ever registered on explicit approval.  Registration provisions a per-device
credential into modules that support it, so their API answers only this hub.

A module already registered that turns up at a new address keeps its record: the hub checks it (and, if it
was authenticated, authenticates it again) before moving the address.  A different module answering at a
registered address raises an alert.  Everything is bounded — candidates, rejected entries, work in flight —
so a flood of fake announcements costs little and changes nothing that is registered.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from devices.attest import AttestationError, ChallengeBook, verify_attestation
from devices.drivers.base import Address, Driver, driver_for_protocol, probe_address
from devices.errors import DeviceError, NotSupported
from devices.model import DeviceInfo, DeviceKind, make_device_id
from devices.ores_http_wire import generate_credential
from discovery.base import Sighting, Source
from hub.context import HubContext
from hub.registry import DeviceRecord

_LOGGER = logging.getLogger(__name__)

MAX_CANDIDATES = 256
MAX_REJECTED = 200
WORKERS = 4
GONE_FORGET_S = 600.0
CREDENTIAL_KEY = "credential"


class OnboardingError(Exception):
    """Root of onboarding failures reported to the API."""


class CandidateNotFound(OnboardingError):
    pass


class NotApprovable(OnboardingError):
    pass


class CandidateStatus(enum.StrEnum):
    PENDING = "pending"  # heard, not examined yet
    EXAMINING = "examining"
    VERIFIED = "verified"  # identity proven by a trusted vendor's certificate
    UNVERIFIED = "unverified"  # identified, nothing proven: registered only on explicit approval
    REJECTED = "rejected"
    GONE = "gone"  # the announcement ended before registration


@dataclass(slots=True)
class Candidate:
    """A discovered, unregistered module (mutable: owned by ``Onboarding`` on the event loop)."""

    candidate_id: str
    sighting: Sighting
    first_seen: float
    last_seen: float
    status: CandidateStatus = CandidateStatus.PENDING
    info: DeviceInfo | None = None
    proven: bool = False
    reason: str | None = None
    module_provisioned: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        s = self.sighting
        ident = self.info.identity if self.info else None
        return {
            "candidate_id": self.candidate_id,
            "source": s.source.value,
            "status": self.status.value,
            "kind": (self.info.kind if self.info else s.kind).value,
            "vendor": ident.vendor if ident else s.vendor,
            "model": ident.model if ident else s.model,
            "serial": ident.serial if ident else s.serial,
            "firmware_version": ident.firmware_version if ident else None,
            "protocol": s.protocol,
            "address": str(s.address) if s.address else None,
            "ble_address": s.ble_address,
            "identity_proven": self.proven,
            "unprovisioned": s.unprovisioned,
            "reason": self.reason,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
        }


@dataclass(frozen=True, slots=True)
class Rejection:
    at: float
    source: str
    key: str
    reason: str


class Onboarding:
    """The hub's ``SightingSink`` and the one path by which modules get registered."""

    def __init__(self, hub: HubContext, *, clock: Callable[[], float] = time.time) -> None:
        self._hub = hub
        self._clock = clock
        self.candidates: OrderedDict[str, Candidate] = OrderedDict()
        self.rejections: deque[Rejection] = deque(maxlen=MAX_REJECTED)
        self._keys: dict[tuple[Source, str], str] = {}
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize=MAX_CANDIDATES)
        self._queued: set[str] = set()
        self._workers: list[asyncio.Task[None]] = []
        self._bg: set[asyncio.Task[Any]] = set()
        self._challenges = ChallengeBook()
        self._locks: dict[str, asyncio.Lock] = {}
        self._window_until = 0.0
        self._flood_logged_at = 0.0
        self._examined = asyncio.Condition()
        self.on_window_change: Callable[[bool], None] | None = None

    # --------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        for n in range(WORKERS):
            self._workers.append(asyncio.create_task(self._work(), name=f"onboarding-{n}"))

    async def stop(self) -> None:
        tasks = [*self._workers, *self._bg]
        self._workers.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # --------------------------------------------------------------------------------------- window

    @property
    def window_open(self) -> bool:
        return self._clock() < self._window_until

    @property
    def window_closes_at(self) -> float | None:
        return self._window_until if self.window_open else None

    def open_window(self, duration_s: float) -> None:
        """Open the pairing window (like a WPS button): in ``auto`` policy, verified modules register."""
        self._window_until = self._clock() + duration_s
        _LOGGER.info("pairing window open for %.0f s", duration_s)
        self._hub.bus.publish("discovery.window", open=True, closes_at=self._window_until)
        if self.on_window_change is not None:
            self.on_window_change(True)
        for cand in list(self.candidates.values()):
            if cand.status is CandidateStatus.VERIFIED:
                self._spawn(self._auto_register(cand))
        self._spawn(self._close_window_later(duration_s))

    def close_window(self) -> None:
        self._window_until = 0.0
        self._hub.bus.publish("discovery.window", open=False, closes_at=None)
        if self.on_window_change is not None:
            self.on_window_change(False)

    async def _close_window_later(self, duration_s: float) -> None:
        until = self._window_until
        await asyncio.sleep(duration_s)
        if self._window_until == until:
            self.close_window()

    # --------------------------------------------------------------------------------------- SightingSink

    def seen(self, sighting: Sighting) -> None:
        now = self._clock()
        claimed = sighting.claimed_id
        self._keys[(sighting.source, sighting.key)] = claimed
        record = self._hub.registry.get(claimed)
        if record is not None:
            self._known_module_seen(record, sighting)
            return
        cand = self.candidates.get(claimed)
        if cand is None:
            if len(self.candidates) >= MAX_CANDIDATES and not self._evict_one():
                self._flooded(sighting)
                return
            cand = Candidate(claimed, sighting, now, now)
            self.candidates[claimed] = cand
        else:
            changed = cand.sighting != sighting
            cand.last_seen = now
            cand.sighting = sighting
            if not changed and cand.status is not CandidateStatus.GONE:
                return
            if cand.status in (CandidateStatus.GONE, CandidateStatus.REJECTED) or changed:
                cand.status = CandidateStatus.PENDING
        self._hub.bus.publish("discovery.updated", candidate=cand.as_dict())
        self._enqueue(cand.candidate_id)

    def gone(self, source: Source, key: str, reason: str) -> None:
        claimed = self._keys.pop((source, key), None)
        if claimed is None:
            return
        if self._hub.registry.get(claimed) is not None:
            _LOGGER.info("%s left the network (%s)", claimed, reason)
            self._hub.state.set_online(claimed, False, f"announcement ended: {reason}")
            return
        cand = self.candidates.get(claimed)
        if cand is not None and cand.status is not CandidateStatus.REJECTED:
            cand.status = CandidateStatus.GONE
            cand.reason = reason
            self._hub.bus.publish("discovery.updated", candidate=cand.as_dict())

    def rejected(self, source: Source, key: str, reason: str) -> None:
        self._reject_entry(source.value, key, reason)

    def _reject_entry(self, source: str, key: str, reason: str) -> None:
        entry = Rejection(self._clock(), source, key[:200], reason[:500])
        self.rejections.appendleft(entry)
        self._hub.bus.publish("discovery.rejected", source=source, key=entry.key, reason=entry.reason)

    def _flooded(self, sighting: Sighting) -> None:
        now = self._clock()
        if now - self._flood_logged_at > 60:
            self._flood_logged_at = now
            _LOGGER.warning(
                "more than %s unregistered modules are announcing; ignoring new ones (%s)",
                MAX_CANDIDATES,
                sighting.key,
            )
        self._reject_entry(sighting.source.value, sighting.key, "too many unregistered modules announcing")

    def _evict_one(self) -> bool:
        """Make room by forgetting the oldest gone or rejected candidate."""
        for cid, cand in self.candidates.items():
            if cand.status in (CandidateStatus.GONE, CandidateStatus.REJECTED):
                del self.candidates[cid]
                return True
        return False

    # --------------------------------------------------------------------------------------- examination

    def _enqueue(self, candidate_id: str) -> None:
        if candidate_id in self._queued:
            return
        try:
            self._queue.put_nowait(candidate_id)
        except asyncio.QueueFull:
            return  # stays pending; examined when seen again or on a rescan
        self._queued.add(candidate_id)

    async def _work(self) -> None:
        while True:
            cid = await self._queue.get()
            self._queued.discard(cid)
            cand = self.candidates.get(cid)
            if cand is None or cand.status is not CandidateStatus.PENDING:
                continue
            try:
                await self._examine(cand)
            except Exception:
                _LOGGER.exception("examining %s failed", cid)
                cand.status = CandidateStatus.REJECTED
                cand.reason = "internal error while examining"
            self._hub.bus.publish("discovery.updated", candidate=cand.as_dict())
            async with self._examined:
                self._examined.notify_all()
            if cand.status is CandidateStatus.VERIFIED:
                await self._auto_register(cand)

    async def _examine(self, cand: Candidate) -> None:
        cand.status = CandidateStatus.EXAMINING
        s = cand.sighting
        address = self._address_of(s)
        try:
            driver, info, proven = await self.identify(address, s.protocol, claimed=(s.vendor, s.serial))
        except (DeviceError, AttestationError, OnboardingError) as err:
            cand.status = CandidateStatus.REJECTED
            cand.reason = str(err)
            _LOGGER.warning("rejected %s from %s: %s", cand.candidate_id, s.source.value, err)
            self._reject_entry(s.source.value, s.key, str(err))
            return
        cand.module_provisioned = getattr(driver, "provisioned", None)
        await driver.close()
        cand.info = info
        cand.proven = proven
        cand.reason = None if proven else "identity not proven: registration needs approval"
        cand.status = CandidateStatus.VERIFIED if proven else CandidateStatus.UNVERIFIED

    @staticmethod
    def _address_of(s: Sighting) -> Address:
        if s.address is not None:
            return s.address
        if s.ble_address:
            return Address("ble", s.ble_address, 0)
        raise OnboardingError("the announcement has no address")

    async def identify(
        self, address: Address, protocol: str | None, *, claimed: tuple[str, str] | None
    ) -> tuple[Driver, DeviceInfo, bool]:
        """Probe ``address``; check the module is who ``claimed`` (vendor, serial) says; authenticate it if it
        can.  Returns the open driver, what it learnt, and whether the identity is proven."""
        driver, info = await probe_address(address, protocol=protocol, timeout=self._timeout(protocol))
        try:
            if claimed is not None and info.device_id != make_device_id(*claimed):
                raise OnboardingError(
                    f"announced as {claimed[0]} {claimed[1]} but the module says it is "
                    f"{info.identity.vendor} {info.identity.serial}"
                )
            if info.kind is DeviceKind.UNKNOWN:
                raise OnboardingError("the module did not say what kind of device it is")
            proven = await self._authenticate(driver, info)
        except BaseException:
            await driver.close()
            raise
        return driver, info, proven

    async def _authenticate(self, driver: Driver, info: DeviceInfo) -> bool:
        authenticate = getattr(driver, "authenticate", None)
        if authenticate is None:
            return False  # the protocol cannot prove anything (SunSpec)
        nonce = self._challenges.issue()
        try:
            cert, signature = await authenticate(nonce, self._hub.settings.hub_id)
        except NotSupported:
            return False  # an ORES module without a certificate: like a legacy module
        self._challenges.consume(nonce)
        verify_attestation(
            cert,
            signature,
            nonce=nonce,
            hub_id=self._hub.settings.hub_id,
            trusted=self._hub.trust.trusted("device"),
            claimed=(info.identity.vendor, info.identity.serial),
        )
        return True

    # --------------------------------------------------------------------------------------- registration

    async def _auto_register(self, cand: Candidate) -> None:
        if (
            self._hub.settings.hub.onboarding_policy == "auto"
            and self.window_open
            and cand.status is CandidateStatus.VERIFIED
        ):
            try:
                await self.approve(cand.candidate_id, name=None, by="auto")
            except (DeviceError, OnboardingError) as err:
                _LOGGER.warning("automatic registration of %s failed: %s", cand.candidate_id, err)

    async def approve(self, candidate_id: str, *, name: str | None, by: str | None) -> DeviceRecord:
        """Register a discovered module (a user's approval, or ``auto`` policy)."""
        cand = self.candidates.get(candidate_id)
        if cand is None:
            raise CandidateNotFound(f"no discovered module {candidate_id!r}")
        if cand.status not in (CandidateStatus.VERIFIED, CandidateStatus.UNVERIFIED):
            raise NotApprovable(
                f"{candidate_id} is {cand.status.value}" + (f": {cand.reason}" if cand.reason else "")
            )
        assert cand.info is not None
        address = self._address_of(cand.sighting)
        record, _ = await self.register(
            address,
            cand.sighting.protocol,
            cand.info,
            cand.proven,
            name=name,
            by=by,
            module_provisioned=cand.module_provisioned,
        )
        self.candidates.pop(candidate_id, None)
        return record

    async def register(
        self,
        address: Address,
        protocol: str,
        info: DeviceInfo,
        proven: bool,
        *,
        name: str | None,
        by: str | None,
        module_provisioned: bool | None = None,
    ) -> tuple[DeviceRecord, bool]:
        """Store a module that was identified at ``address``; provision a credential if it is proven, its
        protocol supports one and it does not hold ours yet (``module_provisioned`` is what its probe said).
        Returns the record and whether it is new.  One registration per module at a time."""
        lock = self._locks.setdefault(info.device_id, asyncio.Lock())
        async with lock:
            return await self._register_locked(
                address, protocol, info, proven, name=name, by=by, module_provisioned=module_provisioned
            )

    async def _register_locked(
        self,
        address: Address,
        protocol: str,
        info: DeviceInfo,
        proven: bool,
        *,
        name: str | None,
        by: str | None,
        module_provisioned: bool | None,
    ) -> tuple[DeviceRecord, bool]:
        hub = self._hub
        existing = hub.registry.get(info.device_id)
        settings = dict(existing.settings) if existing else {}
        current = settings.get(CREDENTIAL_KEY)
        if proven and (not current or module_provisioned is False):
            credential = generate_credential()
            rekey = current if module_provisioned else None
            if await self._provision(address, protocol, credential, current=rekey):
                settings[CREDENTIAL_KEY] = credential
        record = DeviceRecord.from_info(
            info,
            address,
            protocol,
            name=name or (existing.name if existing else None),
            authenticated=proven,
            registered_at=existing.registered_at if existing else None,
            settings=settings,
        )
        record, created = await hub.registry.upsert(record)
        hub.links.add(record)
        self.candidates.pop(info.device_id, None)
        hub.bus.publish(
            "device.registered" if created else "device.updated",
            device_id=record.device_id,
            authenticated=record.authenticated,
            by=by,
        )
        _LOGGER.info(
            "registered %s (%s, %s) at %s%s",
            record.device_id,
            record.kind.value,
            "authenticated" if record.authenticated else "unauthenticated",
            address,
            f" by {by}" if by else "",
        )
        return record, created

    async def _provision(
        self, address: Address, protocol: str, credential: str, *, current: str | None
    ) -> bool:
        """Give the module a fresh credential (re-keying with the ``current`` one if it has one from us)."""
        driver = driver_for_protocol(protocol)(address, timeout=self._timeout(protocol))
        provision = getattr(driver, "provision", None)
        try:
            if provision is None:
                return False
            set_credential = getattr(driver, "set_credential", None)
            if current and set_credential is not None:
                set_credential(current)
            await provision(credential, self._hub.settings.hub_id)
            return True
        finally:
            await driver.close()

    def _timeout(self, protocol: str | None) -> float:
        # A BLE connection takes seconds to set up; IP modules answer in milliseconds.
        base = self._hub.settings.hub.timeout_s
        return max(base, 5.0) if protocol == "ble-gatt" else base

    async def deprovision(self, record: DeviceRecord) -> None:
        """Best effort: tell a removed module it has no hub any more."""
        credential = record.settings.get(CREDENTIAL_KEY)
        if not credential:
            return
        driver = driver_for_protocol(record.protocol)(Address.parse(record.address), timeout=2.0)
        try:
            set_credential = getattr(driver, "set_credential", None)
            deprovision = getattr(driver, "deprovision", None)
            if set_credential is not None and deprovision is not None:
                set_credential(credential)
                await deprovision()
        except DeviceError as err:
            _LOGGER.info("could not deprovision %s: %s", record.device_id, err)
        finally:
            await driver.close()

    # --------------------------------------------------------------------------------------- known modules

    def _known_module_seen(self, record: DeviceRecord, sighting: Sighting) -> None:
        if sighting.address is None or str(sighting.address) == record.address:
            return
        self._spawn(self._move(record, sighting))

    async def _move(self, record: DeviceRecord, sighting: Sighting) -> None:
        """A registered module announces a new address: check it, then move the record (never duplicate)."""
        address = sighting.address
        assert address is not None
        try:
            driver, info, proven = await self.identify(
                address, record.protocol, claimed=(record.identity.vendor, record.identity.serial)
            )
        except (DeviceError, AttestationError, OnboardingError) as err:
            _LOGGER.warning(
                "%s announced a new address %s that failed the check: %s", record.device_id, address, err
            )
            self._reject_entry(sighting.source.value, sighting.key, f"claims to be {record.device_id}: {err}")
            return
        lost_credential = proven and getattr(driver, "provisioned", None) is False
        await driver.close()
        if record.authenticated and not proven:
            self._hub.alerts.raise_(
                "identity_mismatch",
                "critical",
                record.device_id,
                f"a module at {address} claims to be {record.device_id} but cannot prove it",
            )
            self._reject_entry(sighting.source.value, sighting.key, "cannot prove the identity it claims")
            return
        clash = self._hub.registry.find_by_address(str(address))
        if clash is not None and clash.device_id != record.device_id:
            self._hub.alerts.raise_(
                "identity_mismatch",
                "critical",
                clash.device_id,
                f"{address} now answers as {record.device_id}",
            )
        changes: dict[str, Any] = {"address": str(address), "identity": info.identity}
        if lost_credential:
            # A factory reset (or a simulated module restarted): it answers anyone again.  Provision anew.
            credential = generate_credential()
            if await self._provision(address, record.protocol, credential, current=None):
                changes["settings"] = {**record.settings, CREDENTIAL_KEY: credential}
        updated = await self._hub.registry.update(record.device_id, **changes)
        self._hub.links.add(updated)
        self._hub.bus.publish("device.moved", device_id=record.device_id, address=str(address))
        _LOGGER.info("%s moved to %s", record.device_id, address)

    # --------------------------------------------------------------------------------------- misc

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def forget_gone(self) -> None:
        now = self._clock()
        for cid, cand in list(self.candidates.items()):
            if cand.status is CandidateStatus.GONE and now - cand.last_seen > GONE_FORGET_S:
                del self.candidates[cid]

    async def wait_examined(self, candidate_id: str, timeout: float = 10.0) -> Candidate:
        """Wait until a candidate is examined (tests and the demo use this instead of sleeping)."""

        def done() -> bool:
            c = self.candidates.get(candidate_id)
            return c is None or c.status not in (CandidateStatus.PENDING, CandidateStatus.EXAMINING)

        async with asyncio.timeout(timeout), self._examined:
            await self._examined.wait_for(done)
        cand = self.candidates.get(candidate_id)
        if cand is None:
            raise CandidateNotFound(candidate_id)
        return cand
