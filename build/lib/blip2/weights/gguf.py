"""SmolLM2-135M-Instruct from its packaged GGUF file, converted once into a safetensors cache.

transformers reads the Q4_1 GGUF and dequantizes it to float32 (~20 s, plus ~8 s for the
tokenizer); a transformers directory loads in about a second. So the first call converts and
every later call reads the cache:

    cache_dir()/smollm2-135m-instruct/
        model.safetensors          float32 weights (lm_head is tied to embed_tokens: stored once)
        config.json, generation_config.json
        tokenizer.json, tokenizer_config.json, chat_template.jinja
        blip2_cache.json           manifest, written last: source GGUF and every file's size

The directory is built in a temporary sibling and moved into place with one ``os.replace``, so
a crash never leaves a half-written cache, and two processes converting at once both end with
the one that finished first. A cache whose manifest is missing or whose files do not match it
raises ``CorruptCacheError`` naming the directory to delete (it is rebuilt on the next call).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.integrations.gguf.reader import read_gguf_metadata

from blip2.errors import InputError
from blip2.io import write_atomically
from blip2.weights.offline import cache_dir, smollm2_gguf

SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
MANIFEST_NAME = "blip2_cache.json"
CACHE_FORMAT = 1
WEIGHTS_NAME = "model.safetensors"


class CorruptCacheError(InputError):
    """A converted-model cache directory is incomplete, damaged or stale."""


def smollm2_dir() -> Path:
    """A transformers directory holding SmolLM2-135M-Instruct, converting the GGUF on first use."""
    gguf = smollm2_gguf()
    target = cache_dir() / SMOLLM2_CACHE_NAME
    if not target.exists():
        convert_gguf(gguf, target)
    verify_cache(target, gguf)
    return target


def convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize the SmolLM2 GGUF ``gguf`` into the transformers directory ``target`` (atomically)."""
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _repair_tokenizer(tokenizer, gguf, model.config.max_position_embeddings)
    _check_converted(model, tokenizer, gguf)
    write_cache(model, tokenizer, target, gguf)
    return target


def write_cache(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path, source: Path) -> None:
    """Write ``model`` and ``tokenizer`` as a transformers directory at ``target``, all or nothing.

    If another process has put a cache at ``target`` meanwhile, its copy is kept and ours dropped.
    """
    write_atomically(target, lambda folder: _write_files(model, tokenizer, folder, source), replace=False)


def verify_cache(target: Path, source: Path) -> None:
    """Raise ``CorruptCacheError`` unless ``target`` holds a complete cache converted from ``source``."""
    fix = f"delete the directory {target} and run again to rebuild it"
    manifest_path = target / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise CorruptCacheError(f"the converted-model cache {target} has no readable {MANIFEST_NAME} ({error}): {fix}")
    if manifest.get("format") != CACHE_FORMAT:
        raise CorruptCacheError(
            f"{manifest_path} has format {manifest.get('format')!r}, this code writes {CACHE_FORMAT}: {fix}"
        )
    if manifest.get("source") != source.name or manifest.get("source_bytes") != source.stat().st_size:
        raise CorruptCacheError(
            f"{target} was converted from {manifest.get('source')!r} ({manifest.get('source_bytes')} bytes), "
            f"not from the installed {source} ({source.stat().st_size} bytes): {fix}"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or WEIGHTS_NAME not in files:
        raise CorruptCacheError(f"{manifest_path} lists no {WEIGHTS_NAME}: {fix}")
    for name, size in files.items():
        path = target / name
        actual = path.stat().st_size if path.is_file() else None
        if actual != size:
            raise CorruptCacheError(f"{path} should hold {size} bytes but holds {actual}: {fix}")


def _repair_tokenizer(tokenizer: PreTrainedTokenizerBase, gguf: Path, max_length: int) -> None:
    """Fix what transformers' GGUF tokenizer conversion gets wrong for SmolLM2.

    The file names its pre-tokenizer "smollm" (every digit on its own, then GPT-2's split), which
    transformers 5.23 does not know: it falls back to GPT-2's split alone, which differs on runs of
    spaces before digits ("a  3"). It also leaves ``model_max_length`` unbounded.
    """
    pre = _gguf_string(gguf, "tokenizer.ggml.pre")
    if pre != "smollm":
        raise InputError(f"{gguf} declares pre-tokenizer {pre!r}; this converter handles only 'smollm' (SmolLM2)")
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.model_max_length = max_length


def _check_converted(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, gguf: Path) -> None:
    """Refuse to cache a conversion that lost the chat template, the tied head or the special tokens."""
    problems = []
    if not tokenizer.chat_template:
        problems.append("the tokenizer has no chat template")
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        problems.append("lm_head is not tied to embed_tokens")
    if len(tokenizer) != model.config.vocab_size:
        problems.append(f"tokenizer has {len(tokenizer)} tokens, model vocab_size is {model.config.vocab_size}")
    for role in ("bos", "eos"):
        expected = getattr(model.config, f"{role}_token_id")
        actual = getattr(tokenizer, f"{role}_token_id")
        if actual != expected:
            problems.append(f"tokenizer {role}_token_id is {actual}, config says {expected}")
    if problems:
        raise RuntimeError(f"converting {gguf} went wrong: " + "; ".join(problems))


def _write_files(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, source: Path) -> None:
    """Weights, configs and tokenizer into ``folder``, then the manifest that vouches for them."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights we write are plain float tensors
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    save_file(_untied_state_dict(model), folder / WEIGHTS_NAME, metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)
    manifest = {
        "format": CACHE_FORMAT,
        "source": source.name,
        "source_bytes": source.stat().st_size,
        "files": {path.name: path.stat().st_size for path in sorted(folder.iterdir())},
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))


def _untied_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The state dict with each shared tensor kept once (under its first name); loading re-ties it."""
    kept: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        kept[name] = tensor.contiguous()
    return kept


def _gguf_string(gguf: Path, key: str) -> str | None:
    """One string field of a GGUF file's metadata, or None when absent.

    transformers' own header reader (the one ``from_pretrained(gguf_file=)`` uses) takes 0.02 s here;
    ``gguf.GGUFReader`` takes 7 s, as it unpacks the 49k-token vocabulary arrays.
    """
    metadata, _ = read_gguf_metadata(str(gguf))
    return metadata.get(key)
