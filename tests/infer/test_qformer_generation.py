"""Q-Former-only captioning: the cached step equals a full causal forward; greedy, beam search, [SEP], batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blip2.infer.decoding import GenerationOptions
from blip2.infer.qformer_generation import beam_search, sample, step


def query_cache(model, image_files):
    features = model.model.image_features(model.pixel_values(image_files))
    return features, model.model.query_states(features, use_cache=True).cache


def full_logits(model, features, tokens):
    """No cache: queries and the whole text in one causal forward -> logits [B, T, V]."""
    image_embeds = model.model.vision_norm(features)
    out = model.model.qformer(image_embeds, tokens, mode="causal")
    return model.model.qformer.lm_logits(out.text)


def sequence_score(model, features, ids: list[int], sep: int, dec: int, length_penalty: float) -> float:
    """Log-probability of ``ids`` (+ [SEP] when it ended there) under a full forward, length-normalised."""
    tokens = torch.tensor([[dec] + ids])
    logprobs = F.log_softmax(full_logits(model, features, tokens)[0].float(), dim=-1)  # [T, V]
    targets = ids + [sep]
    total = sum(logprobs[i, t].item() for i, t in enumerate(targets))
    return total / len(targets) ** length_penalty


@torch.no_grad()
def test_each_cached_step_equals_the_full_causal_forward(tiny_model, image_files):
    model = tiny_model(None)
    features, cache = query_cache(model, image_files)
    dec = model.qformer_tokenizer.bos_token_id
    tokens = torch.tensor([[dec, 2003, 1037, 4937, 2006], [dec, 1037, 3899, 1012, 2000], [dec, 7592, 2088, 2003, 2307]])
    expected = full_logits(model, features, tokens)  # [3, 5, V]
    for length in range(1, tokens.shape[1] + 1):
        logits, cache = step(model.model.qformer, tokens[:, :length], cache)
        torch.testing.assert_close(logits, expected[:, length - 1], rtol=1e-4, atol=1e-4)
    assert cache[0][0].shape[2] == model.model.qformer.num_queries + tokens.shape[1]


@torch.no_grad()
def test_greedy_equals_decoding_without_a_cache(tiny_model, image_files):
    model = tiny_model(None, seed=3)  # a seed whose random Q-Former captions two of the images differently
    features, cache = query_cache(model, image_files)
    ours = sample(model.model.qformer, cache, model.qformer_tokenizer, GenerationOptions(max_new_tokens=8))
    for row, ids in enumerate(ours):
        tokens = torch.tensor([[model.qformer_tokenizer.bos_token_id]])
        for _ in range(8):
            token = full_logits(model, features[row : row + 1], tokens)[0, -1].argmax()
            if token == model.qformer_tokenizer.sep_token_id:
                break
            tokens = torch.cat([tokens, token.view(1, 1)], dim=1)
        assert ids == tokens[0, 1:].tolist()
    assert len({tuple(ids) for ids in ours}) > 1


@torch.no_grad()
@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_beam_search_scores_are_true_and_beat_greedy(tiny_model, image_files, length_penalty):
    model = tiny_model(None, seed=2)
    features, cache = query_cache(model, image_files)
    sep, dec = model.qformer_tokenizer.sep_token_id, model.qformer_tokenizer.bos_token_id
    options = GenerationOptions(max_new_tokens=5, num_beams=4, length_penalty=length_penalty)
    hypotheses = beam_search(model.model.qformer, cache, model.qformer_tokenizer, options)
    greedy = sample(model.model.qformer, cache, model.qformer_tokenizer, GenerationOptions(max_new_tokens=5))
    for row, (ids, score) in enumerate(hypotheses):
        if len(ids) < 5:  # ended with [SEP]: the score includes it
            expected = sequence_score(model, features[row : row + 1], ids, sep, dec, length_penalty)
            assert score == pytest.approx(expected, abs=1e-4)
        greedy_ids = greedy[row]
        if len(greedy_ids) < 5:
            assert score >= sequence_score(model, features[row : row + 1], greedy_ids, sep, dec, length_penalty) - 1e-5
    rows = [[(k[i : i + 1], v[i : i + 1]) for k, v in cache] for i in range(3)]
    alone = [beam_search(model.model.qformer, row, model.qformer_tokenizer, options)[0] for row in rows]
    assert [ids for ids, _ in alone] == [ids for ids, _ in hypotheses]  # a batch decodes as each image alone


@torch.no_grad()
def test_one_beam_is_greedy_and_sep_stops_decoding(tiny_model, image_files):
    model = tiny_model(None, seed=3)
    greedy = model.qformer_caption(image_files, max_new_tokens=6)
    assert model.qformer_caption(image_files, max_new_tokens=6, num_beams=1) == greedy
    assert all(0 < len(text.split()) <= 6 for text in greedy)
    model.model.qformer.lm_head.bias.data[model.qformer_tokenizer.sep_token_id] = 100.0  # [SEP] always wins
    assert model.qformer_caption(image_files, max_new_tokens=6) == ["", "", ""]
    assert model.qformer_caption(image_files, max_new_tokens=6, num_beams=3) == ["", "", ""]


def test_qformer_caption_batches_and_works_on_stage2_models_too(tiny_model, image_files):
    stage1 = tiny_model(None, seed=4)
    assert stage1.qformer_caption(image_files, batch_size=1, num_beams=2, max_new_tokens=5) == stage1.qformer_caption(
        image_files, batch_size=3, num_beams=2, max_new_tokens=5
    )
    assert len(tiny_model("opt").qformer_caption(image_files[0], max_new_tokens=3)) == 1
    sampled = [stage1.qformer_caption(image_files, do_sample=True, seed=s, max_new_tokens=5) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
