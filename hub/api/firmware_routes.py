"""The firmware update endpoints under ``/device/firmware/update``, and the wiring of the firmware parts.

Installers upload a signed release as ``multipart/form-data`` (parts ``manifest``, ``signature`` and ``image``,
in that order): the manifest and signature are checked before the image is read, and the image is streamed
to disk through ``hub.firmware_store.FirmwareStore`` in constant memory and refused the moment it passes
its declared size.  They start rollouts to chosen modules or to every module of a model
(``hub.rollout.RolloutManager``), follow each module's status (also live in the push stream as
``firmware.status`` events), cancel a rollout, and delete releases; viewers read the catalogue and the
rollouts.  Refusals carry the stable codes of ``firmware.manifest`` (``bad_signature``, ``untrusted_key``,
``hash_mismatch``, ``size_mismatch``, ``too_large``, ``wrong_model``, ``downgrade``, ...): 413 for an upload
over the size limit, 422 for the other refusals.  ``attach`` builds the store and the rollout manager into the
``HubContext``; importing this module registers the operations on ``hub.api.routes.router``.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Final, Literal

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.hdrs import CONTENT_ENCODING, CONTENT_TRANSFER_ENCODING
from aiohttp.http_exceptions import HttpProcessingError
from pydantic import BaseModel, Field, model_validator

from firmware.manifest import MAX_MANIFEST_BYTES, BadManifest, FirmwareError, SizeMismatch, TooLarge
from hub.api import schemas as s
from hub.api.errors import ApiError, not_found
from hub.api.routes import ctx, router
from hub.api.routing import Call, Empty
from hub.auth import Role
from hub.context import HubContext
from hub.firmware_store import FirmwareStore, FirmwareStoreError, ImageConflict, StoredImage
from hub.rollout import ModuleUpdate, Rollout, RolloutError, RolloutManager

__all__ = ["attach"]

_LOGGER = logging.getLogger(__name__)

BASE: Final = "/device/firmware/update"
#: Room for the multipart framing, the manifest and the signature on top of the image.
_UPLOAD_OVERHEAD: Final = MAX_MANIFEST_BYTES + 64 * 1024
_SIGNATURE_LIMIT: Final = 1024
_READ_BYTES: Final = 256 * 1024
_IDENTITY_ENCODINGS: Final = frozenset({"", "binary", "8bit", "7bit", "identity"})

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the image, lowercase hex")]


def attach(hub: HubContext) -> None:
    """Build the firmware store (``data_dir/firmware``) and the rollout manager into ``hub``."""
    directory = hub.config.data_dir / "firmware"
    hub.firmware = FirmwareStore(directory, hub.trust.trusted("firmware"))
    hub.rollouts = RolloutManager(
        hub.firmware, hub.registry, hub.state, directory / "rollouts.json", links=hub.links
    )


# ----------------------------------------------------------------------------------------------- schemas


class ReasonOut(BaseModel):
    code: str
    message: str


class ImageOut(BaseModel):
    """A stored release.  ``trusted`` is checked now: a release whose key was removed stays listed but is
    refused (``refusal``) until it is deleted."""

    sha256: str
    vendor: str
    models: list[str]
    version: str
    size: int
    min_hub_version: str
    release_notes: str
    created_at: datetime
    key_id: str
    uploaded_at: datetime
    uploaded_by: str | None
    trusted: bool
    refusal: ReasonOut | None
    in_use: bool = Field(description="A running rollout uses this release")


class ModuleUpdateOut(BaseModel):
    device_id: str
    kind: str
    model: str
    from_version: str = Field(description="The version the module ran before the update")
    status: Literal[
        "queued", "transferring", "verifying", "installing", "rebooting", "healthy", "failed", "rolled_back"
    ]
    progress_pct: int = Field(ge=0, le=100, description="Share of the image the module has received")
    canary: bool
    reason: ReasonOut | None = Field(description="Why the module was not updated (failed, rolled_back)")
    detail: str | None
    updated_at: datetime


class RolloutOut(BaseModel):
    rollout_id: str
    sha256: str
    vendor: str
    version: str
    target_model: str | None
    batch_size: int
    health_window_s: float
    created_at: datetime
    created_by: str | None
    state: Literal["running", "succeeded", "finished", "aborted"]
    reason: ReasonOut | None
    finished_at: datetime | None
    counts: dict[str, int]
    modules: list[ModuleUpdateOut]


class RolloutList(BaseModel):
    rollouts: list[RolloutOut]


class CatalogueOut(BaseModel):
    images: list[ImageOut]
    rollouts: list[RolloutOut]
    max_image_bytes: int


class ImageDeleted(BaseModel):
    sha256: str
    deleted: bool


class RolloutIn(s.Strict):
    """Start a rollout of a stored release: to ``device_ids``, or to every registered module of ``model``."""

    sha256: Sha256
    device_ids: list[s.DeviceId] | None = Field(None, min_length=1, max_length=256)
    model: str | None = Field(None, min_length=1, max_length=128)
    batch_size: int | None = Field(None, ge=1, le=32, description="Modules at a time after the canary")
    health_window_s: float | None = Field(
        None, ge=0, le=3600, description="How long a module must stay healthy on the new version, s"
    )

    @model_validator(mode="after")
    def _one_target(self) -> RolloutIn:
        if (self.device_ids is None) == (self.model is None):
            raise ValueError("give exactly one of device_ids and model")
        return self


UPLOAD_REQUEST_BODY: Final[dict[str, Any]] = {
    "required": True,
    "description": (
        "A signed release as three parts, in this order: the manifest file, its detached signature, the "
        "image.  The image is streamed to disk and refused as soon as it exceeds the manifest's size."
    ),
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "required": ["manifest", "signature", "image"],
                "properties": {
                    "manifest": {
                        "type": "string",
                        "format": "binary",
                        "maxLength": MAX_MANIFEST_BYTES,
                        "description": "The manifest (JSON, docs/firmware.md §2)",
                    },
                    "signature": {
                        "type": "string",
                        "maxLength": _SIGNATURE_LIMIT,
                        "description": "Ed25519 signature of the manifest's canonical bytes, base64",
                    },
                    "image": {"type": "string", "format": "binary", "description": "The firmware image"},
                },
            },
            "encoding": {
                "manifest": {"contentType": "application/json, application/octet-stream"},
                "image": {"contentType": "application/octet-stream"},
            },
        }
    },
}


# ----------------------------------------------------------------------------------------------- views


def _reason(reason: Any) -> ReasonOut | None:
    return None if reason is None else ReasonOut(code=reason.code, message=reason.message)


def image_out(hub: HubContext, image: StoredImage) -> ImageOut:
    m = image.manifest
    problem = hub.firmware.trust_problem(image)
    return ImageOut(
        sha256=image.sha256,
        vendor=m.vendor,
        models=list(m.models),
        version=str(m.version),
        size=m.size,
        min_hub_version=str(m.min_hub_version),
        release_notes=m.release_notes,
        created_at=m.created_at,
        key_id=m.key_id,
        uploaded_at=s.iso(image.uploaded_at),  # type: ignore[arg-type]
        uploaded_by=image.uploaded_by,
        trusted=problem is None,
        refusal=None if problem is None else ReasonOut(code=problem.code, message=problem.message),
        in_use=hub.rollouts.uses_image(image.sha256),
    )


def _module_out(mod: ModuleUpdate) -> ModuleUpdateOut:
    return ModuleUpdateOut(
        device_id=mod.device_id,
        kind=mod.kind.value,
        model=mod.model,
        from_version=mod.from_version,
        status=mod.status.value,  # type: ignore[arg-type]
        progress_pct=mod.progress_pct,
        canary=mod.canary,
        reason=_reason(mod.reason),
        detail=mod.detail,
        updated_at=s.iso(mod.updated_at),  # type: ignore[arg-type]
    )


def rollout_out(rollout: Rollout) -> RolloutOut:
    return RolloutOut(
        rollout_id=rollout.rollout_id,
        sha256=rollout.sha256,
        vendor=rollout.vendor,
        version=rollout.version,
        target_model=rollout.target_model,
        batch_size=rollout.batch_size,
        health_window_s=rollout.health_window_s,
        created_at=s.iso(rollout.created_at),  # type: ignore[arg-type]
        created_by=rollout.created_by,
        state=rollout.state.value,  # type: ignore[arg-type]
        reason=_reason(rollout.reason),
        finished_at=s.iso(rollout.finished_at),
        counts=rollout.counts(),
        modules=[_module_out(m) for m in rollout.modules],
    )


# ----------------------------------------------------------------------------------------------- errors


def firmware_error_to_api(err: FirmwareError) -> ApiError:
    """A refused release: 413 when it is larger than allowed, 422 otherwise; the code is the reason's."""
    too_big = isinstance(err, TooLarge) or (isinstance(err, SizeMismatch) and err.received > err.expected)
    details: dict[str, Any] | None = None
    if isinstance(err, BadManifest) and err.field is not None:
        details = {"field": err.field}
    elif isinstance(err, SizeMismatch):
        details = {"expected": err.expected, "received": err.received}
    return ApiError(413 if too_big else 422, err.code, err.message, details)


def rollout_error_to_api(err: RolloutError) -> ApiError:
    status = {"not_found": 404, "image_not_found": 404, "busy": 409, "not_running": 409}.get(err.code, 422)
    return ApiError(status, err.code, err.message, err.details)


def store_error_to_api(err: FirmwareStoreError) -> ApiError:
    if isinstance(err, ImageConflict):
        return ApiError(409, "already_stored", str(err))
    _LOGGER.error("firmware store failed: %s", err)
    return ApiError(507, "storage_error", str(err))


# ----------------------------------------------------------------------------------------------- upload


class _BrokenUpload(Exception):
    """The multipart body ended early or is malformed."""


async def _next_part(reader: MultipartReader, name: str) -> BodyPartReader:
    try:
        part = await reader.next()
    except (ValueError, HttpProcessingError, ConnectionError, AssertionError) as err:
        raise ApiError(400, "bad_upload", f"malformed multipart body before part {name!r}: {err}") from err
    if part is None:
        raise ApiError(
            400, "bad_upload", f"part {name!r} is missing (send manifest, signature, image in order)"
        )
    if not isinstance(part, BodyPartReader) or part.name != name:
        got = part.name if isinstance(part, BodyPartReader) else "a nested multipart"
        raise ApiError(
            400,
            "bad_upload",
            f"expected part {name!r}, got {got!r} (send manifest, signature, image in order)",
        )
    encoding = part.headers.get(CONTENT_TRANSFER_ENCODING, "").strip().lower()
    if encoding not in _IDENTITY_ENCODINGS or part.headers.get(CONTENT_ENCODING, "identity") != "identity":
        raise ApiError(
            415, "unsupported_media_type", f"part {name!r} must be sent as plain bytes, not encoded"
        )
    return part


async def _read_small(part: BodyPartReader, name: str, limit: int) -> bytes:
    data = bytearray()
    try:
        while chunk := await part.read_chunk(8192):
            data += chunk
            if len(data) > limit:
                code = "bad_manifest" if name == "manifest" else "bad_signature"
                raise ApiError(422, code, f"part {name!r} is larger than {limit} bytes")
    except (ValueError, HttpProcessingError, ConnectionError) as err:
        raise ApiError(400, "bad_upload", f"part {name!r} is cut short or malformed: {err}") from err
    return bytes(data)


async def _stream(part: BodyPartReader) -> AsyncIterator[bytes]:
    try:
        while chunk := await part.read_chunk(_READ_BYTES):
            yield chunk
    except (ValueError, HttpProcessingError, ConnectionError) as err:
        raise _BrokenUpload(f"the image part is cut short or malformed: {err}") from err


@router.route(
    "POST",
    BASE,
    summary="Upload a signed firmware release",
    tag="device",
    role=Role.INSTALLER,
    response=ImageOut,
    status=201,
    also=(200,),
    errors=(409, 413, 415, 422, 507),
    request_body=UPLOAD_REQUEST_BODY,
)
async def firmware_upload(call: Call[Empty, None]) -> web.StreamResponse:
    """``multipart/form-data`` with the parts ``manifest``, ``signature`` and ``image``, in this order.  The
    signed manifest is verified (trusted firmware key of its vendor, valid fields, size within the limit,
    minimum hub version) before the image is read; the image is streamed to disk, checked against the
    manifest's size and SHA-256 and refused the moment it is longer.  201 with the stored release; 200 if
    the same release was already stored."""
    request = call.request
    hub = ctx(call)
    store = hub.firmware
    limit = store.max_image_bytes + _UPLOAD_OVERHEAD
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(
            413, "too_large", f"upload of {request.content_length} bytes is over the {limit}-byte limit"
        )
    if request.content_type != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type", f"send multipart/form-data, not {request.content_type}")
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, KeyError) as err:
        raise ApiError(400, "bad_upload", f"malformed multipart body: {err}") from err
    manifest = await _read_small(await _next_part(reader, "manifest"), "manifest", MAX_MANIFEST_BYTES)
    signature = await _read_small(await _next_part(reader, "signature"), "signature", _SIGNATURE_LIMIT)
    image = await _next_part(reader, "image")
    who = call.token.name if call.token is not None else None
    try:
        stored, created = await store.add(manifest, signature, _stream(image), uploaded_by=who)
    except FirmwareError as err:
        _LOGGER.warning("firmware upload by %s refused: %s: %s", who, err.code, err.message)
        raise firmware_error_to_api(err) from err
    except _BrokenUpload as err:
        raise ApiError(400, "bad_upload", str(err)) from err
    except FirmwareStoreError as err:
        raise store_error_to_api(err) from err
    hub.bus.publish(
        "firmware.stored", sha256=stored.sha256, vendor=stored.manifest.vendor, version=stored.version
    )
    body = image_out(hub, stored).model_dump_json().encode()
    return web.Response(body=body, status=201 if created else 200, content_type="application/json")


@router.route("GET", BASE, summary="Firmware catalogue and rollouts", tag="device", response=CatalogueOut)
async def firmware_catalogue(call: Call[Empty, None]) -> CatalogueOut:
    """The stored releases (with whether each is still trusted) and the rollouts, newest first."""
    hub = ctx(call)
    return CatalogueOut(
        images=[image_out(hub, i) for i in hub.firmware.list()],
        rollouts=[rollout_out(r) for r in hub.rollouts.list()],
        max_image_bytes=hub.firmware.max_image_bytes,
    )


def _image(hub: HubContext, sha256: str) -> StoredImage:
    image = hub.firmware.get(sha256)
    if image is None:
        raise not_found("firmware image", sha256)
    return image


@router.route(
    "GET",
    BASE + "/images/{sha256}",
    summary="One stored firmware release",
    tag="device",
    response=ImageOut,
    errors=(404,),
)
async def firmware_image(call: Call[Empty, None]) -> ImageOut:
    hub = ctx(call)
    return image_out(hub, _image(hub, call.path["sha256"]))


@router.route(
    "DELETE",
    BASE + "/images/{sha256}",
    summary="Delete a stored firmware release",
    tag="device",
    role=Role.INSTALLER,
    response=ImageDeleted,
    errors=(404, 409, 507),
)
async def firmware_delete(call: Call[Empty, None]) -> ImageDeleted:
    """Refused (409 ``in_use``) while a running rollout still needs the release."""
    hub = ctx(call)
    sha = _image(hub, call.path["sha256"]).sha256
    if hub.rollouts.uses_image(sha):
        raise ApiError(409, "in_use", f"a running rollout uses firmware {sha}; cancel it first")
    try:
        deleted = await hub.firmware.delete(sha)
    except FirmwareStoreError as err:
        raise store_error_to_api(err) from err
    if not deleted:
        raise not_found("firmware image", sha)
    return ImageDeleted(sha256=sha, deleted=True)


@router.route(
    "POST",
    BASE + "/rollouts",
    summary="Start a firmware rollout",
    tag="device",
    role=Role.INSTALLER,
    body=RolloutIn,
    response=RolloutOut,
    status=202,
    errors=(404, 409, 422),
)
async def rollout_start(call: Call[Empty, RolloutIn]) -> RolloutOut:
    """Update ``device_ids``, or every registered module of ``model``: the release is verified again (a
    removed key's releases are refused), then one canary module first, the rest ``batch_size`` at a time.
    Batteries are not updated during a grid outage or below the safe state of charge, and never all
    microinverters are down at once.  Follow each module's status here or as ``firmware.status`` events in
    the push stream."""
    hub = ctx(call)
    b = call.body
    try:
        rollout = await hub.rollouts.start_rollout(
            b.sha256,
            device_ids=b.device_ids,
            model=b.model,
            batch_size=b.batch_size,
            health_window_s=b.health_window_s,
            created_by=call.token.name if call.token is not None else None,
        )
    except RolloutError as err:
        raise rollout_error_to_api(err) from err
    except FirmwareError as err:
        raise firmware_error_to_api(err) from err
    return rollout_out(rollout)


@router.route("GET", BASE + "/rollouts", summary="Firmware rollouts", tag="device", response=RolloutList)
async def rollout_list(call: Call[Empty, None]) -> RolloutList:
    return RolloutList(rollouts=[rollout_out(r) for r in ctx(call).rollouts.list()])


@router.route(
    "GET",
    BASE + "/rollouts/{rollout_id}",
    summary="A rollout and the status of each module",
    tag="device",
    response=RolloutOut,
    errors=(404,),
)
async def rollout_get(call: Call[Empty, None]) -> RolloutOut:
    rollout = ctx(call).rollouts.get(call.path["rollout_id"])
    if rollout is None:
        raise not_found("rollout", call.path["rollout_id"])
    return rollout_out(rollout)


@router.route(
    "POST",
    BASE + "/rollouts/{rollout_id}/cancel",
    summary="Cancel a firmware rollout",
    tag="device",
    role=Role.INSTALLER,
    response=RolloutOut,
    errors=(404, 409),
)
async def rollout_cancel(call: Call[Empty, None]) -> RolloutOut:
    """Queued modules are not updated; a module in the middle of its update finishes it (or is rolled
    back) first."""
    try:
        rollout = await ctx(call).rollouts.cancel(call.path["rollout_id"])
    except RolloutError as err:
        raise rollout_error_to_api(err) from err
    return rollout_out(rollout)
