"""The serving engine: one model, every request, one decode batch.

Scheduling is per iteration (continuous batching). Each ``step``: requests whose clients went away leave; waiting
requests join while there are free rows, each running its prompt alone (the image's visual prompt from the image
cache or the encoder; the LLM positions after the longest prefix another conversation left in the prefix cache;
its first token); then every running row decodes one token in one batched forward. A row leaves as soon as it is
finished (EOS, ``max_new_tokens``, a stop string), so a long answer never holds up a short one, and its LLM cache is
kept in the prefix cache for the conversation's next turn. Everything that touches the model runs in the engine's
thread (``start``) or in the caller's, step by step (tests), never in both.

Each row decodes exactly as ``ChatSession`` / ``pipe.stream`` decode it alone (the same choice of tokens,
``decode_loop``'s rules: a stop token (EOS), a stop string or ``max_new_tokens`` end it, the last token is never
fed); only the batched forward's rounding differs (``kv``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from torch import Tensor

from blip2.data.conversation import IMAGE_ID
from blip2.errors import InputError
from blip2.infer.decoding import (
    EncoderDecoderRunner,
    GenerationOptions,
    ends_with_stop_string,
    next_token,
)
from blip2.prompts import turn_prompt
from blip2.serve.caches import ImageCache, PrefixCache
from blip2.serve.kv import DecoderBatch, EncoderDecoderBatch, check_batchable, prefill
from blip2.serve.prompts import Message, Prompt, PromptFormat, UserImage, render
from blip2.serve.replies import ReplyText

MiB = 1 << 20
log = logging.getLogger("blip2.serve")


class QueueFull(RuntimeError):
    """Every row is busy and the waiting line is full; ``retry_after``: seconds to wait before trying again."""

    def __init__(self, waiting: int, retry_after: int):
        self.retry_after = retry_after
        super().__init__(f"the server is busy ({waiting} requests waiting): retry in {retry_after} s")


class EngineClosed(RuntimeError):
    """The engine was stopped."""


# ---- what a request gets back ------------------------------------------------------------------------------------


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt positions reused from the prefix cache


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string), "length" (max_new_tokens), "cancelled"
    usage: Usage


@dataclass
class Failed:
    error: Exception


Event = Delta | Finished | Failed


class Handle:
    """A submitted request: its events (``Delta`` pieces, then ``Finished`` or ``Failed``), read synchronously
    (``events``/``result``) or, when submitted from an asyncio loop, asynchronously (``aevents``/``aresult``).
    ``cancel`` makes the engine drop the request at its next step (its row is free at once)."""

    def __init__(self, request_id: str):
        self.id = request_id
        self.cancelled = False
        try:
            self._loop = asyncio.get_running_loop()
            self._queue: asyncio.Queue | queue.Queue = asyncio.Queue()
        except RuntimeError:
            self._loop = None
            self._queue = queue.Queue()

    def cancel(self) -> None:
        self.cancelled = True

    def emit(self, event: Event) -> None:
        if self._loop is None:
            self._queue.put(event)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # the client's loop is closed: nobody is listening
            self.cancelled = True

    def events(self) -> Iterator[Event]:
        while True:
            event = self._queue.get()
            yield event
            if not isinstance(event, Delta):
                return

    async def aevents(self) -> AsyncIterator[Event]:
        while True:
            event = await self._queue.get()
            yield event
            if not isinstance(event, Delta):
                return

    def result(self) -> Finished:
        return _final([event for event in self.events()][-1])

    async def aresult(self) -> Finished:
        async for event in self.aevents():
            last = event
        return _final(last)


def _groups(ready: list, budget: int) -> list[list]:
    """Admissions in groups run together: shortest first, each group at most ``budget`` padded positions (rows
    times the longest), at least one row."""
    groups, group = [], []
    for item in sorted(ready, key=lambda item: item[1].shape[1]):
        if group and (len(group) + 1) * item[1].shape[1] > budget:
            groups.append(group)
            group = []
        group.append(item)
    return groups + [group] if group else groups


def _final(event: Event) -> Finished:
    if isinstance(event, Failed):
        raise event.error
    return event


# ---- the engine ------------------------------------------------------------------------------------------------


@dataclass
class _Job:
    handle: Handle
    prompt: Prompt
    key: list
    options: GenerationOptions
    stop_ids: list[int]  # tokens that end the reply: EOS and ``options.eos_token_id``
    reply: ReplyText
    usage: Usage
    generator: torch.Generator | None
    submitted: float
    tokens: list[int] = field(default_factory=list)


@dataclass
class Stats:
    """Counters since start (``/metrics``)."""

    requests: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    failed: int = 0
    generated_tokens: int = 0
    prompt_tokens: int = 0
    computed_prompt_tokens: int = 0
    prefill_forwards: int = 0
    prefill_rows: int = 0  # sum of rows over prefill forwards
    decode_steps: int = 0
    decode_rows: int = 0  # sum of batch sizes over decode steps
    max_batch_seen: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=4096))  # (time, tokens generated) per step
    durations: deque = field(default_factory=lambda: deque(maxlen=64))  # seconds of recent finished requests

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        return sum(count for when, count in list(self.recent) if now - when <= window) / window


class Engine:
    """Owns ``pipe`` (a ``Blip2Pipeline`` of a stage-2 model) and runs every request on it (see the module docstring)."""

    def __init__(
        self,
        pipe,
        max_batch: int = 32,
        max_queue: int = 64,
        image_cache_bytes: int = 256 * MiB,
        prefix_cache_bytes: int = 512 * MiB,
        prefill_budget: int = 512,
    ):
        if max_batch < 1 or max_queue < 0:
            raise InputError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.pipe = pipe
        self.model = pipe.model
        self.llm = pipe.model.require_llm()
        self.tokenizer = pipe.llm_tokenizer
        check_batchable(self.llm)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.prefill_budget = prefill_budget
        self.images = ImageCache(image_cache_bytes)
        self.prefixes = PrefixCache(prefix_cache_bytes)
        self.stats = Stats()
        self.context = self.llm.context_length()
        self._batch = EncoderDecoderBatch(self.llm) if self.llm.is_encoder_decoder else DecoderBatch(self.llm)
        self._rows: list[_Job] = []
        self._waiting: deque[_Job] = deque()
        self._calls: deque[tuple[Callable, Future]] = deque()
        self._lock = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._closed = False

    # ---- submitting (any thread) -----------------------------------------------------------------------------

    def prompt(self, messages: list[Message], prompt_format: PromptFormat = "chat") -> Prompt:
        """The rendered prompt of a conversation (what ``submit`` runs)."""
        per_turn = self.model.cfg.llm.visual_prompt_per_turn
        return render(self.tokenizer, messages, self.model.num_visual, prompt_format, per_turn)

    def check_length(self, prompt: Prompt, max_new_tokens: int) -> None:
        """Raise InputError with the counts if the prompt and ``max_new_tokens`` do not fit the context window."""
        if self.context is not None and len(prompt.ids) + max_new_tokens > self.context:
            raise InputError(
                f"the prompt is {len(prompt.ids)} tokens ({prompt.ids.count(IMAGE_ID)} of them the image's); with "
                f"max_tokens={max_new_tokens} that is {len(prompt.ids) + max_new_tokens}, more than the model's "
                f"context of {self.context} tokens: shorten the conversation or lower max_tokens"
            )

    def submit(self, prompt: Prompt, options: GenerationOptions, stop: list[str] = ()) -> Handle:
        """Queue a request (greedy or sampled; beams are refused). Raises InputError, QueueFull or EngineClosed."""
        if options.num_beams != 1:
            raise InputError("the engine decodes one sequence per request: num_beams must be 1")
        self.check_length(prompt, options.max_new_tokens)
        handle = Handle(f"{next(self._ids)}")
        job = _Job(handle, prompt, prompt.key(), options, options.stop_ids(self.tokenizer),
                   ReplyText(self.tokenizer, list(stop)), Usage(len(prompt.ids)), options.generator(self.model.device),
                   time.monotonic())  # fmt: skip
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is stopped")
            free = self.max_batch - len(self._rows)
            if len(self._waiting) >= self.max_queue + max(free, 0):
                raise QueueFull(len(self._waiting), self._retry_after())
            self._waiting.append(job)
            self.stats.requests += 1
            self._lock.notify()
        return handle

    def call(self, fn: Callable[[], object]) -> Future:
        """Run ``fn()`` in the engine's thread between two steps (embeddings, search): its result as a Future."""
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise EngineClosed("the engine is stopped")
            self._calls.append((fn, future))
            self._lock.notify()
        return future

    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def _retry_after(self) -> int:
        durations = list(self.stats.durations)
        typical = sum(durations) / len(durations) if durations else 1.0
        return max(1, round(typical * (1 + len(self._waiting)) / self.max_batch))

    # ---- running ---------------------------------------------------------------------------------------------

    def start(self) -> "Engine":
        """Run steps in a background thread until ``stop``."""
        self._thread = threading.Thread(target=self._loop, name="blip2-engine", daemon=True)
        self._thread.start()
        return self

    @property
    def started(self) -> bool:
        return self._thread is not None

    def stop(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()
        for job in [*self._rows, *self._waiting]:
            job.handle.emit(Failed(EngineClosed("the engine stopped before this request finished")))
        for _, future in self._calls:
            future.set_exception(EngineClosed("the engine stopped before this call ran"))
        self._batch.remove(set(range(len(self._rows))))
        self._rows, self._waiting, self._calls = [], deque(), deque()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not (self._closed or self._waiting or self._calls or self._rows):
                    self._lock.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception as error:  # a bug or the device failing: report it, drop the batch, keep serving
                log.exception("engine step failed")
                self._fail(self._rows, error)
                self._batch.remove(set(range(len(self._rows))))
                self._rows = []

    @property
    def busy(self) -> bool:
        return bool(self._rows or self._waiting or self._calls)

    @torch.no_grad()
    def step(self) -> None:
        """One iteration: calls, departures, admissions (their prompts run together), one batched decode step."""
        with self._lock:
            calls, self._calls = list(self._calls), deque()
            self._drop_cancelled()
            admitted = []
            while self._waiting and len(self._rows) + len(admitted) < self.max_batch:
                admitted.append(self._waiting.popleft())
        for fn, future in calls:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as error:  # handed to the caller, who reports it
                    future.set_exception(error)
        if admitted:
            self._admit(admitted)
        if self._rows:
            self._decode()

    def _drop_cancelled(self) -> None:
        self._waiting = deque(job for job in self._waiting if not job.handle.cancelled)
        gone = {i for i, job in enumerate(self._rows) if job.handle.cancelled}
        for i in gone:
            self._finish(self._rows[i], "cancelled", None)
        if gone:
            self._remove(gone)

    def _admit(self, jobs: list[_Job]) -> None:
        """Run the new rows' prompts (decoder-only: together, up to ``prefill_budget`` padded positions per forward;
        T5: each alone), choose their first tokens; they join the batch unless already finished."""
        ready = []
        for job in jobs:
            try:
                embeds = self._embed(job.prompt)  # [1, L, H]
                reuse, layers = (0, None) if self.llm.is_encoder_decoder else self.prefixes.lookup(job.key, len(job.key) - 1)
                ready.append((job, embeds[:, reuse:], layers, reuse))
            except Exception as error:
                self._fail([job], error)
        if self.llm.is_encoder_decoder:
            for job, embeds, _, _ in ready:
                try:
                    runner = EncoderDecoderRunner(self.llm, embeds, torch.ones(embeds.shape[:2], dtype=torch.long,
                                                                               device=embeds.device))  # fmt: skip
                    self._started(job, runner.start(), runner, 0, None)
                except Exception as error:
                    self._fail([job], error)
            return
        for group in _groups(ready, self.prefill_budget):
            try:
                logits, caches = prefill(self.llm, [(embeds, layers, reuse) for _, embeds, layers, reuse in group])
            except Exception as error:
                self._fail([job for job, *_ in group], error)
                continue
            self.stats.prefill_forwards += 1
            self.stats.prefill_rows += len(group)
            for (job, _, _, reuse), row_logits, layers in zip(group, logits, caches):
                self.prefixes.put(job.key, layers)  # the prompt, for requests that start alike from now on
                self._started(job, row_logits[None], layers, reuse, lambda layers=layers: layers)

    def _started(self, job: _Job, logits: Tensor, row, reuse: int, cached: Callable | None) -> None:
        """``job``'s prompt has run: its first token; then it joins the batch (``row``) or finishes."""
        job.usage.cached_tokens = reuse
        self.stats.recent.append((time.monotonic(), 1))
        self.stats.prompt_tokens += len(job.key)
        self.stats.computed_prompt_tokens += len(job.key) - reuse
        reason = self._choose(job, logits)
        if reason is None:
            self._rows.append(job)
            self._batch.add(row)
        else:
            self._finish(job, reason, cached)

    def _fail(self, jobs: list[_Job], error: Exception) -> None:
        self.stats.failed += len(jobs)
        for job in jobs:
            job.handle.emit(Failed(error))

    def _decode(self) -> None:
        logits = self._batch.forward([job.tokens[-1] for job in self._rows])  # [B, V]
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(self._rows)
        self.stats.recent.append((time.monotonic(), len(self._rows)))
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(self._rows))
        done = {}
        for i, job in enumerate(self._rows):
            reason = self._choose(job, logits[i : i + 1])
            if reason is not None:
                done[i] = reason
        for i, reason in done.items():
            row = None if self.llm.is_encoder_decoder else (lambda i=i: self._batch.row(i))
            self._finish(self._rows[i], reason, row)
        if done:
            self._remove(set(done))

    def _remove(self, gone: set[int]) -> None:
        order = self._batch.remove(gone)  # the batch may reorder its rows
        self._rows = [self._rows[i] for i in order]

    def _choose(self, job: _Job, logits: Tensor) -> str | None:
        """Pick ``job``'s next token from ``logits`` [1, V]; its finish reason, or None while it goes on."""
        generated = torch.tensor([job.tokens], dtype=torch.long, device=logits.device).reshape(1, -1)  # [1, T]
        token = int(next_token(logits, job.options, generated, job.generator, job.stop_ids))
        job.tokens.append(token)
        self.stats.generated_tokens += 1
        piece = job.reply.add(token)
        if piece:
            job.handle.emit(Delta(piece))
        if job.reply.stopped or token in job.stop_ids:
            return "stop"
        if ends_with_stop_string(torch.tensor([job.tokens]), job.options, self.tokenizer):  # options.stop_strings
            return "stop"
        if len(job.tokens) == job.options.max_new_tokens:
            return "length"
        return None

    def _finish(self, job: _Job, reason: str, cached: Callable[[], list] | None) -> None:
        """Report the end of ``job``; keep its LLM cache (``cached()``: what it holds) for a next turn first."""
        if cached is not None and reason != "cancelled":
            self.prefixes.put(job.key + job.tokens[:-1], cached())  # the last token was never fed
        job.usage.completion_tokens = len(job.tokens)
        self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1
        self.stats.durations.append(time.monotonic() - job.submitted)
        tail = job.reply.finish()
        if tail:
            job.handle.emit(Delta(tail))
        job.handle.emit(Finished(job.reply.shown, reason, job.usage))

    # ---- images ------------------------------------------------------------------------------------------------

    def visual_prompt(self, image: UserImage, read: str = "") -> Tensor:
        """The image's visual prompt [V, H_llm], the Q-Former reading ``read`` (a user message, with
        ``llm.visual_prompt_per_turn``; else "": one visual prompt per image, as ``ChatSession``), from the cache or
        the encoder + Q-Former."""
        key = ("prompt", image.key, read)
        cached = self.images.get(key)
        if cached is None:
            question = turn_prompt(read, self.llm.is_encoder_decoder)
            cached = self.model.soft_prompt(self._features(image), *self.pipe.qformer_prompt_ids([question]))[0]
            self.images.put_tensor(key, cached)
        return cached

    def _features(self, image: UserImage) -> Tensor:
        """The frozen encoder's features [1, N, D]; kept in the image cache for a model with
        ``llm.visual_prompt_per_turn``, whose every user message needs them again for its own visual prompt."""
        if not self.model.cfg.llm.visual_prompt_per_turn:
            return self.model.image_features(self.pipe.pixel_values([image.image]))
        features = self.images.get(("features", image.key))
        if features is None:
            features = self.model.image_features(self.pipe.pixel_values([image.image]))
            self.images.put_tensor(("features", image.key), features)
        return features

    def itc_embedding(self, image: UserImage) -> Tensor:
        """The image's normalised ITC embeddings [Q, E] (``pipe.image_embeddings``), cached too."""
        cached = self.images.get(("itc", image.key))
        if cached is None:
            cached = self.pipe.image_embeddings([image.image])[0]
            self.images.put_tensor(("itc", image.key), cached)
        return cached

    def _embed(self, prompt: Prompt) -> Tensor:
        """Token ids -> input embeddings [1, L, H]; the ``IMAGE_ID`` positions take the visual prompts in order."""
        device = self.model.device
        tokens = torch.tensor(prompt.ids, device=device)  # [L]
        embeds = self.llm.embed(tokens.clamp(min=0)).clone()  # [L, H]
        if prompt.images:
            visual = torch.cat([self.visual_prompt(image, read) for image, read in zip(prompt.images, prompt.reads)])
            embeds[tokens == IMAGE_ID] = visual.to(embeds.dtype)
        return embeds[None]

