"""Initialising the Q-Former from the packaged MiniLM (a BERT): text outputs equal BERT's, query FFN = text FFN."""

import pytest
import torch
from transformers import BertModel

from blip2.config import QFormerConfig
from blip2.models.qformer import QFormer
from blip2.weights.bert import init_qformer_from_bert, load_tokenizer
from blip2.weights.keymap import KeyMapError
from blip2.weights.offline import minilm_dir


def minilm_qformer(num_layers: int = 6) -> QFormer:
    torch.manual_seed(0)
    qformer = QFormer(QFormerConfig(num_layers=num_layers, encoder_width=40, num_query_tokens=4)).eval()
    init_qformer_from_bert(qformer, "minilm")
    return qformer


@pytest.fixture(scope="module")
def bert():
    model = BertModel.from_pretrained(minilm_dir()).eval()
    model.embeddings.token_type_embeddings.weight.data.zero_()  # the Q-Former has no token types
    return model


def test_text_side_equals_bert(bert):
    tokenizer = load_tokenizer("minilm")
    tok = tokenizer(["a red circle on the left", "two squares"], padding=True, return_tensors="pt")
    ours = minilm_qformer()(input_ids=tok.input_ids, text_mask=tok.attention_mask).text
    with torch.no_grad():
        theirs = bert(input_ids=tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
    real = tok.attention_mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-4, atol=1e-4)


def test_query_ffn_copied_and_dec_token_added():
    qformer = minilm_qformer()
    for layer in qformer.layers:
        torch.testing.assert_close(layer.query_ffn.up.weight, layer.text_ffn.up.weight, rtol=0, atol=0)
        assert layer.query_ffn.up.weight.data_ptr() != layer.text_ffn.up.weight.data_ptr()
    tokenizer = load_tokenizer("minilm")
    assert tokenizer.bos_token == "[DEC]" and tokenizer.bos_token_id == 30522 == qformer.cfg.vocab_size - 1


def test_a_shallower_qformer_takes_the_first_layers(bert):
    qformer = minilm_qformer(num_layers=2)
    torch.testing.assert_close(qformer.layers[1].self_attn.query.weight, bert.encoder.layer[1].attention.self.query.weight)
    with pytest.raises(KeyMapError, match="has 6 layers but the Q-Former config asks for 8"):
        minilm_qformer(num_layers=8)
