"""A listed recommendation's identity, and whether it still holds: `meshctl recommend --apply` carries out
exactly the recommendations it listed (RecommendRequest.ids), never one the control plane computes in their
place after the fleet changed. No I/O, like mesh/cost/recommend.py.

An id names the kind and what the recommendation acts on, and what it would make of it:

    resize:<slice>:<MIG profile | memory bytes>
    idle-replica:<deployment>/<replica>
    idle-warm:<slice>
    share-mps:<deployment>/<replica>+<deployment>/<replica>
    pack:<node>/<gpu>:<slice>@<workload>><node>/<gpu>,...     (the GPU it frees; each slice's move)

A pack still holds while its GPU holds exactly the listed slices, running the listed workloads, and each
receiving GPU (same model and sharing) has room for what moves to it: the greedy packing computed now may
differ (it did: after one pack the first one computed was another GPU's), but the listed one is checked, not
recomputed. The other kinds hold while the recommendation computed now has the same id.
"""

from __future__ import annotations

import re

from mesh.cost import recommend as R

MAX_ID = 16384                   # characters (a pack of many slices)
MAX_IDS = 1000                   # in one request
_T = r"[A-Za-z0-9][A-Za-z0-9._+-]*"
_MOVE = rf"({_T})@({_T})?>({_T})/(\d+)"
_FORMS = {
    "resize": re.compile(rf"({_T}):({_T})"),
    "idle-replica": re.compile(rf"({_T})/({_T})"),
    "idle-warm": re.compile(rf"({_T})"),
    "share-mps": re.compile(rf"({_T})/({_T})\+({_T})/({_T})"),
    "pack": re.compile(rf"({_T})/(\d+):({_MOVE}(,{_MOVE})*)"),
}
_GONE = {
    "resize": "the slice is gone or resized, or its measured peak needs all of it",
    "idle-replica": "the replica is gone, served a request, or is its deployment's last READY one",
    "idle-warm": "the slice was claimed or released",
    "share-mps": "one of the replicas is gone, or they no longer fit one GPU together",
}


class Changed(Exception):
    """The named recommendation no longer holds; the message says what changed."""


def identity(r: R.Rec) -> str:
    if r.kind == "resize":
        return f"resize:{r.slice_id}:{r.profile or r.memory_bytes}"
    if r.kind == "idle-replica":
        return f"idle-replica:{r.deployment}/{r.replica}"
    if r.kind == "idle-warm":
        return f"idle-warm:{r.slice_id}"
    if r.kind == "share-mps":
        return f"share-mps:{r.deployment}/{r.replica}+{r.target}"
    if r.kind == "pack":
        return f"pack:{r.node}/{r.gpu_index}:" + ",".join(f"{s}@{w}>{n}/{i}" for s, w, n, i in r.moves)
    raise ValueError(f"kind: {r.kind!r} is not one of {', '.join(R.KINDS)}")


def kind_of(rid: str) -> str:
    """The kind an id names; ValueError saying why when it is not an id."""
    if not rid or len(rid) > MAX_ID:
        raise ValueError(f"{rid[:80]!r} is {'empty' if not rid else f'longer than {MAX_ID} characters'}")
    kind, _, rest = rid.partition(":")
    form = _FORMS.get(kind)
    if form is None:
        raise ValueError(f"{rid[:80]!r} does not start with a kind ({', '.join(R.KINDS)}) and a colon")
    if not form.fullmatch(rest):
        raise ValueError(f"{rid[:80]!r} is not a {kind} recommendation's id")
    return kind


def describe(rid: str) -> str:
    """What an id is about, in words ("pack of GPU n1/0", "resize of slice s-1")."""
    kind, _, rest = rid.partition(":")
    if kind == "pack":
        return f"pack of GPU {rest.partition(':')[0]}"
    if kind in ("resize", "idle-warm"):
        return f"{kind} of slice {rest.partition(':')[0]}"
    return f"{kind} of {rest.partition('+')[0]}"


def _subject(rid: str) -> str:
    """The id without what the recommendation would make of it (a resize's target, share-mps's partner)."""
    kind = rid.partition(":")[0]
    return rid.rpartition(":")[0] if kind == "resize" else rid.partition("+")[0]


def find(rid: str, now: list[R.Rec]) -> R.Rec:
    """The recommendation `rid` names among those computed now (not a pack); Changed naming what changed."""
    for r in now:
        if identity(r) == rid:
            return r
    same = next((r for r in now if _subject(identity(r)) == _subject(rid)), None)
    if same is not None:
        listed = rid.rpartition(":")[2] if rid.startswith("resize:") else rid.partition("+")[2]
        if listed.isdigit():
            listed = R.gib(int(listed))
        raise Changed(f"{describe(rid)} no longer holds as listed: it would now {same.action} (listed: {listed})")
    raise Changed(f"{describe(rid)} no longer holds: it is not recommended now "
                  f"({_GONE[rid.partition(':')[0]]})")


def parse_pack(rid: str) -> tuple[str, int, list[tuple[str, str, str, int]]]:
    m = _FORMS["pack"].fullmatch(rid.partition(":")[2])
    if not rid.startswith("pack:") or m is None:
        raise ValueError(f"{rid[:80]!r} is not a pack recommendation's id")
    moves = []
    for part in m.group(3).split(","):
        mv = re.fullmatch(_MOVE, part)
        moves.append((mv.group(1), mv.group(2) or "", mv.group(3), int(mv.group(4))))
    return m.group(1), int(m.group(2)), moves


def check_pack(rid: str, gpus: list[R.GpuFacts]) -> R.Rec:
    """The pack `rid` names, if it still holds on the GPUs as they are now; Changed naming what changed."""
    node, index, moves = parse_pack(rid)

    def changed(what: str) -> Changed:
        return Changed(f"pack of GPU {node}/{index} no longer holds: {what}")
    by = {(g.node, g.index): g for g in gpus}
    g = by.get((node, index))
    if g is None or not g.slices:
        raise changed(f"GPU {node}/{index} {'is gone' if g is None else 'holds no slices now'}")
    held = {sid: (mem, wid) for sid, mem, wid in g.slices}
    listed = [m[0] for m in moves]
    gone = [s for s in listed if s not in held]
    if gone:
        raise changed(f"slice(s) {', '.join(gone)} are no longer on GPU {node}/{index}")
    extra = sorted(s for s in held if s not in listed)
    if extra:
        raise changed(f"GPU {node}/{index} now also holds slice(s) {', '.join(extra)}: moving the listed ones "
                      f"would not free it")
    need: dict[tuple[str, int], int] = {}
    for sid, wid, to_node, to_index in moves:
        if held[sid][1] != wid:
            raise changed(f"slice {sid} runs {held[sid][1] or 'no workload a migration moves'} now "
                          f"(listed: {wid or 'none'})")
        need[(to_node, to_index)] = need.get((to_node, to_index), 0) + held[sid][0]
    for (to_node, to_index), b in need.items():
        t = by.get((to_node, to_index))
        if t is None or (to_node, to_index) == (node, index):
            raise changed(f"GPU {to_node}/{to_index} is {'gone' if t is None else 'the one it frees'}")
        if (t.gpu_model, t.isolation) != (g.gpu_model, g.isolation):
            raise changed(f"GPU {to_node}/{to_index} is a {t.isolation or 'free'} {t.gpu_model} now (listed: "
                          f"{g.isolation} {g.gpu_model})")
        free = t.memory_bytes - t.allocated_bytes
        if free < b:
            raise changed(f"GPU {to_node}/{to_index} has {R.gib(free)} free now; the listed moves need "
                          f"{R.gib(b)}")
    return R.pack_rec(g, moves)
