"""The Q-Former's three mask modes, its cache, and its layer layout."""

import pytest
import torch

from blip2.config import QFormerConfig
from blip2.models.qformer import ImageContext, QFormer, attention_mask


def tiny(**overrides) -> QFormer:
    cfg = dict(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, vocab_size=50,
               max_position_embeddings=40, num_query_tokens=5, encoder_width=24, init_from=None)
    cfg.update(overrides)
    torch.manual_seed(0)
    return QFormer(QFormerConfig(**cfg)).eval()


@pytest.fixture
def qf():
    return tiny()


def inputs(batch=2, text_len=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 9, 24, generator=g)
    ids = torch.randint(1, 50, (batch, text_len), generator=g)
    mask = torch.ones(batch, text_len, dtype=torch.long)
    mask[1, -2:] = 0  # the second example is padded
    return image, ids, mask


def test_mask_pictures():
    mask = attention_mask(2, torch.ones(1, 3), "causal")[0, 0].int()
    assert mask.tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    uni = attention_mask(2, torch.tensor([[1, 1, 0]]), "unimodal")[0, 0].int()
    assert uni.tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0]]
    bi = attention_mask(2, torch.tensor([[1, 1, 0]]), "bidirectional")[0, 0].int()
    assert bi.tolist() == [[1, 1, 1, 1, 0]] * 5
    with pytest.raises(ValueError, match="unknown attention mode"):
        attention_mask(2, None, "diagonal")


def test_cross_attention_every_freq_layers():
    assert [layer.cross_attn is not None for layer in tiny(num_layers=4, cross_attention_freq=2).layers] == [True, False, True, False]
    assert all(layer.cross_attn is not None for layer in tiny(cross_attention_freq=1).layers)
    assert tiny().layers[0].cross_attn.key.in_features == 24  # keys/values from the encoder width


def test_causal_queries_never_see_text(qf):
    image, ids, mask = inputs()
    a = qf(image, ids, mask, mode="causal").queries
    b = qf(image, torch.randint(1, 50, ids.shape), mask, mode="causal").queries
    torch.testing.assert_close(a, b)
    c = qf(image, ids, mask, mode="bidirectional").queries
    assert not torch.allclose(a, c, atol=1e-4)  # in bidirectional mode the text does reach the queries


def test_causal_text_is_strictly_causal(qf):
    image, ids, mask = inputs()
    full = qf(image, ids, mask, mode="causal").text
    changed = ids.clone()
    changed[:, 4:] = (changed[:, 4:] + 7) % 49 + 1
    edited = qf(image, changed, mask, mode="causal").text
    torch.testing.assert_close(full[:, :4], edited[:, :4])
    assert not torch.allclose(full[:, 4:], edited[:, 4:], atol=1e-4)


def test_unimodal_equals_separate_runs(qf):
    image, ids, mask = inputs()
    joint = qf(image, ids, mask, mode="unimodal")
    queries_alone = qf(image_embeds=image).queries
    text_alone = qf(input_ids=ids, text_mask=mask).text
    torch.testing.assert_close(joint.queries, queries_alone)
    real = mask.bool()
    torch.testing.assert_close(joint.text[real], text_alone[real])


def test_cached_queries_then_text_equals_joint_causal_run(qf):
    """ITG decodes text against the queries' cached keys/values: same as one joint causal pass."""
    image, ids, mask = inputs()
    joint = qf(image, ids, mask, mode="causal").text
    cached = qf(image_embeds=image, use_cache=True).cache
    text = qf(input_ids=ids, text_mask=mask, mode="causal", past=cached).text
    torch.testing.assert_close(text, joint)


def test_incremental_decoding_matches_full_pass(qf):
    image, ids, _ = inputs()
    full = qf.lm_logits(qf(image, ids, mode="causal").text)
    out = qf(image_embeds=image, use_cache=True)
    cache, steps = out.cache, []
    for t in range(ids.shape[1]):
        step = qf(input_ids=ids[:, t : t + 1], text_mask=torch.ones(2, t + 1), mode="causal", past=cache, use_cache=True)
        cache = step.cache
        steps.append(qf.lm_logits(step.text))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-4, atol=1e-5)


def test_errors_name_the_cause(qf):
    with pytest.raises(ValueError, match="nothing to run"):
        qf()
    with pytest.raises(ValueError, match="encoder_width"):
        QFormer(QFormerConfig(hidden_size=32, num_heads=4, encoder_width=0, init_from=None))


def test_an_image_context_computed_once_reads_like_the_features():
    """The queries read precomputed cross-attention keys/values (``ImageContext``) exactly as they read the features;
    rows picked and stacked from it equal the rows computed from their features."""
    torch.manual_seed(0)
    cfg = QFormerConfig(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=64, num_query_tokens=4,
                        encoder_width=24, cross_attention_freq=2, init_from=None)
    qformer = QFormer(cfg).eval()
    images = torch.randn(3, 5, 24)  # [B, N, D]
    context = qformer.image_context(images)
    assert [kv is None for kv in context.keys_values] == [False, True, False] and len(context) == 3
    torch.testing.assert_close(qformer(context).queries, qformer(images).queries, rtol=0, atol=0)
    rows = torch.tensor([2, 0, 2])
    picked = ImageContext.cat([context.select(rows), context.select(torch.tensor([1]))])
    torch.testing.assert_close(qformer(picked).queries, qformer(images[[2, 0, 2, 1]]).queries)
    ids = torch.tensor([[101, 7, 8, 102]] * 4)
    joint = qformer(picked, ids, mode="bidirectional").queries
    torch.testing.assert_close(joint, qformer(images[[2, 0, 2, 1]], ids, mode="bidirectional").queries)
