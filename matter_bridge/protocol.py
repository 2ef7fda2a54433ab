"""The message layer of the JSON-lines channel between the hub and the Node.js Matter bridge (protocol 1).

The hub writes *ops* (typed here as TypedDicts, built with the small constructors below and turned into one
compact JSON line by :func:`encode`) to the bridge's stdin; the bridge answers and reports *events* on its
stdout, which :func:`parse_event` validates into frozen dataclasses, raising :class:`ProtocolError` with the
reason for anything it cannot use.  Unknown events are tolerated (:class:`Unknown`), unknown enum values inside
known events are passed through as strings.  Nothing here does I/O; docs/matter.md documents the channel, and
:class:`MatterError` is the root of every exception of the matter_bridge layer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NotRequired, TypedDict

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 1 << 20  # a longer line from the bridge is refused (and skipped by the reader)

# ---- errors ----------------------------------------------------------------------------------------------------


class MatterError(Exception):
    """Root of the matter_bridge layer's exceptions."""


class ProtocolError(MatterError):
    """A line from the bridge that cannot be used; ``str()`` says why."""


class BridgeCommandError(MatterError):
    """The bridge answered an op with ``error``: nothing was changed."""

    def __init__(self, reason: str, op: str | None = None) -> None:
        super().__init__(f"bridge refused {op or 'message'}: {reason}")
        self.reason = reason
        self.op = op


class BridgeUnavailable(MatterError):
    """No running bridge process to talk to (not started, restarting, stopped, or it just died)."""


# ---- ops (hub → bridge) ----------------------------------------------------------------------------------------

EndpointKind = Literal["solar", "battery", "meter", "plug"]
Values = dict[str, dict[str, Any]]  # {behavior: {attribute: value}}, Matter units


class EndpointInfo(TypedDict, total=False):
    name: str
    vendor: str
    product: str
    serial: str
    uniqueId: str
    softwareVersion: str
    reachable: bool


class AddOp(TypedDict):
    op: Literal["add"]
    id: str
    kind: EndpointKind
    info: EndpointInfo
    values: Values
    seq: NotRequired[int]


class UpdateOp(TypedDict):
    op: Literal["update"]
    id: str
    values: Values
    seq: NotRequired[int]


class RemoveOp(TypedDict):
    op: Literal["remove"]
    id: str
    seq: NotRequired[int]


class StartOp(TypedDict):
    op: Literal["start"]
    window_s: NotRequired[int]
    seq: NotRequired[int]


class OpenWindowOp(TypedDict):
    op: Literal["open_window"]
    timeout_s: int
    seq: NotRequired[int]


class CloseWindowOp(TypedDict):
    op: Literal["close_window"]
    seq: NotRequired[int]


class StatusOp(TypedDict):
    op: Literal["status"]
    seq: NotRequired[int]


class RemoveFabricOp(TypedDict):
    op: Literal["remove_fabric"]
    fabricIndex: int
    seq: NotRequired[int]


class StopOp(TypedDict):
    op: Literal["stop"]
    seq: NotRequired[int]


class EndpointsOp(TypedDict):
    op: Literal["endpoints"]
    seq: NotRequired[int]


Op = (
    AddOp
    | UpdateOp
    | RemoveOp
    | StartOp
    | OpenWindowOp
    | CloseWindowOp
    | StatusOp
    | RemoveFabricOp
    | StopOp
    | EndpointsOp
)

# Ops whose result is a status object.
STATUS_OPS = frozenset({"start", "open_window", "close_window", "status", "remove_fabric"})


def add_op(id: str, kind: EndpointKind, info: EndpointInfo, values: Values) -> AddOp:
    return {"op": "add", "id": id, "kind": kind, "info": info, "values": values}


def update_op(id: str, values: Values) -> UpdateOp:
    return {"op": "update", "id": id, "values": values}


def remove_op(id: str) -> RemoveOp:
    return {"op": "remove", "id": id}


def start_op(window_s: int | None = None) -> StartOp:
    op: StartOp = {"op": "start"}
    if window_s is not None:
        op["window_s"] = window_s
    return op


def open_window_op(timeout_s: int) -> OpenWindowOp:
    return {"op": "open_window", "timeout_s": timeout_s}


def close_window_op() -> CloseWindowOp:
    return {"op": "close_window"}


def status_op() -> StatusOp:
    return {"op": "status"}


def remove_fabric_op(fabric_index: int) -> RemoveFabricOp:
    return {"op": "remove_fabric", "fabricIndex": fabric_index}


def endpoints_op() -> EndpointsOp:
    return {"op": "endpoints"}


def stop_op() -> StopOp:
    return {"op": "stop"}


def encode(op: Mapping[str, Any]) -> bytes:
    """One compact JSON line (UTF-8, ``\\n``-terminated); MatterError if ``op`` is not plain finite JSON."""
    try:
        text = json.dumps(op, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise MatterError(f"cannot encode op {op.get('op')!r}: {err}") from err
    return text.encode() + b"\n"


# ---- events (bridge → hub) -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BridgeEvent:
    """Base of everything :func:`parse_event` returns."""


@dataclass(frozen=True, slots=True)
class Hello(BridgeEvent):
    pid: int
    protocol: int
    matterjs: str


@dataclass(frozen=True, slots=True)
class Result(BridgeEvent):
    seq: int | None
    op: str | None
    data: dict[str, Any]  # the reply's other fields


@dataclass(frozen=True, slots=True)
class ErrorReply(BridgeEvent):
    seq: int | None
    op: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class Fabric:
    fabric_index: int
    fabric_id: str
    node_id: str
    vendor_id: int
    label: str


@dataclass(frozen=True, slots=True)
class Status:
    manual_code: str
    qr_payload: str
    commissioned: bool
    window_open: bool
    fabrics: tuple[Fabric, ...] = ()


@dataclass(frozen=True, slots=True)
class Ready(BridgeEvent):
    status: Status


@dataclass(frozen=True, slots=True)
class Window(BridgeEvent):
    open: bool
    timeout_s: int | None
    reason: str | None


@dataclass(frozen=True, slots=True)
class Commissioned(BridgeEvent):
    pass


@dataclass(frozen=True, slots=True)
class Decommissioned(BridgeEvent):
    pass


@dataclass(frozen=True, slots=True)
class FabricsChanged(BridgeEvent):
    fabric_index: int
    action: str  # added | updated | deleted (others passed through)


@dataclass(frozen=True, slots=True)
class Command(BridgeEvent):
    id: str
    cluster: str
    command: str
    via: str | None = None


@dataclass(frozen=True, slots=True)
class Subscriptions(BridgeEvent):
    count: int


@dataclass(frozen=True, slots=True)
class BridgeWarning(BridgeEvent):
    reason: str


@dataclass(frozen=True, slots=True)
class Stopped(BridgeEvent):
    pass


@dataclass(frozen=True, slots=True)
class Unknown(BridgeEvent):
    event: str
    raw: dict[str, Any] = field(default_factory=dict)


# ---- parsing ---------------------------------------------------------------------------------------------------

_MISSING = object()


def _int(data: Mapping[str, Any], key: str, *, optional: bool = False) -> int | None:
    value = data.get(key, _MISSING)
    if optional and (value is None or value is _MISSING):
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{key} must be an integer, got {_show(value)}")
    return value


def _req_int(data: Mapping[str, Any], key: str) -> int:
    value = _int(data, key)
    assert value is not None
    return value


def _str(data: Mapping[str, Any], key: str, *, optional: bool = False) -> str | None:
    value = data.get(key, _MISSING)
    if optional and (value is None or value is _MISSING):
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"{key} must be a string, got {_show(value)}")
    return value


def _req_str(data: Mapping[str, Any], key: str) -> str:
    value = _str(data, key)
    assert value is not None
    return value


def _bool(data: Mapping[str, Any], key: str) -> bool:
    value = data.get(key, _MISSING)
    if not isinstance(value, bool):
        raise ProtocolError(f"{key} must be a boolean, got {_show(value)}")
    return value


def _show(value: object) -> str:
    if value is _MISSING:
        return "nothing"
    text = (
        json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    )
    return text if len(text) <= 40 else text[:37] + "..."


def _fabric(item: object) -> Fabric:
    if not isinstance(item, dict):
        raise ProtocolError(f"a fabric must be an object, got {_show(item)}")
    return Fabric(
        fabric_index=_req_int(item, "fabricIndex"),
        fabric_id=_req_str(item, "fabricId"),
        node_id=_req_str(item, "nodeId"),
        vendor_id=_req_int(item, "vendorId"),
        label=_req_str(item, "label"),
    )


def parse_status(data: Mapping[str, Any]) -> Status:
    """The status object (of ``ready`` and of the results of start/status/windows/remove_fabric)."""
    fabrics = data.get("fabrics", _MISSING)
    if not isinstance(fabrics, list):
        raise ProtocolError(f"fabrics must be a list, got {_show(fabrics)}")
    return Status(
        manual_code=_req_str(data, "manualPairingCode"),
        qr_payload=_req_str(data, "qrPairingCode"),
        commissioned=_bool(data, "commissioned"),
        window_open=_req_str(data, "window") == "open",
        fabrics=tuple(_fabric(item) for item in fabrics),
    )


def _hello(d: dict[str, Any]) -> BridgeEvent:
    return Hello(pid=_req_int(d, "pid"), protocol=_req_int(d, "protocol"), matterjs=_req_str(d, "matterjs"))


def _result(d: dict[str, Any]) -> BridgeEvent:
    data = {k: v for k, v in d.items() if k not in ("event", "seq", "op")}
    return Result(seq=_int(d, "seq", optional=True), op=_str(d, "op", optional=True), data=data)


def _error(d: dict[str, Any]) -> BridgeEvent:
    return ErrorReply(
        seq=_int(d, "seq", optional=True), op=_str(d, "op", optional=True), reason=_req_str(d, "reason")
    )


def _window(d: dict[str, Any]) -> BridgeEvent:
    return Window(
        open=_req_str(d, "state") == "open",
        timeout_s=_int(d, "timeout_s", optional=True),
        reason=_str(d, "reason", optional=True),
    )


def _command(d: dict[str, Any]) -> BridgeEvent:
    return Command(
        id=_req_str(d, "id"),
        cluster=_req_str(d, "cluster"),
        command=_req_str(d, "command"),
        via=_str(d, "via", optional=True),
    )


_PARSERS: dict[str, Callable[[dict[str, Any]], BridgeEvent]] = {
    "hello": _hello,
    "result": _result,
    "error": _error,
    "ready": lambda d: Ready(parse_status(d)),
    "window": _window,
    "commissioned": lambda d: Commissioned(),
    "decommissioned": lambda d: Decommissioned(),
    "fabrics": lambda d: FabricsChanged(
        fabric_index=_req_int(d, "fabricIndex"), action=_req_str(d, "action")
    ),
    "command": _command,
    "subscriptions": lambda d: Subscriptions(count=_req_int(d, "count")),
    "warning": lambda d: BridgeWarning(reason=_req_str(d, "reason")),
    "stopped": lambda d: Stopped(),
}


def parse_event(line: bytes | str) -> BridgeEvent:
    """One line from the bridge's stdout as an event; ProtocolError(reason) if it cannot be used."""
    if isinstance(line, str):
        text = line
        size = len(line.encode(errors="replace"))
    else:
        size = len(line)
    if size > MAX_LINE_BYTES:
        raise ProtocolError(f"line of {size} bytes is longer than {MAX_LINE_BYTES}")
    try:
        if not isinstance(line, str):
            text = line.decode()
        data = json.loads(text)
    except UnicodeDecodeError as err:
        raise ProtocolError(f"not UTF-8: {err}") from err
    except (ValueError, RecursionError) as err:  # JSONDecodeError, too-long integers, too deep nesting
        raise ProtocolError(f"not JSON: {err}") from err
    if not isinstance(data, dict):
        raise ProtocolError(f"not a JSON object but {type(data).__name__}")
    event = data.get("event", _MISSING)
    if not isinstance(event, str):
        raise ProtocolError(f"event must be a string, got {_show(event)}")
    parser = _PARSERS.get(event)
    if parser is None:
        return Unknown(event=event, raw=data)
    try:
        return parser(data)
    except ProtocolError as err:
        raise ProtocolError(f"bad {event} event: {err}") from err
