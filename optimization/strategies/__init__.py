"""Search strategies and their registry.

Built in:

* ``fewshot`` — random search over demonstration sets from the train split, each scored
  on validation (BootstrapFewShotWithRandomSearch); the only one that works without a
  proposer model;
* ``instruction`` — instruction rewrites over breadth x depth rounds, each round's
  proposer seeing every earlier candidate with its validation score (COPRO);
* ``mipro`` — proposed instructions x demonstration sets, searched jointly with optuna's
  TPE sampler on validation minibatches, the best few re-scored on the whole split
  (MIPROv2);
* ``knn`` — demonstrations retrieved per input from a pool of the train split's trusted
  examples (KNNFewShot), searching k, the distance cut-off, the retriever and the
  instruction; the version pins the pool, the app's SDK retrieves per request;
* ``gepa`` — the ``gepa`` package's reflective evolutionary search through promptd's
  adapter (optional: ``pip install 'promptd[gepa]'``).

More can be added without editing this module: call :func:`register_strategy`, or
expose a factory under the ``promptd.strategies`` entry-point group of an installed
package (loaded on first use). Names in ``optimization.strategies`` are checked against
this registry when the daemon starts.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable

import structlog

from promptd.optimization.config import OptimizationSettings
from promptd.optimization.strategies.base import (
    Candidate,
    SearchContext,
    SearchResult,
    Strategy,
)

log = structlog.get_logger("promptd.optimizer")

ENTRY_POINT_GROUP = "promptd.strategies"

StrategyFactory = Callable[[], Strategy]

_REGISTRY: dict[str, StrategyFactory] = {}
_entry_points_loaded = False


def register_strategy(name: str, factory: StrategyFactory, *, replace: bool = False) -> None:
    """Make ``name`` available to runs; ``replace`` to override an existing one."""
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"strategy name {name!r}: use letters, digits, '-' and '_'")
    if name in _REGISTRY and not replace:
        raise ValueError(f"strategy {name!r} is already registered (pass replace=True)")
    _REGISTRY[name] = factory


def _builtins() -> None:
    from promptd.optimization.strategies.fewshot import FewShotSearch
    from promptd.optimization.strategies.gepa_search import GepaSearch
    from promptd.optimization.strategies.instruction import InstructionSearch
    from promptd.optimization.strategies.knn import KnnSearch
    from promptd.optimization.strategies.mipro import MiproSearch

    for factory in (FewShotSearch, InstructionSearch, MiproSearch, KnnSearch, GepaSearch):
        _REGISTRY.setdefault(factory.name, factory)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            factory = ep.load()
        except Exception:
            log.exception("strategy_entry_point_failed", entry_point=ep.name)
            continue
        _REGISTRY.setdefault(ep.name, factory)


def known_strategies() -> list[str]:
    """Every registered strategy name, built-in ones and plug-ins."""
    _builtins()
    _load_entry_points()
    return sorted(_REGISTRY)


def get_strategy(name: str) -> Strategy:
    """A new instance of strategy ``name``; ``KeyError`` naming the known ones."""
    known = known_strategies()
    if name not in _REGISTRY:
        raise KeyError(f"unknown strategy {name!r}; known: {known}")
    return _REGISTRY[name]()


def available(
    names: tuple[str, ...], settings: OptimizationSettings, pipeline: bool = False
) -> dict[str, str | None]:
    """For each of ``names``: ``None`` when it can run with ``settings`` (on a pipeline,
    when ``pipeline``), else why not."""
    out = {}
    for name in names:
        strategy = get_strategy(name)
        why = strategy.unavailable(settings)
        if why is None and pipeline and not getattr(strategy, "pipelines", False):
            why = "not for pipelines (its search reads one prompt's examples)"
        out[name] = why
    return out


__all__ = [
    "Candidate",
    "SearchContext",
    "SearchResult",
    "Strategy",
    "available",
    "get_strategy",
    "known_strategies",
    "register_strategy",
]
