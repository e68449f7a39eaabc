"""Prompt configurations: chat messages with a model and its parameters (light, no pydantic).

A prompt version is either a single ``str.format`` template, or a **configuration**::

    {
      "messages": [
        {"role": "system", "content": "You extract facts."},
        {"role": "user", "content": "Text: {text}"}
      ],
      "model": "gpt-4o-mini",                 # optional: the model to call
      "params": {"temperature": 0.2},         # optional: temperature, max_tokens, top_p, stop, seed
      "output_schema": {...},                 # optional: a JSON schema the answer follows
      "tunable": {"models": [...], "temperature": [...]},  # optional: what the optimizer may change
      "demos": {"source": "pool", "pool": "pool-…", "k": 4, ...},  # optional: per-request demos
      "ensemble": {"n": 5, "temperature": 0.7, "answer": "label"}  # optional: majority vote
    }

``demos`` and ``ensemble`` are described in :mod:`promptd.demos`.

Every message's ``content`` is a ``str.format`` template over the same placeholders. The
app renders the messages with its values (``PromptVariant.messages(...)`` in the SDK) and
sends them with the model and parameters. The daemon validates configurations with
pydantic (``promptd.replacement.registry.PromptConfig``); this module only reads them, so
``import promptd`` stays light.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final

ROLES: Final = ("system", "user", "assistant")
PARAMS: Final = ("temperature", "max_tokens", "top_p", "stop", "seed")


def render_messages(config: Mapping[str, Any], values: Mapping[str, Any]) -> list[dict[str, str]]:
    """The configuration's messages with ``values`` filled in (``str.format``)."""
    return [
        {"role": str(m["role"]), "content": str(m["content"]).format(**values)}
        for m in config["messages"]
    ]


def describe(config: Mapping[str, Any]) -> str:
    """A readable, canonical text of a configuration (the registry's ``template`` column of
    a configuration version, and what de-duplicates them)."""
    parts = [f"[{m['role']}]\n{m['content']}" for m in config["messages"]]
    if config.get("model"):
        parts.append(f"[model] {config['model']}")
    if config.get("params"):
        parts.append(f"[params] {json.dumps(config['params'], sort_keys=True)}")
    if config.get("output_schema"):
        parts.append(f"[output_schema] {json.dumps(config['output_schema'], sort_keys=True)}")
    if config.get("demos"):
        parts.append(f"[demos] {json.dumps(config['demos'], sort_keys=True)}")
    if config.get("ensemble"):
        n = config["ensemble"].get("n", 1)
        parts.append(
            f"[ensemble] {json.dumps(config['ensemble'], sort_keys=True)} "
            f"({n} model calls per request)"
        )
    return "\n\n".join(parts)
