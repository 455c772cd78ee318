"""The semantic response cache: a deterministic request whose prompt means the same as one answered before
(cosine similarity of their all-MiniLM-L6-v2 embeddings at or above a CALIBRATED bound, read from the file
`python -m controlplane.gateway.semcalibrate` writes) gets the earlier answer.

What must match exactly (the scope): tenant, endpoint, model and every other request field (max_tokens,
temperature, seed, stop, ...), and for a chat every message before the last. Only the last user message (the
completion's prompt) is compared by meaning. The index is one numpy matrix per scope, searched by one
matrix-vector product: exact (no approximate index) and fast at the sizes bounded here (1,024 entries x 384
floats is 1.5 MB and a 0.1 ms search); a fleet caching millions of prompts would want an ANN index instead.
Entries are bounded in number, bytes and age, evicted least recently used across scopes."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mesh.config import ConfigError

IGNORED = ("stream", "stream_options", "user")


def load_bound(path: str) -> dict:
    """The calibration file: JSON with at least {"bound": float in (0, 1]}."""
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"semantic_cache_bound_file: cannot read {path!r} ({e.strerror}); write it with "
                          f"`python -m controlplane.gateway.semcalibrate --out {path}`") from None
    except ValueError as e:
        raise ConfigError(f"semantic_cache_bound_file: {path!r} is not JSON ({e})") from None
    b = doc.get("bound") if isinstance(doc, dict) else None
    if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b <= 1 or math.isnan(b):
        raise ConfigError(f"semantic_cache_bound_file: {path!r} has no \"bound\" in (0, 1] (got {b!r})")
    return doc


def _text(content) -> str | None:
    if isinstance(content, str):
        return content
    if isinstance(content, list):          # OpenAI content parts: text only
        parts = []
        for p in content:
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                return None
            parts.append(p["text"])
        return "\n".join(parts)
    return None


def split(tenant: str | None, path: str, body: dict) -> tuple[str, str] | None:
    """(the text compared by meaning, the scope key that must match exactly); None: not eligible (no
    single text prompt, or a last message that is not the user's)."""
    rest = {k: v for k, v in body.items() if k not in IGNORED}
    if "messages" in rest:
        msgs = rest.pop("messages")
        if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict):
            return None
        last = msgs[-1]
        if last.get("role") != "user" or set(last) - {"role", "content"}:
            return None
        text = _text(last.get("content"))
        rest["messages_before"] = msgs[:-1]
    else:
        prompt = rest.pop("prompt", None)
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        text = prompt if isinstance(prompt, str) else None
    if not text or not text.strip():
        return None
    canon = json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    scope = hashlib.sha256(f"{tenant or ''}\x1f{path}\x1f{canon}".encode(errors="surrogatepass")).hexdigest()
    return text, scope


@dataclass
class Entry:
    scope: str
    stored: float
    vec: np.ndarray
    body: bytes
    tokens: int


@dataclass
class Hit:
    similarity: float
    body: bytes
    tokens: int


class _Index:
    """The entries of one scope and their vectors as one matrix (rebuilt after a change)."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.matrix: np.ndarray | None = None

    def add(self, eid: int) -> None:
        self.ids.append(eid)
        self.matrix = None

    def remove(self, eid: int) -> None:
        self.ids.remove(eid)
        self.matrix = None


class SemanticIndex:
    """Vectors and answers per scope, bounded in entries, bytes and age (LRU). `bound`: the similarity at and
    above which a stored answer is served."""

    def __init__(self, bound: float, entries: int, max_bytes: int, ttl: float, clock=time.monotonic) -> None:
        self.bound = bound
        self.max_entries = entries
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.clock = clock
        self.entries: OrderedDict[int, Entry] = OrderedDict()     # LRU order, oldest first
        self.scopes: dict[str, _Index] = {}
        self.bytes = 0
        self._next = 0

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, scope: str, vec: np.ndarray) -> Hit | None:
        idx = self.scopes.get(scope)
        if idx is None:
            return None
        now = self.clock()
        for eid in [e for e in idx.ids if now - self.entries[e].stored > self.ttl]:
            self._drop(eid)
        if not idx.ids:
            return None
        if idx.matrix is None:
            idx.matrix = np.stack([self.entries[e].vec for e in idx.ids])
        sims = idx.matrix @ vec
        best = int(np.argmax(sims))
        sim = float(sims[best])
        if sim < self.bound:
            return None
        eid = idx.ids[best]
        self.entries.move_to_end(eid)
        e = self.entries[eid]
        return Hit(sim, e.body, e.tokens)

    def put(self, scope: str, vec: np.ndarray, body: bytes, tokens: int) -> None:
        size = len(body) + vec.nbytes
        if self.max_entries <= 0 or size > self.max_bytes:
            return
        eid, self._next = self._next, self._next + 1
        self.entries[eid] = Entry(scope, self.clock(), np.asarray(vec, np.float32), body, tokens)
        self.scopes.setdefault(scope, _Index()).add(eid)
        self.bytes += size
        while len(self.entries) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self.entries)))

    def _drop(self, eid: int) -> None:
        e = self.entries.pop(eid)
        self.bytes -= len(e.body) + e.vec.nbytes
        idx = self.scopes[e.scope]
        idx.remove(eid)
        if not idx.ids:
            del self.scopes[e.scope]


@dataclass
class Pending:
    """A miss to be filled with the backend's answer."""
    scope: str
    vec: np.ndarray


class SemanticCache:
    """The request-path face: `lookup` embeds the prompt off the event loop and searches the tenant's scope;
    `put` stores the answer of a miss."""

    def __init__(self, embedder, index: SemanticIndex) -> None:
        self.embedder = embedder          # AsyncEmbedder (or anything with `async embed(text)`)
        self.index = index

    async def lookup(self, tenant: str | None, path: str, body: dict) -> tuple[Hit | None, Pending | None]:
        parts = split(tenant, path, body)
        if parts is None:
            return None, None
        text, scope = parts
        vec = await self.embedder.embed(text)
        if vec is None:                  # the embedder is saturated: skip the cache rather than wait
            return None, None
        return self.index.lookup(scope, vec), Pending(scope, vec)

    def put(self, pending: Pending, body: bytes, tokens: int) -> None:
        self.index.put(pending.scope, pending.vec, body, tokens)


def build(cfg) -> SemanticCache | None:
    """The gateway's semantic cache from its configuration (None when off): loads the embedding model."""
    if not cfg.semantic_cache:
        return None
    from controlplane.gateway.embed import AsyncEmbedder, Embedder
    emb = Embedder(cfg.semantic_cache_model_dir)
    return SemanticCache(AsyncEmbedder(emb, cfg.semantic_cache_max_pending),
                         SemanticIndex(cfg.semantic_bound, cfg.semantic_cache_entries, cfg.semantic_cache_bytes,
                                       cfg.semantic_cache_ttl_seconds))
