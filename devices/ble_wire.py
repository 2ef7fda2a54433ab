"""The ORES BLE wire formats (docs/ble.md): the advertisement's service data and the GATT characteristic values.

Shared by the hub's scanner (``discovery.ble``), its GATT driver (``devices.drivers.ble``) and the GATT fake
(``devices.drivers.ble_fake``) so that all of them read and write exactly the documented bytes.  The
advertisement is a small binary record (``parse_advertisement`` raises ``MalformedAnnouncement`` with a
precise reason); telemetry is a fixed little-endian struct in which NaN means "not available"; everything
else (identity, control, status, authentication, credential) is compact UTF-8 JSON of at most 512 bytes, the
largest value an ATT attribute can hold.  JSON parsing reuses the ORES-HTTP readers (``devices.ores_http_wire``)
so both transports share one vocabulary; the JSON parsers here raise that module's ``WireError`` subclasses.
The firmware update (§3.9) adds a firmware characteristic (JSON requests written, the ORES-HTTP ``GET
/firmware`` body read) and a data characteristic whose values are a 4-byte little-endian offset followed by
image bytes.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, Literal, NotRequired, TypedDict

from devices.attest import (
    MAX_NONCE_LEN,
    MIN_NONCE_LEN,
    DeviceCertificate,
    decode_b64,
    encode_b64,
)
from devices.drivers.base import FirmwareSlots
from devices.model import (
    Capabilities,
    DeviceInfo,
    DeviceKind,
    OperatingState,
    Setpoint,
    Telemetry,
)
from devices.ores_http_wire import (
    PROTOCOL_NAME,
    ControlRequest,
    WireFormatError,
    WireRangeError,
    WireUnsupportedError,
    auth_challenge_to_wire,
    control_to_wire,
    decode_json,
    encode_json,
    firmware_status_to_wire,
    identity_to_wire,
    parse_auth_challenge,
    parse_auth_credential,
    parse_control,
    parse_firmware_status,
    parse_identity,
    parse_identity_provisioned,
)
from discovery.base import MalformedAnnouncement

__all__ = [
    "ADV_HEADER_LEN",
    "ADV_MAX_LEN",
    "ADV_VERSION",
    "AUTH_CHAR_UUID",
    "CERTIFICATE_CHAR_UUID",
    "CONTROL_CHAR_UUID",
    "CREDENTIAL_CHAR_UUID",
    "DEFAULT_FIRMWARE_WRITE_BYTES",
    "FIRMWARE_CHAR_UUID",
    "FIRMWARE_DATA_CHAR_UUID",
    "FIRMWARE_DATA_HEADER_LEN",
    "FIRMWARE_MANIFEST_PIECE_BYTES",
    "FLAG_UNPROVISIONED",
    "GATT_PROTOCOL_NAME",
    "GATT_PROTOCOL_VERSION",
    "IDENTITY_CHAR_UUID",
    "KIND_CODES",
    "MAX_SERIAL_LEN",
    "MAX_VALUE_LEN",
    "ORES_SERVICE_UUID",
    "STATE_CODES",
    "STATUS_CHAR_UUID",
    "TELEMETRY_CHAR_UUID",
    "TELEMETRY_FORMAT",
    "TELEMETRY_LEN",
    "VENDOR_IDS",
    "AuthAnswer",
    "AuthChallenge",
    "BleAnnouncement",
    "CredentialOp",
    "CredentialRequest",
    "FirmwareOp",
    "FirmwareRequest",
    "GattStatus",
    "decode_telemetry",
    "encode_advertisement",
    "encode_auth_answer",
    "encode_certificate",
    "encode_challenge",
    "encode_control",
    "encode_credential_request",
    "encode_firmware_data",
    "encode_firmware_request",
    "encode_firmware_value",
    "encode_identity",
    "encode_status",
    "encode_telemetry",
    "kind_code",
    "parse_advertisement",
    "parse_auth_answer",
    "parse_certificate_value",
    "parse_challenge",
    "parse_control_value",
    "parse_credential_request",
    "parse_firmware_data",
    "parse_firmware_request",
    "parse_firmware_value",
    "parse_identity_provisioned_value",
    "parse_identity_value",
    "parse_status_value",
    "vendor_id_for",
    "vendor_name",
]

# -------------------------------------------------------------------------------------------- UUIDs

#: The ORES GATT service; modules advertise it and carry their announcement as service data under it.
ORES_SERVICE_UUID: Final = "cc940001-bc28-4fba-9f7d-11a530a5dc03"
#: read: identity JSON (never protected).
IDENTITY_CHAR_UUID: Final = "cc940101-bc28-4fba-9f7d-11a530a5dc03"
#: read + notify: telemetry struct (protected once provisioned).
TELEMETRY_CHAR_UUID: Final = "cc940102-bc28-4fba-9f7d-11a530a5dc03"
#: write: control JSON (protected once provisioned).
CONTROL_CHAR_UUID: Final = "cc940103-bc28-4fba-9f7d-11a530a5dc03"
#: read + notify: the answer to the last write on control, auth or credential.
STATUS_CHAR_UUID: Final = "cc940104-bc28-4fba-9f7d-11a530a5dc03"
#: write: challenge JSON; read: the signed answer.
AUTH_CHAR_UUID: Final = "cc940105-bc28-4fba-9f7d-11a530a5dc03"
#: read: the device certificate JSON (static).
CERTIFICATE_CHAR_UUID: Final = "cc940106-bc28-4fba-9f7d-11a530a5dc03"
#: write: provision / login / deprovision JSON.
CREDENTIAL_CHAR_UUID: Final = "cc940107-bc28-4fba-9f7d-11a530a5dc03"
#: write: firmware requests (manifest, begin, install, rollback, status); read: the firmware status JSON.
FIRMWARE_CHAR_UUID: Final = "cc940108-bc28-4fba-9f7d-11a530a5dc03"
#: write (without response): image data, a 4-byte little-endian offset then the bytes.
FIRMWARE_DATA_CHAR_UUID: Final = "cc940109-bc28-4fba-9f7d-11a530a5dc03"

#: The ``protocol`` marker of the GATT identity JSON, and its version.
GATT_PROTOCOL_NAME: Final = "ores-ble"
GATT_PROTOCOL_VERSION: Final = "1.0"
#: Largest characteristic value either side writes or accepts (the ATT limit for an attribute value).
MAX_VALUE_LEN: Final = 512

# -------------------------------------------------------------------------------------------- advertisement

ADV_VERSION: Final = 1
#: version, kind, flags, vendor id (2), serial length.
ADV_HEADER_LEN: Final = 6
MAX_SERIAL_LEN: Final = 20
ADV_MAX_LEN: Final = 27
FLAG_UNPROVISIONED: Final = 0x01

#: Advertisement kind byte → device kind (other values are tolerated as ``DeviceKind.UNKNOWN``).
KIND_CODES: Mapping[int, DeviceKind] = MappingProxyType(
    {
        1: DeviceKind.MICROINVERTER,
        2: DeviceKind.ENERGYSTORAGE,
        3: DeviceKind.METER,
        4: DeviceKind.SMARTPLUG,
    }
)
_KIND_TO_CODE: Mapping[DeviceKind, int] = MappingProxyType({kind: code for code, kind in KIND_CODES.items()})

#: The ORES vendor id registry (docs/ble.md §2.2).  Unknown ids are allowed and shown as ``vendor-0x1234``.
VENDOR_IDS: Mapping[int, str] = MappingProxyType({0xFFFF: "ORES Demo Vendors"})
_VENDOR_TO_ID: Mapping[str, int] = MappingProxyType({name: vid for vid, name in VENDOR_IDS.items()})

_ADV_HEADER = struct.Struct("<BBBHB")


def vendor_name(vendor_id: int) -> str:
    """The registered vendor name for an id, or ``vendor-0x1234`` for an unregistered one."""
    return VENDOR_IDS.get(vendor_id, f"vendor-0x{vendor_id:04x}")


def vendor_id_for(vendor: str) -> int | None:
    """The registered id of a vendor name (the inverse of ``vendor_name``), ``None`` if it has none."""
    if vendor in _VENDOR_TO_ID:
        return _VENDOR_TO_ID[vendor]
    if vendor.startswith("vendor-0x") and len(vendor) == 13:
        try:
            return int(vendor[9:], 16)
        except ValueError:
            return None
    return None


def kind_code(kind: DeviceKind) -> int:
    """The advertisement kind byte of a device kind (0 for ``UNKNOWN``)."""
    return _KIND_TO_CODE.get(kind, 0)


@dataclass(frozen=True, slots=True)
class BleAnnouncement:
    """A parsed ORES advertisement (the service data under ``ORES_SERVICE_UUID``)."""

    version: int
    kind_code: int
    flags: int
    vendor_id: int
    serial: str

    @property
    def kind(self) -> DeviceKind:
        return KIND_CODES.get(self.kind_code, DeviceKind.UNKNOWN)

    @property
    def unprovisioned(self) -> bool:
        return bool(self.flags & FLAG_UNPROVISIONED)

    @property
    def vendor(self) -> str:
        return vendor_name(self.vendor_id)


def encode_advertisement(
    *,
    kind: DeviceKind | int,
    vendor_id: int,
    serial: str,
    unprovisioned: bool = True,
    extra_flags: int = 0,
) -> bytes:
    """The service data a module advertises; raises ``ValueError`` for values outside the format."""
    code = kind if isinstance(kind, int) else kind_code(kind)
    if not 0 <= code <= 0xFF:
        raise ValueError("kind code must be 0..255")
    if not 0 <= vendor_id <= 0xFFFF:
        raise ValueError("vendor id must be 0..0xFFFF")
    if not 0 <= extra_flags <= 0xFF:
        raise ValueError("flags must be 0..255")
    raw = serial.encode("ascii", errors="strict") if serial.isascii() else b""
    if not 1 <= len(raw) <= MAX_SERIAL_LEN or not _serial_ok(raw):
        raise ValueError(f"serial must be 1..{MAX_SERIAL_LEN} printable ASCII characters, no outer spaces")
    flags = (extra_flags & ~FLAG_UNPROVISIONED) | (FLAG_UNPROVISIONED if unprovisioned else 0)
    return _ADV_HEADER.pack(ADV_VERSION, code, flags, vendor_id, len(raw)) + raw


def _serial_ok(raw: bytes) -> bool:
    return all(0x20 <= b <= 0x7E for b in raw) and raw[:1] != b" " and raw[-1:] != b" "


def parse_advertisement(service_data: bytes) -> BleAnnouncement:
    """Parse ORES service data; raises ``MalformedAnnouncement`` saying exactly what is wrong."""
    if not isinstance(service_data, bytes | bytearray | memoryview):
        raise MalformedAnnouncement(f"service data must be bytes, not {type(service_data).__name__}")
    data = bytes(service_data)
    if len(data) < ADV_HEADER_LEN + 1:
        raise MalformedAnnouncement(
            f"advertisement too short: {len(data)} bytes, at least {ADV_HEADER_LEN + 1} needed"
        )
    if len(data) > ADV_MAX_LEN:
        raise MalformedAnnouncement(
            f"advertisement too long: {len(data)} bytes, at most {ADV_MAX_LEN} allowed"
        )
    version, code, flags, vendor_id, serial_len = _ADV_HEADER.unpack_from(data)
    if version != ADV_VERSION:
        raise MalformedAnnouncement(
            f"unsupported advertisement version {version} (this hub reads version {ADV_VERSION})"
        )
    if not 1 <= serial_len <= MAX_SERIAL_LEN:
        raise MalformedAnnouncement(f"bad serial length {serial_len}: must be 1..{MAX_SERIAL_LEN}")
    raw = data[ADV_HEADER_LEN:]
    if len(raw) != serial_len:
        raise MalformedAnnouncement(
            f"bad serial length {serial_len}: {len(raw)} serial bytes follow the header"
        )
    for offset, byte in enumerate(raw):
        if not 0x20 <= byte <= 0x7E:
            what = "non-ASCII" if byte > 0x7F else "non-printable"
            raise MalformedAnnouncement(f"serial has a {what} byte 0x{byte:02x} at position {offset}")
    if raw[:1] == b" " or raw[-1:] == b" ":
        raise MalformedAnnouncement("serial has leading or trailing spaces")
    return BleAnnouncement(version, code, flags, vendor_id, raw.decode("ascii"))


# -------------------------------------------------------------------------------------------- JSON values


def _decode_value(data: bytes, what: str) -> dict[str, object]:
    """A characteristic value that must hold one JSON object of at most ``MAX_VALUE_LEN`` bytes."""
    if len(data) > MAX_VALUE_LEN:
        raise WireFormatError(f"{what}: value of {len(data)} bytes exceeds {MAX_VALUE_LEN}")
    if not data:
        raise WireFormatError(f"{what}: empty value")
    value = decode_json(bytes(data))
    if not isinstance(value, dict):
        raise WireFormatError(f"{what}: expected a JSON object")
    return value


def _encode_value(value: object, what: str) -> bytes:
    data = encode_json(value)
    if len(data) > MAX_VALUE_LEN:
        raise ValueError(f"{what}: {len(data)} bytes exceed the {MAX_VALUE_LEN}-byte characteristic limit")
    return data


def _seq(obj: Mapping[str, object], what: str) -> int:
    value = obj.get("seq")
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireFormatError(f"{what}.seq: expected an integer", field=f"{what}.seq")
    if not 0 <= value <= 0xFFFFFFFF:
        raise WireRangeError(f"{what}.seq: {value} is outside 0..4294967295", field=f"{what}.seq")
    return value


# -------------------- identity


def encode_identity(info: DeviceInfo, *, provisioned: bool | None = None) -> bytes:
    """The identity characteristic: the ORES-HTTP ``/identity`` body with ``protocol: "ores-ble"``, compact
    (null capabilities and default flags left out).  Raises ``ValueError`` above 512 bytes."""
    body = dict(identity_to_wire(info, provisioned=provisioned))
    body["protocol"] = GATT_PROTOCOL_NAME
    body["protocol_version"] = GATT_PROTOCOL_VERSION
    defaults = Capabilities()
    caps = {
        key: value
        for key, value in dict(body.pop("capabilities", {})).items()  # type: ignore[call-overload]
        if value is not None and value != getattr(defaults, key)
    }
    if caps:
        body["capabilities"] = caps
    return _encode_value(body, "identity")


def parse_identity_value(data: bytes) -> DeviceInfo:
    """Parse the identity characteristic.  ``WireUnsupportedError`` unless it is ``ores-ble`` 1.x; other
    ``WireError``s for a malformed value."""
    obj = _decode_value(data, "identity")
    protocol = obj.get("protocol")
    if protocol != GATT_PROTOCOL_NAME:
        raise WireUnsupportedError(f"identity: protocol is {protocol!r}, not {GATT_PROTOCOL_NAME!r}")
    # Same fields and rules as ORES-HTTP (including the 1.x version check); only the protocol marker differs.
    return parse_identity({**obj, "protocol": PROTOCOL_NAME})


def parse_identity_provisioned_value(data: bytes) -> bool | None:
    """The identity's ``provisioned`` flag (``None`` when absent)."""
    return parse_identity_provisioned(_decode_value(data, "identity"))


# -------------------- telemetry

TELEMETRY_FORMAT: Final = 1
_TELEMETRY = struct.Struct("<BBBBdfddfffffff")
TELEMETRY_LEN: Final = _TELEMETRY.size  # 60

#: Telemetry state byte ↔ operating state (unknown codes → ``UNKNOWN``; ``offline`` is the hub's own).
STATE_CODES: Mapping[int, OperatingState] = MappingProxyType(
    {
        0: OperatingState.UNKNOWN,
        1: OperatingState.OFF,
        2: OperatingState.STARTING,
        3: OperatingState.RUNNING,
        4: OperatingState.THROTTLED,
        5: OperatingState.STANDBY,
        6: OperatingState.FAULT,
    }
)
_STATE_TO_CODE: Mapping[OperatingState, int] = MappingProxyType({s: c for c, s in STATE_CODES.items()})

_ON_VALID, _ON, _GRID_VALID, _GRID_OK = 0x01, 0x02, 0x04, 0x08

# name, low, high (inclusive; None = unbounded), float32? for the fields after ``power_w``.
_TELEMETRY_RANGES: tuple[tuple[str, float | None, float | None, bool], ...] = (
    ("energy_out_wh", 0.0, None, False),
    ("energy_in_wh", 0.0, None, False),
    ("voltage_v", None, None, True),
    ("current_a", None, None, True),
    ("frequency_hz", None, None, True),
    ("temperature_c", None, None, True),
    ("soc_pct", 0.0, 100.0, True),
    ("soh_pct", 0.0, None, True),
    ("power_limit_pct", 0.0, 100.0, True),
)


_F32 = struct.Struct("<f")


def _shortest_f32(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (230.1, not 230.10000610351562)."""
    bits = _F32.pack(value)
    for digits in range(6, 10):
        candidate = float(f"{value:.{digits}g}")
        if _F32.pack(candidate) == bits:
            return candidate
    return value


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


def encode_telemetry(sample: Telemetry) -> bytes:
    """The 60-byte telemetry value; ``None`` fields become NaN.  Raises ``ValueError`` for a value a float32
    cannot hold."""
    flags = 0
    if sample.on is not None:
        flags |= _ON_VALID | (_ON if sample.on else 0)
    if sample.grid_ok is not None:
        flags |= _GRID_VALID | (_GRID_OK if sample.grid_ok else 0)
    try:
        return _TELEMETRY.pack(
            TELEMETRY_FORMAT,
            _STATE_TO_CODE.get(sample.state, 0),
            flags,
            0,
            sample.ts,
            _nan(sample.power_w),
            *(_nan(getattr(sample, name)) for name, _, _, _ in _TELEMETRY_RANGES),
        )
    except (struct.error, OverflowError) as err:
        raise ValueError(f"telemetry value out of range for the wire format: {err}") from err


def decode_telemetry(data: bytes, *, now: float) -> Telemetry:
    """Parse a telemetry value (read or notification).  ``now`` stamps a sample whose ``ts`` is NaN (a module
    without a clock).  Raises ``WireFormatError``/``WireRangeError`` naming the field."""
    if len(data) < TELEMETRY_LEN:
        raise WireFormatError(f"telemetry: {len(data)} bytes, expected {TELEMETRY_LEN}")
    if len(data) > MAX_VALUE_LEN:
        raise WireFormatError(f"telemetry: value of {len(data)} bytes exceeds {MAX_VALUE_LEN}")
    fmt, state, flags, _reserved, ts, power_w, *rest = _TELEMETRY.unpack_from(bytes(data))
    if fmt != TELEMETRY_FORMAT:
        raise WireUnsupportedError(
            f"telemetry: format {fmt} is not supported (this hub reads {TELEMETRY_FORMAT})"
        )
    if math.isnan(ts):
        ts = now
    elif not math.isfinite(ts) or ts < 0:
        raise WireRangeError(f"telemetry.ts: {ts!r} is not a valid time", field="telemetry.ts")
    if math.isinf(power_w):
        raise WireRangeError("telemetry.power_w: must be finite or NaN", field="telemetry.power_w")
    values: dict[str, float | None] = {}
    for (name, low, high, is_f32), value in zip(_TELEMETRY_RANGES, rest, strict=True):
        where = f"telemetry.{name}"
        if math.isnan(value):
            values[name] = None
            continue
        if math.isinf(value):
            raise WireRangeError(f"{where}: must be finite or NaN", field=where)
        if (low is not None and value < low) or (high is not None and value > high):
            raise WireRangeError(f"{where}: {value:g} is out of range", field=where)
        values[name] = _shortest_f32(value) if is_f32 else value
    return Telemetry(
        ts=ts,
        state=STATE_CODES.get(state, OperatingState.UNKNOWN),
        power_w=None if math.isnan(power_w) else _shortest_f32(power_w),
        on=bool(flags & _ON) if flags & _ON_VALID else None,
        grid_ok=bool(flags & _GRID_OK) if flags & _GRID_VALID else None,
        **values,  # type: ignore[arg-type]
    )


# -------------------- control


def encode_control(setpoint: Setpoint, revert_after_s: float | None = None, *, seq: int) -> bytes:
    """The control value: the ORES-HTTP ``POST /control`` body plus ``seq``.  ``ValueError`` if not finite."""
    body: dict[str, object] = dict(control_to_wire(setpoint, revert_after_s))
    body["seq"] = seq
    return _encode_value(body, "control")


def parse_control_value(data: bytes) -> tuple[int, ControlRequest]:
    """Module side: the request's ``seq`` and its setpoint (the ORES-HTTP control rules)."""
    obj = _decode_value(data, "control")
    return _seq(obj, "control"), parse_control(obj)


# -------------------- status


class GattStatusJSON(TypedDict):
    seq: int
    ok: bool
    code: NotRequired[str]
    message: NotRequired[str]


@dataclass(frozen=True, slots=True)
class GattStatus:
    """The module's answer to the write with the same ``seq``; ``code`` says why it failed."""

    seq: int
    ok: bool
    code: str = ""
    message: str = ""


def encode_status(status: GattStatus) -> bytes:
    body: GattStatusJSON = {"seq": status.seq, "ok": status.ok}
    if status.code:
        body["code"] = status.code[:64]
    if status.message:
        body["message"] = status.message[:300]
    return _encode_value(body, "status")


def parse_status_value(data: bytes) -> GattStatus:
    obj = _decode_value(data, "status")
    ok = obj.get("ok")
    if not isinstance(ok, bool):
        raise WireFormatError("status.ok: expected a boolean", field="status.ok")
    code = obj.get("code", "")
    message = obj.get("message", "")
    if not isinstance(code, str) or not isinstance(message, str):
        raise WireFormatError("status: code and message must be strings")
    return GattStatus(_seq(obj, "status"), ok, code[:64], message[:512])


# -------------------- authentication and credential


@dataclass(frozen=True, slots=True)
class AuthChallenge:
    """A challenge written to the auth characteristic (the ORES-HTTP challenge body plus ``seq``)."""

    seq: int
    nonce: bytes
    hub_id: str


@dataclass(frozen=True, slots=True)
class AuthAnswer:
    """What the auth characteristic reads after a challenge: the nonce it answers and the device key's
    64-byte Ed25519 signature of ``devices.attest.challenge_message(nonce, hub_id)``."""

    nonce: bytes
    signature: bytes


def _b64_field(obj: Mapping[str, object], key: str, what: str, *, length: int | None = None) -> bytes:
    try:
        return decode_b64(obj.get(key), f"{what}.{key}", length=length)
    except ValueError as err:
        raise WireFormatError(str(err), field=f"{what}.{key}") from err


def encode_challenge(nonce: bytes, hub_id: str, *, seq: int) -> bytes:
    body: dict[str, object] = dict(auth_challenge_to_wire(nonce, hub_id))
    body["seq"] = seq
    return _encode_value(body, "challenge")


def parse_challenge(data: bytes) -> AuthChallenge:
    """Module side: a challenge (nonce of 16..64 bytes, hub id as in ORES-HTTP)."""
    obj = _decode_value(data, "challenge")
    seq = _seq(obj, "challenge")
    nonce, hub_id = parse_auth_challenge(obj)
    return AuthChallenge(seq, nonce, hub_id)


def encode_auth_answer(answer: AuthAnswer) -> bytes:
    return _encode_value(
        {"nonce": encode_b64(answer.nonce), "signature": encode_b64(answer.signature)}, "auth"
    )


def parse_auth_answer(data: bytes) -> AuthAnswer:
    obj = _decode_value(data, "auth")
    nonce = _b64_field(obj, "nonce", "auth")
    if not MIN_NONCE_LEN <= len(nonce) <= MAX_NONCE_LEN:
        raise WireFormatError(
            f"auth.nonce: must be {MIN_NONCE_LEN}..{MAX_NONCE_LEN} bytes", field="auth.nonce"
        )
    return AuthAnswer(nonce, _b64_field(obj, "signature", "auth", length=64))


def encode_certificate(certificate: DeviceCertificate) -> bytes:
    """The certificate characteristic: ``DeviceCertificate.to_wire()`` as compact JSON (``ValueError`` if the
    vendor, model and serial are too long for 512 bytes)."""
    return _encode_value(certificate.to_wire(), "certificate")


def parse_certificate_value(data: bytes) -> DeviceCertificate:
    """Parse the certificate characteristic: ``WireFormatError`` if it is not a JSON object of at most 512
    bytes, ``devices.attest.BadCertificate`` if the object is not a well-formed certificate (its signatures
    are checked later, by ``verify_attestation``)."""
    return DeviceCertificate.from_wire(_decode_value(data, "certificate"))


CredentialOp = Literal["provision", "login", "deprovision"]
_CREDENTIAL_OPS: Final = ("provision", "login", "deprovision")


@dataclass(frozen=True, slots=True)
class CredentialRequest:
    """A write to the credential characteristic.  ``provision`` carries the credential and the hub id (the
    ORES-HTTP ``/auth/credential`` body), ``login`` the credential only, ``deprovision`` nothing."""

    seq: int
    op: CredentialOp
    credential: str | None = None
    hub_id: str | None = None


def encode_credential_request(request: CredentialRequest) -> bytes:
    body: dict[str, object] = {"seq": request.seq, "op": request.op}
    if request.credential is not None:
        body["credential"] = request.credential
    if request.hub_id is not None:
        body["hub_id"] = request.hub_id
    return _encode_value(body, "credential")


def parse_credential_request(data: bytes) -> CredentialRequest:
    """Module side: a credential request (a provisioned credential is standard base64 of
    ``CREDENTIAL_BYTES`` bytes, as in ORES-HTTP)."""
    obj = _decode_value(data, "credential")
    seq = _seq(obj, "credential")
    op = obj.get("op")
    if op == "provision":
        credential, hub_id = parse_auth_credential(obj)
        return CredentialRequest(seq, "provision", credential, hub_id)
    if op == "login":
        token = obj.get("credential")
        if not isinstance(token, str) or not 1 <= len(token) <= MAX_VALUE_LEN:
            raise WireFormatError("credential.credential: expected a string", field="credential.credential")
        return CredentialRequest(seq, "login", token)  # a wrong one is simply not equal to the stored one
    if op == "deprovision":
        return CredentialRequest(seq, "deprovision")
    raise WireFormatError(
        f"credential.op: expected one of {', '.join(_CREDENTIAL_OPS)}", field="credential.op"
    )


# -------------------- firmware update (§3.9)

#: Raw manifest bytes one ``manifest`` request carries (base64 in the JSON: 344 characters).
FIRMWARE_MANIFEST_PIECE_BYTES: Final = 256
#: The offset in front of every data write.
FIRMWARE_DATA_HEADER_LEN: Final = 4
#: Image bytes per data write with an ATT MTU of 247 (a 244-byte value: 4-byte offset + 240 bytes).
DEFAULT_FIRMWARE_WRITE_BYTES: Final = 240
_MAX_MANIFEST_BYTES: Final = 64 * 1024
_FIRMWARE_DATA = struct.Struct("<I")

FirmwareOp = Literal["manifest", "begin", "install", "rollback", "status"]
_FIRMWARE_OPS: Final = ("manifest", "begin", "install", "rollback", "status")


@dataclass(frozen=True, slots=True)
class FirmwareRequest:
    """A write to the firmware characteristic.  ``manifest`` carries ``offset`` and ``data`` (a piece of the
    manifest file), ``begin`` the ``signature`` (64 bytes, refused by the module otherwise), the others
    nothing but ``seq``."""

    seq: int
    op: FirmwareOp
    offset: int | None = None
    data: bytes | None = None
    signature: bytes | None = None


def encode_firmware_request(request: FirmwareRequest) -> bytes:
    body: dict[str, object] = {"seq": request.seq, "op": request.op}
    if request.offset is not None:
        body["offset"] = request.offset
    if request.data is not None:
        if len(request.data) > FIRMWARE_MANIFEST_PIECE_BYTES:
            raise ValueError(f"a manifest piece is at most {FIRMWARE_MANIFEST_PIECE_BYTES} bytes")
        body["data"] = base64.b64encode(request.data).decode("ascii")
    if request.signature is not None:
        body["signature"] = base64.b64encode(request.signature).decode("ascii")
    return _encode_value(body, "firmware")


def _b64_piece(obj: Mapping[str, object], key: str, limit: int) -> bytes:
    where = f"firmware.{key}"
    value = obj.get(key)
    if not isinstance(value, str):
        raise WireFormatError(f"{where}: expected a base64 string", field=where)
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as err:
        raise WireFormatError(f"{where}: not base64", field=where) from err
    if base64.b64encode(raw).decode("ascii") != value:
        raise WireFormatError(f"{where}: not canonical base64", field=where)
    if len(raw) > limit:
        raise WireRangeError(f"{where}: more than {limit} bytes", field=where)
    return raw


def parse_firmware_request(data: bytes) -> FirmwareRequest:
    """Module side: a firmware request.  ``manifest`` needs ``offset`` (0..65535) and ``data`` (base64 of at
    most ``FIRMWARE_MANIFEST_PIECE_BYTES``), ``begin`` needs ``signature`` (base64)."""
    obj = _decode_value(data, "firmware")
    seq = _seq(obj, "firmware")
    op = obj.get("op")
    if op == "manifest":
        offset = obj.get("offset")
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise WireFormatError("firmware.offset: expected an integer", field="firmware.offset")
        if not 0 <= offset < _MAX_MANIFEST_BYTES:
            raise WireRangeError(
                f"firmware.offset: {offset} is outside 0..{_MAX_MANIFEST_BYTES - 1}", field="firmware.offset"
            )
        piece = _b64_piece(obj, "data", FIRMWARE_MANIFEST_PIECE_BYTES)
        return FirmwareRequest(seq, "manifest", offset=offset, data=piece)
    if op == "begin":
        return FirmwareRequest(seq, "begin", signature=_b64_piece(obj, "signature", 128))
    if op in ("install", "rollback", "status"):
        return FirmwareRequest(seq, op)  # type: ignore[arg-type]  # narrowed by the test above
    raise WireFormatError(f"firmware.op: expected one of {', '.join(_FIRMWARE_OPS)}", field="firmware.op")


def encode_firmware_value(slots: FirmwareSlots) -> bytes:
    """The firmware characteristic's value: the ORES-HTTP ``GET /firmware`` body, compact, with the error
    message shortened so that the value fits 512 bytes.  ``ValueError`` if the versions alone do not."""
    body = firmware_status_to_wire(slots)
    error = body["error"]
    if error is not None:
        error["message"] = error["message"][:300]
        while len(encode_json(body)) > MAX_VALUE_LEN and error["message"]:
            error["message"] = error["message"][: len(error["message"]) // 2]
    return _encode_value(body, "firmware")


def parse_firmware_value(data: bytes) -> FirmwareSlots:
    """Hub side: the firmware characteristic's value."""
    return parse_firmware_status(_decode_value(data, "firmware"), "firmware")


def encode_firmware_data(offset: int, data: bytes) -> bytes:
    """One data write: ``offset`` as uint32 little-endian, then ``data`` (``ValueError`` beyond 512 bytes)."""
    if not 0 <= offset <= 0xFFFFFFFF:
        raise ValueError("offset must be 0..4294967295")
    value = _FIRMWARE_DATA.pack(offset) + data
    if len(value) > MAX_VALUE_LEN:
        raise ValueError(f"a data write is at most {MAX_VALUE_LEN} bytes, got {len(value)}")
    return value


def parse_firmware_data(value: bytes) -> tuple[int, bytes]:
    """Module side: (offset, image bytes) of a data write; ``WireFormatError`` when shorter than the offset."""
    if len(value) < FIRMWARE_DATA_HEADER_LEN:
        raise WireFormatError(
            f"firmware data: {len(value)} bytes, at least {FIRMWARE_DATA_HEADER_LEN} needed"
        )
    if len(value) > MAX_VALUE_LEN:
        raise WireFormatError(f"firmware data: value of {len(value)} bytes exceeds {MAX_VALUE_LEN}")
    (offset,) = _FIRMWARE_DATA.unpack_from(value)
    return offset, bytes(value[FIRMWARE_DATA_HEADER_LEN:])
