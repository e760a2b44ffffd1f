"""Decoding one token at a time over a key/value cache: the options, the choice of the next token, the loop,
and turning token ids into printable text as they arrive.

Batched, non-streaming generation goes through transformers' ``generate`` (it has beam search); this module
is what streams (``model.stream``, ``ChatSession.stream``) and what lets a chat keep its cache between
turns: the loop below feeds every chosen token except the last, so after it the cache holds exactly the
sequence so far minus that last token.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
import unicodedata
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.generation import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from blip2.data.text import LLMTokenizer
from blip2.errors import InputError
from blip2.models.language import FrozenLLM

# LAVIS's generate() arguments -> ours (``use_nucleus_sampling`` also sets LAVIS's top_p 0.9 unless top_p is given)
LAVIS_NAMES = {"min_length": "min_new_tokens", "max_length": "max_new_tokens", "use_nucleus_sampling": "do_sample"}


@dataclass(frozen=True)
class GenerationOptions:
    """How text is decoded: greedy by default, beam search with ``num_beams > 1``, sampling with ``do_sample``;
    the names and meanings of transformers' ``GenerationConfig``.

    ``top_k=0`` and ``top_p=1.0`` switch those filters off. ``length_penalty`` only affects beam search
    (scores are divided by length ** length_penalty). ``min_new_tokens``: no end-of-text before that many tokens;
    ``no_repeat_ngram_size``: no n-gram of that size twice; ``stop_strings``: stop once the text ends with one (it
    is kept, as transformers keeps it); ``eos_token_id``: more token ids that end the text, beside the tokenizer's
    EOS. ``seed`` makes sampling reproducible without touching the global random state.
    """

    max_new_tokens: int = 30
    min_new_tokens: int = 0
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    length_penalty: float = 1.0
    stop_strings: tuple[str, ...] = ()
    eos_token_id: tuple[int, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_strings", _as_tuple(self.stop_strings))
        object.__setattr__(self, "eos_token_id", _as_tuple(self.eos_token_id))
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens must be in [0, max_new_tokens]"),
            (self.num_beams >= 1, "num_beams must be >= 1"),
            (self.temperature > 0, "temperature must be > 0 (use do_sample=False for greedy decoding)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 (0: no top-k filter)"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1.0: none)"),
            (self.no_repeat_ngram_size >= 0, "no_repeat_ngram_size must be >= 0 (0: off)"),
            (all(isinstance(t, str) and t for t in self.stop_strings), "stop_strings must be non-empty strings"),
            (all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.eos_token_id),
             "eos_token_id must be token ids (integers >= 0)"),
            (not (self.do_sample and self.num_beams > 1), "choose beam search (num_beams > 1) or do_sample, not both"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(f"{message}; got {self}")

    @classmethod
    def from_kwargs(cls, gen: dict) -> "GenerationOptions":
        """Options from keyword arguments, LAVIS's names accepted (``min_length``, ``max_length``,
        ``use_nucleus_sampling``), unknown names refused (a typo would otherwise be ignored)."""
        gen = dict(gen)
        if gen.pop("use_nucleus_sampling", False):
            gen.setdefault("do_sample", True)
            gen.setdefault("top_p", 0.9)
        for lavis, ours in LAVIS_NAMES.items():
            if lavis in gen:
                if ours in gen:
                    raise TypeError(f"give {ours} or LAVIS's {lavis}, not both")
                gen[ours] = gen.pop(lavis)
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(gen) - set(known))
        if unknown:
            hint = "; to stream, call model.stream(...) or session.stream(...)" if "stream" in unknown else ""
            raise TypeError(f"unknown generation option(s) {unknown}; known: {known} (and LAVIS's "
                            f"{sorted(LAVIS_NAMES)}){hint}")
        return cls(**gen)

    def stop_ids(self, tokenizer: LLMTokenizer) -> list[int]:
        """Every token id that ends the text: the tokenizer's EOS and ``eos_token_id``."""
        return list(dict.fromkeys([tokenizer.eos_token_id, *self.eos_token_id]))

    def hf_kwargs(self, tokenizer: LLMTokenizer) -> dict:
        """The same choice expressed as transformers ``generate`` arguments."""
        kwargs = dict(
            max_new_tokens=self.max_new_tokens, min_new_tokens=self.min_new_tokens or None, num_beams=self.num_beams,
            do_sample=self.do_sample, repetition_penalty=self.repetition_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size or None, eos_token_id=self.stop_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        if self.stop_strings:  # our check, as the token loop makes it (transformers' own needs a subword vocabulary)
            kwargs.update(stopping_criteria=StoppingCriteriaList([StopStrings(self.stop_strings, tokenizer)]))
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:  # transformers' defaults (or a model's generation_config) must not switch on sampling filters
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if self.num_beams > 1:
            kwargs.update(length_penalty=self.length_penalty)
        return kwargs

    def generator(self, device: torch.device) -> torch.Generator | None:
        """A private random generator for sampling when ``seed`` is set (None: torch's global one)."""
        return torch.Generator(device).manual_seed(self.seed) if self.seed is not None else None

    @contextlib.contextmanager
    def seeded(self, device: torch.device):
        """Run a block with torch's global RNG seeded by ``seed`` (and restored afterwards); a no-op without seed."""
        if self.seed is None:
            yield
            return
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            yield


def _as_tuple(value) -> tuple:
    """One value or a sequence of them -> a tuple (CLI and JSON give lists, Python callers often one string)."""
    if value is None:
        return ()
    return (value,) if isinstance(value, (str, int)) else tuple(value)


def next_token(
    logits: Tensor, options: GenerationOptions, generated: Tensor, generator: torch.Generator | None = None,
    stop_ids: Sequence[int] = (),
) -> Tensor:
    """Logits of the next position [B, V] and the tokens generated so far [B, T] -> the chosen tokens [B]; no
    ``stop_ids`` before ``min_new_tokens``."""
    scores = logits.float()
    if options.repetition_penalty != 1.0 and generated.shape[1]:
        scores = RepetitionPenaltyLogitsProcessor(options.repetition_penalty)(generated, scores)
    if options.no_repeat_ngram_size:
        scores = NoRepeatNGramLogitsProcessor(options.no_repeat_ngram_size)(generated, scores)
    if generated.shape[1] < options.min_new_tokens and stop_ids:
        scores[:, list(stop_ids)] = float("-inf")
    if not options.do_sample:
        return scores.argmax(dim=-1)
    scores = scores / options.temperature
    if options.top_k:
        scores = TopKLogitsWarper(options.top_k)(generated, scores)
    if options.top_p < 1.0:
        scores = TopPLogitsWarper(options.top_p)(generated, scores)
    return torch.multinomial(F.softmax(scores, dim=-1), 1, generator=generator).squeeze(1)  # [B]


def decode_loop(
    first_logits: Tensor, feed: Callable[[int], Tensor], options: GenerationOptions, tokenizer: LLMTokenizer
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` chosen tokens for one sequence, stopping after a stop token (which is yielded)
    or once the text ends with one of ``options.stop_strings``.

    ``first_logits`` [1, V] are the logits after the prompt; ``feed(token)`` runs one token and returns the
    logits [1, V] after it. The last token yielded is never fed.
    """
    generator = options.generator(first_logits.device)
    stop_ids = options.stop_ids(tokenizer)
    generated = torch.empty(1, 0, dtype=torch.long, device=first_logits.device)  # [1, T]
    logits = first_logits
    for step in range(options.max_new_tokens):
        token = int(next_token(logits, options, generated, generator, stop_ids))
        yield token
        generated = torch.cat([generated, generated.new_tensor([[token]])], dim=1)
        if token in stop_ids or step == options.max_new_tokens - 1 or ends_with_stop_string(generated, options, tokenizer):
            return
        logits = feed(token)


def ends_with_stop_string(generated: Tensor, options: GenerationOptions, tokenizer: LLMTokenizer) -> bool:
    """Whether the text of ``generated`` [1, T] ends with one of ``options.stop_strings``."""
    return bool(options.stop_strings) and bool(StopStrings(options.stop_strings, tokenizer)(generated, None)[0])


class StopStrings(StoppingCriteria):
    """transformers' ``generate`` stops a row once its decoded text ends with one of ``stops`` (the same test as the
    token loop's)."""

    def __init__(self, stops: Sequence[str], tokenizer: LLMTokenizer):
        self.stops, self.tokenizer = tuple(stops), tokenizer

    def __call__(self, input_ids: Tensor, scores, **kwargs) -> Tensor:
        """input_ids [B, T] (what was generated so far) -> done [B]."""
        texts = self.tokenizer.hf.batch_decode(input_ids.tolist())
        return torch.tensor([text.endswith(self.stops) for text in texts], device=input_ids.device)


def forward_accepts(model: torch.nn.Module, name: str) -> bool:
    """Whether the model class's ``forward`` takes keyword ``name`` (the class's: an instance may be wrapped)."""
    return name in inspect.signature(type(model).forward).parameters


def cache_name(model: torch.nn.Module) -> str:
    """What transformers calls the key/value cache, as ``model.forward``'s keyword and as its output's field:
    "cache" in recent releases, "past_key_values" before (the old name goes in 5.40)."""
    return "cache" if forward_accepts(model, "cache") else "past_key_values"


class DecoderRunner:
    """A decoder-only LLM run over one growing sequence (batch 1): each ``feed`` adds positions to its cache.

    Positions continue from the cache length (the model derives them; no padding in a single sequence).
    ``truncate`` drops cached positions, e.g. when a chat's next prompt diverges from what the cache holds.
    """

    def __init__(self, llm: FrozenLLM):
        self.llm = llm
        self.cache = None  # a transformers Cache after the first feed
        self._cache_name = cache_name(llm.model)
        self._keep_last = forward_accepts(llm.model, "logits_to_keep")

    @property
    def length(self) -> int:
        return self.cache.get_seq_length() if self.cache is not None else 0

    def feed(self, embeds: Tensor) -> Tensor:
        """Input embeddings [1, L, H] of the next L positions -> logits [1, V] after the last one."""
        extra = {"logits_to_keep": 1} if self._keep_last else {}
        out = self.llm.model(inputs_embeds=embeds, use_cache=True, **{self._cache_name: self.cache}, **extra)
        self.cache = getattr(out, self._cache_name)
        return out.logits[:, -1]  # [1, V]

    def feed_token(self, token: int) -> Tensor:
        ids = torch.tensor([[token]], device=self.llm.model.device)  # [1, 1]
        return self.feed(self.llm.embed(ids))

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` cached positions (all of them are dropped if the cache cannot crop)."""
        if length >= self.length:
            return
        if length > 0:
            self.cache.crop(length - self.length)  # transformers 5: a negative count removes that many positions
        if length == 0 or self.length != length:
            self.cache = None


class EncoderDecoderRunner:
    """An encoder-decoder LLM (T5): the encoder runs once over the prompt, the decoder token by token."""

    def __init__(self, llm: FrozenLLM, embeds: Tensor, mask: Tensor):
        """``embeds`` [1, L, H] and ``mask`` [1, L]: the encoder input (soft prompt + prompt text)."""
        self.llm = llm
        self.mask = mask
        self.encoder_outputs = llm.model.get_encoder()(inputs_embeds=embeds, attention_mask=mask)
        self.cache = None
        self._cache_name = cache_name(llm.model)

    def start(self) -> Tensor:
        """Logits [1, V] of the first decoder position (after the decoder start token)."""
        return self.feed_token(self.llm.model.config.decoder_start_token_id)

    def feed_token(self, token: int) -> Tensor:
        ids = torch.tensor([[token]], device=self.mask.device)  # [1, 1]
        out = self.llm.model(
            encoder_outputs=self.encoder_outputs, attention_mask=self.mask, decoder_input_ids=ids,
            use_cache=True, **{self._cache_name: self.cache},
        )  # fmt: skip
        self.cache = getattr(out, self._cache_name)
        return out.logits[:, -1]  # [1, V]


@torch.no_grad()
def stream_tokens(
    llm: FrozenLLM, embeds: Tensor, mask: Tensor, options: GenerationOptions, tokenizer: LLMTokenizer
) -> Iterator[int]:
    """New tokens for one prompt (``embeds`` [1, L, H], ``mask`` [1, L] all ones), decoded with a fresh cache."""
    if llm.is_encoder_decoder:
        runner = EncoderDecoderRunner(llm, embeds, mask)
        first = runner.start()
    else:
        runner = DecoderRunner(llm)
        first = runner.feed(embeds)
    yield from decode_loop(first, runner.feed_token, options, tokenizer)


_LAST_SPACE = re.compile(r"\s(?=\S*$)")


class TextPieces:
    """Token ids in, printable text pieces out, as a stream shows them.

    Text is released up to its last whitespace: the word being written may still change (a character split
    over tokens decodes as U+FFFD until complete; tokenizers may tidy spaces before punctuation). Text that
    ends in a complete wide character (Chinese, Japanese, Korean: scripts without spaces) is released whole.
    Leading and trailing whitespace is dropped, so the pieces join to ``decode(ids).strip()``.
    """

    def __init__(self, tokenizer: LLMTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.shown = ""

    def add(self, token: int) -> str:
        self.ids.append(token)
        text = self.text()
        if text and unicodedata.east_asian_width(text[-1]) in ("W", "F"):  # U+FFFD is "A": held back
            return self._release(text)
        match = _LAST_SPACE.search(text)
        return self._release(text[: match.start()] if match else "")

    def finish(self) -> str:
        return self._release(self.text())

    def text(self) -> str:
        return self.tokenizer.decode(self.ids)

    def _release(self, ready: str) -> str:
        if len(ready) <= len(self.shown):
            return ""
        piece, self.shown = ready[len(self.shown):], ready
        return piece


def text_pieces(tokens: Iterator[int], tokenizer: LLMTokenizer) -> Iterator[str]:
    """Printable pieces of the text that ``tokens`` spell, as they arrive (see ``TextPieces``).

    Closing this iterator closes ``tokens`` too (when it is a generator), so whatever produces them learns that
    the reader stopped.
    """
    pieces = TextPieces(tokenizer)
    try:
        for token in tokens:
            piece = pieces.add(token)
            if piece:
                yield piece
    finally:
        if isinstance(tokens, Generator):
            tokens.close()
    tail = pieces.finish()
    if tail:
        yield tail
