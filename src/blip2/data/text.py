"""Text to token ids: an LLM's tokenizer with this project's special-token policy, and the Q-Former's text ids.

Text from users and datasets never becomes control tokens: ``<|im_end|>`` typed in a question is tokenized as
those characters (``split_special_tokens``), so nobody can forge a turn or end one early. Special tokens enter
only where this code puts them (BOS, EOS, a chat template's own markers).

Every call of a transformers tokenizer goes through ``encode``: a fast tokenizer keeps each call's settings
(``split_special_tokens``, truncation) on the Rust tokenizer it shares with every thread, so two calls at once (a
server's request threads, the engine's) can encode with each other's settings: a chat marker split into characters,
or user text read as control tokens.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
from torch import Tensor
from transformers import BatchEncoding, PreTrainedTokenizerBase

from blip2.errors import InputError

IGNORE = -100  # label of a position that is not scored (cross_entropy's ignore_index)
_ENCODING = threading.Lock()


def encode(tokenizer: PreTrainedTokenizerBase, texts: str | list[str], **options) -> BatchEncoding:
    """``tokenizer(texts, **options)``, one call at a time in the process (see the module docstring)."""
    with _ENCODING:
        return tokenizer(texts, **options)


class LLMTokenizer:
    """An LLM's transformers tokenizer with explicit BOS/EOS handling. It gets ``pad = eos`` when it has no pad
    token, and pads on the right (training); ``tokenize(pad_left=True)`` serves batched generation."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, is_encoder_decoder: bool, tokenizer_specials: bool = False):
        """``tokenizer_specials``: prompts get what ``tokenizer`` adds itself (``LLMConfig.tokenizer_specials``)."""
        _ensure_pad_token(tokenizer)
        tokenizer.padding_side = "right"
        self.hf = tokenizer
        self.is_encoder_decoder = is_encoder_decoder
        self.prefix, self.suffix = self._added_tokens() if tokenizer_specials else self._explicit_tokens()

    def _explicit_tokens(self) -> tuple[list[int], list[int]]:
        """BOS before a decoder-only prompt, EOS after an encoder-decoder one."""
        if self.is_encoder_decoder:
            return [], [self.eos_token_id]
        return ([self.bos_token_id] if self.bos_token_id is not None else []), []

    def _added_tokens(self) -> tuple[list[int], list[int]]:
        """What the tokenizer puts before and after a text by itself (OPT: BOS; Llama: <s>; T5: EOS; ChatML: none)."""
        plain = encode(self.hf, "photo", add_special_tokens=False)["input_ids"]
        full = encode(self.hf, "photo", add_special_tokens=True)["input_ids"]
        start = next(i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain)
        return full[:start], full[start + len(plain):]

    @property
    def bos_token_id(self) -> int | None:
        """What decoder-only text starts with: OPT ``</s>``, Llama ``<s>``, SmolLM2 here ``<|endoftext|>``; T5: None."""
        return self.hf.bos_token_id

    @property
    def eos_token_id(self) -> int:
        """Where generation stops: OPT/T5 ``</s>``, SmolLM2-Instruct ``<|im_end|>``."""
        return self.hf.eos_token_id

    @property
    def pad_token_id(self) -> int:
        """Fills padded positions; may equal ``eos_token_id``, so mask labels by ``attention_mask``, not by id."""
        return self.hf.pad_token_id

    @property
    def chat_template(self) -> str | None:
        return self.hf.chat_template

    def ids(self, text: str) -> list[int]:
        """Plain text -> token ids, no special token added and none recognised in the text."""
        return self.batch_ids([text])[0]

    def batch_ids(self, texts: Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """``ids`` for several texts, each cut to ``max_length`` tokens when given."""
        cut = {"truncation": True, "max_length": max_length} if max_length is not None else {}
        return encode(self.hf, list(texts), add_special_tokens=False, split_special_tokens=True, **cut)["input_ids"]

    def template_ids(self, text: str) -> list[int]:
        """A chat template's text -> token ids, its markers read as the special tokens they name."""
        return encode(self.hf, text, add_special_tokens=False)["input_ids"] if text else []

    def prompt_ids(self, texts: Sequence[str], max_len: int | None = None) -> list[list[int]]:
        """Each prompt as the LLM reads it after the visual prompt: the prompt's special tokens around its text, cut to
        ``max_len`` tokens in all (the text is cut, never the special tokens). No prompt ("") reads as BOS alone for a
        decoder-only LLM, as transformers' Blip2 generates without input ids."""
        budget = None if max_len is None else max_len - len(self.prefix) - len(self.suffix)
        if budget is not None and budget < 1:
            raise InputError(f"max_len={max_len} leaves no room for text after the prompt's special tokens")
        rows = [self.prefix + ids + self.suffix for ids in self.batch_ids(texts, budget)]
        if not self.is_encoder_decoder and self.bos_token_id is not None:
            rows = [row if text else [self.bos_token_id] for row, text in zip(rows, texts)]
        return rows

    def decode(self, ids: Sequence[int]) -> str:
        """Token ids -> text without special tokens, stripped."""
        return self.hf.decode(list(ids), skip_special_tokens=True).strip()

    def tokenize(
        self, texts: Sequence[str], max_len: int, add_bos: bool, add_eos: bool = False, pad_left: bool = False
    ) -> tuple[Tensor, Tensor]:
        """Token ids and attention mask, both [B, T] with T = the longest row (at most ``max_len``).

        ``add_bos``/``add_eos`` say exactly what surrounds the text, and truncation cuts the text, never them. Rows
        are padded on the right (training) or, with ``pad_left``, on the left (batched generation: every prompt
        then ends at the last position, where new tokens are appended).
        """
        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of texts, not one string")
        if add_bos and self.bos_token_id is None:
            raise InputError(f"{type(self.hf).__name__} has no BOS token: call tokenize with add_bos=False")
        budget = max_len - int(add_bos) - int(add_eos)
        if budget < 1:
            raise InputError(f"max_len={max_len} leaves no room for text after the BOS/EOS tokens")
        rows = [[self.bos_token_id] * add_bos + piece + [self.eos_token_id] * add_eos
                for piece in self.batch_ids(texts, budget)]
        return pad(rows, self.pad_token_id, pad_left)


def pad(rows: list[list[int]], pad_id: int, pad_left: bool = False) -> tuple[Tensor, Tensor]:
    """Rows of token ids -> ids and attention mask [B, T], padded to the longest row (on the left with ``pad_left``)."""
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)  # [B, T]
    for index, row in enumerate(rows):
        span = slice(length - len(row), length) if pad_left else slice(0, len(row))
        input_ids[index, span] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, span] = 1
    return input_ids, attention_mask


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Pad with EOS when the tokenizer has no pad token (Llama, GPT-2 style vocabularies)."""
    if tokenizer.pad_token_id is not None:
        return
    if tokenizer.eos_token is None:
        raise InputError(f"{type(tokenizer).__name__} has neither a pad nor an EOS token: set tokenizer.pad_token")
    tokenizer.pad_token = tokenizer.eos_token


def qformer_ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int) -> tuple[Tensor, Tensor]:
    """Q-Former text ([CLS] ... [SEP]) -> input_ids, attention_mask [B, T], cut to ``max_len`` tokens."""
    tok = encode(tokenizer, list(texts), padding="longest", truncation=True, max_length=max_len, return_tensors="pt",
                 split_special_tokens=True)
    return tok.input_ids, tok.attention_mask
