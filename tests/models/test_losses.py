"""Stage-1 loss details: identical captions (and one image under several captions) in a batch are matches, not
negatives, for ITC and ITM."""

import torch
import torch.nn.functional as F

from blip2.models.losses import LABEL_SMOOTHING, itc_loss, own_pairs, same_text, sample_hard_negatives
from blip2.train.stages import Stage1Collate, image_key
from blip2.weights.bert import load_tokenizer


def test_same_text_compares_tokens_and_ignores_padding():
    ids = torch.tensor([[101, 7, 8, 102, 0], [101, 7, 8, 102, 0], [101, 7, 9, 102, 0], [101, 7, 8, 5, 102]])
    mask = (ids != 0).long()
    wider = F.pad(ids, (0, 2), value=3)  # another rank's padding: ids past the mask must not count
    wider_mask = F.pad(mask, (0, 2))
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(same_text(ids, mask, ids, mask), expected)
    assert torch.equal(same_text(ids, mask, wider, wider_mask), expected)


def _smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """By hand: -sum_j q_j log softmax_j, q = (1 - eps) target + eps / G, averaged over rows."""
    q = (1 - LABEL_SMOOTHING) * target + LABEL_SMOOTHING / logits.shape[1]
    return -(q * logits.log_softmax(dim=1)).sum(dim=1).mean()


def test_itc_splits_the_target_between_identical_captions():
    torch.manual_seed(0)
    image_feats = F.normalize(torch.randn(4, 3, 8), dim=-1)  # [B, Q, E]
    text_feat = F.normalize(torch.randn(4, 8), dim=-1)  # [B, E]
    temp = torch.tensor(0.1)
    sim_i2t = torch.einsum("bqe,ge->bgq", image_feats, text_feat).amax(-1) / temp
    sim_t2i = torch.einsum("be,gqe->bgq", text_feat, image_feats).amax(-1) / temp

    plain, _, _ = itc_loss(image_feats, text_feat, temp)  # no duplicates: the paper's one-hot targets
    eye = torch.eye(4)
    torch.testing.assert_close(plain, (_smoothed_cross_entropy(sim_i2t, eye) + _smoothed_cross_entropy(sim_t2i, eye)) / 2)

    positives = torch.eye(4, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = True  # rows 0 and 1 have the same caption
    shared, _, _ = itc_loss(image_feats, text_feat, temp, positives=positives)
    target = positives.float() / positives.sum(1, keepdim=True)  # rows 0, 1: half on each; rows 2, 3: one-hot
    expected = (_smoothed_cross_entropy(sim_i2t, target) + _smoothed_cross_entropy(sim_t2i, target)) / 2
    torch.testing.assert_close(shared, expected)
    assert not torch.allclose(shared, plain)


def test_hard_negatives_are_never_positives():
    torch.manual_seed(0)
    sim = torch.randn(4, 4) * 5
    sim[0, 1] = sim[1, 0] = 50.0  # the duplicate would be by far the likeliest "negative"
    positives = own_pairs(4, 4, 0, sim.device)
    positives[0, 1] = positives[1, 0] = True
    draws = torch.stack([sample_hard_negatives(sim, positives) for _ in range(200)])  # [200, B]
    assert not positives[torch.arange(4).expand(200, 4), draws].any()
    assert set(draws[:, 0].tolist()) <= {2, 3} and set(draws[:, 1].tolist()) <= {2, 3}
    own_only = own_pairs(4, 4, 0, sim.device)
    assert (torch.stack([sample_hard_negatives(sim, own_only) for _ in range(50)])[:, 0] == 1).all()


def test_stage1_collate_keys_rows_by_image():
    items = [{"image": torch.zeros(2, 3), "text": text, "image_id": image_id}
             for text, image_id in [("a red star", "train/0"), ("a blue cross", "train/1"), ("one shape", "train/0")]]
    batch = Stage1Collate(load_tokenizer("minilm"), max_len=16)(items)
    keys = batch["image_key"]
    assert keys.dtype == torch.long and keys[0] == keys[2] and keys[0] != keys[1]
    assert image_key("train/0") == int(keys[0])  # stable across processes and runs: a hash of the id, not Python's
