"""SunSpec register layouts, taken from the official model definitions shipped with pysunspec2.

Both sides of the hub's SunSpec Modbus support use this module: the driver (``devices.drivers.sunspec``)
compiles read plans from it, and the simulated module server (``devices.sim.sunspec_server``) builds its
register image with it.  Nothing here is a hand-typed register table: every point's offset, type, size,
access and scale-factor reference comes from ``sunspec2.device.get_model_def`` (the JSON model files in
``sunspec2/models/json``), and the "not implemented" sentinels come from ``sunspec2.mb``.  What *is* ours is
the mapping of a few enumerations (operating states) onto the hub's ``OperatingState``, and the struct codes
used to decode registers in one C call.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from sunspec2 import device as ss_device
from sunspec2 import mb as ss_mb
from sunspec2 import mdef as ss_mdef

from devices.model import OperatingState

__all__ = [
    "BASE_ADDRESSES",
    "END_MODEL_ID",
    "MAX_READ_REGISTERS",
    "MAX_WRITE_REGISTERS",
    "MODEL_1_LEGACY_LENGTH",
    "SF_MAX",
    "SF_MIN",
    "SUNS_MARKER",
    "ModelLayout",
    "PointDef",
    "UnknownModel",
    "decode_string",
    "encode_raw",
    "model_layout",
    "scale_to_raw",
    "state_table",
    "state_to_sunspec",
]

#: "SunS" as two big-endian registers.
SUNS_MARKER = (0x5375, 0x6E53)
#: Where a SunSpec map may start, in the order the SunSpec specification tells clients to look.
BASE_ADDRESSES = (40000, 0, 50000)
END_MODEL_ID = ss_mb.SUNS_END_MODEL_ID
#: Modbus limits for one request (function codes 3 and 16).
MAX_READ_REGISTERS = 125
MAX_WRITE_REGISTERS = 123
#: Model 1 may omit its final pad register (length 65 instead of 66); pysunspec2 accepts both.
MODEL_1_LEGACY_LENGTH = 65
#: A valid scale factor (sunssf) lies in this range.
SF_MIN, SF_MAX = -10, 10

#: struct code for each fixed-size SunSpec type (big-endian, the Modbus register order).
_STRUCT_CODES: Mapping[str, str] = {
    ss_mdef.TYPE_INT16: "h",
    ss_mdef.TYPE_UINT16: "H",
    ss_mdef.TYPE_COUNT: "H",
    ss_mdef.TYPE_ACC16: "H",
    ss_mdef.TYPE_ENUM16: "H",
    ss_mdef.TYPE_BITFIELD16: "H",
    ss_mdef.TYPE_PAD: "H",
    ss_mdef.TYPE_SUNSSF: "h",
    ss_mdef.TYPE_INT32: "i",
    ss_mdef.TYPE_UINT32: "I",
    ss_mdef.TYPE_ACC32: "I",
    ss_mdef.TYPE_ENUM32: "I",
    ss_mdef.TYPE_BITFIELD32: "I",
    ss_mdef.TYPE_IPADDR: "I",
    ss_mdef.TYPE_INT64: "q",
    ss_mdef.TYPE_UINT64: "Q",
    ss_mdef.TYPE_ACC64: "Q",
    ss_mdef.TYPE_FLOAT32: "f",
    ss_mdef.TYPE_FLOAT64: "d",
}
#: Types decoded as raw bytes (``Ns``).
_BYTES_TYPES = frozenset({ss_mdef.TYPE_STRING, ss_mdef.TYPE_IPV6ADDR, ss_mdef.TYPE_EUI48})


class UnknownModel(ValueError):
    """pysunspec2 has no usable definition for this model id."""


@dataclass(frozen=True, slots=True)
class PointDef:
    """One point of a model, as the official definition places it.

    ``offset`` counts registers from the model's ID register (so ``ID`` is at 0 and ``L`` at 1).  ``sf`` is
    the name of the scale-factor point in the same model, a fixed integer exponent, or ``None``.
    """

    name: str
    offset: int
    size: int
    type: str
    sf: str | int | None
    writable: bool
    static: bool
    #: Enumeration / bit names and their values, from the definition.
    symbols: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))

    def symbol(self, name: str) -> int:
        """The value of one of this point's symbols (``KeyError`` names the point if it has none such)."""
        try:
            return self.symbols[name]
        except KeyError:
            raise KeyError(f"point {self.name} has no symbol {name!r}") from None

    @property
    def struct_code(self) -> str:
        """The struct code that decodes this point from ``2 * size`` bytes."""
        if self.type in _BYTES_TYPES:
            return f"{2 * self.size}s"
        return _STRUCT_CODES[self.type]

    @property
    def unimplemented(self) -> int | None:
        """The value that means "not implemented" once decoded with ``struct_code`` (None: NaN or bytes)."""
        if self.type in _BYTES_TYPES or self.type in (ss_mdef.TYPE_FLOAT32, ss_mdef.TYPE_FLOAT64):
            return None
        if self.type == ss_mdef.TYPE_PAD:
            return None
        return int(ss_mb.unimpl_value[self.type])

    @property
    def is_integer(self) -> bool:
        return self.type in _STRUCT_CODES and self.type not in (ss_mdef.TYPE_FLOAT32, ss_mdef.TYPE_FLOAT64)


@dataclass(frozen=True, slots=True)
class ModelLayout:
    """A model's points and length, compiled once from its definition."""

    model_id: int
    name: str
    #: The value of ``L``: registers after ``ID`` and ``L``.
    length: int
    points: Mapping[str, PointDef]

    @property
    def accepted_lengths(self) -> tuple[int, ...]:
        if self.model_id == 1:
            return (self.length, MODEL_1_LEGACY_LENGTH)
        return (self.length,)

    def point(self, name: str) -> PointDef:
        try:
            return self.points[name]
        except KeyError:
            raise KeyError(f"model {self.model_id} has no point {name!r}") from None


def _int_sf(sf: Any) -> str | int | None:
    if sf is None:
        return None
    try:
        return int(sf)
    except (TypeError, ValueError):
        return str(sf)


@functools.cache
def model_layout(model_id: int) -> ModelLayout:
    """The layout of ``model_id`` from pysunspec2's definition (cached: definitions never change).

    Points of fixed (non-repeating) groups are named ``"Group.Point"``.  Models with repeating groups are
    not supported (the hub reads none) and raise ``UnknownModel``, as do ids pysunspec2 does not know.
    """
    try:
        definition = ss_device.get_model_def(model_id)
    except ss_mdef.ModelDefinitionError as err:
        raise UnknownModel(f"no SunSpec definition for model {model_id}") from err
    group = definition[ss_mdef.GROUP]
    points: dict[str, PointDef] = {}
    offset = 0

    def add_points(gdef: Mapping[str, Any], prefix: str) -> None:
        nonlocal offset
        for pdef in gdef.get(ss_mdef.POINTS, ()):
            ptype = pdef[ss_mdef.TYPE]
            size = int(pdef.get(ss_mdef.SIZE) or ss_mb.point_type_info[ptype].len)
            name = prefix + pdef[ss_mdef.NAME]
            points[name] = PointDef(
                name=name,
                offset=offset,
                size=size,
                type=ptype,
                sf=_int_sf(pdef.get(ss_mdef.SF)),
                writable=pdef.get(ss_mdef.ACCESS) == ss_mdef.ACCESS_RW,
                static=pdef.get(ss_mdef.STATIC) == ss_mdef.STATIC_TRUE,
                symbols=MappingProxyType(
                    {str(sym[ss_mdef.NAME]): int(sym[ss_mdef.VALUE]) for sym in pdef.get(ss_mdef.SYMBOLS, ())}
                ),
            )
            offset += size
        for sub in gdef.get(ss_mdef.GROUPS, ()):
            if sub.get(ss_mdef.COUNT) is not None:
                raise UnknownModel(f"model {model_id} has repeating groups, which the hub does not read")
            add_points(sub, f"{prefix}{sub[ss_mdef.NAME]}.")

    add_points(group, "")
    return ModelLayout(
        model_id=model_id,
        name=str(group.get(ss_mdef.NAME, "")),
        length=offset - 2,
        points=MappingProxyType(points),
    )


# ----------------------------------------------------------------------------------------- encoding


def _int_range(point: PointDef) -> tuple[int, int]:
    """The usable raw range of an integer point (the not-implemented sentinel excluded)."""
    bits = 16 * point.size
    if _STRUCT_CODES[point.type] in "hiq":
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        return low + 1, high  # the lowest value is the sentinel
    low, high = 0, (1 << bits) - 1
    if point.type in (ss_mdef.TYPE_ACC16, ss_mdef.TYPE_ACC32, ss_mdef.TYPE_ACC64):
        return 1, high  # 0 means not implemented for accumulators
    return low, high - 1


def scale_to_raw(point: PointDef, value: float, sf: int, *, clamp: bool) -> int:
    """The raw integer for an engineering ``value`` with scale factor ``sf`` (value = raw * 10**sf).

    With ``clamp`` an out-of-range value is pinned to the nearest encodable one (a simulator's choice);
    without, ``ValueError`` says why it does not fit (a driver must not write a wrong number).
    """
    if not math.isfinite(value):
        raise ValueError(f"{point.name}: {value} is not a finite number")
    raw = round(value * 10.0**-sf) if sf <= 0 else round(value / 10.0**sf)
    low, high = _int_range(point)
    if raw < low or raw > high:
        if not clamp:
            raise ValueError(
                f"{point.name}: {value} does not fit a {point.type} with scale factor {sf} "
                f"(raw {raw} outside {low}..{high})"
            )
        raw = min(max(raw, low), high)
    return raw


def encode_raw(point: PointDef, raw: int | float | str | bytes | None) -> list[int]:
    """The registers holding ``raw`` (already scaled) for ``point``; ``None`` encodes "not implemented"."""
    nbytes = 2 * point.size
    if point.type in _BYTES_TYPES:
        if raw is None:
            data = b""
        elif isinstance(raw, bytes):
            data = raw
        else:
            # Cut on a character boundary so that the field stays valid UTF-8.
            data = str(raw).encode("utf-8")[:nbytes].decode("utf-8", "ignore").encode("utf-8")
        data = data[:nbytes].ljust(nbytes, b"\0")
    else:
        code = _STRUCT_CODES[point.type]
        if raw is None:
            if point.type == ss_mdef.TYPE_FLOAT32:
                data = struct.pack(">I", ss_mb.SUNS_UNIMPL_FLOAT32)
            elif point.type == ss_mdef.TYPE_FLOAT64:
                data = struct.pack(">Q", ss_mb.SUNS_UNIMPL_FLOAT64)
            else:
                sentinel = point.unimplemented
                data = struct.pack(">" + code, 0 if sentinel is None else sentinel)
        else:
            data = struct.pack(">" + code, raw)
    return list(struct.unpack(f">{point.size}H", data))


def decode_string(data: bytes) -> str:
    """A SunSpec string field: UTF-8, NUL padded."""
    return data.split(b"\0", 1)[0].decode("utf-8", "replace").strip()


# ------------------------------------------------------------------------------------ operating state

#: How the inverter state enumerations (model 101-103 ``St``, model 701 ``InvSt``) map onto the hub's
#: states, by symbol name; the numbers come from the definitions.  SLEEPING and SHUTTING_DOWN are folded in.
_STATE_BY_SYMBOL: Mapping[str, OperatingState] = MappingProxyType(
    {
        "OFF": OperatingState.OFF,
        "SLEEPING": OperatingState.STANDBY,
        "STARTING": OperatingState.STARTING,
        "MPPT": OperatingState.RUNNING,
        "RUNNING": OperatingState.RUNNING,
        "THROTTLED": OperatingState.THROTTLED,
        "SHUTTING_DOWN": OperatingState.OFF,
        "FAULT": OperatingState.FAULT,
        "STANDBY": OperatingState.STANDBY,
    }
)
#: The symbol a simulated module reports for each hub state (``UNKNOWN`` is reported as not implemented).
_SYMBOL_BY_STATE: Mapping[OperatingState, str] = MappingProxyType(
    {
        OperatingState.OFF: "OFF",
        OperatingState.OFFLINE: "OFF",
        OperatingState.STARTING: "STARTING",
        OperatingState.THROTTLED: "THROTTLED",
        OperatingState.FAULT: "FAULT",
        OperatingState.STANDBY: "STANDBY",
    }
)


@functools.cache
def state_table(model_id: int, point: str) -> Mapping[int, OperatingState]:
    """Raw value -> hub state for an inverter state point: ``(103, "St")`` or ``(701, "InvSt")``."""
    symbols = model_layout(model_id).point(point).symbols
    return MappingProxyType({value: _STATE_BY_SYMBOL[name] for name, value in symbols.items()})


def state_to_sunspec(model_id: int, point: str, state: OperatingState) -> int | None:
    """The raw enumeration value a module in ``state`` reports (``None``: not implemented)."""
    symbols = model_layout(model_id).point(point).symbols
    if state is OperatingState.RUNNING:
        return symbols.get("MPPT", symbols.get("RUNNING"))
    name = _SYMBOL_BY_STATE.get(state)
    return None if name is None else symbols[name]
