"""What each training stage reads, collated from dataset items: ``Stage1Collate`` (Q-Former ids of captions) and
``Stage2Collate`` (LLM ids with labels on what the model must produce: captions, VQA answers, a conversation's
replies)."""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from blip2.data.bad_images import collate_skip_bad
from blip2.data.conversation import IMAGE_ID, TemplateFormat, per_turn_images
from blip2.data.text import IGNORE, LLMTokenizer, pad, qformer_ids
from blip2.errors import InputError
from blip2.prompts import CAPTION_PROMPT, format_questions, turn_prompt, vqa_template


class Stage1Collate:
    """Caption items -> {"image", "input_ids", "attention_mask", "bad_images"} with the Q-Former's tokenizer."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_len: int):
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, items: list) -> dict[str, Any]:
        batch = collate_skip_bad(items)
        if batch.get("text"):
            batch["input_ids"], batch["attention_mask"] = qformer_ids(self.tokenizer, batch["text"], self.max_len)
        return batch


def prompt_and_target(item: dict[str, Any], is_encoder_decoder: bool, seed: int = 0) -> tuple[str, str]:
    """What the LLM reads (after the visual prompt) and what it must produce, for a caption or a VQA item.

    Decoder-only captions: no prompt, the caption is the target. Encoder-decoder captions: prefix language
    modelling — the caption is split at a word boundary drawn from (seed, image, caption); the prefix goes to the
    encoder. VQA items: the paper's prompt for the family, the first answer as the target.
    """
    if "question" in item:
        return format_questions([item["question"]], vqa_template(is_encoder_decoder))[0], item["answers"][0]
    text = item["text"]
    if not is_encoder_decoder:
        return CAPTION_PROMPT, text
    words = text.split()
    cut = random.Random(f"{seed}/{item['image_id']}/{text}").randint(0, max(len(words) - 1, 0))  # reproducible on resume
    return " ".join(words[:cut]), " ".join(words[cut:])


def chat_row(chat: TemplateFormat, messages: list[dict], num_visual: int, max_len: int,
             per_turn: bool = False) -> tuple[list[int], list[int]]:
    """A conversation rendered as chat renders it (``TemplateFormat``, the image as ``num_visual`` ``IMAGE_ID``
    placeholders opening the first user message, or every one with ``per_turn``) -> (token ids, labels), both cut
    to ``max_len`` (before a visual prompt the cut would split). Labels are each assistant reply's tokens and the
    end-of-text token that closes it: exactly what chat generates after the glue that opens a reply."""
    images = per_turn_images(messages) if per_turn else None

    def render(count: int, generation_prompt: bool) -> list[int]:  # the first ``count`` messages, as chat renders them
        head = None if images is None else images[:count]
        return chat.token_ids(messages[:count], num_visual, generation_prompt=generation_prompt, images=head)

    ids = render(len(messages), generation_prompt=False)
    labels = [IGNORE] * len(ids)
    eos = chat.tokenizer.eos_token_id
    for j, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        asked = render(j, generation_prompt=True)  # what chat reads before replying
        end = len(render(j + 1, generation_prompt=False))
        if ids[: len(asked)] != asked:
            raise InputError("this LLM's chat template renders earlier turns differently once later ones follow, so "
                             "a conversation cannot be trained as chat reads it; train on caption and VQA data")
        reply = ids[len(asked):end]
        reply = reply[: reply.index(eos) + 1] if eos in reply else reply
        labels[len(asked): len(asked) + len(reply)] = reply
    placed = ids[:max_len].count(IMAGE_ID)
    if placed < num_visual:
        raise InputError(f"a conversation cut to {max_len} tokens loses its image; raise llm.max_text_len")
    if placed % num_visual:  # the cut splits a visual prompt: cut before it
        max_len = [i for i, token in enumerate(ids) if token == IMAGE_ID][placed - placed % num_visual]
    return ids[:max_len], labels[:max_len]


class Stage2Collate:
    """Caption, VQA and/or conversation items -> LLM token ids with labels on what the model must produce only
    (and, for a model whose Q-Former reads the prompt, the prompts' Q-Former ids as "prompt_ids"/"prompt_mask": one
    per row, or with ``per_turn`` one per visual prompt, "prompt_image" [S] naming each one's row)."""

    def __init__(self, tokenizer: LLMTokenizer, max_len: int, seed: int = 0, decoder_start_token_id: int | None = None,
                 qformer_tokenizer: PreTrainedTokenizerBase | None = None, qformer_max_len: int = 32,
                 num_visual: int | None = None, per_turn: bool = False):
        """``max_len``: text tokens per row; ``decoder_start_token_id``: an encoder-decoder LLM's (its config's);
        ``qformer_tokenizer``: given for a model whose Q-Former reads the prompt (``llm.prompt_to_qformer``);
        ``num_visual``: the model's visual-prompt length (``Blip2Model.num_visual``), needed for conversations;
        ``per_turn``: every user message of a conversation opens with a visual prompt read from it
        (``llm.visual_prompt_per_turn``; needs ``qformer_tokenizer``)."""
        if tokenizer.is_encoder_decoder and decoder_start_token_id is None:
            raise InputError("an encoder-decoder LLM needs its decoder_start_token_id to build decoder inputs")
        if per_turn and qformer_tokenizer is None:
            raise InputError("a visual prompt per turn is read by the Q-Former: give its qformer_tokenizer")
        self.tokenizer, self.max_len, self.seed = tokenizer, max_len, seed
        self.decoder_start, self.num_visual, self.per_turn = decoder_start_token_id, num_visual, per_turn
        self.qformer_tokenizer, self.qformer_max_len = qformer_tokenizer, qformer_max_len

    def __call__(self, items: list) -> dict[str, Any]:
        batch = collate_skip_bad([self._as_row(item) if isinstance(item, dict) else item for item in items])
        if batch.get("prompt"):
            prompts, targets, conversations = batch.pop("prompt"), batch.pop("target"), batch.pop("messages")
            if self.tokenizer.is_encoder_decoder:
                batch.update(self._seq2seq(prompts, targets))
            else:
                batch.update(self._decoder_only(prompts, targets, conversations))
            if self.qformer_tokenizer is not None:  # a conversation's image is encoded as chat encodes it
                reads, rows = self._qformer_prompts(prompts, conversations, batch["input_ids"])
                batch["prompt_ids"], batch["prompt_mask"] = qformer_ids(self.qformer_tokenizer, reads,
                                                                        self.qformer_max_len)
                if self.per_turn:
                    batch["prompt_image"] = torch.tensor(rows)
        return batch

    def _qformer_prompts(self, prompts, conversations, input_ids: Tensor) -> tuple[list[str], list[int]]:
        """What the Q-Former reads for each visual prompt of the batch, and the row each belongs to: a pair's prompt;
        a conversation's "" (read with no text), or with ``per_turn`` each user message its row kept."""
        reads: list[str] = []
        rows: list[int] = []
        for i, (prompt, messages) in enumerate(zip(prompts, conversations)):
            if messages is not None and self.per_turn:
                kept = int((input_ids[i] == IMAGE_ID).sum()) // self.num_visual
                users = [m["content"] for m in messages if m["role"] == "user"][:kept]
                turns = [turn_prompt(text, self.tokenizer.is_encoder_decoder) for text in users]
            else:
                turns = [prompt]
            reads += turns
            rows += [i] * len(turns)
        return reads, rows

    def _as_row(self, item: dict[str, Any]) -> dict[str, Any]:
        """An item as {"image", "image_id", "prompt", "target", "messages"}: a conversation has no prompt or target,
        a caption or VQA pair no messages."""
        row = {"image": item["image"], "image_id": item["image_id"], "prompt": "", "target": None, "messages": None}
        if "messages" in item:
            self._chat_format()  # fails early, naming why, for a model that cannot learn conversations
            row["messages"] = item["messages"]
        else:
            row["prompt"], row["target"] = prompt_and_target(item, self.tokenizer.is_encoder_decoder, self.seed)
        return row

    def _chat_format(self) -> TemplateFormat:
        if self.tokenizer.is_encoder_decoder or not self.tokenizer.chat_template:
            raise InputError("training on conversations needs a decoder-only LLM with a chat template (what chat "
                             "then speaks); train this LLM on caption and VQA data instead")
        if self.num_visual is None:
            raise InputError("conversations need num_visual (the model's visual-prompt length) to place the image")
        return TemplateFormat(self.tokenizer)

    def _decoder_only(self, prompts, targets, conversations) -> dict[str, Tensor]:
        """Pairs: BOS + prompt (``prompt_ids``) + target + EOS, labels only on target + EOS (prompt and padding
        ignored). Conversations (``chat_row``) hold the image as ``IMAGE_ID`` placeholders; in a batch with any, the
        pairs' rows start with placeholders too, so every row places its visual prompt the same way."""
        eos = self.tokenizer.eos_token_id
        pairs = [i for i, messages in enumerate(conversations) if messages is None]
        rows: list[list[int]] = [[] for _ in prompts]
        labels: list[list[int]] = [[] for _ in prompts]
        if pairs:
            spaced = [(" " + targets[i]) if prompts[i] else targets[i] for i in pairs]
            heads = self.tokenizer.prompt_ids([prompts[i] for i in pairs])
            for i, head, t in zip(pairs, heads, self.tokenizer.batch_ids(spaced)):
                tail = (t + [eos])[: max(self.max_len - len(head), 1)]
                rows[i], labels[i] = head + tail, [IGNORE] * len(head) + tail
        if len(pairs) < len(prompts):
            chat, visual = self._chat_format(), [IMAGE_ID] * self.num_visual
            for i in pairs:
                rows[i], labels[i] = visual + rows[i], [IGNORE] * len(visual) + labels[i]
            for i, messages in enumerate(conversations):
                if messages is not None:
                    turns = sum(m["role"] == "user" for m in messages) if self.per_turn else 1
                    rows[i], labels[i] = chat_row(chat, messages, self.num_visual,
                                                  self.max_len + self.num_visual * turns, self.per_turn)
        input_ids, mask = pad(rows, self.tokenizer.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": pad(labels, IGNORE)[0]}

    def _seq2seq(self, prompts, targets) -> dict[str, Tensor]:
        """Encoder: prompt + EOS; decoder target: target + EOS (teacher forcing from the decoder start token)."""
        enc_ids, enc_mask = pad(self.tokenizer.prompt_ids(prompts, self.max_len), self.tokenizer.pad_token_id)
        dec_ids, dec_mask = self.tokenizer.tokenize(list(targets), self.max_len, add_bos=False, add_eos=True)
        labels = dec_ids.masked_fill(dec_mask == 0, IGNORE)
        decoder_input_ids = torch.cat([torch.full_like(dec_ids[:, :1], self.decoder_start), dec_ids[:, :-1]], dim=1)
        decoder_mask = torch.cat([torch.ones_like(dec_mask[:, :1]), dec_mask[:, :-1]], dim=1)
        return {"input_ids": enc_ids, "attention_mask": enc_mask, "labels": labels,
                "decoder_input_ids": decoder_input_ids, "decoder_attention_mask": decoder_mask}
