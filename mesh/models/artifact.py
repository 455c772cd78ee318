"""Model artifacts on disk: where they are, whether a backend can load them, and a Hugging Face
directory's facts. Standard library only (the control plane checks artifacts without the gguf package).

- A GGUF file (llama.cpp) starts with the magic ``GGUF`` and a version (2 or 3, either byte order).
- A Hugging Face-format directory (vLLM) holds ``config.json`` (a JSON object) and weights
  (``*.safetensors`` or ``pytorch_model*.bin``).
"""

from __future__ import annotations

import json
import os
import struct
import urllib.parse
from pathlib import Path

GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
FORMATS = ("gguf", "hf")       # GGUF file, Hugging Face directory
WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")
DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "half": "F16", "float": "F32"}


class ArtifactError(ValueError):
    """The artifact is missing, unreadable or not in the format asked for (the message says which)."""


def resolve(uri: str) -> Path:
    """The local path of an artifact given as a path or a file:// URI (no other scheme)."""
    if not uri:
        raise ArtifactError("is required: a local path or a file:// URI")
    if "://" in uri:
        u = urllib.parse.urlparse(uri)
        if u.scheme != "file":
            raise ArtifactError(f"{uri!r}: scheme {u.scheme!r} is not supported (allowed: a local path, file://)")
        if u.netloc not in ("", "localhost"):
            raise ArtifactError(f"{uri!r}: a file:// URI names no host (file:///path)")
        uri = urllib.parse.unquote(u.path)
    p = Path(uri)
    if not p.is_absolute():
        raise ArtifactError(f"{uri!r} is not an absolute path (every agent host must find it at the same path)")
    return p


def check_gguf(path: Path) -> int:
    """The GGUF version of `path`; ArtifactError when it is missing, unreadable or not GGUF."""
    try:
        if path.is_dir():
            raise ArtifactError(f"{path} is a directory, not a GGUF file")
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise ArtifactError(f"{path} does not exist") from None
    except OSError as e:
        raise ArtifactError(f"{path} cannot be read: {e.strerror}") from None
    if head[:4] != GGUF_MAGIC or len(head) < 8:
        raise ArtifactError(f"{path} is not a GGUF file (it does not start with the magic 'GGUF'; llama.cpp "
                            f"loads GGUF files)")
    little, big = struct.unpack("<I", head[4:8])[0], struct.unpack(">I", head[4:8])[0]
    version = little if little in GGUF_VERSIONS else big
    if version not in GGUF_VERSIONS:
        raise ArtifactError(f"{path}: GGUF version {little} is not supported (allowed: 2, 3)")
    return version


def weight_files(directory: Path) -> list[Path]:
    return sorted({p for g in WEIGHT_GLOBS for p in directory.glob(g) if p.is_file()})


def check_hf_dir(path: Path) -> dict:
    """The parsed config.json of a Hugging Face-format directory; ArtifactError when the directory is
    missing or unreadable, or lacks config.json or weights."""
    if not path.exists():
        raise ArtifactError(f"{path} does not exist")
    if not path.is_dir():
        raise ArtifactError(f"{path} is a file, not a Hugging Face-format directory (vLLM loads a directory "
                            f"with config.json and *.safetensors)")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ArtifactError(f"{path} cannot be read")
    cfg = path / "config.json"
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path} has no config.json (vLLM loads a directory with config.json and "
                            f"*.safetensors)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{cfg} cannot be read as JSON: {e}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{cfg} does not hold a JSON object")
    if not weight_files(path):
        raise ArtifactError(f"{path} has no weights (allowed: {', '.join(WEIGHT_GLOBS)})")
    return data


def size_on_disk(path: Path) -> int:
    """Bytes of a GGUF file, or of a directory's weight files."""
    if path.is_dir():
        return sum(p.stat().st_size for p in weight_files(path))
    return path.stat().st_size


def hf_facts(path: Path) -> dict:
    """What config.json says, in the registry's terms: architecture (name, block_count,
    embedding_length, head_count, head_count_kv, key_length, value_length, vocab_size), max_context,
    quantization (the torch dtype) and weight_bytes (the weight files' size)."""
    cfg = check_hf_dir(path)
    text = {**cfg, **cfg["text_config"]} if isinstance(cfg.get("text_config"), dict) else cfg

    def num(*names) -> int:
        for n in names:
            v = text.get(n)
            if isinstance(v, int) and not isinstance(v, bool):
                return v
        return 0
    arch = text.get("model_type") or (cfg.get("architectures") or [""])[0]
    head_dim = num("head_dim")
    dtype = str(text.get("torch_dtype") or text.get("dtype") or "")
    return {
        "architecture": {"name": str(arch), "block_count": num("num_hidden_layers", "n_layer"),
                         "embedding_length": num("hidden_size", "n_embd"),
                         "head_count": num("num_attention_heads", "n_head"),
                         "head_count_kv": num("num_key_value_heads"), "key_length": head_dim,
                         "value_length": head_dim, "vocab_size": num("vocab_size")},
        "max_context": num("max_position_embeddings", "n_positions"),
        "quantization": DTYPE_NAMES.get(dtype, dtype.upper()),
        "weight_bytes": size_on_disk(path),
    }
