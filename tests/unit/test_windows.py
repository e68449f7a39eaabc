"""Sliding windows: bucket ranges, lateness, rollups, folding and quantile accuracy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from promptd.events import FeedbackEvent, MetricEvent
from promptd.monitoring.eventtime import Admission
from promptd.monitoring.histogram import DenseHistogram, LogBuckets
from promptd.monitoring.windows import SeriesKey, Tier, WindowConfig, WindowStore

T0 = 1_800_000_000.0  # a multiple of every default bucket width


def small_config(lateness: float = 10.0) -> WindowConfig:
    """Two tiers: 10 s buckets for 60 s, 60 s buckets for 600 s."""
    return WindowConfig(
        tiers=(
            Tier(bucket_seconds=10, retention_seconds=60),
            Tier(bucket_seconds=60, retention_seconds=600),
        ),
        lateness_seconds=lateness,
    )


def metric(
    ts: float, prompt: str = "p", variant: str = "v1", model: str = "m", **kw: object
) -> MetricEvent:
    """A metric event with sensible defaults."""
    fields: dict[str, object] = {
        "event_id": f"e{ts}-{prompt}-{variant}-{model}",
        "ts": ts,
        "prompt": prompt,
        "variant": variant,
        "model": model,
        "request_id": "r",
        "latency_ms": 100.0,
        "success": True,
    }
    fields.update(kw)
    return MetricEvent.model_validate(fields)


def feedback(ts: float, score: float, prompt: str = "p", variant: str = "v1") -> FeedbackEvent:
    """A feedback event."""
    return FeedbackEvent(
        event_id=f"f{ts}-{score}",
        ts=ts,
        prompt=prompt,
        variant=variant,
        request_id="r",
        score=score,
    )


@pytest.mark.parametrize(
    ("ts", "now", "counted"),
    [
        (T0, T0, True),  # start of the current bucket is inside [start, end)
        (T0 + 9.999, T0 + 5, True),  # same 10 s bucket as now, even if after now
        (T0 - 50, T0, True),  # oldest bucket of a 60 s window: [T0-50, T0+10)
        (T0 - 50.001, T0, False),  # just before the window start: half-open, excluded
        (T0 + 10, T0 + 9.999, False),  # next bucket starts at T0+10: excluded
    ],
)
def test_half_open_bucket_ranges(ts: float, now: float, counted: bool) -> None:
    """An event counts in a window iff its ts is in [start, end) of the window's buckets."""
    store = WindowStore(small_config(lateness=100))
    store.add_metric(metric(ts))
    stats = store.stats("p", window_seconds=60, now=now)
    assert stats.request_count == (1 if counted else 0)
    assert stats.end - stats.start == 60
    assert stats.start <= now < stats.end


def test_late_event_within_tolerance_lands_in_its_bucket() -> None:
    """An out-of-order event within the lateness tolerance is windowed at its own ts."""
    store = WindowStore(small_config(lateness=30))
    store.add_metric(metric(T0 + 40))
    assert store.add_metric(metric(T0 + 15))
    assert store.stats("p", window_seconds=60, now=T0 + 15).request_count == 1
    assert store.stats("p", window_seconds=60, now=T0 + 40).request_count == 2
    assert store.late_events == 0


def test_too_late_event_is_counted_not_windowed() -> None:
    """Under a batch's watermark, an event older than watermark - lateness is counted in
    late_events and dropped; one exactly at the limit counts."""
    store = WindowStore(small_config(lateness=30))
    store.add_metric(metric(T0 + 100))
    store.admit(Admission.of(T0 + 101, T0 + 100, 30, 300))
    assert not store.add_metric(metric(T0 + 69.9))
    assert not store.add_feedback(feedback(T0, 0.5))
    assert store.add_metric(metric(T0 + 70))
    assert store.late_events == 2
    assert store.stats("p", window_seconds=600, now=T0 + 100).request_count == 2


def test_event_older_than_every_tier_is_counted_late() -> None:
    """An admitted event whose time every tier has folded away (past the baseline) is
    counted as late, and leaves no empty series behind."""
    store = WindowStore(small_config())
    store.expire(T0 + 10 * 3600)
    assert not store.add_metric(metric(T0, prompt="old"))
    assert store.late_events == 1
    assert store.series("prompt") == []


def test_late_event_after_expire_keeps_fine_resolution() -> None:
    """Folding keeps the lateness tolerance: a late event after expire() stays fine-grained."""
    config = WindowConfig(
        tiers=(
            Tier(bucket_seconds=10, retention_seconds=20),
            Tier(bucket_seconds=60, retention_seconds=600),
        ),
        lateness_seconds=45,
    )
    store = WindowStore(config)
    store.add_metric(metric(T0 + 300))
    store.expire(T0 + 300)
    assert store.add_metric(metric(T0 + 260))
    assert store.stats("p", window_seconds=20, now=T0 + 270).request_count == 1
    assert store.stats("p", window_seconds=600, now=T0 + 300).request_count == 2


def test_rollup_levels() -> None:
    """Metrics roll up to variant and prompt; feedback shows at variant and prompt level only."""
    store = WindowStore(small_config())
    store.add_batch(
        [
            metric(T0, variant="v1", model="a", latency_ms=10),
            metric(T0, variant="v1", model="b", latency_ms=20, success=False),
            metric(T0, variant="v2", model="a", latency_ms=30),
            metric(T0, prompt="other"),
            feedback(T0, 1.0, variant="v1"),
            feedback(T0, 0.0, variant="v2"),
        ]
    )
    model_a = store.stats("p", "v1", "a", window_seconds=60, now=T0)
    assert (model_a.request_count, model_a.feedback_count) == (1, 0)
    v1 = store.stats("p", "v1", window_seconds=60, now=T0)
    assert (v1.request_count, v1.error_count, v1.feedback_mean) == (2, 1, 1.0)
    whole = store.stats("p", window_seconds=60, now=T0)
    assert (whole.request_count, whole.feedback_count, whole.feedback_mean) == (3, 2, 0.5)
    assert whole.latency_mean == pytest.approx(20.0)
    assert store.series("prompt") == [SeriesKey("other", None, None), SeriesKey("p", None, None)]
    assert SeriesKey("p", "v2", None) in store.series("variant")
    assert SeriesKey("p", "v1", "b") in store.series("model")
    assert all(k.model is not None for k in store.series("model"))


def test_statistics_values_and_none_without_samples() -> None:
    """Rates, means, tokens and cost are computed; statistics without samples are None."""
    store = WindowStore(small_config())
    store.add_metric(metric(T0, quality=0.5, tokens_in=10, tokens_out=5, cost_usd=0.02))
    store.add_metric(metric(T0 + 1, success=False, tokens_in=1, cost_usd=0.04))
    s = store.stats("p", window_seconds=60, now=T0 + 5)
    assert (s.request_count, s.success_rate, s.error_rate) == (2, 0.5, 0.5)
    assert s.request_rate == pytest.approx(2 / 55)
    assert (s.quality_count, s.quality_mean) == (1, 0.5)
    assert (s.tokens_in, s.tokens_out) == (11, 5)
    assert s.cost_usd == pytest.approx(0.06)
    assert s.cost_per_request == pytest.approx(0.03)
    empty = store.stats("nobody", window_seconds=60, now=T0)
    assert empty.request_count == 0
    assert empty.request_rate == 0.0
    assert None is empty.success_rate is empty.latency_p95 is empty.feedback_mean is empty.cost_usd


def test_long_window_reads_fine_and_folded_buckets() -> None:
    """A window longer than the fine tier sums folded coarse buckets and unfolded fine ones."""
    store = WindowStore(small_config(lateness=0))
    for second in range(0, 600, 5):
        store.add_metric(metric(T0 + second))
        store.expire(T0 + second)
    now = T0 + 595
    assert store.stats("p", window_seconds=600, now=now).request_count == 120
    assert store.stats("p", window_seconds=60, now=now).request_count == 12
    assert store.stats("p", window_seconds=30, now=now).request_count == 6


def test_expire_drops_old_data_and_empty_series() -> None:
    """Data older than the longest tier is dropped and empty series disappear."""
    store = WindowStore(small_config())
    store.add_metric(metric(T0))
    store.expire(T0 + 10_000)
    assert store.series("model") == []
    assert store.bucket_count() == 0


def test_bucket_count_is_bounded() -> None:
    """The number of buckets per series stays bounded however many events arrive."""
    store = WindowStore(small_config())
    for i in range(20_000):
        store.record_metric(T0 + i * 0.5, "p", "v", "m", 10.0, True)
    # 60/10 + 600/60 buckets plus a few for lateness and the partial bucket.
    assert store.bucket_count() <= 6 + 10 + 4


def test_tier_for_rejects_windows_beyond_the_baseline() -> None:
    """A window longer than the longest tier is an error naming the limit."""
    store = WindowStore(small_config())
    with pytest.raises(ValueError, match="longer than the longest tier"):
        store.stats("p", window_seconds=601, now=T0)


def test_config_rejects_tiers_that_do_not_nest() -> None:
    """Tier widths must nest so that every fine bucket folds into one coarse bucket."""
    with pytest.raises(ValueError, match="multiple of the previous"):
        WindowConfig(
            tiers=(
                Tier(bucket_seconds=10, retention_seconds=60),
                Tier(bucket_seconds=25, retention_seconds=600),
            )
        )


@pytest.mark.parametrize(
    "sampler",
    [
        lambda rng, n: rng.lognormal(5.0, 1.0, n),
        lambda rng, n: rng.exponential(300.0, n),
        lambda rng, n: rng.uniform(0.5, 30_000.0, n),
        lambda rng, n: np.concatenate(
            [rng.normal(200, 20, n // 2).clip(1), rng.pareto(1.5, n // 2) * 1000 + 1]
        ),
    ],
    ids=["lognormal", "exponential", "uniform", "bimodal-heavy-tail"],
)
def test_quantiles_within_documented_relative_error(sampler: object) -> None:
    """p50/p95/p99 are within relative_error of numpy's exact order statistic (method=lower)."""
    rng = np.random.default_rng(7)
    values = sampler(rng, 20_000)  # type: ignore[operator]
    store = WindowStore(small_config())
    for v in values:
        store.record_metric(T0, "p", "v", "m", float(v), True)
    s = store.stats("p", window_seconds=60, now=T0)
    alpha = store.config.relative_error
    for q, got in ((0.5, s.latency_p50), (0.95, s.latency_p95), (0.99, s.latency_p99)):
        exact = float(np.quantile(values, q, method="lower"))
        assert got is not None
        assert abs(got - exact) <= alpha * exact + 1e-9, (q, got, exact)


def test_histogram_value_round_trip_bound() -> None:
    """Every value maps to a bucket whose representative is within the relative error."""
    buckets = LogBuckets(0.02)
    for v in np.geomspace(0.01, 1e7, 5000):
        rep = buckets.value(buckets.index(float(v)))
        assert math.isclose(rep, v, rel_tol=0.02 + 1e-12)
    assert buckets.value(buckets.index(0.0)) == 0.0


def test_quantiles_after_folding_use_dense_histograms() -> None:
    """Quantiles over folded (sealed, dense) buckets keep the documented error bound."""
    rng = np.random.default_rng(11)
    values = rng.lognormal(6.0, 0.8, 6000)
    store = WindowStore(small_config(lateness=0))
    for i, v in enumerate(values):
        store.record_metric(T0 + i * 0.1, "p", "v", "m", float(v), True)
        if i % 100 == 0:
            store.expire(T0 + i * 0.1)
    now = T0 + 599.9
    store.expire(now)
    s = store.stats("p", window_seconds=600, now=now)
    assert s.request_count == len(values)
    alpha = store.config.relative_error
    for q, got in ((0.5, s.latency_p50), (0.95, s.latency_p95), (0.99, s.latency_p99)):
        exact = float(np.quantile(values, q, method="lower"))
        assert got is not None
        assert abs(got - exact) <= alpha * exact + 1e-9, (q, got, exact)


def test_dense_and_sparse_quantiles_agree() -> None:
    """The dense form returns the same quantiles as the dict form, zero bucket included."""
    buckets = LogBuckets()
    rng = np.random.default_rng(3)
    hist: dict[int, int] = {}
    for v in np.concatenate([rng.exponential(50.0, 3000), np.zeros(200)]):
        idx = buckets.index(float(v))
        hist[idx] = hist.get(idx, 0) + 1
    dense = DenseHistogram()
    half = dict(list(hist.items())[: len(hist) // 2])
    other = DenseHistogram()
    other.add_sparse({k: v for k, v in hist.items() if k not in half})
    dense.add_sparse(half)
    dense.add_dense(other)
    qs = (0.0, 0.01, 0.05, 0.5, 0.95, 0.99, 1.0)
    assert dense.quantiles(buckets, qs) == buckets.quantiles(hist, qs)
    assert dense.quantiles(buckets, (0.01,)) == [0.0]


def test_event_from_the_future_is_counted_at_its_storage_time_or_rejected() -> None:
    """Stamped after its batch was stored: within max_future it counts at the storage
    time (and moves the clock no further), beyond it is counted and not windowed."""
    store = WindowStore(small_config())
    store.admit(Admission.of(T0, None, 30, 300))
    assert not store.add_metric(metric(T0 + 300.001))
    assert store.future_events == 1
    assert store.add_metric(metric(T0 + 300))
    assert store.watermark == T0
    assert store.stats("p", window_seconds=60, now=T0).request_count == 1


def test_series_recreated_after_expiry_starts_clean() -> None:
    """A series that expired and comes back counts only its new events."""
    store = WindowStore(small_config())
    store.add_metric(metric(T0))
    store.expire(T0 + 10_000)
    store.add_metric(metric(T0 + 10_001))
    store.expire(T0 + 10_100)  # folds the new bucket; no stale leftovers may interfere
    assert store.stats("p", window_seconds=600, now=T0 + 10_100).request_count == 1
    assert store.bucket_count() == 1


def test_rebuild_from_history_matches_live_feeding() -> None:
    """Feeding stored events in ts order through add_batch gives the live statistics."""
    events = [metric(T0 + i * 7.3, latency_ms=float(10 + i % 50)) for i in range(200)]
    live = WindowStore(small_config())
    for event in events:
        live.add_metric(event)
        live.expire(event.ts)
    rebuilt = WindowStore(small_config())
    assert rebuilt.add_batch(events) == len(events)
    now = events[-1].ts + 1
    live.expire(now)
    rebuilt.expire(now)
    for window in (60.0, 600.0):
        assert live.stats("p", window_seconds=window, now=now) == rebuilt.stats(
            "p", window_seconds=window, now=now
        )
