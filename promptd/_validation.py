"""pydantic validation errors as one line a person can act on.

pydantic's messages are written for developers: ``Value error, …`` prefixes, and for a
misspelled key two errors (``Extra inputs are not permitted`` on the key, ``Field
required`` on the one meant). :func:`validation_message` names the unknown key first,
with the closest allowed name when the model is known, and drops the prefixes.

Nothing here imports pydantic at import time (``import promptd`` stays light).
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError

_PREFIXES = ("Value error, ", "Assertion failed, ")


def clean_message(message: str) -> str:
    """pydantic's message without its ``Value error, `` style prefix."""
    for prefix in _PREFIXES:
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def validation_message(
    exc: ValidationError, model: type[BaseModel] | None = None, skip: Sequence[str] = ()
) -> str:
    """The most useful error of ``exc`` as ``location: message``.

    An unknown key wins over the other errors (a misspelled key also makes the key that
    was meant "required"); with ``model`` it names the closest allowed key. Location
    parts in ``skip`` (e.g. a discriminator's tag) are left out.
    """
    errors = exc.errors(include_url=False, include_input=False)
    unknown = [e for e in errors if e["type"] == "extra_forbidden"]
    err = unknown[0] if unknown else errors[0]
    loc = [part for part in err["loc"] if part not in skip]
    if err["type"] == "extra_forbidden" and loc:
        key = loc[-1]
        where = ".".join(str(p) for p in loc[:-1])
        message = f"unknown key {key!r}" + _did_you_mean(model, loc[:-1], str(key))
        return f"{where}: {message}" if where else message
    where = ".".join(str(p) for p in loc)
    message = clean_message(str(err["msg"]))
    return f"{where}: {message}" if where else message


def _did_you_mean(model: type[BaseModel] | None, path: Sequence[Any], key: str) -> str:
    container = _model_at(model, path) if model is not None else None
    if container is None:
        return ""
    allowed = list(container.model_fields)
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f" ({hint}allowed: {', '.join(allowed)})"


def _model_at(model: type[BaseModel], path: Sequence[Any]) -> type[BaseModel] | None:
    """The model validating the object at ``path`` below ``model`` (list indexes skipped)."""
    current: type[BaseModel] | None = model
    for part in path:
        if isinstance(part, int) or current is None:
            continue
        info = current.model_fields.get(str(part))
        current = _model_in(info.annotation) if info is not None else None
    return current


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model in ``Model``, ``Model | None``, ``list[Model]`` and the like."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, tuple, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None
