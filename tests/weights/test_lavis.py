"""LAVIS checkpoints: our key tables against LAVIS's names written out by hand, exact loads of synthetic LAVIS
state dicts (stage 1 with EVA weights, stage 2 for OPT and T5), EVA's q/v biases checked against EVA's own attention,
and clear errors for layouts that do not fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from blip2 import factory
from blip2.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from blip2.pipeline import load
from blip2.weights.checkpoint import save_checkpoint
from blip2.weights.keymap import KeyMapError
from blip2.weights.lavis import lavis_state_dict, save_lavis

WB = ("weight", "bias")


def tiny_model(tiny_parts, randomize, text: str | None, num_layers: int = 2, freq: int = 2, seed: int = 5):
    """A model on tiny standalone parts, trainable parts random; returns (model, vision config, llm config)."""
    vision_dir, llm_dir = tiny_parts(text)
    vision = VisionConfig(kind="hf", path=str(vision_dir))
    llm = LLMConfig(kind="hf", path=str(llm_dir)) if llm_dir else None
    qformer = QFormerConfig(
        hidden_size=32,
        num_layers=num_layers,
        num_heads=4,
        intermediate_size=64,
        vocab_size=99,
        max_position_embeddings=64,
        cross_attention_freq=freq,
        num_query_tokens=6,
        embed_dim=16,
        init_from=None,
    )
    model = factory.build(Blip2Config(vision=vision, qformer=qformer, llm=llm, vision_norm_eps=1e-5), init_qformer=False).model
    for offset, module in enumerate(
        [model.qformer, model.vision_norm, model.vision_proj, model.text_proj, model.itm_head]
    ):
        randomize(module, seed + offset)
    if model.llm_proj is not None:
        randomize(model.llm_proj, seed + 10)
    with torch.no_grad():
        model.temp.fill_(0.05)
    return model.eval(), vision, llm


def lavis_qformer_keys(num_layers: int, cross_layers: set[int], text_side: bool) -> set[str]:
    """LAVIS's BertLMHeadModel names (lavis/models/blip2_models/Qformer.py), written out independently of our tables."""
    keys = {"query_tokens", "ln_vision.weight", "ln_vision.bias", "Qformer.bert.embeddings.position_ids"}
    keys |= {f"Qformer.bert.embeddings.LayerNorm.{p}" for p in WB}
    for i in range(num_layers):
        layer = f"Qformer.bert.encoder.layer.{i}"
        for block in ["attention"] + (["crossattention"] if i in cross_layers else []):
            keys |= {f"{layer}.{block}.self.{name}.{p}" for name in ("query", "key", "value") for p in WB}
            keys |= {f"{layer}.{block}.output.{name}.{p}" for name in ("dense", "LayerNorm") for p in WB}
        for suffix in ("_query", "") if text_side else ("_query",):
            keys |= {f"{layer}.intermediate{suffix}.dense.{p}" for p in WB}
            keys |= {f"{layer}.output{suffix}.{name}.{p}" for name in ("dense", "LayerNorm") for p in WB}
    if text_side:
        keys |= {"Qformer.bert.embeddings.word_embeddings.weight", "Qformer.bert.embeddings.position_embeddings.weight"}
        keys |= {f"Qformer.cls.predictions.transform.{name}.{p}" for name in ("dense", "LayerNorm") for p in WB}
        keys |= {
            "Qformer.cls.predictions.bias",
            "Qformer.cls.predictions.decoder.weight",
            "Qformer.cls.predictions.decoder.bias",
        }
        keys |= {f"{head}.{p}" for head in ("vision_proj", "text_proj", "itm_head") for p in WB} | {"temp"}
    return keys


def eva_keys(num_blocks: int) -> set[str]:
    """LAVIS eva_vit.py VisionTransformer names (no final norm or head: LAVIS removed them)."""
    keys = {"visual_encoder.cls_token", "visual_encoder.pos_embed"} | {
        f"visual_encoder.patch_embed.proj.{p}" for p in WB
    }
    for i in range(num_blocks):
        block = f"visual_encoder.blocks.{i}"
        keys |= {f"{block}.{name}.{p}" for name in ("norm1", "norm2", "attn.proj", "mlp.fc1", "mlp.fc2") for p in WB}
        keys |= {f"{block}.attn.qkv.weight", f"{block}.attn.q_bias", f"{block}.attn.v_bias"}
    return keys


def zero_key_bias(model) -> None:
    """EVA has no key bias: transformers' fused qkv bias holds zeros there after a conversion."""
    with torch.no_grad():
        for layer in model.vision.backbone.encoder.layers:
            layer.self_attn.qkv.bias.view(3, -1)[1].zero_()


def test_table_names_are_lavis_names(tiny_parts, randomize):
    stage1, _, _ = tiny_model(tiny_parts, randomize, None, num_layers=3, freq=2)
    zero_key_bias(stage1)
    assert set(lavis_state_dict(stage1, include_vision=True)) == lavis_qformer_keys(
        3, {0, 2}, text_side=True
    ) | eva_keys(2)
    stage2, _, _ = tiny_model(tiny_parts, randomize, "opt", num_layers=2, freq=1)
    opt_keys = lavis_qformer_keys(2, {0, 1}, text_side=False) | {"opt_proj.weight", "opt_proj.bias"}
    assert set(lavis_state_dict(stage2)) == opt_keys


def test_stage1_load_with_eva_weights_is_exact(tiny_parts, randomize, tmp_path):
    """The checkpoint's visual_encoder.* replaces the named encoder's weights; everything else lands unchanged."""
    model, vision, _ = tiny_model(tiny_parts, randomize, None, num_layers=3, freq=1)
    randomize(model.vision.backbone, 99)  # now differs from the directory the config names
    zero_key_bias(model)
    loaded = factory.load_lavis(
        save_lavis(model, tmp_path / "blip2_pretrained.pth", include_vision=True), vision=vision, qformer_heads=4
    ).model
    assert loaded.llm is None and loaded.cfg.qformer.cross_attention_freq == 1 and loaded.cfg.qformer.embed_dim == 16
    expected, got = model.state_dict(), loaded.state_dict()
    assert set(got) == set(expected)
    for key in expected:
        if not key.startswith(
            "vision.backbone.post_layernorm"
        ):  # an unused copy inside the encoder (vision_norm is used)
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    assert loaded.cfg.vision_norm_eps == 1e-5  # LAVIS's ln_vision is a default LayerNorm


def eva_reference(state: dict[str, torch.Tensor], pixels: torch.Tensor, num_heads: int) -> torch.Tensor:
    """EVA ViT's forward on LAVIS tensors, as eva_vit.py computes it (pre-norm blocks, qkv bias = q ; 0 ; v)."""
    x = F.conv2d(
        pixels, state["visual_encoder.patch_embed.proj.weight"], state["visual_encoder.patch_embed.proj.bias"], stride=8
    )
    x = x.flatten(2).transpose(1, 2)  # [B, N, D]
    x = (
        torch.cat([state["visual_encoder.cls_token"].expand(x.shape[0], -1, -1), x], 1)
        + state["visual_encoder.pos_embed"]
    )
    batch, length, dim = x.shape
    for i in range(2):
        p = lambda name: state[f"visual_encoder.blocks.{i}.{name}"]  # noqa: E731
        h = F.layer_norm(x, (dim,), p("norm1.weight"), p("norm1.bias"), eps=1e-6)
        bias = torch.cat([p("attn.q_bias"), torch.zeros_like(p("attn.v_bias")), p("attn.v_bias")])
        q, k, v = F.linear(h, p("attn.qkv.weight"), bias).view(batch, length, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        x = x + F.linear(
            (attn @ v).transpose(1, 2).reshape(batch, length, dim), p("attn.proj.weight"), p("attn.proj.bias")
        )
        h = F.layer_norm(x, (dim,), p("norm2.weight"), p("norm2.bias"), eps=1e-6)
        x = x + F.linear(
            F.gelu(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias"))), p("mlp.fc2.weight"), p("mlp.fc2.bias")
        )
    return x


def test_eva_weights_compute_what_eva_computes(tiny_parts, randomize, pixels, tmp_path):
    model, vision, _ = tiny_model(tiny_parts, randomize, None)
    zero_key_bias(model)
    state = lavis_state_dict(model, include_vision=True)
    for i in range(2):  # distinct, non-zero q and v biases, so a swapped or misplaced bias would show
        state[f"visual_encoder.blocks.{i}.attn.q_bias"] = torch.randn(32) * 0.3
        state[f"visual_encoder.blocks.{i}.attn.v_bias"] = torch.randn(32) * 0.3
    path = tmp_path / "eva.pth"
    torch.save({"model": state}, path)
    loaded = factory.load_lavis(path, vision=vision, qformer_heads=4).model
    with torch.no_grad():
        torch.testing.assert_close(loaded.image_features(pixels()), eva_reference(state, pixels(), num_heads=4))


@pytest.mark.parametrize("text, projection", [("opt", "opt_proj"), ("t5", "t5_proj")])
def test_stage2_load_is_exact(tiny_parts, randomize, pixels, tmp_path, text, projection):
    """A stage-2 checkpoint (no text side, no LLM, no encoder) + the named parts reproduces the model's LLM logits."""
    model, vision, llm = tiny_model(tiny_parts, randomize, text)
    path = save_lavis(model, tmp_path / "blip2_stage2.pth")
    assert f"{projection}.weight" in torch.load(path, weights_only=True)["model"]
    loaded = factory.load_lavis(path, vision=vision, llm=llm, qformer_heads=4).model
    expected = model.state_dict()
    for key, value in loaded.state_dict().items():
        if (
            key.startswith(
                ("qformer.layers", "qformer.query_tokens", "qformer.embed_norm", "vision_norm", "llm_proj", "llm.model")
            )
            and "text_ffn" not in key
        ):
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    for layer in loaded.qformer.layers:  # the text FFN LAVIS deleted starts as the query FFN
        torch.testing.assert_close(layer.text_ffn.down.weight, layer.query_ffn.down.weight, rtol=0, atol=0)
    ids = torch.tensor([[5, 9, 13, 1], [21, 6, 1, 0]])
    mask = (ids != 0).long()
    decoder = torch.tensor([[0, 8, 12], [0, 17, 4]]) if text == "t5" else None
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels(), ids, mask, decoder), model(pixels(), ids, mask, decoder))


def test_the_recorded_config_rebuilds_the_model(tiny_parts, randomize, pixels, tmp_path):
    """model.save() keeps only what trains; the config load_lavis wrote names the frozen parts that rebuild the rest."""
    model, vision, llm = tiny_model(tiny_parts, randomize, "opt")
    loaded = factory.load_lavis(save_lavis(model, tmp_path / "s2.pth"), vision=vision, llm=llm, qformer_heads=4).model
    rebuilt = load(save_checkpoint(loaded, tmp_path / "saved")).model
    ids = torch.tensor([[2, 5, 9, 13]])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(pixels(1), ids), loaded(pixels(1), ids), rtol=0, atol=0)


def test_stage1_checkpoint_with_an_llm_starts_stage2(tiny_parts, randomize, tmp_path):
    model, vision, _ = tiny_model(tiny_parts, randomize, None)
    _, llm_dir = tiny_parts("opt", seed=1)
    path = save_lavis(model, tmp_path / "s1.pth")
    loaded = load(path, vision=vision, llm={"kind": "hf", "path": str(llm_dir)}, qformer_heads=4).model  # blip2.load
    assert loaded.llm is not None and loaded.llm_proj.in_features == 32
    torch.testing.assert_close(loaded.qformer.query_tokens, model.qformer.query_tokens, rtol=0, atol=0)


# ---- errors ------------------------------------------------------------------------------------------------------


@pytest.fixture
def stage1_state(tiny_parts, randomize):
    model, vision, _ = tiny_model(tiny_parts, randomize, None)
    return lavis_state_dict(model), vision


def write(tmp_path, state) -> str:
    path = tmp_path / "edited.pth"
    torch.save({"model": state}, path)
    return str(path)


def test_unknown_key_is_named_with_the_file(stage1_state, tmp_path):
    state, vision = stage1_state
    state["Qformer.bert.encoder.layer.0.attention.self.kwery.weight"] = state.pop(
        "Qformer.bert.encoder.layer.0.attention.self.query.weight"
    )
    with pytest.raises(
        KeyMapError,
        match=r"edited\.pth.*missing keys \['Qformer.bert.encoder.layer.0.attention.self.query.weight'\].*kwery",
    ):
        factory.load_lavis(write(tmp_path, state), vision=vision, qformer_heads=4)


def test_wrong_shape_is_named(stage1_state, tmp_path):
    state, vision = stage1_state
    state["itm_head.weight"] = torch.zeros(3, 32)
    with pytest.raises(
        KeyMapError, match=r"edited\.pth.*wrong shapes.*itm_head.weight: \(3, 32\) vs expected \(2, 32\)"
    ):
        factory.load_lavis(write(tmp_path, state), vision=vision, qformer_heads=4)


def test_untied_decoder_is_refused(stage1_state, tmp_path):
    state, vision = stage1_state
    state["Qformer.cls.predictions.decoder.weight"] = state["Qformer.cls.predictions.decoder.weight"] + 1
    with pytest.raises(KeyMapError, match="decoder.weight differs from Qformer.bert.embeddings.word_embeddings.weight"):
        factory.load_lavis(write(tmp_path, state), vision=vision, qformer_heads=4)


def test_missing_parts_are_asked_for(tiny_parts, randomize, tmp_path):
    model, vision, _ = tiny_model(tiny_parts, randomize, "opt")
    path = save_lavis(model, tmp_path / "s2.pth")
    with pytest.raises(ValueError, match="stage-2 checkpoint \\(opt_proj.\\*\\): name its frozen LLM with llm="):
        factory.load_lavis(path, vision=vision, qformer_heads=4)
    with pytest.raises(ValueError, match="name the frozen image encoder with vision="):
        factory.load_lavis(path, qformer_heads=4)


def test_a_file_of_another_kind_is_refused(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}}, path)
    with pytest.raises(KeyMapError, match=r"weights\.pth is not a LAVIS checkpoint.*'model'.*state_dict"):
        factory.load_lavis(path, vision=VisionConfig())
    torch.save({"model": {"encoder.weight": torch.zeros(1)}}, path)
    with pytest.raises(KeyMapError, match=r"neither the stage-1 text side .* nor a stage-2 projection"):
        factory.load_lavis(path, vision=VisionConfig())


def test_eva_export_refuses_a_key_bias(tiny_parts, randomize):
    model, _, _ = tiny_model(tiny_parts, randomize, None)
    randomize(model.vision.backbone, 1)
    with pytest.raises(ValueError, match="non-zero key bias"):
        lavis_state_dict(model, include_vision=True)


def test_eva_weights_for_another_depth_are_refused(tiny_parts, randomize, tmp_path):
    model, vision, _ = tiny_model(tiny_parts, randomize, None)
    zero_key_bias(model)
    state = {k: v for k, v in lavis_state_dict(model, include_vision=True).items() if ".blocks.1." not in k}
    with pytest.raises(KeyMapError, match="visual_encoder has 1 blocks, the named encoder 2"):
        factory.load_lavis(write(tmp_path, state), vision=vision, qformer_heads=4)
