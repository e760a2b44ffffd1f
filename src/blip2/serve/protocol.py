"""The OpenAI wire format: request bodies (validated by pydantic; FastAPI reports a wrong field by its path) and the
response objects, as plain dicts.

Extensions beyond OpenAI's fields, all optional: ``top_k``, ``repetition_penalty`` and ``prompt_format`` ("chat":
the LLM's chat template; "vqa": BLIP-2's "Question: {} Answer:" turns, as ``model.answer``; an image alone is then
captioned as ``model.caption``).
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from blip2.infer.decoding import GenerationOptions


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ImageURL(Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ImagePart(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class ChatCompletionRequest(Strict):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Literal[1] = 1
    user: str | None = None
    prompt_format: Literal["chat", "vqa"] = "chat"
    # accepted for compatibility; only their neutral values are
    frequency_penalty: Literal[0] = 0
    presence_penalty: Literal[0] = 0
    logprobs: Literal[False] = False

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise ValueError("stop: give at most 4 non-empty strings")
        return stops

    def options(self, max_new_tokens: int) -> GenerationOptions:
        """Greedy unless ``temperature`` > 0 (then sampling with ``top_p``/``top_k``, reproducible with ``seed``)."""
        sample = bool(self.temperature)
        extra = dict(temperature=self.temperature, top_p=self.top_p or 1.0, top_k=self.top_k or 0) if sample else {}
        return GenerationOptions(max_new_tokens=max_new_tokens, do_sample=sample, seed=self.seed,
                                 repetition_penalty=self.repetition_penalty or 1.0, **extra)  # fmt: skip


class ImageInput(Strict):
    type: Literal["image_url"]
    image_url: ImageURL


class EmbeddingRequest(Strict):
    input: str | ImageInput | list[str | ImageInput] = Field(min_length=1)
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class SearchRequest(Strict):
    """Text to image (``query``) or image to image (``image_url``) over the server's search index."""

    model: str | None = None
    query: str | None = None
    image_url: ImageURL | None = None
    k: int = Field(default=10, ge=1, le=1000)
    rerank: int = Field(default=0, ge=0, le=1000)  # re-score the ITC top ``rerank`` by ITM + ITC (text queries)
    thumbnails: bool = False  # add each hit's JPEG thumbnail as a data: URL


def completion_id(number: str) -> str:
    return f"chatcmpl-{number}"


def usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip


def chat_completion(request_id: str, model: str, text: str, finish_reason: str, usage_: dict) -> dict:
    return {
        "id": completion_id(request_id), "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                     "logprobs": None}],
        "usage": usage_,
    }  # fmt: skip


def chat_chunk(request_id: str, model: str, delta: dict, finish_reason: str | None = None, usage_: dict | None = None,
               choices: bool = True) -> dict:  # fmt: skip
    chunk = {"id": completion_id(request_id), "object": "chat.completion.chunk", "created": int(time.time()),
             "model": model, "choices": []}  # fmt: skip
    if choices:
        chunk["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
    if usage_ is not None:
        chunk["usage"] = usage_
    return chunk


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:  # fmt: skip
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
