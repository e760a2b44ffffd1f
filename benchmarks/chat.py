"""A 5-turn chat about one image, latency per turn: ``model.chat(image).ask(...)`` (image encoded once, the LLM's
key/value cache kept across turns) against transformers' ``Blip2ForConditionalGeneration.generate`` called on
the whole conversation every turn (the image re-encoded, the history re-read), as a stateless server does.

Same weights (``model.export_hf``), same conversation tokens (the LLM's chat template, the image's query
positions at the start of the first user message), greedy; every reply must be identical on both sides.
``python benchmarks/chat.py [--quick]``.
"""

from __future__ import annotations

import tempfile
import time

import common
import model_pair
import torch

from blip2.data.conversation import IMAGE_ID, conversation_format
from blip2.infer.decoding import GenerationOptions

TARGET = 3.0  # turn 5
QUESTIONS = [
    "What is in the picture?",
    "What colour is the largest shape?",
    "Where is it in the picture?",
    "How many shapes are there?",
    "Describe the picture in one sentence.",
]
MAX_NEW_TOKENS = 24


def our_conversation(model, image, max_new_tokens: int) -> dict:
    """Turn seconds (turn 1 includes opening the session, which encodes the image), replies, positions run."""
    seconds, replies, computed, generated = [], [], [], []
    start = time.perf_counter()
    session = model.chat(image)
    for question in QUESTIONS:
        replies.append(session.ask(question, max_new_tokens=max_new_tokens))
        seconds.append(time.perf_counter() - start)
        computed.append(session.last_stats.computed_tokens)
        generated.append(session.last_stats.generated_tokens)
        start = time.perf_counter()
    return dict(seconds=seconds, replies=replies, computed=computed, generated=generated)


def hf_conversation(model, hf_model, image, max_new_tokens: int) -> dict:
    """Every turn: preprocess and encode the image, render the whole conversation, ``generate`` over all of it."""
    tokenizer = model.llm_tokenizer
    conversation = conversation_format(tokenizer)
    options = GenerationOptions(max_new_tokens=max_new_tokens).hf_kwargs(tokenizer)
    image_token, num_queries = hf_model.config.image_token_id, hf_model.config.num_query_tokens
    messages, seconds, replies, lengths = [], [], [], []
    for question in QUESTIONS:
        start = time.perf_counter()
        messages.append({"role": "user", "content": question})
        ids = [image_token if t == IMAGE_ID else t for t in conversation.token_ids(messages, num_queries)]
        input_ids = torch.tensor([ids])  # [1, L]
        with torch.no_grad():
            out = hf_model.generate(pixel_values=model.pixel_values([image]), input_ids=input_ids,
                                    attention_mask=torch.ones_like(input_ids), **options)  # fmt: skip
        reply = tokenizer.decode(out[0, len(ids) :])
        messages.append({"role": "assistant", "content": reply})
        seconds.append(time.perf_counter() - start)
        replies.append(reply)
        lengths.append(len(ids))
    return dict(seconds=seconds, replies=replies, computed=lengths)


def image_encoding_seconds(model, image, repeats: int) -> float:
    """Median seconds to turn the image into the LLM's visual prompt (preprocess, vision tower, Q-Former,
    projection): what transformers pays every turn and ours once per session."""

    def encode() -> None:
        with torch.no_grad():
            model.model.soft_prompt(model.model.image_features(model.pixel_values([image])))

    return common.median(common.interleaved({"encode": encode}, repeats)["encode"])


def main() -> None:
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    repeats = common.setup(args, default_repeats=4)
    max_new_tokens = 6 if args.quick else MAX_NEW_TOKENS
    with tempfile.TemporaryDirectory() as workdir:
        model, hf_model = model_pair.pair(workdir, args.quick)
    image = model_pair.scene_images(1, hf_model.config.vision_config.image_size)[0]

    sides = {"ours": lambda: our_conversation(model, image, max_new_tokens),
             "transformers": lambda: hf_conversation(model, hf_model, image, max_new_tokens)}  # fmt: skip
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    sides["ours"]()  # warm-up
    recording = {name: lambda name=name: runs[name].append(sides[name]()) for name in sides}
    common.interleaved(recording, repeats, warmup=0)  # whole conversations, alternating
    for run in runs["ours"] + runs["transformers"]:
        if run["replies"] != runs["ours"][0]["replies"]:
            raise AssertionError(f"greedy replies differ:\nours {runs['ours'][0]['replies']}\nother {run['replies']}")

    def turn_seconds(name: str, turn: int) -> list[float]:
        return [run["seconds"][turn] for run in runs[name]]

    print(f"\n{len(QUESTIONS)}-turn chat, greedy, max_new_tokens={max_new_tokens}, fp32; median (min-max) of "
          f"{repeats} interleaved conversations\n")  # fmt: skip
    first = {name: runs[name][0] for name in runs}
    common.table(
        ["turn", "prompt positions run: ours / transformers", "tokens generated", "ours", "transformers",
         "ours / transformers", "reply"],
        [(turn + 1, f"{first['ours']['computed'][turn]} / {first['transformers']['computed'][turn]}",
          first["ours"]["generated"][turn], common.spread(turn_seconds("ours", turn)),
          common.spread(turn_seconds("transformers", turn)),
          f"{common.median(turn_seconds('transformers', turn)) / common.median(turn_seconds('ours', turn)):.2f}x",
          repr(first["ours"]["replies"][turn])) for turn in range(len(QUESTIONS))],
    )  # fmt: skip
    print("prompt positions run: ours computes only what its cache does not hold (turn 1 also encodes the image);\n"
          "transformers encodes the image and reads the whole conversation, image query positions included, every\n"
          f"turn. Encoding the image alone takes {image_encoding_seconds(model, image, repeats):.3f} s (median).\n")
    last = len(QUESTIONS) - 1
    ratio = common.median(turn_seconds("transformers", last)) / common.median(turn_seconds("ours", last))
    common.ratio_line(f"chat turn {last + 1} latency (identical greedy replies)", ratio, TARGET)


if __name__ == "__main__":
    main()
