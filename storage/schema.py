"""Versioned schema with forward-only migrations, applied at start, on both backends.

Each migration is appended, never edited once released: the database records the
highest version applied (SQLite: ``PRAGMA user_version``; PostgreSQL: the
``schema_version`` table) and every start applies the rest in one transaction each. A
database newer than this code is refused rather than guessed at.

The scripts are SQLite's; PostgreSQL runs the same script with its column types
(:func:`~promptd.storage.dialect.ddl_to_postgresql`), or the ``postgresql`` text of a
migration that SQLite can only express its own way.
"""

from __future__ import annotations

from typing import Final

from pydantic import BaseModel, ConfigDict

from promptd.storage.dialect import POSTGRESQL_PRELUDE, Dialect, ddl_to_postgresql


class Migration(BaseModel):
    """One forward step of the schema."""

    model_config = ConfigDict(frozen=True)

    version: int
    name: str
    sql: str
    #: PostgreSQL's text when the translated ``sql`` would not do.
    postgresql: str | None = None

    def script(self, dialect: Dialect) -> str:
        """The script for ``dialect``."""
        if dialect == "sqlite":
            return self.sql
        if self.postgresql is not None:
            return self.postgresql
        return ddl_to_postgresql(self.sql)


_V1_INGESTION: Final = """
CREATE TABLE metric_events (
    id          INTEGER PRIMARY KEY,
    event_id    TEXT    NOT NULL UNIQUE,
    ts          REAL    NOT NULL,
    prompt      TEXT    NOT NULL,
    variant     TEXT    NOT NULL,
    model       TEXT    NOT NULL,
    request_id  TEXT    NOT NULL,
    unit_id     TEXT,
    latency_ms  REAL    NOT NULL CHECK (latency_ms >= 0),
    success     INTEGER NOT NULL CHECK (success IN (0, 1)),
    error       TEXT,
    quality     REAL    CHECK (quality BETWEEN 0 AND 1),
    tokens_in   INTEGER,
    tokens_out  INTEGER,
    cost_usd    REAL,
    input       TEXT,
    output      TEXT,
    attributes  TEXT,
    ingested_at REAL    NOT NULL
);
-- No index on ts or prompt: each costs 30-40 % of ingestion throughput. Time-range
-- queries use ingest_batches (below) to find the first row id that can hold a given
-- time and scan the primary key from there.

-- Only calls with captured input/output are joined to feedback (example store), so
-- a partial index keeps the cost of this index off the ingestion hot path.
CREATE INDEX metric_events_request ON metric_events (request_id) WHERE input IS NOT NULL;

CREATE TABLE feedback_events (
    id          INTEGER PRIMARY KEY,
    event_id    TEXT    NOT NULL UNIQUE,
    ts          REAL    NOT NULL,
    prompt      TEXT    NOT NULL,
    variant     TEXT    NOT NULL,
    model       TEXT,
    request_id  TEXT    NOT NULL,
    score       REAL    NOT NULL CHECK (score BETWEEN 0 AND 1),
    kind        TEXT    NOT NULL,
    comment     TEXT,
    correction  TEXT,
    ingested_at REAL    NOT NULL
);

-- One row per stored batch and table: the id range it inserted and its event-time
-- range. Rows with id below min(first_id) of the batches whose max_ts >= T all have
-- ts < T, which turns "events since T" into a primary-key range scan.
CREATE TABLE ingest_batches (
    id       INTEGER PRIMARY KEY,
    tbl      TEXT    NOT NULL,
    first_id INTEGER NOT NULL,
    last_id  INTEGER NOT NULL,
    min_ts   REAL    NOT NULL,
    max_ts   REAL    NOT NULL
);
CREATE INDEX ingest_batches_max_ts ON ingest_batches (tbl, max_ts);
CREATE INDEX feedback_events_request ON feedback_events (request_id);

-- The consumer's position per partition, written in the same transaction as the
-- events it covers: this table, not the broker, says where to resume.
CREATE TABLE consumer_offsets (
    topic       TEXT    NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    updated_at  REAL    NOT NULL,
    PRIMARY KEY (topic, partition)
);

CREATE TABLE counters (
    name  TEXT    PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

_V2_REGISTRY: Final = """
CREATE TABLE prompts (
    name           TEXT PRIMARY KEY,
    active_version TEXT,
    profile        TEXT NOT NULL DEFAULT 'balanced',
    created_at     REAL NOT NULL,
    updated_at     REAL NOT NULL
);

-- Versions are immutable: only ``status`` changes after insert.
CREATE TABLE prompt_versions (
    prompt         TEXT NOT NULL REFERENCES prompts (name),
    version        TEXT NOT NULL,
    seq            INTEGER NOT NULL,
    template       TEXT NOT NULL,
    placeholders   TEXT NOT NULL,
    parent_version TEXT,
    origin         TEXT NOT NULL,
    run_id         TEXT,
    rationale      TEXT,
    status         TEXT NOT NULL CHECK (status IN
                       ('active', 'candidate', 'in_rollout', 'retired', 'rolled_back')),
    created_at     REAL NOT NULL,
    PRIMARY KEY (prompt, version)
);

CREATE TABLE rollouts (
    id         TEXT PRIMARY KEY,
    prompt     TEXT NOT NULL REFERENCES prompts (name),
    candidate  TEXT NOT NULL,
    baseline   TEXT NOT NULL,
    status     TEXT NOT NULL,
    state      TEXT NOT NULL,
    -- Start time of each step reached, in order: the strata of the A/B comparison.
    step_starts TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
-- At most one live rollout per prompt, enforced by the database itself.
CREATE UNIQUE INDEX rollouts_one_live ON rollouts (prompt) WHERE status IN ('running', 'paused');

CREATE TABLE rollout_decisions (
    id         INTEGER PRIMARY KEY,
    rollout_id TEXT NOT NULL REFERENCES rollouts (id),
    ts         REAL NOT NULL,
    kind       TEXT NOT NULL,
    reason     TEXT NOT NULL,
    details    TEXT,
    step       INTEGER,
    weight     REAL
);
CREATE INDEX rollout_decisions_rollout ON rollout_decisions (rollout_id, id);
"""

_V3_ALERTS: Final = """
-- Alert lifecycle state per fingerprint (rule + labels), so firing alerts stay firing
-- across a restart without a second notification.
CREATE TABLE alert_states (
    fingerprint TEXT PRIMARY KEY,
    rule        TEXT NOT NULL,
    state       TEXT NOT NULL,
    updated_at  REAL NOT NULL
);
CREATE TABLE alert_history (
    id          INTEGER PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    rule        TEXT NOT NULL,
    state       TEXT NOT NULL,
    ts          REAL NOT NULL,
    payload     TEXT NOT NULL
);
CREATE INDEX alert_history_ts ON alert_history (ts);
"""

_V4_OPTIMIZATION: Final = """
-- One row per optimization run: the trigger, what it spent, what it produced and how it
-- ended. ``candidates`` holds every candidate with its gate result (JSON list).
CREATE TABLE optimization_runs (
    id               TEXT PRIMARY KEY,
    prompt           TEXT NOT NULL,
    trigger_kind     TEXT NOT NULL,
    trigger_reason   TEXT NOT NULL,
    strategies       TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN
                         ('running', 'completed', 'failed', 'timed_out', 'interrupted')),
    outcome          TEXT,
    parent_version   TEXT,
    started_at       REAL NOT NULL,
    finished_at      REAL,
    cost_usd         REAL NOT NULL DEFAULT 0,
    llm_calls        INTEGER NOT NULL DEFAULT 0,
    candidates       TEXT NOT NULL DEFAULT '[]',
    discarded        TEXT NOT NULL DEFAULT '{}',
    deployed_version TEXT,
    rollout_id       TEXT,
    error            TEXT
);
CREATE INDEX optimization_runs_started ON optimization_runs (started_at);
-- At most one running run per prompt, enforced by the database itself.
CREATE UNIQUE INDEX optimization_runs_one_running ON optimization_runs (prompt)
    WHERE status = 'running';

-- The trigger policy's memory per prompt (cooldown and schedule survive restarts).
CREATE TABLE optimization_policy (
    prompt           TEXT PRIMARY KEY,
    last_started_at  REAL,
    last_finished_at REAL,
    updated_at       REAL NOT NULL
);
"""

_V5_OPTIMIZATION_SEARCH: Final = """
-- Every model call the optimizer paid for, by cache key (model, parameters, rendered
-- messages, nonce): an answer stored here is never paid for again, by any run, and a
-- run resumed after a restart replays its search from here.
CREATE TABLE optimization_llm_calls (
    key        TEXT PRIMARY KEY,
    run_id     TEXT NOT NULL,
    purpose    TEXT NOT NULL,
    model      TEXT NOT NULL,
    request    TEXT NOT NULL,
    response   TEXT NOT NULL,
    attempts   INTEGER NOT NULL,
    tokens_in  INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    cost_usd   REAL NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX optimization_llm_calls_run ON optimization_llm_calls (run_id);
CREATE INDEX optimization_llm_calls_created ON optimization_llm_calls (created_at);

-- What a run needs to resume exactly (seed, example bounds, chosen strategy) and what
-- it shows while it works (phase, progress, the gate's figures).
ALTER TABLE optimization_runs ADD COLUMN seed INTEGER;
ALTER TABLE optimization_runs ADD COLUMN snapshot TEXT;
ALTER TABLE optimization_runs ADD COLUMN selection TEXT;
ALTER TABLE optimization_runs ADD COLUMN phase TEXT;
ALTER TABLE optimization_runs ADD COLUMN progress TEXT;
ALTER TABLE optimization_runs ADD COLUMN gate TEXT;
ALTER TABLE optimization_runs ADD COLUMN tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE optimization_runs ADD COLUMN elapsed_s REAL NOT NULL DEFAULT 0;
ALTER TABLE optimization_runs ADD COLUMN resumes INTEGER NOT NULL DEFAULT 0;

-- The strategy bandit's evidence: pseudo-counts per run, from its gate and, later,
-- from its rollout's online result.
CREATE TABLE optimization_outcomes (
    id        INTEGER PRIMARY KEY,
    run_id    TEXT NOT NULL,
    prompt    TEXT NOT NULL,
    strategy  TEXT NOT NULL,
    kind      TEXT NOT NULL CHECK (kind IN ('gate', 'online')),
    successes REAL NOT NULL,
    failures  REAL NOT NULL,
    detail    TEXT,
    ts        REAL NOT NULL,
    UNIQUE (run_id, strategy, kind)
);
"""

_V6_PIPELINES: Final = """
-- Pipelines: chains of prompts with the wiring of each step's placeholders (JSON).
CREATE TABLE pipelines (
    name       TEXT PRIMARY KEY,
    definition TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
"""

_V7_ROLLOUT_FINAL: Final = """
-- The statistics of a rollout as it ended (arms, last test statistics, winner), written
-- in the transaction of its terminal transition: GET /v1/rollouts/{id} keeps showing them.
ALTER TABLE rollouts ADD COLUMN final TEXT;
"""

_V8_PROMPT_CONFIGS: Final = """
-- A version may be a configuration (chat messages, model, parameters; JSON) instead of a
-- single template; ``template`` then holds its canonical text.
ALTER TABLE prompt_versions ADD COLUMN config TEXT;
"""


_V9_SNAPSHOTS: Final = """
-- Periodic snapshots of in-memory aggregates (the monitor's windows, ...), so that a
-- restart loads them and replays only the events stored after them. ``metric_id`` and
-- ``feedback_id``: every event row up to these ids is in the snapshot, none above.
-- ``config`` names what the data was built with; a snapshot of another config is ignored.
CREATE TABLE snapshots (
    name        TEXT PRIMARY KEY,
    taken_at    REAL    NOT NULL,
    metric_id   INTEGER NOT NULL,
    feedback_id INTEGER NOT NULL,
    config      TEXT    NOT NULL,
    data        BLOB    NOT NULL
);
"""

_V10_OPTIMIZATION_TARGETS: Final = """
-- What a run optimizes when it is not one prompt: {"kind": "pipeline", "pipeline": {...},
-- "versions": {prompt: active version at the start}} (NULL: the prompt named by prompt).
ALTER TABLE optimization_runs ADD COLUMN target TEXT;
"""

_V11_EPISODES: Final = """
-- Episodes: calls that share an episode_id (one run of a pipeline, one agent turn), and
-- feedback on a whole episode. Only calls in an episode are indexed (most are not).
ALTER TABLE metric_events ADD COLUMN episode_id TEXT;
CREATE INDEX metric_events_episode ON metric_events (episode_id) WHERE episode_id IS NOT NULL;

-- Feedback may now name an episode instead of a call: request_id, prompt and variant
-- become optional. SQLite cannot drop NOT NULL in place, so the table is rebuilt with
-- the same row ids (snapshots and ingest_batches refer to them).
CREATE TABLE feedback_events_v11 (
    id          INTEGER PRIMARY KEY,
    event_id    TEXT    NOT NULL UNIQUE,
    ts          REAL    NOT NULL,
    prompt      TEXT,
    variant     TEXT,
    model       TEXT,
    request_id  TEXT,
    score       REAL    NOT NULL CHECK (score BETWEEN 0 AND 1),
    kind        TEXT    NOT NULL,
    comment     TEXT,
    correction  TEXT,
    ingested_at REAL    NOT NULL,
    episode_id  TEXT,
    CHECK (request_id IS NOT NULL OR episode_id IS NOT NULL),
    CHECK (request_id IS NULL OR (prompt IS NOT NULL AND variant IS NOT NULL))
);
INSERT INTO feedback_events_v11 (id, event_id, ts, prompt, variant, model, request_id, score,
                                 kind, comment, correction, ingested_at)
    SELECT id, event_id, ts, prompt, variant, model, request_id, score, kind, comment,
           correction, ingested_at
      FROM feedback_events ORDER BY id;
DROP TABLE feedback_events;
ALTER TABLE feedback_events_v11 RENAME TO feedback_events;
CREATE INDEX feedback_events_request ON feedback_events (request_id);
CREATE INDEX feedback_events_episode ON feedback_events (episode_id)
    WHERE episode_id IS NOT NULL;
"""

# PostgreSQL drops NOT NULL in place; the row ids stay as they are.
_V11_EPISODES_POSTGRESQL: Final = """
ALTER TABLE metric_events ADD COLUMN episode_id TEXT;
CREATE INDEX metric_events_episode ON metric_events (episode_id) WHERE episode_id IS NOT NULL;
ALTER TABLE feedback_events
    ALTER COLUMN prompt DROP NOT NULL,
    ALTER COLUMN variant DROP NOT NULL,
    ALTER COLUMN request_id DROP NOT NULL,
    ADD COLUMN episode_id TEXT,
    ADD CHECK (request_id IS NOT NULL OR episode_id IS NOT NULL),
    ADD CHECK (request_id IS NULL OR (prompt IS NOT NULL AND variant IS NOT NULL));
CREATE INDEX feedback_events_episode ON feedback_events (episode_id)
    WHERE episode_id IS NOT NULL;
"""

_V12_PIPELINE_ROLLOUTS: Final = """
-- A coordinated rollout of a pipeline: one row (``prompt``, ``candidate`` and
-- ``baseline`` name its first changed step) with the pipeline's name and every member
-- prompt as JSON: [{"prompt", "baseline", "candidate" (null when the step is unchanged)}].
ALTER TABLE rollouts ADD COLUMN pipeline TEXT;
ALTER TABLE rollouts ADD COLUMN members TEXT;
"""

_V13_EVALUATION: Final = """
-- Who gave a piece of feedback: NULL for people and apps, 'eval:<name>' for the result of
-- the daemon's evaluator <name>. Readers count only NULL unless told otherwise.
ALTER TABLE feedback_events ADD COLUMN source TEXT;

-- One row per (call, evaluator) the evaluation engine decided, written before the
-- result is published as feedback (the outbox: published_at stays NULL until the
-- broker acknowledged it). ``status``: 'scored' (published as feedback) or 'invalid'
-- (the judge answered without a readable score; paid for, never published).
CREATE TABLE evaluation_results (
    request_id   TEXT    NOT NULL,
    evaluator    TEXT    NOT NULL,
    event_id     TEXT    NOT NULL UNIQUE,
    prompt       TEXT    NOT NULL,
    variant      TEXT    NOT NULL,
    model        TEXT,
    call_ts      REAL    NOT NULL,
    kind         TEXT    NOT NULL,
    status       TEXT    NOT NULL CHECK (status IN ('scored', 'invalid')),
    score        REAL    CHECK (score BETWEEN 0 AND 1),
    detail       TEXT,
    cost_usd     REAL    NOT NULL DEFAULT 0,
    created_at   REAL    NOT NULL,
    published_at REAL,
    PRIMARY KEY (request_id, evaluator),
    CHECK (status <> 'scored' OR score IS NOT NULL)
);
CREATE INDEX evaluation_results_created ON evaluation_results (created_at);
CREATE INDEX evaluation_results_outbox ON evaluation_results (created_at)
    WHERE published_at IS NULL AND status = 'scored';

-- The engine's durable cursor: every call with metric_events.id <= call_id has been
-- decided (evaluated, or skipped and counted). A start re-reads the calls above it.
CREATE TABLE evaluation_cursor (
    name       TEXT    PRIMARY KEY,
    call_id    INTEGER NOT NULL,
    updated_at REAL    NOT NULL
);
"""

_V14_EVENT_TIME: Final = """
-- Event time (see monitoring/eventtime.py). Each partition's watermark (the newest event
-- time read from it), written with its offset in the batch's transaction.
ALTER TABLE consumer_offsets ADD COLUMN watermark REAL;
-- The window watermark each batch was windowed under, keyed by the batch's ingested_at
-- (on every row it stored): a rebuild from storage admits exactly the events the live
-- windows admitted. No row: the batch had no watermark (nothing in it was late).
CREATE TABLE batch_watermarks (
    ingested_at REAL PRIMARY KEY,
    watermark   REAL NOT NULL
);
"""

_V15_STORE_IDENTITY: Final = """
-- The store knows itself (see storage/identity.py): an id made when the database is
-- created, the Kafka side it consumes (recorded by the first daemon that runs on it) and
-- the consumer-group member ids of the daemons that ran on it, newest last (JSON).
CREATE TABLE store_identity (
    id                INTEGER PRIMARY KEY CHECK (id = 1),
    store_id          TEXT    NOT NULL,
    created_at        REAL    NOT NULL,
    bootstrap_servers TEXT,
    group_id          TEXT,
    topics            TEXT,
    owners            TEXT    NOT NULL DEFAULT '[]'
);
"""
# The one row: a random id of 32 hex digits and the time of creation (epoch s), each
# backend's own way.
_V15_IDENTITY_ROW: Final = """
INSERT INTO store_identity (id, store_id, created_at)
    VALUES (1, lower(hex(randomblob(16))), (julianday('now') - 2440587.5) * 86400.0);
"""
_V15_IDENTITY_ROW_POSTGRESQL: Final = """
INSERT INTO store_identity (id, store_id, created_at)
    VALUES (1, replace(gen_random_uuid()::text, '-', ''), extract(epoch FROM clock_timestamp()));
"""

_V17_LEADERSHIP: Final = """
-- The leader lease of daemons sharing one store (PostgreSQL; unused by a single SQLite
-- daemon). ``generation`` grows by one with every new holder: the fencing token every
-- write transaction of the leader checks. Times are the database's clock (epoch s).
CREATE TABLE leadership (
    name        TEXT    PRIMARY KEY,
    holder      TEXT    NOT NULL,
    generation  INTEGER NOT NULL,
    address     TEXT,
    acquired_at REAL    NOT NULL,
    renewed_at  REAL    NOT NULL,
    expires_at  REAL    NOT NULL
);
"""


_V16_DEMO_POOLS: Final = """
-- Demonstration pools: versioned snapshots of a prompt's trusted production examples
-- (train split), from which a version with dynamic demos takes the nearest per request.
-- ``pool_id`` names the content (a hash of the demos and the embedding model), ``seq``
-- numbers a prompt's snapshots; ``demos`` is a JSON list of {id, input, answer} and
-- ``vectors`` their embeddings (base64 float32 rows, in the same order) when the pool is
-- for embedding retrieval. Snapshots never change; unpinned old ones are pruned.
CREATE TABLE demo_pools (
    prompt          TEXT    NOT NULL,
    pool_id         TEXT    NOT NULL,
    seq             INTEGER NOT NULL,
    created_at      REAL    NOT NULL,
    origin          TEXT    NOT NULL,
    size            INTEGER NOT NULL,
    embedding_model TEXT,
    dim             INTEGER,
    demos           TEXT    NOT NULL,
    vectors         TEXT,
    PRIMARY KEY (prompt, pool_id),
    UNIQUE (prompt, seq)
);

-- The demos a call was shown (JSON list of their ids, the request ids they came from).
ALTER TABLE metric_events ADD COLUMN demo_ids TEXT;
"""

_V18_INPUT_CHARS: Final = """
-- The size of a call's input without the prompt template (characters of what the app
-- passed in): a covariate the variant cannot change, for the rollouts' regression
-- adjustment (replacement/adjustment.py).
ALTER TABLE metric_events ADD COLUMN input_chars INTEGER CHECK (input_chars >= 0);
"""

MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(
        version=1,
        name="ingestion",
        sql=_V1_INGESTION,
        postgresql=POSTGRESQL_PRELUDE + ddl_to_postgresql(_V1_INGESTION),
    ),
    Migration(version=2, name="registry", sql=_V2_REGISTRY),
    Migration(version=3, name="alerts", sql=_V3_ALERTS),
    Migration(version=4, name="optimization", sql=_V4_OPTIMIZATION),
    Migration(version=5, name="optimization_search", sql=_V5_OPTIMIZATION_SEARCH),
    Migration(version=6, name="pipelines", sql=_V6_PIPELINES),
    Migration(version=7, name="rollout_final", sql=_V7_ROLLOUT_FINAL),
    Migration(version=8, name="prompt_configs", sql=_V8_PROMPT_CONFIGS),
    Migration(version=9, name="snapshots", sql=_V9_SNAPSHOTS),
    Migration(version=10, name="optimization_targets", sql=_V10_OPTIMIZATION_TARGETS),
    Migration(version=11, name="episodes", sql=_V11_EPISODES, postgresql=_V11_EPISODES_POSTGRESQL),
    Migration(version=12, name="pipeline_rollouts", sql=_V12_PIPELINE_ROLLOUTS),
    Migration(version=13, name="evaluation", sql=_V13_EVALUATION),
    Migration(version=14, name="event_time", sql=_V14_EVENT_TIME),
    Migration(
        version=15,
        name="store_identity",
        sql=_V15_STORE_IDENTITY + _V15_IDENTITY_ROW,
        postgresql=ddl_to_postgresql(_V15_STORE_IDENTITY) + _V15_IDENTITY_ROW_POSTGRESQL,
    ),
    Migration(version=16, name="demo_pools", sql=_V16_DEMO_POOLS),
    Migration(version=17, name="leadership", sql=_V17_LEADERSHIP),
    Migration(version=18, name="input_chars", sql=_V18_INPUT_CHARS),
)


def latest_version() -> int:
    """The schema version this code writes."""
    return MIGRATIONS[-1].version
