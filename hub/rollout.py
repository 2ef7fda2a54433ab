"""Firmware rollouts: moving one verified release onto chosen modules safely, one canary first.

``RolloutManager.start`` checks the release again (signature against the keys trusted now, the image's hash
on disk) and the targets (registered, compatible model, strictly newer than the version the registry knows),
then runs the rollout in a background task: the first module whose preconditions hold is the canary and must
end ``healthy`` before any other module is touched; the rest follow ``batch_size`` at a time.  For each
module the hub opens its own driver connection (the poller keeps polling on its connection meanwhile),
re-reads the running version from the module (anti-rollback), refuses a battery during a grid outage or
below the safe state of charge, re-verifies the release's signature, transfers the image in chunks
(resuming from the offset the module reports, retrying a failed chunk with backoff), has the module install
it, waits for it to come back with the new version, and watches its telemetry for the health window; an
unhealthy module is rolled back and stops the rollout.  Never all microinverters are down at once: a
microinverter is only told to install while another registered microinverter is online and not itself
installing or rebooting (a site with a single microinverter may update it).  Each module's status
(``queued``, ``transferring`` with its percentage, ``verifying``, ``installing``, ``rebooting``, ``healthy``,
``failed``, ``rolled_back``, each failure with a reason code) is published on the event bus as
``firmware.status`` and written atomically to ``rollouts.json`` on every transition, so after a hub restart
each module that was mid-flight is asked for its true state and its update resumed or concluded.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import enum
import json
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final, TypeVar

from devices.drivers.base import Address, Driver, FirmwareCapable, FirmwareSlots, driver_for_protocol
from devices.errors import CommandRejected, DeviceError, DeviceUnreachable, ProtocolError
from devices.model import DeviceKind, OperatingState
from firmware.manifest import FirmwareError, InvalidVersion, Version
from firmware.verify import check_compatible
from hub import __version__
from hub.firmware_store import FirmwareStore, StoredImage
from hub.poller import LinkManager
from hub.registry import DeviceRecord, Registry, RegistryError
from hub.state import LiveState, site_flows
from hub.storage import atomic_write_bytes

__all__ = [
    "ModuleUpdate",
    "Reason",
    "Rollout",
    "RolloutConfig",
    "RolloutError",
    "RolloutManager",
    "RolloutState",
    "UpdateStatus",
]

_LOGGER = logging.getLogger(__name__)
_T = TypeVar("_T")

FILE_VERSION: Final = 1
#: Module states (as ``FirmwareSlots.state`` reports them) in which the module is busy with an image.
_MODULE_BUSY: Final = frozenset({"verifying", "installing", "rebooting"})


class UpdateStatus(enum.StrEnum):
    """Where one module's update stands."""

    QUEUED = "queued"
    TRANSFERRING = "transferring"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    REBOOTING = "rebooting"
    HEALTHY = "healthy"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"

    @property
    def terminal(self) -> bool:
        return self in (UpdateStatus.HEALTHY, UpdateStatus.FAILED, UpdateStatus.ROLLED_BACK)


class RolloutState(enum.StrEnum):
    """``running``; then ``succeeded`` (every module healthy), ``finished`` (done, some modules were not
    updated, e.g. a battery below the safe SoC) or ``aborted`` (stopped after a failed update, or cancelled)."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FINISHED = "finished"
    ABORTED = "aborted"


@dataclass(frozen=True, slots=True)
class Reason:
    """Why a module was not updated (or a rollout stopped): a stable code and a precise message."""

    code: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}

    @classmethod
    def of(cls, err: FirmwareError) -> Reason:
        return cls(err.code, err.message)


@dataclass(frozen=True, slots=True)
class ModuleUpdate:
    """One module's part in a rollout.  ``from_version`` is the version it ran before (as the module itself
    reported it once asked); ``detail`` a human note (waiting for another inverter, health check running)."""

    device_id: str
    kind: DeviceKind
    model: str
    from_version: str
    status: UpdateStatus = UpdateStatus.QUEUED
    progress_pct: int = 0
    canary: bool = False
    reason: Reason | None = None
    detail: str | None = None
    updated_at: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "kind": self.kind.value,
            "model": self.model,
            "from_version": self.from_version,
            "status": self.status.value,
            "progress_pct": self.progress_pct,
            "canary": self.canary,
            "reason": None if self.reason is None else self.reason.to_dict(),
            "detail": self.detail,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ModuleUpdate:
        try:
            status = UpdateStatus(str(doc["status"]))
            reason = _reason(doc.get("reason"))
        except ValueError:  # a status this hub does not know (written by a newer hub)
            status = UpdateStatus.FAILED
            reason = Reason("unknown_state", f"unknown stored status {doc.get('status')!r}")
        return cls(
            device_id=str(doc["device_id"]),
            kind=DeviceKind(str(doc.get("kind", "unknown"))),
            model=str(doc.get("model", "")),
            from_version=str(doc.get("from_version", "")),
            status=status,
            progress_pct=int(doc.get("progress_pct", 0)),
            canary=bool(doc.get("canary", False)),
            reason=reason,
            detail=None if doc.get("detail") is None else str(doc["detail"]),
            updated_at=float(doc.get("updated_at", 0.0)),
        )


def _reason(value: Any) -> Reason | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("reason must be an object")
    return Reason(str(value.get("code", "")), str(value.get("message", "")))


@dataclass(frozen=True, slots=True)
class Rollout:
    """One release going onto a set of modules, and where each of them stands."""

    rollout_id: str
    sha256: str
    vendor: str
    version: str
    target_model: str | None
    batch_size: int
    health_window_s: float
    created_at: float
    created_by: str | None
    modules: tuple[ModuleUpdate, ...]
    state: RolloutState = RolloutState.RUNNING
    reason: Reason | None = None
    finished_at: float | None = None

    def module(self, device_id: str) -> ModuleUpdate | None:
        for mod in self.modules:
            if mod.device_id == device_id:
                return mod
        return None

    def counts(self) -> dict[str, int]:
        counts = {status.value: 0 for status in UpdateStatus}
        for mod in self.modules:
            counts[mod.status.value] += 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "rollout_id": self.rollout_id,
            "sha256": self.sha256,
            "vendor": self.vendor,
            "version": self.version,
            "target_model": self.target_model,
            "batch_size": self.batch_size,
            "health_window_s": self.health_window_s,
            "created_at": self.created_at,
            "created_by": self.created_by,
            "state": self.state.value,
            "reason": None if self.reason is None else self.reason.to_dict(),
            "finished_at": self.finished_at,
            "modules": [m.to_dict() for m in self.modules],
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Rollout:
        target = doc.get("target_model")
        created_by = doc.get("created_by")
        finished = doc.get("finished_at")
        try:
            state = RolloutState(str(doc["state"]))
        except ValueError:
            state = RolloutState.ABORTED
        return cls(
            rollout_id=str(doc["rollout_id"]),
            sha256=str(doc["sha256"]),
            vendor=str(doc["vendor"]),
            version=str(doc["version"]),
            target_model=None if target is None else str(target),
            batch_size=int(doc["batch_size"]),
            health_window_s=float(doc["health_window_s"]),
            created_at=float(doc["created_at"]),
            created_by=None if created_by is None else str(created_by),
            modules=tuple(ModuleUpdate.from_dict(m) for m in doc["modules"]),
            state=state,
            reason=_reason(doc.get("reason")),
            finished_at=None if finished is None else float(finished),
        )


@dataclass(frozen=True, slots=True)
class RolloutConfig:
    """How rollouts behave (defaults for production; tests shorten the times)."""

    #: Modules updated at the same time after the canary.
    batch_size: int = 2
    #: A battery below this state of charge (%) is not updated.
    safe_soc_pct: float = 30.0
    #: How long a module's telemetry must stay healthy after it came back with the new version, s.
    health_window_s: float = 30.0
    #: How often telemetry is read during the health window, s.
    health_poll_s: float = 1.0
    #: Consecutive failed reads during the health window that make a module unhealthy.
    unhealthy_after_failures: int = 3
    #: How long a module may take to verify, install, reboot and answer again, s.
    reboot_timeout_s: float = 180.0
    #: How often ``firmware_status`` is asked while the module installs and reboots, s.
    status_poll_s: float = 0.5
    #: Bound on each driver call of the transfer, s (also the driver's own timeout).
    call_timeout_s: float = 15.0
    #: Chunk size when the driver does not say (``firmware_chunk_bytes``): 64 KiB, ORES-HTTP's.
    chunk_bytes: int = 64 * 1024
    #: Attempts for a failed chunk (or a failed status query before the transfer) before giving up.
    retries: int = 5
    #: First retry delay, doubled after each failure up to ``max_backoff_s``, s.
    retry_backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    #: How long a microinverter waits for another one to be up before it may install, s.
    inverter_wait_s: float = 600.0
    #: Finished rollouts kept in ``rollouts.json``.
    keep_finished: int = 50

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.health_window_s < 0 or self.reboot_timeout_s <= 0 or self.call_timeout_s <= 0:
            raise ValueError("times must be positive")
        if self.chunk_bytes < 1 or self.retries < 1:
            raise ValueError("chunk_bytes and retries must be positive")


class RolloutError(Exception):
    """A rollout cannot start or be changed.  ``code`` is stable (``not_found``, ``image_not_found``,
    ``busy``, ``no_modules``, ``wrong_model``, ``downgrade``, ``not_newer``, ``invalid_version``,
    ``not_running``, ...); ``details`` lists per-module reasons when there are several."""

    def __init__(self, code: str, message: str, details: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details


class _Outcome(enum.Enum):
    UPDATED = "updated"  # healthy on the new version
    SKIPPED = "skipped"  # not updated because a precondition did not hold; the release is not in question
    FAILED = "failed"  # the update was attempted and failed, or was rolled back: stop the rollout


class _Stop(Exception):
    """Ends one module's update with a final status."""

    def __init__(self, status: UpdateStatus, reason: Reason, outcome: _Outcome) -> None:
        super().__init__(reason.message)
        self.status = status
        self.reason = reason
        self.outcome = outcome


def _skip(code: str, message: str) -> _Stop:
    return _Stop(UpdateStatus.FAILED, Reason(code, message), _Outcome.SKIPPED)


def _fail(code: str, message: str) -> _Stop:
    return _Stop(UpdateStatus.FAILED, Reason(code, message), _Outcome.FAILED)


DriverFactory = Callable[[DeviceRecord, float], Driver]


def default_driver(record: DeviceRecord, timeout: float) -> Driver:
    """A new driver for the module (its own connection), logged in with the module's credential."""
    driver = driver_for_protocol(record.protocol)(Address.parse(record.address), timeout=timeout)
    credential = record.settings.get("credential")
    set_credential = getattr(driver, "set_credential", None)
    if credential and set_credential is not None:
        set_credential(credential)
    return driver


class RolloutManager:
    """Starts, runs, persists and reports rollouts (see the module docstring).

    ``start()`` loads ``path`` and resumes the rollouts a previous run left running; ``stop()`` cancels the
    running work and leaves each module's last state in the file for the next start.
    """

    def __init__(
        self,
        store: FirmwareStore,
        registry: Registry,
        state: LiveState,
        path: Path,
        *,
        config: RolloutConfig | None = None,
        driver_factory: DriverFactory = default_driver,
        links: LinkManager | None = None,
        hub_version: str = __version__,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._registry = registry
        self._state = state
        self._path = Path(path)
        #: Used by rollouts started from now on (a running rollout keeps its batch size and health window).
        self.config = config or RolloutConfig()
        self._driver_factory = driver_factory
        self._links = links
        self._hub_version = hub_version
        self._clock = clock
        self._rollouts: dict[str, Rollout] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._cancelled: set[str] = set()
        self._save_lock = asyncio.Lock()
        self._down: set[str] = set()  # microinverters installing or rebooting now
        self._gate = asyncio.Event()  # set (and replaced) whenever an inverter comes back up
        self._started = False

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load the stored rollouts and resume those that were running."""
        if self._started:
            return
        self._started = True
        for rollout in await asyncio.to_thread(self._load):
            self._rollouts[rollout.rollout_id] = rollout
        for rollout in self._rollouts.values():
            if rollout.state is RolloutState.RUNNING:
                _LOGGER.info("resuming firmware rollout %s after a restart", rollout.rollout_id)
                self._spawn(rollout.rollout_id, recovering=True)

    async def stop(self) -> None:
        """Cancel the running rollouts (their state stays in the file; the next start resumes them)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._started = False

    def _load(self) -> list[Rollout]:
        try:
            raw = self._path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            doc = json.loads(raw)
            items = doc["rollouts"]
        except (ValueError, KeyError, TypeError) as err:
            _LOGGER.error("cannot read %s (%s); starting without stored rollouts", self._path, err)
            return []
        rollouts: list[Rollout] = []
        for item in items:
            try:
                rollouts.append(Rollout.from_dict(item))
            except (ValueError, KeyError, TypeError) as err:
                _LOGGER.warning("%s: skipping an unreadable rollout: %s", self._path, err)
        return rollouts

    async def _save(self) -> None:
        async with self._save_lock:
            finished = [r for r in self._rollouts.values() if r.state is not RolloutState.RUNNING]
            finished.sort(key=lambda r: r.created_at)
            for old in finished[: max(0, len(finished) - self.config.keep_finished)]:
                del self._rollouts[old.rollout_id]
            doc = {"version": FILE_VERSION, "rollouts": [r.to_dict() for r in self._rollouts.values()]}
            data = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
            try:
                await asyncio.to_thread(atomic_write_bytes, self._path, data)
            except OSError as err:
                _LOGGER.error("cannot write rollout state %s: %s", self._path, err)

    # ------------------------------------------------------------------------------------------ queries

    def get(self, rollout_id: str) -> Rollout | None:
        return self._rollouts.get(rollout_id)

    def list(self) -> builtins.list[Rollout]:
        """Every known rollout, newest first."""
        return sorted(self._rollouts.values(), key=lambda r: r.created_at, reverse=True)

    def busy_devices(self) -> set[str]:
        """Modules with an unfinished update in a running rollout."""
        return {
            m.device_id
            for r in self._rollouts.values()
            if r.state is RolloutState.RUNNING
            for m in r.modules
            if not m.status.terminal
        }

    def uses_image(self, sha256: str) -> bool:
        """Whether a running rollout still needs this release."""
        return any(r.sha256 == sha256 and r.state is RolloutState.RUNNING for r in self._rollouts.values())

    # ------------------------------------------------------------------------------------------ commands

    async def start_rollout(
        self,
        sha256: str,
        *,
        device_ids: Iterable[str] | None = None,
        model: str | None = None,
        batch_size: int | None = None,
        health_window_s: float | None = None,
        created_by: str | None = None,
    ) -> Rollout:
        """Check the release and the targets, then start updating them in the background; return the new
        rollout (every module ``queued``, or ``failed`` at once for modules of ``model`` that already run
        this version or a newer one).

        Give exactly one of ``device_ids`` and ``model``.  Raise ``RolloutError`` (``image_not_found``,
        ``not_found`` for an unregistered device, ``busy`` for a module in another running rollout,
        ``wrong_model``, ``downgrade`` / ``not_newer`` / ``invalid_version`` against the registry's
        version, ``no_modules``) or the release's ``FirmwareError`` (``untrusted_key`` after its key was
        removed, ``hash_mismatch`` if the stored image changed, ...).  No module is contacted before this
        returns."""
        if (device_ids is None) == (model is None):
            raise RolloutError("invalid_targets", "give exactly one of device_ids and model")
        image = self._store.get(sha256)
        if image is None:
            raise RolloutError("image_not_found", f"no stored firmware image {sha256!r}")
        manifest = self._store.check_trust(image)
        await self._store.check_image(image)
        batch = self.config.batch_size if batch_size is None else batch_size
        window = self.config.health_window_s if health_window_s is None else health_window_s
        if batch < 1 or window < 0:
            raise RolloutError("invalid_targets", "batch_size must be ≥ 1 and health_window_s ≥ 0")
        now = self._clock()
        busy = self.busy_devices()
        modules: builtins.list[ModuleUpdate] = []
        if device_ids is not None:
            problems: builtins.list[dict[str, str]] = []
            seen: set[str] = set()
            for device_id in device_ids:
                if device_id in seen:
                    continue
                seen.add(device_id)
                record = self._registry.get(device_id)
                if record is None:
                    problems.append(
                        {"device_id": device_id, "code": "not_found", "message": "not registered"}
                    )
                    continue
                if device_id in busy:
                    problems.append(
                        {"device_id": device_id, "code": "busy", "message": "in another running rollout"}
                    )
                    continue
                try:
                    check_compatible(
                        manifest,
                        model=record.identity.model,
                        running_version=record.identity.firmware_version or None,
                        hub_version=None,
                    )
                except FirmwareError as err:
                    problems.append({"device_id": device_id, "code": err.code, "message": err.message})
                    continue
                modules.append(_queued(record, now))
            if problems:
                first = problems[0]
                raise RolloutError(
                    first["code"], f"{first['device_id']}: {first['message']}", details=problems
                )
            if not modules:
                raise RolloutError("no_modules", "no device ids given")
        else:
            assert model is not None
            if model not in manifest.models:
                raise RolloutError(
                    "wrong_model", f"image is for model(s) {', '.join(manifest.models)}, not for {model!r}"
                )
            records = [r for r in self._registry.all() if r.identity.model == model]
            if not records:
                raise RolloutError("no_modules", f"no registered module of model {model!r}")
            for record in records:
                if record.device_id in busy:
                    raise RolloutError(
                        "busy",
                        f"{record.device_id} is in another running rollout",
                        details=[{"device_id": record.device_id, "code": "busy", "message": "busy"}],
                    )
                mod = _queued(record, now)
                try:
                    check_compatible(
                        manifest,
                        model=model,
                        running_version=record.identity.firmware_version or None,
                        hub_version=None,
                    )
                except FirmwareError as err:
                    mod = replace(mod, status=UpdateStatus.FAILED, reason=Reason.of(err))
                modules.append(mod)
        rollout = Rollout(
            rollout_id=secrets.token_hex(8),
            sha256=image.sha256,
            vendor=manifest.vendor,
            version=str(manifest.version),
            target_model=model,
            batch_size=batch,
            health_window_s=window,
            created_at=now,
            created_by=created_by,
            modules=tuple(modules),
        )
        self._rollouts[rollout.rollout_id] = rollout
        await self._save()
        self._publish_rollout(rollout)
        for mod in rollout.modules:
            self._publish_module(rollout, mod)
        _LOGGER.info(
            "firmware rollout %s: %s %s to %s (started by %s)",
            rollout.rollout_id,
            rollout.vendor,
            rollout.version,
            ", ".join(m.device_id for m in rollout.modules),
            created_by,
        )
        self._spawn(rollout.rollout_id, recovering=False)
        return rollout

    async def cancel(self, rollout_id: str) -> Rollout:
        """Stop a running rollout: queued modules are not updated; a module in the middle of its update
        finishes it (or is rolled back) first.  Raise ``RolloutError`` (``not_found``, ``not_running``)."""
        rollout = self._rollouts.get(rollout_id)
        if rollout is None:
            raise RolloutError("not_found", f"no rollout {rollout_id!r}")
        if rollout.state is not RolloutState.RUNNING:
            raise RolloutError("not_running", f"rollout {rollout_id} is {rollout.state.value}")
        self._cancelled.add(rollout_id)
        await self._abort_queued(rollout_id, Reason("cancelled", "the rollout was cancelled"))
        return self._rollouts[rollout_id]

    # ------------------------------------------------------------------------------------------ bookkeeping

    def _spawn(self, rollout_id: str, *, recovering: bool) -> None:
        task = asyncio.create_task(self._run(rollout_id, recovering), name=f"rollout:{rollout_id}")
        self._tasks[rollout_id] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._tasks.get(rollout_id) is t:
                del self._tasks[rollout_id]

        task.add_done_callback(done)

    def _publish_module(self, rollout: Rollout, mod: ModuleUpdate) -> None:
        self._state.bus.publish(
            "firmware.status",
            rollout_id=rollout.rollout_id,
            sha256=rollout.sha256,
            version=rollout.version,
            **mod.to_dict(),
        )

    def _publish_rollout(self, rollout: Rollout) -> None:
        self._state.bus.publish(
            "firmware.rollout",
            rollout_id=rollout.rollout_id,
            sha256=rollout.sha256,
            version=rollout.version,
            state=rollout.state.value,
            reason=None if rollout.reason is None else rollout.reason.to_dict(),
            counts=rollout.counts(),
        )

    def _replace_module(self, rollout_id: str, device_id: str, **changes: Any) -> ModuleUpdate:
        rollout = self._rollouts[rollout_id]
        mods = list(rollout.modules)
        for i, mod in enumerate(mods):
            if mod.device_id == device_id:
                mods[i] = replace(mod, updated_at=self._clock(), **changes)
                self._rollouts[rollout_id] = replace(rollout, modules=tuple(mods))
                self._publish_module(rollout, mods[i])
                return mods[i]
        raise KeyError(device_id)

    async def _set(self, rollout_id: str, device_id: str, status: UpdateStatus, **changes: Any) -> None:
        """A status transition: published, then written to the file before the work goes on."""
        changes.setdefault("detail", None)
        mod = self._replace_module(rollout_id, device_id, status=status, **changes)
        if status.terminal:
            _LOGGER.info(
                "firmware rollout %s: %s is %s%s",
                rollout_id,
                device_id,
                status.value,
                f" ({mod.reason.code}: {mod.reason.message})" if mod.reason else "",
            )
        await self._save()

    def _progress(self, rollout_id: str, device_id: str, pct: int) -> None:
        """Transfer progress: published, not written (after a restart the module says how far it got)."""
        mod = self._rollouts[rollout_id].module(device_id)
        if mod is not None and (pct >= mod.progress_pct + 5 or (pct == 100 and mod.progress_pct != 100)):
            self._replace_module(rollout_id, device_id, progress_pct=pct)

    async def _abort_queued(self, rollout_id: str, reason: Reason) -> None:
        rollout = self._rollouts[rollout_id]
        for mod in rollout.modules:
            if mod.status is UpdateStatus.QUEUED:
                self._replace_module(rollout_id, mod.device_id, status=UpdateStatus.FAILED, reason=reason)
        self._rollouts[rollout_id] = replace(self._rollouts[rollout_id], reason=reason)
        await self._save()

    async def _finish(self, rollout_id: str, aborted: Reason | None) -> None:
        rollout = self._rollouts[rollout_id]
        if aborted is not None:
            await self._abort_queued(rollout_id, aborted)
            rollout = self._rollouts[rollout_id]
            state = RolloutState.ABORTED
        elif rollout_id in self._cancelled or (
            rollout.reason is not None and rollout.reason.code == "cancelled"
        ):
            state = RolloutState.ABORTED
        elif all(m.status is UpdateStatus.HEALTHY for m in rollout.modules):
            state = RolloutState.SUCCEEDED
        else:
            state = RolloutState.FINISHED
        self._cancelled.discard(rollout_id)
        rollout = replace(rollout, state=state, finished_at=self._clock())
        self._rollouts[rollout_id] = rollout
        await self._save()
        self._publish_rollout(rollout)
        _LOGGER.info("firmware rollout %s %s: %s", rollout_id, state.value, rollout.counts())

    # ------------------------------------------------------------------------------------------ the rollout

    async def _run(self, rollout_id: str, recovering: bool) -> None:
        try:
            aborted = await self._run_modules(rollout_id, recovering)
        except asyncio.CancelledError:
            raise
        except Exception:
            _LOGGER.exception("firmware rollout %s failed unexpectedly", rollout_id)
            aborted = Reason("internal_error", "the rollout stopped on an internal error; see the hub's log")
        await self._finish(rollout_id, aborted)

    async def _run_modules(self, rollout_id: str, recovering: bool) -> Reason | None:
        """Canary, then batches.  Returns why the rollout stopped early, or ``None``."""
        rollout = self._rollouts[rollout_id]
        if recovering:
            in_flight = [
                m.device_id
                for m in rollout.modules
                if not m.status.terminal and m.status is not UpdateStatus.QUEUED
            ]
            if in_flight:
                outcomes = await asyncio.gather(
                    *(self._update(rollout_id, device_id, recovering=True) for device_id in in_flight)
                )
                stopped = self._failure_among(rollout_id, in_flight, outcomes)
                if stopped is not None:
                    return stopped
                for device_id, outcome in zip(in_flight, outcomes, strict=True):
                    if outcome is _Outcome.SKIPPED:
                        self._replace_module(rollout_id, device_id, canary=False)
        canary_done = any(
            m.canary and m.status is UpdateStatus.HEALTHY for m in self._rollouts[rollout_id].modules
        )
        while not canary_done:
            queued = self._queued(rollout_id)
            if not queued or rollout_id in self._cancelled:
                return None
            device_id = queued[0]
            self._replace_module(rollout_id, device_id, canary=True)
            outcome = await self._update(rollout_id, device_id, recovering=False)
            if outcome is _Outcome.UPDATED:
                canary_done = True
            elif outcome is _Outcome.FAILED:
                return self._abort_reason(rollout_id, [device_id], canary=True)
            else:
                self._replace_module(rollout_id, device_id, canary=False)  # not updated: the next one is
        batch = self._rollouts[rollout_id].batch_size
        while True:
            queued = self._queued(rollout_id)
            if not queued or rollout_id in self._cancelled:
                return None
            group = queued[:batch]
            outcomes = await asyncio.gather(
                *(self._update(rollout_id, device_id, recovering=False) for device_id in group)
            )
            stopped = self._failure_among(rollout_id, group, outcomes)
            if stopped is not None:
                return stopped

    def _queued(self, rollout_id: str) -> builtins.list[str]:
        return [m.device_id for m in self._rollouts[rollout_id].modules if m.status is UpdateStatus.QUEUED]

    def _failure_among(
        self, rollout_id: str, group: builtins.list[str], outcomes: builtins.list[_Outcome]
    ) -> Reason | None:
        failed = [d for d, o in zip(group, outcomes, strict=True) if o is _Outcome.FAILED]
        return self._abort_reason(rollout_id, failed, canary=False) if failed else None

    def _abort_reason(self, rollout_id: str, failed: builtins.list[str], *, canary: bool) -> Reason:
        mod = self._rollouts[rollout_id].module(failed[0])
        why = f" ({mod.reason.code}: {mod.reason.message})" if mod is not None and mod.reason else ""
        what = "the canary" if canary else ", ".join(failed)
        return Reason("aborted", f"rollout stopped because the update of {what} failed{why}")

    # ------------------------------------------------------------------------------------------ one module

    async def _update(self, rollout_id: str, device_id: str, *, recovering: bool) -> _Outcome:
        """Update one module from wherever it stands; set its final status; return the outcome."""
        try:
            await self._update_steps(rollout_id, device_id, recovering)
        except _Stop as stop:
            await self._set(rollout_id, device_id, stop.status, reason=stop.reason)
            return stop.outcome
        except Exception:
            _LOGGER.exception("firmware update of %s failed unexpectedly", device_id)
            reason = Reason("internal_error", "the update stopped on an internal error; see the hub's log")
            await self._set(rollout_id, device_id, UpdateStatus.FAILED, reason=reason)
            return _Outcome.FAILED
        finally:
            self._release_inverter(device_id)
        await self._set(rollout_id, device_id, UpdateStatus.HEALTHY, progress_pct=100, reason=None)
        return _Outcome.UPDATED

    async def _update_steps(self, rollout_id: str, device_id: str, recovering: bool) -> None:
        rollout = self._rollouts[rollout_id]
        mod = rollout.module(device_id)
        assert mod is not None
        record = self._registry.get(device_id)
        if record is None:
            raise _skip("not_found", f"{device_id} is no longer registered")
        image = self._store.get(rollout.sha256)
        if image is None:
            raise _skip("image_not_found", f"the image {rollout.sha256} was deleted")
        try:
            driver = self._driver_factory(record, self.config.call_timeout_s)
        except (DeviceError, ValueError) as err:
            raise _skip(
                "not_supported", f"no driver for {record.protocol} at {record.address}: {err}"
            ) from err
        try:
            if not isinstance(driver, FirmwareCapable):
                raise _skip("not_supported", f"the {record.protocol} driver cannot update firmware")
            await self._drive(rollout_id, mod, record, image, driver, recovering=recovering)
        finally:
            with contextlib.suppress(Exception):
                await driver.close()

    async def _drive(
        self,
        rollout_id: str,
        mod: ModuleUpdate,
        record: DeviceRecord,
        image: StoredImage,
        driver: FirmwareCapable,
        *,
        recovering: bool,
    ) -> None:
        device_id = mod.device_id
        target = image.manifest.version
        if (
            recovering
            and mod.status is not UpdateStatus.QUEUED
            and await self._recover(rollout_id, mod, record, driver, target)
        ):
            await self._updated(record.device_id, str(target))
            return
        slots = await self._status_with_retries(driver, device_id)
        if mod.status is UpdateStatus.QUEUED or not mod.from_version:
            self._replace_module(rollout_id, device_id, from_version=slots.active_version)
            mod = replace(mod, from_version=slots.active_version)
        try:
            check_compatible(
                image.manifest,
                model=record.identity.model,
                running_version=slots.active_version,
                hub_version=self._hub_version,
            )
        except FirmwareError as err:
            raise _Stop(UpdateStatus.FAILED, Reason.of(err), _Outcome.SKIPPED) from err
        if slots.state in _MODULE_BUSY:
            raise _skip("module_busy", f"the module is {slots.state} another image")
        await self._check_battery(record, driver)
        self._check_release(image)
        await self._set(rollout_id, device_id, UpdateStatus.TRANSFERRING, progress_pct=0)
        await self._transfer(rollout_id, device_id, image, driver)
        await self._set(rollout_id, device_id, UpdateStatus.VERIFYING, progress_pct=100)
        await self._check_battery(record, driver)
        await self._acquire_inverter(rollout_id, record)
        await self._set(rollout_id, device_id, UpdateStatus.INSTALLING, progress_pct=100)
        try:
            await self._call(driver.firmware_install())
        except CommandRejected as err:
            raise _fail("module_refused", f"the module refused to install the image: {err}") from err
        except DeviceError as err:
            # The answer may be lost while the module already reboots: its status tells.
            _LOGGER.info("%s: install call failed (%s); asking the module", device_id, err)
        await self._wait_back(rollout_id, mod, driver, target)
        await self._health(rollout_id, mod, driver, target)
        await self._updated(record.device_id, str(target))

    async def _recover(
        self,
        rollout_id: str,
        mod: ModuleUpdate,
        record: DeviceRecord,
        driver: FirmwareCapable,
        target: Version,
    ) -> bool:
        """After a hub restart: ask a module that was mid-flight where it stands.  Returns ``True`` once it
        is healthy on the new version, ``False`` when its update should go on from the transfer (resuming
        at the module's offset); raises ``_Stop`` for a module that failed or fell back meanwhile."""
        device_id = mod.device_id
        was_installing = mod.status in (UpdateStatus.INSTALLING, UpdateStatus.REBOOTING)
        try:
            slots: FirmwareSlots | None = await self._call(driver.firmware_status())
        except DeviceError as err:
            if not was_installing:
                return False  # not told to install: the usual checks and retries follow
            _LOGGER.info("%s: not answering after the restart (%s); waiting for it", device_id, err)
            slots = None
        running = None if slots is None else _version_or_none(slots.active_version)
        if (
            running is not None
            and running == target
            and slots is not None
            and slots.state not in _MODULE_BUSY
        ):
            await self._health(rollout_id, mod, driver, target)  # it runs the new image: check it again
            return True
        if slots is None or slots.state in _MODULE_BUSY:
            self._hold_inverter(record)
            what = "not answering" if slots is None else slots.state
            await self._set(rollout_id, device_id, UpdateStatus.REBOOTING, detail=f"module is {what}")
            await self._wait_back(rollout_id, mod, driver, target, seen_reboot=True)
            await self._health(rollout_id, mod, driver, target)
            return True
        if mod.status is UpdateStatus.REBOOTING:
            raise _Stop(
                UpdateStatus.ROLLED_BACK,
                Reason("boot_failed", f"the module came back on {slots.active_version}, not {target}"),
                _Outcome.FAILED,
            )
        if slots.state == "failed" and was_installing:
            raise _fail("module_refused", f"the module refused the image: {slots.error or 'no reason given'}")
        return False  # transferring, verifying, or told to install but still idle on the old version

    def _check_release(self, image: StoredImage) -> None:
        """The release's signature, against the keys trusted now (a key may have been removed)."""
        try:
            self._store.check_trust(image)
        except FirmwareError as err:
            raise _fail(err.code, f"the release is refused now: {err.message}") from err

    async def _check_battery(self, record: DeviceRecord, driver: FirmwareCapable) -> None:
        if record.kind is not DeviceKind.ENERGYSTORAGE:
            return
        flows = site_flows(self._state.devices)
        soc: float | None = None
        grid_ok = flows.grid_ok
        reader = getattr(driver, "read", None)
        if reader is not None:
            try:
                sample = await self._call(reader())
            except DeviceError:
                sample = None
            if sample is not None:
                soc = sample.soc_pct
                if sample.grid_ok is False:
                    grid_ok = False
        if soc is None:
            live = self._state.devices.get(record.device_id)
            if live is not None and live.online and live.telemetry is not None:
                soc = live.telemetry.soc_pct
        if grid_ok is False:
            raise _skip("grid_outage", "the grid is down: a battery is never updated during a grid outage")
        if soc is None:
            raise _skip("soc_unknown", "the battery's state of charge is unknown")
        if soc < self.config.safe_soc_pct:
            raise _skip(
                "battery_low",
                f"state of charge {soc:g} % is below the safe {self.config.safe_soc_pct:g} % for an update",
            )

    async def _transfer(
        self, rollout_id: str, device_id: str, image: StoredImage, driver: FirmwareCapable
    ) -> None:
        """Send the image in chunks from where the module stands.  After any failed exchange (no answer,
        a bad answer, a chunk the module did not take) the hub waits with backoff and asks the module again
        with ``firmware_begin``, which tells the resume point; a refused ``firmware_begin`` is final."""
        size = image.size
        chunk_size = self.config.chunk_bytes
        driver_max = getattr(driver, "firmware_chunk_bytes", None)
        if isinstance(driver_max, int) and driver_max > 0:
            chunk_size = min(chunk_size, driver_max)
        failures = 0
        offset: int | None = None
        fd = await asyncio.to_thread(os.open, image.path, os.O_RDONLY)
        try:
            while True:
                try:
                    if offset is None:
                        offset = await self._begin(driver, image)
                        if offset:
                            _LOGGER.info(
                                "%s: resuming the transfer at byte %d of %d", device_id, offset, size
                            )
                    if offset >= size:
                        return
                    data = await asyncio.to_thread(os.pread, fd, min(chunk_size, size - offset), offset)
                    received = await self._call(driver.firmware_chunk(offset, data))
                    if not offset < received <= size:
                        raise ProtocolError(f"module acknowledged {received} bytes after a chunk at {offset}")
                    offset = received
                    if failures:
                        failures = 0
                        self._replace_module(rollout_id, device_id, detail=None)
                    self._progress(rollout_id, device_id, offset * 100 // size)
                except DeviceError as err:
                    failures += 1
                    if failures > self.config.retries:
                        raise _fail(
                            "transfer_failed", f"transfer failed after {failures} attempts: {err}"
                        ) from err
                    delay = min(self.config.max_backoff_s, self.config.retry_backoff_s * 2 ** (failures - 1))
                    _LOGGER.info("%s: transfer interrupted (%s); retrying in %.1f s", device_id, err, delay)
                    self._replace_module(
                        rollout_id, device_id, detail=f"retrying ({failures}/{self.config.retries}): {err}"
                    )
                    await asyncio.sleep(delay)
                    offset = None  # ask the module where to go on
        finally:
            os.close(fd)

    async def _begin(self, driver: FirmwareCapable, image: StoredImage) -> int:
        try:
            offset = await self._call(driver.firmware_begin(image.manifest_bytes, image.signature))
        except CommandRejected as err:
            raise _fail("module_refused", f"the module refused the release: {err}") from err
        if not 0 <= offset <= image.size:
            raise ProtocolError(f"module reports {offset} bytes of a {image.size}-byte image")
        return offset

    async def _wait_back(
        self,
        rollout_id: str,
        mod: ModuleUpdate,
        driver: FirmwareCapable,
        target: Version,
        *,
        seen_reboot: bool = False,
    ) -> None:
        """Follow the module through verifying, installing and rebooting until it answers again with
        ``target``; a module back on another version after a reboot fell back by itself (``boot_failed``)."""
        device_id = mod.device_id
        deadline = time.monotonic() + self.config.reboot_timeout_s
        status = UpdateStatus.REBOOTING if seen_reboot else UpdateStatus.INSTALLING
        last_error = "no answer"
        while True:
            try:
                slots = await self._call(driver.firmware_status())
            except DeviceError as err:
                last_error = str(err)
                seen_reboot = True
                if status is not UpdateStatus.REBOOTING:
                    status = UpdateStatus.REBOOTING
                    await self._set(
                        rollout_id, device_id, status, detail="module is not answering (rebooting)"
                    )
            else:
                running = _version_or_none(slots.active_version)
                if running is not None and running == target and slots.state not in _MODULE_BUSY:
                    self._release_inverter(device_id)
                    return
                if slots.state == "failed":
                    raise _fail(
                        "module_refused", f"the module refused the image: {slots.error or 'no reason given'}"
                    )
                if slots.state == "rebooting":
                    seen_reboot = True
                    if status is not UpdateStatus.REBOOTING:
                        status = UpdateStatus.REBOOTING
                        await self._set(rollout_id, device_id, status)
                elif slots.state not in _MODULE_BUSY and seen_reboot:
                    raise _Stop(
                        UpdateStatus.ROLLED_BACK,
                        Reason(
                            "boot_failed", f"the module came back on {slots.active_version}, not {target}"
                        ),
                        _Outcome.FAILED,
                    )
                last_error = f"module is {slots.state} on {slots.active_version}"
            if time.monotonic() >= deadline:
                await self._rollback(
                    rollout_id,
                    mod,
                    driver,
                    Reason(
                        "not_back",
                        f"the module did not come back on {target} within "
                        f"{self.config.reboot_timeout_s:g} s ({last_error})",
                    ),
                )
            await asyncio.sleep(self.config.status_poll_s)

    async def _health(
        self, rollout_id: str, mod: ModuleUpdate, driver: FirmwareCapable, target: Version
    ) -> None:
        """Watch the module's telemetry for the health window; roll it back if it is unhealthy."""
        device_id = mod.device_id
        window = self._rollouts[rollout_id].health_window_s
        await self._set(
            rollout_id,
            device_id,
            UpdateStatus.REBOOTING,
            progress_pct=100,
            detail=f"running {target}; checking health for {window:g} s",
        )
        reader = getattr(driver, "read", None)
        if reader is None:
            return
        end = time.monotonic() + window
        failures = 0
        good = 0
        while True:
            try:
                sample = await self._call(reader())
            except DeviceError as err:
                failures += 1
                if failures >= self.config.unhealthy_after_failures:
                    await self._rollback(
                        rollout_id,
                        mod,
                        driver,
                        Reason("unhealthy", f"the module stopped answering after the update: {err}"),
                    )
            else:
                failures = 0
                if sample.state is OperatingState.FAULT:
                    await self._rollback(
                        rollout_id,
                        mod,
                        driver,
                        Reason("unhealthy", f"the module reports a fault on {target}"),
                    )
                good += 1
            now = time.monotonic()
            if good and now >= end:
                _LOGGER.info("%s is healthy on %s", device_id, target)
                return
            if now >= end + self.config.reboot_timeout_s:
                await self._rollback(
                    rollout_id,
                    mod,
                    driver,
                    Reason("unhealthy", "no telemetry from the module after the update"),
                )
            delay = self.config.health_poll_s if now >= end else min(self.config.health_poll_s, end - now)
            await asyncio.sleep(max(delay, 0.001))

    async def _rollback(
        self, rollout_id: str, mod: ModuleUpdate, driver: FirmwareCapable, why: Reason
    ) -> None:
        """Have the module boot its previous slot; always ends the module's update (raises ``_Stop``)."""
        device_id = mod.device_id
        _LOGGER.warning("%s: rolling back (%s)", device_id, why.message)
        try:
            await self._call(driver.firmware_rollback())
        except DeviceError as err:
            raise _fail("rollback_failed", f"{why.message}; and the rollback failed: {err}") from err
        deadline = time.monotonic() + self.config.reboot_timeout_s
        previous = _version_or_none(mod.from_version)
        while time.monotonic() < deadline:
            with contextlib.suppress(DeviceError):
                slots = await self._call(driver.firmware_status())
                running = _version_or_none(slots.active_version)
                if slots.state not in _MODULE_BUSY and (previous is None or running == previous):
                    await self._updated(device_id, slots.active_version)
                    raise _Stop(UpdateStatus.ROLLED_BACK, why, _Outcome.FAILED)
            await asyncio.sleep(self.config.status_poll_s)
        raise _fail("rollback_failed", f"{why.message}; the module did not come back on {mod.from_version}")

    async def _updated(self, device_id: str, version: str) -> None:
        """Record the version the module runs now in the registry (and in its poller's copy)."""
        current = self._registry.get(device_id)
        if current is None or current.identity.firmware_version == version:
            return
        try:
            updated = await self._registry.update(
                device_id, identity=replace(current.identity, firmware_version=version)
            )
        except (RegistryError, ValueError) as err:
            _LOGGER.warning("%s runs %s but the registry could not be updated: %s", device_id, version, err)
            return
        link = self._links.links.get(device_id) if self._links is not None else None
        if link is not None:
            link.record = updated  # as LinkManager does when a probe reports a new identity

    # ------------------------------------------------------------------------------------------ inverters

    def _hold_inverter(self, record: DeviceRecord) -> None:
        if record.kind is DeviceKind.MICROINVERTER:
            self._down.add(record.device_id)

    def _release_inverter(self, device_id: str) -> None:
        if device_id in self._down:
            self._down.discard(device_id)
            self._gate.set()
            self._gate = asyncio.Event()

    def _inverter_may_go_down(self, device_id: str) -> bool:
        inverters = [r.device_id for r in self._registry.all() if r.kind is DeviceKind.MICROINVERTER]
        if len(inverters) <= 1:
            return True  # the only inverter: updating it is the only way to update it
        for other in inverters:
            live = self._state.devices.get(other)
            if other != device_id and other not in self._down and live is not None and live.online:
                return True
        return False

    async def _acquire_inverter(self, rollout_id: str, record: DeviceRecord) -> None:
        if record.kind is not DeviceKind.MICROINVERTER:
            return
        device_id = record.device_id
        deadline = time.monotonic() + self.config.inverter_wait_s
        waiting = False
        # Checked and taken without an await in between, so two inverters cannot both take the last slot.
        while not self._inverter_may_go_down(device_id):
            if not waiting:
                waiting = True
                self._replace_module(
                    rollout_id, device_id, detail="waiting: another microinverter must stay up"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _skip("inverters_down", "no other microinverter was up to keep producing")
            # Woken when an inverter of a rollout comes back; polled for the poller's online changes.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._gate.wait(), min(remaining, self.config.status_poll_s))
        self._down.add(device_id)

    # ------------------------------------------------------------------------------------------ helpers

    async def _call(self, aw: Awaitable[_T]) -> _T:
        try:
            return await asyncio.wait_for(aw, self.config.call_timeout_s * 2)
        except TimeoutError as err:
            raise DeviceUnreachable("the module did not answer in time") from err

    async def _status_with_retries(self, driver: FirmwareCapable, device_id: str) -> FirmwareSlots:
        failures = 0
        while True:
            try:
                return await self._call(driver.firmware_status())
            except DeviceError as err:
                failures += 1
                if failures >= self.config.retries:
                    raise _skip("unreachable", f"{device_id} did not answer: {err}") from err
                await asyncio.sleep(
                    min(self.config.max_backoff_s, self.config.retry_backoff_s * 2 ** (failures - 1))
                )


def _queued(record: DeviceRecord, now: float) -> ModuleUpdate:
    return ModuleUpdate(
        device_id=record.device_id,
        kind=record.kind,
        model=record.identity.model,
        from_version=record.identity.firmware_version,
        updated_at=now,
    )


def _version_or_none(text: str | None) -> Version | None:
    if not text:
        return None
    try:
        return Version.parse(text)
    except InvalidVersion:
        return None
