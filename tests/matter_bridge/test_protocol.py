"""Tests of matter_bridge.protocol: op encoding, event parsing with reasons, and a fuzz of parse_event."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matter_bridge.protocol import (
    MAX_LINE_BYTES,
    BridgeCommandError,
    BridgeUnavailable,
    BridgeWarning,
    Command,
    Commissioned,
    Decommissioned,
    ErrorReply,
    Fabric,
    FabricsChanged,
    Hello,
    MatterError,
    ProtocolError,
    Ready,
    Result,
    Status,
    Stopped,
    Subscriptions,
    Unknown,
    Window,
    add_op,
    encode,
    open_window_op,
    parse_event,
    parse_status,
    remove_fabric_op,
    remove_op,
    start_op,
    update_op,
)

STATUS: dict[str, Any] = {
    "manualPairingCode": "34970112332",
    "qrPairingCode": "MT:Y.K90AFN00KA0648G00",
    "commissioned": True,
    "window": "closed",
    "fabrics": [{"fabricIndex": 1, "fabricId": "1", "nodeId": "18", "vendorId": 65521, "label": "HA"}],
}


def line(**fields: Any) -> bytes:
    return json.dumps(fields).encode() + b"\n"


def test_errors_share_one_root() -> None:
    err = BridgeCommandError("Value 999 is above the maximum", "update")
    assert (err.reason, err.op) == ("Value 999 is above the maximum", "update")
    assert "update" in str(err) and "999" in str(err)
    for cls in (ProtocolError, BridgeCommandError, BridgeUnavailable):
        assert issubclass(cls, MatterError)


def test_encode_is_one_compact_line() -> None:
    op = add_op("plug-1", "plug", {"name": "Kühlschrank", "reachable": True}, {"onOff": {"onOff": True}})
    data = encode(op)
    assert data.endswith(b"\n") and data.count(b"\n") == 1
    assert b" " not in data
    assert json.loads(data) == {
        "op": "add",
        "id": "plug-1",
        "kind": "plug",
        "info": {"name": "Kühlschrank", "reachable": True},
        "values": {"onOff": {"onOff": True}},
    }
    assert json.loads(encode({"op": "x", "text": "a\nb"})) == {"op": "x", "text": "a\nb"}
    assert json.loads(encode(update_op("m", {"powerSource": {"batPercentRemaining": 150}})))["values"] == {
        "powerSource": {"batPercentRemaining": 150}
    }
    assert json.loads(encode(remove_op("m"))) == {"op": "remove", "id": "m"}
    assert json.loads(encode(start_op())) == {"op": "start"}
    assert json.loads(encode(start_op(window_s=300))) == {"op": "start", "window_s": 300}
    assert json.loads(encode(open_window_op(60))) == {"op": "open_window", "timeout_s": 60}
    assert json.loads(encode(remove_fabric_op(2))) == {"op": "remove_fabric", "fabricIndex": 2}


def test_encode_refuses_what_json_parse_would_not_take() -> None:
    with pytest.raises(MatterError, match="update"):
        encode({"op": "update", "values": {"x": {"y": float("nan")}}})
    with pytest.raises(MatterError):
        encode({"op": "update", "values": object()})


def test_parse_every_event() -> None:
    assert parse_event(line(event="hello", pid=12, protocol=1, matterjs="0.17.9")) == Hello(12, 1, "0.17.9")
    assert parse_event(line(event="result", seq=3, op="add", id="p", endpoint=2)) == Result(
        3, "add", {"id": "p", "endpoint": 2}
    )
    assert parse_event(line(event="result", seq=None, op="update")) == Result(None, "update", {})
    assert parse_event(line(event="error", seq=None, op=None, reason="bad message")) == ErrorReply(
        None, None, "bad message"
    )
    ready = parse_event(line(event="ready", **STATUS))
    assert ready == Ready(
        Status("34970112332", "MT:Y.K90AFN00KA0648G00", True, False, (Fabric(1, "1", "18", 65521, "HA"),))
    )
    assert parse_event(line(event="window", state="open", timeout_s=180)) == Window(True, 180, None)
    assert parse_event(line(event="window", state="closed", reason="timeout")) == Window(
        False, None, "timeout"
    )
    assert parse_event(line(event="commissioned")) == Commissioned()
    assert parse_event(line(event="decommissioned")) == Decommissioned()
    assert parse_event(line(event="fabrics", fabricIndex=2, action="deleted")) == FabricsChanged(2, "deleted")
    assert parse_event(line(event="command", id="p", cluster="onOff", command="on")) == Command(
        "p", "onOff", "on", None
    )
    toggled = parse_event(line(event="command", id="p", cluster="onOff", command="off", via="toggle"))
    assert toggled == Command("p", "onOff", "off", "toggle")
    assert parse_event(line(event="subscriptions", count=1)) == Subscriptions(1)
    assert parse_event(line(event="warning", reason="closing window")) == BridgeWarning("closing window")
    assert parse_event(line(event="stopped")) == Stopped()
    assert parse_event('{"event":"stopped"}') == Stopped()


def test_unknown_events_and_values_are_tolerated() -> None:
    assert parse_event(line(event="sparkles", n=1)) == Unknown("sparkles", {"event": "sparkles", "n": 1})
    assert parse_event(line(event="fabrics", fabricIndex=1, action="renamed")) == FabricsChanged(1, "renamed")
    assert parse_event(line(event="window", state="half-open")) == Window(False, None, None)
    status = parse_status({**STATUS, "window": "open", "extra": 1})
    assert status.window_open


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not json\n", "not JSON"),
        (b"\xff\xfe{}\n", "not UTF-8"),
        (b"[1, 2]\n", "not a JSON object but list"),
        (b'"hello"\n', "not a JSON object but str"),
        (line(pid=1), "event must be a string, got nothing"),
        (line(event=3), "event must be a string, got 3"),
        (
            line(event="hello", pid="12", protocol=1, matterjs="x"),
            'bad hello event: pid must be an integer, got "12"',
        ),
        (line(event="hello", pid=True, protocol=1, matterjs="x"), "pid must be an integer, got true"),
        (line(event="hello", pid=1, protocol=1), "matterjs must be a string, got nothing"),
        (line(event="result", seq="1", op="add"), "seq must be an integer"),
        (line(event="result", seq=1.5, op="add"), "seq must be an integer, got 1.5"),
        (line(event="error", seq=1, op="add"), "bad error event: reason must be a string"),
        (line(event="ready", **{**STATUS, "commissioned": "yes"}), "commissioned must be a boolean"),
        (line(event="ready", **{**STATUS, "fabrics": {}}), "fabrics must be a list"),
        (line(event="ready", **{**STATUS, "fabrics": [1]}), "a fabric must be an object"),
        (line(event="ready", **{**STATUS, "fabrics": [{"fabricIndex": 1}]}), "fabricId must be a string"),
        (line(event="window", timeout_s=3), "state must be a string"),
        (line(event="window", state="open", timeout_s="3"), "timeout_s must be an integer"),
        (line(event="command", id="p", cluster="onOff"), "command must be a string"),
        (line(event="subscriptions", count=None), "count must be an integer, got null"),
        (line(event="fabrics", fabricIndex=1), "action must be a string"),
        (b"[" * 100_000, "not JSON"),
        (b'{"event":"x","n":' + b"9" * 5000 + b"}", "not JSON"),
    ],
)
def test_bad_lines_say_why(data: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        parse_event(data)
    assert reason in str(info.value)


def test_over_long_line_is_refused() -> None:
    ok = b'{"event":"warning","reason":"' + b"x" * (MAX_LINE_BYTES - 40) + b'"}'
    assert isinstance(parse_event(ok), BridgeWarning)
    too_long = b'{"event":"warning","reason":"' + b"x" * MAX_LINE_BYTES + b'"}'
    with pytest.raises(ProtocolError, match="longer than"):
        parse_event(too_long)


# ---- fuzz --------------------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
EVENTS = [
    "hello",
    "result",
    "error",
    "ready",
    "window",
    "commissioned",
    "decommissioned",
    "fabrics",
    "command",
    "subscriptions",
    "warning",
    "stopped",
    "other",
]
FIELDS = [
    "pid",
    "protocol",
    "matterjs",
    "seq",
    "op",
    "reason",
    "state",
    "timeout_s",
    "fabricIndex",
    "action",
    "id",
    "cluster",
    "command",
    "via",
    "count",
    *STATUS,
]
event_objects = st.builds(
    lambda event, fields: {**fields, "event": event},
    st.sampled_from(EVENTS) | json_values,
    st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8), json_values, max_size=8),
)


def _check(data: bytes) -> None:
    try:
        event = parse_event(data)
    except ProtocolError as err:
        assert str(err)
    else:
        assert event is not None


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_fuzz_bytes_only_raise_protocol_error(data: bytes) -> None:
    _check(data)


@settings(max_examples=500)
@given(event_objects)
def test_fuzz_objects_only_raise_protocol_error(obj: dict[str, Any]) -> None:
    _check(json.dumps(obj).encode())


@settings(max_examples=200)
@given(json_values)
def test_fuzz_any_json_only_raises_protocol_error(value: Any) -> None:
    _check(json.dumps(value).encode())


@settings(max_examples=200)
@given(st.sampled_from([b"fabrics", b"ready", b"hello", b"result"]), st.lists(json_values, max_size=3))
def test_fuzz_status_shapes(event: bytes, items: list[Any]) -> None:
    data = dict(STATUS)
    data["fabrics"] = [*STATUS["fabrics"], *items]
    _check(json.dumps({"event": event.decode(), **data}).encode())
