"""Measure inference on a model: chat turns with and without the cache, caption throughput, and our token loop
against transformers' ``generate``. ``python benchmarks/inference.py [--model default] [--threads 1]`` prints
markdown tables (docs/inference.md quotes them)."""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from PIL import Image, ImageDraw

from blip2 import load
from blip2.infer.decoding import GenerationOptions, stream_tokens
from blip2.infer.generation import prompt_inputs

QUESTIONS = ["What is in the picture?", "What colour is it?", "Describe it in one word.", "Is it big?", "Thank you!"]


def sample_images(count: int) -> list[Image.Image]:
    """Simple synthetic pictures: a coloured shape on a plain background, each different."""
    images = []
    for index in range(count):
        image = Image.new("RGB", (224, 224), (255 - 20 * index, 255, 255))
        ImageDraw.Draw(image).ellipse((30 + 5 * index, 40, 190, 180 - 5 * index), fill=(40 * index % 256, 80, 200))
        images.append(image)
    return images


def chat_turns(model, image: Image.Image, cache: bool, max_new_tokens: int) -> list[dict]:
    """Per turn: seconds to the first streamed token and to the whole reply, positions computed, tokens generated."""
    session = model.chat(image, cache=cache)
    rows = []
    for question in QUESTIONS:
        start = time.perf_counter()
        pieces = session.stream(question, max_new_tokens=max_new_tokens)
        next(pieces, None)
        first = time.perf_counter() - start
        for _ in pieces:
            pass
        stats = session.last_stats
        rows.append(dict(first=first, total=time.perf_counter() - start, computed=stats.computed_tokens,
                         generated=stats.generated_tokens))  # fmt: skip
    return rows


def _medians(runs: list[list[dict]]) -> list[dict]:
    """Per turn, the median of each timing over runs (the counts are the same in every run)."""
    return [
        {**turns[0], **{key: statistics.median(turn[key] for turn in turns) for key in ("first", "total")}}
        for turns in zip(*runs)
    ]


def caption_throughput(model, images: list[Image.Image], batch_size: int, max_new_tokens: int) -> tuple[float, float]:
    """(images per second, generated tokens per second) for captioning ``images`` in batches."""
    start = time.perf_counter()
    captions = model.caption(images, batch_size=batch_size, max_new_tokens=max_new_tokens)
    seconds = time.perf_counter() - start
    tokens = sum(len(ids) + 1 for ids in model.llm_tokenizer.batch_ids(captions))  # + EOS
    return len(images) / seconds, tokens / seconds


def loop_against_generate(model, image: Image.Image, max_new_tokens: int, repeats: int) -> tuple[float, float, int]:
    """Median seconds for one greedy sequence through our cached token loop and through transformers' generate
    (the same tokens: tests check that the two decode alike), interleaved ``repeats`` times."""
    llm, tokenizer = model.model.llm, model.llm_tokenizer
    with torch.no_grad():
        features = model.model.image_features(model.pixel_values([image]))
        embeds, mask = prompt_inputs(model, features, ["A long story about"])
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    list(stream_tokens(llm, embeds, mask, GenerationOptions(max_new_tokens=2), tokenizer))  # warm-up
    loop, hf = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = list(stream_tokens(llm, embeds, mask, options, tokenizer))
        loop.append(time.perf_counter() - start)
        start = time.perf_counter()
        with torch.no_grad():
            llm.model.generate(inputs_embeds=embeds, attention_mask=mask, **options.hf_kwargs(model.llm_tokenizer))
        hf.append(time.perf_counter() - start)
    return statistics.median(loop), statistics.median(hf), len(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3, help="chat runs per mode (medians are reported)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load(args.model)
    images = sample_images(8)
    print(f"model {args.model}, {args.threads} thread(s), load average {os.getloadavg()[0]:.1f}\n")

    columns = ["turn", "positions run (cached / recomputed)", "first token, cached", "first token, recomputed",
               "whole reply, cached", "whole reply, recomputed", "tokens"]  # fmt: skip
    print("| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns))
    model.chat(images[0]).ask(QUESTIONS[0], max_new_tokens=4)  # warm-up
    runs = {True: [], False: []}
    for _ in range(args.repeats):  # interleaved, medians reported: the machine may be shared
        for cache in (True, False):
            runs[cache].append(chat_turns(model, images[0], cache, 24))
    cached, recomputed = (_medians(runs[cache]) for cache in (True, False))
    for turn, (c, r) in enumerate(zip(cached, recomputed), start=1):
        print(f"| {turn} | {c['computed']} / {r['computed']} | {c['first']:.2f} s | {r['first']:.2f} s | "
              f"{c['total']:.2f} s | {r['total']:.2f} s | {c['generated']} |")  # fmt: skip

    print("\n| captioning 8 images | images/s | tokens/s |\n| --- | --- | --- |")
    for batch_size in (1, 8):
        per_image, per_token = caption_throughput(model, images, batch_size, 30)
        print(f"| batch_size={batch_size} | {per_image:.2f} | {per_token:.1f} |")

    loop, hf, tokens = loop_against_generate(model, images[1], 48, args.repeats)
    print(f"\none greedy sequence of {tokens} tokens (medians of {args.repeats}): our cached loop "
          f"{tokens / loop:.1f} tokens/s, transformers generate {tokens / hf:.1f} tokens/s")


if __name__ == "__main__":
    main()
