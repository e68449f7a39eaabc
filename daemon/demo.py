"""``promptd demo``: the whole loop in about two minutes, on the embedded broker.

It starts the daemon (embedded Tansu broker, a SQLite file in a new directory) and, in the
same process, a traffic generator that behaves like a production app instrumented with
the SDK: many users with sticky routing, feedback on a share of the calls, captured
inputs and outputs. The scripted story, with every time setting scaled down and printed:

1. **healthy** — the active prompt (v1) is rated well; the monitor learns its baseline;
2. **degrading** — v1's ratings drop (as when a provider changes a model); the relative
   degradation alert fires and hands a trigger to the optimizer;
3. **optimizing** — the few-shot strategy (no LLM needed) builds a candidate from the
   best-rated production examples; it is registered and its rollout starts;
4. **rollout** — the candidate moves through its traffic steps while the always-valid A/B
   test watches it; ``--scenario improve`` makes it better (promoted), ``regress`` worse
   (rolled back automatically).

It ends with a summary table and leaves the SQLite file and a JSON report behind.

``--feedback none`` tells the same story for an app that sends no feedback at all: its
answers are either complete summaries or cut off, and a code check (``complete``: the
summary ends with a full stop) scores 70 % of the calls. That check is the signal of
every decision (``[[evaluation.signals]]``): the degradation alert fires on its scores,
the optimizer's demonstrations are the answers it passed, and the rollout is decided on
it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from promptd.daemon.settings import Settings

PROMPT = "summarize"
TEMPLATE_V1 = "Summarize the following support ticket for an engineer:\n\n{document}"

TICKETS = [
    "Checkout fails with a 502 after entering a coupon code on mobile Safari.",
    "Export to CSV truncates names with accents in the customer list.",
    "Password reset emails arrive after 20 minutes for Outlook users.",
    "Dashboard graphs show yesterday's data until the page is reloaded twice.",
    "Invoices in EUR are rounded to whole euros in the PDF export.",
    "Search returns no results for SKUs that contain a hyphen.",
    "The mobile app logs users out when they switch networks.",
    "Webhooks are retried forever after the receiver returns 410 Gone.",
]


@dataclass(frozen=True, slots=True)
class Timeline:
    """Phase lengths of the story (seconds), already scaled."""

    healthy_s: float
    max_total_s: float


#: ``--feedback``: people's thumbs on 70 % of the calls, or none (evaluators only).
FEEDBACK_MODES = ("thumbs", "none")
#: The code check that replaces people's thumbs under ``--feedback none``.
COMPLETE_CHECK = "complete"


@dataclass(slots=True)
class DemoState:
    """What the demo saw, for the progress lines and the report."""

    feedback_mode: str = "thumbs"
    started: float = field(default_factory=time.monotonic)
    phase: str = "healthy"
    degraded: bool = False
    calls: int = 0
    feedback: int = 0
    ratings: dict[str, list[int]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    candidate: str | None = None
    rollout_id: str | None = None
    outcome: str | None = None
    #: Evaluators' results stored so far (polled under ``--feedback none``).
    evaluations: int = 0

    @property
    def evaluated(self) -> bool:
        """True when evaluators, not people, give the quality signal."""
        return self.feedback_mode == "none"

    def elapsed(self) -> float:
        """Seconds since the demo started."""
        return time.monotonic() - self.started

    def note(self, kind: str, text: str, **data: Any) -> None:
        """Record a milestone and print it."""
        self.events.append({"t": round(self.elapsed(), 1), "event": kind, **data})
        print(f"[{self.elapsed():6.1f}s] {text}", flush=True)


def demo_settings(
    data_dir: Path, http_port: int, time_scale: float, feedback: str = "thumbs"
) -> Settings:
    """Daemon settings for the demo: embedded broker, short windows, fast controller;
    with ``feedback = "none"``, a code check is every decision's quality signal."""
    tick = 0.5
    return Settings(
        log_level="warning",
        storage={"data_dir": data_dir},
        http={"host": "127.0.0.1", "port": http_port, "routing_ttl_s": 1.0},
        kafka={
            # A free port: the demo's app is told the address, and the demo can run
            # beside a `promptd run` that holds 9092.
            "embedded_port": 0,
            "session_timeout_ms": 2_000,
            "heartbeat_interval_ms": 500,
            "fetch_max_wait_ms": 50,
        },
        rollout={
            "tick_interval_s": tick,
            "default_profile": "demo",
            "profiles": {
                "demo": {
                    "steps": [
                        {
                            "weight": 0.10,
                            "min_duration_s": 6 * time_scale,
                            "min_samples_per_arm": 120,
                        },
                        {
                            "weight": 0.25,
                            "min_duration_s": 6 * time_scale,
                            "min_samples_per_arm": 150,
                        },
                        {
                            "weight": 0.50,
                            "min_duration_s": 6 * time_scale,
                            "min_samples_per_arm": 200,
                        },
                        {"weight": 1.00, "min_duration_s": 0, "min_samples_per_arm": 1},
                    ],
                    "min_samples_for_test": 100,
                    "starvation_grace_s": 60 * time_scale,
                    "starvation_action": "rollback",
                    # The demo app's latency is simulated and equal across arms.
                    "max_latency_ratio": 1.2,
                    "max_cost_ratio": 1.5,
                },
            },
        },
        monitoring=_monitoring(time_scale),
        optimization=_optimization(),
        evaluation=_evaluation() if feedback == "thumbs" else _evaluation_only(),
    )


def _evaluation() -> dict[str, Any]:
    # A code check on a sample of the captured summaries (do they cite a number: an error
    # code, a delay?): online evaluation at work beside people's thumbs, with its
    # agreement tracked. The monitor, optimizer and rollouts read the thumbs (the default).
    # (Two digits: the summaries start with their version, "[v1]".)
    check = {"name": "cites_number", "type": "regex", "pattern": r"\d\d", "sample_rate": 0.2}
    return {"evaluators": [check], "agreement": {"interval_s": 2.0}}


def _evaluation_only() -> dict[str, Any]:
    # No feedback from the app: a code check scores 70 % of the calls (as many as the
    # thumbs of the default story) and drives the monitor, the optimizer and rollouts.
    check = {
        "name": COMPLETE_CHECK,
        "type": "regex",
        "pattern": r"\.$",
        "sample_rate": 0.7,
        "prompts": [PROMPT],
    }
    signal = [f"eval:{COMPLETE_CHECK}"]
    choice = {"prompts": [PROMPT], "monitor": signal, "optimizer": signal, "rollout": signal}
    return {"evaluators": [check], "signals": [choice], "queue_size": 10_000}


def _step(weight: float, seconds: float, samples: int) -> dict[str, float]:
    return {"weight": weight, "min_duration_s": seconds, "min_samples_per_arm": samples}


def _monitoring(time_scale: float) -> dict[str, Any]:
    return {
        "tiers": [
            {"bucket_seconds": 1, "retention_seconds": 60},
            {"bucket_seconds": 10, "retention_seconds": 900},
        ],
        "evaluation_interval_s": 0.5,
        "lateness_s": 5,
        "export_windows_s": [60],
        "default_degradation_rule": False,
        # The story's trigger is the degradation alert, not feedback volume.
        "feedback_volume_threshold": 1_000_000_000,
        "rules": [
            {
                "name": "feedback_degradation",
                "metric": "feedback_mean",
                "kind": "relative",
                "window": "10s",
                "baseline_window": "15m",
                "drop": 0.15,
                "min_samples": 80,
                "for": f"{max(1.0, 2 * time_scale):g}s",
                "severity": "warning",
                "group_by": "prompt",
            },
            {
                "name": "high_latency",
                "metric": "latency_p95",
                "comparison": "greater_than",
                "threshold": 5000,
                "window": "30s",
                "min_samples": 50,
                "for": "5s",
                "severity": "critical",
            },
        ],
    }


def _optimization() -> dict[str, Any]:
    return {
        "strategies": ["fewshot"],
        "without_evaluation": "conservative_rollout",
        "conservative_profile": "demo",
        "auto_deploy": True,
        "fewshot": {"max_demos": 3, "min_score": 0.8},
    }


class App:
    """The simulated production app: an instrumented summarizer with thumbs feedback."""

    def __init__(self, scenario: str, state: DemoState, seed: int = 7) -> None:
        import promptd

        self.promptd = promptd
        self.scenario = scenario
        self.state = state
        self.rng = random.Random(seed)
        # Under --feedback none the answer itself shows its quality: a good one is the
        # whole summary, a bad one is cut off (what the code check sees).
        self.evaluated = state.evaluated

        @promptd.instrument(
            prompt=PROMPT,
            model="demo-llm",
            version="v1",
            template=TEMPLATE_V1,
            unit_id="user",
            inject="variant",
            capture=True,
        )
        async def summarize(document: str, user: str, variant: Any = None) -> str:
            # A real app would call its LLM with variant.format(document=document).
            await asyncio.sleep(0)
            if self.evaluated:
                good = self.rng.random() < self.quality(variant.version)
                self.state.ratings.setdefault(variant.version, []).append(int(good))
                text = document if good else document[: len(document) // 2].rstrip(" .")
                return f"[{variant.version}] {text}"
            return f"[{variant.version}] {document[:60]}"

        self.summarize = summarize

    def quality(self, version: str) -> float:
        """Chance of a thumbs-up for an answer by ``version`` in the current phase."""
        if version == "v1":
            return 0.55 if self.state.degraded else 0.85
        return 0.85 if self.scenario == "improve" else 0.30

    async def one_call(self) -> None:
        """One user request, and on 70 % of them a thumbs up or down (none under
        ``--feedback none``: the answer is good or not, and only the evaluator says so)."""
        user = f"user-{self.rng.randrange(5_000)}"
        document = self.rng.choice(TICKETS)
        answer = await self.summarize(document, user=user)
        version = answer[1 : answer.index("]")]
        self.state.calls += 1
        if not self.evaluated and self.rng.random() < 0.7:
            liked = int(self.rng.random() < self.quality(version))
            self.state.ratings.setdefault(version, []).append(liked)
            await self.promptd.afeedback(
                self.promptd.last_request_id() or "", float(liked), kind="thumbs"
            )
            self.state.feedback += 1

    async def run(self, stop: asyncio.Event, rate_per_s: float) -> None:
        """Generate traffic at about ``rate_per_s`` calls per second until ``stop``."""
        interval = 0.05
        per_tick = max(1, round(rate_per_s * interval))
        while not stop.is_set():
            started = time.monotonic()
            for _ in range(per_tick):
                await self.one_call()
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))


async def _get(http: aiohttp.ClientSession, url: str) -> Any:
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=5)) as resp:
            if resp.status != 200:
                return None
            return await resp.json()
    except (aiohttp.ClientError, TimeoutError):
        return None


async def watch(base: str, state: DemoState, timeline: Timeline, stop: asyncio.Event) -> None:
    """Poll the daemon's API, print milestones, and decide when the story is over."""
    last_progress = 0.0
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            if not state.degraded and state.elapsed() >= timeline.healthy_s:
                state.degraded = True
                state.phase = "degrading"
                state.note(
                    "degradation_started", "v1 starts to degrade (simulated provider change)"
                )
            await _watch_alerts(http, base, state)
            await _watch_optimizations(http, base, state)
            await _watch_rollouts(http, base, state)
            if state.elapsed() - last_progress >= 3:
                last_progress = state.elapsed()
                if state.evaluated:
                    status = await _get(http, f"{base}/v1/status") or {}
                    stored = (status.get("events") or {}).get("stored_evaluations", 0)
                    state.evaluations = int(stored)
                print(_progress_line(state), flush=True)
            if state.outcome is not None or state.elapsed() > timeline.max_total_s:
                stop.set()
                return
            await asyncio.sleep(0.5)


def _progress_line(state: DemoState) -> str:
    parts = []
    # Under --feedback none the share of good answers is the simulation's truth, which
    # only the evaluator's scores tell the daemon.
    mark = "good" if state.evaluated else "👍"
    for version, ratings in sorted(state.ratings.items()):
        recent = ratings[-300:]
        parts.append(f"{version} {mark} {100 * sum(recent) / max(1, len(recent)):3.0f}%")
    rate = state.calls / max(state.elapsed(), 1e-9)
    signal = (
        f"{state.evaluations} evaluations, no ratings"
        if state.evaluated
        else f"{state.feedback} ratings"
    )
    return (
        f"[{state.elapsed():6.1f}s] traffic {rate:5.0f} calls/s, {signal} | "
        + " | ".join(parts)
        + f" | phase: {state.phase}"
    )


async def _watch_alerts(http: aiohttp.ClientSession, base: str, state: DemoState) -> None:
    body = await _get(http, f"{base}/v1/alerts")
    if not body:
        return
    for alert in body.get("active", []):
        key = f"alert:{alert['fingerprint']}:{alert['fired_at']}"
        if alert["state"] == "firing" and key not in state.seen:
            state.seen.add(key)
            state.note(
                "alert_fired",
                f"ALERT firing: {alert['rule']} {alert['labels']} "
                f"value={_fmt(alert['value'])} threshold={_fmt(alert['threshold'])}",
                rule=alert["rule"],
                labels=alert["labels"],
            )


async def _watch_optimizations(http: aiohttp.ClientSession, base: str, state: DemoState) -> None:
    body = await _get(http, f"{base}/v1/optimizations")
    if not body:
        return
    for run in body["runs"]:
        rid, status = run["id"], run["status"]
        key = f"opt:{rid}:{status}"
        if key in state.seen:
            continue
        state.seen.add(key)
        if f"opt:{rid}:seen" not in state.seen:
            state.seen.add(f"opt:{rid}:seen")
            state.phase = "optimizing"
            state.note(
                "optimization_started",
                f"optimization run {rid} started (trigger: {run['trigger_kind']})",
                run_id=rid,
            )
        if status != "running":
            made = run.get("deployed_version")
            state.note(
                "optimization_finished",
                f"optimization run {rid} {status} ({run.get('outcome')}): "
                f"{len(run['candidates'])} candidate(s), registered {made or 'none'}",
                run_id=rid,
                status=status,
            )


async def _watch_rollouts(http: aiohttp.ClientSession, base: str, state: DemoState) -> None:
    body = await _get(http, f"{base}/v1/rollouts")
    if not body:
        return
    for rollout in body.get("rollouts", []):
        rid = rollout["id"]
        if state.rollout_id is None:
            state.rollout_id = rid
            state.candidate = rollout["candidate_version"]
            state.phase = "rollout"
            state.note(
                "rollout_started",
                f"rollout {rid}: candidate {rollout['candidate_version']} vs "
                f"{rollout['baseline_version']} at {rollout['weight']:.0%}",
                rollout_id=rid,
            )
        if rid != state.rollout_id:
            continue
        detail = await _get(http, f"{base}/v1/rollouts/{rid}")
        if not detail:
            continue
        for decision in detail.get("decisions", []):
            key = f"dec:{rid}:{decision['ts']}:{decision['kind']}"
            if key in state.seen or decision["kind"] in ("hold", "start"):
                continue
            state.seen.add(key)
            state.note(
                f"rollout_{decision['kind']}",
                f"rollout {decision['kind']}: step {decision['step']} weight "
                f"{decision['weight']:.0%} — {decision['reason']}",
                rollout_id=rid,
                weight=decision["weight"],
            )
        if detail["status"] in ("promoted", "rolled_back"):
            state.outcome = detail["status"]


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, int | float) else str(value)


async def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run the story; return the report."""
    import promptd
    from promptd.daemon.app import Daemon
    from promptd.daemon.wiring import install_components
    from promptd.replacement.registry import NewVersion

    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="promptd-demo-"))
    settings = demo_settings(data_dir, args.http_port, args.time_scale, args.feedback)
    # The healthy phase does not shrink below 20 s: the monitor needs a baseline to
    # compare the degraded window with. The time scale shortens the rollout steps.
    timeline = Timeline(healthy_s=20 + 10 * args.time_scale, max_total_s=args.max_seconds)
    state = DemoState(feedback_mode=args.feedback)
    signal = (
        f"pass rate of the '{COMPLETE_CHECK}' check (no feedback from the app)"
        if state.evaluated
        else "thumbs-up rate"
    )
    print(
        f"promptd demo — scenario '{args.scenario}'"
        + (", feedback none: evaluators only" if state.evaluated else "")
        + "\n"
        f"  data: {settings.storage.database_path}\n"
        f"  time scale {args.time_scale:g}: healthy phase {timeline.healthy_s:.0f}s, "
        f"degradation alert on a 15% drop of the 10s {signal} vs the 15m baseline,\n"
        f"  rollout steps 10/25/50/100% of at least {6 * args.time_scale:.0f}s each, "
        f"controller tick {settings.rollout.tick_interval_s}s, "
        f"gives up after {timeline.max_total_s:.0f}s",
        flush=True,
    )
    daemon = Daemon(settings)
    install_components(daemon)
    stop_daemon = asyncio.Event()
    daemon_task = asyncio.create_task(daemon.run(stop_daemon), name="demo-daemon")
    try:
        await _wait_ready(daemon, daemon_task)
        base = f"http://127.0.0.1:{daemon.http_port}"
        state.note("daemon_ready", f"daemon ready on {base} (embedded broker {daemon.bootstrap})")
        await daemon.components["registry"].register(PROMPT, NewVersion(template=TEMPLATE_V1))
        promptd.configure(
            bootstrap_servers=daemon.bootstrap,
            daemon_url=base,
            routing_ttl_s=1.0,
        )
        app = App(args.scenario, state)
        stop = asyncio.Event()
        traffic = asyncio.create_task(app.run(stop, args.rate), name="demo-traffic")
        await watch(base, state, timeline, stop)
        traffic.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await traffic
        await promptd.aflush(5.0)
        report = await _report(base, args, state, settings)
        # The SDK's sender must stop before the embedded broker does.
        await asyncio.to_thread(promptd.shutdown)
    finally:
        stop_daemon.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(daemon_task, 15)
    return report


async def _wait_ready(daemon: Any, task: asyncio.Task[None]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if task.done():
            await task
        if daemon.started.is_set() and daemon.readiness()[0]:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("the daemon did not become ready within 60 s")


async def _report(
    base: str, args: argparse.Namespace, state: DemoState, settings: Settings
) -> dict[str, Any]:
    import promptd

    stats = promptd.sdk_stats()
    async with aiohttp.ClientSession() as http:
        status = await wait_stored(http, base, stats.delivered)
        routing = await _get(http, f"{base}/v1/prompts/{PROMPT}/routing")
        versions = await _get(http, f"{base}/v1/prompts/{PROMPT}/versions")
        rollout = (
            await _get(http, f"{base}/v1/rollouts/{state.rollout_id}") if state.rollout_id else None
        )
    expected = "promoted" if args.scenario == "improve" else "rolled_back"
    rates = {v: round(sum(r) / len(r), 3) for v, r in sorted(state.ratings.items()) if r}
    extra: dict[str, Any] = (
        {"good_answer_rate": rates, "signal": f"eval:{COMPLETE_CHECK}"}
        if state.evaluated
        else {"thumbs_up_rate": rates}
    )
    return {
        "scenario": args.scenario,
        "feedback": args.feedback,
        "expected_outcome": expected,
        "outcome": state.outcome or "unfinished",
        "success": state.outcome == expected,
        "elapsed_s": round(state.elapsed(), 1),
        "database": str(settings.storage.database_path),
        "calls": state.calls,
        "ratings": state.feedback,
        **extra,
        "timeline": state.events,
        "candidate_version": state.candidate,
        "rollout": rollout,
        "routing": routing,
        "versions": versions,
        "daemon_status": status,
        "sdk": dataclasses.asdict(stats),
    }


async def wait_stored(
    http: aiohttp.ClientSession,
    base: str,
    delivered: int,
    timeout_s: float = 15.0,
    settle_s: float = 2.0,
) -> Any:
    """The daemon's status once it has stored what the app delivered.

    Waits until stored plus dead-lettered events of the app (the evaluation results the
    daemon published itself left out) reach ``delivered``, or the count has
    not moved for ``settle_s``, at most ``timeout_s``, so the summary reports the final
    count rather than one taken while the last batches are still being ingested.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last, changed_at = -1, loop.time()
    status = None
    while True:
        status = await _get(http, f"{base}/v1/status") or status
        events = (status or {}).get("events") or {}
        done = app_events(events) + int(events.get("dead_lettered", 0))
        now = loop.time()
        if done != last:
            last, changed_at = done, now
        if done >= delivered or now - changed_at >= settle_s or now >= deadline:
            return status
        await asyncio.sleep(0.1)


def app_events(events: dict[str, Any]) -> int:
    """Events stored from the app: all stored events but the evaluators' results."""
    return int(events.get("stored", 0)) - int(events.get("stored_evaluations", 0))


def print_summary(report: dict[str, Any]) -> None:
    """The closing table."""
    evaluated = report.get("feedback") == "none"
    rates = report["good_answer_rate" if evaluated else "thumbs_up_rate"]
    events = (report["daemon_status"] or {}).get("events") or {}
    rows = [
        ("scenario", report["scenario"]),
        ("outcome", f"{report['outcome']} (expected {report['expected_outcome']})"),
        ("elapsed", f"{report['elapsed_s']} s"),
        (
            ("calls / evaluations", f"{report['calls']} / {events.get('stored_evaluations', 0)}")
            if evaluated
            else ("calls / ratings", f"{report['calls']} / {report['ratings']}")
        ),
        (
            "good answers" if evaluated else "thumbs-up rate",
            ", ".join(f"{k}: {v:.0%}" for k, v in rates.items()),
        ),
        ("candidate", report["candidate_version"] or "-"),
        ("active version now", (report["routing"] or {}).get("active_version")),
        (
            "events stored",
            f"{app_events(events)} of {report['sdk']['delivered']} delivered by the app",
        ),
        ("database", report["database"]),
        ("report", report.get("report_path", "-")),
    ]
    width = max(len(k) for k, _ in rows)
    print("\n" + "─" * 72)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print("─" * 72)


def register(sub: Any) -> dict[str, Any]:
    """Add ``promptd demo`` to the CLI."""
    demo = sub.add_parser("demo", help="watch the whole loop run in about two minutes")
    demo.add_argument(
        "--scenario",
        choices=["improve", "regress"],
        default="improve",
        help="improve: the candidate wins and is promoted (default); regress: rolled back",
    )
    demo.add_argument(
        "--feedback",
        choices=FEEDBACK_MODES,
        default="thumbs",
        help="thumbs: the app's users rate 70%% of the calls (default); none: no feedback "
        "at all, a code check scores the calls and drives every decision",
    )
    demo.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="multiply every phase length (CI uses less than 1)",
    )
    demo.add_argument("--rate", type=float, default=300.0, help="simulated calls per second")
    demo.add_argument(
        "--http-port", type=int, default=0, help="keep the HTTP API on this port (0: any free port)"
    )
    demo.add_argument("--data-dir", help="where to leave the SQLite file (default: a new temp dir)")
    demo.add_argument("--report", help="JSON report path (default: DATA_DIR/demo-report.json)")
    demo.add_argument("--max-seconds", type=float, default=240.0, help="give up after this long")
    return {"demo": demo_command}


def demo_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run the demo; exit 0 when the scenario's expected outcome happened."""
    _ = settings  # the demo builds its own settings: embedded broker, temp data dir
    from promptd.daemon.logs import configure_logging

    # The demo narrates in plain lines; the daemon's own log shows errors only.
    configure_logging("error", "json")
    report = asyncio.run(run_demo(args))
    path = (
        Path(args.report) if args.report else Path(report["database"]).parent / "demo-report.json"
    )
    report["report_path"] = str(path)
    path.write_text(json.dumps(report, indent=2, default=str))
    print_summary(report)
    return 0 if report["success"] else 1
