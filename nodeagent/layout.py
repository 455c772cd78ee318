"""MIG mode and declared MIG layouts, in the spirit of NVIDIA mig-parted.

A node may declare a fixed MIG layout per GPU (`mig_layout` in the agent's
config): a named layout for every MIG-capable GPU (``all-1g.10gb``,
``balanced``, ``all-disabled``, ...), or a YAML file with one per GPU index::

    version: v1
    gpus:
      "0": all-1g.10gb
      "1,2": balanced
      "3": [3g.40gb@0, 2g.20gb@4, 1g.10gb@6]
      "*": all-disabled          # every other MIG-capable GPU (optional)

The agent asserts the layout at start and applies it only when the assert
fails (destroy the instances that differ, create the missing ones); MIG slices
are then realized only on the declared instances. Without a declared layout
MIG layouts are dynamic, driven by slices. MIG mode (`mig_mode`, or the mode a
declared layout implies) is asked of NVML and never forced by a GPU reset: a
mode that needs one is reported as pending (NodeEvent "MigModePending").
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import yaml

from mesh import gpumodels
from mesh.gpumodels import GpuModel, Placement, placement_conflict
from nodeagent.gpu import GpuError, MigInstance, NvmlGpus

logger = logging.getLogger(__name__)
LABEL = "gpumesh.io/mig-layout"
MODES = ("keep", "enable", "disable")
DISABLED = "all-disabled"


class LayoutError(ValueError):
    """A declared layout or MIG mode setting is invalid (names the setting and the allowed values)."""


@dataclass(frozen=True)
class GpuLayout:
    """The wanted MIG state of one GPU: mode, and (when enabled) exactly these instances."""

    name: str
    mig_enabled: bool
    placements: tuple[Placement, ...] = ()

    def text(self) -> str:
        if not self.mig_enabled:
            return "disabled"
        return ",".join(f"{p}@{s}" for p, s in self.placements)


# -- named layouts ---------------------------------------------------------------------

def _fill(model: GpuModel, profile: str) -> tuple[Placement, ...]:
    out: list[Placement] = []
    for s in model.profile(profile).starts:
        if placement_conflict(model, out, profile, s) is None:
            out.append((profile, s))
    return tuple(out)


def _by_shape(model: GpuModel, compute: int, memory: int) -> str:
    return next(p.name for p in model.mig_profiles
                if p.compute_slices == compute and p.memory_slices == memory and not p.media_extensions)


def _balanced(model: GpuModel) -> tuple[Placement, ...]:
    """mig-parted's all-balanced: one 3g (4 memory slots), one 2g, two 1g; uses all 7 compute slices."""
    g3, g2, g1 = _by_shape(model, 3, 4), _by_shape(model, 2, 2), _by_shape(model, 1, 1)
    return ((g2, 0), (g1, 2), (g1, 3), (g3, 4))


def named_layouts(model: GpuModel) -> dict[str, GpuLayout]:
    """Every named layout of `model`: all-disabled, all-<profile> (as many instances of the profile
    as fit), balanced (alias all-balanced). Empty for models without MIG."""
    if not model.mig_capable:
        return {}
    out = {DISABLED: GpuLayout(DISABLED, False)}
    for p in model.mig_profiles:
        name = f"all-{p.name}"
        out[name] = GpuLayout(name, True, _fill(model, p.name))
    bal = _balanced(model)
    out["balanced"] = GpuLayout("balanced", True, bal)
    out["all-balanced"] = GpuLayout("all-balanced", True, bal)
    return out


def parse_placements(model: GpuModel, items: list, where: str) -> GpuLayout:
    """`["3g.40gb@0", "2g.20gb@4"]` -> a validated GpuLayout (each placement legal beside the others)."""
    out: list[Placement] = []
    for item in items:
        profile, sep, start = str(item).partition("@")
        if not sep or not start.strip().isdigit():
            raise LayoutError(f"{where}: {item!r} is not PROFILE@START (e.g. {model.mig_profiles[0].name}@0)")
        try:
            why = placement_conflict(model, out, profile.strip(), int(start))
        except KeyError as e:
            raise LayoutError(f"{where}: {e.args[0]}") from None
        if why:
            raise LayoutError(f"{where}: {item}: {why}")
        out.append((profile.strip(), int(start)))
    return GpuLayout("custom", True, tuple(sorted(out, key=lambda x: x[1])))


def resolve_one(model: GpuModel, spec, where: str) -> GpuLayout:
    if isinstance(spec, list):
        return parse_placements(model, spec, where)
    names = named_layouts(model)
    if str(spec) not in names:
        raise LayoutError(f"{where}: unknown layout {spec!r} for {model.name} "
                          f"(allowed: {', '.join(names)}, or a list of PROFILE@START)")
    return names[str(spec)]


def _indexes(key: str, where: str) -> list[int] | None:
    if key.strip() in ("*", "default", "all"):
        return None
    out = []
    for part in key.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise LayoutError(f"{where}: GPU key {key!r} is not an index list like 0,2-3 or '*'")
        out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    return out


def load_declaration(value: str) -> dict:
    """The `mig_layout` setting as {gpu key: spec}: a layout name for every GPU, or a YAML file."""
    if not value:
        return {}
    if not (os.sep in value or value.endswith((".yaml", ".yml"))):
        return {"*": value}
    try:
        with open(value, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
    except OSError as e:
        raise LayoutError(f"mig_layout: cannot read {value}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise LayoutError(f"mig_layout: {value} is not valid YAML: {e}") from None
    if not isinstance(doc, dict) or set(doc) - {"version", "gpus"} or not isinstance(doc.get("gpus"), dict):
        raise LayoutError(f"mig_layout: {value}: expected a mapping with `version: v1` and `gpus:` "
                          f"(GPU index keys -> layout name or list of PROFILE@START)")
    if doc.get("version", "v1") != "v1":
        raise LayoutError(f"mig_layout: {value}: version {doc['version']!r} (allowed: v1)")
    return {str(k): v for k, v in doc["gpus"].items()}


def parse_modes(value: str) -> dict:
    """`mig_mode`: keep | enable | disable for every GPU, or INDEXES=MODE pairs (`0-3=enable,4=disable`)."""
    value = (value or "keep").strip()
    if "=" not in value:
        if value not in MODES:
            raise LayoutError(f"mig_mode: {value!r} is not allowed (allowed: {', '.join(MODES)}, "
                              f"or INDEXES=MODE pairs like 0-3=enable,4=disable)")
        return {"*": value}
    out = {}
    for pair in _split_pairs(value):
        key, _, mode = pair.partition("=")
        _indexes(key, "mig_mode")
        if mode.strip() not in MODES:
            raise LayoutError(f"mig_mode: {pair!r}: mode {mode!r} is not allowed (allowed: {', '.join(MODES)})")
        out[key.strip()] = mode.strip()
    return out


def _split_pairs(value: str) -> list[str]:
    """`0-1,3=enable,4=disable` -> ["0-1,3=enable", "4=disable"] (commas also separate indexes)."""
    pairs, cur = [], []
    for part in value.split(","):
        cur.append(part)
        if "=" in part:
            pairs.append(",".join(cur).strip())
            cur = []
    if cur:
        raise LayoutError(f"mig_mode: {','.join(cur)!r} has no =MODE")
    return pairs


def _per_index(table: dict, indexes: list[int], capable: list[int], where: str) -> dict[int, object]:
    """{GPU index: spec}: explicit keys must name MIG-capable GPUs; a `*` default covers the
    other MIG-capable GPUs (GPUs without MIG are left out)."""
    out, default = {}, None
    for key, spec in table.items():
        idx = _indexes(key, where)
        if idx is None:
            default = spec
            continue
        for i in idx:
            if i not in indexes:
                raise LayoutError(f"{where}: GPU {i} does not exist (GPUs: {', '.join(map(str, indexes))})")
            if i not in capable:
                raise LayoutError(f"{where}: GPU {i} is not MIG-capable")
            out[i] = spec
    if default is not None:
        for i in capable:
            out.setdefault(i, default)
    return out


# -- the plan for one node --------------------------------------------------------------

@dataclass
class MigPlan:
    """What the node should look like: a MIG mode per GPU ("keep" entries are left out) and a
    declared layout per GPU (GPUs without one are dynamic)."""

    modes: dict[int, bool] = field(default_factory=dict)
    layouts: dict[int, GpuLayout] = field(default_factory=dict)
    declared_by: str = ""

    @classmethod
    def build(cls, models: dict[int, GpuModel | None], mig_mode: str = "keep", mig_layout: str = "") -> "MigPlan":
        indexes = sorted(models)
        capable = [i for i in indexes if models[i] is not None and models[i].mig_capable]
        plan = cls(declared_by=mig_layout)
        for i, spec in _per_index(load_declaration(mig_layout), indexes, capable, "mig_layout").items():
            plan.layouts[i] = resolve_one(models[i], spec, f"mig_layout (GPU {i})")
        for i, mode in _per_index(parse_modes(mig_mode), indexes, capable, "mig_mode").items():
            if mode == "keep":
                continue
            want = mode == "enable"
            if i in plan.layouts and plan.layouts[i].mig_enabled != want:
                raise LayoutError(f"mig_mode: GPU {i} set to {mode} but its declared layout "
                                  f"{plan.layouts[i].name} needs MIG {'enabled' if not want else 'disabled'}")
            plan.modes[i] = want
        for i, lay in plan.layouts.items():
            plan.modes[i] = lay.mig_enabled
        return plan

    def labels(self) -> dict[str, str]:
        """Inventory labels: the declared layout's name (or `custom` / per GPU) and each GPU's instances."""
        if not self.layouts:
            return {}
        names = {lay.name for lay in self.layouts.values()}
        out = {LABEL: names.pop() if len(names) == 1 else
               ",".join(f"{i}={lay.name}" for i, lay in sorted(self.layouts.items()))}
        for i, lay in sorted(self.layouts.items()):
            out[f"{LABEL}.gpu{i}"] = lay.text()
        return out

    def declared(self, index: int) -> GpuLayout | None:
        return self.layouts.get(index)


@dataclass
class LayoutResult:
    index: int
    changed: bool = False
    pending: bool = False
    destroyed: list[Placement] = field(default_factory=list)
    created: list[Placement] = field(default_factory=list)
    error: str = ""


def diff(instances: list[MigInstance], want: GpuLayout) -> tuple[list[MigInstance], list[Placement]]:
    """(instances that differ from the declared layout, declared placements that are missing)."""
    wanted = set(want.placements) if want.mig_enabled else set()
    have = {(i.profile, i.start) for i in instances if i.ci_id is not None}
    extra = [i for i in instances if (i.profile, i.start) not in wanted or i.ci_id is None]
    missing = sorted(wanted - have, key=lambda x: x[1])
    return extra, missing


def assert_layout(gpus: NvmlGpus, index: int, want: GpuLayout) -> list[str]:
    """The differences between GPU `index` and its declared layout; empty when it matches."""
    mode = gpus.mig_mode(index)
    if mode.current != want.mig_enabled:
        return [f"MIG mode is {'enabled' if mode.current else 'disabled'}, "
                f"want {'enabled' if want.mig_enabled else 'disabled'}"]
    if not want.mig_enabled:
        return []
    extra, missing = diff(gpus.mig_instances(index), want)
    return ([f"unexpected {i.profile}@{i.start}" for i in extra] +
            [f"missing {p}@{s}" for p, s in missing])


def apply_layout(gpus: NvmlGpus, index: int, want: GpuLayout) -> LayoutResult:
    """Assert, then apply only on mismatch: MIG mode first (never a reset: a mode that needs
    one is left pending), then destroy the instances that differ and create the missing ones."""
    res = LayoutResult(index)
    try:
        if not assert_layout(gpus, index, want):
            return res
        res.changed = True
        mode = gpus.mig_mode(index)
        if mode.current != want.mig_enabled:
            if mode.pending != want.mig_enabled:
                if not want.mig_enabled:
                    for inst in gpus.mig_instances(index):
                        gpus.destroy_mig(index, inst.gi_id)
                mode = gpus.set_mig_mode(index, want.mig_enabled)
            if mode.current != want.mig_enabled:
                res.pending = True
                return res
        if not want.mig_enabled:
            return res
        extra, missing = diff(gpus.mig_instances(index), want)
        for inst in extra:
            gpus.destroy_mig(index, inst.gi_id)
            res.destroyed.append((inst.profile, inst.start))
        for profile, start in missing:
            gpus.create_mig(index, profile, start)
            res.created.append((profile, start))
    except GpuError as e:
        res.error = str(e)
    return res


def model_table() -> dict[str, list[str]]:
    """Layout names per MIG-capable model (for docs and error messages)."""
    return {m.name: list(named_layouts(m)) for m in gpumodels.MODELS.values() if m.mig_capable}


class NodeMig:
    """The agent's MIG-mode and declared-layout component.

    At start (NVML up, before the first connection) it builds the plan from the settings, asks
    NVML for the wanted MIG modes, asserts declared layouts and applies them where the assert
    fails. It never resets a GPU: a mode that needs a reset stays pending, and every Sync stream
    that opens while it is pending gets a "MigModePending" NodeEvent (the inventory's
    `mig_pending` says the same). A declared layout that could not be applied is reported as
    "MigLayoutNotApplied"; MIG slices are then refused on that GPU until it is.
    """

    def __init__(self, agent, mig_mode: str = "keep", mig_layout: str = "") -> None:
        self.agent = agent
        self.mig_mode = mig_mode
        self.mig_layout = mig_layout
        self.plan: MigPlan | None = None
        self.events: list = []       # one-time events waiting for a stream

    def install(self) -> "NodeMig":
        self.agent.start_hooks.append(self.start)
        self.agent.session_hooks.append(self.on_session)
        return self

    def start(self) -> None:
        gpus: NvmlGpus = self.agent.gpus
        gpus.inventory()                       # learn the models
        self.plan = MigPlan.build(gpus.models, self.mig_mode, self.mig_layout)
        self.agent.slicer.layout = self.plan if self.plan.layouts else None
        self.agent.labels.update(self.plan.labels())
        for index, enabled in sorted(self.plan.modes.items()):
            want = self.plan.layouts.get(index)
            if want is not None:
                res = apply_layout(gpus, index, want)
                if res.error:
                    self._event("Warning", "MigLayoutNotApplied",
                                f"declared MIG layout {want.name!r} of GPU {index} not applied: {res.error}", index)
                elif res.changed and not res.pending:
                    logger.info("applied declared MIG layout", extra={"fields": {
                        "gpu": index, "layout": want.name, "destroyed": res.destroyed, "created": res.created}})
                continue
            try:
                mode = gpus.mig_mode(index)
                if mode.current != enabled and mode.pending != enabled:
                    gpus.set_mig_mode(index, enabled)
            except GpuError as e:
                self._event("Warning", "MigModeNotSet",
                            f"cannot set MIG mode {'enabled' if enabled else 'disabled'} on GPU {index}: {e}", index)

    def _event(self, type_: str, reason: str, message: str, index: int) -> None:
        from nodeagent.agent import node_event
        logger.warning(message)
        self.events.append(node_event(type_, reason, message, index))

    def pending_events(self) -> list:
        """A MigModePending event per GPU whose MIG mode changes at the next reset."""
        from nodeagent.agent import node_event
        out = []
        gpus: NvmlGpus = self.agent.gpus
        for index, model in sorted(gpus.models.items()):
            if model is None or not model.mig_capable:
                continue
            try:
                mode = gpus.mig_mode(index)
            except GpuError:
                continue
            if mode.reset_needed:
                out.append(node_event("Warning", "MigModePending", (
                    f"MIG mode of GPU {index} is {'enabled' if mode.current else 'disabled'}; "
                    f"{'enabled' if mode.pending else 'disabled'} takes effect at the next GPU reset or reboot "
                    f"(the agent never resets a GPU)"), index))
        return out

    def on_session(self, outbox) -> None:
        from gpumesh.v1 import node_service_pb2
        for ev in self.events + self.pending_events():
            outbox.put_nowait(node_service_pb2.AgentMessage(event=ev))
        self.events = []
