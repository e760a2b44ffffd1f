"""The LAVIS key map agrees with the transformers one: LAVIS name -> ours -> transformers name is the rename the two
codebases' module trees imply, for every key, so a swapped projection in either table fails here (a round trip
through one table alone cannot see it).

The expectation is written independently of both tables, as string rewrites read off the two module trees:

    LAVIS (lavis/models/blip2_models/Qformer.py, blip2_qformer.py)   transformers (models/blip_2/modeling_blip_2.py)
    Qformer.bert.encoder.layer.{i}.attention.self.{query,key,value}   qformer.encoder.layer.{i}.attention.attention.*
    Qformer.bert.encoder.layer.{i}.crossattention.self.*              qformer.encoder.layer.{i}.crossattention.attention.*
    Qformer.bert.encoder.layer.{i}.<anything else>                    qformer.encoder.layer.{i}.<the same>
    Qformer.bert.embeddings.LayerNorm                                 qformer.layernorm
    Qformer.bert.embeddings.{word,position}_embeddings                embeddings.{word,position}_embeddings (retrieval)
    ln_vision                                                         vision_model.post_layernorm
    vision_proj, text_proj, opt_proj | t5_proj                        vision_projection, text_projection, language_projection
    query_tokens, itm_head                                            the same
    temp, Qformer.cls.* (the ITG head), embeddings.position_ids       (no transformers counterpart)

The transformers side of the expectation is transformers' own module tree: the keys of a freshly built
Blip2ForImageTextRetrieval / Blip2ForConditionalGeneration, not a list written here.
"""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from safetensors.torch import load_file

from blip2.config import LLMConfig, QFormerConfig, VisionConfig
from blip2.factory import load_hf, load_lavis
from blip2.weights.hf import export_hf, hf_key_map
from blip2.weights.lavis import lavis_key_map

RENAMES = [  # (LAVIS prefix pattern, transformers replacement), the first match applies
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.(attention|crossattention)\.self\.", r"qformer.encoder.layer.\1.\2.attention."),
    (r"Qformer\.bert\.encoder\.layer\.(\d+)\.", r"qformer.encoder.layer.\1."),
    (r"Qformer\.bert\.embeddings\.LayerNorm\.", "qformer.layernorm."),
    (r"Qformer\.bert\.embeddings\.(word|position)_embeddings\.", r"embeddings.\1_embeddings."),
    (r"ln_vision\.", "vision_model.post_layernorm."),
    (r"vision_proj\.", "vision_projection."),
    (r"text_proj\.", "text_projection."),
    (r"(opt|t5)_proj\.", "language_projection."),
    (r"(query_tokens$|itm_head\.)", r"\1"),
]
NO_COUNTERPART = re.compile(r"temp$|Qformer\.cls\.|Qformer\.bert\.embeddings\.position_ids$")


def to_transformers(lavis_key: str) -> str | None:
    """The transformers name of a LAVIS key; None for what transformers does not hold."""
    for pattern, replacement in RENAMES:
        if re.match(pattern, lavis_key):
            return re.sub(f"^{pattern}", replacement, lavis_key)
    assert NO_COUNTERPART.match(lavis_key), f"no rule for LAVIS key {lavis_key}"
    return None


INVERSE = [  # transformers prefix pattern -> LAVIS replacement ("{proj}": opt_proj or t5_proj)
    (r"qformer\.encoder\.layer\.(\d+)\.(attention|crossattention)\.attention\.", r"Qformer.bert.encoder.layer.\1.\2.self."),
    (r"qformer\.encoder\.layer\.", "Qformer.bert.encoder.layer."),
    (r"qformer\.layernorm\.", "Qformer.bert.embeddings.LayerNorm."),
    (r"embeddings\.", "Qformer.bert.embeddings."),
    (r"vision_model\.post_layernorm\.", "ln_vision."),
    (r"vision_projection\.", "vision_proj."),
    (r"text_projection\.", "text_proj."),
    (r"language_projection\.", "{proj}."),
    (r"(query_tokens$|itm_head\.)", r"\1"),
]


def to_lavis(transformers_key: str, projection: str | None) -> str:
    """The LAVIS name of a transformers key (the inverse of ``to_transformers``, checked as such)."""
    pattern, replacement = next((p, r) for p, r in INVERSE if re.match(p, transformers_key))
    lavis_key = re.sub(f"^{pattern}", replacement.replace("{proj}", str(projection)), transformers_key)
    assert to_transformers(lavis_key) == transformers_key
    return lavis_key


def transformers_keys(qformer: QFormerConfig, retrieval: bool) -> set[str]:
    """The Q-Former-side keys of a transformers Blip2 model built with this shape (vision tower and LLM left out,
    ``post_layernorm`` kept: it is LAVIS's ln_vision)."""
    config = transformers.Blip2Config(
        vision_config=dict(hidden_size=qformer.encoder_width, intermediate_size=8, num_hidden_layers=1,
                           num_attention_heads=1, image_size=8, patch_size=8),
        qformer_config=dict(vocab_size=qformer.vocab_size, hidden_size=qformer.hidden_size,
                            num_hidden_layers=qformer.num_layers, num_attention_heads=qformer.num_heads,
                            intermediate_size=qformer.intermediate_size,
                            max_position_embeddings=qformer.max_position_embeddings,
                            cross_attention_frequency=qformer.cross_attention_freq, encoder_hidden_size=qformer.encoder_width,
                            use_qformer_text_input=retrieval),
        text_config=None if retrieval else transformers.OPTConfig(vocab_size=8, hidden_size=8, word_embed_proj_dim=8,
                                                                  ffn_dim=8, num_hidden_layers=1,
                                                                  num_attention_heads=1).to_dict(),
        num_query_tokens=qformer.num_query_tokens,
        image_text_hidden_size=qformer.embed_dim,
    )
    cls = transformers.Blip2ForImageTextRetrieval if retrieval else transformers.Blip2ForConditionalGeneration
    with torch.device("meta"):
        keys = set(cls(config).state_dict())
    frozen = ("vision_model.", "language_model.")
    return {k for k in keys if not k.startswith(frozen) or k.startswith("vision_model.post_layernorm.")}


SHAPES = [  # (num_layers, cross_attention_freq): cross-attention on every layer, every other, every third
    (4, 1), (4, 2), (5, 3), (1, 1),
]
STAGES = [(True, None), (False, "opt_proj"), (False, "t5_proj")]


@pytest.mark.parametrize("num_layers, freq", SHAPES)
@pytest.mark.parametrize("stage1, projection", STAGES)
def test_lavis_then_transformers_map_composes_to_the_module_tree_rename(num_layers, freq, stage1, projection):
    """Catches: any two entries of the LAVIS or of the transformers table swapped (query <-> key, value <-> key,
    self- <-> cross-attention, query FFN <-> text FFN, the two projections), an entry missing from either, and
    cross-attention expanded on the wrong layers."""
    qformer = QFormerConfig(hidden_size=16, num_layers=num_layers, num_heads=2, intermediate_size=32, vocab_size=40,
                            max_position_embeddings=20, cross_attention_freq=freq, num_query_tokens=3, encoder_width=24,
                            embed_dim=8, init_from=None)
    lavis = lavis_key_map(qformer, stage1=stage1, projection=projection)  # LAVIS -> ours
    ours_to_transformers = {ours: hf for hf, ours in hf_key_map(qformer, retrieval=stage1, text_ffn=stage1).items()}
    assert len(ours_to_transformers) == len(hf_key_map(qformer, retrieval=stage1, text_ffn=stage1))  # one-to-one

    composed = {key: ours_to_transformers[ours] for key, ours in lavis.items() if ours in ours_to_transformers}
    expected = {key: to_transformers(key) for key in lavis if to_transformers(key) is not None}
    assert composed == expected
    # every LAVIS key outside the composition is one transformers has no place for, and nothing is left over
    assert {key for key in lavis if key not in composed} == {key for key in lavis if NO_COUNTERPART.match(key)}
    assert set(composed.values()) == transformers_keys(qformer, retrieval=stage1)
    cross_layers = {int(m.group(1)) for key in composed.values() if (m := re.search(r"layer\.(\d+)\.crossattention", key))}
    assert cross_layers == set(range(0, num_layers, freq))


# ---- functional: the same tensors by both routes ------------------------------------------------------------------


def lavis_checkpoint(hf_state: dict[str, torch.Tensor], projection: str | None) -> dict:
    """A LAVIS state dict holding transformers' Q-Former tensors under LAVIS names (``to_lavis``), plus what only
    LAVIS has (stage 1: the ITG head, tied as LAVIS ties it, and temp; always: the position_ids buffer)."""
    wanted = [k for k in hf_state if k.startswith("vision_model.post_layernorm.")
              or not k.startswith(("vision_model.", "language_model."))]
    state = {to_lavis(key, projection): hf_state[key].clone() for key in wanted}
    words = state.get("Qformer.bert.embeddings.word_embeddings.weight")
    hidden = state["query_tokens"].shape[-1]
    g = torch.Generator().manual_seed(3)
    if words is not None:  # stage 1
        bias = torch.randn(words.shape[0], generator=g)
        state |= {
            "Qformer.cls.predictions.transform.dense.weight": torch.randn(hidden, hidden, generator=g),
            "Qformer.cls.predictions.transform.dense.bias": torch.randn(hidden, generator=g),
            "Qformer.cls.predictions.transform.LayerNorm.weight": torch.randn(hidden, generator=g),
            "Qformer.cls.predictions.transform.LayerNorm.bias": torch.randn(hidden, generator=g),
            "Qformer.cls.predictions.bias": bias,
            "Qformer.cls.predictions.decoder.weight": words.clone(),
            "Qformer.cls.predictions.decoder.bias": bias.clone(),
            "temp": torch.tensor(0.05),
        }
    state["Qformer.bert.embeddings.position_ids"] = torch.arange(64)[None]
    return state


@pytest.mark.parametrize("text, num_layers, freq", [(None, 3, 2), ("opt", 2, 1), ("t5", 3, 3)])
def test_a_lavis_checkpoint_and_its_transformers_twin_load_and_export_to_the_same_tensors(
    tiny_blip2, tiny_parts, tmp_path, text, num_layers, freq
):
    """A transformers Blip2 directory and the LAVIS checkpoint holding its tensors under LAVIS names: load_hf and
    load_lavis give identical tensors under identical names, and export_hf of the LAVIS-loaded model writes every
    Q-Former tensor back under its transformers name. Catches a swapped or misplaced entry in either table,
    including one that a conversion through the same table and back would undo."""
    directory, hf_model = tiny_blip2(text, num_layers=num_layers, cross_attention_freq=freq, num_query_tokens=5)
    hf_state = hf_model.state_dict()
    projection = None if text is None else ("t5_proj" if text == "t5" else "opt_proj")
    checkpoint = tmp_path / "lavis.pth"
    torch.save({"model": lavis_checkpoint(hf_state, projection)}, checkpoint)

    llm = None if text is None else LLMConfig(kind="hf", path=str(tiny_parts(text)[1]))  # any LLM of that width
    from_lavis = load_lavis(checkpoint, vision=VisionConfig(kind="hf", path=str(directory)), llm=llm, qformer_heads=4)
    from_hf = load_hf(directory)
    ours_lavis, ours_hf = from_lavis.model.state_dict(), from_hf.model.state_dict()
    # everything but the frozen parts, what neither file holds (each starts from our initialisation: the ITG head,
    # and for stage 2 the text embeddings and stage-1 heads) and temp (transformers has none)
    stage1_only = ("qformer.word_embeddings.", "qformer.position_embeddings.", "vision_proj.", "text_proj.", "itm_head.")
    fresh = ("qformer.lm_head.", "temp") + (stage1_only if text else ())
    compared = [k for k in ours_hf if not k.startswith(("vision.backbone.", "llm.") + fresh)]
    assert set(ours_lavis) == set(ours_hf)
    assert sum(".cross_attn.query." in k for k in compared) == 2 * len(range(0, num_layers, freq))
    for key in compared:
        torch.testing.assert_close(ours_lavis[key], ours_hf[key], rtol=0, atol=0, msg=key)

    tokenizer = from_lavis.qformer_tokenizer if text is None else from_lavis.llm_tokenizer.hf
    exported = export_hf(from_lavis.model, tokenizer, from_lavis.preprocess, tmp_path / "exported")
    exported = load_file(exported / "model.safetensors")
    qformer_side = [k for k in hf_state if k.startswith(("qformer.", "query_tokens", "vision_model.post_layernorm",
                                                         "vision_projection", "text_projection", "itm_head",
                                                         "language_projection", "embeddings."))]
    for key in qformer_side:
        torch.testing.assert_close(exported[key], hf_state[key], rtol=0, atol=0, msg=key)
