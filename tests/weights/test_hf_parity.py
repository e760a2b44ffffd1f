"""Parity with transformers' Blip2 on tiny random models, converted with the production key maps: LLM logits,
greedy generations, ITM/ITC scores, and export_hf round trips (transformers reloads with no key left over)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file

from blip2.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from blip2.factory import assemble, build, load_hf
from blip2.models.blip2 import Blip2Model
from blip2.models.losses import itc_similarities
from blip2.pipeline import Blip2Pipeline, load
from blip2.weights.bert import load_tokenizer
from blip2.weights.encoders import image_encoder_from_hf
from blip2.weights.hf import hf_key_map
from blip2.weights.keymap import KeyMapError

TINY_QFORMER = dict(
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    vocab_size=99,
    max_position_embeddings=64,
    num_query_tokens=6,
    embed_dim=16,
    init_from=None,
)


def text_batch(decoder_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of word ids (BOS first for a decoder-only LLM, EOS last for T5); the second row is right-padded."""
    if decoder_only:
        ids = torch.tensor([[2, 5, 9, 13, 7], [2, 21, 6, 0, 0]])
    else:
        ids = torch.tensor([[5, 9, 13, 7, 1], [21, 6, 1, 0, 0]])
    return ids, (ids != 0).long()


def with_image_tokens(hf_model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' layout: ``num_query_tokens`` image placeholders before the text (as Blip2Processor builds it)."""
    num_queries = hf_model.config.num_query_tokens
    placeholders = torch.full((ids.shape[0], num_queries), hf_model.config.image_token_id)
    return torch.cat([placeholders, ids], 1), torch.cat([torch.ones_like(placeholders), mask], 1)


def hf_logits(hf_model, pixel_values, ids, mask, decoder_ids=None) -> torch.Tensor:
    full_ids, full_mask = with_image_tokens(hf_model, ids, mask)
    with torch.no_grad():
        logits = hf_model(
            pixel_values=pixel_values, input_ids=full_ids, attention_mask=full_mask, decoder_input_ids=decoder_ids
        ).logits
    return logits if decoder_ids is not None else logits[:, hf_model.config.num_query_tokens :]


def our_logits(model, pixel_values, ids, mask, decoder_ids=None) -> torch.Tensor:
    with torch.no_grad():
        return model.model(pixel_values, ids, mask, decoder_input_ids=decoder_ids)


DECODER_IDS = torch.tensor([[0, 8, 12, 30], [0, 17, 4, 4]])


@pytest.mark.parametrize(
    "text, num_layers, freq, num_queries",
    [("opt", 2, 2, 6), ("llama", 3, 1, 6), ("t5", 4, 2, 6), ("opt", 2, 1, 32)],
)
def test_llm_logits_match_transformers(tiny_blip2, pixels, text, num_layers, freq, num_queries):
    directory, hf_model = tiny_blip2(
        text, num_layers=num_layers, cross_attention_freq=freq, num_query_tokens=num_queries
    )
    model = load(directory)
    assert [layer.cross_attn is not None for layer in model.model.qformer.layers] == [
        i % freq == 0 for i in range(num_layers)
    ]
    decoder_ids = DECODER_IDS if text == "t5" else None
    ids, mask = text_batch(decoder_only=text != "t5")
    ours = our_logits(model, pixels(), ids, mask, decoder_ids)
    torch.testing.assert_close(ours, hf_logits(hf_model, pixels(), ids, mask, decoder_ids))
    other_image = our_logits(model, pixels(seed=1), ids, mask, decoder_ids)
    assert not torch.allclose(ours, other_image, atol=1e-3)  # the visual prompt does reach the LLM


def instructblip_from(model: Blip2Model, hf_model) -> transformers.InstructBlipForConditionalGeneration:
    """transformers' InstructBLIP of ``hf_model``'s shape holding ``model``'s weights, through the production key map
    (InstructBLIP keeps the Q-Former's text embeddings and their LayerNorm under ``qformer.embeddings``)."""
    config = hf_model.config
    qformer = {**config.qformer_config.to_dict(), "vocab_size": model.cfg.qformer.vocab_size}
    instruct = transformers.InstructBlipForConditionalGeneration(transformers.InstructBlipConfig(
        vision_config=config.vision_config.to_dict(), qformer_config=qformer, text_config=config.text_config.to_dict(),
        num_query_tokens=config.num_query_tokens, image_token_index=config.image_token_id,
    )).eval()  # fmt: skip
    ours, frozen = model.model.state_dict(), hf_model.state_dict()
    table = hf_key_map(model.cfg.qformer, retrieval=False, text_ffn=True) | {
        "embeddings.word_embeddings.weight": "qformer.word_embeddings.weight",
        "embeddings.position_embeddings.weight": "qformer.position_embeddings.weight",
    }
    renamed = {"qformer.embeddings.layernorm": "qformer.layernorm", "qformer.embeddings.word": "embeddings.word",
               "qformer.embeddings.position_embeddings": "embeddings.position_embeddings"}
    state = {}
    for key in instruct.state_dict():
        name = next((key.replace(a, b, 1) for a, b in renamed.items() if key.startswith(a)), key)
        if name in table:
            state[key] = ours[table[name]]
        elif name.startswith(("vision_model.", "language_model.")):
            state[key] = frozen[name]
    missing, unexpected = instruct.load_state_dict(state, strict=False)
    assert not unexpected and all("position_ids" in key for key in missing), missing
    return instruct


@pytest.mark.parametrize("text", ["opt", "t5"])
def test_a_qformer_reading_the_prompt_matches_transformers_instructblip(tiny_blip2, randomize, pixels, text):
    """``llm.prompt_to_qformer`` (BLIP-2's VQA fine-tuning) computes what InstructBLIP does with the same weights."""
    directory, hf_model = tiny_blip2(text)
    model = load(directory)
    model.cfg.llm.prompt_to_qformer = True
    for layer in model.model.qformer.layers:  # the loader copied the query FFN: make the text side its own
        randomize(layer.text_ffn, 5)
    randomize(model.model.qformer.word_embeddings, 6)
    randomize(model.model.qformer.position_embeddings, 7)
    instruct = instructblip_from(model, hf_model)
    prompts = ["what color is the cat?", "is it on the mat?"]
    qformer_ids, qformer_mask = model.tokenize_text(prompts)  # the second row is padded
    decoder_ids = DECODER_IDS if text == "t5" else None
    ids, mask = text_batch(decoder_only=text != "t5")
    full_ids, full_mask = with_image_tokens(hf_model, ids, mask)
    with torch.no_grad():
        ours = model.model(pixels(), ids, mask, decoder_input_ids=decoder_ids, prompt_ids=qformer_ids,
                           prompt_mask=qformer_mask)
        reference = instruct(pixel_values=pixels(), qformer_input_ids=qformer_ids, qformer_attention_mask=qformer_mask,
                             input_ids=full_ids, attention_mask=full_mask, decoder_input_ids=decoder_ids).logits
        swapped = model.model(pixels(), ids, mask, decoder_input_ids=decoder_ids, prompt_ids=qformer_ids.flip(0),
                              prompt_mask=qformer_mask.flip(0))
    reference = reference if decoder_ids is not None else reference[:, hf_model.config.num_query_tokens :]
    torch.testing.assert_close(ours, reference)
    assert not torch.allclose(ours, swapped, atol=1e-3)  # the prompt does reach the LLM through the queries


@pytest.mark.parametrize("text, seed", [("opt", 2), ("llama", 0), ("t5", 2)])  # seeds whose two generations differ
def test_greedy_generations_match_transformers(tiny_blip2, pixels, text, seed):
    directory, hf_model = tiny_blip2(text, seed=seed)
    model = load(directory)
    prompts = ["w1 w2 w3", "w4"]  # different lengths: the batch is left-padded
    ours = model.generate(pixels(), prompts, max_new_tokens=8)

    decoder_only = not model.model.llm.is_encoder_decoder  # Blip2Processor's layout: <image> x Q, then the prompt as
    tokenizer = model.llm_tokenizer.hf  # its tokenizer tokenizes it (this one adds no special token of its own)
    tokenizer.padding_side = "left" if decoder_only else "right"
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    ids, mask = with_image_tokens(hf_model, batch.input_ids, batch.attention_mask)
    out = hf_model.generate(
        pixel_values=pixels(), input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False
    )
    new_tokens = out[:, ids.shape[1] :] if decoder_only else out
    theirs = [t.strip() for t in model.llm_tokenizer.hf.batch_decode(new_tokens, skip_special_tokens=True)]
    assert ours == theirs
    assert ours[0] != ours[1] and all(ours), "degenerate generations would prove little"


@pytest.mark.parametrize("num_layers, freq, num_queries", [(2, 2, 6), (3, 1, 5)])
def test_itm_and_itc_scores_match_transformers(tiny_blip2, pixels, num_layers, freq, num_queries):
    directory, hf_model = tiny_blip2(
        None, num_layers=num_layers, cross_attention_freq=freq, num_query_tokens=num_queries
    )
    model = load(directory)
    assert model.model.llm is None
    ids = torch.randint(4, 99, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        ref_itm = hf_model(pixels(3), ids, mask, use_image_text_matching_head=True).logits_per_image  # [3, 2]
        ref_itc = hf_model(pixels(3), ids, mask, use_image_text_matching_head=False).logits_per_image  # [3, 3]
        features = model.model.image_features(pixels(3))
        ours_itm = model.model.itm_logits(features, ids, mask)
        image_feats = model.model.image_embeds_itc(model.model.query_states(features).queries)  # [3, Q, E]
        text_feat = model.model.text_embeds_itc(ids, mask)  # [3, E]
        ours_itc, _ = itc_similarities(image_feats, text_feat, image_feats, text_feat, torch.tensor(1.0))
    torch.testing.assert_close(ours_itm, ref_itm)
    torch.testing.assert_close(ours_itc, ref_itc)


def test_text_ffn_starts_as_a_copy_of_the_query_ffn(tiny_blip2):
    """transformers' generation checkpoints have no Q-Former text FFN; ours starts as the query FFN."""
    directory, hf_model = tiny_blip2("opt")
    model = load(directory)
    for layer, hf_layer in zip(model.model.qformer.layers, hf_model.qformer.encoder.layer):
        torch.testing.assert_close(layer.text_ffn.up.weight, hf_layer.intermediate_query.dense.weight, rtol=0, atol=0)
        torch.testing.assert_close(layer.text_ffn.norm.bias, layer.query_ffn.norm.bias, rtol=0, atol=0)
        assert layer.text_ffn.up.weight.data_ptr() != layer.query_ffn.up.weight.data_ptr()  # a copy, not shared


@pytest.mark.parametrize("text", [None, "opt"])
def test_the_recorded_config_rebuilds_the_model(tiny_blip2, pixels, tmp_path, text):
    """model.save() keeps only what trains; the config load_hf wrote (parts = the directory) rebuilds the rest."""
    directory, _ = tiny_blip2(text)
    model = load(directory)
    rebuilt = load(model.save(tmp_path / "saved"))
    ids = torch.tensor([[2, 5, 9, 13]])
    with torch.no_grad():
        if text is None:
            mask = torch.ones_like(ids)
            expected = model.model.itm_logits(model.model.image_features(pixels(1)), ids, mask)
            got = rebuilt.model.itm_logits(rebuilt.model.image_features(pixels(1)), ids, mask)
        else:
            expected, got = model.model(pixels(1), ids), rebuilt.model(pixels(1), ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---- export_hf ---------------------------------------------------------------------------------------------------


def hf_reload(directory, retrieval: bool):
    cls = transformers.Blip2ForImageTextRetrieval if retrieval else transformers.Blip2ForConditionalGeneration
    reloaded, info = cls.from_pretrained(directory, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and not info["mismatched_keys"], info
    return reloaded.eval()


@pytest.mark.parametrize("text", ["opt", "llama", "t5"])
def test_generation_round_trip(tiny_blip2, pixels, tmp_path, text):
    """load_hf -> export_hf -> transformers reloads every tensor unchanged; its outputs and ours agree."""
    directory, hf_model = tiny_blip2(text, num_query_tokens=5)
    out = load(directory).export_hf(tmp_path / "export")
    reloaded = hf_reload(out, retrieval=False)
    original = hf_model.state_dict()
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=0, msg=key)
    assert reloaded.config.image_token_id == hf_model.config.image_token_id  # the tokenizer already had <image>

    decoder_ids = DECODER_IDS if text == "t5" else None
    ids, mask = text_batch(decoder_only=text != "t5")
    again = load(out)
    torch.testing.assert_close(
        our_logits(again, pixels(), ids, mask, decoder_ids), hf_logits(reloaded, pixels(), ids, mask, decoder_ids)
    )

    processor = transformers.Blip2Processor.from_pretrained(out)
    inputs = processor(images=Image.new("RGB", (50, 40), "red"), text="w1 w2", return_tensors="pt")
    assert inputs.pixel_values.shape == pixels(1).shape
    assert inputs.input_ids[0, :5].tolist() == [reloaded.config.image_token_id] * 5


def test_retrieval_round_trip(tiny_blip2, tmp_path):
    directory, hf_model = tiny_blip2(None, num_layers=3, cross_attention_freq=1)
    model = load(directory)
    out = model.export_hf(tmp_path / "export")
    reloaded = hf_reload(out, retrieval=True)
    original = hf_model.state_dict()
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, original[key], rtol=0, atol=0, msg=key)
    again = load(out)  # through blip2.api
    assert again.cfg.qformer.tokenizer == str(out)  # the exported directory ships the Q-Former tokenizer
    dec = model.qformer_tokenizer.convert_tokens_to_ids("[DEC]")
    assert again.qformer_tokenizer.convert_tokens_to_ids("[DEC]") == dec == again.model.dec_token_id


def built_model(tiny_parts, randomize, text: str | None, seed: int = 3) -> Blip2Pipeline:
    """A model assembled from standalone parts (not from a Blip2 directory), its trainable parts random."""
    vision_dir, llm_dir = tiny_parts(text)
    cfg = Blip2Config(
        vision=VisionConfig(kind="hf", path=str(vision_dir)),
        qformer=QFormerConfig(**TINY_QFORMER, cross_attention_freq=1),
        llm=LLMConfig(kind="hf", path=str(llm_dir)) if llm_dir else None,
    )
    pipe = Blip2Pipeline.from_parts(build(cfg, init_qformer=False))
    model = pipe.model
    trainable = [model.qformer, model.vision_norm, model.vision_proj, model.text_proj, model.itm_head, model.llm_proj]
    for seed_offset, module in enumerate(m for m in trainable if m is not None):
        randomize(module, seed + seed_offset)
    model.eval()
    return pipe


@pytest.mark.parametrize("text", ["llama", "t5"])
def test_export_of_a_built_model_grows_the_vocabulary_for_image_tokens(tiny_parts, randomize, pixels, tmp_path, text):
    """The LLM tokenizer fills its vocabulary: <image> gets a new, zero row; everything else is reproduced."""
    model = built_model(tiny_parts, randomize, text)
    vocab = model.model.llm.model.get_input_embeddings().num_embeddings
    reloaded = hf_reload(model.export_hf(tmp_path / "export"), retrieval=False)
    assert reloaded.config.image_token_id == vocab
    assert reloaded.language_model.get_input_embeddings().weight[vocab:].abs().sum() == 0
    decoder_ids = DECODER_IDS if text == "t5" else None
    ids, mask = text_batch(decoder_only=text != "t5")
    theirs = hf_logits(reloaded, pixels(), ids, mask, decoder_ids)
    torch.testing.assert_close(our_logits(model, pixels(), ids, mask, decoder_ids), theirs[..., :vocab])
    assert len(model.llm_tokenizer.hf) == vocab  # the model's own tokenizer and LLM are untouched
    assert model.model.llm.model.get_input_embeddings().num_embeddings == vocab


def test_export_of_a_stage1_model_keeps_the_text_side(tiny_parts, randomize, pixels, tmp_path):
    model = built_model(tiny_parts, randomize, None)
    reloaded = hf_reload(model.export_hf(tmp_path / "export"), retrieval=True)
    ours, exported = model.model.state_dict(), reloaded.state_dict()
    table = hf_key_map(model.cfg.qformer, retrieval=True, text_ffn=True)
    for hf_key, our_key in table.items():
        torch.testing.assert_close(exported[hf_key], ours[our_key], rtol=0, atol=0, msg=hf_key)
    ids = torch.randint(4, 99, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = reloaded(pixels(), ids, torch.ones_like(ids), use_image_text_matching_head=True).logits_per_image
        torch.testing.assert_close(model.model.itm_logits(model.model.image_features(pixels()), ids, torch.ones_like(ids)), theirs)


def test_export_refuses_an_encoder_transformers_cannot_hold(tmp_path):
    clip = transformers.CLIPVisionModel(
        transformers.CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        )
    )
    cfg = Blip2Config(
        vision=VisionConfig(kind="hf", path=str(tmp_path)),
        qformer=QFormerConfig(**TINY_QFORMER, encoder_width=32),
        llm=None,
    )
    model = Blip2Pipeline.from_parts(assemble(cfg, image_encoder_from_hf(clip), load_tokenizer("minilm")))
    with pytest.raises(TypeError, match="Blip2VisionModel.*CLIPVisionModel"):
        model.export_hf(tmp_path / "export")
    assert not (tmp_path / "export").exists()


# ---- wrong layouts -----------------------------------------------------------------------------------------------


def test_a_renamed_key_is_named_with_its_file(tiny_blip2):
    directory, _ = tiny_blip2("opt")
    file = directory / "model.safetensors"
    state = load_file(file)
    state["qformer.encoder.layer.0.attention.attention.kwery.weight"] = state.pop(
        "qformer.encoder.layer.0.attention.attention.query.weight"
    )
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(KeyMapError, match=r"model\.safetensors.*attention\.query\.weight.*kwery"):
        load(directory)


def test_a_wrong_shape_is_named(tiny_blip2):
    directory, _ = tiny_blip2("opt")
    file = directory / "model.safetensors"
    state = load_file(file)
    state["language_projection.weight"] = torch.zeros(7, 32)
    save_file(state, file, metadata={"format": "pt"})
    with pytest.raises(KeyMapError, match="language_projection.weight"):
        load(directory)


def test_a_directory_of_another_model_type_is_refused(tiny_parts):
    vision_dir, _ = tiny_parts(None)
    with pytest.raises(KeyMapError, match="blip_2_vision_model.*not 'blip-2'"):
        load_hf(vision_dir)


def test_the_key_map_is_explicit_and_complete():
    """Every Q-Former tensor of the generation model is in the table, cross-attention only on its layers."""
    cfg = dataclasses.replace(QFormerConfig(**TINY_QFORMER), num_layers=4, cross_attention_freq=2, encoder_width=32)
    table = hf_key_map(cfg, retrieval=False, text_ffn=False)
    assert (
        table["qformer.encoder.layer.2.crossattention.attention.key.weight"] == "qformer.layers.2.cross_attn.key.weight"
    )
    assert not any(k.startswith("qformer.encoder.layer.1.crossattention") for k in table)
    assert table["vision_model.post_layernorm.weight"] == "vision_norm.weight"
    assert table["language_projection.bias"] == "llm_proj.bias"
    assert (
        len(table) == 1 + 2 + 2 + 4 * 8 * 2 + 2 * 5 * 2 + 2
    )  # queries, embed norm, vision norm, layers, cross, projection
