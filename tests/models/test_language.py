"""Frozen LLMs: tiny random OPT / Llama / T5 built in-process, the GGUF cache, and the real SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import real_like_tokenizer, text_model
from transformers import (
    LlamaModel,
)

from blip2.config import ConfigError, LLMConfig
from blip2.data.text import LLMTokenizer
from blip2.models.language import FrozenLLM
from blip2.weights import gguf as gguf_cache
from blip2.weights.llms import LLMLoadError, build_llm, llm_from_hf

FAMILIES = ("opt", "llama", "t5")


# ---------------------------------------------------------------------------------------------
# tiny in-process models


def tiny_model(family: str, tokenizer, dropout: float = 0.0):
    """A 2-layer, width-32 random model of ``family`` whose vocabulary fits ``tokenizer`` (with 5 spare rows);
    OPT's word_embed_proj_dim differs from its hidden size, as in OPT-350m: the soft prompt must match the former."""
    torch.manual_seed(0)
    overrides = {
        "opt": dict(word_embed_proj_dim=16, dropout=dropout),
        "llama": dict(tie_word_embeddings=True, attention_dropout=dropout),
        "t5": dict(num_decoder_layers=2, dropout_rate=dropout, feed_forward_proj="relu"),
    }[family]
    return text_model(family, tokenizer, max_positions=64, vocab_size=len(tokenizer) + 5, **overrides)


def tiny_llm(family: str, dropout: float = 0.0) -> tuple[FrozenLLM, LLMTokenizer]:
    tokenizer = real_like_tokenizer(family)
    return llm_from_hf(tiny_model(family, tokenizer, dropout), tokenizer)


def save_tiny(family: str, folder: Path) -> FrozenLLM:
    llm, text = tiny_llm(family)
    llm.model.save_pretrained(folder)
    text.hf.save_pretrained(folder)
    return llm


def lm_logits(llm: FrozenLLM, input_ids: torch.Tensor) -> torch.Tensor:
    if llm.is_encoder_decoder:
        decoder_ids = torch.zeros_like(input_ids[:, :2])  # [B, 2]
        return llm(input_ids=input_ids, decoder_input_ids=decoder_ids).logits
    return llm(input_ids=input_ids).logits


# ---------------------------------------------------------------------------------------------
# the interface


@pytest.mark.parametrize("family", FAMILIES)
def test_wrapper_reports_family_width_and_embeddings(family):
    llm, _ = tiny_llm(family)
    assert llm.is_encoder_decoder == (family == "t5")
    assert llm.hidden_size == {"opt": 16, "llama": 32, "t5": 32}[family]
    input_ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]])  # [B, T]
    embeds = llm.embed(input_ids)
    assert embeds.shape == (2, 5, llm.hidden_size)
    table = llm.model.get_input_embeddings().weight
    torch.testing.assert_close(embeds, table[input_ids])


@pytest.mark.parametrize("family", FAMILIES)
def test_llm_is_frozen_and_stays_in_eval_mode(family):
    llm, _ = tiny_llm(family, dropout=0.5)
    assert not any(p.requires_grad for p in llm.parameters())
    llm.train()
    assert not llm.training
    assert not any(module.training for module in llm.model.modules())
    input_ids = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(lm_logits(llm, input_ids), lm_logits(llm, input_ids), rtol=0, atol=0)  # no dropout


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_reaches_soft_prompt_but_not_llm(family):
    llm, _ = tiny_llm(family)
    soft_prompt = torch.randn(2, 3, llm.hidden_size, requires_grad=True)  # [B, Q, H]
    text = llm.embed(torch.tensor([[3, 4], [5, 6]]))  # [B, T, H]
    inputs = torch.cat([soft_prompt, text], dim=1)  # [B, Q + T, H]
    if llm.is_encoder_decoder:
        out = llm(inputs_embeds=inputs, labels=torch.tensor([[7, 8], [9, 10]]))
    else:
        out = llm(inputs_embeds=inputs, labels=torch.tensor([[-100] * 3 + [3, 4], [-100] * 3 + [5, 6]]))
    out.loss.backward()
    assert soft_prompt.grad is not None and soft_prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in llm.parameters())


def test_model_without_lm_head_is_refused():
    tokenizer = real_like_tokenizer("llama")
    base = LlamaModel(tiny_model("llama", tokenizer).config)
    with pytest.raises(ValueError, match="no language-modelling head"):
        llm_from_hf(base, tokenizer)


def test_broken_weight_tying_is_refused():
    tokenizer = real_like_tokenizer("llama")
    model = tiny_model("llama", tokenizer)
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        llm_from_hf(model, tokenizer)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_left_padded_batch_generates_like_single_prompts(family):
    """The documented generation recipe: [soft prompt ; left-padded text], positions from the mask."""
    llm, text = tiny_llm(family)
    texts = ["what color is the cat", "a dog"]
    soft_prompt = torch.randn(2, 3, llm.hidden_size)  # [B, Q, H]

    def generate(prompt, input_ids, mask):
        embeds = torch.cat([prompt, llm.embed(input_ids)], dim=1)  # [B, Q + T, H]
        mask = torch.cat([torch.ones(prompt.shape[:2], dtype=torch.long), mask], dim=1)  # [B, Q + T]
        return llm.model.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, do_sample=False,
            pad_token_id=text.pad_token_id, eos_token_id=None,
        )  # fmt: skip

    batched = generate(soft_prompt, *text.tokenize(texts, max_len=16, add_bos=True, pad_left=True))
    for index, prompt in enumerate(texts):
        single = generate(soft_prompt[index : index + 1], *text.tokenize([prompt], max_len=16, add_bos=True))
        assert batched[index].tolist() == single[0].tolist()


# ---------------------------------------------------------------------------------------------
# build_llm(kind="hf")


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_directory_round_trip(family, tmp_path):
    original = save_tiny(family, tmp_path)
    original_text = LLMTokenizer(real_like_tokenizer(family), family == "t5")
    loaded, loaded_text = build_llm(LLMConfig(kind="hf", path=str(tmp_path)))
    assert type(loaded.model) is type(original.model)
    assert loaded.is_encoder_decoder == (family == "t5")
    assert loaded.hidden_size == original.hidden_size
    input_ids = torch.tensor([[3, 4, 5, 6]])
    torch.testing.assert_close(lm_logits(loaded, input_ids), lm_logits(original, input_ids))
    if family != "t5":  # OPT and Llama tie lm_head to the embeddings, and must stay tied
        assert loaded.model.get_output_embeddings().weight is loaded.model.get_input_embeddings().weight
    texts = ["a photo of cat", "red mat"]
    assert loaded_text.tokenize(texts, 8, add_bos=False)[0].tolist() == original_text.tokenize(texts, 8, add_bos=False)[0].tolist()
    assert not any(p.requires_grad for p in loaded.parameters())


def test_hf_directory_dtype_from_argument_and_config(tmp_path):
    save_tiny("llama", tmp_path)
    assert build_llm(LLMConfig(kind="hf", path=str(tmp_path)), dtype=torch.bfloat16)[0].model.dtype == torch.bfloat16
    assert build_llm(LLMConfig(kind="hf", path=str(tmp_path), dtype="float16"))[0].model.dtype == torch.float16
    with pytest.raises(ConfigError, match="llm.dtype"):
        LLMConfig(dtype="int8")


def test_hf_directory_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(LLMLoadError, match=f"{missing} does not exist"):
        build_llm(LLMConfig(kind="hf", path=str(missing)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LLMLoadError, match=f"{empty} has no config.json"):
        build_llm(LLMConfig(kind="hf", path=str(empty)))


def test_hf_directory_with_damaged_weights(tmp_path):
    save_tiny("opt", tmp_path)
    weights = tmp_path / "model.safetensors"
    tensors = load_file(weights)
    dropped = sorted(tensors)[-1]
    save_file({name: t for name, t in tensors.items() if name != dropped}, weights, metadata={"format": "pt"})
    with pytest.raises(LLMLoadError, match=r"lack 1 tensors") as info:
        build_llm(LLMConfig(kind="hf", path=str(tmp_path)))
    assert dropped in str(info.value) and str(tmp_path) in str(info.value)
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(LLMLoadError, match=f"cannot load the weights in {tmp_path}"):
        build_llm(LLMConfig(kind="hf", path=str(tmp_path)))


def test_hf_directory_without_tokenizer(tmp_path):
    tokenizer = real_like_tokenizer("llama")
    tiny_model("llama", tokenizer).save_pretrained(tmp_path)
    with pytest.raises(LLMLoadError, match=f"tokenizer in {tmp_path}"):
        build_llm(LLMConfig(kind="hf", path=str(tmp_path)))


# ---------------------------------------------------------------------------------------------
# the converted-model cache (its mechanics, on a tiny Llama)


@pytest.fixture
def fake_source(tmp_path) -> Path:
    source = tmp_path / "model.gguf"
    source.write_bytes(b"gguf stand-in")
    return source


def test_cache_is_written_whole_and_loads(tmp_path, fake_source):
    llm, text = tiny_llm("llama")
    target = tmp_path / "cache" / "tiny"
    gguf_cache.write_cache(llm.model, text.hf, target, fake_source)
    gguf_cache.verify_cache(target, fake_source)
    manifest = json.loads((target / gguf_cache.MANIFEST_NAME).read_text())
    assert manifest["source"] == "model.gguf" and manifest["source_bytes"] == fake_source.stat().st_size
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
    assert "lm_head.weight" not in load_file(target / "model.safetensors")  # stored once, re-tied on load
    assert list(target.parent.iterdir()) == [target]  # no partial directory left behind
    loaded, _ = build_llm(LLMConfig(kind="hf", path=str(target)))
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    input_ids = torch.tensor([[3, 4, 5]])
    torch.testing.assert_close(lm_logits(loaded, input_ids), lm_logits(llm, input_ids))


def test_cache_keeps_the_copy_another_process_finished_first(tmp_path, fake_source):
    llm, text = tiny_llm("llama")
    target = tmp_path / "tiny"
    gguf_cache.write_cache(llm.model, text.hf, target, fake_source)
    first = (target / gguf_cache.MANIFEST_NAME).stat().st_mtime_ns
    gguf_cache.write_cache(llm.model, text.hf, target, fake_source)
    assert (target / gguf_cache.MANIFEST_NAME).stat().st_mtime_ns == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "tiny"]


def test_cache_crash_mid_write_leaves_nothing(tmp_path, fake_source, monkeypatch):
    llm, text = tiny_llm("llama")

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_cache, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        gguf_cache.write_cache(llm.model, text.hf, tmp_path / "tiny", fake_source)
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_damaged_or_stale_cache_names_the_directory_to_delete(tmp_path, fake_source):
    llm, text = tiny_llm("llama")
    target = tmp_path / "tiny"
    gguf_cache.write_cache(llm.model, text.hf, target, fake_source)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated copy
    with pytest.raises(gguf_cache.CorruptCacheError, match=f"delete the directory {target}"):
        gguf_cache.verify_cache(target, fake_source)
    fake_source.write_bytes(b"a newer gguf")
    with pytest.raises(gguf_cache.CorruptCacheError, match="not from the installed"):
        gguf_cache.verify_cache(target, fake_source)
    (target / gguf_cache.MANIFEST_NAME).unlink()
    with pytest.raises(gguf_cache.CorruptCacheError, match=f"{target} has no readable"):
        gguf_cache.verify_cache(target, fake_source)


# ---------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct (uses, or on its first run builds, the real cache: ~35 s once)

CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2() -> tuple[FrozenLLM, LLMTokenizer]:
    return build_llm(LLMConfig(kind="smollm2"))


def test_smollm2_is_a_tied_llama_with_its_chat_tokens(smollm2):
    smollm2, text = smollm2
    model, tokenizer = smollm2.model, text.hf
    assert type(model).__name__ == "LlamaForCausalLM" and not smollm2.is_encoder_decoder
    assert smollm2.hidden_size == 576 and model.dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # BOS is the document separator, not the chat-turn opener the GGUF names (use_document_start_as_bos)
    assert tokenizer.convert_ids_to_tokens([text.bos_token_id, text.eos_token_id]) == ["<|endoftext|>", "<|im_end|>"]
    assert (smollm2.bos_token_id, text.bos_token_id, text.eos_token_id, text.pad_token_id) == (0, 0, 2, 2)
    assert model.config.bos_token_id == model.generation_config.bos_token_id == 0  # an export carries it
    assert tokenizer("Hello")["input_ids"] == tokenizer("Hello", add_special_tokens=False)["input_ids"]  # no auto BOS
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    # the "smollm" pre-tokenizer: each digit alone, whitespace runs kept whole
    assert tokenizer.tokenize("a  3 2024") == ["a", "ĠĠ", "3", "Ġ", "2", "0", "2", "4"]


def test_smollm2_knows_the_capital_of_france(smollm2):
    smollm2, text = smollm2
    tokenizer = text.hf
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    input_ids = tokenizer(prompt + "The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        next_token = smollm2(input_ids=input_ids).logits[0, -1].argmax()
    assert tokenizer.decode(next_token) == " Paris"


@pytest.mark.slow
def test_smollm2_converts_then_loads_from_cache_and_chats(tmp_path, monkeypatch):
    monkeypatch.setenv("BLIP2_CACHE", str(tmp_path))
    converted, _ = build_llm(LLMConfig(kind="smollm2"))  # converts the GGUF into tmp_path
    assert (tmp_path / gguf_cache.SMOLLM2_CACHE_NAME / gguf_cache.MANIFEST_NAME).is_file()
    cached, text = build_llm(LLMConfig(kind="smollm2"))  # reads the cache
    for name, tensor in converted.model.state_dict().items():
        torch.testing.assert_close(cached.model.state_dict()[name], tensor, rtol=0, atol=0, msg=name)
    tokenizer = text.hf
    inputs = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = cached.model.generate(**inputs, max_new_tokens=20, do_sample=False, pad_token_id=text.pad_token_id)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in reply
