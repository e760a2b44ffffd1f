"""Recall@K from score matrices (several captions per image) and the ITM re-rank of the ITC top k."""

import pytest
import torch

from blip2.eval.retrieval_metrics import best_positive_rank, recall_at_k, rerank_topk


def scores_placing_positive_at(ranks, positives):
    """[N_query, N_cand] scores where query q's best positive has exactly ranks[q] negatives above it."""
    n_query, n_cand = positives.shape
    scores = torch.empty(n_query, n_cand)
    for query, rank in enumerate(ranks):
        negatives = (~positives[query]).nonzero().flatten().tolist()
        pos = positives[query].nonzero().flatten().tolist()
        order = negatives[:rank] + pos + negatives[rank:]  # best first
        scores[query, order] = torch.arange(n_cand, 0, -1, dtype=torch.float)
    return scores


# 12 images; image j owns text j, and images 0 and 5 own one more caption each (texts 12, 13)
TXT2IMG = list(range(12)) + [0, 5]
IMG2TXT = [[0, 12]] + [[j] for j in range(1, 5)] + [[5, 13]] + [[j] for j in range(6, 12)]


def positives_i2t():
    mask = torch.zeros(12, 14, dtype=torch.bool)
    mask[TXT2IMG, torch.arange(14)] = True
    return mask


def test_recall_at_k_both_directions_exact():
    i2t_ranks = [0, 0, 1, 2, 4, 4, 5, 8, 9, 10, 12, 3]
    t2i_ranks = [0] * 7 + [1, 2, 5, 6, 9, 10, 11]
    i2t = scores_placing_positive_at(i2t_ranks, positives_i2t())
    t2i = scores_placing_positive_at(t2i_ranks, positives_i2t().t())
    result = recall_at_k(i2t, TXT2IMG, IMG2TXT, scores_t2i=t2i)
    expected = {"i2t_r1": 2 / 12, "i2t_r5": 7 / 12, "i2t_r10": 10 / 12,
                "t2i_r1": 7 / 14, "t2i_r5": 9 / 14, "t2i_r10": 12 / 14}
    expected["i2t_mean"] = (2 + 7 + 10) / 36
    expected["t2i_mean"] = (7 + 9 + 12) / 42
    expected["mean"] = (expected["i2t_mean"] + expected["t2i_mean"]) / 2
    assert result == pytest.approx(expected)


def test_best_of_several_captions_counts():
    # image 0's first caption is ranked last, its second one first: a hit at 1
    scores = torch.tensor([[0.0, 0.5, 0.9],
                           [0.1, 0.8, 0.2]])
    result = recall_at_k(scores, [0, 1, 0], [[0, 2], [1]], ks=(1,))
    assert result["i2t_r1"] == 1.0
    # text-to-image defaults to scores.T: text 0 prefers image 1 (0.1 > 0.0), texts 1 and 2 are right
    assert result["t2i_r1"] == pytest.approx(2 / 3)


def test_ties_count_against_the_query():
    ranks = best_positive_rank(torch.zeros(2, 3), torch.tensor([[True, False, False], [False, True, True]]))
    assert ranks.tolist() == [2, 1]
    result = recall_at_k(torch.ones(3, 3), [0, 1, 2], [[0], [1], [2]], ks=(1, 3))
    assert result["i2t_r1"] == 0.0 and result["t2i_r1"] == 0.0 and result["i2t_r3"] == 1.0


def test_recall_input_errors():
    with pytest.raises(ValueError, match=r"img2txt\[1\] = \[1\] disagrees with txt2img"):
        recall_at_k(torch.zeros(2, 3), [0, 1, 1], [[0], [1]])
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(torch.zeros(2, 2), [0, 2], [[0], [1]])
    with pytest.raises(ValueError, match=r"img2txt\[1\] is empty"):
        recall_at_k(torch.zeros(2, 2), [0, 0], [[0, 1], []])
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(torch.full((1, 1), float("nan")), [0], [[0]])
    with pytest.raises(ValueError, match=r"scores_t2i must be \[N_txt, N_img\]"):
        recall_at_k(torch.zeros(2, 3), [0, 1, 1], [[0], [1, 2]], scores_t2i=torch.zeros(2, 3))


class PairwiseItm:
    """ITM stand-in: +1 for a matching (image, text) pair, -1 otherwise; records every call."""

    def __init__(self, txt2img):
        self.txt2img = torch.as_tensor(txt2img)
        self.calls = []

    def __call__(self, images, texts):
        self.calls.append((images.clone(), texts.clone()))
        return (self.txt2img[texts] == images).float() * 2 - 1  # [P]


def test_itm_fixes_a_wrong_itc_order():
    # text i belongs to image i; ITC prefers the wrong text for image 0 and the wrong image for text 1
    itc = torch.tensor([[0.5, 0.9, 0.1],
                        [0.2, 0.8, 0.3],
                        [0.1, 0.2, 0.4]])
    ids, captions = [0, 1, 2], [[0], [1], [2]]
    before = recall_at_k(itc, ids, captions, ks=(1,))
    assert before["i2t_r1"] == pytest.approx(2 / 3) and before["t2i_r1"] == pytest.approx(2 / 3)
    i2t, t2i = rerank_topk(itc, PairwiseItm(ids), k=2)
    after = recall_at_k(i2t, ids, captions, ks=(1,), scores_t2i=t2i)
    assert after["i2t_r1"] == 1.0 and after["t2i_r1"] == 1.0
    # image 0: top 2 texts {1, 0} -> 0.9 - 1 and 0.5 + 1; text 2 is outside: 0.1 shifted to 1 below -0.1
    assert i2t[0].tolist() == pytest.approx([1.5, -0.1, -1.1])
    # text 2 (column 2 of ITC: 0.1, 0.3, 0.4): top 2 images {2, 1} -> 1.4, -0.7; image 0 -> 0.1 - 0.1 - 0.7 - 1
    assert t2i[2].tolist() == pytest.approx([-1.7, -0.7, 1.4])


def test_rerank_keeps_itc_order_below_the_top_k():
    g = torch.Generator().manual_seed(0)
    itc = torch.randn(7, 13, generator=g)
    itm_table = 5 * torch.randn(7, 13, generator=g)  # large enough to reorder the top k
    k = 4
    i2t, t2i = rerank_topk(itc, lambda im, tx: itm_table[im, tx], k=k, batch_size=5)
    for final, scores, itm in ((i2t, itc, itm_table), (t2i, itc.t(), itm_table.t())):
        top = scores.topk(k, dim=1).indices
        in_top = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)
        torch.testing.assert_close(final[in_top], (scores + itm)[in_top])
        for row in range(scores.shape[0]):
            outside = final[row][~in_top[row]]
            assert outside.max().item() == pytest.approx(final[row][in_top[row]].min().item() - 1)
            assert torch.equal(outside.argsort(), scores[row][~in_top[row]].argsort())  # ITC order kept


def test_rerank_scores_each_pair_once_in_bounded_batches():
    g = torch.Generator().manual_seed(1)
    itc = torch.randn(5, 9, generator=g)
    itm = PairwiseItm([0, 1, 2, 3, 4, 0, 1, 2, 3])
    i2t, t2i = rerank_topk(itc, itm, k=3, batch_size=4)
    assert all(images.numel() <= 4 for images, _ in itm.calls)
    pairs = [(i, t) for images, texts in itm.calls for i, t in zip(images.tolist(), texts.tolist())]
    expected = {(i, t) for i in range(5) for t in itc[i].topk(3).indices.tolist()}
    expected |= {(i, t) for t in range(9) for i in itc[:, t].topk(3).indices.tolist()}
    assert len(pairs) == len(set(pairs)) and set(pairs) == expected
    assert pairs == sorted(pairs)  # grouped by image
    one_at_a_time = rerank_topk(itc, PairwiseItm(itm.txt2img), k=3, batch_size=1)
    torch.testing.assert_close(one_at_a_time[0], i2t)
    torch.testing.assert_close(one_at_a_time[1], t2i)


def test_rerank_everything_when_k_covers_all_candidates():
    itc = torch.tensor([[0.3, 0.1], [0.2, 0.6], [0.5, 0.4]])
    itm = PairwiseItm([0, 1])
    i2t, t2i = rerank_topk(itc, itm, k=128)
    expected = itc + torch.tensor([[1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    torch.testing.assert_close(i2t, expected)
    torch.testing.assert_close(t2i, expected.t())
    assert t2i.shape == (2, 3) and t2i.is_contiguous()


def test_rerank_input_errors():
    with pytest.raises(ValueError, match="one score per pair"):
        rerank_topk(torch.zeros(2, 2), lambda im, tx: torch.zeros(len(im), 2), k=1)
    with pytest.raises(ValueError, match="finite ITC"):
        rerank_topk(torch.tensor([[0.0, float("inf")]]), lambda im, tx: torch.zeros(len(im)), k=1)
    with pytest.raises(ValueError, match="inf or NaN"):
        rerank_topk(torch.zeros(2, 2), lambda im, tx: torch.full((len(im),), float("nan")), k=1)
