"""HTTP routes of demonstration pools (``/v1/prompts/{name}/pools``, ``.../embed``).

* ``GET /v1/prompts/{name}/pools``: the prompt's snapshots, newest first (no demos);
* ``GET /v1/prompts/{name}/pools/{pool}``: one snapshot with its demos (and vectors):
  what the SDK fetches with routing. Snapshots never change, so it may be cached;
* ``POST /v1/prompts/{name}/pools`` (admin): build a snapshot now from the prompt's
  trusted train-split examples (``{"embedding": true}`` with the embedding model's
  vectors); 201 with the snapshot, which a version can then pin;
* ``POST /v1/prompts/{name}/embed``: ``{"text": …}`` to ``{"model", "vector"}`` with the
  daemon's embedding model, for apps that leave embedding their inputs to the daemon
  (it spends the daemon's embedding key: apps that can should embed themselves).
"""

from __future__ import annotations

from typing import Final

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from promptd.daemon.http import admin_only, domain_errors, json_error, read_body
from promptd.demos import fields_of, final_template
from promptd.optimization.config import LLMSettings
from promptd.optimization.embeddings import MAX_TEXT_CHARS, litellm_embed
from promptd.optimization.llm import LLMError
from promptd.optimization.pool_refresh import PoolBuilder
from promptd.replacement.registry import NotFound, Registry, Unprocessable, check_name
from promptd.storage.pools import PoolStore

POOLS_KEY: Final = web.AppKey("demo_pools", PoolStore)
BUILDER_KEY: Final = web.AppKey("demo_pool_builder", PoolBuilder)
POOL_REGISTRY_KEY: Final = web.AppKey("demo_pool_registry", Registry)
EMBEDDING_KEY: Final = web.AppKey("demo_pool_embedding", LLMSettings)


class BuildPool(BaseModel):
    """Body of ``POST /v1/prompts/{name}/pools``."""

    model_config = ConfigDict(extra="forbid")

    embedding: StrictBool = False


class EmbedText(BaseModel):
    """Body of ``POST /v1/prompts/{name}/embed``."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(max_length=MAX_TEXT_CHARS)


@domain_errors
async def list_pools(request: web.Request) -> web.StreamResponse:
    """``GET /v1/prompts/{name}/pools``."""
    name = check_name("prompt", request.match_info["name"])
    await request.app[POOL_REGISTRY_KEY].get_prompt(name)
    pools = await request.app[POOLS_KEY].list(name)
    return web.json_response({"pools": [p.to_dict() for p in pools]})


@domain_errors
async def get_pool(request: web.Request) -> web.StreamResponse:
    """``GET /v1/prompts/{name}/pools/{pool}``."""
    name = check_name("prompt", request.match_info["name"])
    pool = await request.app[POOLS_KEY].get(name, request.match_info["pool"])
    if pool is None:
        raise NotFound(f"prompt {name!r} has no pool {request.match_info['pool']!r}")
    return web.json_response(pool.to_dict(), headers={"Cache-Control": "max-age=31536000"})


@admin_only
async def build_pool(request: web.Request) -> web.StreamResponse:
    """``POST /v1/prompts/{name}/pools``."""
    name = check_name("prompt", request.match_info["name"])
    body = await read_body(request, BuildPool)
    active = await request.app[POOL_REGISTRY_KEY].active(name)
    if active is None or active.config is None:
        raise Unprocessable(
            f"prompt {name!r} has no active chat configuration: per-request demos need one"
        )
    try:
        info, _demos = await request.app[BUILDER_KEY].build(
            name, fields_of(final_template(active.config)), body.embedding, "manual"
        )
    except ValueError as exc:
        raise Unprocessable(str(exc)) from None
    except LLMError as exc:
        return json_error(502, f"the embedding model failed: {exc}")
    return web.json_response(info.to_dict(), status=201)


@domain_errors
async def embed(request: web.Request) -> web.StreamResponse:
    """``POST /v1/prompts/{name}/embed``."""
    check_name("prompt", request.match_info["name"])
    # The body first: an oversized one is a 413 whatever the configuration.
    body = await read_body(request, EmbedText)
    model = request.app.get(EMBEDDING_KEY)
    if model is None:
        raise Unprocessable("no embedding model is configured ([optimization.knn.embedding])")
    try:
        embedded = await litellm_embed(model, [body.text])
    except LLMError as exc:
        return json_error(502, f"the embedding model failed: {exc}")
    return web.json_response({"model": model.model, "vector": embedded.vectors[0]})


def add_routes(
    app: web.Application,
    store: PoolStore,
    builder: PoolBuilder,
    registry: Registry,
    embedding: LLMSettings | None,
) -> None:
    """Register the pool routes on ``app``."""
    app[POOLS_KEY] = store
    app[BUILDER_KEY] = builder
    app[POOL_REGISTRY_KEY] = registry
    if embedding is not None:
        app[EMBEDDING_KEY] = embedding
    r = app.router
    r.add_get("/v1/prompts/{name}/pools", list_pools)
    r.add_post("/v1/prompts/{name}/pools", build_pool)
    r.add_get("/v1/prompts/{name}/pools/{pool}", get_pool)
    r.add_post("/v1/prompts/{name}/embed", embed)
