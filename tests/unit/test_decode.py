"""The hot-path decoder (msgspec) decides every record exactly as the reference (pydantic).

The reference is :func:`promptd.events.decode_event`: a record it accepts must become the
same row, a record it rejects must get the same reason and detail. Both are run over a
hand-written hostile corpus and over property-based corpora built with hypothesis.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promptd.daemon.decode import MAX_FAST_DEPTH, RowDecoder
from promptd.events import (
    MAX_ATTRIBUTES,
    MAX_CAPTURE_BYTES,
    MAX_ID_CHARS,
    MAX_NAME_CHARS,
    FeedbackEvent,
    MetricEvent,
    Rejection,
    decode_event,
)
from promptd.storage.rows import (
    METRIC_WIDTH,
    FeedbackRow,
    FeedbackView,
    MetricRow,
    MetricView,
    feedback_row,
    metric_row,
)
from tests.integration.test_ingest import MALFORMED

Outcome = MetricRow | FeedbackRow | Rejection

METRIC: dict[str, Any] = {
    "event_id": "e-1",
    "type": "metric",
    "ts": 1_795_000_000.25,
    "prompt": "summarization",
    "variant": "v3",
    "model": "gpt-4o-mini",
    "request_id": "r-1",
    "unit_id": "user-7",
    "latency_ms": 812.5,
    "success": True,
    "quality": 0.5,
    "tokens_in": 10,
    "tokens_out": 20,
    "cost_usd": 0.001,
    "input_chars": 1234,
}
FEEDBACK: dict[str, Any] = {
    "event_id": "e-2",
    "type": "feedback",
    "ts": "2026-11-22T10:00:00Z",
    "prompt": "summarization",
    "variant": "v3",
    "request_id": "r-1",
    "score": 0.75,
    "kind": "thumbs",
}

#: Feedback on a whole episode: no request, prompt or variant needed.
EPISODE_FEEDBACK: dict[str, Any] = {
    "event_id": "e-3",
    "type": "feedback",
    "ts": 1_795_000_100.0,
    "episode_id": "ep-1",
    "score": 0.5,
}


#: ``source`` values at and around the edges of the ``eval:<name>`` form.
SOURCES: list[Any] = [
    "eval:judge",
    "eval:a",
    "eval:A-b_c.9",
    "eval:" + "x" * 64,
    "eval:" + "x" * 65,
    "eval:",
    "eval:-x",
    "eval:x\n",
    "eval:x\n\n",
    "\neval:x",
    "eval:x y",
    "eval:é",
    "eval:\u0661",
    "EVAL:x",
    "human",
    "",
    None,
    7,
    ["eval:x"],
]


def reference(raw: bytes | None, max_bytes: int = 256 * 1024) -> Outcome:
    """What the pydantic decoder decides, as a row or a rejection."""
    result = decode_event(raw, max_bytes=max_bytes)
    if isinstance(result, MetricEvent):
        return metric_row(result)
    if isinstance(result, FeedbackEvent):
        return feedback_row(result)
    return result


def _same_value(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        # repr tells 0.0 from -0.0; NaN cannot pass either decoder.
        return repr(a) == repr(b) and not math.isnan(a)
    return bool(a == b)


def assert_same(raw: bytes | None, decoder: RowDecoder | None = None) -> Outcome:
    """Both decoders agree on ``raw``: same row (value and type of every field) or the
    same rejection."""
    decoder = decoder or RowDecoder()
    fast, ref = decoder.decode(raw), reference(raw, decoder.max_bytes)
    assert type(fast) is type(ref), (raw, fast, ref)
    if isinstance(ref, Rejection):
        assert fast == ref, raw
    else:
        assert type(fast) is tuple
        assert len(fast) == len(ref)
        names = MetricView._fields if len(ref) == METRIC_WIDTH else FeedbackView._fields
        bad = [name for name, x, y in zip(names, fast, ref, strict=True) if not _same_value(x, y)]
        assert not bad, (raw, bad, fast, ref)
    return fast


def _raw(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


_BASE = (
    b'"event_id":"e","ts":1795000000,"prompt":"p","variant":"v","model":"m",'
    b'"request_id":"r","latency_ms":5,"success":true'
)

HOSTILE: list[bytes | None] = [
    None,
    b"",
    b" ",
    b"{not json",
    b'"a string"',
    b"[1]",
    b"null",
    b"123",
    b"{}",
    b'{"type":"metric"}',
    b"{" + b" " * 300_000 + b"}",
    b"\xef\xbb\xbf{" + _BASE + b',"type":"metric"}',
    b"{" + _BASE + b',"type":"metric"} x',
    b"{" + _BASE + b',"type":"metric"}\n',
    b"{" + _BASE + b',"type":"metric","type":"feedback"}',
    b"{" + _BASE + b',"type":"metric","type":"metric"}',
    b"{" + _BASE + b',"type":"metric","prompt":"q"}',
    b"{" + _BASE + b',"type":"metric","prompt":5}',
    b'{"prompt":5,' + _BASE + b',"type":"metric"}',
    b"{" + _BASE + b',"type":null}',
    b"{" + _BASE + b',"type":1}',
    b"{" + _BASE + b',"type":"Metric"}',
    b"{" + _BASE + b',"type":"metric","schema":true}',
    b"{" + _BASE + b',"type":"metric","schema":1.0}',
    b"{" + _BASE + b',"type":"metric","schema":"1"}',
    b"{" + _BASE + b',"type":"metric","schema":2}',
    b"{" + _BASE + b',"type":"metric","schema_version":1}',
    b"{" + _BASE + b',"type":"metric","latency_ms":NaN}',
    b"{" + _BASE + b',"type":"metric","latency_ms":Infinity}',
    b"{" + _BASE + b',"type":"metric","latency_ms":1e400}',
    b"{" + _BASE + b',"type":"metric","latency_ms":-0}',
    b"{" + _BASE + b',"type":"metric","latency_ms":-0.0}',
    b"{" + _BASE + b',"type":"metric","latency_ms":86400000}',
    b"{" + _BASE + b',"type":"metric","latency_ms":86400000.00000001}',
    b"{" + _BASE + b',"type":"metric","latency_ms":86400000.0000001}',
    b"{" + _BASE + b',"type":"metric","latency_ms":1E2}',
    b"{" + _BASE + b',"type":"metric","latency_ms":01}',
    b"{" + _BASE + b',"type":"metric","latency_ms":.5}',
    b"{" + _BASE + b',"type":"metric","latency_ms":+5}',
    b"{" + _BASE + b',"type":"metric","quality":1}',
    b"{" + _BASE + b',"type":"metric","quality":true}',
    b"{" + _BASE + b',"type":"metric","quality":1.0000000000000002}',
    b"{" + _BASE + b',"type":"metric","tokens_in":1e3}',
    b"{" + _BASE + b',"type":"metric","tokens_in":1000.0}',
    b"{" + _BASE + b',"type":"metric","tokens_in":1000000000}',
    b"{" + _BASE + b',"type":"metric","tokens_in":1000000001}',
    b"{" + _BASE + b',"type":"metric","tokens_in":-0}',
    b"{" + _BASE + b',"type":"metric","tokens_in":99999999999999999999999}',
    b"{" + _BASE + b',"type":"metric","cost_usd":1000000}',
    b"{" + _BASE + b',"type":"metric","input_chars":-1}',
    b"{" + _BASE + b',"type":"metric","input_chars":12.5}',
    b"{" + _BASE + b',"type":"metric","success":1}',
    b"{" + _BASE + b',"type":"metric","unit_id":null}',
    b"{" + _BASE + b',"type":"metric","unit_id":""}',
    b"{" + _BASE + b',"type":"metric","error":""}',
    b"{" + _BASE + b',"type":"metric","error":null}',
    b"{" + _BASE.replace(b"1795000000", b"946684800") + b',"type":"metric"}',
    b"{" + _BASE.replace(b"1795000000", b"946684799.9999999") + b',"type":"metric"}',
    b"{" + _BASE.replace(b"1795000000", b"7258118400") + b',"type":"metric"}',
    b"{" + _BASE.replace(b"1795000000", b"7258118399.999999") + b',"type":"metric"}',
    b"{" + _BASE.replace(b"1795000000", b"1795000000000000000000000") + b',"type":"metric"}',
    b"{" + _BASE.replace(b"1795000000", b'"2026-11-22T10:00:00+02:00"') + b',"type":"metric"}',
    b"{" + _BASE.replace(b"1795000000", b'"2026-11-22T10:00:00.123456z"') + b',"type":"metric"}',
    b"{" + _BASE.replace(b"1795000000", b'"2026-11-22 10:00:00Z"') + b',"type":"metric"}',
    b"{" + _BASE.replace(b"1795000000", b'"20261122T100000Z"') + b',"type":"metric"}',
    b"{" + _BASE.replace(b"1795000000", b'" 2026-11-22T10:00:00Z "') + b',"type":"metric"}',
    b"{" + _BASE.replace(b"1795000000", b'"2026-11-22"') + b',"type":"metric"}',
    b"{" + _BASE.replace(b"1795000000", b'"1795000000"') + b',"type":"metric"}',
    b"{" + _BASE.replace(b"1795000000", b'"1899-01-01T00:00:00Z"') + b',"type":"metric"}',
    b"{" + _BASE.replace(b"1795000000", b"true") + b',"type":"metric"}',
    b"{" + _BASE.replace(b"1795000000", b"null") + b',"type":"metric"}',
    b"{" + _BASE.replace(b'"p"', b'"\\ud800"') + b',"type":"metric"}',
    b"{" + _BASE.replace(b'"p"', b'"\\udc00"') + b',"type":"metric"}',
    b"{" + _BASE.replace(b'"p"', b'"\\ud83d\\ude00"') + b',"type":"metric"}',
    b"{" + _BASE.replace(b'"p"', b'"\xed\xa0\x80"') + b',"type":"metric"}',
    b"{" + _BASE.replace(b'"p"', b'"\xc0\xaf"') + b',"type":"metric"}',
    b"{" + _BASE.replace(b'"p"', b'"a\xffb"') + b',"type":"metric"}',
    b"{" + _BASE.replace(b'"p"', b'"a\nb"') + b',"type":"metric"}',
    b"{" + _BASE.replace(b'"p"', b'"a\\u0000b"') + b',"type":"metric"}',
    b"{" + _BASE.replace(b'"p"', b'"\\u00e9t\xc3\xa9"') + b',"type":"metric"}',
    _raw({**METRIC, "prompt": "é" * MAX_NAME_CHARS}),
    _raw({**METRIC, "variant": "x" * (MAX_NAME_CHARS + 1)}),
    json.dumps({**METRIC, "event_id": "😀" * MAX_ID_CHARS}, ensure_ascii=False).encode(),
    json.dumps({**METRIC, "event_id": "😀" * (MAX_ID_CHARS + 1)}, ensure_ascii=False).encode(),
    b"{" + _BASE + b',"type":"metric","input":{"a":1e400}}',
    b"{" + _BASE + b',"type":"metric","input":{"a":123456789012345678901234567890}}',
    b"{" + _BASE + b',"type":"metric","input":{"a":1,"a":2,"b":[-0.0,-0,1E-400]}}',
    b"{" + _BASE + b',"type":"metric","input":[1]}',
    b"{" + _BASE + b',"type":"metric","input":5}',
    b"{" + _BASE + b',"type":"metric","input":""}',
    b"{" + _BASE + b',"type":"metric","input":{}}',
    b"{" + _BASE + b',"type":"metric","attributes":{}}',
    b"{" + _BASE + b',"type":"metric","attributes":{"a":null}}',
    b"{" + _BASE + b',"type":"metric","attributes":{"":"x"}}',
    b"{" + _BASE + b',"type":"metric","attributes":{"a":"1","a":"2"}}',
    b"{"
    + _BASE
    + b',"type":"metric","attributes":{'
    + b",".join(b'"k%d":"v"' % (i % MAX_ATTRIBUTES) for i in range(MAX_ATTRIBUTES + 2))
    + b"}}",
    b"{"
    + _BASE
    + b',"type":"metric","attributes":{'
    + b",".join(b'"k%d":"v"' % i for i in range(MAX_ATTRIBUTES + 1))
    + b"}}",
    _raw({**METRIC, "input": "x" * (MAX_CAPTURE_BYTES - 2)}),
    _raw({**METRIC, "input": "x" * (MAX_CAPTURE_BYTES - 1)}),
    _raw({**METRIC, "input": "é" * (MAX_CAPTURE_BYTES // 2 - 1)}),
    json.dumps({**METRIC, "input": "é" * (MAX_CAPTURE_BYTES // 2)}, ensure_ascii=False).encode(),
    _raw({**METRIC, "input": {"q": "\u2028 \x00 \ufeff"}, "output": "", "attributes": {"a": ""}}),
    _raw({**METRIC, "input": {"k": "v" * (MAX_CAPTURE_BYTES - 10)}}),
    _raw({**METRIC, "input": {"k": "v" * (MAX_CAPTURE_BYTES - 7)}}),
    _raw({**FEEDBACK, "correction": {"expected": "x"}, "comment": "c", "model": "m"}),
    _raw({**FEEDBACK, "correction": "x" * MAX_CAPTURE_BYTES}),
    _raw({k: v for k, v in FEEDBACK.items() if k != "kind"}),
    _raw({**FEEDBACK, "kind": ""}),
    _raw({**FEEDBACK, "model": None}),
    _raw({**FEEDBACK, "score": 1}),
    _raw({**FEEDBACK, "latency_ms": 5}),
    _raw(METRIC),
    _raw(FEEDBACK),
    # Episodes: ids on calls, feedback on a call, on an episode, on both, on neither.
    _raw({**METRIC, "episode_id": "ep-1"}),
    _raw({**METRIC, "episode_id": "ep-1", "input": {"q": "x"}}),
    _raw({**METRIC, "episode_id": ""}),
    _raw({**METRIC, "episode_id": None}),
    _raw({**METRIC, "episode_id": 7}),
    _raw({**METRIC, "episode_id": "e" * MAX_ID_CHARS}),
    _raw({**METRIC, "episode_id": "e" * (MAX_ID_CHARS + 1)}),
    _raw(EPISODE_FEEDBACK),
    _raw({**EPISODE_FEEDBACK, "prompt": "answer", "variant": "v2", "model": "m"}),
    _raw({**EPISODE_FEEDBACK, "prompt": "answer"}),
    _raw({**EPISODE_FEEDBACK, "correction": {"answer": "42"}, "comment": "wrong"}),
    _raw({**EPISODE_FEEDBACK, "request_id": None}),
    _raw({**EPISODE_FEEDBACK, "episode_id": None}),
    _raw({**EPISODE_FEEDBACK, "episode_id": ""}),
    _raw({**EPISODE_FEEDBACK, "episode_id": "e" * (MAX_ID_CHARS + 1)}),
    _raw({**FEEDBACK, "episode_id": "ep-1"}),
    _raw({**FEEDBACK, "episode_id": "ep-1", "prompt": None}),
    _raw({k: v for k, v in FEEDBACK.items() if k != "prompt"}),
    _raw({k: v for k, v in FEEDBACK.items() if k != "variant"}),
    _raw({k: v for k, v in FEEDBACK.items() if k != "request_id"}),
    _raw({**FEEDBACK, "request_id": None, "episode_id": None}),
    _raw({**FEEDBACK, "request_id": ""}),
    # An evaluator's result names its source: eval:<name>, nothing else.
    *(_raw({**FEEDBACK, "source": s}) for s in SOURCES),
    _raw({**EPISODE_FEEDBACK, "source": "eval:judge"}),
    *(_raw({**METRIC, "input": _nested(d)}) for d in (1, 2, 60, 62, 63, 64, 65, 190, 198, 199)),
    *(_raw({**METRIC, "input": _nested(d)}) for d in (200, 201, 250)),
    *(raw for raw, _ in MALFORMED),
]


@pytest.mark.parametrize("raw", HOSTILE)
def test_hostile_corpus_decided_like_the_reference(raw: bytes | None) -> None:
    """Every record of the hostile corpus gets the reference decoder's row or rejection."""
    assert_same(raw)


def test_size_cap_decided_like_the_reference() -> None:
    """The configurable record size cap gives the reference's ``oversized`` rejection."""
    decoder = RowDecoder(max_bytes=50)
    result = assert_same(_raw(METRIC), decoder)
    assert isinstance(result, Rejection)
    assert result.reason == "oversized"


def test_valid_events_take_the_fast_path() -> None:
    """Valid events (captures included) never reach the reference decoder."""
    decoder = RowDecoder()
    corpus = [
        _raw({**METRIC, "event_id": f"m{i}", "input": {"q": str(i)}} if i % 3 else METRIC)
        for i in range(50)
    ]
    corpus += [_raw({**FEEDBACK, "event_id": f"f{i}"}) for i in range(50)]
    corpus += [_raw({**METRIC, "event_id": f"me{i}", "episode_id": f"ep{i}"}) for i in range(9)]
    corpus += [_raw({**EPISODE_FEEDBACK, "event_id": f"fe{i}"}) for i in range(9)]
    corpus += [_raw({**FEEDBACK, "event_id": f"fb{i}", "episode_id": "ep"}) for i in range(9)]
    corpus += [_raw({**FEEDBACK, "event_id": f"fs{i}", "source": f"eval:j-{i}"}) for i in range(9)]
    for raw in corpus:
        assert not isinstance(assert_same(raw, decoder), Rejection)
    assert decoder.fallbacks == 0


def test_deep_captures_go_to_the_reference() -> None:
    """A payload nested past the fast depth is decided by the reference decoder."""
    decoder = RowDecoder()
    assert_same(_raw({**METRIC, "input": _nested(MAX_FAST_DEPTH - 1)}), decoder)
    assert decoder.fallbacks == 0
    assert_same(_raw({**METRIC, "input": _nested(MAX_FAST_DEPTH)}), decoder)
    assert decoder.fallbacks == 1


# ---- property-based corpora ---------------------------------------------------------------


class Num:
    """A number spelled as given (JSON allows many spellings of one value)."""

    def __init__(self, text: str) -> None:
        self.text = text


class Pairs:
    """A JSON object as key/value pairs: keys may repeat, as on the wire they can."""

    def __init__(self, items: list[tuple[str, Any]]) -> None:
        self.items = items


def dump(value: Any, ascii_only: bool) -> str:
    """JSON text of ``value`` with :class:`Num` and :class:`Pairs` spelled out."""
    if isinstance(value, Num):
        return value.text
    if isinstance(value, Pairs):
        inner = ",".join(
            f"{json.dumps(k, ensure_ascii=ascii_only)}:{dump(v, ascii_only)}"
            for k, v in value.items
        )
        return "{" + inner + "}"
    if isinstance(value, dict):
        return dump(Pairs(list(value.items())), ascii_only)
    if isinstance(value, list):
        return "[" + ",".join(dump(v, ascii_only) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii_only)


NUMBER_SPELLINGS = [
    "0", "-0", "0.0", "-0.0", "1", "1.0", "1e0", "1E+0", "0.1e1", "10e-1", "1e-400", "1e400",
    "-1e400", "1.0000000000000002", "0.9999999999999999", "123456789012345678901234567890",
    "9007199254740993", "86400000", "86400000.000000015", "946684800", "946684799.99999999",
    "7258118400", "7258118399.9999995", "1000000000", "1000000001", "1e9", "01", ".5", "+1",
    "-", "1.", "1e", "NaN", "Infinity", "-Infinity", "0x10", "1_000",
]  # fmt: skip

texts = st.text(
    alphabet=st.characters(codec=None, exclude_categories=()), max_size=12
) | st.sampled_from(["", "a", "x" * 64, "x" * 65, "x" * 128, "x" * 129, "y" * 200, "y" * 201])
# Mostly valid names, sometimes anything (texts).
names = st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12) | texts
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
    | st.sampled_from(NUMBER_SPELLINGS).map(Num)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(texts, inner, max_size=4)
        | st.lists(st.tuples(st.sampled_from(["a", "b", "type"]), inner), max_size=4).map(Pairs)
    ),
    max_leaves=12,
)


def edges(lo: float, hi: float) -> st.SearchStrategy[float]:
    """The bounds of a range and their nearest neighbours on both sides."""
    return st.sampled_from(
        [
            lo,
            hi,
            math.nextafter(lo, -math.inf),
            math.nextafter(lo, math.inf),
            math.nextafter(hi, -math.inf),
            math.nextafter(hi, math.inf),
            -0.0,
        ]
    )


timestamps = (
    edges(946_684_800.0, 7_258_118_400.0)
    | st.floats(min_value=9e8, max_value=7.3e9)
    | st.integers(min_value=9 * 10**8, max_value=73 * 10**8)
    | st.datetimes(timezones=st.timezones()).map(lambda d: d.isoformat())
    | st.datetimes(timezones=st.timezones() | st.none()).map(lambda d: d.isoformat(" "))
    | st.sampled_from(
        ["2026-11-22T10:00:00Z", "2026-11-22T10:00:00z", "2026-11-22 10:00:00+01:00", "x", ""]
    )
)
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "type": st.sampled_from(["metric", "feedback", "Metric", "trace"]),
    "ts": timestamps,
    # Mostly in range, with the edges and the outside often enough to matter.
    "latency_ms": st.floats(0, 9e7)
    | st.floats(0, 1e4)
    | st.integers(-1, 9 * 10**7)
    | edges(0.0, 86_400_000.0),
    "quality": st.floats(0, 1) | st.floats(-0.5, 1.5) | st.integers(-1, 2) | edges(0.0, 1.0),
    "score": st.floats(0, 1) | st.floats(-0.5, 1.5) | st.integers(-1, 2) | edges(0.0, 1.0),
    "tokens_in": st.integers(-2, 10**9 + 2) | st.integers(0, 10**4),
    "tokens_out": st.integers(-2, 10**9 + 2) | st.integers(0, 10**4),
    "input_chars": st.integers(-2, 10**9 + 2) | st.integers(0, 10**4),
    "cost_usd": st.floats(0, 1) | st.floats(-1, 2e6) | edges(0.0, 1e6),
    "success": st.booleans(),
    "attributes": st.dictionaries(names, names, max_size=MAX_ATTRIBUTES + 2),
    "input": st.dictionaries(texts, json_values, max_size=4) | texts,
    "output": names,
    "correction": st.dictionaries(texts, json_values, max_size=3) | texts,
    "schema": st.sampled_from([1, 2, Num("1.0"), True, "1"]),
    "source": st.sampled_from(SOURCES) | names.map(lambda n: "eval:" + n),
}
OPTIONAL = {
    "metric": ["unit_id", "episode_id", "error", "quality", "tokens_in", "tokens_out",
               "cost_usd", "input_chars", "input", "output", "attributes"],
    "feedback": ["model", "kind", "comment", "correction", "episode_id", "request_id",
                 "prompt", "variant", "source"],
}  # fmt: skip


def _sometimes(draw: Callable[..., Any], one_in: int) -> bool:
    return bool(draw(st.integers(0, one_in - 1)) == 0)


@st.composite
def records(draw: Callable[..., Any]) -> bytes:
    """A record close to a valid event: fields set to edge values, sometimes replaced by
    any JSON, dropped, added or repeated, and sometimes its bytes damaged (about half of
    the records are valid events)."""
    kind = draw(st.sampled_from(["metric", "feedback", "episode_feedback"]))
    body = dict({"metric": METRIC, "feedback": FEEDBACK}.get(kind, EPISODE_FEEDBACK))
    kind = "metric" if kind == "metric" else "feedback"
    if _sometimes(draw, 8):
        body["schema"] = draw(FIELD_VALUES["schema"])
    for name in draw(st.lists(st.sampled_from(OPTIONAL[kind]), max_size=4, unique=True)):
        body[name] = draw(FIELD_VALUES.get(name, names))
    fields = sorted(body) if _sometimes(draw, 8) else sorted(set(body) - {"type", "schema"})
    for name in draw(st.lists(st.sampled_from(fields), max_size=3, unique=True)):
        strategy = json_values if _sometimes(draw, 4) else FIELD_VALUES.get(name, names)
        body[name] = draw(strategy)
    pairs = list(body.items())
    if _sometimes(draw, 6):
        dropped = draw(st.sampled_from(sorted(body)))
        pairs = [p for p in pairs if p[0] != dropped]
    if _sometimes(draw, 6):
        extra = st.sampled_from(["type", "prompt", "schema", "schema_version", "surprise"])
        pairs.append((draw(extra), draw(json_values)))
    pairs = draw(st.permutations(pairs))
    ascii_only = draw(st.booleans())
    raw = dump(Pairs(pairs), ascii_only).encode("utf-8", "surrogatepass")
    if _sometimes(draw, 10):
        at = draw(st.integers(0, len(raw)))
        junk = draw(st.sampled_from([b"", b"{", b"}", b'"', b",", b"\\", b"\x00", b"\xff", b" "]))
        raw = raw[:at] + junk + raw[at + draw(st.integers(0, 2)) :]
    return raw


@settings(
    max_examples=3000,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(records())
def test_property_corpus_decided_like_the_reference(raw: bytes) -> None:
    """Near-valid records, mutated at random, get the reference decoder's outcome."""
    assert_same(raw)


@settings(max_examples=500, deadline=None, derandomize=True)
@given(json_values.map(lambda v: dump(v, ascii_only=False).encode("utf-8", "surrogatepass")))
def test_arbitrary_json_decided_like_the_reference(raw: bytes) -> None:
    """Arbitrary JSON documents (mostly not events) get the reference decoder's outcome."""
    assert_same(raw)
