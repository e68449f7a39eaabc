"""Rollout profiles by name: configured ones, the built-in ones, and fixed-split experiments.

The HTTP routes name an experiment's profile when they start it; the controller looks
every profile up by name, so a restarted daemon rebuilds the same plan from the stored
rollout state.
"""

from __future__ import annotations

from functools import cache

from promptd.daemon.settings import RolloutSettings
from promptd.replacement.profiles import RolloutProfile, fixed_split_experiment, get_profile


def profile_lookup(settings: RolloutSettings) -> RolloutProfile | object:
    """A function name -> profile: configured profiles first, then the built-in ones,
    with every step duration, the starvation grace period and the ``require_win`` horizon
    multiplied by ``time_scale``."""

    @cache
    def lookup(name: str) -> RolloutProfile:
        base = settings.profiles.get(name) or _experiment(name) or get_profile(name)
        if settings.time_scale == 1.0:
            return base
        scale = settings.time_scale
        return base.model_copy(
            update={
                "steps": tuple(
                    s.model_copy(update={"min_duration_s": s.min_duration_s * scale})
                    for s in base.steps
                ),
                "starvation_grace_s": base.starvation_grace_s * scale,
                "win_max_duration_s": base.win_max_duration_s * scale,
            }
        )

    return lookup


EXPERIMENT_PREFIX = "experiment:"


def experiment_profile_name(
    candidate_share: float, min_samples_per_arm: int, alpha: float, min_duration_s: float
) -> str:
    """The profile name of a fixed-split experiment; the name carries its parameters so a
    restarted daemon rebuilds the same one-step plan from the stored rollout state."""
    return f"{EXPERIMENT_PREFIX}{candidate_share}:{min_samples_per_arm}:{alpha}:{min_duration_s}"


def _experiment(name: str) -> RolloutProfile | None:
    if not name.startswith(EXPERIMENT_PREFIX):
        return None
    try:
        share, samples, alpha, duration = name.removeprefix(EXPERIMENT_PREFIX).split(":")
        return fixed_split_experiment(
            float(share),
            min_samples_per_arm=int(samples),
            alpha=float(alpha),
            min_duration_s=float(duration),
            name=name,
        )
    except ValueError as exc:
        raise KeyError(f"malformed experiment profile {name!r}: {exc}") from None
