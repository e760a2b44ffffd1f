"""BLIP-2's losses recomputed by hand: each reference below is a few lines of plain torch written from the paper's
definitions (and LAVIS's choices: label smoothing 0.1 for ITC and ITG, ITM logits averaged over queries), independent
of ``blip2.models.losses``. Only the model's own modules (Q-Former, heads, LLM) are shared with the code under test.

Each test's docstring lists the one-line mutations of ``losses.py`` it was seen to catch (each applied alone).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import TINY_QFORMER

from blip2.config import Blip2Config
from blip2.data.collate import Stage2Collate
from blip2.factory import build
from blip2.models import losses
from blip2.weights.bert import load_tokenizer

SMOOTHING = 0.1  # BLIP-2 (LAVIS): ITC and ITG use label smoothing 0.1; ITM none
TEXTS = ["a red star", "two blue circles on a gray background", "a cross", "three small green squares at the top"]


def smoothed_cross_entropy(logits, targets, smoothing=SMOOTHING):
    """Mean over rows of -[(1 - s) log p(target) + s * mean_k log p(k)]. logits [M, K], targets [M]."""
    log_p = logits.log_softmax(dim=-1)
    return -((1 - smoothing) * log_p[torch.arange(len(targets)), targets] + smoothing * log_p.mean(dim=-1)).mean()


@pytest.fixture
def stage1_model(tiny_parts, randomize):
    """A tiny stage-1 model with non-degenerate random trainable weights, in eval mode (no dropout)."""
    vision_dir, _ = tiny_parts(None)
    model = build(Blip2Config.from_dict({"vision": {"kind": "hf", "path": str(vision_dir)}, "qformer": TINY_QFORMER})).model
    for offset, part in enumerate([model.qformer, model.vision_norm, model.vision_proj, model.text_proj, model.itm_head]):
        randomize(part, 10 + offset)
    with torch.no_grad():
        model.temp.fill_(0.07)
    return model.eval()


def tokens(model, texts):
    tok = load_tokenizer("minilm")(texts, padding="longest", return_tensors="pt")
    return tok.input_ids, tok.attention_mask  # [B, T], rows of different lengths: padded


def image_embeds(model, batch, seed=1):
    features = torch.randn(batch, model.vision.num_tokens(), model.vision.out_dim, generator=torch.Generator().manual_seed(seed))
    return model.vision_norm(features)  # [B, N, D]


# ---- ITC ----------------------------------------------------------------------------------------------------------


def reference_itc(image_feats, text_feat, temp):
    """sim[i, t] = max over queries of <image i query, text t> / temp; smoothed CE both ways, averaged."""
    sim = torch.stack([(image_feats[i] @ text_feat.T).max(dim=0).values for i in range(len(image_feats))]) / temp
    targets = torch.arange(len(sim))
    return (smoothed_cross_entropy(sim, targets) + smoothed_cross_entropy(sim.T, targets)) / 2, sim


def test_itc_equals_the_hand_computation():
    """Catches: LABEL_SMOOTHING 0.1 -> 0.0; ``/ temp`` -> ``* temp``; ``amax`` over queries -> ``mean``; the
    text-to-image term computed from the image-to-text similarities (both terms i2t); the targets offset by one."""
    g = torch.Generator().manual_seed(0)
    image_feats = F.normalize(torch.randn(5, 3, 8, generator=g), dim=-1)  # [B, Q, E]
    text_feat = F.normalize(torch.randn(5, 8, generator=g), dim=-1)  # [B, E]
    temp = torch.tensor(0.07)
    loss, sim_i2t, sim_t2i = losses.itc_loss(image_feats, text_feat, temp)
    expected, sim = reference_itc(image_feats, text_feat, temp)
    torch.testing.assert_close(sim_i2t, sim)
    torch.testing.assert_close(sim_t2i, sim.T)
    torch.testing.assert_close(loss, expected)


def test_itc_similarities_stay_fp32_under_bf16_autocast():
    """Training autocasts to bf16 (CPUs with native bf16, GPUs); the similarities must not be rounded to bf16 (steps
    of 2^-8 near a cosine of 1, times 1 / temp), which cost the demo's retrieval R@1 (docs/training.md).
    Catches: the ``autocast(enabled=False)`` dropped or turned on; the inputs left in bf16."""
    g = torch.Generator().manual_seed(0)
    image_feats = F.normalize(torch.randn(6, 4, 32, generator=g), dim=-1)  # [B, Q, E]
    text_feat = F.normalize(image_feats[:, 0] + 0.05 * torch.randn(6, 32, generator=g), dim=-1)  # cosines near 1
    temp = torch.tensor(0.01)
    _, expected = reference_itc(image_feats, text_feat, temp)  # fp32, outside autocast: [B, B], images x texts
    with torch.autocast("cpu", torch.bfloat16):
        sim_i2t, sim_t2i = losses.itc_similarities(image_feats, text_feat, image_feats, text_feat, temp)
        from_bf16, _ = losses.itc_similarities(image_feats.bfloat16(), text_feat, image_feats.bfloat16(), text_feat,
                                               temp)
    assert sim_i2t.dtype == sim_t2i.dtype == torch.float32
    torch.testing.assert_close(sim_i2t, expected, rtol=0, atol=1e-4)
    torch.testing.assert_close(sim_t2i, expected.T, rtol=0, atol=1e-4)
    # bf16 features (a projection's output under autocast) are rounded once, not again in the product
    torch.testing.assert_close(from_bf16, expected, rtol=0, atol=0.1)


# ---- ITM ----------------------------------------------------------------------------------------------------------

NEG_IMAGE = [2, 3, 0, 1]  # the hard negative image of each text (never its own)
NEG_TEXT = [3, 0, 1, 2]  # the hard negative text of each image (differs from NEG_IMAGE row by row)


def peaked_similarities(batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ITC similarities [B, B] under which sampling is decided: the positive is the most similar by far (it must be
    masked out), the chosen negative next (probability 1 - 1e-13 once the positive is out), the rest far below."""
    sim_i2t, sim_t2i = torch.zeros(batch, batch), torch.zeros(batch, batch)
    rows = torch.arange(batch)
    sim_i2t[rows, rows] = sim_t2i[rows, rows] = 60.0
    sim_i2t[rows, torch.tensor(NEG_TEXT[:batch])] = 30.0
    sim_t2i[rows, torch.tensor(NEG_IMAGE[:batch])] = 30.0
    return sim_i2t, sim_t2i


def itm_logits(model, embeds, ids, mask):
    """One (image, text) pair alone, its text unpadded: the ITM head on every query output, averaged -> [2]."""
    ids = ids[: int(mask.sum())]
    queries = model.qformer(embeds[None], ids[None], mode="bidirectional").queries  # [1, Q, H]
    return model.itm_head(queries)[0].mean(dim=0)


def reference_itm(model, embeds, ids, mask, neg_image, neg_text):
    """Pairs (image b, text b) match; (image b, its hard negative text) and (its text's hard negative image, text b)
    do not. Plain cross entropy over the 3B pairs."""
    pairs = [(b, b, 1) for b in range(len(ids))]
    pairs += [(b, neg_text[b], 0) for b in range(len(ids))]
    pairs += [(neg_image[b], b, 0) for b in range(len(ids))]
    logits = torch.stack([itm_logits(model, embeds[i], ids[t], mask[t]) for i, t, _ in pairs])  # [3B, 2]
    return F.cross_entropy(logits, torch.tensor([label for _, _, label in pairs]))


def test_itm_with_hard_negatives_equals_the_hand_computation(stage1_model):
    """Catches: the positive allowed as a hard negative (the ``weights[own, start + own] = 0`` line removed, or the
    mask one column off); the negative image drawn from the image-to-text similarities (directions swapped);
    negatives drawn from softmax(-sim) or uniformly; logits of the first query instead of the mean over queries;
    the labels of positives and negatives swapped; the negative texts paired with the negative images."""
    model = stage1_model
    ids, mask = tokens(model, TEXTS)
    embeds = image_embeds(model, len(TEXTS))
    sim_i2t, sim_t2i = peaked_similarities(len(TEXTS))
    with torch.no_grad():
        for seed in range(3):  # the sampling is decided by the similarities: any seed draws the same negatives
            torch.manual_seed(seed)
            found = losses.itm_loss(model, embeds, ids, mask, sim_i2t, sim_t2i, [len(TEXTS)])
            torch.testing.assert_close(found, reference_itm(model, embeds, ids, mask, NEG_IMAGE, NEG_TEXT))


# ---- ITG ----------------------------------------------------------------------------------------------------------


def reference_itg(model, embeds, ids, mask):
    """Per text: [DEC] in place of [CLS], decoded causally after its image's queries; position t predicts token t + 1
    (smoothed CE); the mean over every predicted token of the batch."""
    dec = load_tokenizer("minilm").convert_tokens_to_ids("[DEC]")
    assert dec == model.dec_token_id
    logits, targets = [], []
    for b in range(len(ids)):
        n = int(mask[b].sum())
        text = torch.cat([torch.tensor([dec]), ids[b, 1:n]])[None]  # [1, n]
        cache = model.qformer(image_embeds=embeds[b : b + 1], use_cache=True).cache
        states = model.qformer(input_ids=text, mode="causal", past=cache).text  # [1, n, H]
        logits.append(model.qformer.lm_logits(states)[0, : n - 1])  # [n - 1, V]
        targets.append(ids[b, 1:n])
    return smoothed_cross_entropy(torch.cat(logits), torch.cat(targets))


def test_itg_equals_the_hand_computation(stage1_model):
    """Catches: ITG targets shifted (``text[:, :-1]`` -> ``text[:, 1:]``, or ``ids[:, 1:]`` -> ``ids[:, :-1]``);
    LABEL_SMOOTHING 0.1 -> 0.0; [CLS] kept instead of [DEC]; padding scored (the ``mask[:, 1:] == 0`` fill dropped);
    the queries' cache not used (``past=None``)."""
    model = stage1_model
    ids, mask = tokens(model, TEXTS)
    embeds = image_embeds(model, len(TEXTS))
    with torch.no_grad():
        cache = model.qformer(image_embeds=embeds, use_cache=True).cache
        torch.testing.assert_close(losses.itg_loss(model, cache, ids, mask), reference_itg(model, embeds, ids, mask))


# ---- the three together -------------------------------------------------------------------------------------------


def test_stage1_losses_are_the_three_hand_computed_losses(stage1_model):
    """Two pairs, so each hard negative is the other row; features through ln_vision, queries, both ITC heads.
    Catches, on the real wiring: the ITC and ITG mutations above; of the ITM ones the mask removed or one column
    off, the first query, the labels swapped, the negatives mispaired (with two pairs the draw itself is forced and
    left to the tests above); ITM fed the raw features instead of ln_vision's output; the total missing ITG."""
    model = stage1_model
    ids, mask = tokens(model, TEXTS[:2])
    features = torch.randn(2, model.vision.num_tokens(), model.vision.out_dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        found = losses.stage1_losses(model, features, ids, mask)
        embeds = model.vision_norm(features)
        queries = model.qformer(image_embeds=embeds).queries  # [2, Q, H]
        image_feats = F.normalize(model.vision_proj(queries), dim=-1)
        cls = model.qformer(input_ids=ids, text_mask=mask).text[:, 0]  # [2, H]: the text alone
        itc, _ = reference_itc(image_feats, F.normalize(model.text_proj(cls), dim=-1), model.temp)
        itm = reference_itm(model, embeds, ids, mask, [1, 0], [1, 0])
        itg = reference_itg(model, embeds, ids, mask)
    torch.testing.assert_close(found["itc"], itc)
    torch.testing.assert_close(found["itm"], itm)
    torch.testing.assert_close(found["itg"], itg)
    torch.testing.assert_close(found["loss"], itc + itm + itg)


@pytest.mark.parametrize("named", [("itc",), ("itc", "itm"), ("itc", "itg"), ("itm", "itg")])
def test_stage1_trains_only_the_losses_it_is_given(stage1_model, named):
    """``losses``: the sum holds exactly the named terms (each equal to the full step's), the others are not
    computed, and no gradient reaches a head whose loss is left out (ITC's projections without ITC, the ITM head
    without ITM, the LM head without ITG). Catches a left-out loss still summed, or still run."""
    model = stage1_model
    ids, mask = tokens(model, TEXTS)
    features = torch.randn(4, model.vision.num_tokens(), model.vision.out_dim, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(0)  # the hard negatives draw the same rows in both calls
    with torch.no_grad():
        every = losses.stage1_losses(model, features, ids, mask)
    torch.manual_seed(0)
    found = losses.stage1_losses(model, features, ids, mask, named)
    assert set(found) == {"loss", "itc", *named}  # ITC always: ITM's hard negatives come from its similarities
    for name in {"itc", *named}:
        torch.testing.assert_close(found[name], every[name])
    torch.testing.assert_close(found["loss"], sum(every[name] for name in named))
    found["loss"].backward()
    heads = {"itc": model.text_proj.weight, "itm": model.itm_head.weight, "itg": model.qformer.lm_head.dense.weight}
    for name, weight in heads.items():
        assert (weight.grad is not None and bool(weight.grad.abs().sum() > 0)) == (name in named), name


# ---- hard negatives -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start", [0, 3])  # 3: the rows of a rank whose share starts at global row 3
def test_hard_negatives_are_never_the_positive(start):
    """Many seeds, similarities where the positive dominates (it would be drawn almost always if not masked), and
    batches where captions repeat: a column copied from the positive's (the same caption under another image) and a
    row copied from another row (one image under several captions). Only a pair's own index is its positive here;
    copies elsewhere are ordinary negatives (see ``sample_hard_negatives``). Also a batch of one draws without
    failing. Catches: the mask line removed; the mask at ``own`` instead of ``start + own``; at ``start + own + 1``."""
    rows = torch.arange(3)
    for seed in range(300):
        g = torch.Generator().manual_seed(seed)
        sim = torch.randn(3, 8, generator=g) * 3  # [B, G]
        sim[rows, start + rows] += 15.0
        if seed % 3 == 1:
            sim[:, 7] = sim[:, start]  # text 7 repeats text `start`'s caption
        if seed % 3 == 2:
            sim[2] = sim[1]  # row 2's image also has row 1's caption
        torch.manual_seed(seed)
        negatives = losses.sample_hard_negatives(sim, start)
        assert negatives.shape == (3,)
        assert not (negatives == start + rows).any(), (seed, negatives)
    assert losses.sample_hard_negatives(torch.zeros(1, 1), 0).tolist() == [0]  # no negative exists: no crash


def test_hard_negatives_follow_the_softmax_of_the_similarities():
    """Frequencies over 3000 seeds against softmax(sim) with the positive removed and renormalised.
    Catches: softmax of -sim (easy negatives); uniform sampling; the mask line removed or one column off."""
    sim = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, 3.0, 1.5, 0.5]])  # [B=2, G=4]
    expected = sim.softmax(dim=1)
    expected[0, 0] = expected[1, 1] = 0
    expected /= expected.sum(dim=1, keepdim=True)
    counts = torch.zeros(2, 4)
    for seed in range(3000):
        torch.manual_seed(seed)
        counts[torch.arange(2), losses.sample_hard_negatives(sim, 0)] += 1
    torch.testing.assert_close(counts / 3000, expected, rtol=0, atol=0.03)


# ---- stage 2 ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["opt", "llama", "t5"])
def test_stage2_loss_equals_the_llms_own_loss_with_labels(tiny_parts, randomize, text):
    """The LLM, given the same input embeddings (visual prompt, then the text) and ``labels=`` (-100 over the prompt),
    computes the loss itself; stage 2's loss equals it. Captions and VQA pairs, padded, in one batch.
    Catches (decoder-only; an encoder-decoder's labels are not shifted): the logits shifted by one
    (``logits[:, :-1]`` -> ``logits[:, 1:]``), the labels not shifted (``labels[:, 1:]`` -> ``labels[:, :-1]``);
    (all three) the mean taken per row then over rows (rows hold different target counts)."""
    vision_dir, llm_dir = tiny_parts(text)
    parts = build(Blip2Config.from_dict({
        "vision": {"kind": "hf", "path": str(vision_dir)}, "qformer": TINY_QFORMER,
        "llm": {"kind": "hf", "path": str(llm_dir), "max_text_len": 16},
    }))
    model = parts.model
    randomize(model.qformer, 1), randomize(model.llm_proj, 2)
    model.eval()
    features = torch.randn(3, model.vision.num_tokens(), model.vision.out_dim, generator=torch.Generator().manual_seed(5))
    items = [{"image": features[0], "image_id": "a", "text": "w1 w2 w3 w4 w5"},
             {"image": features[1], "image_id": "b", "text": "w6"},
             {"image": features[2], "image_id": "c", "question": "w7 w8", "answers": ["w9 w10"]}]
    start = model.llm.model.config.decoder_start_token_id if model.llm.is_encoder_decoder else None
    batch = Stage2Collate(parts.llm_tokenizer, 16, decoder_start_token_id=start)(items)
    with torch.no_grad():
        found = losses.stage2_losses(model, batch["image"], batch)["loss"]
        prompt = model.soft_prompt(batch["image"])  # [B, V, H_llm]: the visual prompt
        words = model.llm.model.get_input_embeddings()(batch["input_ids"])  # [B, T, H_llm]
        embeds = torch.cat([prompt, words], dim=1)
        mask = torch.cat([torch.ones(prompt.shape[:2], dtype=torch.long), batch["attention_mask"]], dim=1)
        if model.llm.is_encoder_decoder:  # the decoder's targets; transformers builds its inputs from them
            expected = model.llm.model(inputs_embeds=embeds, attention_mask=mask, labels=batch["labels"]).loss
        else:  # labels aligned with the inputs; transformers shifts them
            labels = torch.cat([torch.full(prompt.shape[:2], -100), batch["labels"]], dim=1)
            expected = model.llm.model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    assert (batch["labels"] != -100).sum(dim=1).unique().numel() > 1  # rows with different target counts
    torch.testing.assert_close(found, expected)


def test_stage1_projects_each_images_features_once_per_step(stage1_model, monkeypatch):
    """ITC and ITM's three passes read one set of cross-attention keys/values per image (the positive rows reuse
    ITC's, the hard negatives are rows of them): each cross-attention layer projects the batch's features once. The
    losses equal those of ITM projecting its images anew, to float tolerance.
    Catches: ITM projecting its 3B image rows again; the negative rows read from the wrong image."""
    ids, mask = tokens(stage1_model, TEXTS)
    features = torch.randn(len(TEXTS), stage1_model.vision.num_tokens(), stage1_model.vision.out_dim,
                           generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    reused = losses.stage1_losses(stage1_model, features, ids, mask)
    projected = []
    for layer in stage1_model.qformer.layers:
        if layer.cross_attn is not None:
            original = layer.cross_attn.keys_values
            monkeypatch.setattr(layer.cross_attn, "keys_values",
                                lambda source, original=original: projected.append(len(source)) or original(source))
    torch.manual_seed(0)
    again = losses.stage1_losses(stage1_model, features, ids, mask)
    cross_layers = sum(layer.cross_attn is not None for layer in stage1_model.qformer.layers)
    assert projected == [len(TEXTS)] * cross_layers  # one projection of the B images per layer, none for ITM
    for name in reused:
        torch.testing.assert_close(again[name], reused[name])

    def projecting_anew(model, image_embeds, ids, mask, sim_i2t, sim_t2i, sizes, context=None):  # before the reuse
        return original_itm(model, image_embeds, ids, mask, sim_i2t, sim_t2i, sizes, None)

    original_itm = losses.itm_loss
    monkeypatch.setattr(losses, "itm_loss", projecting_anew)
    torch.manual_seed(0)
    anew = losses.stage1_losses(stage1_model, features, ids, mask)
    for name in reused:
        torch.testing.assert_close(anew[name], reused[name])
