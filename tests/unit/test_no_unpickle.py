"""Nothing in the project unpickles: a scan of the source (controlplane, nodeagent, mesh, tools)
with the `ast` module for calls that turn bytes into code-running objects.

Refused: `pickle.load(s)`, `pickle.Unpickler` (also `_pickle`, `cPickle`, and names imported
from them), `torch.load` without `weights_only=True`, `dill`/`cloudpickle`/`jsonpickle` loads,
`marshal.load(s)`, `numpy.load(..., allow_pickle=True)`, `shelve.open`, and `yaml.load` or
`yaml.unsafe_load` with an unsafe loader. Received bytes are read as protobuf, JSON
(mesh/checkpoint/datafmt.py) or raw tensor bytes. A hit fails naming the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCANNED = ("controlplane", "nodeagent", "mesh", "tools")

PICKLES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle"}
BAD_CALLS = {f"{m}.{f}" for m in PICKLES for f in ("load", "loads", "Unpickler")} | {
    "marshal.load", "marshal.loads", "jsonpickle.decode", "jsonpickle.loads", "shelve.open", "yaml.unsafe_load",
    "yaml.unsafe_load_all", "pandas.read_pickle"}
SAFE_YAML_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> the full dotted name it stands for (`import pickle as p`, `from pickle import loads`)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                names[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module:
            for a in node.names:
                names[a.asname or a.name] = f"{node.module}.{a.name}"
    return names


def _resolve(name: str, aliases: dict[str, str]) -> str:
    head, _, rest = name.partition(".")
    full = aliases.get(head, head)
    full = {"numpy": "numpy", "np": "numpy"}.get(full, full)
    return f"{full}.{rest}" if rest else full


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def offences(source: str, filename: str) -> list[str]:
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    out = []

    def hit(node: ast.AST, what: str) -> None:
        out.append(f"{filename}:{node.lineno}: {what}")
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for m in mods:
                if m.split(".")[0] in ("dill", "cloudpickle", "jsonpickle"):
                    hit(node, f"imports {m} (it unpickles)")
            if isinstance(node, ast.ImportFrom) and (node.module or "") in PICKLES | {"marshal"}:
                for a in node.names:
                    if a.name in ("load", "loads", "Unpickler", "*"):
                        hit(node, f"imports {node.module}.{a.name}")
        if not isinstance(node, ast.Call):
            continue
        name = _resolve(_dotted(node.func), aliases)
        if not name:
            continue
        if name in BAD_CALLS:
            hit(node, f"calls {name}")
        elif name.endswith(".Unpickler") or name == "Unpickler":
            hit(node, f"calls {name}")
        elif name == "torch.load" and not _true(_kw(node, "weights_only")):
            hit(node, "calls torch.load without weights_only=True")
        elif name == "numpy.load" and _true(_kw(node, "allow_pickle")):
            hit(node, "calls numpy.load with allow_pickle=True")
        elif name in ("yaml.load", "yaml.load_all"):
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader).split(".")[-1] not in SAFE_YAML_LOADERS:
                hit(node, f"calls {name} without a safe Loader")
    return out


def test_the_scan_finds_each_kind_of_unpickling():
    src = """
import pickle, marshal, torch, yaml
import pickle as pk
from pickle import loads as ld
import numpy as np
pickle.loads(b"")
pk.load(f)
ld(b"")
pickle.Unpickler(f).load()
marshal.loads(b"")
torch.load("x")
torch.load("x", weights_only=False)
torch.load("x", weights_only=True)
np.load("x", allow_pickle=True)
np.load("x")
yaml.load(s)
yaml.load(s, Loader=yaml.SafeLoader)
pickle.dumps(1)
"""
    found = offences(src, "m.py")
    lines = sorted(int(x.split(":")[1]) for x in found)
    assert lines == [4, 6, 7, 8, 9, 10, 11, 12, 14, 16], found


def test_no_source_file_unpickles():
    found = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "__pycache__" in path.parts or path.name.endswith("_pb2.py"):
                continue
            found += offences(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not found, "bytes must never be unpickled (use protobuf, JSON or raw tensor bytes):\n" + "\n".join(found)
