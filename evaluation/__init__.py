"""Online evaluation: evaluators score a sample of live calls, and their scores become
feedback events with a ``source`` (``eval:<name>``).

The modules, by concept (pure logic unless said otherwise):

- :mod:`.config`: the ``[evaluation]`` settings: evaluators (code checks and LLM judges),
  their selectors, sample rates, budgets, ``only_if``; validated at start.
- :mod:`.sampling`: which calls an evaluator takes (a stable hash of ``request_id`` and the
  evaluator's name), cheap enough for the ingest path.
- :mod:`.budget`: calls per minute and dollars per day, per evaluator.
- :mod:`.checks`: the code checks (JSON schema, regex, contains, length, a user function).
- :mod:`.judge`: the LLM judge's messages and how its answer becomes a 0..1 score.
- :mod:`.cursor`: the durable cursor over stored calls (what a restart resumes from).
- :mod:`.health`: an evaluator's outage state (consecutive failures, probes).
- :mod:`.agreement`: Spearman's rank correlation and Cohen's kappa with confidence
  intervals; :mod:`.calibration`: the human/judge pairs per prompt and the agreement alert.
- :mod:`.signals`: quality signals by name (``"human"``, ``"eval:<name>"``) as SQL and row
  filters.
- :mod:`.store` (SQL), :mod:`.metrics` (Prometheus), :mod:`.engine` (the asyncio shell),
  :mod:`.component` (wiring into the daemon).
"""
