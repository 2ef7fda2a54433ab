"""A simulated ORES-HTTP module: a real aiohttp server that serves one ``SimulatedModule`` on the network.

It follows docs/module-protocol.md exactly: ``GET /identity``, ``/status`` and ``/telemetry`` and
``POST /control`` under ``/ores/v1``, the JSON error body with the documented status codes, the 64 KiB body
cap, and the ``Authorization: Bearer`` check on everything but ``/identity`` (and ``/auth/challenge``) once
it holds a credential.  Started with a ``SimAttestation`` it implements the authentication of §6: it answers
challenges with its certificate and device-key signature, and takes a credential from a hub while
unprovisioned (or from the hub that holds the current one), reporting ``provisioned`` in ``/identity``;
without one it answers 404 there, like a module that predates §6.  It validates control bodies itself (type and range per the protocol, kind applicability,
battery power limits, controllability, fault state) and passes accepted setpoints to the module, turning a
``ValueError`` from ``module.apply`` into ``422 out_of_range``.  It tracks the active setpoint and its
watchdog for ``/status``; the module itself performs the revert (``SimulatedModule.apply`` contract).  A
module may also implement ``ReportsFaults`` to publish fault codes.  Started with a ``SimFirmware`` it
implements the firmware update of §9 (``/firmware``, ``/firmware/begin``, ``/firmware/image``,
``/firmware/install``, ``/firmware/rollback``; 404 without one): it serves the module through
``FirmwareModule`` (the running firmware version in ``/identity``, ``fault`` while the running image is
unhealthy), answers ``503 unavailable`` to everything while the module reboots, and maps each
``SimFirmwareError`` to its status (422 for a refused release, 409 for a transfer conflict).
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from aiohttp import web

from devices.attest import SimAttestation
from devices.drivers.base import Address
from devices.model import DeviceKind, OperatingState, Setpoint
from devices.ores_http_wire import (
    AUTH_CHALLENGE_PATH,
    AUTH_CREDENTIAL_PATH,
    BASE_PATH,
    FIRMWARE_BEGIN_PATH,
    FIRMWARE_IMAGE_PATH,
    FIRMWARE_INSTALL_PATH,
    FIRMWARE_PATH,
    FIRMWARE_ROLLBACK_PATH,
    MAX_BODY_BYTES,
    MAX_FIRMWARE_BEGIN_BYTES,
    MAX_FIRMWARE_CHUNK_BYTES,
    SETPOINT_KIND,
    ActiveSetpoint,
    Fault,
    ModuleStatus,
    WireError,
    WireRangeError,
    active_setpoint_to_wire,
    auth_challenge_reply_to_wire,
    control_to_wire,
    decode_json,
    encode_json,
    error_to_wire,
    firmware_received_to_wire,
    firmware_status_to_wire,
    identity_to_wire,
    parse_auth_challenge,
    parse_auth_credential,
    parse_control,
    parse_firmware_begin,
    status_to_wire,
    telemetry_to_wire,
)
from devices.sim.base import SimulatedModule
from devices.sim.firmware import FirmwareModule, SimFirmware, SimFirmwareError

__all__ = ["OresHttpSimServer", "ReportsFaults", "start_ores_http_server"]

_LOGGER = logging.getLogger(__name__)

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES: Mapping[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    422: "out_of_range",
    503: "unavailable",
}

#: Firmware refusals that are conflicts with the module's state (the rest refuse the release itself: 422).
_FIRMWARE_CONFLICTS: frozenset[str] = frozenset({"wrong_offset", "no_update", "no_previous"})


def _firmware_error(err: SimFirmwareError) -> _ApiError:
    details: dict[str, Any] = {}
    if err.received_bytes is not None:
        details["received_bytes"] = err.received_bytes
    if err.code == "rebooting":
        return _ApiError(503, "unavailable", err.message, details)
    status = 409 if err.code in _FIRMWARE_CONFLICTS else 422
    return _ApiError(status, err.code, err.message, details)


@runtime_checkable
class ReportsFaults(Protocol):
    """Optional extra a simulated module may implement to report fault codes in ``GET /status``."""

    def faults(self) -> Sequence[Fault]: ...


class _ApiError(Exception):
    """Internal: answer with the protocol's JSON error body."""

    def __init__(
        self, status: int, code: str, message: str, details: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = dict(details or {})


def _json_response(data: object, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=encode_json(data), content_type="application/json", headers=headers
    )


def _error_response(err: _ApiError, headers: Mapping[str, str] | None = None) -> web.Response:
    return _json_response(error_to_wire(err.code, err.message, err.details), err.status, headers)


def _field_name(path: str | None) -> str | None:
    return None if path is None else path.removeprefix("control.")


def _field_details(err: WireError) -> dict[str, Any]:
    return {} if err.field is None else {"field": err.field.rpartition(".")[2]}


class OresHttpSimServer:
    """One simulated module served over ORES-HTTP (satisfies ``devices.sim.base.SimServer``).

    Create it with ``start_ores_http_server``.
    """

    def __init__(
        self,
        module: SimulatedModule,
        *,
        credential: str | None = None,
        attestation: SimAttestation | None = None,
        firmware: SimFirmware | None = None,
    ) -> None:
        if firmware is not None and (firmware.vendor, firmware.model) != (
            module.info.identity.vendor,
            module.info.identity.model,
        ):
            raise ValueError(
                f"the firmware is for {firmware.vendor!r} {firmware.model!r}, the module is "
                f"{module.info.identity.vendor!r} {module.info.identity.model!r}"
            )
        self._module = module
        self._firmware = firmware
        self._served: SimulatedModule = module if firmware is None else FirmwareModule(module, firmware)
        self._boots = 0 if firmware is None else firmware.boot_count
        self._credential = None if credential is None else credential.encode("utf-8")
        self._attestation = attestation
        self._hub_id: str | None = None
        self._runner: web.AppRunner | None = None
        self._address: Address | None = None
        self._started_at = time.monotonic()
        self._active = ActiveSetpoint()
        self._deadline: float | None = None  # monotonic time at which the active setpoint reverts

    @property
    def address(self) -> Address:
        if self._address is None:
            raise RuntimeError("server not started")
        return self._address

    @property
    def module(self) -> SimulatedModule:
        return self._module

    @property
    def attestation(self) -> SimAttestation | None:
        return self._attestation

    @property
    def firmware(self) -> SimFirmware | None:
        """The module's firmware slots, when it implements §9."""
        return self._firmware

    @property
    def provisioned(self) -> bool:
        """Whether the module holds a credential (and so requires it)."""
        return self._credential is not None

    @property
    def credential(self) -> str | None:
        """The credential the module currently requires, if any."""
        return None if self._credential is None else self._credential.decode("utf-8")

    @property
    def hub_id(self) -> str | None:
        """The hub that provisioned the current credential over ``/auth/credential``, if any."""
        return self._hub_id

    @property
    def active_setpoint(self) -> ActiveSetpoint:
        """The setpoint as ``GET /status`` reports it (reverted to the default once its watchdog expired)."""
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self._active = ActiveSetpoint()
            self._deadline = None
        return self._active

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        if self._runner is not None:
            raise RuntimeError("server already started")
        app = web.Application(
            middlewares=[_error_middleware, self._reboot_middleware, self._auth_middleware],
            client_max_size=MAX_BODY_BYTES,
        )
        app.router.add_get(f"{BASE_PATH}/identity", self._identity)
        app.router.add_get(f"{BASE_PATH}/status", self._status)
        app.router.add_get(f"{BASE_PATH}/telemetry", self._telemetry)
        app.router.add_post(f"{BASE_PATH}/control", self._control)
        if self._attestation is not None:
            app.router.add_post(f"{BASE_PATH}/{AUTH_CHALLENGE_PATH}", self._auth_challenge)
            app.router.add_post(f"{BASE_PATH}/{AUTH_CREDENTIAL_PATH}", self._set_credential)
            app.router.add_delete(f"{BASE_PATH}/{AUTH_CREDENTIAL_PATH}", self._delete_credential)
        if self._firmware is not None:
            app.router.add_get(f"{BASE_PATH}/{FIRMWARE_PATH}", self._firmware_status)
            app.router.add_post(f"{BASE_PATH}/{FIRMWARE_BEGIN_PATH}", self._firmware_begin)
            app.router.add_put(f"{BASE_PATH}/{FIRMWARE_IMAGE_PATH}", self._firmware_image)
            app.router.add_post(f"{BASE_PATH}/{FIRMWARE_INSTALL_PATH}", self._firmware_install)
            app.router.add_post(f"{BASE_PATH}/{FIRMWARE_ROLLBACK_PATH}", self._firmware_rollback)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        bound_port = int(runner.addresses[0][1])
        self._runner = runner
        self._started_at = time.monotonic()
        self._address = Address("http", host, bound_port, BASE_PATH)
        _LOGGER.debug("ORES-HTTP sim %s serving %s", self._address, self._module.info.device_id)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # ------------------------------------------------------------------ middleware

    _open_paths = frozenset({f"{BASE_PATH}/identity", f"{BASE_PATH}/{AUTH_CHALLENGE_PATH}"})

    @web.middleware
    async def _reboot_middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """While the module reboots nothing answers but this: 503 with a ``Retry-After``."""
        firmware = self._firmware
        if firmware is not None and firmware.rebooting:
            err = _ApiError(503, "unavailable", "the module is rebooting")
            return _error_response(err, {"Retry-After": str(max(1, math.ceil(firmware.reboot_remaining_s)))})
        if firmware is not None and firmware.boot_count != self._boots:
            self._boots = firmware.boot_count  # rebooted: start at the default setpoint (§3.4 rule 5)
            self._release()
        return await handler(request)

    @web.middleware
    async def _auth_middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        if self._credential is None or request.path in self._open_paths:
            return await handler(request)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode("utf-8"), self._credential
        ):
            err = _ApiError(401, "unauthorized", "a valid bearer credential is required")
            return _error_response(err, {"WWW-Authenticate": 'Bearer realm="ores"'})
        return await handler(request)

    # ------------------------------------------------------------------ endpoints

    async def _identity(self, request: web.Request) -> web.Response:
        implements_auth = self._attestation is not None or self._credential is not None
        provisioned = self._credential is not None if implements_auth else None
        return _json_response(identity_to_wire(self._served.info, provisioned=provisioned))

    async def _auth_challenge(self, request: web.Request) -> web.Response:
        """§6.3: sign the hub's nonce with the device key; always open."""
        assert self._attestation is not None  # the route exists only with one
        try:
            nonce, hub_id = parse_auth_challenge(decode_json(await request.read()))
        except WireError as err:
            raise _ApiError(400, "bad_request", str(err), _field_details(err)) from err
        cert, signature = self._attestation.respond(nonce, hub_id)
        return _json_response(auth_challenge_reply_to_wire(cert, signature))

    async def _set_credential(self, request: web.Request) -> web.Response:
        """§6.4: take a credential; open while unprovisioned, otherwise the auth middleware demanded the
        current one (a re-key)."""
        try:
            credential, hub_id = parse_auth_credential(decode_json(await request.read()))
        except WireError as err:
            raise _ApiError(400, "bad_request", str(err), _field_details(err)) from err
        rekey = self._credential is not None
        self._credential = credential.encode("utf-8")
        self._hub_id = hub_id
        _LOGGER.info(
            "ORES-HTTP sim %s: %s by hub %r",
            self._module.info.device_id,
            "re-keyed" if rekey else "provisioned",
            hub_id,
        )
        return web.Response(status=204)

    async def _delete_credential(self, request: web.Request) -> web.Response:
        """§6.4: forget the credential (the auth middleware checked it); idempotent when unprovisioned."""
        self._credential = None
        self._hub_id = None
        _LOGGER.info("ORES-HTTP sim %s: deprovisioned", self._module.info.device_id)
        return web.Response(status=204)

    async def _telemetry(self, request: web.Request) -> web.Response:
        return _json_response(telemetry_to_wire(self._served.telemetry()))

    async def _status(self, request: web.Request) -> web.Response:
        state = self._served.telemetry().state
        if isinstance(self._served, ReportsFaults):
            faults = tuple(self._served.faults())
        elif state is OperatingState.FAULT:
            faults = (Fault("fault", "the module reports a fault"),)
        else:
            faults = ()
        status = ModuleStatus(
            state=state,
            uptime_s=round(
                time.monotonic() - self._started_at if self._firmware is None else self._firmware.uptime_s, 3
            ),
            faults=faults,
            active=self.active_setpoint,
        )
        return _json_response(status_to_wire(status))

    async def _control(self, request: web.Request) -> web.Response:
        body = await request.read()  # aiohttp answers 413 beyond client_max_size
        try:
            control = parse_control(decode_json(body))
        except WireRangeError as err:
            raise _ApiError(422, "out_of_range", str(err), {"field": _field_name(err.field)}) from err
        except WireError as err:
            details = {} if err.field is None else {"field": _field_name(err.field)}
            raise _ApiError(400, "bad_request", str(err), details) from err
        if control.setpoint.release:
            return self._release()
        info = self._module.info
        for name in control_to_wire(control.setpoint):
            if SETPOINT_KIND[name] is not info.kind:
                raise _ApiError(
                    422,
                    "not_applicable",
                    f"{name} applies to {SETPOINT_KIND[name].value} modules only",
                    {"field": name, "kind": info.kind.value},
                )
        if not info.capabilities.controllable:
            raise _ApiError(409, "not_controllable", "this module does not accept setpoints")
        state = self._served.telemetry().state
        if state is OperatingState.FAULT:
            raise _ApiError(
                409, "not_allowed_in_state", "control is not allowed while in fault", {"state": state.value}
            )
        self._check_battery_limits(control.setpoint)
        try:
            self._module.apply(control.setpoint, revert_after_s=control.revert_after_s)
        except ValueError as err:
            raise _ApiError(422, "out_of_range", str(err) or "setpoint out of range") from err
        return _json_response(active_setpoint_to_wire(self._accept(control.setpoint, control.revert_after_s)))

    # ------------------------------------------------------------------ firmware update (§9)

    def _fw(self) -> SimFirmware:
        assert self._firmware is not None  # the routes exist only with one
        return self._firmware

    async def _firmware_status(self, request: web.Request) -> web.Response:
        return _json_response(firmware_status_to_wire(self._fw().status()))

    async def _firmware_begin(self, request: web.Request) -> web.Response:
        body = await _read_body(request, MAX_FIRMWARE_BEGIN_BYTES)
        try:
            manifest, signature = parse_firmware_begin(decode_json(body, max_bytes=MAX_FIRMWARE_BEGIN_BYTES))
        except WireError as err:
            raise _ApiError(400, "bad_request", str(err), _field_details(err)) from err
        try:
            received = self._fw().begin(manifest, signature)
        except SimFirmwareError as err:
            raise _firmware_error(err) from err
        return _json_response(firmware_received_to_wire(received))

    async def _firmware_image(self, request: web.Request) -> web.Response:
        text = request.query.get("offset")
        if text is None or not text.isascii() or not text.isdigit() or len(text) > 15:
            raise _ApiError(
                400,
                "bad_request",
                "the offset query parameter must be a decimal integer",
                {"field": "offset"},
            )
        data = await _read_body(request, MAX_FIRMWARE_CHUNK_BYTES)
        try:
            received = self._fw().chunk(int(text), data)
        except SimFirmwareError as err:
            raise _firmware_error(err) from err
        return _json_response(firmware_received_to_wire(received))

    async def _firmware_install(self, request: web.Request) -> web.Response:
        firmware = self._fw()
        try:
            firmware.install()
        except SimFirmwareError as err:
            raise _firmware_error(err) from err
        return _json_response(firmware_status_to_wire(firmware.status()), 202)

    async def _firmware_rollback(self, request: web.Request) -> web.Response:
        firmware = self._fw()
        try:
            firmware.rollback()
        except SimFirmwareError as err:
            raise _firmware_error(err) from err
        return _json_response(firmware_status_to_wire(firmware.status()), 202)

    def _release(self) -> web.Response:
        """``{"release": true}``: always allowed (returning to the default is the safe direction)."""
        try:
            self._module.apply(Setpoint(release=True), revert_after_s=None)
        except ValueError as err:
            raise _ApiError(422, "out_of_range", str(err) or "release refused") from err
        self._active = ActiveSetpoint()
        self._deadline = None
        return _json_response(active_setpoint_to_wire(self._active))

    def _check_battery_limits(self, setpoint: Setpoint) -> None:
        power = setpoint.battery_power_w
        if power is None or self._module.info.kind is not DeviceKind.ENERGYSTORAGE:
            return
        caps = self._module.info.capabilities
        if caps.max_discharge_w is not None and power > caps.max_discharge_w:
            raise _ApiError(
                422,
                "out_of_range",
                f"battery_power_w {power:g} exceeds max_discharge_w {caps.max_discharge_w:g}",
                {"field": "battery_power_w", "max": caps.max_discharge_w},
            )
        if caps.max_charge_w is not None and -power > caps.max_charge_w:
            raise _ApiError(
                422,
                "out_of_range",
                f"battery_power_w {power:g} exceeds max_charge_w {caps.max_charge_w:g} (charging)",
                {"field": "battery_power_w", "min": -caps.max_charge_w},
            )

    def _accept(self, setpoint: Setpoint, revert_after_s: float | None) -> ActiveSetpoint:
        current = self.active_setpoint.setpoint
        merged = Setpoint(
            power_limit_pct=(
                current.power_limit_pct if setpoint.power_limit_pct is None else setpoint.power_limit_pct
            ),
            battery_power_w=(
                current.battery_power_w if setpoint.battery_power_w is None else setpoint.battery_power_w
            ),
            on=current.on if setpoint.on is None else setpoint.on,
        )
        if revert_after_s is None:
            self._deadline = None
            self._active = ActiveSetpoint(merged, None)
        else:
            self._deadline = time.monotonic() + revert_after_s
            self._active = ActiveSetpoint(merged, time.time() + revert_after_s)
        return self._active


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, refused with 413 beyond ``limit`` bytes (read without the app-wide cap)."""
    length = request.content_length
    if length is not None and length > limit:
        raise _ApiError(413, "body_too_large", f"request body of {length} bytes exceeds {limit}")
    data = bytearray()
    async for piece in request.content.iter_chunked(64 * 1024):
        data += piece
        if len(data) > limit:
            raise _ApiError(413, "body_too_large", f"request body exceeds {limit} bytes")
    return bytes(data)


@web.middleware
async def _error_middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Every error leaves as the protocol's JSON error body."""
    try:
        return await handler(request)
    except _ApiError as err:
        return _error_response(err)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        code = _HTTP_CODES.get(err.status, "bad_request" if err.status < 500 else "internal_error")
        headers = {"Allow": err.headers["Allow"]} if "Allow" in err.headers else None
        if err.status == 404:
            message = f"no endpoint {request.path}"
        elif err.status == 405:
            message = f"{request.method} is not allowed on {request.path}"
        else:
            message = err.text or err.reason
        return _error_response(_ApiError(err.status, code, message), headers)
    except Exception as err:
        _LOGGER.exception("ORES-HTTP sim: %s %s failed", request.method, request.path)
        return _error_response(_ApiError(500, "internal_error", f"{type(err).__name__}: {err}"))


async def start_ores_http_server(
    module: SimulatedModule,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    credential: str | None = None,
    attestation: SimAttestation | None = None,
    firmware: SimFirmware | None = None,
) -> OresHttpSimServer:
    """Serve ``module`` over ORES-HTTP on ``host:port`` (0 = an ephemeral port, see ``.address``).

    With ``attestation`` the module implements the authentication endpoints of §6; it starts unprovisioned
    unless ``credential`` is given (then it is provisioned with it, as if by an earlier hub).  With
    ``firmware`` (for the module's vendor and model) it implements the firmware update of §9.
    """
    server = OresHttpSimServer(module, credential=credential, attestation=attestation, firmware=firmware)
    await server.start(host, port)
    return server
