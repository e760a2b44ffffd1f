"""A transformers Blip2 directory generates what transformers' own ``generate`` does: prompts tokenized as the saved
Blip2Processor tokenizes them (its tokenizer's own BOS/EOS, or none), images preprocessed by its image processor,
greedy and beam search, a batch of mixed prompt lengths; OPT-, Llama- and T5-based models whose tokenizers add their
special tokens and ones that add none (ChatML-style, like SmolLM2's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tiny import WORDS, randomize_, text_model, vision_config, word_tokenizer

from blip2.pipeline import load

NUM_QUERIES = 4
# family -> (special tokens, their roles, what the tokenizer adds itself when it adds anything)
FAMILIES = {
    "opt": (["<pad>", "</s>", "<unk>"], dict(bos_token="</s>", eos_token="</s>", pad_token="<pad>"), "</s> $A"),
    "llama": (["<pad>", "<s>", "</s>", "<unk>"], dict(bos_token="<s>", eos_token="</s>", pad_token="<pad>"), "<s> $A"),
    "t5": (["<pad>", "</s>", "<unk>"], dict(eos_token="</s>", pad_token="<pad>"), "$A </s>"),
}
CASES = [(family, adds) for family in FAMILIES for adds in (True, False)]
PROMPTS = ["a photo of", "what color is the cat on the mat", "dog"]


def blip2_directory(tmp_path, family: str, adds: bool, seed: int = 0):
    """A saved random Blip2ForConditionalGeneration with its Blip2Processor (image processor + tokenizer)."""
    specials, named, post = FAMILIES[family]
    tokenizer = word_tokenizer(specials, WORDS, post=post if adds else None, **named)
    tokenizer.add_tokens([transformers.AddedToken("<image>", normalized=False, special=True)], special_tokens=True)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    text = text_model(family, tokenizer).config
    config = transformers.Blip2Config(
        vision_config=vision_config().to_dict(), num_query_tokens=NUM_QUERIES, image_token_index=image_token,
        qformer_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64, cross_attention_frequency=1),
        text_config=text.to_dict(),
    )  # fmt: skip
    model = randomize_(transformers.Blip2ForConditionalGeneration(config), seed).eval()
    processor = transformers.Blip2Processor(
        image_processor=transformers.BlipImageProcessor(size={"height": 32, "width": 32}),
        tokenizer=tokenizer, num_query_tokens=NUM_QUERIES,
    )  # fmt: skip
    directory = tmp_path / f"blip2-{family}-{'adds' if adds else 'plain'}"
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def image_files(tmp_path) -> list:
    """Odd-sized PNG and JPEG files, with alpha and in greyscale too."""
    rng = np.random.default_rng(0)
    specs = [("odd.png", (37, 23), "RGB"), ("odd.jpg", (41, 29), "RGB"), ("alpha.png", (19, 33), "RGBA"),
             ("grey.jpg", (50, 17), "L")]
    paths = []
    for name, (width, height), mode in specs:
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8).squeeze(-1 if channels == 1 else ())
        Image.fromarray(pixels, mode).save(tmp_path / name)
        paths.append(tmp_path / name)
    return paths


def reference(directory):
    model = transformers.Blip2ForConditionalGeneration.from_pretrained(directory, local_files_only=True).eval()
    processor = transformers.Blip2Processor.from_pretrained(directory, local_files_only=True)
    if not model.config.text_config.is_encoder_decoder:  # batched generation: each prompt ends where new tokens go
        processor.tokenizer.padding_side = "left"
    return model, processor


def their_texts(model, processor, images, prompts, **gen) -> list[str]:
    if prompts is None:
        inputs = processor(images=images, return_tensors="pt")
    else:
        inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, **gen)
    if "input_ids" in inputs and not model.config.text_config.is_encoder_decoder:  # the prompt comes back too
        out = out[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in processor.tokenizer.batch_decode(out, skip_special_tokens=True)]


@pytest.mark.parametrize("family, adds", CASES)
def test_pixels_equal_the_saved_image_processors(tmp_path, family, adds):
    directory = blip2_directory(tmp_path, family, adds)
    ours = load(directory)
    _, processor = reference(directory)
    for path in image_files(tmp_path):
        theirs = processor(images=Image.open(path), return_tensors="pt").pixel_values  # its own RGB conversion
        torch.testing.assert_close(ours.pixel_values([path]), theirs, rtol=0, atol=0, msg=str(path))


@pytest.mark.parametrize("family, adds", CASES)
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_equals_transformers_generate(tmp_path, family, adds, num_beams):
    directory = blip2_directory(tmp_path, family, adds)
    ours = load(directory)
    model, processor = reference(directory)
    images = [Image.open(path) for path in image_files(tmp_path)[:3]]
    gen = dict(max_new_tokens=6, num_beams=num_beams)
    expected = their_texts(model, processor, images, PROMPTS, **gen)
    assert ours.generate(images, PROMPTS, batch_size=3, **gen) == expected
    assert [ours.generate(image, prompt, **gen)[0] for image, prompt in zip(images, PROMPTS)] == expected
    if family != "t5":  # without input ids, transformers starts a decoder-only LLM from its config's BOS
        assert ours.caption(images, **gen) == their_texts(model, processor, images, None, **gen)
