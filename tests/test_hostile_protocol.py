"""Hostile input against the protocol decoder (no daemon): whatever bytes or
values a peer sends, ``unpack`` and ``parse_generate`` either accept them with
their invariants intact or raise ``ProtocolError`` with a stable code, and
never anything else.
"""

from __future__ import annotations

import math
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moed_client import protocol as P
from moed_client.protocol import ErrorCode, ProtocolError

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Every msgpack type the wire can carry (ext types excluded: unpack refuses them).
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner, max_size=6),
    max_leaves=40,
)
messages = st.dictionaries(st.text(max_size=12), values, max_size=8).map(lambda d: d | {"type": "x"})


def reference_depth(obj) -> int:
    """Recursive definition of the nesting depth unpack enforces."""
    if isinstance(obj, dict):
        return 1 + max((reference_depth(v) for v in obj.values()), default=0)
    if isinstance(obj, list):
        return 1 + max((reference_depth(v) for v in obj), default=0)
    return 1


def nested(depth: int, leaf=0):
    obj = leaf
    for i in range(depth - 1):
        obj = [obj] if i % 2 else {"k": obj}
    return {"type": "x", "v": obj}


def decode_or_code(data: bytes):
    """Return the decoded map, or the ProtocolError code; let any other exception fail the test."""
    try:
        msg = P.unpack(data)
    except ProtocolError as e:
        assert e.code == ErrorCode.BAD_MESSAGE, e.code
        assert e.message
        return e.code
    assert isinstance(msg, dict) and isinstance(msg["type"], str)
    return msg


# --------------------------------------------------------------------------
# unpack


@FAST
@given(st.binary(max_size=300))
@example(b"")
@example(b"\xc1")  # never-used msgpack byte
@example(b"\xdd\xff\xff\xff\xff")  # array32 claiming 4G elements, no data
@example(b"\xdf\xff\xff\xff\xff")  # map32 claiming 4G entries
@example(b"\xdb\xff\xff\xff\xff")  # str32 claiming 4 GiB
@example(b"\xc6\xff\xff\xff\xff")  # bin32 claiming 4 GiB
@example(b"\xd4\x01\x00")  # fixext1
@example(b"\xd6\xff\x00\x00\x00\x00")  # timestamp ext
@example(b"\x81\xa4type\xa1x\x00")  # trailing data
def test_unpack_arbitrary_bytes_never_raises_anything_else(data):
    decode_or_code(data)


@FAST
@given(values)
def test_unpack_any_value_that_is_not_a_typed_map_is_bad_message(value):
    result = decode_or_code(P.pack(value))
    if not (isinstance(value, dict) and isinstance(value.get("type"), str)):
        assert result == ErrorCode.BAD_MESSAGE


@FAST
@given(messages)
def test_unpack_round_trips_every_well_formed_message(msg):
    result = decode_or_code(P.pack(msg))
    if reference_depth(msg) <= P.MAX_DEPTH:
        # NaN != NaN, so compare the re-encoded bytes instead of the objects.
        assert P.pack(result) == P.pack(msg)
    else:
        assert result == ErrorCode.BAD_MESSAGE


@FAST
@given(messages, st.data())
def test_unpack_corrupted_frames(msg, data):
    frame = bytearray(P.pack(msg))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    decode_or_code(bytes(frame[:cut]))
    decode_or_code(bytes(frame))


@pytest.mark.parametrize("depth", [2, P.MAX_DEPTH - 1, P.MAX_DEPTH, P.MAX_DEPTH + 1, 200, 5000])
def test_unpack_depth_limit_is_exact(depth):
    # Build deep frames by hand: msgpack.packb itself recurses.
    frame = b"\x82\xa4type\xa1x\xa1v" + b"\x91" * (depth - 2) + b"\x00"
    expected = 1 + (depth - 1)  # the top map, then depth-2 arrays, then the leaf
    result = decode_or_code(frame)
    if expected <= P.MAX_DEPTH:
        assert isinstance(result, dict)
        assert reference_depth(result) == expected
    else:
        assert result == ErrorCode.BAD_MESSAGE


@given(st.integers(1, 60))
@settings(max_examples=60, deadline=None)
def test_unpack_depth_matches_reference(depth):
    msg = nested(depth)
    result = decode_or_code(P.pack(msg))
    assert (result == ErrorCode.BAD_MESSAGE) == (reference_depth(msg) > P.MAX_DEPTH)


@pytest.mark.parametrize(
    "frame",
    [
        b"\x81\xa4type\xa2\xff\xfe",  # invalid UTF-8 in a value
        b"\x81\xa2\xc3\x28\xa1x",  # invalid UTF-8 in a key
        b"\x82\xa4type\xa1x\xa6prompt\xa3\xed\xa0\x80",  # a UTF-16 surrogate encoded in UTF-8
        b"\x81\x01\xa1x",  # integer map key
        b"\x81\x90\xa1x",  # array as a map key
    ],
)
def test_unpack_rejects_invalid_utf8_and_non_string_keys(frame):
    assert decode_or_code(frame) == ErrorCode.BAD_MESSAGE


def test_unpack_rejects_oversized_frame_before_decoding():
    frame = P.pack({"type": "x", "s": "a" * P.MAX_MESSAGE_BYTES})
    with pytest.raises(ProtocolError) as e:
        P.unpack(frame)
    assert e.value.code == ErrorCode.BAD_MESSAGE and "exceeds" in e.value.message


def test_unpack_rejects_arrays_and_maps_over_their_length_limits():
    long_array = b"\x82\xa4type\xa1x\xa1v\xdd" + struct.pack(">I", P.MAX_ARRAY_LEN + 1) + b"\x00" * (P.MAX_ARRAY_LEN + 1)
    assert decode_or_code(long_array) == ErrorCode.BAD_MESSAGE
    big_map = {"type": "x"} | {f"k{i}": 0 for i in range(P.MAX_MAP_LEN)}
    assert decode_or_code(P.pack(big_map)) == ErrorCode.BAD_MESSAGE
    # At the limits themselves it is accepted.
    ok = {"type": "x", "v": [0] * P.MAX_ARRAY_LEN} | {f"k{i}": 0 for i in range(P.MAX_MAP_LEN - 2)}
    assert isinstance(decode_or_code(P.pack(ok)), dict)


@pytest.mark.parametrize("empty", [b"\x90", b"\x80"])
def test_unpack_rejects_container_bombs(empty):
    # A 4 MiB frame of empty arrays/maps would expand ~70x and cost seconds of
    # the front's event loop; the container cap stops it early.
    n = P.MAX_CONTAINERS  # plus the top-level map and the list: two over
    frame = b"\x82\xa4type\xa1x\xa1v\xdd" + struct.pack(">I", n) + empty * n
    assert decode_or_code(frame) == ErrorCode.BAD_MESSAGE
    ok = b"\x82\xa4type\xa1x\xa1v\xdd" + struct.pack(">I", n - 2) + empty * (n - 2)
    assert isinstance(decode_or_code(ok), dict)


def test_salvage_id_finds_the_id_of_a_frame_unpack_refuses():
    for key in ("token_ids", "stop", "messages"):
        frame = P.pack({"type": "generate", key: [0] * (P.MAX_ARRAY_LEN + 1), "id": "r7"})
        with pytest.raises(ProtocolError):
            P.unpack(frame)
        assert P.salvage_id(frame) == "r7"
    assert P.salvage_id(P.pack({"type": "generate", "id": ""})) is None
    assert P.salvage_id(P.pack([{"id": "r7"}])) is None  # only a top-level map's id counts


@FAST
@given(data=st.binary(max_size=200))
def test_salvage_id_never_raises(data):
    rid = P.salvage_id(data)
    assert rid is None or (isinstance(rid, str) and 0 < len(rid) <= P.MAX_REQUEST_ID_LEN)


def test_unpack_accepts_a_large_legitimate_prompt():
    msg = {"type": "generate", "id": "r", "token_ids": list(range(200_000)), "max_tokens": 1}
    assert P.unpack(P.pack(msg)) == msg


# --------------------------------------------------------------------------
# parse_generate

REASON_CODES = {ErrorCode.INVALID_REQUEST, ErrorCode.LIMIT_EXCEEDED}
wire_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
field_values = values | wire_ints | st.floats() | st.lists(st.integers(-5, 2**64 - 1), max_size=5)
generate_maps = st.fixed_dictionaries(
    {"type": st.just("generate")},
    optional={
        name: field_values
        for name in ("id", "prompt", "messages", "token_ids", "max_tokens", "temperature", "top_p", "top_k",
                     "min_p", "seed", "stop", "logprobs", "n", "frequency_penalty")
    },
)


def check_request(req: P.GenerateRequest, limit: int) -> None:
    assert isinstance(req.id, str) and 0 < len(req.id) <= P.MAX_REQUEST_ID_LEN
    assert sum(x is not None for x in (req.prompt, req.messages, req.token_ids)) == 1
    if req.prompt is not None:
        assert isinstance(req.prompt, str) and req.prompt
    if req.messages is not None:
        assert req.messages and all(set(m) == {"role", "content"} for m in req.messages)
        assert all(isinstance(m["role"], str) and isinstance(m["content"], str) for m in req.messages)
    if req.token_ids is not None:
        assert req.token_ids and all(type(t) is int and t >= 0 for t in req.token_ids)
    s = req.sampling
    assert type(s.max_tokens) is int and 1 <= s.max_tokens <= limit
    assert type(s.top_k) is int and 0 <= s.top_k
    for x, hi in ((s.temperature, 100.0), (s.top_p, 1.0), (s.min_p, 1.0)):
        assert type(x) is float and math.isfinite(x) and 0.0 <= x <= hi
    assert s.seed is None or (type(s.seed) is int and 0 <= s.seed < 2**63)
    assert isinstance(s.stop, list) and len(s.stop) <= P.MAX_STOP_STRINGS
    assert all(isinstance(x, str) and 0 < len(x) <= P.MAX_STOP_STRING_LEN for x in s.stop)


@settings(max_examples=250, deadline=None)
@given(generate_maps, st.integers(1, 1 << 20))
def test_parse_generate_accepts_valid_or_raises_a_stable_code(msg, limit):
    try:
        req = P.parse_generate(msg, max_tokens_limit=limit)
    except ProtocolError as e:
        assert e.code in REASON_CODES and e.message
        return
    check_request(req, limit)


@FAST
@given(generate_maps, st.integers(1, 1 << 20))
def test_parse_generate_after_the_wire(msg, limit):
    # The daemon always sees the decoded frame, never the sender's objects.
    decoded = decode_or_code(P.pack(msg))
    if decoded == ErrorCode.BAD_MESSAGE:
        return
    try:
        check_request(P.parse_generate(decoded, max_tokens_limit=limit), limit)
    except ProtocolError as e:
        assert e.code in REASON_CODES


@pytest.mark.parametrize(
    "max_tokens, code",
    [
        (0, ErrorCode.INVALID_REQUEST),
        (-1, ErrorCode.INVALID_REQUEST),
        (-(2**63), ErrorCode.INVALID_REQUEST),
        (1.5, ErrorCode.INVALID_REQUEST),
        (float("inf"), ErrorCode.INVALID_REQUEST),
        (float("nan"), ErrorCode.INVALID_REQUEST),
        (True, ErrorCode.INVALID_REQUEST),
        ("10", ErrorCode.INVALID_REQUEST),
        (1001, ErrorCode.LIMIT_EXCEEDED),
        (2**64 - 1, ErrorCode.LIMIT_EXCEEDED),
        (1e300, ErrorCode.LIMIT_EXCEEDED),
    ],
)
def test_parse_generate_max_tokens_bounds(max_tokens, code):
    msg = P.unpack(P.pack({"type": "generate", "id": "a", "prompt": "hi", "max_tokens": max_tokens}))
    with pytest.raises(ProtocolError) as e:
        P.parse_generate(msg, max_tokens_limit=1000)
    assert e.value.code == code


def test_parse_generate_ignores_unknown_sampling_fields():
    # (logit_bias and the penalties are protocol fields now, validated: tests/test_penalties.py)
    msg = {"type": "generate", "id": "a", "prompt": "hi", "max_tokens": 3, "typical_p": {"1": 5},
           "mirostat_penalty": "x", "future_field": [[[1]]]}
    req = P.parse_generate(msg)
    assert req.sampling.max_tokens == 3 and not {"typical_p", "mirostat_penalty", "future_field"} & set(req.to_dict())


@pytest.mark.parametrize("stop", [0, False, {}, [1], [""], ["a" * (P.MAX_STOP_STRING_LEN + 1)], ["s"] * (P.MAX_STOP_STRINGS + 1)])
def test_parse_generate_rejects_bad_stop(stop):
    with pytest.raises(ProtocolError) as e:
        P.parse_generate({"type": "generate", "id": "a", "prompt": "hi", "stop": stop})
    assert e.value.code == ErrorCode.INVALID_REQUEST


@pytest.mark.parametrize("rid", [None, "", True, 1.0, [], {}, "x" * (P.MAX_REQUEST_ID_LEN + 1), b"bytes"])
def test_request_id_rejects_non_ids(rid):
    with pytest.raises(ProtocolError) as e:
        P.request_id({"id": rid})
    assert e.value.code == ErrorCode.INVALID_REQUEST


@FAST
@given(values)
def test_check_version_never_raises_anything_else(version):
    try:
        P.check_version({"type": "hello", "version": version})
    except ProtocolError as e:
        assert e.code == ErrorCode.VERSION_MISMATCH
    else:
        assert version[0] == P.PROTOCOL_VERSION[0]
