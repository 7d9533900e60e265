"""The wire protocol as pure logic: framing, message shapes, argument checks."""

import gc
import struct

import msgpack
import pytest

from amber.client.protocol import (
    MAX_DEPTH,
    MAX_FRAME,
    MAX_ITEMS,
    AmberError,
    ErrorCode,
    Event,
    FrameDecoder,
    ProtocolError,
    Reply,
    encode_frame,
    error_reply,
    event,
    hello_reply,
    hello_request,
    parse_hello,
    parse_hello_reply,
    parse_request,
    parse_server_message,
    pick_version,
    request,
    request_id,
    result_reply,
)


def frame_of(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


# --- framing -------------------------------------------------------------------

MESSAGES = [
    {},
    {"op": "build", "id": 7, "args": {"spec": "spec.toml", "env": {"A": "b"}}},
    {"id": 1, "event": "log", "data": {"line": "héllo ✓", "raw": b"\x00\xff", "n": -3}},
    {"nested": [[1, 2.5, None, True], {"k": []}]},
]


@pytest.mark.parametrize("msg", MESSAGES)
def test_round_trip(msg):
    assert FrameDecoder().feed(encode_frame(msg)) == [msg]


def test_bytes_stay_bytes_and_str_stay_str():
    [msg] = FrameDecoder().feed(encode_frame({"b": b"abc", "s": "abc"}))
    assert type(msg["b"]) is bytes
    assert type(msg["s"]) is str


def test_frame_header_is_big_endian_length():
    frame = encode_frame({"a": 1})
    body = msgpack.packb({"a": 1}, use_bin_type=True)
    assert frame == len(body).to_bytes(4, "big") + body


def test_fed_byte_by_byte():
    stream = encode_frame(MESSAGES[1]) + encode_frame(MESSAGES[2])
    decoder = FrameDecoder()
    out = []
    for i in range(len(stream)):
        got = decoder.feed(stream[i : i + 1])
        if i == len(encode_frame(MESSAGES[1])) - 1:
            assert got == [MESSAGES[1]]
        out += got
    assert out == [MESSAGES[1], MESSAGES[2]]
    assert decoder.buffered == 0


def test_many_frames_in_one_chunk_and_a_partial_one():
    decoder = FrameDecoder()
    tail = encode_frame({"x": 3})
    data = encode_frame({"x": 1}) + encode_frame({"x": 2}) + tail[:5]
    assert decoder.feed(data) == [{"x": 1}, {"x": 2}]
    assert decoder.buffered == 5
    assert decoder.feed(tail[5:]) == [{"x": 3}]


def test_oversized_header_rejected_before_the_body_arrives():
    decoder = FrameDecoder()
    header = struct.pack(">I", MAX_FRAME + 1)
    assert decoder.feed(header[:3]) == []
    with pytest.raises(ProtocolError) as info:
        decoder.feed(header[3:])  # not one byte of body yet
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    assert decoder.buffered == 0


def test_max_frame_is_per_decoder():
    small = FrameDecoder(max_frame=8)
    assert small.feed(frame_of(msgpack.packb({"a": 1}))) == [{"a": 1}]
    with pytest.raises(ProtocolError, match="frame-too-large"):
        small.feed(encode_frame({"a": "x" * 20}))


def test_frame_at_exactly_the_limit_is_accepted():
    body = msgpack.packb({"a": "x" * 100})
    assert FrameDecoder(max_frame=len(body)).feed(frame_of(body)) == [{"a": "x" * 100}]


def test_decoder_refuses_input_after_an_error():
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError):
        decoder.feed(frame_of(b"\xc1"))
    with pytest.raises(ProtocolError, match="malformed-frame"):
        decoder.feed(encode_frame({"fine": True}))


def test_encode_refuses_what_the_peer_would_refuse():
    with pytest.raises(ProtocolError) as info:
        encode_frame({"a": "x" * 100}, max_frame=50)
    assert info.value.code == "frame-too-large"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xc1", id="never-used-byte"),
        pytest.param(b"\x82\xa1a", id="truncated"),
        pytest.param(msgpack.packb({}) + msgpack.packb(1), id="extra-data"),
        pytest.param(b"\x81\xa1k\xa2\xff\xfe", id="invalid-utf8"),
        pytest.param(msgpack.packb({"e": msgpack.ExtType(5, b"x")}), id="ext-type"),
        pytest.param(msgpack.packb({1: 2}), id="int-key"),
        pytest.param(b"\x81\x91\x01\x02", id="list-key"),
    ],
)
def test_malformed_msgpack(body):
    with pytest.raises(ProtocolError) as info:
        FrameDecoder().feed(frame_of(body))
    assert info.value.code == ErrorCode.MALFORMED_FRAME


@pytest.mark.parametrize("value", [[1, 2], "text", 3, None, {b"bytes-key": 1}], ids=repr)
def test_body_must_be_a_map_with_str_keys(value):
    with pytest.raises(ProtocolError) as info:
        FrameDecoder().feed(encode_frame_raw(value))
    assert info.value.code == ErrorCode.NOT_A_MAP


def encode_frame_raw(value: object) -> bytes:
    return frame_of(msgpack.packb(value, use_bin_type=True))


def _nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"k": value}
    return value


@pytest.mark.parametrize(
    ("args", "why"),
    [
        ({"xs": [{} for _ in range(MAX_ITEMS)]}, "too many items"),
        ({"xs": [[{}] * 1000 for _ in range(MAX_ITEMS // 1000)]}, "too many items"),
        ({"xs": list(range(MAX_ITEMS + 1))}, "exceeds max_array_len"),
        (_nested(MAX_DEPTH), "nested deeper than"),
    ],
)
def test_bounded_decoder_refuses_what_would_cost_memory_or_recursion(args, why):
    data = encode_frame({"op": "x", "id": 1, "args": args})
    with pytest.raises(ProtocolError, match=why) as info:
        FrameDecoder(max_items=MAX_ITEMS).feed(data)
    assert info.value.code == ErrorCode.MALFORMED_FRAME
    assert FrameDecoder().feed(data)[0]["args"] == args  # a client reading its daemon: no bound


def test_a_refused_frame_leaves_no_garbage_cycle():
    """Its error must not keep the decoder, and what it half decoded, alive
    until the cyclic GC runs: in amberd that was 5 MB per refused request."""
    data = encode_frame({"op": "x", "id": 1, "args": {"xs": [[[1]] for _ in range(MAX_ITEMS)]}})
    gc.collect()
    gc.disable()
    try:
        decoder = FrameDecoder(max_items=MAX_ITEMS)
        with pytest.raises(ProtocolError, match="too many items"):
            decoder.feed(data)
        del decoder
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_bounded_decoder_takes_what_fits():
    args = {"xs": [{"a": [1, 2]}] * 1000, "deep": _nested(MAX_DEPTH - 2)}
    data = encode_frame({"op": "x", "id": 1, "args": args})
    assert FrameDecoder(max_items=MAX_ITEMS).feed(data)[0]["args"] == args


# --- hello ---------------------------------------------------------------------


def test_hello_request_shape():
    assert hello_request() == {"op": "hello", "id": 0, "versions": [1], "client": "amber/0.1.0"}


def test_hello_handshake_from_both_sides():
    versions, client = parse_hello(hello_request())
    assert client == "amber/0.1.0"
    reply = hello_reply(pick_version(versions), "amberd/0.1.0")
    assert reply == {"id": 0, "ok": True, "version": 1, "server": "amberd/0.1.0"}
    assert parse_hello_reply(reply) == (1, "amberd/0.1.0")


def test_pick_version_takes_the_highest_common():
    assert pick_version([1, 2, 3], supported=[2, 3, 4]) == 3


def test_pick_version_without_common_version():
    with pytest.raises(AmberError) as info:
        pick_version([7, 8])
    assert info.value.code == ErrorCode.PROTOCOL_VERSION


@pytest.mark.parametrize(
    "msg",
    [
        {"op": "build", "id": 0, "versions": [1]},
        {"op": "hello", "id": 1, "versions": [1]},
        {"op": "hello", "id": False, "versions": [1]},
        {"op": "hello", "id": 0},
        {"op": "hello", "id": 0, "versions": ["1"]},
        {"op": "hello", "id": 0, "versions": [1], "client": 5},
    ],
)
def test_bad_hello(msg):
    with pytest.raises(AmberError) as info:
        parse_hello(msg)
    assert info.value.code == ErrorCode.BAD_REQUEST


def test_hello_refusal_is_raised_by_the_client():
    refusal = error_reply(0, AmberError(ErrorCode.PROTOCOL_VERSION, "speak 2"))
    with pytest.raises(AmberError) as info:
        parse_hello_reply(refusal)
    assert (info.value.code, info.value.message) == ("protocol-version", "speak 2")


def test_hello_reply_with_a_version_not_offered():
    with pytest.raises(AmberError, match="protocol-version"):
        parse_hello_reply(hello_reply(2, "amberd/9"))


def test_hello_reply_of_the_wrong_shape():
    with pytest.raises(ProtocolError, match="bad-reply"):
        parse_hello_reply({"id": 0, "ok": True})


# --- requests, replies, events ---------------------------------------------------


def test_request_round_trip():
    req = parse_request(request(3, "build", {"spec": "x"}))
    assert (req.id, req.op, req.args, req.fds) == (3, "build", {"spec": "x"}, 0)
    assert request(4, "shell", fds=2) == {"op": "shell", "id": 4, "args": {}, "fds": 2}
    assert parse_request(request(4, "shell", fds=2)).fds == 2


@pytest.mark.parametrize(
    ("msg", "expected_id"),
    [
        ({"op": "x", "args": {}}, None),
        ({"op": "x", "id": True, "args": {}}, None),
        ({"op": "x", "id": "1", "args": {}}, None),
        ({"op": "x", "id": 0, "args": {}}, 0),
        ({"id": 2, "args": {}}, 2),
        ({"op": "", "id": 2, "args": {}}, 2),
        ({"op": 5, "id": 2, "args": {}}, 2),
        ({"op": "x", "id": 2, "args": [1]}, 2),
        ({"op": "x", "id": 2, "args": {}, "fds": -1}, 2),
        ({"op": "x", "id": 2, "args": {}, "fds": True}, 2),
        ({"op": "x", "id": 2, "args": {}, "extra": 1}, 2),
    ],
)
def test_bad_request_envelope(msg, expected_id):
    with pytest.raises(AmberError) as info:
        parse_request(msg)
    assert info.value.code == ErrorCode.BAD_REQUEST
    assert request_id(msg) == expected_id
    reply = error_reply(request_id(msg), info.value)
    assert reply["ok"] is False
    assert reply["error"]["code"] == "bad-request"


def test_args_default_to_an_empty_map():
    assert parse_request({"op": "status", "id": 1}).args == {}


def test_reply_shapes():
    assert result_reply(5, {"a": 1}) == {"id": 5, "ok": True, "result": {"a": 1}}
    assert error_reply(5, AmberError(ErrorCode.NOT_FOUND, "no build 9")) == {
        "id": 5,
        "ok": False,
        "error": {"code": "not-found", "message": "no build 9"},
    }
    assert event(5, "log", {"line": "x"}) == {"id": 5, "event": "log", "data": {"line": "x"}}


def test_parse_server_messages():
    ev = parse_server_message(event(2, "step-started", {"step": 1}))
    assert isinstance(ev, Event)
    assert (ev.id, ev.name, ev.data) == (2, "step-started", {"step": 1})

    ok = parse_server_message(result_reply(2, {"tree": "ab"}))
    assert isinstance(ok, Reply)
    assert (ok.id, ok.result, ok.error) == (2, {"tree": "ab"}, None)

    failed = parse_server_message(error_reply(2, AmberError("busy", "later")))
    assert isinstance(failed, Reply)
    assert failed.result is None
    assert (failed.error.code, failed.error.message) == ("busy", "later")


def test_unknown_error_codes_from_a_newer_daemon_pass_through():
    reply = parse_server_message({"id": 1, "ok": False, "error": {"code": "x-new", "message": ""}})
    assert reply.error.code == "x-new"


@pytest.mark.parametrize(
    "msg",
    [
        {"id": 1},
        {"id": 1, "ok": 1, "result": {}},
        {"id": "1", "ok": True, "result": {}},
        {"id": None, "ok": True, "result": {}},
        {"id": 1, "ok": True, "result": [1]},
        {"id": 1, "ok": False},
        {"id": 1, "ok": False, "error": {"code": 3, "message": "m"}},
        {"id": 1, "event": 5, "data": {}},
        {"id": 1, "event": "log", "data": "line"},
        {"event": "log", "data": {}},
    ],
)
def test_bad_server_messages(msg):
    with pytest.raises(ProtocolError) as info:
        parse_server_message(msg)
    assert info.value.code == ErrorCode.BAD_REPLY


# --- errors ----------------------------------------------------------------------


def test_error_codes_are_stable_strings():
    wire_codes = {
        "bad-request",
        "unknown-op",
        "bad-args",
        "not-found",
        "permission-denied",
        "spec-error",
        "busy",
        "internal",
        "protocol-version",
        "frame-too-large",
        "malformed-frame",
    }
    assert wire_codes <= {code.value for code in ErrorCode}
    assert ErrorCode.BAD_ARGS == "bad-args"


def test_amber_error_carries_a_plain_code():
    exc = AmberError(ErrorCode.SPEC_ERROR, "step 2 has no command")
    assert type(exc.code) is str
    assert exc.code == "spec-error"
    assert str(exc) == "step 2 has no command [spec-error]"
    assert msgpack.unpackb(msgpack.packb(exc.to_wire())) == {
        "code": "spec-error",
        "message": "step 2 has no command",
    }
