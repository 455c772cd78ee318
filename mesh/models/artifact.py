"""Model artifacts on disk: where they are, whether a backend can load them, and a Hugging Face
directory's facts. Standard library only (the control plane checks artifacts without the gguf package).

- A GGUF file (llama.cpp) starts with the magic ``GGUF`` and a version (2 or 3, either byte order).
- A Hugging Face-format directory (vLLM) holds ``config.json`` (a JSON object) and weights
  (``*.safetensors`` or ``pytorch_model*.bin``).

Anything else (a FIFO, a device, a socket), as the artifact or inside its directory, is refused by its
type (`check_kind`, a stat) before anything is opened: opening a FIFO for reading waits for a writer, for
ever, and a device's open or read may never end either. What is read is opened with O_NONBLOCK and checked
again on the open file (`open_regular`), so a FIFO put in place after the stat cannot block the reader.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import struct
import urllib.parse
from pathlib import Path

from mesh.models.digest import walk

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


WHAT_A_MODEL_IS = "a model is a regular file (GGUF) or a directory (Hugging Face layout)"
KIND_NAMES = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
              (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def kind_name(mode: int) -> str:
    """What a file of `mode` is, in words ("a FIFO", "a character device", ...)."""
    return next((name for test, name in KIND_NAMES if test(mode)), f"a file of type {stat.S_IFMT(mode):o}")


def check_kind(path: Path) -> os.stat_result:
    """The status of `path` (a symbolic link followed) when it is a regular file or a directory; ArtifactError
    naming what it is otherwise (or that it is missing or unreadable). It stats, never opens."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ArtifactError(f"{path} does not exist") from None
    except OSError as e:
        raise ArtifactError(f"{path} cannot be read: {e.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        raise ArtifactError(f"{path} is {kind_name(st.st_mode)}; {WHAT_A_MODEL_IS}")
    return st


def open_regular(path: Path):
    """`path` open for binary reading, when it is a regular file (ArtifactError naming what it is otherwise).
    Opened with O_NONBLOCK (a FIFO's open returns at once instead of waiting for a writer; a regular file reads
    as ever) and checked on the open file, so a FIFO swapped in after a `check_kind` is refused too."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ArtifactError(f"{path} is {kind_name(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_gguf(path: Path) -> int:
    """The GGUF version of `path`; ArtifactError when it is missing, unreadable, not a regular file or not
    GGUF."""
    try:
        if stat.S_ISDIR(check_kind(path).st_mode):
            raise ArtifactError(f"{path} is a directory, not a GGUF file")
        with open_regular(path) as f:
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


def special_file(directory: Path) -> tuple[Path, int] | None:
    """The first file below `directory` (links followed, hidden names left out, as the digest walks it:
    mesh/models/digest.py) that is neither a regular file nor a directory, with its mode; None when there is
    none. ArtifactError naming the file when it cannot be looked at, or when it is a link that resolves to
    nothing (dangling, or in a loop `a -> a`): a Hugging Face directory with a broken link is an incomplete one
    (the snapshot links of an interrupted `huggingface-cli download` point at blobs that never arrived), and
    vLLM fails on it only when a replica loads it."""
    for root, _dirs, files in walk(directory):
        for name in sorted(files):
            p = Path(root) / name
            try:
                mode = os.stat(p).st_mode
            except (FileNotFoundError, NotADirectoryError):
                if not os.path.islink(p):
                    continue            # removed while the walk ran: no file, as the digest sees it
                raise ArtifactError(f"{p} is a link to {os.readlink(p)!r}, which does not exist; a Hugging Face "
                                    f"directory holds no broken links (an interrupted download? fetch it again "
                                    f"or remove the link)") from None
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise ArtifactError(f"{p} is a link in a loop (it resolves to itself); a Hugging Face "
                                        f"directory holds no broken links") from None
                raise ArtifactError(f"{p} cannot be read: {e.strerror}") from None
            if not stat.S_ISREG(mode):
                return p, mode
    return None


def check_hf_dir(path: Path) -> dict:
    """The parsed config.json of a Hugging Face-format directory; ArtifactError when the directory is
    missing or unreadable, holds anything but regular files and directories, or lacks config.json or
    weights."""
    if not stat.S_ISDIR(check_kind(path).st_mode):
        raise ArtifactError(f"{path} is a file, not a Hugging Face-format directory (vLLM loads a directory "
                            f"with config.json and *.safetensors)")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ArtifactError(f"{path} cannot be read")
    odd = special_file(path)
    if odd is not None:
        raise ArtifactError(f"{odd[0]} is {kind_name(odd[1])}; a Hugging Face directory holds regular files "
                            f"(and directories) only")
    cfg = path / "config.json"
    try:
        with open_regular(cfg) as f:
            data = json.loads(f.read().decode("utf-8"))
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
