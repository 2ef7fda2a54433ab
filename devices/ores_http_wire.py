"""The ORES-HTTP wire format (docs/module-protocol.md): JSON shapes, and strict parsers and serialisers.

Shared by the hub's driver (``devices.drivers.ores_http``) and the simulated module server
(``devices.sim.ores_http_server``) so that both read and write exactly the documented format.
``TypedDict``s describe the JSON; ``parse_*`` functions take what ``decode_json`` returned and either build
the domain values of ``devices.model`` or raise a ``WireError`` whose message names the offending field:
``WireFormatError`` for a malformed body or wrong type, ``WireRangeError`` for a well-formed value out of
range, ``WireUnsupportedError`` for a body that is not ORES-HTTP 1.x at all.  Unknown fields are ignored and
unknown enum values map to ``UNKNOWN``, as the versioning rules require.  The authentication bodies (§6:
challenge, certificate, credential) are here too; their cryptography lives in ``devices.attest``; so are the
firmware update bodies (§9: the slots status, begin, received count), whose signature checks live in
``firmware.verify``.
"""

from __future__ import annotations

import base64
import json
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, NotRequired, TypedDict

from devices.attest import (
    MAX_NONCE_LEN,
    MIN_NONCE_LEN,
    BadCertificate,
    DeviceCertificate,
    check_hub_id,
    decode_b64,
    encode_b64,
)
from devices.drivers.base import FirmwareSlots
from devices.model import (
    Capabilities,
    DeviceInfo,
    DeviceKind,
    Identity,
    OperatingState,
    Setpoint,
    Telemetry,
)

__all__ = [
    "AUTH_CHALLENGE_PATH",
    "AUTH_CREDENTIAL_PATH",
    "BASE_PATH",
    "CREDENTIAL_BYTES",
    "FIRMWARE_BEGIN_PATH",
    "FIRMWARE_IMAGE_PATH",
    "FIRMWARE_INSTALL_PATH",
    "FIRMWARE_PATH",
    "FIRMWARE_ROLLBACK_PATH",
    "FIRMWARE_STATES",
    "MAX_BODY_BYTES",
    "MAX_FIRMWARE_BEGIN_BYTES",
    "MAX_FIRMWARE_CHUNK_BYTES",
    "MAX_REVERT_AFTER_S",
    "MAX_STRING_LEN",
    "PROTOCOL_MAJOR",
    "PROTOCOL_NAME",
    "PROTOCOL_VERSION",
    "SETPOINT_KIND",
    "ActiveSetpoint",
    "AuthChallengeJSON",
    "AuthChallengeReplyJSON",
    "AuthCredentialJSON",
    "CapabilitiesJSON",
    "ControlJSON",
    "ControlRequest",
    "ErrorDetailJSON",
    "ErrorInfo",
    "ErrorJSON",
    "Fault",
    "FaultJSON",
    "FirmwareBeginJSON",
    "FirmwareErrorJSON",
    "FirmwareReceivedJSON",
    "FirmwareStatusJSON",
    "IdentityJSON",
    "ModuleStatus",
    "SetpointStateJSON",
    "StatusJSON",
    "TelemetryJSON",
    "WireError",
    "WireFormatError",
    "WireRangeError",
    "WireUnsupportedError",
    "active_setpoint_to_wire",
    "auth_challenge_reply_to_wire",
    "auth_challenge_to_wire",
    "auth_credential_to_wire",
    "capabilities_to_wire",
    "control_to_wire",
    "decode_json",
    "encode_json",
    "error_to_wire",
    "firmware_begin_to_wire",
    "firmware_received_to_wire",
    "firmware_status_to_wire",
    "format_ts",
    "generate_credential",
    "identity_to_wire",
    "parse_active_setpoint",
    "parse_auth_challenge",
    "parse_auth_challenge_reply",
    "parse_auth_credential",
    "parse_control",
    "parse_error",
    "parse_firmware_begin",
    "parse_firmware_received",
    "parse_firmware_status",
    "parse_identity",
    "parse_identity_provisioned",
    "parse_status",
    "parse_telemetry",
    "parse_ts",
    "status_to_wire",
    "telemetry_to_wire",
]

PROTOCOL_NAME = "ores-http"
PROTOCOL_VERSION = "1.0"
PROTOCOL_MAJOR = 1
BASE_PATH = "/ores/v1"
#: Largest request or response body either side accepts, in bytes.
MAX_BODY_BYTES = 64 * 1024
#: Longest watchdog a control may ask for, in seconds.
MAX_REVERT_AFTER_S = 86_400.0
#: Longest identity string (vendor, model, serial, firmware version).
MAX_STRING_LEN = 128
#: Which setpoint field applies to which kind.
SETPOINT_KIND: Mapping[str, DeviceKind] = MappingProxyType(
    {
        "power_limit_pct": DeviceKind.MICROINVERTER,
        "battery_power_w": DeviceKind.ENERGYSTORAGE,
        "on": DeviceKind.SMARTPLUG,
    }
)

#: Authentication endpoints (docs/module-protocol.md §6), relative to the base path.
AUTH_CHALLENGE_PATH = "auth/challenge"
AUTH_CREDENTIAL_PATH = "auth/credential"
#: Random bytes in a credential the hub issues (sent as standard base64: 44 characters).
CREDENTIAL_BYTES = 32

#: Firmware update endpoints (docs/module-protocol.md §9), relative to the base path.
FIRMWARE_PATH = "firmware"
FIRMWARE_BEGIN_PATH = "firmware/begin"
FIRMWARE_IMAGE_PATH = "firmware/image"
FIRMWARE_INSTALL_PATH = "firmware/install"
FIRMWARE_ROLLBACK_PATH = "firmware/rollback"
#: Largest image chunk one ``PUT /firmware/image`` carries (a module MUST accept this much).
MAX_FIRMWARE_CHUNK_BYTES = 256 * 1024
#: Largest ``POST /firmware/begin`` body: a manifest of up to 64 KiB in base64, and the signature.
MAX_FIRMWARE_BEGIN_BYTES = 128 * 1024
#: The firmware states a module reports (others are kept as they come).
FIRMWARE_STATES = ("idle", "receiving", "verifying", "installing", "rebooting", "failed")
_MAX_FIRMWARE_VERSION_LEN = 256
_MAX_MANIFEST_BYTES = 64 * 1024
_SNAKE = re.compile(r"[a-z][a-z0-9_]{0,63}")

_VERSION_RE = re.compile(r"^(\d{1,4})\.(\d{1,4})$")
_MAX_TS_LEN = 64


# -------------------- errors


class WireError(ValueError):
    """A body that does not follow the ORES-HTTP wire format; the message says where and why.

    ``field`` is the dotted path of the offending field (``"control.power_limit_pct"``) when there is one.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class WireFormatError(WireError):
    """Not JSON, not an object, a required field missing, or a value of the wrong type (HTTP 400)."""


class WireRangeError(WireError):
    """A well-formed value outside its allowed range (HTTP 422)."""


class WireUnsupportedError(WireError):
    """The body is not an ORES-HTTP identity of a major version this code speaks."""


# -------------------- JSON shapes


class CapabilitiesJSON(TypedDict, total=False):
    rated_power_w: float | None
    capacity_wh: float | None
    max_charge_w: float | None
    max_discharge_w: float | None
    min_soc_pct: float | None
    max_soc_pct: float | None
    controllable: bool
    priority: int | None
    critical: bool


class IdentityJSON(TypedDict):
    protocol: str
    protocol_version: str
    kind: str
    vendor: str
    model: str
    serial: str
    firmware_version: str
    capabilities: NotRequired[CapabilitiesJSON]
    provisioned: NotRequired[bool]


class FaultJSON(TypedDict):
    code: str
    message: str


class SetpointStateJSON(TypedDict):
    power_limit_pct: float | None
    battery_power_w: float | None
    on: bool | None
    revert_at: str | None


class StatusJSON(TypedDict):
    state: str
    uptime_s: float
    faults: list[FaultJSON]
    setpoint: SetpointStateJSON


class TelemetryJSON(TypedDict):
    ts: str
    state: str
    power_w: float | None
    energy_out_wh: NotRequired[float | None]
    energy_in_wh: NotRequired[float | None]
    voltage_v: NotRequired[float | None]
    current_a: NotRequired[float | None]
    frequency_hz: NotRequired[float | None]
    temperature_c: NotRequired[float | None]
    soc_pct: NotRequired[float | None]
    soh_pct: NotRequired[float | None]
    power_limit_pct: NotRequired[float | None]
    on: NotRequired[bool | None]
    grid_ok: NotRequired[bool | None]


class ControlJSON(TypedDict, total=False):
    power_limit_pct: float
    battery_power_w: float
    on: bool
    release: bool
    revert_after_s: float


class AuthChallengeJSON(TypedDict):
    """``POST /auth/challenge`` request."""

    nonce: str
    hub_id: str


class AuthChallengeReplyJSON(TypedDict):
    """``POST /auth/challenge`` reply: the certificate's wire object and the challenge signature."""

    certificate: dict[str, str]
    signature: str


class AuthCredentialJSON(TypedDict):
    """``POST /auth/credential`` request."""

    credential: str
    hub_id: str


class FirmwareErrorJSON(TypedDict):
    """Why the last firmware operation was refused or failed."""

    code: str
    message: str


class FirmwareStatusJSON(TypedDict):
    """``GET /firmware``: the slots and the state of an update (also the install/rollback reply)."""

    active_version: str
    inactive_version: str | None
    state: str
    received_bytes: int
    error: FirmwareErrorJSON | None


class FirmwareBeginJSON(TypedDict):
    """``POST /firmware/begin`` request: the manifest file and its signature, both base64."""

    manifest: str
    signature: str


class FirmwareReceivedJSON(TypedDict):
    """``POST /firmware/begin`` and ``PUT /firmware/image`` reply."""

    received_bytes: int


class ErrorDetailJSON(TypedDict):
    code: str
    message: str
    details: dict[str, Any]


class ErrorJSON(TypedDict):
    error: ErrorDetailJSON


# -------------------- values


@dataclass(frozen=True, slots=True)
class Fault:
    """One active fault reported by ``GET /status``."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class ActiveSetpoint:
    """The setpoint a module runs with and when (POSIX seconds, UTC) it reverts to its default, if ever."""

    setpoint: Setpoint = field(default_factory=Setpoint)
    revert_at: float | None = None


@dataclass(frozen=True, slots=True)
class ModuleStatus:
    """What ``GET /status`` reports."""

    state: OperatingState
    uptime_s: float
    faults: tuple[Fault, ...] = ()
    active: ActiveSetpoint = field(default_factory=ActiveSetpoint)


@dataclass(frozen=True, slots=True)
class ControlRequest:
    """A parsed ``POST /control`` body."""

    setpoint: Setpoint
    revert_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """A parsed error body (lenient: whatever could be read)."""

    code: str
    message: str
    details: Mapping[str, object] = field(default_factory=dict)


# -------------------- JSON codec


def _reject_constant(name: str) -> Any:
    raise WireFormatError(f"JSON constant {name} is not allowed (numbers must be finite)")


def decode_json(body: bytes, *, max_bytes: int = MAX_BODY_BYTES) -> object:
    """Strictly decode a UTF-8 JSON body of at most ``max_bytes``: no ``NaN``/``Infinity``, no overflowing
    numbers."""
    if len(body) > max_bytes:
        raise WireFormatError(f"body of {len(body)} bytes exceeds {max_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as err:
        raise WireFormatError(f"body is not UTF-8: {err.reason} at byte {err.start}") from err
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except WireError:
        raise
    except json.JSONDecodeError as err:
        raise WireFormatError(f"body is not JSON: {err.msg} at line {err.lineno} column {err.colno}") from err
    except RecursionError as err:
        raise WireFormatError("body is not JSON: nested too deeply") from err
    except ValueError as err:  # e.g. an integer literal beyond the int-from-string digit limit
        raise WireFormatError(f"body is not JSON: {err}") from err


def encode_json(value: object) -> bytes:
    """Encode compact UTF-8 JSON; raises ``ValueError`` for non-finite numbers."""
    return json.dumps(value, allow_nan=False, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# -------------------- field readers


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _object(value: object, where: str) -> Mapping[str, object]:
    if not isinstance(value, dict):
        raise WireFormatError(f"{where}: expected an object, got {_type_name(value)}", field=where)
    return value


def _required(obj: Mapping[str, object], key: str, where: str) -> object:
    if key not in obj:
        raise WireFormatError(f"{where}: missing required field {key!r}", field=f"{where}.{key}")
    return obj[key]


def _number(value: object, where: str) -> float | None:
    """A finite number, or ``None`` for null."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WireFormatError(f"{where}: expected a number, got {_type_name(value)}", field=where)
    try:
        number = float(value)
    except OverflowError as err:
        raise WireFormatError(f"{where}: number too large", field=where) from err
    if not math.isfinite(number):
        raise WireFormatError(f"{where}: number must be finite", field=where)
    return number


def _number_in(value: object, where: str, low: float | None, high: float | None) -> float | None:
    number = _number(value, where)
    if number is not None and ((low is not None and number < low) or (high is not None and number > high)):
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise WireRangeError(f"{where}: {number:g} is outside {lo}..{hi}", field=where)
    return number


def _integer(value: object, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise WireFormatError(f"{where}: expected an integer, got {_type_name(value)}", field=where)
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise WireFormatError(f"{where}: expected an integer, got {value!r}", field=where)
        value = int(value)
    if abs(value) > 2**31:
        raise WireRangeError(f"{where}: integer out of range", field=where)
    return value


def _bool(value: object, where: str) -> bool | None:
    if value is None:
        return None
    if not isinstance(value, bool):
        raise WireFormatError(f"{where}: expected a boolean, got {_type_name(value)}", field=where)
    return value


def _string(value: object, where: str, *, min_len: int = 0, max_len: int = MAX_STRING_LEN) -> str:
    if not isinstance(value, str):
        raise WireFormatError(f"{where}: expected a string, got {_type_name(value)}", field=where)
    stripped = value.strip()
    if len(stripped) < min_len:
        raise WireFormatError(f"{where}: must not be empty", field=where)
    if len(stripped) > max_len:
        raise WireFormatError(f"{where}: longer than {max_len} characters", field=where)
    return stripped


# -------------------- time


def format_ts(ts: float) -> str:
    """POSIX seconds → ISO 8601 UTC with milliseconds and a ``Z`` suffix."""
    text = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
    return text.removesuffix("+00:00") + "Z"


def parse_ts(value: object, where: str) -> float:
    """ISO 8601 with an explicit offset (``Z`` or ``±HH:MM``) → POSIX seconds."""
    text = _string(value, where, min_len=1, max_len=_MAX_TS_LEN)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as err:
        raise WireFormatError(f"{where}: not an ISO 8601 timestamp: {text!r}", field=where) from err
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise WireFormatError(f"{where}: timestamp {text!r} has no UTC offset (use a Z suffix)", field=where)
    try:
        return moment.timestamp()
    except (OverflowError, ValueError, OSError) as err:
        raise WireRangeError(f"{where}: timestamp {text!r} is out of range", field=where) from err


def _optional_ts(value: object, where: str) -> float | None:
    return None if value is None else parse_ts(value, where)


# -------------------- identity


def capabilities_to_wire(caps: Capabilities) -> CapabilitiesJSON:
    return {
        "rated_power_w": caps.rated_power_w,
        "capacity_wh": caps.capacity_wh,
        "max_charge_w": caps.max_charge_w,
        "max_discharge_w": caps.max_discharge_w,
        "min_soc_pct": caps.min_soc_pct,
        "max_soc_pct": caps.max_soc_pct,
        "controllable": caps.controllable,
        "priority": caps.priority,
        "critical": caps.critical,
    }


def identity_to_wire(info: DeviceInfo, *, provisioned: bool | None = None) -> IdentityJSON:
    """The ``GET /identity`` body; ``provisioned`` is included when given (modules implementing §6)."""
    body: IdentityJSON = {
        "protocol": PROTOCOL_NAME,
        "protocol_version": PROTOCOL_VERSION,
        "kind": info.kind.value,
        "vendor": info.identity.vendor,
        "model": info.identity.model,
        "serial": info.identity.serial,
        "firmware_version": info.identity.firmware_version,
        "capabilities": capabilities_to_wire(info.capabilities),
    }
    if provisioned is not None:
        body["provisioned"] = provisioned
    return body


def _parse_capabilities(value: object) -> Capabilities:
    if value is None:
        return Capabilities()
    obj = _object(value, "identity.capabilities")
    where = "identity.capabilities."

    def nonneg(key: str, high: float | None = None) -> float | None:
        return _number_in(obj.get(key), where + key, 0.0, high)

    controllable = _bool(obj.get("controllable"), where + "controllable")
    critical = _bool(obj.get("critical"), where + "critical")
    return Capabilities(
        rated_power_w=nonneg("rated_power_w"),
        capacity_wh=nonneg("capacity_wh"),
        max_charge_w=nonneg("max_charge_w"),
        max_discharge_w=nonneg("max_discharge_w"),
        min_soc_pct=nonneg("min_soc_pct", 100.0),
        max_soc_pct=nonneg("max_soc_pct", 100.0),
        controllable=True if controllable is None else controllable,
        priority=_integer(obj.get("priority"), where + "priority"),
        critical=False if critical is None else critical,
    )


def parse_identity(value: object) -> DeviceInfo:
    """Parse ``GET /identity``.  Raises ``WireUnsupportedError`` unless it is ORES-HTTP major version 1."""
    if not isinstance(value, dict):
        raise WireUnsupportedError(f"identity: expected an object, got {_type_name(value)}")
    protocol = value.get("protocol")
    if protocol != PROTOCOL_NAME:
        raise WireUnsupportedError(f"identity: protocol is {protocol!r}, not {PROTOCOL_NAME!r}")
    version = value.get("protocol_version")
    match = _VERSION_RE.match(version) if isinstance(version, str) else None
    if match is None:
        raise WireFormatError(f"identity.protocol_version: expected 'MAJOR.MINOR', got {version!r}")
    if int(match.group(1)) != PROTOCOL_MAJOR:
        raise WireUnsupportedError(
            f"identity: protocol version {version} is not supported (this hub speaks {PROTOCOL_MAJOR}.x)"
        )
    kind = DeviceKind(_string(_required(value, "kind", "identity"), "identity.kind", max_len=64))
    identity = Identity(
        vendor=_string(_required(value, "vendor", "identity"), "identity.vendor", min_len=1),
        model=_string(_required(value, "model", "identity"), "identity.model"),
        serial=_string(_required(value, "serial", "identity"), "identity.serial", min_len=1),
        firmware_version=_string(
            _required(value, "firmware_version", "identity"), "identity.firmware_version"
        ),
    )
    capabilities = _parse_capabilities(value.get("capabilities"))
    return DeviceInfo(kind=kind, identity=identity, capabilities=capabilities)


def parse_identity_provisioned(value: object) -> bool | None:
    """The ``provisioned`` flag of an identity body (``None`` when absent: a module without §6)."""
    if not isinstance(value, dict):
        return None
    return _bool(value.get("provisioned"), "identity.provisioned")


# -------------------- telemetry

_TELEMETRY_NUMBERS: tuple[tuple[str, float | None, float | None], ...] = (
    ("energy_out_wh", 0.0, None),
    ("energy_in_wh", 0.0, None),
    ("voltage_v", None, None),
    ("current_a", None, None),
    ("frequency_hz", None, None),
    ("temperature_c", None, None),
    ("soc_pct", 0.0, 100.0),
    ("soh_pct", 0.0, None),
    ("power_limit_pct", 0.0, 100.0),
)


def telemetry_to_wire(sample: Telemetry) -> TelemetryJSON:
    return {
        "ts": format_ts(sample.ts),
        "state": sample.state.value,
        "power_w": sample.power_w,
        "energy_out_wh": sample.energy_out_wh,
        "energy_in_wh": sample.energy_in_wh,
        "voltage_v": sample.voltage_v,
        "current_a": sample.current_a,
        "frequency_hz": sample.frequency_hz,
        "temperature_c": sample.temperature_c,
        "soc_pct": sample.soc_pct,
        "soh_pct": sample.soh_pct,
        "power_limit_pct": sample.power_limit_pct,
        "on": sample.on,
        "grid_ok": sample.grid_ok,
    }


def _state(value: object, where: str) -> OperatingState:
    return OperatingState(_string(value, where, max_len=64))


def parse_telemetry(value: object) -> Telemetry:
    """Parse ``GET /telemetry`` (``ts``, ``state`` and ``power_w`` required; the rest optional)."""
    obj = _object(value, "telemetry")
    ts = parse_ts(_required(obj, "ts", "telemetry"), "telemetry.ts")
    state = _state(_required(obj, "state", "telemetry"), "telemetry.state")
    power_w = _number(_required(obj, "power_w", "telemetry"), "telemetry.power_w")
    n = {key: _number_in(obj.get(key), "telemetry." + key, lo, hi) for key, lo, hi in _TELEMETRY_NUMBERS}
    return Telemetry(
        ts=ts,
        state=state,
        power_w=power_w,
        energy_out_wh=n["energy_out_wh"],
        energy_in_wh=n["energy_in_wh"],
        voltage_v=n["voltage_v"],
        current_a=n["current_a"],
        frequency_hz=n["frequency_hz"],
        temperature_c=n["temperature_c"],
        soc_pct=n["soc_pct"],
        soh_pct=n["soh_pct"],
        power_limit_pct=n["power_limit_pct"],
        on=_bool(obj.get("on"), "telemetry.on"),
        grid_ok=_bool(obj.get("grid_ok"), "telemetry.grid_ok"),
    )


# -------------------- setpoints


def active_setpoint_to_wire(active: ActiveSetpoint) -> SetpointStateJSON:
    sp = active.setpoint
    return {
        "power_limit_pct": sp.power_limit_pct,
        "battery_power_w": sp.battery_power_w,
        "on": sp.on,
        "revert_at": None if active.revert_at is None else format_ts(active.revert_at),
    }


def parse_active_setpoint(value: object, where: str = "setpoint") -> ActiveSetpoint:
    """Parse the active-setpoint object of ``GET /status`` and of the ``POST /control`` reply."""
    obj = _object(value, where)
    setpoint = Setpoint(
        power_limit_pct=_number_in(obj.get("power_limit_pct"), where + ".power_limit_pct", 0.0, 100.0),
        battery_power_w=_number(obj.get("battery_power_w"), where + ".battery_power_w"),
        on=_bool(obj.get("on"), where + ".on"),
    )
    return ActiveSetpoint(setpoint, _optional_ts(obj.get("revert_at"), where + ".revert_at"))


def control_to_wire(setpoint: Setpoint, revert_after_s: float | None = None) -> ControlJSON:
    """The ``POST /control`` body for a setpoint; a release sends only ``{"release": true}``."""
    if setpoint.release:
        return {"release": True}
    body: ControlJSON = {}
    if setpoint.power_limit_pct is not None:
        body["power_limit_pct"] = setpoint.power_limit_pct
    if setpoint.battery_power_w is not None:
        body["battery_power_w"] = setpoint.battery_power_w
    if setpoint.on is not None:
        body["on"] = setpoint.on
    if revert_after_s is not None:
        body["revert_after_s"] = revert_after_s
    return body


def parse_control(value: object) -> ControlRequest:
    """Parse a ``POST /control`` body: at least one setpoint field, each of the right type and range.

    ``"release": true`` wins over every other field and yields ``Setpoint(release=True)`` without a watchdog.
    """
    obj = _object(value, "control")
    setpoint = Setpoint(
        power_limit_pct=_number(obj.get("power_limit_pct"), "control.power_limit_pct"),
        battery_power_w=_number(obj.get("battery_power_w"), "control.battery_power_w"),
        on=_bool(obj.get("on"), "control.on"),
    )
    release = _bool(obj.get("release"), "control.release")
    revert_after_s = _number(obj.get("revert_after_s"), "control.revert_after_s")
    if release:
        return ControlRequest(Setpoint(release=True), None)
    if setpoint.is_empty():
        raise WireFormatError("control: no setpoint field (power_limit_pct, battery_power_w, on or release)")
    if setpoint.power_limit_pct is not None:
        _number_in(setpoint.power_limit_pct, "control.power_limit_pct", 0.0, 100.0)
    if revert_after_s is not None and not 0.0 < revert_after_s <= MAX_REVERT_AFTER_S:
        raise WireRangeError(
            f"control.revert_after_s: {revert_after_s:g} is outside 0 (exclusive)..{MAX_REVERT_AFTER_S:g}",
            field="control.revert_after_s",
        )
    return ControlRequest(setpoint, revert_after_s)


# -------------------- status


def status_to_wire(status: ModuleStatus) -> StatusJSON:
    return {
        "state": status.state.value,
        "uptime_s": status.uptime_s,
        "faults": [{"code": f.code, "message": f.message} for f in status.faults],
        "setpoint": active_setpoint_to_wire(status.active),
    }


def _parse_faults(value: object) -> tuple[Fault, ...]:
    if not isinstance(value, list):
        raise WireFormatError(f"status.faults: expected an array, got {_type_name(value)}")
    faults: list[Fault] = []
    for index, item in enumerate(value):
        where = f"status.faults[{index}]"
        obj = _object(item, where)
        faults.append(
            Fault(
                code=_string(_required(obj, "code", where), where + ".code", min_len=1, max_len=64),
                message=_string(_required(obj, "message", where), where + ".message", max_len=1024),
            )
        )
    return tuple(faults)


def parse_status(value: object) -> ModuleStatus:
    """Parse ``GET /status``."""
    obj = _object(value, "status")
    uptime = _number_in(_required(obj, "uptime_s", "status"), "status.uptime_s", 0.0, None)
    if uptime is None:
        raise WireFormatError("status.uptime_s: expected a number, got null")
    setpoint = obj.get("setpoint")
    return ModuleStatus(
        state=_state(_required(obj, "state", "status"), "status.state"),
        uptime_s=uptime,
        faults=_parse_faults(_required(obj, "faults", "status")),
        active=ActiveSetpoint() if setpoint is None else parse_active_setpoint(setpoint, "status.setpoint"),
    )


# -------------------- authentication (§6)


def generate_credential() -> str:
    """A fresh credential: ``CREDENTIAL_BYTES`` random bytes in standard base64 (a valid bearer token)."""
    return base64.b64encode(secrets.token_bytes(CREDENTIAL_BYTES)).decode("ascii")


def _b64_field(value: Mapping[str, object], key: str, where: str, *, length: int | None = None) -> bytes:
    try:
        return decode_b64(_required(value, key, where), f"{where}.{key}", length=length)
    except ValueError as err:
        raise WireFormatError(str(err), field=f"{where}.{key}") from err


def _hub_id_field(obj: Mapping[str, object], where: str) -> str:
    try:
        return check_hub_id(_required(obj, "hub_id", where), f"{where}.hub_id")
    except ValueError as err:
        raise WireFormatError(str(err), field=f"{where}.hub_id") from err


def auth_challenge_to_wire(nonce: bytes, hub_id: str) -> AuthChallengeJSON:
    return {"nonce": encode_b64(nonce), "hub_id": hub_id}


def parse_auth_challenge(value: object) -> tuple[bytes, str]:
    """Parse a ``POST /auth/challenge`` body into (nonce, hub_id)."""
    obj = _object(value, "challenge")
    nonce = _b64_field(obj, "nonce", "challenge")
    if not MIN_NONCE_LEN <= len(nonce) <= MAX_NONCE_LEN:
        raise WireFormatError(
            f"challenge.nonce: must be {MIN_NONCE_LEN}..{MAX_NONCE_LEN} bytes, got {len(nonce)}",
            field="challenge.nonce",
        )
    return nonce, _hub_id_field(obj, "challenge")


def auth_challenge_reply_to_wire(cert: DeviceCertificate, signature: bytes) -> AuthChallengeReplyJSON:
    return {"certificate": cert.to_wire(), "signature": encode_b64(signature)}


def parse_auth_challenge_reply(value: object) -> tuple[DeviceCertificate, bytes]:
    """Parse a ``POST /auth/challenge`` reply into (certificate, signature).

    A malformed certificate raises ``WireFormatError`` chained from ``devices.attest.BadCertificate``.  The
    signatures are not verified here (``devices.attest.verify_attestation`` does that).
    """
    obj = _object(value, "challenge reply")
    raw_cert = _required(obj, "certificate", "challenge reply")
    try:
        cert = DeviceCertificate.from_wire(raw_cert)
    except BadCertificate as err:
        raise WireFormatError(
            f"challenge reply.certificate: {err}", field="challenge reply.certificate"
        ) from err
    signature = _b64_field(obj, "signature", "challenge reply", length=64)
    return cert, signature


def auth_credential_to_wire(credential: str, hub_id: str) -> AuthCredentialJSON:
    return {"credential": credential, "hub_id": hub_id}


def parse_auth_credential(value: object) -> tuple[str, str]:
    """Parse a ``POST /auth/credential`` body into (credential, hub_id); the credential must be standard
    base64 of exactly ``CREDENTIAL_BYTES`` bytes."""
    obj = _object(value, "credential")
    _b64_field(obj, "credential", "credential", length=CREDENTIAL_BYTES)
    credential = obj["credential"]
    assert isinstance(credential, str)  # decode_b64 accepted it
    return credential, _hub_id_field(obj, "credential")


# -------------------- firmware update (§9)


def _b64_bytes(value: object, where: str, max_bytes: int) -> bytes:
    """Standard padded base64 (canonical) of at most ``max_bytes`` bytes."""
    if not isinstance(value, str):
        raise WireFormatError(f"{where}: expected a base64 string, got {_type_name(value)}", field=where)
    if len(value) > 4 * ((max_bytes + 2) // 3):
        raise WireFormatError(f"{where}: more than {max_bytes} bytes", field=where)
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as err:
        raise WireFormatError(f"{where}: not base64", field=where) from err
    if base64.b64encode(raw).decode("ascii") != value:
        raise WireFormatError(f"{where}: not canonical base64", field=where)
    return raw


def _count(value: object, where: str) -> int:
    """A byte count: an integer >= 0 (JSON integers only)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireFormatError(f"{where}: expected an integer, got {_type_name(value)}", field=where)
    if not 0 <= value <= 2**53:
        raise WireRangeError(f"{where}: {value} is outside 0..2^53", field=where)
    return value


def firmware_status_to_wire(slots: FirmwareSlots) -> FirmwareStatusJSON:
    """The ``GET /firmware`` body.  ``slots.error`` (``"code: message"``) becomes ``{"code", "message"}``
    (code ``failed`` when it does not start with a snake_case code)."""
    error: FirmwareErrorJSON | None = None
    if slots.error is not None:
        code, sep, message = slots.error.partition(": ")
        if sep and _SNAKE.fullmatch(code):
            error = {"code": code, "message": message}
        else:
            error = {"code": "failed", "message": slots.error}
    return {
        "active_version": slots.active_version,
        "inactive_version": slots.inactive_version,
        "state": slots.state,
        "received_bytes": slots.received_bytes,
        "error": error,
    }


def parse_firmware_status(value: object, where: str = "firmware") -> FirmwareSlots:
    """Parse a ``GET /firmware`` body (also the install and rollback replies).  Unknown states are kept;
    ``error`` becomes ``"code: message"``."""
    obj = _object(value, where)
    active = _string(
        _required(obj, "active_version", where), f"{where}.active_version", max_len=_MAX_FIRMWARE_VERSION_LEN
    )
    inactive_raw = obj.get("inactive_version")
    inactive = (
        None
        if inactive_raw is None
        else _string(inactive_raw, f"{where}.inactive_version", max_len=_MAX_FIRMWARE_VERSION_LEN)
    )
    state = _string(_required(obj, "state", where), f"{where}.state", min_len=1, max_len=64)
    received_raw = obj.get("received_bytes")
    received = 0 if received_raw is None else _count(received_raw, f"{where}.received_bytes")
    error_raw = obj.get("error")
    error: str | None = None
    if error_raw is not None:
        err = _object(error_raw, f"{where}.error")
        code = _string(_required(err, "code", f"{where}.error"), f"{where}.error.code", min_len=1, max_len=64)
        message = _string(err.get("message", ""), f"{where}.error.message", max_len=1024)
        error = f"{code}: {message}" if message else code
    return FirmwareSlots(active, inactive, state, received, error)


def firmware_begin_to_wire(manifest: bytes, signature: bytes) -> FirmwareBeginJSON:
    return {
        "manifest": base64.b64encode(manifest).decode("ascii"),
        "signature": base64.b64encode(signature).decode("ascii"),
    }


def parse_firmware_begin(value: object) -> tuple[bytes, bytes]:
    """Parse a ``POST /firmware/begin`` body into (manifest bytes, signature bytes).  Only the encoding is
    checked here (base64, a manifest of at most 64 KiB); what they say is ``firmware.verify``'s job."""
    obj = _object(value, "begin")
    manifest = _b64_bytes(_required(obj, "manifest", "begin"), "begin.manifest", _MAX_MANIFEST_BYTES)
    signature = _b64_bytes(_required(obj, "signature", "begin"), "begin.signature", 1024)
    return manifest, signature


def firmware_received_to_wire(received_bytes: int) -> FirmwareReceivedJSON:
    return {"received_bytes": received_bytes}


def parse_firmware_received(value: object) -> int:
    """Parse the ``{"received_bytes": n}`` reply of begin and image."""
    obj = _object(value, "firmware reply")
    return _count(_required(obj, "received_bytes", "firmware reply"), "firmware reply.received_bytes")


# -------------------- errors


def error_to_wire(code: str, message: str, details: Mapping[str, Any] | None = None) -> ErrorJSON:
    return {"error": {"code": code, "message": message, "details": dict(details or {})}}


def parse_error(body: bytes) -> ErrorInfo | None:
    """Read an error body leniently; ``None`` if it is not the documented shape."""
    try:
        value = decode_json(body)
    except WireError:
        return None
    error = value.get("error") if isinstance(value, dict) else None
    if not isinstance(error, dict):
        return None
    code = error.get("code")
    message = error.get("message")
    details = error.get("details")
    return ErrorInfo(
        code=code[:64] if isinstance(code, str) else "",
        message=message[:1024] if isinstance(message, str) else "",
        details=details if isinstance(details, dict) else {},
    )
