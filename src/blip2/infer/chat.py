"""Multi-turn chat about one image that does not redo work.

A conversation is a list of LLM positions (``blip2.data.conversation``): template text tokens, with the
visual-prompt vectors (``Q``, or BOS + ``Q`` with ``llm.bos_before_image``: ``Blip2Model.num_visual``) at the place
the format puts the image. Each turn the whole conversation is rendered again and tokenized, and the session
compares that token list with the one its key/value cache holds: only the positions after their common prefix run.
Normally that is the template glue that closes the previous answer, the new user text and the glue that opens the
reply; the image is encoded once per session. A model with ``llm.prompt_to_qformer`` is encoded with no text, as
for captions: letting the Q-Former read each turn's question into that one visual prompt would change it, and with
it every cached position, on every turn. A model trained with ``llm.visual_prompt_per_turn`` instead opens every
user message with a visual prompt of its own, the Q-Former reading that message: earlier turns' prompts stay as
they were, so the cache still holds (the image's features are computed once per session).

SmolLM2-Instruct (ChatML), the soft prompt opening the first user message::

    <|im_start|>system\\nYou are a helpful AI assistant ...<|im_end|>\\n<|im_start|>user\\n
    [Q visual vectors]What is in the picture?<|im_end|>\\n<|im_start|>assistant\\n   <- turn 1 runs all of this
    A cat on a mat.<|im_end|>                                                    <- generated; cached but the last
    \\n<|im_start|>user\\nWhat colour is it?<|im_end|>\\n<|im_start|>assistant\\n     <- turn 2 runs <|im_end|> and this

Because the cache is only reused where the token lists agree, a cached turn computes exactly what recomputing
the whole conversation would: the reply (re-tokenized from its text, as a full re-render would) replaces the
generated tokens, and any difference truncates the cache there. Greedy and sampled turns run on the cache;
beam-search turns, and every turn of an encoder-decoder LLM (its encoder sees the whole conversation at once),
recompute the whole conversation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from blip2.data.conversation import (
    IMAGE_ID,
    Message,
    conversation_format,
    per_turn_images,
)
from blip2.data.images import load_image
from blip2.errors import InputError
from blip2.infer.batching import ImageInput
from blip2.infer.decoding import (
    DecoderRunner,
    GenerationOptions,
    decode_loop,
    stream_tokens,
    text_pieces,
)
from blip2.prompts import turn_prompt

if TYPE_CHECKING:
    from blip2.pipeline import Blip2Pipeline

CHAT_MAX_NEW_TOKENS = 256  # a chat reply's default length (captions and answers default to 30)


@dataclass
class TurnStats:
    """What the last turn cost: conversation length before the reply, positions reused from the cache,
    positions computed for the prompt (the rest of the conversation), and the tokens generated (``reply_ids``:
    every one, special tokens and the final end-of-text included)."""

    prompt_tokens: int
    reused_tokens: int
    computed_tokens: int
    reply_ids: list[int] = field(default_factory=list)

    @property
    def generated_tokens(self) -> int:
        return len(self.reply_ids)


class ChatSession:
    """A conversation about one image: ``ask`` / ``stream`` a user message, read ``history``.

    ``cache=False`` recomputes everything every turn (the image encoding included), as a stateless server
    would; it exists to measure and test the cached path against.
    """

    def __init__(self, pipe: "Blip2Pipeline", image: ImageInput, system: str | None = None, cache: bool = True):
        self.pipe = pipe
        self.llm = pipe.model.require_llm()
        self.tokenizer = pipe.llm_tokenizer
        self.format = conversation_format(self.tokenizer)
        self.system = system
        self.cache = cache and not self.llm.is_encoder_decoder
        self.per_turn = pipe.cfg.llm.visual_prompt_per_turn
        self.last_stats: TurnStats | None = None
        self._active: Iterator[int] | None = None  # the turn being decoded, if any
        self._runner = DecoderRunner(self.llm)
        self._cached_ids: list[int] | None = []  # what the runner's cache holds; None while unknown
        self.set_image(image)

    # ---- state ------------------------------------------------------------------------------------------

    @property
    def history(self) -> list[tuple[str, str]]:
        """(role, text) pairs so far, "user" and "assistant" alternating (the image is not listed)."""
        return list(self._turns)

    def set_image(self, image: ImageInput) -> None:
        """Talk about another image from now on (the conversation starts over)."""
        self.image = load_image(image)
        self._features = self._encode_image() if self.cache else None  # [1, N, D], encoded once
        self._visuals: dict[str, Tensor] = {}  # what the Q-Former read ("" for no text) -> visual prompt [V, H_llm]
        if self.cache and not self.per_turn:
            self._visual([""])  # the one visual prompt every turn reads, encoded now
        self.reset()
        if self._cached_ids and IMAGE_ID in self._cached_ids:
            # cached positions from the old image on are stale, although their ids (IMAGE_ID) read the same
            self._cached_ids = self._cached_ids[: self._cached_ids.index(IMAGE_ID)]

    def reset(self) -> None:
        """Forget the conversation. The image stays encoded, and the cache keeps what the next conversation
        starts with (system prompt, image), reused as far as the next turn agrees with it."""
        self._close_active()
        self._turns: list[tuple[str, str]] = []

    # ---- turns ------------------------------------------------------------------------------------------

    def ask(self, text: str, **gen) -> str:
        """The reply to ``text`` (greedy unless told otherwise; generation options as in ``Blip2Model.generate``)."""
        for _ in self._start_turn(text, gen, streaming=False):
            pass
        return self._turns[-1][1]

    def stream(self, text: str, **gen) -> Iterator[str]:
        """The reply to ``text`` as printable pieces while it is decoded. Stopping early (``close()``, or
        starting another turn) keeps the partial reply in the history. Beam search cannot stream."""
        return text_pieces(self._start_turn(text, gen, streaming=True), self.tokenizer)

    def _start_turn(self, text: str, gen: dict, streaming: bool) -> Iterator[int]:
        """Check everything now; return the generator that decodes the reply and records the turn."""
        gen.setdefault("max_new_tokens", CHAT_MAX_NEW_TOKENS)
        options = GenerationOptions.from_kwargs(gen)
        if not isinstance(text, str) or not text.strip():
            raise InputError("the message is empty: type something to ask")
        if streaming and options.num_beams > 1:
            raise InputError("beam search cannot stream: use num_beams=1, or ask() for a beam-search reply")
        self._close_active()
        text = text.strip()
        messages = self._messages(text)
        images = per_turn_images(messages) if self.per_turn else None
        ids = self.format.token_ids(messages, self.pipe.model.num_visual, images=images)
        self._check_context(len(ids), options)
        reads = [m["content"] for m in messages if m["role"] == "user"] if self.per_turn else [""]
        self._active = self._turn(text, ids, reads, options, streaming)
        return self._active

    def _turn(self, text: str, ids: list[int], reads: list[str], options: GenerationOptions,
              streaming: bool) -> Iterator[int]:
        reply: list[int] = []
        if self.cache and options.num_beams == 1:
            tokens = self._cached_tokens(ids, self._visual(reads), options)
        else:
            tokens = self._recomputed_tokens(ids, reads, options, streaming)
        try:
            for token in tokens:
                reply.append(token)
                yield token
        except GeneratorExit:
            self._record(text, reply)
            raise
        self._record(text, reply)

    def _record(self, text: str, reply: list[int]) -> None:
        reply_text = self.tokenizer.decode(reply)
        self._turns += [("user", text), ("assistant", reply_text)]
        self.last_stats.reply_ids = list(reply)
        self._active = None

    def _close_active(self) -> None:
        if self._active is not None:
            self._active.close()  # a started turn records its partial reply
            self._active = None

    # ---- the two ways of running a turn ---------------------------------------------------------------------

    @torch.no_grad()
    def _cached_tokens(self, ids: list[int], visual: Tensor, options: GenerationOptions) -> Iterator[int]:
        """Reuse the cache for the common prefix, run the rest, then decode feeding each token into the cache."""
        runner = self._runner
        known = self._cached_ids if self._cached_ids is not None else []
        reuse = min(_common_prefix(known, ids), len(ids) - 1)  # at least one position runs, for the next logits
        runner.truncate(reuse)
        reuse = runner.length
        self.last_stats = TurnStats(len(ids), reuse, len(ids) - reuse)
        self._cached_ids = None  # unknown until the forward completes
        first = runner.feed(self._embed(ids, visual)[:, reuse:])
        self._cached_ids = list(ids)

        def feed(token: int) -> Tensor:
            held, self._cached_ids = self._cached_ids, None
            logits = runner.feed_token(token)
            self._cached_ids = held + [token]
            return logits

        yield from decode_loop(first, feed, options, self.tokenizer)

    @torch.no_grad()
    def _recomputed_tokens(self, ids: list[int], reads: list[str], options: GenerationOptions,
                           streaming: bool) -> Iterator[int]:
        """The whole conversation from scratch: transformers' generate (any options), or the stream loop."""
        embeds = self._embed(ids, self._visual(reads))  # [1, L, H]
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        self.last_stats = TurnStats(len(ids), 0, len(ids))
        if streaming:
            yield from stream_tokens(self.llm, embeds, mask, options, self.tokenizer)
            return
        with options.seeded(embeds.device):
            out = self.llm.model.generate(inputs_embeds=embeds, attention_mask=mask, **options.hf_kwargs(self.tokenizer))
        new = out[0, 1:] if self.llm.is_encoder_decoder else out[0]  # T5's output starts with the decoder start token
        yield from new.tolist()

    # ---- helpers ---------------------------------------------------------------------------------------------

    def _messages(self, text: str) -> list[Message]:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for role, content in self._turns:
            messages.append({"role": role, "content": content})
        return messages + [{"role": "user", "content": text}]

    @torch.no_grad()
    def _encode_image(self) -> Tensor:
        return self.pipe.model.image_features(self.pipe.pixel_values([self.image]))  # [1, N, D]

    @torch.no_grad()
    def _visual(self, reads: list[str]) -> Tensor:
        """The visual prompts in conversation order [len(reads) * V, H_llm], the Q-Former reading each of ``reads``
        (user messages, as VQA questions; "" for no text); kept for the session when it caches."""
        if not self.cache:  # everything recomputed, as a stateless server would
            self._features, self._visuals = self._encode_image(), {}
        missing = [text for text in dict.fromkeys(reads) if text not in self._visuals]
        if missing:
            model, family = self.pipe.model, self.llm.is_encoder_decoder
            questions = [turn_prompt(text, family) for text in missing]
            features = self._features.expand(len(missing), -1, -1)  # [M, N, D]
            prompts = model.soft_prompt(features, *self.pipe.qformer_prompt_ids(questions))  # [M, V, H_llm]
            self._visuals.update(zip(missing, prompts))
        return torch.cat([self._visuals[text] for text in reads])

    def _embed(self, ids: list[int], visual: Tensor) -> Tensor:
        """A conversation's token list -> input embeddings [1, L, H]; IMAGE_ID positions take the visual rows."""
        device = visual.device
        tokens = torch.tensor(ids, device=device)  # [L]
        embeds = self.llm.embed(tokens.clamp(min=0)).clone()  # [L, H]
        embeds[tokens == IMAGE_ID] = visual.to(embeds.dtype)
        return embeds[None]

    def _check_context(self, length: int, options: GenerationOptions) -> None:
        limit = self.llm.context_length()
        if limit is not None and length + options.max_new_tokens > limit:
            raise InputError(
                f"the conversation is {length} tokens; with max_new_tokens={options.max_new_tokens} it exceeds the "
                f"LLM's context of {limit} tokens: reset() the session (/reset in `blip2 chat`) or lower max_new_tokens"
            )


def _common_prefix(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length
