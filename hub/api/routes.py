"""The ORES REST endpoints: thin handlers that translate between the API schemas and the hub's parts.

Handlers validate nothing themselves (the router did, against ``hub.api.schemas``) and hold no state: they
read the live model, the registry and the history, and pass commands to the control arbiter and the device
links.  Roles: viewers read; homeowners control modules, register them, change app settings and manage
tokens; installers also configure the hub.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from devices.attest import AttestationError
from devices.drivers.base import Address
from devices.errors import DeviceError, DeviceUnreachable, NotSupported, ProtocolError
from devices.model import DeviceKind, Setpoint
from hub import __version__
from hub.api import schemas as s
from hub.api.errors import ApiError, device_error_to_api, not_found
from hub.api.routing import ApiRouter, Call, Empty
from hub.auth import Role, Unauthenticated, auth_store_key, bearer_token, role_allows
from hub.config import AppSettings
from hub.context import HubContext, hub_key
from hub.control import Command, ControlSource
from hub.history import Retention, pick_resolution
from hub.notify import Alert
from hub.onboarding import CandidateNotFound, NotApprovable, OnboardingError
from hub.register import AddressInUse, AddressNotAllowed, register_module
from hub.registry import DeviceRecord
from hub.state import site_flows

router = ApiRouter(
    title="ORES Hub API",
    version=__version__,
    description=(
        "Local REST API of the ORES Central Control Unit. Sign convention: power_w > 0 means a module "
        "delivers power into the home (PV production, battery discharge, grid import); load = pv + battery + "
        'grid. Errors are {"error": {"code", "message", "details"}}.'
    ),
)


def ctx(call: Call[Any, Any]) -> HubContext:
    return call.request.app[hub_key]


# ----------------------------------------------------------------------------------------------- helpers


def control_out(hub: HubContext, device_id: str) -> s.ControlOut:
    cmd = hub.arbiter.effective(device_id)
    link = hub.links.links.get(device_id)
    written = link is not None and link.written is not None and link.written.setpoint == cmd.setpoint
    return _control(cmd, written)


def _control(cmd: Command, written: bool) -> s.ControlOut:
    sp = cmd.setpoint
    return s.ControlOut(
        source=cmd.source.value,  # type: ignore[arg-type]
        setpoint=s.SetpointOut(
            power_limit_pct=sp.power_limit_pct,
            battery_power_w=sp.battery_power_w,
            on=sp.on,
            release=sp.release,
        ),
        issued_at=s.iso(cmd.issued_at) if cmd.source is not ControlSource.DEFAULT else None,
        expires_at=s.iso(cmd.expires_at),
        issued_by=cmd.issued_by,
        written=written,
    )


def device_out(hub: HubContext, rec: DeviceRecord) -> s.DeviceOut:
    live = hub.state.devices.get(rec.device_id)
    tel = live.telemetry if live is not None else None
    return s.DeviceOut(
        device_id=rec.device_id,
        kind=rec.kind.value,
        name=rec.name,
        address=rec.address,
        protocol=rec.protocol,
        authenticated=rec.authenticated,
        registered_at=s.iso(rec.registered_at),  # type: ignore[arg-type]
        identity=s.IdentityOut.of(rec.identity),
        capabilities=s.CapabilitiesOut.of(rec.capabilities),
        online=bool(live and live.online),
        last_seen=s.iso(live.stats.last_ok) if live else None,
        telemetry=s.TelemetryOut.of(tel) if tel is not None else None,
        control=control_out(hub, rec.device_id) if rec.capabilities.controllable else None,
    )


def records_of(hub: HubContext, kind: DeviceKind | None, device_id: str | None) -> list[DeviceRecord]:
    if device_id is not None:
        rec = hub.registry.get(device_id)
        if rec is None or (kind is not None and rec.kind is not kind):
            raise not_found(kind.value if kind else "device", device_id)
        return [rec]
    return [r for r in hub.registry.all() if kind is None or r.kind is kind]


def kind_status(hub: HubContext, kind: DeviceKind, device_id: str | None) -> s.KindStatus:
    devices = [device_out(hub, r) for r in records_of(hub, kind, device_id)]
    online = [d for d in devices if d.online]
    return s.KindStatus(
        devices=devices,
        total_power_w=sum((d.telemetry.power_w or 0.0) for d in online if d.telemetry is not None),
        online=len(online),
        offline=len(devices) - len(online),
    )


async def issue_commands(
    call: Call[Any, Any],
    kind: DeviceKind | None,
    device_id: str | None,
    setpoint: Setpoint,
    ttl_s: float | None,
) -> s.ControlResults:
    """Put a direct command into the arbiter for each target and write it now; unreachable modules keep the
    command pending (it is written as soon as they answer)."""
    hub = ctx(call)
    targets = [r for r in records_of(hub, kind, device_id) if r.capabilities.controllable]
    if not targets:
        raise ApiError(404, "not_found", "no controllable module matches", {"device_id": device_id})
    ttl = ttl_s if ttl_s is not None else hub.settings.hub.default_ttl_s
    if not setpoint.release and ttl > hub.settings.hub.max_ttl_s:
        raise ApiError(422, "ttl_too_long", f"ttl_s may be at most {hub.settings.hub.max_ttl_s:g} s")
    who = call.token.name if call.token is not None else None
    previous = {r.device_id: hub.arbiter.effective(r.device_id) for r in targets}
    for rec in targets:
        if setpoint.release:
            hub.arbiter.release(rec.device_id)
        else:
            hub.arbiter.command(rec.device_id, setpoint, ttl, who)

    async def write(rec: DeviceRecord) -> s.ControlResult:
        link = hub.links.links.get(rec.device_id)
        cmd = hub.arbiter.effective(rec.device_id)
        status = "released" if setpoint.release else "applied"
        if link is None:
            return s.ControlResult(
                device_id=rec.device_id, status="pending", error="no link", control=_control(cmd, False)
            )
        try:
            await link.write(cmd)
        except DeviceError as err:
            if not link.live.online:
                return s.ControlResult(
                    device_id=rec.device_id, status="pending", error=str(err), control=_control(cmd, False)
                )
            # The module is there and refused: undo our bookkeeping, report the refusal.
            old = previous[rec.device_id]
            if old.source is ControlSource.API and old.expires_at is not None:
                hub.arbiter.command(rec.device_id, old.setpoint, old.expires_at - time.time(), old.issued_by)
            else:
                hub.arbiter.release(rec.device_id)
            raise device_error_to_api(err) from err
        hub.bus.publish("control.changed", device_id=rec.device_id, source=cmd.source.value)
        return s.ControlResult(device_id=rec.device_id, status=status, control=_control(cmd, True))  # type: ignore[arg-type]

    results = await asyncio.gather(*(write(r) for r in targets))
    return s.ControlResults(results=list(results))


def controls_of(call: Call[s.DeviceQuery, Any], kind: DeviceKind) -> s.ControlStates:
    hub = ctx(call)
    return s.ControlStates(
        controls={
            r.device_id: control_out(hub, r.device_id) for r in records_of(hub, kind, call.query.device_id)
        }
    )


def time_range(q: s.RangeQuery) -> tuple[float, float]:
    end = q.end or datetime.now(UTC)
    start = q.start or end - timedelta(hours=24)
    if end <= start:
        raise ApiError(400, "invalid_range", "end must be after start")
    return start.timestamp(), end.timestamp()


async def series(call: Call[s.RangeQuery, Any], kind: DeviceKind, fields: list[str]) -> s.EnergyOut:
    hub = ctx(call)
    start, end = time_range(call.query)
    out = []
    for rec in records_of(hub, kind, call.query.device_id):
        try:
            points = await hub.history.query(rec.device_id, start, end, call.query.resolution, fields)
        except ValueError as err:
            raise ApiError(400, "invalid_query", str(err)) from err
        energy = await hub.history.energy(rec.device_id, start, end)
        out.append(
            s.SeriesOut(
                device_id=rec.device_id,
                resolution=_resolution_used(call.query.resolution, start, end),
                energy_out_wh=energy.get("energy_out_wh"),
                energy_in_wh=energy.get("energy_in_wh"),
                points=points,
            )
        )
    return s.EnergyOut(
        start=s.iso(start),  # type: ignore[arg-type]
        end=s.iso(end),  # type: ignore[arg-type]
        resolution=_resolution_used(call.query.resolution, start, end),
        total_energy_out_wh=sum(x.energy_out_wh or 0.0 for x in out),
        total_energy_in_wh=sum(x.energy_in_wh or 0.0 for x in out),
        series=out,
    )


def _resolution_used(resolution: str, start: float, end: float) -> str:
    return pick_resolution(start, end) if resolution == "auto" else resolution


# ----------------------------------------------------------------------------------------------- microinverter


@router.route(
    "GET",
    "/microinverter/energy",
    summary="Microinverters: production now and over time",
    tag="microinverter",
    query=s.RangeQuery,
    response=s.EnergyOut,
    errors=(404,),
)
async def inverter_energy(call: Call[s.RangeQuery, None]) -> s.EnergyOut:
    return await series(call, DeviceKind.MICROINVERTER, ["power_w", "energy_out_wh"])


@router.route(
    "POST",
    "/microinverter/control",
    summary="Limit microinverter output",
    tag="microinverter",
    role=Role.HOMEOWNER,
    body=s.InverterControlIn,
    response=s.ControlResults,
    errors=(404, 409, 422, 502),
)
async def inverter_control(call: Call[Empty, s.InverterControlIn]) -> s.ControlResults:
    """Sets an active-power limit (API layer) for ``ttl_s`` seconds, then the module returns to its schedule
    or default (the watchdog).  Omit ``device_id`` to limit every microinverter."""
    b = call.body
    return await issue_commands(
        call, DeviceKind.MICROINVERTER, b.device_id, Setpoint(power_limit_pct=b.power_limit_pct), b.ttl_s
    )


# ----------------------------------------------------------------------------------------------- energystorage


@router.route(
    "GET",
    "/energystorage/storage",
    summary="Batteries: SoC and power over time, energy in/out",
    tag="energystorage",
    query=s.RangeQuery,
    response=s.EnergyOut,
    errors=(404,),
)
async def storage_history(call: Call[s.RangeQuery, None]) -> s.EnergyOut:
    return await series(
        call, DeviceKind.ENERGYSTORAGE, ["power_w", "soc_pct", "energy_out_wh", "energy_in_wh"]
    )


@router.route(
    "POST",
    "/energystorage/control",
    summary="Charge, discharge, hold, or back to auto",
    tag="energystorage",
    role=Role.HOMEOWNER,
    body=s.StorageControlIn,
    response=s.ControlResults,
    errors=(404, 409, 422, 502),
)
async def storage_control(call: Call[Empty, s.StorageControlIn]) -> s.ControlResults:
    """``auto`` hands the battery back to its own self-consumption logic; ``charge``/``discharge`` need
    ``power_w``; ``idle`` holds it at 0 W.  The command lasts ``ttl_s`` seconds."""
    b = call.body
    if b.mode in ("charge", "discharge") and b.power_w is None:
        raise ApiError(
            422, "invalid_body", f"mode {b.mode} needs power_w", [{"loc": ["power_w"], "msg": "required"}]
        )
    if b.mode == "auto":
        setpoint = Setpoint(release=True)
    elif b.mode == "idle":
        setpoint = Setpoint(battery_power_w=0.0)
    else:
        assert b.power_w is not None
        setpoint = Setpoint(battery_power_w=b.power_w if b.mode == "discharge" else -b.power_w)
    if b.power_w is not None and b.mode in ("charge", "discharge"):
        for rec in records_of(ctx(call), DeviceKind.ENERGYSTORAGE, b.device_id):
            limit = (
                rec.capabilities.max_discharge_w if b.mode == "discharge" else rec.capabilities.max_charge_w
            )
            if limit is not None and b.power_w > limit:
                raise ApiError(
                    422,
                    "out_of_range",
                    f"{rec.device_id} can {b.mode} at most {limit:g} W",
                    {"device_id": rec.device_id, "limit_w": limit},
                )
    return await issue_commands(call, DeviceKind.ENERGYSTORAGE, b.device_id, setpoint, b.ttl_s)


# ----------------------------------------------------------------------------------------------- smart plugs


@router.route(
    "POST",
    "/smartplug/control",
    summary="Switch smart plugs",
    tag="smartplug",
    role=Role.HOMEOWNER,
    body=s.PlugControlIn,
    response=s.ControlResults,
    errors=(404, 409, 422, 502),
)
async def plug_control(call: Call[Empty, s.PlugControlIn]) -> s.ControlResults:
    b = call.body
    return await issue_commands(call, DeviceKind.SMARTPLUG, b.device_id, Setpoint(on=b.on), b.ttl_s)


# ----------------------------------------------------------------------------------------------- per kind


def _kind_routes(kind: DeviceKind, label: str) -> None:
    """The read and release operations every controllable kind has, under ``/{kind}/...``."""
    prefix = f"/{kind.value}"

    async def status(call: Call[s.DeviceQuery, None]) -> s.KindStatus:
        return kind_status(ctx(call), kind, call.query.device_id)

    async def control_get(call: Call[s.DeviceQuery, None]) -> s.ControlStates:
        return controls_of(call, kind)

    async def release(call: Call[s.DeviceQuery, None]) -> s.ControlResults:
        """Ends the direct command: the module returns to its schedule or its own default at once."""
        return await issue_commands(call, kind, call.query.device_id, Setpoint(release=True), None)

    tag = kind.value
    router.route(
        "GET",
        f"{prefix}/status",
        summary=f"{label}: identity, state and latest sample",
        tag=tag,
        query=s.DeviceQuery,
        response=s.KindStatus,
        errors=(404,),
    )(status)
    router.route(
        "GET",
        f"{prefix}/control",
        summary=f"{label}: the command in force and its source",
        tag=tag,
        query=s.DeviceQuery,
        response=s.ControlStates,
        errors=(404,),
    )(control_get)
    router.route(
        "DELETE",
        f"{prefix}/control",
        summary=f"{label}: end a direct command",
        tag=tag,
        role=Role.HOMEOWNER,
        query=s.DeviceQuery,
        response=s.ControlResults,
        errors=(404, 409, 422, 502),
    )(release)


_kind_routes(DeviceKind.MICROINVERTER, "Microinverters")
_kind_routes(DeviceKind.ENERGYSTORAGE, "Batteries")
_kind_routes(DeviceKind.SMARTPLUG, "Smart plugs")


# ----------------------------------------------------------------------------------------------- device


@router.route("GET", "/device/register", summary="Registered modules", tag="device", response=s.DeviceList)
async def devices_list(call: Call[Empty, None]) -> s.DeviceList:
    hub = ctx(call)
    return s.DeviceList(devices=[device_out(hub, r) for r in hub.registry.all()])


@router.route(
    "POST",
    "/device/register",
    summary="Register a module: approve a discovered one, or by address",
    tag="device",
    role=Role.HOMEOWNER,
    body=s.RegisterIn,
    response=s.DeviceOut,
    status=201,
    also=(200,),
    errors=(404, 409),
)
async def device_register(call: Call[Empty, s.RegisterIn]) -> s.DeviceOut:
    """Probes the address (ORES-HTTP, then SunSpec Modbus TCP, unless ``protocol`` is given), reads the
    module's identity and registers it.  The same module at a new address keeps its id and history; a
    different module at an address already registered is refused with 409."""
    hub = ctx(call)
    b = call.body
    by = call.token.name if call.token else None
    if (b.address is None) == (b.candidate_id is None):
        raise ApiError(422, "invalid_body", "give exactly one of address and candidate_id")
    try:
        if b.candidate_id is not None:
            created = hub.registry.get(b.candidate_id) is None
            record = await hub.onboarding.approve(b.candidate_id, name=b.name, by=by)
        else:
            assert b.address is not None
            try:
                address = Address.parse(b.address)
            except ValueError as err:
                raise ApiError(
                    422, "invalid_address", str(err), [{"loc": ["address"], "msg": str(err)}]
                ) from err
            record, created = await register_module(hub, address, protocol=b.protocol, name=b.name)
    except CandidateNotFound as err:
        raise ApiError(404, "not_found", str(err)) from err
    except NotApprovable as err:
        raise ApiError(409, "not_approvable", str(err)) from err
    except (DeviceUnreachable, NotSupported, ProtocolError) as err:
        # Nothing usable answers at the address: a problem with the request, not with the hub.
        code = {DeviceUnreachable: "device_unreachable", NotSupported: "not_supported"}.get(
            type(err), "protocol_error"
        )
        raise ApiError(
            422, code, f"no supported module there: {err}", [{"loc": ["address"], "msg": str(err)}]
        ) from err
    except AttestationError as err:
        raise ApiError(422, "authentication_failed", f"the module failed authentication: {err}") from err
    except AddressInUse as err:
        raise ApiError(
            409, "address_in_use", str(err), {"registered": err.registered, "found": err.found}
        ) from err
    except OnboardingError as err:
        raise ApiError(422, "not_supported", str(err)) from err
    except AddressNotAllowed as err:
        raise ApiError(403, "address_not_allowed", str(err), [{"loc": ["address"], "msg": str(err)}]) from err
    out = device_out(hub, record)
    return out if created else _status(out, 200)  # type: ignore[return-value]


def _status(model: s.DeviceOut, status: int) -> web.Response:
    return web.Response(body=model.model_dump_json().encode(), status=status, content_type="application/json")


@router.route(
    "PATCH",
    "/device/register/{device_id}",
    summary="Rename a module or change plug priority",
    tag="device",
    role=Role.HOMEOWNER,
    body=s.DevicePatch,
    response=s.DeviceOut,
    errors=(404,),
)
async def device_patch(call: Call[Empty, s.DevicePatch]) -> s.DeviceOut:
    hub = ctx(call)
    device_id = call.path["device_id"]
    rec = hub.registry.get(device_id)
    if rec is None:
        raise not_found("device", device_id)
    b = call.body
    changes: dict[str, Any] = {}
    if b.name is not None:
        changes["name"] = b.name
    caps = rec.capabilities
    if b.priority is not None or b.critical is not None:
        if rec.kind is not DeviceKind.SMARTPLUG:
            raise ApiError(422, "not_supported", "priority and critical apply to smart plugs only")
        from dataclasses import replace

        caps = replace(
            caps,
            priority=b.priority if b.priority is not None else caps.priority,
            critical=b.critical if b.critical is not None else caps.critical,
        )
        changes["capabilities"] = caps
        changes["settings"] = {**rec.settings, "priority": caps.priority, "critical": caps.critical}
    updated = await hub.registry.update(device_id, **changes) if changes else rec
    assert updated is not None
    link = hub.links.links.get(device_id)
    if link is not None:
        link.record = updated
    return device_out(hub, updated)


@router.route(
    "DELETE",
    "/device/register/{device_id}",
    summary="Remove a module",
    tag="device",
    role=Role.HOMEOWNER,
    response=s.Removed,
    errors=(404,),
)
async def device_remove(call: Call[Empty, None]) -> s.Removed:
    """Stops polling the module and forgets it; its history stays until retention removes it."""
    hub = ctx(call)
    device_id = call.path["device_id"]
    if hub.registry.get(device_id) is None:
        raise not_found("device", device_id)
    record = hub.registry.get(device_id)
    await hub.links.remove(device_id)
    if record is not None:
        await hub.onboarding.deprovision(record)
    await hub.registry.remove(device_id)
    hub.alerts.forget_device(device_id)
    hub.bus.publish("device.removed", device_id=device_id)
    return s.Removed(device_id=device_id, removed=True)


@router.route(
    "GET",
    "/device/data/logging",
    summary="Logged data of one module",
    tag="device",
    query=s.LoggingQuery,
    response=s.LoggingOut,
    errors=(404,),
)
async def data_logging(call: Call[s.LoggingQuery, None]) -> s.LoggingOut:
    """Raw samples (poll rate) or 1-minute / 15-minute aggregates; ``auto`` picks by span
    (≤ 2 h raw, ≤ 3 days 1 m, else 15 m)."""
    hub = ctx(call)
    q = call.query
    if hub.registry.get(q.device_id) is None:
        raise not_found("device", q.device_id)
    fields = [f.strip() for f in q.fields.split(",") if f.strip()] if q.fields else None
    start, end = time_range(q)
    try:
        points = await hub.history.query(q.device_id, start, end, q.resolution, fields, limit=q.limit)
    except ValueError as err:
        raise ApiError(400, "invalid_query", str(err)) from err
    used = _resolution_used(q.resolution, start, end)
    return s.LoggingOut(
        device_id=q.device_id,
        start=s.iso(start),
        end=s.iso(end),  # type: ignore[arg-type]
        resolution=used,
        fields=fields or sorted({k for p in points[:1] for k in p} - {"ts"}),
        points=points,
    )


def link_out(hub: HubContext, rec: DeviceRecord) -> s.LinkOut:
    live = hub.state.devices.get(rec.device_id)
    st = live.stats if live else None
    return s.LinkOut(
        device_id=rec.device_id,
        address=rec.address,
        protocol=rec.protocol,
        online=bool(live and live.online),
        polls=st.polls if st else 0,
        failures=st.failures if st else 0,
        consecutive_failures=st.consecutive_failures if st else 0,
        last_ok=s.iso(st.last_ok) if st else None,
        last_error=st.last_error if st else None,
        last_error_at=s.iso(st.last_error_at) if st else None,
        last_latency_ms=st.last_latency_ms if st else None,
        avg_latency_ms=st.avg_latency_ms if st else None,
        next_poll_in_s=st.next_poll_in_s if st else 0.0,
        identity_mismatch=live.identity_mismatch if live else None,
    )


@router.route(
    "GET",
    "/device/diagnostics/remote",
    summary="Link health of each module",
    tag="device",
    query=s.DeviceQuery,
    response=s.LinkList,
    errors=(404,),
)
async def diagnostics(call: Call[s.DeviceQuery, None]) -> s.LinkList:
    hub = ctx(call)
    return s.LinkList(links=[link_out(hub, r) for r in records_of(hub, None, call.query.device_id)])


@router.route(
    "POST",
    "/device/diagnostics/remote",
    summary="Run a diagnostic on a module",
    tag="device",
    role=Role.HOMEOWNER,
    body=s.DiagnosticIn,
    response=s.DiagnosticOut,
    errors=(404,),
)
async def diagnostics_run(call: Call[Empty, s.DiagnosticIn]) -> s.DiagnosticOut:
    """``probe`` identifies the module again over a fresh connection; ``read`` takes one sample now;
    ``reconnect`` drops the link's connection so the next poll opens a new one.  Failures are reported in
    the result (``ok: false``), not as HTTP errors: a failing module is what diagnostics are for."""
    hub = ctx(call)
    b = call.body
    rec = records_of(hub, None, b.device_id)[0]
    link = hub.links.links.get(rec.device_id)
    if link is None:
        raise not_found("link", rec.device_id)
    t0 = time.monotonic()
    try:
        if b.action == "probe":
            info = await link.probe()
            return s.DiagnosticOut(
                device_id=rec.device_id,
                action=b.action,
                ok=True,
                latency_ms=(time.monotonic() - t0) * 1000,
                error=None,
                identity=s.IdentityOut.of(info.identity),
            )
        if b.action == "read":
            tel = await link.read_now()
            return s.DiagnosticOut(
                device_id=rec.device_id,
                action=b.action,
                ok=True,
                latency_ms=(time.monotonic() - t0) * 1000,
                error=None,
                telemetry=s.TelemetryOut.of(tel),
            )
        await link.reconnect()
        return s.DiagnosticOut(
            device_id=rec.device_id,
            action=b.action,
            ok=True,
            latency_ms=(time.monotonic() - t0) * 1000,
            error=None,
        )
    except (DeviceError, TimeoutError) as err:
        return s.DiagnosticOut(
            device_id=rec.device_id,
            action=b.action,
            ok=False,
            latency_ms=(time.monotonic() - t0) * 1000,
            error=str(err) or type(err).__name__,
        )


def alert_out(a: Alert) -> s.AlertOut:
    return s.AlertOut(
        id=a.id,
        kind=a.kind,
        severity=a.severity,  # type: ignore[arg-type]
        device_id=a.device_id,  # type: ignore[arg-type]
        message=a.message,
        raised_at=s.iso(a.raised_at),
        cleared_at=s.iso(a.cleared_at),  # type: ignore[arg-type]
        acknowledged=a.acknowledged,
        active=a.active,
    )


@router.route(
    "GET",
    "/device/safety/fault-detection",
    summary="Faults: offline, fault state, over-temperature",
    tag="device",
    query=s.AlertQuery,
    response=s.AlertList,
)
async def faults(call: Call[s.AlertQuery, None]) -> s.AlertList:
    from hub.notify import FAULT_KINDS

    hub = ctx(call)
    alerts = hub.alerts.list(active_only=call.query.active_only, device_id=call.query.device_id)
    return s.AlertList(alerts=[alert_out(a) for a in alerts if a.kind in FAULT_KINDS])


@router.route(
    "POST",
    "/device/safety/fault-detection",
    summary="Acknowledge faults",
    tag="device",
    role=Role.HOMEOWNER,
    body=s.AckIn,
    response=s.AckOut,
)
async def faults_ack(call: Call[Empty, s.AckIn]) -> s.AckOut:
    return s.AckOut(acknowledged=ctx(call).alerts.acknowledge(call.body.acknowledge))


# ----------------------------------------------------------------------------------------------- hub


def hub_info(hub: HubContext) -> s.HubInfo:
    return s.HubInfo(
        version=__version__,
        started_at=s.iso(hub.started_at),  # type: ignore[arg-type]
        devices=len(hub.registry.all()),
        settings=hub.settings.hub,
    )


@router.route("GET", "/hub/configure", summary="Hub configuration", tag="hub", response=s.HubInfo)
async def configure_get(call: Call[Empty, None]) -> s.HubInfo:
    return hub_info(ctx(call))


@router.route(
    "PATCH",
    "/hub/configure",
    summary="Change hub configuration",
    tag="hub",
    role=Role.INSTALLER,
    body=s.HubSettingsPatch,
    response=s.HubInfo,
    errors=(422,),
)
async def configure_patch(call: Call[Empty, s.HubSettingsPatch]) -> s.HubInfo:
    """Changes take effect at once for new polls; retention applies on the next retention pass."""
    hub = ctx(call)
    merged = {**hub.settings.hub.model_dump(), **call.body.model_dump(exclude_none=True)}
    try:
        new = type(hub.settings.hub).model_validate(merged)
    except ValueError as err:
        raise ApiError(422, "invalid_body", str(err)) from err
    await hub.settings.save(hub=new)
    apply_hub_settings(hub)
    return hub_info(hub)


def apply_hub_settings(hub: HubContext) -> None:
    from hub.poller import PollConfig

    st = hub.settings.hub
    hub.links.config = PollConfig(
        poll_interval_s=st.poll_interval_s,
        timeout_s=st.timeout_s,
        offline_after=st.offline_after,
        cyclic_write_s=st.cyclic_write_s,
        module_revert_s=st.module_revert_s,
    )
    for link in hub.links.links.values():
        link.config = hub.links.config
    hub.history.set_retention(
        Retention(
            raw_s=st.retention_raw_h * 3600,
            one_minute_s=st.retention_1m_days * 86400,
            fifteen_minute_s=st.retention_15m_days * 86400,
        )
    )


@router.route(
    "GET", "/hub/communicate", summary="Communication with every module", tag="hub", response=s.LinkList
)
async def communicate_get(call: Call[Empty, None]) -> s.LinkList:
    hub = ctx(call)
    return s.LinkList(links=[link_out(hub, r) for r in hub.registry.all()])


@router.route(
    "POST",
    "/hub/communicate",
    summary="Poll a module now",
    tag="hub",
    role=Role.HOMEOWNER,
    body=s.CommunicateIn,
    response=s.DeviceOut,
    errors=(404, 409, 422, 502),
)
async def communicate_now(call: Call[Empty, s.CommunicateIn]) -> s.DeviceOut:
    """Reads a fresh sample from the module and returns its updated view (errors if it does not answer)."""
    hub = ctx(call)
    rec = records_of(hub, None, call.body.device_id)[0]
    link = hub.links.links.get(rec.device_id)
    if link is None:
        raise not_found("link", rec.device_id)
    await link.read_now()
    return device_out(hub, rec)


# ----------------------------------------------------------------------------------------------- app


def monitor(hub: HubContext) -> s.MonitorOut:
    flows = site_flows(hub.state.devices)
    return s.MonitorOut(
        ts=datetime.now(UTC),
        site_name=hub.settings.hub.site_name,
        site=s.SiteOut(
            pv_w=flows.pv_w,
            battery_w=flows.battery_w,
            grid_w=flows.grid_w,
            load_w=flows.load_w,
            plugs_w=flows.plugs_w,
            soc_pct=flows.soc_pct,
            grid_ok=flows.grid_ok,
        ),
        devices=[device_out(hub, r) for r in hub.registry.all()],
        active_alerts=len(hub.alerts.list(active_only=True)),
    )


MONITOR_MAX_AGE_S = 1.0


def monitor_body(hub: HubContext) -> bytes:
    """The ``/app/monitor`` JSON, rebuilt only when something it shows has changed (or after at most
    ``MONITOR_MAX_AGE_S``, for what changes with time alone, like a command's time-to-live running out).
    Apps poll this and the push stream sends it every poll interval: most requests are served from here."""
    key = (
        hub.state.version,
        hub.arbiter.version,
        hub.registry.version,
        hub.alerts.version,
        hub.settings.hub.site_name,
    )
    now = time.monotonic()
    cached = hub.monitor_cache
    if cached is not None and cached[0] == key and now - cached[1] < MONITOR_MAX_AGE_S:
        return cached[2]
    body = monitor(hub).model_dump_json().encode()
    hub.monitor_cache = (key, now, body)
    return body


@router.route("GET", "/app/monitor", summary="The whole home at a glance", tag="app", response=s.MonitorOut)
async def app_monitor(call: Call[Empty, None]) -> web.Response:
    """Site power flows, every module with its latest sample and command, and the count of active alerts.
    ``ts`` is when this view was assembled (at most a second before the request)."""
    return web.Response(body=monitor_body(ctx(call)), content_type="application/json")


@router.route(
    "POST",
    "/app/monitor",
    summary="Command any module",
    tag="app",
    role=Role.HOMEOWNER,
    body=s.AnyControlIn,
    response=s.ControlResults,
    errors=(404, 409, 422, 502),
)
async def app_control(call: Call[Empty, s.AnyControlIn]) -> s.ControlResults:
    """One entry point for the app to command a module of any kind: set exactly one of
    ``power_limit_pct``, ``battery_power_w``, ``on``, or ``release``."""
    b = call.body
    given = [n for n in ("power_limit_pct", "battery_power_w", "on") if getattr(b, n) is not None]
    if len(given) + int(b.release) != 1:
        raise ApiError(
            422, "invalid_body", "set exactly one of power_limit_pct, battery_power_w, on, release"
        )
    rec = records_of(ctx(call), None, b.device_id)[0]
    needed = {
        "power_limit_pct": DeviceKind.MICROINVERTER,
        "battery_power_w": DeviceKind.ENERGYSTORAGE,
        "on": DeviceKind.SMARTPLUG,
    }
    if given and needed[given[0]] is not rec.kind:
        raise ApiError(422, "not_supported", f"{given[0]} does not apply to a {rec.kind.value}")
    sp = Setpoint(
        power_limit_pct=b.power_limit_pct, battery_power_w=b.battery_power_w, on=b.on, release=b.release
    )
    return await issue_commands(call, None, b.device_id, sp, b.ttl_s)


@router.route(
    "GET",
    "/app/monitor/stream",
    summary="Live push stream (Server-Sent Events)",
    tag="app",
    role=None,
    query=s.StreamQuery,
    stream="text/event-stream",
    errors=(401, 403),
)
async def app_stream(call: Call[s.StreamQuery, None]) -> web.StreamResponse:
    """A ``monitor`` event with the whole home every poll interval, and each event as it happens
    (``device.online``, ``device.offline``, ``alert.raised``, ``control.applied``, ...).  Authenticate with
    the bearer header, or ``access_token`` for browsers' EventSource."""
    request = call.request
    token = bearer_token(request) or call.query.access_token
    if token is None or request.app[auth_store_key].authenticate(token) is None:
        raise Unauthenticated("missing, unknown or revoked token")
    hub = ctx(call)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    sub = hub.bus.subscribe()
    try:
        await _send_raw(resp, "monitor", monitor_body(hub))
        while True:
            try:
                event = await asyncio.wait_for(sub.get(), hub.settings.hub.poll_interval_s)
            except TimeoutError:
                await _send_raw(resp, "monitor", monitor_body(hub))
                continue
            if event is None:
                break
            await _send_event(resp, event.type, {"ts": event.ts, **event.data})
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        sub.close()
    return resp


async def _send_event(resp: web.StreamResponse, name: str, data: dict[str, Any]) -> None:
    await _send_raw(resp, name, json.dumps(data, separators=(",", ":")).encode())


async def _send_raw(resp: web.StreamResponse, name: str, data: bytes) -> None:
    await resp.write(b"event: " + name.encode() + b"\ndata: " + data + b"\n\n")


@router.route(
    "GET",
    "/app/notify",
    summary="Notifications and alerts",
    tag="app",
    query=s.AlertQuery,
    response=s.AlertList,
)
async def notify_list(call: Call[s.AlertQuery, None]) -> s.AlertList:
    hub = ctx(call)
    return s.AlertList(
        alerts=[
            alert_out(a)
            for a in hub.alerts.list(active_only=call.query.active_only, device_id=call.query.device_id)
        ]
    )


@router.route(
    "POST",
    "/app/notify",
    summary="Acknowledge notifications",
    tag="app",
    role=Role.HOMEOWNER,
    body=s.AckIn,
    response=s.AckOut,
)
async def notify_ack(call: Call[Empty, s.AckIn]) -> s.AckOut:
    return s.AckOut(acknowledged=ctx(call).alerts.acknowledge(call.body.acknowledge))


@router.route("GET", "/app/settings", summary="App preferences", tag="app", response=s.AppSettingsOut)
async def settings_get(call: Call[Empty, None]) -> s.AppSettingsOut:
    return s.AppSettingsOut(settings=ctx(call).settings.app)


@router.route(
    "PATCH",
    "/app/settings",
    summary="Change app preferences",
    tag="app",
    role=Role.HOMEOWNER,
    body=s.AppSettingsPatch,
    response=s.AppSettingsOut,
)
async def settings_patch(call: Call[Empty, s.AppSettingsPatch]) -> s.AppSettingsOut:
    hub = ctx(call)
    merged = {**hub.settings.app.model_dump(), **call.body.model_dump(exclude_none=True)}
    new = type(hub.settings.app).model_validate(merged)
    await hub.settings.save(app=new)
    hub.alerts.low_soc_pct = new.low_soc_alert_pct
    hub.alerts.max_temperature_c = new.max_temperature_alert_c
    return s.AppSettingsOut(settings=new)


@router.route(
    "PUT",
    "/app/settings",
    summary="Replace app preferences",
    tag="app",
    role=Role.HOMEOWNER,
    body=AppSettings,
    response=s.AppSettingsOut,
)
async def settings_put(call: Call[Empty, AppSettings]) -> s.AppSettingsOut:
    hub = ctx(call)
    await hub.settings.save(app=call.body)
    hub.alerts.low_soc_pct = call.body.low_soc_alert_pct
    hub.alerts.max_temperature_c = call.body.max_temperature_alert_c
    return s.AppSettingsOut(settings=call.body)


# ----------------------------------------------------------------------------------------------- auth


def token_out(info: Any) -> s.TokenOut:
    return s.TokenOut(
        token_id=info.id,
        name=info.name,
        role=info.role.value,
        created_at=info.created_at,
        last_used_at=info.last_used_at,
    )


@router.route(
    "POST",
    "/auth/pair",
    summary="Exchange a pairing code for a bearer token",
    tag="auth",
    role=None,
    body=s.PairIn,
    response=s.PairOut,
    status=201,
    errors=(401, 403, 429),
)
async def pair(call: Call[Empty, s.PairIn]) -> s.PairOut:
    """The hub prints a pairing code at first start; a homeowner can issue more with
    ``POST /auth/pairing-code``.  Failed attempts are rate-limited per client and overall (429)."""
    issued = await call.request.app[auth_store_key].exchange(
        call.body.code, client_name=call.body.name, remote=call.request.remote
    )
    return s.PairOut(token=issued.token, token_id=issued.info.id, role=issued.info.role.value)  # type: ignore[arg-type]


@router.route(
    "POST",
    "/auth/pairing-code",
    summary="Issue a pairing code for another client",
    tag="auth",
    role=Role.HOMEOWNER,
    body=s.PairingCodeIn,
    response=s.PairingCodeOut,
    status=201,
)
async def pairing_code(call: Call[Empty, s.PairingCodeIn]) -> s.PairingCodeOut:
    assert call.token is not None
    code = call.request.app[auth_store_key].issue_pairing_code(
        Role(call.body.role), issued_by=call.token, ttl_s=call.body.ttl_s
    )
    assert code.expires_at is not None
    return s.PairingCodeOut(code=code.code, role=code.role.value, expires_at=code.expires_at)  # type: ignore[arg-type]


@router.route(
    "GET", "/auth/tokens", summary="Paired clients", tag="auth", role=Role.HOMEOWNER, response=s.TokenList
)
async def tokens(call: Call[Empty, None]) -> s.TokenList:
    return s.TokenList(tokens=[token_out(t) for t in call.request.app[auth_store_key].list_tokens()])


@router.route(
    "DELETE",
    "/auth/tokens/{token_id}",
    summary="Revoke a client's token",
    tag="auth",
    role=Role.HOMEOWNER,
    response=s.TokenList,
    errors=(404, 409),
)
async def revoke(call: Call[Empty, None]) -> s.TokenList:
    store = call.request.app[auth_store_key]
    token_id = call.path["token_id"]
    target = store.get_token(token_id)
    if target is None:
        raise not_found("token", token_id)
    assert call.token is not None
    if not role_allows(call.token.role, target.role):
        raise ApiError(403, "forbidden", f"a {call.token.role} cannot revoke a {target.role} token")
    installers = [t for t in store.list_tokens() if t.role is Role.INSTALLER]
    if target.role is Role.INSTALLER and len(installers) == 1:
        raise ApiError(
            409, "last_installer", "pair another installer before revoking the last installer token"
        )
    await store.revoke(token_id)
    return s.TokenList(tokens=[token_out(t) for t in store.list_tokens()])


# ----------------------------------------------------------------------------------------------- discovery


def discovery_out(hub: HubContext) -> s.DiscoveryOut:
    ob = hub.onboarding
    return s.DiscoveryOut(
        policy=hub.settings.hub.onboarding_policy,
        window_open=ob.window_open,
        window_closes_at=s.iso(ob.window_closes_at),
        sources=dict(hub.discovery_status),
        candidates=[s.CandidateOut.model_validate(c.as_dict()) for c in ob.candidates.values()],
        rejected=[
            s.RejectionOut(at=s.iso(r.at), source=r.source, key=r.key, reason=r.reason)  # type: ignore[arg-type]
            for r in ob.rejections
        ],
    )


@router.route(
    "GET",
    "/device/discovery",
    summary="Discovered modules not yet registered",
    tag="device",
    response=s.DiscoveryOut,
)
async def discovery_get(call: Call[Empty, None]) -> s.DiscoveryOut:
    """Modules heard over mDNS or BLE, with whether their identity is proven, and announcements that were
    rejected (malformed, failed authentication) with the reason.  Approve one with
    ``POST /device/register {"candidate_id": ...}``; changes arrive on the push stream as
    ``discovery.updated`` and ``discovery.rejected``."""
    return discovery_out(ctx(call))


@router.route(
    "POST",
    "/device/discovery",
    summary="Re-scan, or open/close the pairing window",
    tag="device",
    role=Role.HOMEOWNER,
    body=s.DiscoveryIn,
    response=s.DiscoveryOut,
)
async def discovery_post(call: Call[Empty, s.DiscoveryIn]) -> s.DiscoveryOut:
    """``rescan`` queries the network again now.  ``open_window`` starts a pairing window of ``duration_s``
    (in ``auto`` policy, modules that prove their identity register while it is open: the WPS-button
    model); ``close_window`` ends it."""
    hub = ctx(call)
    b = call.body
    if b.action == "rescan":
        for rescan in hub.discovery_rescans:
            await rescan()
    elif b.action == "open_window":
        hub.onboarding.open_window(b.duration_s)
    else:
        hub.onboarding.close_window()
    return discovery_out(hub)


# ----------------------------------------------------------------------------------------------- security


@router.route(
    "GET",
    "/device/security/authenticate",
    summary="Which modules proved their identity",
    tag="device",
    response=s.AuthStatusList,
)
async def security_status(call: Call[Empty, None]) -> s.AuthStatusList:
    hub = ctx(call)
    return s.AuthStatusList(
        hub_id=hub.settings.hub_id,
        devices=[
            s.AuthStatusOut(
                device_id=r.device_id,
                protocol=r.protocol,
                authenticated=r.authenticated,
                provisioned=bool(r.settings.get("credential")),
            )
            for r in hub.registry.all()
        ],
    )


@router.route(
    "POST",
    "/device/security/authenticate",
    summary="Challenge a module to prove its identity now",
    tag="device",
    role=Role.HOMEOWNER,
    body=s.AuthenticateIn,
    response=s.AuthenticateOut,
    errors=(404,),
)
async def security_authenticate(call: Call[Empty, s.AuthenticateIn]) -> s.AuthenticateOut:
    """Sends a fresh nonce and checks the module's signature and certificate against the trusted vendor
    keys.  A module that was authenticated and now fails raises an ``identity_mismatch`` alert."""
    hub = ctx(call)
    rec = records_of(hub, None, call.body.device_id)[0]
    try:
        driver, _, proven = await hub.onboarding.identify(
            Address.parse(rec.address), rec.protocol, claimed=(rec.identity.vendor, rec.identity.serial)
        )
        await driver.close()
    except (DeviceError, AttestationError, OnboardingError) as err:
        if rec.authenticated:
            hub.alerts.raise_(
                "identity_mismatch",
                "critical",
                rec.device_id,
                f"{rec.device_id} failed authentication: {err}",
            )
        return s.AuthenticateOut(
            device_id=rec.device_id, ok=False, authenticated=rec.authenticated, reason=str(err)
        )
    reason = (
        None if proven else "this module cannot prove its identity (no certificate, or a legacy protocol)"
    )
    return s.AuthenticateOut(
        device_id=rec.device_id, ok=proven, authenticated=rec.authenticated, reason=reason
    )


# ----------------------------------------------------------------------------------------------- trust


def vendor_key_out(key: Any) -> s.VendorKeyOut:
    return s.VendorKeyOut(
        key_id=key.key_id,
        vendor=key.vendor,
        public_key=key.public_key_b64,
        purposes=sorted(key.purposes),
        added_at=s.iso(key.added_at),  # type: ignore[arg-type]
        added_by=key.added_by,
        replaces=key.replaces,
    )


@router.route("GET", "/hub/trust", summary="Trusted vendor keys", tag="hub", response=s.VendorKeyList)
async def trust_list(call: Call[Empty, None]) -> s.VendorKeyList:
    """Vendor keys the hub trusts for device certificates (``device``) and firmware (``firmware``)."""
    return s.VendorKeyList(keys=[vendor_key_out(k) for k in ctx(call).trust.list()])


@router.route(
    "POST",
    "/hub/trust",
    summary="Trust a vendor key",
    tag="hub",
    role=Role.INSTALLER,
    body=s.VendorKeyIn,
    response=s.VendorKeyOut,
    status=201,
    errors=(409, 422),
)
async def trust_add(call: Call[Empty, s.VendorKeyIn]) -> s.VendorKeyOut:
    from hub.trust import TrustError

    b = call.body
    try:
        key = await ctx(call).trust.add(
            b.vendor, b.public_key, frozenset(b.purposes), call.token.name if call.token else None
        )
    except TrustError as err:
        raise ApiError(422, getattr(err, "code", "bad_key"), str(err)) from err
    return vendor_key_out(key)


@router.route(
    "DELETE",
    "/hub/trust/{key_id}",
    summary="Stop trusting a vendor key",
    tag="hub",
    role=Role.INSTALLER,
    response=s.VendorKeyList,
    errors=(404,),
)
async def trust_remove(call: Call[Empty, None]) -> s.VendorKeyList:
    """Certificates and firmware signed by the removed key are refused from now on."""
    hub = ctx(call)
    key_id = call.path["key_id"]
    if not await hub.trust.remove(key_id):
        raise not_found("key", key_id)
    return s.VendorKeyList(keys=[vendor_key_out(k) for k in hub.trust.list()])


@router.route(
    "POST",
    "/hub/trust/{key_id}/rotate",
    summary="Replace a vendor key by one it signed",
    tag="hub",
    role=Role.INSTALLER,
    body=s.RotateIn,
    response=s.VendorKeyOut,
    status=201,
    errors=(404, 422),
)
async def trust_rotate(call: Call[Empty, s.RotateIn]) -> s.VendorKeyOut:
    """The old key signs the statement naming the new key (see docs/firmware.md); the new key inherits the
    vendor and purposes and the old key is removed."""
    from hub.trust import TrustError, UnknownKey

    hub = ctx(call)
    key_id = call.path["key_id"]
    try:
        key = await hub.trust.rotate(key_id, call.body.public_key, call.body.signature)
    except UnknownKey as err:
        raise not_found("key", key_id) from err
    except TrustError as err:
        raise ApiError(422, getattr(err, "code", "bad_rotation"), str(err)) from err
    return vendor_key_out(key)


# ----------------------------------------------------------------------------------------------- misc


@router.route("GET", "/healthz", summary="Liveness", tag="hub", role=None, response=s.Health)
async def health(call: Call[Empty, None]) -> s.Health:
    return s.Health(
        status="ok", version=__version__, needs_pairing=call.request.app[auth_store_key].needs_pairing
    )
