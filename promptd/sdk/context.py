"""Context variables through which apps read the current call and set the unit id.

They follow the app's context: a thread, an asyncio task, or a request in a framework
that copies contexts. Inside an instrumented call ``current_request_id()`` and
``current_variant()`` describe that call; after it returns, ``last_request_id()`` still
names it in the caller's context (for example, to return it to a client for feedback).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from promptd.sdk.routing_client import PromptVariant

request_id_var: ContextVar[str | None] = ContextVar("promptd_request_id", default=None)
last_request_id_var: ContextVar[str | None] = ContextVar("promptd_last_request_id", default=None)
variant_var: ContextVar[PromptVariant | None] = ContextVar("promptd_variant", default=None)
unit_id_var: ContextVar[str | None] = ContextVar("promptd_unit_id", default=None)


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
