"""Text to token ids: the LLM tokenizer's special-token policy (pad, BOS/EOS, padding side), user text that never
becomes control tokens, and the collate functions of both training stages."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import numbered_tokenizer
from tiny import WORDS, real_like_tokenizer, tiny_pipeline

from blip2.data.collate import Stage2Collate
from blip2.data.text import IGNORE, LLMTokenizer, qformer_ids
from blip2.errors import InputError
from blip2.infer.embeddings import check_text_lengths, qformer_lengths

FAMILIES = ("opt", "llama", "t5")


def tokenizer(family: str) -> LLMTokenizer:
    return LLMTokenizer(real_like_tokenizer(family), family == "t5")


def test_special_token_ids_per_family():
    opt, llama, t5 = (tokenizer(family) for family in FAMILIES)
    assert (opt.bos_token_id, opt.eos_token_id, opt.pad_token_id) == (1, 1, 0)
    # Llama has no pad token: it pads with EOS
    assert (llama.bos_token_id, llama.eos_token_id, llama.pad_token_id) == (1, 2, 2)
    assert (t5.bos_token_id, t5.eos_token_id, t5.pad_token_id) == (None, 1, 0)


def test_tokenizer_without_pad_or_eos_is_refused():
    hf = real_like_tokenizer("llama")
    hf.eos_token = None
    with pytest.raises(ValueError, match="neither a pad nor an EOS"):
        LLMTokenizer(hf, is_encoder_decoder=False)


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_tokenize_puts_exactly_one_bos_first_and_pads_right(family):
    llm = tokenizer(family)
    word = {w: llm.hf.convert_tokens_to_ids(w) for w in WORDS}
    bos, pad = llm.bos_token_id, llm.pad_token_id
    input_ids, mask = llm.tokenize(["a photo of cat", "dog"], max_len=16, add_bos=True)
    # the tokenizer would prepend its own BOS too; tokenize must not double it
    assert input_ids.tolist() == [
        [bos, word["a"], word["photo"], word["of"], word["cat"]],
        [bos, word["dog"], pad, pad, pad],
    ]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert input_ids.dtype == mask.dtype == torch.long


def test_tokenize_eos_left_padding_and_truncation():
    llm = tokenizer("llama")
    word = {w: llm.hf.convert_tokens_to_ids(w) for w in WORDS}
    bos, eos, pad = llm.bos_token_id, llm.eos_token_id, llm.pad_token_id
    input_ids, mask = llm.tokenize(["a photo of cat", "dog"], max_len=4, add_bos=True, add_eos=True, pad_left=True)
    # truncation cuts the text, never the BOS/EOS around it
    assert input_ids.tolist() == [[bos, word["a"], word["photo"], eos], [pad, bos, word["dog"], eos]]
    assert mask.tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]


def test_tokenize_for_t5_appends_eos_and_has_no_bos():
    llm = tokenizer("t5")
    input_ids, mask = llm.tokenize(["what color"], max_len=8, add_bos=False, add_eos=True)
    ids = llm.hf.convert_tokens_to_ids(["what", "color"])
    assert input_ids.tolist() == [ids + [llm.eos_token_id]]
    with pytest.raises(ValueError, match="no BOS token"):
        llm.tokenize(["what color"], max_len=8, add_bos=True)


def test_tokenize_rejects_a_bare_string_and_a_max_len_without_room():
    llm = tokenizer("opt")
    with pytest.raises(TypeError, match="list of texts"):
        llm.tokenize("a cat", max_len=8, add_bos=True)
    with pytest.raises(ValueError, match="max_len=2"):
        llm.tokenize(["a cat"], max_len=2, add_bos=True, add_eos=True)


def test_stage2_labels_cover_the_target_text_only():
    llm = LLMTokenizer(numbered_tokenizer(), is_encoder_decoder=False)
    items = [{"image": torch.zeros(2), "image_id": "a", "text": "w1 w2 w3"},
             {"image": torch.zeros(2), "image_id": "b", "question": "w4 w5", "answers": ["w6"]}]
    batch = Stage2Collate(llm, 32)(items)
    tok = llm.hf
    caption_labels = [t for t in batch["labels"][0].tolist() if t != IGNORE]
    assert tok.decode(caption_labels[:-1]).split() == ["w1", "w2", "w3"] and caption_labels[-1] == llm.eos_token_id
    answer_labels = [t for t in batch["labels"][1].tolist() if t != IGNORE]
    assert tok.decode(answer_labels[:-1]).split() == ["w6"]  # the question ("Question: ... Answer:") is not a target
    assert batch["input_ids"][1, 0] == llm.bos_token_id
    assert batch["attention_mask"][0].sum() == 1 + 3 + 1  # BOS, three words, EOS; then padding


def test_q_former_texts_cut_in_one_thread_are_not_cut_in_another():
    """transformers keeps a call's truncation on the tokenizer every thread shares: while one thread cuts texts to 16
    tokens (``qformer_ids``), another's length check must still see the whole text (and refuse it)."""
    pipe = tiny_pipeline(None)
    long = " ".join(["a red square on the left"] * 30)  # ~150 tokens, over the 64 positions
    cut, refused = [], []

    def cutting() -> None:
        for _ in range(400):
            ids, _ = qformer_ids(pipe.qformer_tokenizer, [long], max_len=16)
            cut.append(ids.shape[1])

    def checking() -> None:
        for _ in range(400):
            try:
                check_text_lengths(pipe, [long])
            except InputError:
                refused.append(True)

    threads = [threading.Thread(target=work) for work in (cutting, checking, cutting, checking)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert cut == [16] * 800 and len(refused) == 800


def test_q_former_lengths_count_typed_markers_as_the_text_they_are():
    """``/v1/embeddings`` reports this count: a typed "[SEP]" is text there, as in the embedding ([CLS] [ sep ] [SEP],
    not [CLS] [SEP] [SEP])."""
    pipe = tiny_pipeline(None)
    (ids,), _ = qformer_ids(pipe.qformer_tokenizer, ["[SEP]"], max_len=32)
    assert qformer_lengths(pipe, ["[SEP]", "a red square"]) == [len(ids), 5] and len(ids) > 3
