"""BLIP-2's training losses: stage 1 (ITC + ITM + ITG, summed) and stage 2 (language modelling on the text)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from blip2.data.text import IGNORE
from blip2.distributed import get_rank, get_world_size
from blip2.errors import InputError
from blip2.models.qformer import ImageContext

LABEL_SMOOTHING = 0.1


def batch_sizes(local: int, device: torch.device) -> list[int]:
    """Every rank's batch size (they differ when a rank's collate dropped unreadable images)."""
    if get_world_size() == 1:
        return [local]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(get_world_size())]
    dist.all_gather(sizes, torch.tensor([local], device=device))
    return [int(n) for n in sizes]


class _GatherWithGrad(torch.autograd.Function):
    """All-gather rows of possibly different counts; backward sums every rank's gradient for this rank's rows."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int]) -> Tensor:
        rank = get_rank()
        padded = x.new_zeros(max(sizes), *x.shape[1:])
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        ctx.rows = (sum(sizes[:rank]), x.shape[0])
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])  # [sum(sizes), ...]

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad)  # d(sum of every rank's loss) / d(all rows)
        start, count = ctx.rows
        return grad[start : start + count], None


def gather_with_grad(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    """All-gather along dim 0 keeping the autograd path to every rank's rows (LAVIS's ITC gather drops it)."""
    if get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x, sizes or batch_sizes(x.shape[0], x.device))


def row_offset(sizes: list[int]) -> int:
    """Where this rank's rows start in a gathered batch."""
    return sum(sizes[: get_rank()])


def itc_similarities(image_feats: Tensor, text_feat: Tensor, image_all: Tensor, text_all: Tensor, temp: Tensor):
    """Max-over-queries similarities: local images vs all texts [B, G], local texts vs all images [B, G].

    image_feats [B, Q, E], text_feat [B, E], image_all [G, Q, E], text_all [G, E]; all L2-normalised. Computed in
    fp32 under autocast: in bf16 each cosine (and its gradient) is rounded to steps of 2^-8 near 1, and the demo's
    retrieval fine-tune then ranks near-identical captions worse (t2i R@1 0.263 against 0.292; docs/training.md).
    """
    with torch.autocast(image_feats.device.type, enabled=False):
        image_feats, text_feat, image_all, text_all = (t.float() for t in (image_feats, text_feat, image_all, text_all))
        sim_i2t = torch.einsum("bqe,ge->bgq", image_feats, text_all).amax(dim=-1) / temp  # [B, G]
        sim_t2i = torch.einsum("be,gqe->bgq", text_feat, image_all).amax(dim=-1) / temp  # [B, G]
    return sim_i2t, sim_t2i


def itc_loss(image_feats: Tensor, text_feat: Tensor, temp: Tensor, sizes: list[int] | None = None):
    """Image-text contrastive loss over the global batch; returns (loss, sim_i2t, sim_t2i)."""
    batch = image_feats.shape[0]
    sizes = sizes or batch_sizes(batch, image_feats.device)
    image_all, text_all = gather_with_grad(image_feats, sizes), gather_with_grad(text_feat, sizes)
    sim_i2t, sim_t2i = itc_similarities(image_feats, text_feat, image_all, text_all, temp)
    start = row_offset(sizes)
    targets = torch.arange(start, start + batch, device=image_feats.device)
    loss = (
        F.cross_entropy(sim_i2t, targets, label_smoothing=LABEL_SMOOTHING)
        + F.cross_entropy(sim_t2i, targets, label_smoothing=LABEL_SMOOTHING)
    ) / 2
    return loss, sim_i2t, sim_t2i


def sample_hard_negatives(sim: Tensor, start: int) -> Tensor:
    """For each local row, one global index sampled from softmax(sim) with its own positive (at ``start`` + row)
    masked out. [B, G] -> [B]."""
    weights = sim.detach().float().softmax(dim=1)
    own = torch.arange(sim.shape[0], device=sim.device)
    weights[own, start + own] = 0
    weights = weights + 1e-12 * (weights.sum(dim=1, keepdim=True) == 0)  # a batch of one has no negative; stay finite
    return torch.multinomial(weights, 1).squeeze(1)


def itm_loss(model, image_embeds: Tensor, ids: Tensor, mask: Tensor, sim_i2t, sim_t2i, sizes: list[int],
             context: ImageContext | None = None) -> Tensor:
    """Image-text matching with hard negatives: batch = (pos, pos, neg) images x (pos, neg, pos) texts.

    ``context``: the cross-attention keys and values of ``image_embeds`` [B, N, D] already computed (by ITC): the
    rows reuse them instead of projecting the same features again (a hard negative from another rank is projected).
    """
    context = context if context is not None else model.qformer.image_context(image_embeds)
    start = row_offset(sizes)
    neg_rows = sample_hard_negatives(sim_t2i, start)  # one hard negative image per text (global rows)
    if get_world_size() == 1:
        neg_context = context.select(neg_rows)
    else:
        neg_context = model.qformer.image_context(gather_with_grad(image_embeds, sizes)[neg_rows])  # [B] rows
    ids_all, mask_all = _gather_padded_text(ids, mask, sizes)
    neg_text = sample_hard_negatives(sim_i2t, start)  # one hard negative text per image
    width = ids_all.shape[1]  # other ranks' texts may be longer
    ids, mask = F.pad(ids, (0, width - ids.shape[1])), F.pad(mask, (0, width - mask.shape[1]))
    images = ImageContext.cat([context, context, neg_context])  # [3B] rows
    texts = torch.cat([ids, ids_all[neg_text], ids])  # [3B, T']
    masks = torch.cat([mask, mask_all[neg_text], mask])
    out = model.qformer(images, texts, masks, mode="bidirectional")
    logits = model.itm_head(out.queries).mean(dim=1)  # [3B, 2], averaged over queries
    batch = ids.shape[0]
    labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(logits.device)
    return F.cross_entropy(logits, labels)


def _gather_padded_text(ids: Tensor, mask: Tensor, sizes: list[int]) -> tuple[Tensor, Tensor]:
    """Gather token ids/masks whose lengths differ across ranks: pad to the longest first."""
    if get_world_size() == 1:
        return ids, mask
    lengths = batch_sizes(ids.shape[1], ids.device)
    pad = max(lengths) - ids.shape[1]
    ids, mask = F.pad(ids, (0, pad)), F.pad(mask, (0, pad))
    return gather_with_grad(ids, sizes), gather_with_grad(mask, sizes)


def itg_loss(model, query_cache, ids: Tensor, mask: Tensor) -> Tensor:
    """Image-grounded generation: text after [DEC] decoded against the queries' cached keys/values."""
    dec_ids = ids.clone()
    dec_ids[:, 0] = model.dec_token_id  # [DEC] replaces [CLS]
    text = model.qformer(input_ids=dec_ids, text_mask=mask, mode="causal", past=query_cache).text  # [B, T, H]
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, IGNORE)  # position t predicts token t + 1
    scored = labels != IGNORE
    logits = model.qformer.lm_logits(text[:, :-1][scored])  # [M, V]: the LM head only where a label exists
    return F.cross_entropy(logits, labels[scored], label_smoothing=LABEL_SMOOTHING)


STAGE1_LOSSES = ("itc", "itm", "itg")  # BLIP-2's three, all trained by default


def stage1_losses(model, features: Tensor, ids: Tensor, mask: Tensor,
                  losses: tuple[str, ...] = STAGE1_LOSSES) -> dict[str, Tensor]:
    """The stage-1 ``losses`` on frozen image ``features`` [B, N, D] and Q-Former text ``ids``/``mask`` [B, T]:
    each one computed is returned, their sum is "loss". ITC is always computed (ITM draws its hard negatives from
    its similarities) and is only trained when named."""
    with torch.no_grad():
        model.temp.clamp_(0.001, 0.5)
    image_embeds = model.vision_norm(features)  # [B, N, D]
    context = model.qformer.image_context(image_embeds)  # cross-attention keys/values: once for ITC and ITM
    query_out = model.qformer(image_embeds=context, use_cache="itg" in losses)
    image_feats = model.image_embeds_itc(query_out.queries)  # [B, Q, E]
    text_feat = model.text_embeds_itc(ids, mask)  # [B, E]
    sizes = batch_sizes(ids.shape[0], ids.device)
    itc, sim_i2t, sim_t2i = itc_loss(image_feats, text_feat, model.temp, sizes)
    terms = {"itc": itc}
    if "itm" in losses:
        terms["itm"] = itm_loss(model, image_embeds, ids, mask, sim_i2t, sim_t2i, sizes, context)
    if "itg" in losses:
        terms["itg"] = itg_loss(model, query_out.cache, ids, mask)
    trained = [terms[name] for name in STAGE1_LOSSES if name in losses]
    return {"loss": sum(trained[1:], trained[0]), **terms}


class SpreadMeter:
    """``prompt_spread`` of prompts that arrive in pieces (batches): the same number as on their concatenation.

    Merges each piece's mean and sum of squared deviations (Chan et al.), so a constant prompt gives exactly 0.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None  # [Q, H] float64
        self.squares: Tensor | None = None  # [Q, H] float64: sum of squared deviations from the mean
        self.norm_sum = 0.0  # sum over images and query positions of the prompt's norm

    def add(self, prompt: Tensor) -> None:
        """``prompt`` [B, Q, H]."""
        prompt = prompt.detach().double()
        count, mean = prompt.shape[0], prompt.mean(dim=0)
        squares = ((prompt - mean) ** 2).sum(dim=0)
        self.norm_sum += float(prompt.norm(dim=-1).sum())
        if self.mean is None:
            self.count, self.mean, self.squares = count, mean, squares
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.squares = self.squares + squares + delta**2 * (self.count * count / total)
        self.count = total

    def value(self) -> float:
        if self.mean is None:
            raise InputError("no prompt was added")
        std = (self.squares / self.count).sqrt()  # [Q, H]
        mean_norm = self.norm_sum / (self.count * self.mean.shape[0])
        return float(std.norm(dim=-1).mean()) / max(mean_norm, 1e-12)


def prompt_spread(prompt: Tensor) -> Tensor:
    """How much the visual prompt [B, Q, H] varies across the batch's images, relative to its size: the std over
    the batch over the mean norm, averaged over query positions. Near 0, the prompt no longer depends on the
    image (a collapse the LM loss rewards early in stage 2). A diagnostic: nothing minimises it."""
    meter = SpreadMeter()
    meter.add(prompt)
    return torch.tensor(meter.value())


def text_losses(model, prompt: Tensor, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The LM loss of each text after the visual ``prompt`` [B, Q, H_llm], on its target tokens only
    -> (summed loss [B] float32, target-token count [B]). ``batch`` as for ``stage2_losses``."""
    labels, positions = batch["labels"], None
    if not model.llm.is_encoder_decoder:  # position t predicts token t + 1: the LM head only where one is scored
        labels = labels[:, 1:]
        positions = (labels != IGNORE).any(dim=0).nonzero().squeeze(1)  # [K]
        labels = labels[:, positions]  # [B, K]
    logits = model.text_logits(
        prompt,
        batch["input_ids"],
        batch["attention_mask"],
        batch.get("decoder_input_ids"),
        batch.get("decoder_attention_mask"),
        positions,
    )  # [B, K, V] (encoder-decoder: [B, S, V])
    losses = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=IGNORE, reduction="none")  # [B, T]
    return losses.sum(dim=1), (labels != IGNORE).sum(dim=1)


def stage2_losses(model, features: Tensor, batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """Language modelling on the text only (queries, prompt and padding are ignored), ``features`` [B, N, D]
    -> {"loss", "prompt_spread"}; the loss is the mean over the batch's target tokens.

    ``batch``: decoder-only: ``input_ids``, ``attention_mask``, ``labels`` [B, T];
    encoder-decoder: also ``decoder_input_ids``, ``decoder_attention_mask``, with ``labels`` [B, S] for the decoder;
    with ``llm.prompt_to_qformer`` also ``prompt_ids``/``prompt_mask``, each row's prompt as the Q-Former reads it
    (with ``llm.visual_prompt_per_turn`` one per visual prompt, ``prompt_image`` [S] naming its row).
    """
    if "prompt_image" in batch:
        features = features[batch["prompt_image"]]  # [S, N, D]: each visual prompt's image
    prompt = model.soft_prompt(features, batch.get("prompt_ids"), batch.get("prompt_mask"))  # [B or S, V, H_llm]
    summed, tokens = text_losses(model, prompt, batch)
    return {"loss": summed.sum() / tokens.sum(), "prompt_spread": prompt_spread(model.prompt_queries(prompt))}
