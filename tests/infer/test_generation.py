"""Captions, answers, instructed generation and streaming on tiny random models (Llama with a chat template, OPT, T5)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from blip2.data.images import ImageError
from blip2.data.text import LLMTokenizer
from blip2.infer.decoding import GenerationOptions, TextPieces, cache_name, text_pieces

FAMILIES = ("llama", "opt", "t5")


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_batches_and_accepts_paths_pil_and_one_image(tiny_model, image_files, family):
    model = tiny_model(family)
    prompts = ["a photo of", "what color is the cat", "w1 w2 w3 w4 w5"]  # different lengths: left padding
    together = model.generate(image_files, prompts, batch_size=3, max_new_tokens=6)
    one_by_one = model.generate(image_files, prompts, batch_size=1, max_new_tokens=6)
    assert together == one_by_one
    assert len(together) == 3 and len(set(together)) > 1, together
    from PIL import Image

    assert model.generate(Image.open(image_files[1]), prompts[1], max_new_tokens=6) == [together[1]]
    assert model.generate(str(image_files[2]), prompts[2], max_new_tokens=6) == [together[2]]
    assert model.generate([], None) == []


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_joins_to_the_greedy_generation(tiny_model, image_files, family):
    """Our token loop (the one chat uses) against transformers' generate, on each LLM family."""
    model = tiny_model(family, seed=1)
    for path, prompt in zip(image_files, ["a photo of", None, "what is on the mat"]):
        pieces = list(model.stream(path, prompt, max_new_tokens=10))
        assert "".join(pieces) == model.generate([path], prompt, max_new_tokens=10)[0]


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_answer_uses_the_papers_prompt_of_the_llm_family(tiny_model, image_files, family):
    model = tiny_model(family)
    template = {"llama": "Question: {} Answer:", "t5": "Question: {} Short answer:"}[family]
    questions = ["what color is the cat", "what is on the mat", "is the dog red"]
    answers = model.answer(image_files, questions, max_new_tokens=5)
    assert answers == model.generate(image_files, [template.format(q) for q in questions], max_new_tokens=5)
    custom = model.answer(image_files, questions, prompt_template="w1 {} w2", max_new_tokens=5)
    assert custom == model.generate(image_files, [f"w1 {q} w2" for q in questions], max_new_tokens=5)
    # one image, several questions
    assert model.answer(image_files[0], questions, max_new_tokens=5)[0] == answers[0]
    with pytest.raises(ValueError, match="exactly one"):
        model.answer(image_files, questions, prompt_template="no slot")


def test_caption_is_generate_with_an_optional_prefix(tiny_model, image_files):
    model = tiny_model("opt")
    assert model.caption(image_files, max_new_tokens=4) == model.generate(image_files, None, max_new_tokens=4)
    prefixed = model.caption(image_files, "a photo of", max_new_tokens=4)
    assert prefixed == model.generate(image_files, "a photo of", max_new_tokens=4)


def test_beam_search_and_sampling(tiny_model, image_files):
    model = tiny_model("llama", seed=2)
    greedy = model.generate(image_files, "a photo of", max_new_tokens=6)
    assert model.generate(image_files, "a photo of", max_new_tokens=6, num_beams=1) == greedy
    beams = model.generate(image_files, "a photo of", max_new_tokens=6, num_beams=4)
    assert len(beams) == 3 and all(isinstance(text, str) for text in beams)

    state = torch.random.get_rng_state()
    first = model.generate(image_files, "a photo of", max_new_tokens=8, do_sample=True, temperature=2.0, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state), "a seeded run must leave the global RNG alone"
    again = model.generate(image_files, "a photo of", max_new_tokens=8, do_sample=True, temperature=2.0, seed=7)
    other = model.generate(image_files, "a photo of", max_new_tokens=8, do_sample=True, temperature=2.0, seed=8)
    assert first == again and first != other
    sampling = dict(max_new_tokens=8, do_sample=True, temperature=2.0)
    streamed = ["".join(model.stream(image_files[0], "a photo of", **sampling, seed=s)) for s in (1, 1, 2)]
    assert streamed[0] == streamed[1] != streamed[2]


def test_bad_inputs_raise_clear_errors(tiny_model, image_files, tmp_path):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        model.generate(image_files[:2], ["a photo of", "  "])
    with pytest.raises(ValueError, match="question 0 is empty"):
        model.answer(image_files[0], "")
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        model.generate(image_files, ["a", "b"])
    with pytest.raises(TypeError, match="unknown generation option.*max_tokens"):
        model.caption(image_files, max_tokens=3)
    with pytest.raises(ValueError, match="not both"):
        model.caption(image_files, num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="num_beams=1"):
        model.stream(image_files[0], num_beams=3)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty.jpg: empty file"):
        model.caption([image_files[0], empty])


def test_an_over_long_prompt_is_refused_with_the_overflow(tiny_model, image_files):
    model = tiny_model("llama")  # context: 256 positions
    long_prompt = " ".join(["cat"] * 230)  # 230 + 4 visual + BOS + 30 new tokens = 265
    with pytest.raises(ValueError, match=r"prompt 1 is 230 tokens.*context of 256 tokens by 9"):
        model.generate(image_files[:2], ["a photo of", long_prompt])
    assert len(model.generate(image_files[:1], long_prompt, max_new_tokens=21)[0].split()) <= 21  # fits exactly


def test_an_error_while_streaming_surfaces_and_nothing_hangs(tiny_model, image_files, monkeypatch):
    model = tiny_model("llama")
    calls = []
    original = model.model.llm.model.forward

    def failing_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device lost")
        return original(*args, **kwargs)

    monkeypatch.setattr(model.model.llm.model, "forward", failing_forward)
    pieces = model.stream(image_files[0], "a photo of", max_new_tokens=10)
    with pytest.raises(RuntimeError, match="device lost"):
        list(pieces)


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A small byte-level BPE (GPT-2 style, like SmolLM2's) trained in-process: multi-byte characters span tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet, special_tokens=["<eos>"])
    backend.train_from_iterator(["the cat sat on the mat", "a dog and a cat", "猫が座った"] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


def test_text_pieces_wait_for_whole_characters_and_join_to_the_decoded_text():
    tokenizer = byte_level_tokenizer()
    text = " the café cat 🐱 sat\non the mat "
    ids = tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]
    assert len(ids) > len(text.split())  # multi-byte characters are split over several tokens
    pieces = list(text_pieces(iter(ids), LLMTokenizer(tokenizer, is_encoder_decoder=False)))
    assert "".join(pieces) == text.strip()
    assert not any("\ufffd" in piece for piece in pieces)
    assert len(pieces) >= 5  # released word by word, not all at the end
    partial = TextPieces(LLMTokenizer(tokenizer, is_encoder_decoder=False))
    assert [partial.add(i) for i in tokenizer("caf")["input_ids"]][-1] == ""  # the last word is held back
    japanese = list(text_pieces(iter(tokenizer("猫が座った。犬")["input_ids"]), tokenizer))
    assert "".join(japanese) == "猫が座った。犬" and len(japanese) >= 3  # no spaces, still released as it comes


def test_generation_options_validate_themselves():
    assert GenerationOptions.from_kwargs({"max_new_tokens": 5}).max_new_tokens == 5
    for bad in ({"max_new_tokens": 0}, {"temperature": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"num_beams": 0}):
        with pytest.raises(ValueError):
            GenerationOptions(**bad)


def test_the_cache_keyword_follows_the_installed_transformers_and_ignores_instance_wrappers():
    class OldStyle(torch.nn.Module):  # transformers before the rename
        def forward(self, inputs_embeds=None, past_key_values=None, use_cache=None): ...

    class NewStyle(torch.nn.Module):
        def forward(self, inputs_embeds=None, cache=None, use_cache=None): ...

    old, new = OldStyle(), NewStyle()
    new.forward = lambda *args, **kwargs: None  # a wrapped instance (as tests and hooks do) keeps its class's name
    assert cache_name(old) == "past_key_values" and cache_name(new) == "cache"


def test_bos_before_image_leads_the_visual_prompt_in_training_and_generation(tiny_model, image_files):
    """llm.bos_before_image: [BOS ; queries ; BOS ; text] everywhere the LLM reads the visual prompt."""
    paper, bos_first = tiny_model("opt"), tiny_model("opt", bos_before_image=True)  # same seed: the same weights
    llm = bos_first.model.llm
    with torch.no_grad():
        features = bos_first.model.image_features(bos_first.pixel_values(image_files))  # [3, N, D]
        queries = paper.model.soft_prompt(features)  # [3, Q, H]
        prompt = bos_first.model.soft_prompt(features)  # [3, 1 + Q, H]
        bos = llm.embed(torch.tensor([bos_first.llm_tokenizer.bos_token_id]))[0]
        assert bos_first.model.num_visual == paper.model.num_visual + 1 == prompt.shape[1]
        assert torch.equal(prompt[:, 1:], queries) and all(torch.equal(row, bos) for row in prompt[:, 0])

        texts = ["a photo of", "w1 w2", "what is on the mat"]
        ids, mask = bos_first.llm_tokenizer.tokenize(texts, 16, add_bos=True)  # [3, T]
        logits = bos_first.model.text_logits(prompt, ids, mask)  # [3, T, V]
        embeds = torch.cat([bos.expand(3, 1, -1), queries, llm.embed(ids)], dim=1)
        full = torch.cat([torch.ones(3, 1 + queries.shape[1], dtype=mask.dtype), mask], dim=1)
        direct = llm.model(inputs_embeds=embeds, attention_mask=full).logits[:, -ids.shape[1]:]
        assert torch.allclose(logits, direct, atol=1e-5)

    captions = bos_first.caption(image_files, max_new_tokens=6)
    assert captions != paper.caption(image_files, max_new_tokens=6)  # the layout changes what the LLM reads
    assert "".join(bos_first.stream(image_files[0], None, max_new_tokens=6)) == captions[0]


def test_bos_before_image_needs_a_decoder_only_llm_and_is_not_exported(tiny_model, tmp_path):
    from blip2.config import ConfigError
    from blip2.weights.keymap import KeyMapError

    with pytest.raises(ConfigError, match="bos_before_image needs a decoder-only LLM with a BOS token; this LLM is "
                                          "encoder-decoder"):
        tiny_model("t5", bos_before_image=True)
    with pytest.raises(KeyMapError, match="transformers' Blip2 puts the visual prompt first"):
        tiny_model("opt", bos_before_image=True).export_hf(tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("family", ["llama", "opt", "t5"])
def test_generation_options_mean_what_transformers_generate_does_on_both_paths(tiny_model, image_files, family):
    """min_new_tokens, no_repeat_ngram_size, stop_strings and eos_token_id: transformers' generate (``generate``) and
    the token loop (``stream``) agree, and each option changes what it should."""
    model = tiny_model(family, seed=3)
    image, prompt = image_files[1], "a photo of"
    plain = model.generate(image, prompt, max_new_tokens=12)[0]
    words = plain.split()
    eos = model.llm_tokenizer.eos_token_id
    choices = [dict(min_new_tokens=12), dict(no_repeat_ngram_size=1), dict(stop_strings=[words[1]]),
               dict(eos_token_id=[model.llm_tokenizer.hf.convert_tokens_to_ids(words[1])]), dict(min_length=12),
               dict(max_length=3)]
    results = {}
    for choice in choices:
        gen = choice if "max_length" in choice else {"max_new_tokens": 12, **choice}
        generated = model.generate(image, prompt, **gen)[0]
        assert "".join(model.stream(image, prompt, **gen)) == generated, choice
        results[str(choice)] = generated
    no_eos = model.generate(image, prompt, max_new_tokens=12, min_new_tokens=12)
    assert len(model.llm_tokenizer.batch_ids(no_eos)[0]) >= 11 or eos not in model.llm_tokenizer.batch_ids(no_eos)[0]
    repeats = results[str(dict(no_repeat_ngram_size=1))].split()
    assert len(repeats) == len(set(repeats))  # no word twice
    stop = words[1]  # stops at (and keeps) the first text that ends with the stop string / the first stop token
    first_text = next(k for k in range(1, len(words) + 1) if " ".join(words[:k]).endswith(stop))
    assert results[str(dict(stop_strings=[stop]))].split() == words[:first_text]
    first_token = words.index(stop) + 1
    assert results[str(dict(eos_token_id=[model.llm_tokenizer.hf.convert_tokens_to_ids(stop)]))].split() == words[:first_token]
    assert results[str(dict(min_length=12))] == model.generate(image, prompt, max_new_tokens=12, min_new_tokens=12)[0]
    assert results[str(dict(max_length=3))].split() == words[:3]


def test_lavis_names_map_and_unknown_names_are_listed():
    lavis = GenerationOptions.from_kwargs(dict(use_nucleus_sampling=True, min_length=2, max_length=9))
    assert lavis == GenerationOptions(do_sample=True, top_p=0.9, min_new_tokens=2, max_new_tokens=9)
    assert GenerationOptions.from_kwargs(dict(use_nucleus_sampling=True, top_p=0.5)).top_p == 0.5
    with pytest.raises(TypeError, match=r"unknown generation option\(s\) \['beam_size'\]; known: .*min_new_tokens.*"
                                        r"LAVIS's \['max_length', 'min_length', 'use_nucleus_sampling'\]"):
        GenerationOptions.from_kwargs(dict(beam_size=3))
    with pytest.raises(TypeError, match="give max_new_tokens or LAVIS's max_length, not both"):
        GenerationOptions.from_kwargs(dict(max_length=3, max_new_tokens=4))
    with pytest.raises(ValueError, match=r"min_new_tokens must be in \[0, max_new_tokens\]"):
        GenerationOptions(min_new_tokens=5, max_new_tokens=4)
    assert GenerationOptions(stop_strings="cat", eos_token_id=7).stop_strings == ("cat",)
