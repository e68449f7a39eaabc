"""Context variables through which apps read the current call, set the unit id and scope
episodes.

They follow the app's context: a thread, an asyncio task, or a request in a framework
that copies contexts. Inside an instrumented call ``current_request_id()`` and
``current_variant()`` describe that call; after it returns, ``last_request_id()`` still
names it in the caller's context (for example, to return it to a client for feedback).

**Episodes.** The instrumented calls made inside ``with promptd.episode() as ep:`` (or
``async with``) share ``ep.id`` as their ``episode_id``. Outside an explicit episode, an
instrumented call that makes other instrumented calls (a decorated function calling
another) opens one implicitly: the nested calls and the outer call itself carry the outer
call's request id as their episode id. A call with nothing nested carries none.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from promptd.sdk.routing_client import PromptVariant

#: Longest episode id (the event contract's limit on ids).
MAX_EPISODE_ID_CHARS = 128

request_id_var: ContextVar[str | None] = ContextVar("promptd_request_id", default=None)
last_request_id_var: ContextVar[str | None] = ContextVar("promptd_last_request_id", default=None)
variant_var: ContextVar[PromptVariant | None] = ContextVar("promptd_variant", default=None)
unit_id_var: ContextVar[str | None] = ContextVar("promptd_unit_id", default=None)


class _EnclosingCall(Protocol):
    """An instrumented call running in this context (``instrument._Call``)."""

    request_id: str
    episode_id: str | None


#: The episode scope of this context: an :class:`Episode`, the outermost instrumented
#: call running (its implicit episode), or None.
episode_var: ContextVar[Episode | _EnclosingCall | None] = ContextVar(
    "promptd_episode", default=None
)


def new_episode_id() -> str:
    """A fresh episode id: 32 random hex digits."""
    return os.urandom(16).hex()


class Episode:
    """One unit of work (a pipeline run, an agent turn): see :func:`episode`."""

    __slots__ = ("_tokens", "id")

    def __init__(self, episode_id: str | None = None) -> None:
        if episode_id is None:
            episode_id = new_episode_id()
        elif not isinstance(episode_id, str) or not 0 < len(episode_id) <= MAX_EPISODE_ID_CHARS:
            raise ValueError(
                f"an episode id is a string of 1 to {MAX_EPISODE_ID_CHARS} characters, "
                f"got {episode_id!r:.60}"
            )
        #: The episode id every instrumented call inside carries.
        self.id: str = episode_id
        self._tokens: list[Token[Episode | _EnclosingCall | None]] = []

    def __enter__(self) -> Episode:
        self._tokens.append(episode_var.set(self))
        return self

    def __exit__(self, *exc: object) -> None:
        episode_var.reset(self._tokens.pop())

    async def __aenter__(self) -> Episode:
        return self.__enter__()

    async def __aexit__(self, *exc: object) -> None:
        self.__exit__()

    def feedback(
        self,
        score: float | bool,
        kind: str = "quality",
        comment: str | None = None,
        correction: Any = None,
    ) -> None:
        """Feedback on the whole episode: ``promptd.feedback(episode_id=self.id, ...)``."""
        from promptd.sdk.client import feedback

        feedback(None, score, kind, comment, correction, episode_id=self.id)

    def __repr__(self) -> str:
        return f"promptd.Episode({self.id!r})"


def episode(episode_id: str | None = None) -> Episode:
    """A scope whose instrumented calls share one episode id, ``ep.id``.

    ``with promptd.episode() as ep:`` or ``async with promptd.episode() as ep:``; a new
    random id unless ``episode_id`` is given (at most 128 characters). Nested calls of
    instrumented functions inherit it through the context; a nested ``episode()`` starts
    its own until it ends. Inside an episode, calls without a unit id are routed by the
    episode id, so every call of the episode lands in the same arm of a rollout.
    """
    return Episode(episode_id)


def current_episode_id() -> str | None:
    """The episode id of this context: the open ``episode()``'s, or, inside an instrumented
    call, its implicit episode's (which the call then carries); None elsewhere."""
    scope = episode_var.get()
    if scope is None:
        return None
    if isinstance(scope, Episode):
        return scope.id
    if scope.episode_id is None:
        scope.episode_id = scope.request_id
    return scope.episode_id


def current_request_id() -> str | None:
    """The request id of the instrumented call running in this context, if any."""
    return request_id_var.get()


def last_request_id() -> str | None:
    """The request id of the latest instrumented call made in this context."""
    return last_request_id_var.get()


def current_variant() -> PromptVariant | None:
    """The prompt variant chosen for the instrumented call running in this context."""
    return variant_var.get()


def set_unit_id(unit_id: str | None) -> None:
    """Set the assignment unit (user, session) for later calls in this context."""
    unit_id_var.set(unit_id)


@contextmanager
def unit_scope(unit_id: str | None) -> Iterator[None]:
    """Route the calls inside the ``with`` block for ``unit_id``; restores the old unit."""
    token = unit_id_var.set(unit_id)
    try:
        yield
    finally:
        unit_id_var.reset(token)
