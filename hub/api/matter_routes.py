"""The Matter endpoints under ``/matter``: the bridge's state, its pairing codes (text and QR image), the
commissioning window and the fabrics (the controllers it belongs to).

Viewers see the state and the fabrics; the pairing codes are shown from the homeowner role up; opening or
closing the window and removing a fabric need the installer role.  When the bridge is not running these
operations answer 409 ``matter_unavailable`` with the reason; the rest of the hub is unaffected.  Importing
this module registers the operations on ``hub.api.routes.router``.
"""

from __future__ import annotations

import io
from typing import Any, Final, Literal

from aiohttp import web
from pydantic import BaseModel, Field

from hub.api.errors import ApiError
from hub.api.routes import ctx, router
from hub.api.routing import Call, Empty
from hub.auth import Role, role_allows
from hub.context import HubContext
from matter_bridge.protocol import BridgeCommandError, BridgeUnavailable, MatterError

__all__ = ["matter_out"]

TAG: Final = "matter"


class FabricOut(BaseModel):
    fabric_index: int
    fabric_id: str
    node_id: str
    vendor_id: int
    label: str


class BridgedOut(BaseModel):
    device_id: str
    endpoint_id: str = Field(description="The bridge's id of the endpoint (derived from the device id)")
    endpoint: int | None = Field(description="Its Matter endpoint number (None until the bridge assigned it)")
    kind: Literal["solar", "battery", "meter", "plug"]


class MatterOut(BaseModel):
    """The Matter bridge.  ``state``: off (not enabled), unavailable (cannot run here, see ``reason``),
    starting, running, restarting (after a crash, with backoff), stopped or failed.  The pairing codes are
    null for viewers."""

    state: str
    reason: str | None
    commissioned: bool
    window_open: bool
    manual_code: str | None
    qr_payload: str | None
    passcode: int | None
    discriminator: int | None
    vendor_id: int
    product_id: int
    port: int
    pid: int | None
    restarts: int
    fabrics: list[FabricOut]
    devices: list[BridgedOut]


class FabricsOut(BaseModel):
    fabrics: list[FabricOut]


class WindowIn(BaseModel):
    model_config = {"extra": "forbid"}

    timeout_s: int = Field(
        300, ge=60, le=900, description="How long the window stays open, s (Matter allows ≤ 900)"
    )


def _service(hub: HubContext) -> Any:
    service = hub.matter
    if service is None or not service.config.enabled:
        raise ApiError(409, "matter_unavailable", "the Matter bridge is not enabled on this hub")
    return service


def _fabrics(hub: HubContext) -> list[FabricOut]:
    status = hub.matter.status if hub.matter is not None else None
    if status is None:
        return []
    return [
        FabricOut(
            fabric_index=f.fabric_index,
            fabric_id=f.fabric_id,
            node_id=f.node_id,
            vendor_id=f.vendor_id,
            label=f.label,
        )
        for f in status.fabrics
    ]


def matter_out(hub: HubContext, show_codes: bool) -> MatterOut:
    service = hub.matter
    config = hub.config.matter
    process = service.process if service is not None else None
    status = service.status if service is not None else None
    return MatterOut(
        state=service.state if service is not None else "off",
        reason=service.reason if service is not None else None,
        commissioned=bool(status and status.commissioned),
        window_open=bool(status and status.window_open),
        manual_code=status.manual_code if status and show_codes else None,
        qr_payload=status.qr_payload if status and show_codes else None,
        passcode=service.passcode if service is not None and show_codes else None,
        discriminator=service.discriminator if service is not None and show_codes else None,
        vendor_id=config.vendor_id,
        product_id=config.product_id,
        port=config.port,
        pid=process.pid if process is not None else None,
        restarts=process.restarts if process is not None else 0,
        fabrics=_fabrics(hub),
        devices=[
            BridgedOut(device_id=d, endpoint_id=e, endpoint=n, kind=k)  # type: ignore[arg-type]
            for d, e, n, k in (service.devices() if service is not None else [])
        ],
    )


def _shows_codes(call: Call[Any, Any]) -> bool:
    return call.token is not None and role_allows(call.token.role, Role.HOMEOWNER)


def _unavailable(err: MatterError) -> ApiError:
    return ApiError(409, "matter_unavailable", str(err))


@router.route("GET", "/matter", summary="The Matter bridge", tag=TAG, response=MatterOut)
async def matter_get(call: Call[Empty, None]) -> MatterOut:
    """State, pairing codes (homeowner and installer), commissioning window, fabrics and bridged modules."""
    return matter_out(ctx(call), _shows_codes(call))


def _qr_image(hub: HubContext, kind: str, content_type: str) -> web.Response:
    """The Matter onboarding payload (``MT:...``) as a QR code image (409 while there is no payload)."""
    import segno

    service = _service(hub)
    status = service.status
    if status is None or not status.qr_payload:
        raise ApiError(
            409, "matter_unavailable", f"the Matter bridge is {service.state}: no pairing code yet"
        )
    buf = io.BytesIO()
    segno.make(status.qr_payload, error="m").save(buf, kind=kind, scale=8, border=2)
    return web.Response(body=buf.getvalue(), content_type=content_type)


@router.route(
    "GET", "/matter/qr.svg", summary="The pairing QR code (SVG)", tag=TAG, role=Role.HOMEOWNER,
    stream="image/svg+xml", errors=(409,),
)  # fmt: skip
async def matter_qr_svg(call: Call[Empty, None]) -> web.Response:
    """The Matter pairing payload as a QR code for a phone's camera."""
    return _qr_image(ctx(call), "svg", "image/svg+xml")


@router.route(
    "GET", "/matter/qr.png", summary="The pairing QR code (PNG)", tag=TAG, role=Role.HOMEOWNER,
    stream="image/png", errors=(409,),
)  # fmt: skip
async def matter_qr_png(call: Call[Empty, None]) -> web.Response:
    """The same QR code as a PNG image."""
    return _qr_image(ctx(call), "png", "image/png")


@router.route(
    "POST",
    "/matter/window",
    summary="Open the commissioning window",
    tag=TAG,
    role=Role.INSTALLER,
    body=WindowIn,
    response=MatterOut,
    errors=(409,),
)
async def matter_open_window(call: Call[Empty, WindowIn]) -> MatterOut:
    """Let a controller (another one: Matter is multi-admin) join for ``timeout_s`` seconds.  The window
    closes after one successful commissioning, at the timeout, or on ``DELETE``."""
    hub = ctx(call)
    try:
        await _service(hub).open_window(call.body.timeout_s)
    except BridgeCommandError as err:
        raise ApiError(409, "matter_refused", str(err)) from err
    except MatterError as err:
        raise _unavailable(err) from err
    return matter_out(hub, True)


@router.route(
    "DELETE",
    "/matter/window",
    summary="Close the commissioning window",
    tag=TAG,
    role=Role.INSTALLER,
    response=MatterOut,
    errors=(409,),
)
async def matter_close_window(call: Call[Empty, None]) -> MatterOut:
    """Close the window now (nothing happens when it is closed)."""
    hub = ctx(call)
    try:
        await _service(hub).close_window()
    except MatterError as err:
        raise _unavailable(err) from err
    return matter_out(hub, True)


@router.route(
    "GET", "/matter/fabrics", summary="The controllers this hub belongs to", tag=TAG, response=FabricsOut
)
async def matter_fabrics(call: Call[Empty, None]) -> FabricsOut:
    """One fabric per smart home ecosystem (controller) that commissioned the hub."""
    return FabricsOut(fabrics=_fabrics(ctx(call)))


@router.route(
    "DELETE",
    "/matter/fabrics/{fabric_index}",
    summary="Remove a controller",
    tag=TAG,
    role=Role.INSTALLER,
    response=FabricsOut,
    errors=(404, 409),
)
async def matter_remove_fabric(call: Call[Empty, None]) -> FabricsOut:
    """Remove a fabric: that controller loses access to the hub at once.  Removing the last one returns the
    bridge to its uncommissioned state (open the window to commission it again)."""
    hub = ctx(call)
    raw = call.path["fabric_index"]
    index = int(raw) if raw.isdigit() and len(raw) <= 3 else -1
    if not any(f.fabric_index == index for f in _fabrics(hub)):
        raise ApiError(404, "not_found", f"fabric {raw!r} not found", {"id": raw})
    try:
        await _service(hub).remove_fabric(index)
    except BridgeCommandError as err:
        raise ApiError(404, "not_found", str(err), {"id": raw}) from err
    except (BridgeUnavailable, MatterError) as err:
        raise _unavailable(err) from err
    return FabricsOut(fabrics=_fabrics(hub))
