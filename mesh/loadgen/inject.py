"""The `--inject` fault plan: what goes wrong, under which replica, when.

Grammar (comma-separated items; R is a replica's index in the bench's replica list, T seconds from the
start of each policy's run):

    hot=R[@T]               the simulated GPU under replica R reports a throttling temperature
    pressure=R:LEVEL[@T]    its memory use puts it at LEVEL (high | critical)
    kill=R@T                the backend process of replica R is SIGKILLed at T seconds
    standard                one hot, one under critical memory pressure, one killed a third of the way in
                            (replicas 0, 1 and 2; needs the duration)

`hot` and `pressure` start at T (default 0: from the start) and last to the end of the run; the bench takes
them away (and waits for a killed replica to be back) before the next policy, so every policy meets the
same conditions at the same times. `parse` checks the grammar and the replica indices.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.errors import InvalidArgument

KINDS = ("hot", "pressure", "kill")
LEVELS = ("high", "critical")
# What the simulated GPU is made to report: a throttling temperature (the control plane: 80-85 C is
# "throttling"; the simulated H100 slows its SM clock from 83 C) and memory use of the pressure levels.
HOT_CELSIUS = 85.0
PRESSURE_FRACTION = {"high": 0.90, "critical": 0.97}   # high: 85-95 % (seed 003), critical: above 95 %
GRAMMAR = "hot=R[@T], pressure=R:high|critical[@T], kill=R@T, or standard"


@dataclass(frozen=True)
class Injection:
    kind: str              # hot | pressure | kill
    replica: int
    at_s: float = 0.0
    level: str = ""        # pressure only

    def describe(self) -> dict:
        d = {"kind": self.kind, "replica": self.replica, "at_s": round(self.at_s, 2)}
        if self.level:
            d["level"] = self.level
        return d


def _number(text: str, what: str, item: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise InvalidArgument.of("inject", f"{item!r}: {what} {text!r} is not a number", GRAMMAR) from None
    if v < 0:
        raise InvalidArgument.of("inject", f"{item!r}: {what} {text!r} is negative", GRAMMAR)
    return v


def _replica(text: str, item: str, replicas: int) -> int:
    if not text.isdigit():
        raise InvalidArgument.of("inject", f"{item!r}: replica {text!r} is not an index", GRAMMAR)
    r = int(text)
    if r >= replicas:
        raise InvalidArgument.of("inject", f"{item!r}: replica {r} does not exist", f"0..{replicas - 1}")
    return r


def standard(replicas: int, duration_s: float) -> list[Injection]:
    """One hot, one under critical memory pressure, one killed a third of the way in."""
    if replicas < 3:
        raise InvalidArgument.of("inject", f"standard needs 3 replicas, the bench has {replicas}", ">= 3 replicas")
    return [Injection("hot", 0), Injection("pressure", 1, level="critical"),
            Injection("kill", 2, at_s=round(duration_s / 3, 2))]


def parse(spec: str, replicas: int, duration_s: float) -> list[Injection]:
    """The injections of `spec` (empty: none), checked against `replicas` replicas and the run's duration."""
    out: list[Injection] = []
    for item in (s.strip() for s in (spec or "").split(",")):
        if not item:
            continue
        if item == "standard":
            out.extend(standard(replicas, duration_s))
            continue
        kind, eq, rest = item.partition("=")
        if not eq or kind not in KINDS:
            raise InvalidArgument.of("inject", f"{item!r} is not an injection", GRAMMAR)
        target, at_sign, when = rest.partition("@")
        at = _number(when, "time", item) if at_sign else None
        if kind == "kill" and at is None:
            raise InvalidArgument.of("inject", f"{item!r}: kill needs a time", "kill=R@T (seconds)")
        if at is not None and at > duration_s:
            raise InvalidArgument.of("inject", f"{item!r}: {at:g} s is after the run's end ({duration_s:g} s)",
                                     f"0..{duration_s:g}")
        level = ""
        if kind == "pressure":
            target, colon, level = target.partition(":")
            if not colon or level not in LEVELS:
                raise InvalidArgument.of("inject", f"{item!r}: pressure needs a level", "pressure=R:high|critical")
        out.append(Injection(kind, _replica(target, item, replicas), at or 0.0, level))
    keys = [(i.kind, i.replica) for i in out]
    dup = next((k for k in keys if keys.count(k) > 1), None)
    if dup:
        raise InvalidArgument.of("inject", f"{dup[0]} on replica {dup[1]} is given twice", "each once per replica")
    return sorted(out, key=lambda i: (i.at_s, i.kind, i.replica))
