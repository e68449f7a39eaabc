"""Prompt registry, sticky routing, rollout state machine, A/B statistics."""
