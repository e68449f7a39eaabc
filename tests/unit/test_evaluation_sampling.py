"""Sampling of calls by evaluators: the documented hash, the rate, independence between
evaluators, and the fast path agreeing with the one-call decision."""

from __future__ import annotations

import hashlib
import random
import uuid
import zlib

import pytest
from scipy import stats

from promptd.evaluation.config import EvaluationSettings
from promptd.evaluation.sampling import Sampler, is_sampled, multiplier, request_hash
from promptd.storage.rows import MetricRow


def _reference(name: str, rate: float, request_id: str) -> bool:
    """The contract of the module docstring, written out with the standard library."""
    h = zlib.crc32(request_id.encode("utf-8"))
    a = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:4], "big") | 1
    return (a * h) % 2**32 < round(rate * 2**32)


def _binomial_ok(k: int, n: int, p: float) -> bool:
    return bool(stats.binomtest(k, n, p).pvalue > 1e-4)


def test_the_decision_follows_the_documented_contract() -> None:
    """CRC-32 of the id times the name's odd SHA-256 multiplier, below the rate's share."""
    rng = random.Random(1)
    for _ in range(2000):
        rid = "".join(rng.choice("abcdef0123456789-é") for _ in range(rng.randrange(1, 40)))
        rate = rng.choice([0.01, 0.1, 0.5, 0.999])
        assert is_sampled("judge", rate, rid) == _reference("judge", rate, rid)
    assert multiplier("x") % 2 == 1
    assert request_hash("r-1") == zlib.crc32(b"r-1")


@pytest.mark.parametrize("rate", [0.01, 0.1, 0.5])
@pytest.mark.parametrize("ids", ["uuid", "sequential"])
def test_each_evaluator_samples_its_rate(rate: float, ids: str) -> None:
    """Random and sequential request ids are sampled at the configured rate."""
    rng = random.Random(7)
    n = 40_000
    if ids == "uuid":
        rids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n)]
    else:
        rids = [f"req-{i}" for i in range(n)]
    for name in ("helpful", "valid_json"):
        k = sum(is_sampled(name, rate, r) for r in rids)
        assert _binomial_ok(k, n, rate), (name, k / n)


def test_two_evaluators_sample_close_to_independently() -> None:
    """The share sampled by both is the product of the rates (no tie between names,
    which CRC-32 salted with the name alone would give)."""
    rids = [f"req-{i:08d}" for i in range(100_000)]
    a = {r for r in rids if is_sampled("judge", 0.1, r)}
    b = {r for r in rids if is_sampled("valid_json", 0.1, r)}
    assert _binomial_ok(len(a & b), len(rids), 0.01), len(a & b) / len(rids)
    same_rate_salted = {
        r for r in rids if zlib.crc32(r.encode(), zlib.crc32(b"judge")) < 2**32 // 10
    }
    other_salted = {r for r in rids if zlib.crc32(r.encode(), zlib.crc32(b"valid")) < 2**32 // 10}
    # What the multiplication is for: salting CRC-32 alone ties the samples together.
    assert not _binomial_ok(len(same_rate_salted & other_salted), len(rids), 0.01)


def _row(prompt: str, rid: str, variant: str = "v1") -> MetricRow:
    return ("e", 1.0, prompt, variant, "m", rid, None, 1.0, True, None, None, None, None, None,
            None, None, '"out"', None)  # fmt: skip


def test_the_batch_path_decides_as_the_single_call() -> None:
    """``Sampler.sample`` takes exactly the calls each selecting evaluator samples, and
    nothing of prompts no evaluator selects; the variant plays no part."""
    settings = EvaluationSettings.model_validate(
        {
            "evaluators": [
                {"name": "a", "type": "length", "max_chars": 10, "sample_rate": 0.3},
                {
                    "name": "b",
                    "type": "regex",
                    "pattern": "x",
                    "prompts": ["sup*"],
                    "sample_rate": 0.5,
                },
            ]
        }
    )
    sampler = Sampler(settings)
    rows = [_row(p, f"r{i}") for i in range(3000) for p in ("support", "other")]
    taken = {(row[2], row[5]): tuple(e.name for e in evs) for row, evs in sampler.sample(rows)}
    for row in rows:
        prompt, rid = row[2], row[5]
        expected = tuple(
            name
            for name, rate, selects in (("a", 0.3, True), ("b", 0.5, prompt == "support"))
            if selects and is_sampled(name, rate, rid)
        )
        assert taken.get((prompt, rid), ()) == expected
        assert tuple(e.name for e in sampler.sampled_by(prompt, rid)) == expected
    other = [_row("other", f"r{i}") for i in range(10)]
    variants = [_row("other", f"r{i}", "v2") for i in range(10)]
    assert [r[5] for r, _ in sampler.sample(other)] == [r[5] for r, _ in sampler.sample(variants)]
