"""Captioning tokens/s at batch 1 and batch 16: ``model.caption`` against transformers'
``Blip2ForConditionalGeneration.generate`` on the same weights (``model.export_hf``) and the same pixels.

Greedy decoding; both sides must produce identical captions (checked on every batch). Tokens are counted per
caption up to and including its end-of-sequence token. ``python benchmarks/generation.py [--quick]``.
"""

from __future__ import annotations

import tempfile

import common
import model_pair
import torch

from blip2.infer.decoding import GenerationOptions

TARGETS = {1: 1.0, 16: 2.0}
PROMPT = "a photo of"  # the paper's captioning prompt; the caption continues it
MAX_NEW_TOKENS = 20


def hf_inputs(model, hf_model, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' layout of the same prompt: ``num_query_tokens`` image placeholders, BOS, the prompt."""
    ids, mask = model.llm_tokenizer.tokenize([PROMPT] * batch, 64, add_bos=True, pad_left=True)  # [B, T]
    placeholders = torch.full((batch, hf_model.config.num_query_tokens), hf_model.config.image_token_id)
    return torch.cat([placeholders, ids], 1), torch.cat([torch.ones_like(placeholders), mask], 1)


def caption_tokens(tokenizer, token_rows: list[list[int]]) -> int:
    """Generated tokens, each row counted up to and including its first EOS."""
    eos = tokenizer.eos_token_id
    return sum(row.index(eos) + 1 if eos in row else len(row) for row in token_rows)


def run_batch(model, hf_model, pixels: torch.Tensor, repeats: int, max_new_tokens: int) -> dict:
    batch = pixels.shape[0]
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    ids, mask = hf_inputs(model, hf_model, batch)
    results = {}

    def ours() -> None:
        results["ours"] = model.caption(pixels, PROMPT, batch_size=batch, max_new_tokens=max_new_tokens)

    def theirs() -> None:
        with torch.no_grad():
            out = hf_model.generate(pixel_values=pixels, input_ids=ids, attention_mask=mask,
                                    **options.hf_kwargs(model.llm_tokenizer))  # fmt: skip
        results["transformers"] = out[:, ids.shape[1] :].tolist()

    seconds = common.interleaved({"ours": ours, "transformers": theirs}, repeats)
    texts = [model.llm_tokenizer.decode(row) for row in results["transformers"]]
    if texts != results["ours"]:
        raise AssertionError(f"greedy captions differ at batch {batch}:\nours {results['ours']}\ntheirs {texts}")
    tokens = caption_tokens(model.llm_tokenizer, results["transformers"])
    return dict(batch=batch, seconds=seconds, tokens=tokens, example=texts[0])


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    repeats = common.setup(args, default_repeats=4)
    max_new_tokens = 8 if args.quick else MAX_NEW_TOKENS
    with tempfile.TemporaryDirectory() as workdir:
        model, hf_model = model_pair.pair(workdir, args.quick)
    size = hf_model.config.vision_config.image_size
    pixels = model.pixel_values(model_pair.scene_images(max(TARGETS), size))  # [16, 3, H, W]
    rows = [run_batch(model, hf_model, pixels[:batch], repeats, max_new_tokens) for batch in TARGETS]

    print(f"\ncaptioning, greedy, prompt {PROMPT!r}, max_new_tokens={max_new_tokens}, fp32; "
          f"median (min-max) of {repeats} interleaved runs\n")  # fmt: skip
    common.table(
        ["batch", "tokens", "ours", "transformers", "ours tokens/s", "transformers tokens/s", "first caption"],
        [(r["batch"], r["tokens"], common.spread(r["seconds"]["ours"]), common.spread(r["seconds"]["transformers"]),
          f"{r['tokens'] / common.median(r['seconds']['ours']):.1f}",
          f"{r['tokens'] / common.median(r['seconds']['transformers']):.1f}", repr(r["example"]))
         for r in rows],
    )  # fmt: skip
    for r in rows:
        ratio = common.median(r["seconds"]["transformers"]) / common.median(r["seconds"]["ours"])
        common.ratio_line(f"captioning tokens/s, batch {r['batch']} (identical greedy captions)", ratio,
                          TARGETS[r["batch"]])  # fmt: skip


if __name__ == "__main__":
    main()
