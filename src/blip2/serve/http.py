"""The HTTP API (FastAPI): OpenAI's chat completions (streamed as server-sent events), models and embeddings, plus
``/health``, ``/metrics`` (Prometheus text) and, with a search index, ``/v1/search``; the web app at ``/``.

Every error is OpenAI's JSON, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad request (the field
named), 401 without the API key, 404 for an unknown model or path, 413 for too many bytes or pixels, 429 with
``Retry-After`` when the queue is full; 5xx only for bugs. A streaming client that disconnects cancels its request
(its row is free at the engine's next step); so does one that disconnects while waiting for a whole reply.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import struct
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import jinja2
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from blip2.infer.chat import CHAT_MAX_NEW_TOKENS
from blip2.infer.embeddings import qformer_lengths
from blip2.serve import protocol
from blip2.serve.engine import Delta, Engine, EngineClosed, Failed, Finished, QueueFull
from blip2.serve.media import MediaError, MediaPolicy, fetch_image
from blip2.serve.prompts import Message, UserImage

log = logging.getLogger("blip2.serve")


@dataclass
class ServerSettings:
    model_name: str = "default"
    api_key: str | None = None
    media: MediaPolicy = field(default_factory=MediaPolicy)
    max_images: int = 1  # per conversation

    @property
    def max_request_bytes(self) -> int:
        """Base64 images grow by 4/3; 1 MiB for the text around them."""
        return self.media.max_bytes * 4 // 3 * max(self.max_images, 1) + (1 << 20)


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.body, self.headers = status, protocol.error_body(message, kind, param, code), headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status, headers=self.headers)


def create_app(engine: Engine, settings: ServerSettings, index=None, web_app: bool = True) -> FastAPI:
    """The server's ASGI app. Its lifespan starts the engine's thread (if not running) and stops it at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        started = not engine.started
        if started:
            engine.start()
        yield
        if started:
            engine.stop()

    app = FastAPI(title="blip2", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    _install_error_handlers(app)
    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    auth = Depends(_auth(settings.api_key))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "running": engine.running, "waiting": engine.waiting}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(prometheus_text(engine), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=[auth])
    async def models():
        return {"object": "list", "data": [_model_card(settings.model_name)]}

    @app.get("/v1/models/{name:path}", dependencies=[auth])
    async def model(name: str):
        _check_model(name, settings)
        return _model_card(name)

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat_completions(body: protocol.ChatCompletionRequest, request: Request):
        _check_model(body.model, settings)
        messages = await to_messages(body, settings)
        try:
            prompt = engine.prompt(messages, body.prompt_format)
            max_new = body.max_completion_tokens or body.max_tokens or default_max_tokens(engine, prompt)
            handle = engine.submit(prompt, body.options(max_new), body.stops())
        except QueueFull as error:
            raise APIError(429, str(error), "rate_limit_error", headers={"Retry-After": str(error.retry_after)})
        except EngineClosed as error:
            raise APIError(503, str(error), "server_error")
        except (ValueError, jinja2.TemplateError) as error:
            raise APIError(400, str(error), param="messages")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse_events(handle, settings.model_name, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})  # fmt: skip
        finished = await _result_unless_disconnected(handle, request)
        return protocol.chat_completion(handle.id, settings.model_name, finished.text, finished.finish_reason,
                                        _usage(finished))  # fmt: skip

    @app.post("/v1/embeddings", dependencies=[auth])
    async def embeddings(body: protocol.EmbeddingRequest):
        _check_model(body.model, settings)
        if body.dimensions is not None:
            size = engine.model.cfg.qformer.embed_dim
            raise APIError(400, f"dimensions: this model's embeddings have a fixed size ({size}); leave it out",
                           param="dimensions")  # fmt: skip
        items = body.input if isinstance(body.input, list) else [body.input]
        inputs = [await _embedding_input(item, i, settings) for i, item in enumerate(items)]
        try:
            vectors, tokens = await asyncio.wrap_future(engine.call(lambda: _embed(engine, inputs)))
        except EngineClosed as error:
            raise APIError(503, str(error), "server_error")
        except ValueError as error:
            raise APIError(400, str(error), param="input")
        data = [{"object": "embedding", "index": i, "embedding": _encode(vector, body.encoding_format)}
                for i, vector in enumerate(vectors)]  # fmt: skip
        return {"object": "list", "data": data, "model": settings.model_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}  # fmt: skip

    if index is not None:

        @app.post("/v1/search", dependencies=[auth])
        async def search(body: protocol.SearchRequest):
            _check_model(body.model, settings)
            if (body.query is None) == (body.image_url is None):
                raise APIError(400, "give either query (a text) or image_url (an image), one of the two")
            image = None
            if body.image_url is not None:
                image = (await _image(body.image_url.url, "image_url", settings)).image

            def run() -> list[dict]:
                hits = index.search(body.query, image=image, k=body.k, rerank=body.rerank)
                return [_hit(index, hit, body.thumbnails) for hit in hits]

            try:
                hits = await asyncio.wrap_future(engine.call(run))
            except ValueError as error:  # SearchIndexError: an empty query, rerank with an image, ...
                raise APIError(400, str(error))
            return {"object": "list", "data": hits, "model": settings.model_name}

    if web_app:
        from blip2.serve.webapp import (
            mount_app,  # gradio loads slowly: only when the app is served
        )

        mount_app(app, engine, settings, index)
    return app


# ---- chat --------------------------------------------------------------------------------------------------------


async def to_messages(body: protocol.ChatCompletionRequest, settings: ServerSettings) -> list[Message]:
    """OpenAI messages -> the engine's, images fetched and decoded; each problem named by its place."""
    count = sum(isinstance(part, protocol.ImagePart) for m in body.messages if isinstance(m.content, list)
                for part in m.content)  # fmt: skip
    if count > settings.max_images:
        raise APIError(400, f"the conversation has {count} images; this server reads at most {settings.max_images} "
                            "per conversation (--max-images)", param="messages")  # fmt: skip
    messages = []
    for i, message in enumerate(body.messages):
        role = "system" if message.role == "developer" else message.role
        parts = [message.content] if isinstance(message.content, str) else (message.content or [])
        texts, images = [], []
        for j, part in enumerate(parts):
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, protocol.TextPart):
                texts.append(part.text)
            elif role != "user":
                raise APIError(400, f"messages[{i}].content[{j}]: images go in user messages, not {role} ones",
                               param=f"messages[{i}].content[{j}]")  # fmt: skip
            else:
                images.append(await _image(part.image_url.url, f"messages[{i}].content[{j}].image_url", settings))
        text = "\n".join(texts)
        if role != "system":
            text = text.strip()
        if role == "user" and not text and not images:
            raise APIError(400, f"messages[{i}] is empty: give some text or an image", param=f"messages[{i}].content")
        messages.append(Message(role, text, tuple(images)))
    if messages[-1].role != "user":
        raise APIError(400, f"the last message is from the {messages[-1].role}; it must be from the user, whose "
                            "message the reply answers", param="messages")  # fmt: skip
    return messages


async def _image(url: str, where: str, settings: ServerSettings) -> UserImage:
    try:
        return await fetch_image(url, settings.media, where)
    except MediaError as error:
        raise APIError(error.status, str(error), param=where.split(".image_url")[0])


def default_max_tokens(engine: Engine, prompt) -> int:
    """What is left of the context after the prompt, at most a chat reply's default length."""
    if engine.context is None:
        return CHAT_MAX_NEW_TOKENS
    engine.check_length(prompt, 1)
    return min(CHAT_MAX_NEW_TOKENS, engine.context - len(prompt.ids))


def _usage(finished: Finished) -> dict:
    u = finished.usage
    return protocol.usage(u.prompt_tokens, u.completion_tokens, u.cached_tokens)


async def sse_events(handle, model_name: str, include_usage: bool) -> AsyncIterator[str]:
    """``data: {chunk}`` lines ending with ``data: [DONE]``; the request is cancelled if the client goes away."""

    def line(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    try:
        yield line(protocol.chat_chunk(handle.id, model_name, {"role": "assistant", "content": ""}))
        async for event in handle.aevents():
            if isinstance(event, Delta):
                yield line(protocol.chat_chunk(handle.id, model_name, {"content": event.text}))
            elif isinstance(event, Finished):
                yield line(protocol.chat_chunk(handle.id, model_name, {}, event.finish_reason))
                if include_usage:
                    yield line(protocol.chat_chunk(handle.id, model_name, {}, usage_=_usage(event), choices=False))
            elif isinstance(event, Failed):
                yield line(_failure(event.error).body)
        yield "data: [DONE]\n\n"
    finally:
        handle.cancel()  # a no-op once finished; frees the row if the client went away


def _failure(error: Exception) -> APIError:
    if isinstance(error, ValueError):
        return APIError(400, str(error))
    if isinstance(error, EngineClosed):
        return APIError(503, str(error), "server_error")
    log.error("request failed", exc_info=error)
    return APIError(500, f"internal error ({type(error).__name__}: {error})", "server_error")


async def _result_unless_disconnected(handle, request: Request) -> Finished:
    """The whole reply; if the client disconnects first, the request is cancelled."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    result, gone = asyncio.ensure_future(handle.aresult()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not result.done():
            handle.cancel()
            result.cancel()
    if not result.done():
        raise APIError(499, "the client closed the connection")
    try:
        return result.result()
    except Exception as error:
        raise _failure(error) from error


# ---- embeddings, search ---------------------------------------------------------------------------------------------


async def _embedding_input(item, i: int, settings: ServerSettings) -> str | UserImage:
    if isinstance(item, protocol.ImageInput):
        return await _image(item.image_url.url, f"input[{i}].image_url", settings)
    if item.startswith("data:image/"):
        return await _image(item, f"input[{i}]", settings)
    if not item.strip():
        raise APIError(400, f"input[{i}] is empty: give some text", param=f"input[{i}]")
    return item


def _embed(engine: Engine, inputs: list) -> tuple[list, int]:
    """(vectors: texts [E], images [Q * E] (one E-vector per query, row after row; E = 256 in BLIP-2), Q-Former
    text tokens)."""
    pipe = engine.pipe
    texts = [item for item in inputs if isinstance(item, str)]
    text_vectors = iter(pipe.text_embeddings(texts) if texts else [])
    tokens = sum(qformer_lengths(pipe, texts)) if texts else 0
    vectors = [next(text_vectors) if isinstance(item, str) else engine.itc_embedding(item).flatten() for item in inputs]
    return [vector.float().cpu().tolist() for vector in vectors], tokens


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def _hit(index, hit, thumbnail: bool) -> dict:
    found = hit.as_dict()
    if thumbnail:
        found["thumbnail"] = "data:image/jpeg;base64," + base64.b64encode(index.thumbnail(hit.image_id)).decode()
    return found


# ---- plumbing ------------------------------------------------------------------------------------------------------


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "blip2"}


def _check_model(name: str | None, settings: ServerSettings) -> None:
    if name is not None and name != settings.model_name:
        raise APIError(404, f"model {name!r} is not served here; this server serves {settings.model_name!r}",
                       param="model", code="model_not_found")  # fmt: skip


def _auth(key: str | None):
    async def check(request: Request) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key")  # fmt: skip

    return check


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return _validation_error(error.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {error.detail}"
        return APIError(error.status_code, message, "invalid_request_error", headers=error.headers).response()


def _validation_error(errors: list[dict]) -> APIError:
    """The most specific problem pydantic found (the deepest), as one line naming the field (``messages[0].role``)."""
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})")
    parts = []
    for part in first.get("loc", ())[1:]:  # after "body"
        # pydantic names union branches ("str", "list[...]") and repeats a tagged union's tag ("image_url"): drop them
        if isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or parts[-1:] == [part]):
            continue
        parts.append(part)
    path = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts).lstrip(".")
    if first.get("type") == "missing" and not path:
        return APIError(400, "the request needs a JSON body")
    message = f"{path}: unknown field (not part of this API)" if first.get("type") == "extra_forbidden" else (
        f"{path or 'body'}: {first['msg']}")
    return APIError(400, message, param=path or None)


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, by Content-Length or while reading."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            error = APIError(413, f"the request body is {int(declared)} bytes, more than this server's limit of "
                                  f"{self.limit}")  # fmt: skip
            return await error.response()(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise APIError(413, f"the request body is more than this server's limit of {self.limit} bytes")
            return message

        return await self.app(scope, counted, send)


def prometheus_text(engine: Engine) -> str:
    s, images, prefixes = engine.stats, engine.images, engine.prefixes
    looked = images.hits + images.misses
    metrics = [
        ("queue_length", "gauge", "requests waiting for a row", engine.waiting),
        ("running_requests", "gauge", "requests in the decode batch (its size)", engine.running),
        ("max_batch_size", "gauge", "rows the decode batch may hold", engine.max_batch),
        ("tokens_per_second", "gauge", "tokens generated per second over the last 10 s", s.tokens_per_second()),
        ("generated_tokens_total", "counter", "tokens generated", s.generated_tokens),
        ("requests_total", "counter", "requests accepted", s.requests),
        ("requests_failed_total", "counter", "requests that failed", s.failed),
        ("prompt_tokens_total", "counter", "prompt positions of admitted requests", s.prompt_tokens),
        ("prompt_tokens_computed_total", "counter", "prompt positions run (not from the prefix cache)",
         s.computed_prompt_tokens),
        ("prefill_forwards_total", "counter", "forwards running new prompts", s.prefill_forwards),
        ("prefill_rows_total", "counter", "prompts over those forwards (mean group = rows / forwards)", s.prefill_rows),
        ("decode_steps_total", "counter", "batched decode steps", s.decode_steps),
        ("decode_rows_total", "counter", "rows over all decode steps (mean batch = rows / steps)", s.decode_rows),
        ("batch_size_max", "gauge", "largest decode batch so far", s.max_batch_seen),
        ("image_cache_hits_total", "counter", "images found in the image cache", images.hits),
        ("image_cache_misses_total", "counter", "images encoded", images.misses),
        ("image_cache_hit_rate", "gauge", "image cache hits / lookups", images.hits / looked if looked else 0.0),
        ("image_cache_bytes", "gauge", "bytes held by the image cache", images.used),
        ("prefix_cache_lookups_total", "counter", "prompts looked up in the prefix cache", prefixes.lookups),
        ("prefix_cache_hits_total", "counter", "prompts that reused a cached prefix", prefixes.hits),
        ("prefix_cache_hit_rate", "gauge", "prefix cache hits / lookups",
         prefixes.hits / prefixes.lookups if prefixes.lookups else 0.0),
        ("prefix_cache_reused_tokens_total", "counter", "prompt positions reused", prefixes.reused_positions),
        ("prefix_cache_bytes", "gauge", "bytes held by the prefix cache", prefixes.used),
        ("prefix_cache_entries", "gauge", "conversations held by the prefix cache", len(prefixes)),
    ]  # fmt: skip
    lines = []
    for name, kind, text, value in metrics:
        lines += [f"# HELP blip2_{name} {text}", f"# TYPE blip2_{name} {kind}", f"blip2_{name} {value}"]
    lines += ["# HELP blip2_requests_finished_total requests finished, by reason",
              "# TYPE blip2_requests_finished_total counter"]  # fmt: skip
    lines += [f'blip2_requests_finished_total{{reason="{reason}"}} {count}' for reason, count in s.finished.items()]
    return "\n".join(lines) + "\n"
