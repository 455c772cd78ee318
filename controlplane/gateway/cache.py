"""Exact-match response cache for deterministic requests (temperature 0, or a fixed seed), scoped per
tenant, bounded in entries, bytes and age (LRU eviction)."""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict

IGNORED = ("stream", "stream_options", "user")


def deterministic(body: dict) -> bool:
    """Temperature 0, or a fixed seed: `seed: -1` asks llama.cpp for a random one (validate.py allows it as
    that), so its answers differ from run to run and are not replayed."""
    t = body.get("temperature", 1.0)
    seed = body.get("seed")
    return t == 0 or (seed is not None and seed >= 0)


def key(tenant: str | None, path: str, body: dict) -> str:
    canon = {k: v for k, v in body.items() if k not in IGNORED}
    text = json.dumps(canon, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(f"{tenant or ''}\x1f{path}\x1f{text}".encode(errors="surrogatepass")).hexdigest()


class ResponseCache:
    def __init__(self, entries: int, max_bytes: int, ttl: float, clock=time.monotonic) -> None:
        self.max_entries = entries
        self.max_bytes = max_bytes
        self.ttl = ttl
        self.clock = clock
        self.items: OrderedDict[str, tuple[float, bytes, int]] = OrderedDict()   # key -> (stored, body, tokens)
        self.bytes = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0 and self.max_bytes > 0 and self.ttl > 0

    def get(self, k: str) -> tuple[bytes, int] | None:
        hit = self.items.get(k)
        if hit is None:
            return None
        stored, body, tokens = hit
        if self.clock() - stored > self.ttl:
            self._drop(k)
            return None
        self.items.move_to_end(k)
        return body, tokens

    def put(self, k: str, body: bytes, tokens: int) -> None:
        if not self.enabled or len(body) > self.max_bytes:
            return
        if k in self.items:
            self._drop(k)
        self.items[k] = (self.clock(), body, tokens)
        self.bytes += len(body)
        while len(self.items) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self.items)))

    def _drop(self, k: str) -> None:
        _, body, _ = self.items.pop(k)
        self.bytes -= len(body)
