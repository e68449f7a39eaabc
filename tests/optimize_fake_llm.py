"""A local OpenAI-compatible server for the optimizer's tests: litellm talks to it over HTTP.

Answers ``POST /v1/chat/completions`` with whatever the test's ``responder`` returns for
the request body: a string (a 200 answer with usage figures), a ``(status, body)``
tuple for errors such as a 429, or a dict with the ``content`` and the choice's
``logprobs`` (OpenAI's shape: ``{"content": [{"token", "logprob", "top_logprobs"}]}``).
Every request body is recorded in ``requests``. ``POST /v1/embeddings`` answers with
:func:`word_vector` of each text (recorded in ``embedded``).
"""

from __future__ import annotations

import asyncio
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

Answer = str | tuple[int, dict[str, Any]] | dict[str, Any]
Responder = Callable[[dict[str, Any]], Answer | Awaitable[Answer]]


class FakeLLM:
    """The server; start with ``await fake.start()``, stop with ``await fake.stop()``."""

    def __init__(self, responder: Responder, prompt_tokens: int = 100, completion_tokens: int = 50):
        self.responder = responder
        self.requests: list[dict[str, Any]] = []
        # Texts of each ``POST /v1/embeddings`` request, in order.
        self.embedded: list[list[str]] = []
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def api_base(self) -> str:
        """The ``api_base`` litellm should use (OpenAI style, ending in /v1)."""
        return f"http://127.0.0.1:{self.port}/v1"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        answer = self.responder(body)
        if asyncio.iscoroutine(answer):
            answer = await answer
        if isinstance(answer, tuple):
            status, payload = answer
            return web.json_response(payload, status=status)
        extra: dict[str, Any] = {}
        if isinstance(answer, dict):
            extra = {"logprobs": answer.get("logprobs")}
            answer = str(answer["content"])
        return web.json_response(
            {
                "id": f"chatcmpl-{len(self.requests)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "test-model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": answer},
                        "finish_reason": "stop",
                        **extra,
                    }
                ],
                "usage": {
                    "prompt_tokens": self.prompt_tokens,
                    "completion_tokens": self.completion_tokens,
                    "total_tokens": self.prompt_tokens + self.completion_tokens,
                },
            }
        )

    async def _embed(self, request: web.Request) -> web.Response:
        body = await request.json()
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        self.embedded.append(list(texts))
        data = [
            {"object": "embedding", "index": i, "embedding": word_vector(text)}
            for i, text in enumerate(texts)
        ]
        usage = {"prompt_tokens": 3 * len(texts), "total_tokens": 3 * len(texts)}
        return web.json_response({"object": "list", "data": data, "model": "e", "usage": usage})

    async def start(self) -> FakeLLM:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/v1/embeddings", self._embed)
        # A request a test holds forever (a call in flight when a daemon is killed) is
        # cancelled a second after stop(), not after aiohttp's default minute.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        """Close the server."""
        if self._runner is not None:
            await self._runner.cleanup()


def word_vector(text: str, dim: int = 32) -> list[float]:
    """The fake embedding: counts of the text's words hashed into ``dim`` buckets."""
    vector = [0.0] * dim
    for word in text.lower().split():
        vector[zlib.crc32(word.encode()) % dim] += 1.0
    return vector


RATE_LIMITED: tuple[int, dict[str, Any]] = (
    429,
    {"error": {"message": "rate limited", "type": "rate_limit_error", "code": "rate_limit"}},
)


@asynccontextmanager
async def serving(answer: Any) -> AsyncIterator[FakeLLM]:
    """A started :class:`FakeLLM` answering with ``answer``; litellm's clients are closed
    before it stops (they hold connections to it)."""
    from promptd.optimization.llm import close_litellm

    server = await FakeLLM(answer).start()
    try:
        yield server
    finally:
        await close_litellm()
        await server.stop()


def user_text(body: dict[str, Any]) -> str:
    """All message contents of a request, joined (for routing answers in responders)."""
    return "\n".join(str(m.get("content", "")) for m in body.get("messages", []))
