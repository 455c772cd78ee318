"""The scheduling framework's vocabulary: statuses, picks, options, the plugin protocols
(one small Protocol per extension point), placements and decisions."""

from __future__ import annotations

import enum
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from controlplane.state.fleet import Fleet, GpuState, NodeEntry
from mesh.slicespec import SliceRequest

if TYPE_CHECKING:
    from controlplane.scheduler.framework import Framework


class Code(enum.IntEnum):
    SUCCESS = 0
    UNSCHEDULABLE = 1                   # may fit once something is released (or preempted)
    UNSCHEDULABLE_AND_UNRESOLVABLE = 2  # will not fit on this node whatever is released
    ERROR = 3


@dataclass(frozen=True)
class Status:
    """A plugin's verdict; `reasons` are (node class, why) pairs, counted per GPU or node."""

    code: Code = Code.SUCCESS
    reasons: tuple[tuple[str, str], ...] = ()
    plugin: str = ""

    @property
    def ok(self) -> bool:
        return self.code == Code.SUCCESS

    @classmethod
    def unschedulable(cls, cls_name: str, why: str, plugin: str = "", n: int = 1,
                      unresolvable: bool = False) -> "Status":
        code = Code.UNSCHEDULABLE_AND_UNRESOLVABLE if unresolvable else Code.UNSCHEDULABLE
        return cls(code, ((cls_name, why),) * n, plugin)


SUCCESS = Status()


@dataclass(frozen=True)
class Pick:
    """One slice of the request on one GPU of a node. `rank` is the GPU's position in the node's
    signature order (`NodeEntry.gpu_order()`), -1 for a slice that takes no GPU (host only)."""

    rank: int
    isolation: str
    profile: str | None = None
    start: int | None = None
    size: int | None = None
    memory_bytes: int = 0
    compute_share: float = 0.0
    cpu_milli: int = 0
    host_memory_bytes: int = 0


Option = tuple[Pick, ...]  # the picks one node would take


def gpu_of(node: NodeEntry, pick: Pick) -> GpuState | None:
    return None if pick.rank < 0 else node.gpus[node.gpu_order()[pick.rank]]


class CycleState(dict):
    """Scratch data of one cycle, shared by the plugins (keys: plugin names)."""


# -- plugin protocols (each plugin implements one or more) -----------------------------

@runtime_checkable
class PreFilterPlugin(Protocol):
    NAME: str

    def pre_filter(self, state: CycleState, req: SliceRequest, fleet: Fleet) -> Status: ...


@runtime_checkable
class FilterPlugin(Protocol):
    NAME: str
    cacheable: bool

    def filter(self, state: CycleState, req: SliceRequest, node: NodeEntry) -> Status: ...


@runtime_checkable
class GpuFilterPlugin(Protocol):
    NAME: str

    def filter_gpu(self, req: SliceRequest, gpu: GpuState) -> str | None:
        """None when `gpu` may hold a slice of `req`, else the reason (always cacheable)."""


@runtime_checkable
class OptionsPlugin(Protocol):
    NAME: str

    def options(self, req: SliceRequest, node: NodeEntry,
                gpus: list[tuple[int, GpuState]]) -> tuple[list[Option], list[tuple[str, str]]]:
        """The node's ways to hold the request over the GPUs that passed the GPU filters
        (rank, GPU), and (class, reason) for the GPUs that cannot (always cacheable)."""


@runtime_checkable
class ScorePlugin(Protocol):
    NAME: str
    cacheable: bool

    def score(self, state: CycleState, req: SliceRequest, node: NodeEntry, option: Option) -> float:
        """Higher is better; scales are the plugin's own and the profile's weights combine them."""


@runtime_checkable
class NormalizePlugin(Protocol):
    def normalize(self, scores: list[float]) -> list[float]: ...


@runtime_checkable
class ReservePlugin(Protocol):
    NAME: str

    def reserve(self, state: CycleState, req: SliceRequest, node: NodeEntry, option: Option) -> Status: ...

    def unreserve(self, state: CycleState, req: SliceRequest, node: NodeEntry, option: Option) -> None:
        """Undo `reserve`; idempotent."""


@runtime_checkable
class PostFilterPlugin(Protocol):
    NAME: str

    def post_filter(self, fw: "Framework", state: CycleState, req: SliceRequest, fleet: Fleet) -> "Decision | None":
        """Runs when nothing fits (e.g. preemption); a decision with victims, or None."""


# -- results -----------------------------------------------------------------------------

@dataclass
class Placement:
    """One node's share of a decision. The picks' GPUs are resolved when it is made: ranks follow
    the node's signature order, which changes as soon as anything on the node does."""

    node: NodeEntry
    option: Option
    gpus: tuple = ()

    def __post_init__(self) -> None:
        if not self.gpus:
            self.gpus = tuple(gpu_of(self.node, p) for p in self.option)


@dataclass(frozen=True)
class Choice:
    """One slice's place, in the fleet's own terms (what the controller binds)."""

    node: str
    gpu_index: int
    gpu_uuid: str
    gpu_model: str
    isolation: str
    profile: str | None
    start: int | None
    size: int | None
    memory_bytes: int
    compute_share: float
    cpu_milli: int = 0
    host_memory_bytes: int = 0


def to_choices(placements: list[Placement]) -> list[Choice]:
    out = []
    for pl in placements:
        for p, g in zip(pl.option, pl.gpus):
            out.append(Choice(pl.node.name, g.index if g else -1, g.uuid if g else "", g.model.name if g else "",
                              p.isolation, p.profile, p.start, p.size, p.memory_bytes, p.compute_share,
                              p.cpu_milli, p.host_memory_bytes))
    return out


@dataclass
class Decision:
    """Where the request goes (one Choice per slice), what must be evicted first, or why not."""

    status: Status
    placements: list[Placement] = field(default_factory=list)
    victims: list[str] = field(default_factory=list)     # allocation ids to evict first
    reasons: dict[str, str] = field(default_factory=dict)  # node class -> summary, when unschedulable
    choices: list[Choice] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.placements and not self.choices:
            self.choices = to_choices(self.placements)

    @property
    def ok(self) -> bool:
        return self.status.ok


class Reasons:
    """Counts (class, why) pairs over the nodes of one cycle, for RESOURCE_EXHAUSTED."""

    def __init__(self) -> None:
        self.by_class: dict[str, Counter] = defaultdict(Counter)

    def add_status(self, st: Status) -> None:
        for cls, why in st.reasons:
            self.by_class[cls][why] += 1

    def summary(self) -> dict[str, str]:
        out = {cls: "; ".join(f"{n} GPU(s): {why}" if not why.startswith("node:") else f"{n} node(s): {why[5:]}"
                              for why, n in c.most_common())
               for cls, c in self.by_class.items()}
        return out or {"fleet": "no GPU nodes registered"}
