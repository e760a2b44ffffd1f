"""Captions from the Q-Former alone (its image-grounded generation head, trained by stage 1's ITG loss).

The queries run once over the image features and their self-attention keys/values are cached
(``QFormer(use_cache=True)``). Text then decodes from ``[DEC]`` one token at a time in the multimodal-causal
mode: each step runs only the newest token, attending to the cached queries and earlier text, and appends its
own keys/values to the cache. Greedy, sampling and beam search (the cache rows follow their beams); a
sequence ends at ``[SEP]`` or after ``max_new_tokens``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.generation import RepetitionPenaltyLogitsProcessor

from blip2.errors import InputError
from blip2.infer.batching import Images, as_image_list, batch_slices, pixel_batch
from blip2.infer.decoding import GenerationOptions, next_token
from blip2.models.qformer import KVCache, QFormer

if TYPE_CHECKING:
    from blip2.pipeline import Blip2Pipeline

Hypothesis = tuple[list[int], float]  # generated token ids ([SEP] excluded), length-normalised log-probability


def qformer_caption(pipe: "Blip2Pipeline", images: Images, batch_size: int, options: GenerationOptions) -> list[str]:
    """One caption per image, ``batch_size`` images at a time."""
    images = as_image_list(images)
    captions: list[str] = []
    for where in batch_slices(len(images), batch_size):
        captions += qformer_generate(pipe, pipe.model.image_features(pixel_batch(pipe, images, where)), options)
    return captions


@torch.no_grad()
def qformer_generate(pipe: "Blip2Pipeline", features: Tensor, options: GenerationOptions) -> list[str]:
    """Frozen image features [B, N, D] -> one caption per image."""
    model, tokenizer = pipe.model, pipe.qformer_tokenizer
    if tokenizer.bos_token_id is None or tokenizer.sep_token_id is None:
        raise InputError(
            "the Q-Former tokenizer needs [DEC] as its BOS token and a [SEP] token: build it with "
            "blip2.weights.bert.load_tokenizer"
        )
    cache = model.query_states(features, use_cache=True).cache  # per layer [B, heads, Q, d]
    if options.num_beams > 1:
        token_lists = [ids for ids, _ in beam_search(model.qformer, cache, tokenizer, options)]
    else:
        token_lists = sample(model.qformer, cache, tokenizer, options)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in token_lists]


def step(qformer: QFormer, tokens: Tensor, cache: KVCache) -> tuple[Tensor, KVCache]:
    """Run the newest token of ``tokens`` [B, T] ([DEC] first) against ``cache`` (queries + the T - 1 earlier
    tokens) -> next-token logits [B, V] and the cache grown by that token."""
    out = qformer(
        input_ids=tokens[:, -1:], text_mask=torch.ones_like(tokens), mode="causal", past=cache, use_cache=True
    )  # fmt: skip
    return qformer.lm_logits(out.text)[:, -1], out.cache


def sample(qformer: QFormer, cache: KVCache, tokenizer, options: GenerationOptions) -> list[list[int]]:
    """Greedy or sampled decoding for the whole batch; finished rows are padded until all are done."""
    batch, device = cache[0][0].shape[0], cache[0][0].device
    tokens = torch.full((batch, 1), tokenizer.bos_token_id, dtype=torch.long, device=device)  # [B, 1]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    generator = options.generator(device)
    for _ in range(options.max_new_tokens):
        logits, cache = step(qformer, tokens, cache)
        chosen = next_token(logits, options, tokens[:, 1:], generator, [tokenizer.sep_token_id])  # [B]
        chosen = torch.where(done, tokenizer.pad_token_id, chosen)
        tokens = torch.cat([tokens, chosen[:, None]], dim=1)
        done |= chosen == tokenizer.sep_token_id
        if done.all():
            break
    return [_until(row[1:].tolist(), tokenizer.sep_token_id) for row in tokens]


def beam_search(qformer: QFormer, cache: KVCache, tokenizer, options: GenerationOptions) -> list[Hypothesis]:
    """The best hypothesis per image under ``num_beams`` beams; scores are log-probabilities divided by
    length ** length_penalty (length counts generated tokens, [SEP] included).

    A row stops when it holds ``num_beams`` finished hypotheses and no running beam can still beat the worst
    of them (an exact bound: log-probabilities only fall as a beam grows).
    """
    beams, penalty, max_new = options.num_beams, options.length_penalty, options.max_new_tokens
    batch, device = cache[0][0].shape[0], cache[0][0].device
    cache = [(k.repeat_interleave(beams, 0), v.repeat_interleave(beams, 0)) for k, v in cache]  # rows b*K + k
    tokens = torch.full((batch * beams, 1), tokenizer.bos_token_id, dtype=torch.long, device=device)  # [B*K, 1]
    scores = torch.zeros(batch, beams, device=device)  # [B, K] running log-probabilities
    scores[:, 1:] = float("-inf")  # all beams start identical: let only the first one expand
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch

    for length in range(1, max_new + 1):
        logits, cache = step(qformer, tokens, cache)  # [B*K, V]
        if options.repetition_penalty != 1.0 and tokens.shape[1] > 1:
            logits = RepetitionPenaltyLogitsProcessor(options.repetition_penalty)(tokens[:, 1:], logits.float())
        vocab = logits.shape[-1]
        totals = scores[..., None] + F.log_softmax(logits.float(), dim=-1).view(batch, beams, vocab)  # [B, K, V]
        top_scores, top_index = totals.view(batch, -1).topk(2 * beams, dim=1)  # [B, 2K]: at most K of them end here

        rows, next_tokens, next_scores = [], [], []
        for b in range(batch):
            kept = 0
            for rank, (score, index) in enumerate(zip(top_scores[b].tolist(), top_index[b].tolist())):
                row, token = b * beams + index // vocab, index % vocab
                if token == tokenizer.sep_token_id:
                    if rank < beams and not done[b]:
                        finished[b].append((score / length**penalty, tokens[row, 1:].tolist()))
                    continue
                rows.append(row)
                next_tokens.append(token)
                next_scores.append(score)
                kept += 1
                if kept == beams:
                    break
            finished[b] = sorted(finished[b], key=lambda h: h[0], reverse=True)[:beams]
            best_running = max(next_scores[-beams:])
            bound = best_running / (max_new if penalty > 0 else length + 1) ** penalty
            done[b] = done[b] or (len(finished[b]) == beams and finished[b][-1][0] >= bound)
        if all(done):
            break
        index = torch.tensor(rows, device=device)
        tokens = torch.cat([tokens[index], torch.tensor(next_tokens, device=device)[:, None]], dim=1)
        cache = [(k[index], v[index]) for k, v in cache]
        scores = torch.tensor(next_scores, device=device).view(batch, beams)
    else:  # max_new_tokens reached: running beams count as hypotheses too
        for b in range(batch):
            if not done[b]:
                for k in range(beams):
                    finished[b].append((scores[b, k].item() / max_new**penalty, tokens[b * beams + k, 1:].tolist()))
    best = [max(hypotheses, key=lambda h: h[0]) for hypotheses in finished]
    return [(ids, score) for score, ids in best]


def _until(ids: list[int], stop: int) -> list[int]:
    return ids[: ids.index(stop)] if stop in ids else ids
