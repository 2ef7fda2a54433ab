"""Request and response schemas of the ORES REST API (pydantic models).

These models are the single source of truth: the router validates every query string and body against them,
serialises responses through them, and generates ``/openapi.json`` from them.  Request models forbid unknown
fields so a typo is an error, not a silently ignored setting.  Powers follow the hub's sign convention
(``devices.model``); times on the wire are ISO 8601 UTC.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from devices.model import Capabilities, Identity, Telemetry
from hub.config import AppSettings, HubSettings
from hub.history import AGGREGATE_FIELDS, AUTO_FIELDS, RAW_FIELDS

DeviceId = Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")]
Resolution = Literal["auto", "raw", "1m", "15m"]


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def iso(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------- devices


class IdentityOut(BaseModel):
    vendor: str
    model: str
    serial: str
    firmware_version: str

    @classmethod
    def of(cls, ident: Identity) -> IdentityOut:
        return cls(
            vendor=ident.vendor,
            model=ident.model,
            serial=ident.serial,
            firmware_version=ident.firmware_version,
        )


class CapabilitiesOut(BaseModel):
    rated_power_w: float | None
    capacity_wh: float | None
    max_charge_w: float | None
    max_discharge_w: float | None
    min_soc_pct: float | None
    max_soc_pct: float | None
    controllable: bool
    priority: int | None
    critical: bool

    @classmethod
    def of(cls, caps: Capabilities) -> CapabilitiesOut:
        return cls(
            rated_power_w=caps.rated_power_w,
            capacity_wh=caps.capacity_wh,
            max_charge_w=caps.max_charge_w,
            max_discharge_w=caps.max_discharge_w,
            min_soc_pct=caps.min_soc_pct,
            max_soc_pct=caps.max_soc_pct,
            controllable=caps.controllable,
            priority=caps.priority,
            critical=caps.critical,
        )


class TelemetryOut(BaseModel):
    """One sample. Sign: power_w > 0 delivers power into the home (production, discharge, grid import)."""

    ts: datetime
    state: str
    power_w: float | None
    energy_out_wh: float | None
    energy_in_wh: float | None
    voltage_v: float | None
    current_a: float | None
    frequency_hz: float | None
    temperature_c: float | None
    soc_pct: float | None
    soh_pct: float | None
    power_limit_pct: float | None
    on: bool | None
    grid_ok: bool | None

    @classmethod
    def of(cls, tel: Telemetry) -> TelemetryOut:
        return cls(
            ts=datetime.fromtimestamp(tel.ts, UTC),
            state=tel.state.value,
            power_w=tel.power_w,
            energy_out_wh=tel.energy_out_wh,
            energy_in_wh=tel.energy_in_wh,
            voltage_v=tel.voltage_v,
            current_a=tel.current_a,
            frequency_hz=tel.frequency_hz,
            temperature_c=tel.temperature_c,
            soc_pct=tel.soc_pct,
            soh_pct=tel.soh_pct,
            power_limit_pct=tel.power_limit_pct,
            on=tel.on,
            grid_ok=tel.grid_ok,
        )


class SetpointOut(BaseModel):
    power_limit_pct: float | None = None
    battery_power_w: float | None = None
    on: bool | None = None
    release: bool = False


class ControlOut(BaseModel):
    """The command in force for a module: which layer it comes from and until when."""

    source: Literal["api", "schedule", "default"]
    setpoint: SetpointOut
    issued_at: datetime | None
    expires_at: datetime | None
    issued_by: str | None
    written: bool = Field(description="The module has acknowledged this exact setpoint")


class DeviceOut(BaseModel):
    device_id: str
    kind: str
    name: str
    address: str
    protocol: str
    authenticated: bool
    registered_at: datetime
    identity: IdentityOut
    capabilities: CapabilitiesOut
    online: bool
    last_seen: datetime | None
    telemetry: TelemetryOut | None
    control: ControlOut | None


class DeviceList(BaseModel):
    devices: list[DeviceOut]


class KindStatus(BaseModel):
    devices: list[DeviceOut]
    total_power_w: float = Field(description="Sum of power_w of the online modules listed, W")
    online: int
    offline: int


class DeviceQuery(Strict):
    device_id: DeviceId | None = Field(None, description="Only this module")


class DeviceIdQuery(Strict):
    device_id: DeviceId


class RegisterIn(Strict):
    """Register a module: approve a discovered one (``candidate_id``) or name its ``address``."""

    candidate_id: DeviceId | None = Field(None, description="A module listed by GET /device/discovery")
    address: str | None = Field(
        None,
        min_length=8,
        max_length=256,
        description="modbus://HOST:PORT?unit=N (SunSpec Modbus TCP) or http://HOST:PORT/ores/v1 (ORES-HTTP)",
        examples=["modbus://192.0.2.10:502?unit=1", "http://192.0.2.11:8080/ores/v1"],
    )
    protocol: Literal["ores-http", "sunspec-modbus"] | None = Field(
        None, description="Skip auto-detection and use this protocol"
    )
    name: str | None = Field(None, min_length=1, max_length=64)


class CandidateOut(BaseModel):
    candidate_id: str
    source: Literal["mdns", "ble"]
    status: Literal["pending", "examining", "verified", "unverified", "rejected", "gone"]
    kind: str
    vendor: str
    model: str
    serial: str
    firmware_version: str | None
    protocol: str
    address: str | None
    ble_address: str | None
    identity_proven: bool
    unprovisioned: bool
    reason: str | None
    first_seen: datetime
    last_seen: datetime


class RejectionOut(BaseModel):
    at: datetime
    source: str
    key: str
    reason: str


class DiscoveryOut(BaseModel):
    policy: Literal["approve", "auto"]
    window_open: bool
    window_closes_at: datetime | None
    sources: dict[str, str] = Field(description="Each discovery source and its state")
    candidates: list[CandidateOut]
    rejected: list[RejectionOut]


class DiscoveryIn(Strict):
    action: Literal["rescan", "open_window", "close_window"]
    duration_s: float = Field(120.0, ge=10, le=3600, description="How long the pairing window stays open")


class AuthenticateIn(Strict):
    device_id: DeviceId


class AuthStatusOut(BaseModel):
    device_id: str
    protocol: str
    authenticated: bool
    provisioned: bool = Field(description="The module holds a credential from this hub")


class AuthStatusList(BaseModel):
    hub_id: str
    devices: list[AuthStatusOut]


class AuthenticateOut(BaseModel):
    device_id: str
    ok: bool
    authenticated: bool
    reason: str | None


class VendorKeyOut(BaseModel):
    key_id: str
    vendor: str
    public_key: str = Field(description="Raw Ed25519 public key, base64")
    purposes: list[Literal["device", "firmware"]]
    added_at: datetime
    added_by: str | None
    replaces: str | None


class VendorKeyList(BaseModel):
    keys: list[VendorKeyOut]


class VendorKeyIn(Strict):
    vendor: str = Field(min_length=1, max_length=64)
    public_key: str = Field(
        min_length=40, max_length=4096, description="Ed25519 public key: raw base64 or PEM"
    )
    purposes: list[Literal["device", "firmware"]] = Field(["device", "firmware"], min_length=1, max_length=2)


class RotateIn(Strict):
    public_key: str = Field(min_length=40, max_length=4096, description="The new key: raw base64 or PEM")
    signature: str = Field(
        min_length=40,
        max_length=200,
        description="The old key's signature over the rotation statement, base64",
    )


class DevicePatch(Strict):
    name: str | None = Field(None, min_length=1, max_length=64)
    priority: int | None = Field(
        None, ge=0, le=100, description="Smart plug shedding order: lower sheds first"
    )
    critical: bool | None = Field(None, description="Smart plug feeds a load that must stay on in an outage")


class Removed(BaseModel):
    device_id: str
    removed: bool


# ---------------------------------------------------------------------------------------------- control


class TtlMixin(Strict):
    ttl_s: float | None = Field(
        None, gt=0, le=7 * 86400, description="After this many seconds the module returns to its default"
    )


class InverterControlIn(TtlMixin):
    device_id: DeviceId | None = Field(
        None, description="One microinverter; omit to limit every microinverter"
    )
    power_limit_pct: float = Field(ge=0, le=100, description="Active power limit, % of rated power")


class StorageControlIn(TtlMixin):
    device_id: DeviceId | None = Field(None, description="One battery; omit to command every battery")
    mode: Literal["auto", "charge", "discharge", "idle"] = Field(
        description="auto: the battery's own self-consumption; idle: hold at 0 W"
    )
    power_w: float | None = Field(
        None, ge=0, le=1_000_000, description="Magnitude for charge/discharge, W (required for those modes)"
    )


class PlugControlIn(TtlMixin):
    device_id: DeviceId | None = Field(None, description="One plug; omit to switch every plug")
    on: bool


class AnyControlIn(TtlMixin):
    """A direct command for one module of any kind; exactly one of the setpoint fields (or release)."""

    device_id: DeviceId
    power_limit_pct: float | None = Field(None, ge=0, le=100)
    battery_power_w: float | None = Field(
        None, ge=-1_000_000, le=1_000_000, description="+ discharge, − charge"
    )
    on: bool | None = None
    release: bool = Field(False, description="End any direct command and return to schedule/default")


class ControlResult(BaseModel):
    device_id: str
    status: Literal["applied", "pending", "released"]
    error: str | None = None
    control: ControlOut


class ControlResults(BaseModel):
    results: list[ControlResult]


class ControlStates(BaseModel):
    controls: dict[str, ControlOut]


# ---------------------------------------------------------------------------------------------- history


class RangeQuery(Strict):
    device_id: DeviceId | None = Field(None, description="One module; omit for every module of the kind")
    start: datetime | None = Field(None, description="ISO 8601; default: 24 h before end")
    end: datetime | None = Field(None, description="ISO 8601; default: now")
    resolution: Resolution = "auto"

    @field_validator("start", "end", mode="before")
    @classmethod
    def _iso_only(cls, value: object) -> object:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            raise ValueError("use an ISO 8601 date-time such as 2026-06-01T12:00:00Z")
        return value

    @field_validator("start", "end")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class LoggingQuery(RangeQuery):
    device_id: DeviceId  # type: ignore[assignment]
    fields: str | None = Field(
        None,
        max_length=256,
        description="Comma-separated field names. raw: "
        + ", ".join(RAW_FIELDS)
        + "; 1m/15m: "
        + ", ".join(AGGREGATE_FIELDS)
        + "; auto: "
        + ", ".join(AUTO_FIELDS),
    )
    limit: int = Field(10000, ge=1, le=100000)


class SeriesOut(BaseModel):
    device_id: str
    resolution: str
    energy_out_wh: float | None = Field(description="Energy delivered into the home over the range, Wh")
    energy_in_wh: float | None = Field(description="Energy taken from the home over the range, Wh")
    points: list[dict[str, Any]]


class EnergyOut(BaseModel):
    start: datetime
    end: datetime
    resolution: str
    total_energy_out_wh: float
    total_energy_in_wh: float
    series: list[SeriesOut]


class LoggingOut(BaseModel):
    device_id: str
    start: datetime
    end: datetime
    resolution: str
    fields: list[str]
    points: list[dict[str, Any]] = Field(description="Samples or aggregates; ts is POSIX seconds (UTC)")


# ---------------------------------------------------------------------------------------------- diagnostics


class LinkOut(BaseModel):
    device_id: str
    address: str
    protocol: str
    online: bool
    polls: int
    failures: int
    consecutive_failures: int
    last_ok: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    last_latency_ms: float | None
    avg_latency_ms: float | None
    next_poll_in_s: float
    identity_mismatch: str | None


class LinkList(BaseModel):
    links: list[LinkOut]


class DiagnosticIn(Strict):
    device_id: DeviceId
    action: Literal["probe", "read", "reconnect"] = Field(
        description="probe: identify again over a new connection; read: one fresh sample; reconnect: drop and "
        "re-open the link"
    )


class DiagnosticOut(BaseModel):
    device_id: str
    action: str
    ok: bool
    latency_ms: float
    error: str | None
    identity: IdentityOut | None = None
    telemetry: TelemetryOut | None = None


class CommunicateIn(Strict):
    device_id: DeviceId


# ---------------------------------------------------------------------------------------------- alerts


class AlertOut(BaseModel):
    id: int
    kind: str
    severity: Literal["info", "warning", "critical"]
    device_id: str | None
    message: str
    raised_at: datetime
    cleared_at: datetime | None
    acknowledged: bool
    active: bool


class AlertList(BaseModel):
    alerts: list[AlertOut]


class AlertQuery(Strict):
    device_id: DeviceId | None = None
    active_only: bool = False


class AckIn(Strict):
    acknowledge: list[Annotated[int, Field(ge=1)]] = Field(min_length=1, max_length=500)


class AckOut(BaseModel):
    acknowledged: list[int]


# ---------------------------------------------------------------------------------------------- site


class SiteOut(BaseModel):
    """Power flows in W: load = pv + battery + grid (see the sign convention)."""

    pv_w: float
    battery_w: float
    grid_w: float | None
    load_w: float | None
    plugs_w: float
    soc_pct: float | None
    grid_ok: bool | None


class MonitorOut(BaseModel):
    ts: datetime
    site_name: str
    site: SiteOut
    devices: list[DeviceOut]
    active_alerts: int


class StreamQuery(Strict):
    access_token: str | None = Field(
        None, max_length=256, description="For EventSource clients that cannot send headers"
    )


# ---------------------------------------------------------------------------------------------- settings


class HubInfo(BaseModel):
    version: str
    started_at: datetime
    devices: int
    settings: HubSettings


class HubSettingsPatch(Strict):
    site_name: str | None = Field(None, min_length=1, max_length=64)
    poll_interval_s: float | None = Field(None, ge=0.2, le=60)
    timeout_s: float | None = Field(None, ge=0.2, le=30)
    offline_after: int | None = Field(None, ge=1, le=100)
    cyclic_write_s: float | None = Field(None, ge=1, le=3600)
    default_ttl_s: float | None = Field(None, ge=1, le=86400)
    max_ttl_s: float | None = Field(None, ge=1, le=7 * 86400)
    module_revert_s: float | None = Field(None, ge=5, le=3600)
    retention_raw_h: float | None = Field(None, ge=1, le=24 * 31)
    retention_1m_days: float | None = Field(None, ge=1, le=3650)
    retention_15m_days: float | None = Field(None, ge=1, le=36500)
    onboarding_policy: Literal["approve", "auto"] | None = None


class AppSettingsPatch(Strict):
    display_name: str | None = Field(None, min_length=1, max_length=64)
    power_unit: Literal["W", "kW"] | None = None
    currency: str | None = Field(None, pattern=r"^[A-Z]{3}$")
    import_price_per_kwh: float | None = Field(None, ge=0, le=100)
    export_price_per_kwh: float | None = Field(None, ge=0, le=100)
    low_soc_alert_pct: float | None = Field(None, ge=0, le=100)
    max_temperature_alert_c: float | None = Field(None, ge=20, le=120)
    notifications_enabled: bool | None = None


class AppSettingsOut(BaseModel):
    settings: AppSettings


# ---------------------------------------------------------------------------------------------- auth


class PairIn(Strict):
    code: str = Field(
        min_length=1, max_length=32, description="The pairing code shown by the hub, e.g. 1234-5678"
    )
    name: str = Field(min_length=1, max_length=64, description="A name for this client, e.g. 'Ana's phone'")


class PairOut(BaseModel):
    token: str = Field(description="Bearer token; shown once, store it safely")
    token_id: str
    role: Literal["viewer", "homeowner", "installer"]


class TokenOut(BaseModel):
    token_id: str
    name: str
    role: Literal["viewer", "homeowner", "installer"]
    created_at: datetime
    last_used_at: datetime | None


class TokenList(BaseModel):
    tokens: list[TokenOut]


class PairingCodeIn(Strict):
    role: Literal["viewer", "homeowner", "installer"] = "viewer"
    ttl_s: float = Field(600, ge=30, le=86400)


class PairingCodeOut(BaseModel):
    code: str
    role: Literal["viewer", "homeowner", "installer"]
    expires_at: datetime


class TokenPath(Strict):
    pass


class Health(BaseModel):
    status: Literal["ok"]
    version: str
    needs_pairing: bool
