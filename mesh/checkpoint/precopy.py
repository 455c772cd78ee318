"""Live migration of a cooperative workload: pre-copy, and stop-and-copy for comparison.

The engine drives two workloads through their control sockets (`AgentLink`, or anything
with the same `call(cmd, **args)`): the *source*, running, and the *target*, a fresh
process of the same program started with `GPUMESH_RESTORE_FROM=receive:SESSION@ADDRESS`,
which has built its model and waits in `restore_if_requested()` for the state.

Pre-copy:

1. round 0: the source sends every tensor to the target while it keeps training;
2. each further round sends the tensors changed since the previous one (torch's in-place
   version counters, or content hashes); rounds stop when the changed set is small
   (`stop_bytes`), stops shrinking (more than `shrink_ratio` of the previous round), or
   after `max_rounds`;
3. the source pauses at its next safe point (downtime starts), sends what changed since
   the last round plus the small data entries (step, RNG, optimizer hyper-parameters),
   and commits; the target verifies the manifest's checksums, applies it and resumes
   training (downtime ends);
4. the source is stopped (its `safe_point()` raises `WorkloadStopped`).

A failure before the commit resumes the source, which never stopped being the owner.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from mesh.checkpoint.agent_link import AgentLink
from mesh.checkpoint.format import CheckpointError


class WorkloadLink(Protocol):
    def call(self, cmd: str, **args: Any) -> dict[str, Any]: ...


class MigrationFailed(CheckpointError):
    """The migration did not complete; `resumed_source` says whether the source runs again."""

    def __init__(self, message: str, resumed_source: bool) -> None:
        super().__init__(message)
        self.resumed_source = resumed_source


@dataclass
class PrecopyPolicy:
    max_rounds: int = 8
    """most pre-copy rounds after round 0."""
    stop_bytes: int = 16 << 20
    """stop iterating once the changed set is at most this many bytes."""
    shrink_ratio: float = 0.8
    """stop when the changed set is more than this fraction of what the previous round sent."""
    chunk_bytes: int = 4 << 20
    pause_timeout: float = 300.0
    """seconds to wait for the source to reach a safe point."""
    target_timeout: float = 60.0
    """seconds to wait for the target to listen for the transfer, and to apply it."""
    connect_timeout: float = 10.0
    """seconds the source waits to connect to the target's transfer endpoint."""
    mesh: str = "auto"
    """chunk payloads over the target's mesh buffer (same-host shm) when faster: auto | grpc | shm."""

    def __post_init__(self) -> None:
        if self.max_rounds < 0:
            raise ValueError(f"max_rounds: {self.max_rounds} (allowed: >= 0)")
        if not 0 < self.shrink_ratio <= 1:
            raise ValueError(f"shrink_ratio: {self.shrink_ratio} (allowed: (0, 1])")


@dataclass
class RoundStat:
    round: int
    entries: int
    bytes: int
    seconds: float
    paused: bool = False


@dataclass
class MigrationResult:
    mode: str
    """`precopy` or `stop_and_copy`."""
    downtime_ms: float
    """from the source paused at a safe point to the target restored and running."""
    total_ms: float
    """from the first byte sent to the target running."""
    bytes_sent: int
    step: int
    """the step the target continues from."""
    state_bytes: int
    rounds: list[RoundStat] = field(default_factory=list)
    pause_wait_ms: float = 0.0
    """how long the source took to reach its safe point (it was still training)."""
    final_bytes: int = 0
    """bytes sent while paused."""
    transport: str = "grpc"
    """what carried the bulk of the bytes: grpc (the stream) or shm (the mesh)."""
    final_ms: float = 0.0
    """of the downtime: the final delta sent and committed (the target applied it)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


Progress = Callable[[str], None]


def _link(x: WorkloadLink | str) -> WorkloadLink:
    return AgentLink(x) if isinstance(x, str) else x


class PrecopyMigration:
    """`PrecopyMigration(source, target, secret=...).run()` moves a running workload; `source` and
    `target` are control-socket paths or links; `secret` is the target receiver's session secret. `sink`/`session` default to what the target reports."""

    def __init__(self, source: WorkloadLink | str, target: WorkloadLink | str, *, secret: bytes,
                 sink: str | None = None, session: str | None = None, policy: PrecopyPolicy | None = None,
                 progress: Progress | None = None, stop_source: bool = True) -> None:
        self.secret = secret
        """the transfer session's secret (the target's receiver holds the same; transfer_auth.py)."""
        self.source = _link(source)
        self.target = _link(target)
        self.sink = sink
        self.session = session
        self.policy = policy or PrecopyPolicy()
        self.progress = progress or (lambda msg: None)
        self.stop_source = stop_source

    def _target_endpoint(self) -> tuple[str, str]:
        deadline = time.monotonic() + self.policy.target_timeout
        while True:
            st = self.target.call("status")
            addr = self.sink or st.get("receive_address")
            session = self.session or st.get("receive_session")
            if addr and session:
                return addr, session
            if time.monotonic() > deadline:
                raise MigrationFailed("the target is not waiting for a transfer (no receive address)", False)
            time.sleep(0.02)

    def run(self) -> MigrationResult:
        return self._migrate(precopy=True)

    def _migrate(self, precopy: bool) -> MigrationResult:
        p = self.policy
        addr, session = self._target_endpoint()
        state_bytes = int(self.source.call("status")["state_bytes"])
        rounds: list[RoundStat] = []
        transport = "grpc"
        t_start = time.perf_counter()
        paused = False
        try:
            if precopy:
                r = self.source.call("precopy_begin", target=addr, session=session, secret=self.secret.hex(),
                                     chunk_bytes=p.chunk_bytes,
                                     connect_timeout=p.connect_timeout, mesh=p.mesh)
                rounds.append(RoundStat(0, r["entries"], r["bytes"], r["seconds"]))
                transport = r.get("transport", "grpc")
                self.progress(f"round 0: {r['bytes'] / 1e6:.1f} MB in {r['seconds']:.2f} s "
                              f"({r['mb_per_s']:.0f} MB/s) over {r.get('transport_note') or transport} while running")
                prev = r["bytes"]
                for i in range(1, p.max_rounds + 1):
                    d = self.source.call("dirty")
                    if d["bytes"] <= p.stop_bytes:
                        self.progress(f"changed set {d['bytes'] / 1e6:.1f} MB is small: stop-and-copy the rest")
                        break
                    if i > 1 and d["bytes"] > prev * p.shrink_ratio:
                        self.progress(f"changed set {d['bytes'] / 1e6:.1f} MB is not shrinking: stop-and-copy the rest")
                        break
                    r = self.source.call("precopy_round")
                    rounds.append(RoundStat(i, r["entries"], r["bytes"], r["seconds"]))
                    self.progress(f"round {i}: {r['entries']} entries, {r['bytes'] / 1e6:.1f} MB "
                                  f"in {r['seconds']:.2f} s")
                    prev = r["bytes"]
            t_pause_req = time.perf_counter()
            pz = self.source.call("pause", timeout=p.pause_timeout)
            paused = True
            t_paused = time.perf_counter()
            if not precopy:
                t_start = t_paused
                r = self.source.call("precopy_begin", target=addr, session=session, secret=self.secret.hex(),
                                     chunk_bytes=p.chunk_bytes,
                                     connect_timeout=p.connect_timeout, mesh=p.mesh)
                rounds.append(RoundStat(0, r["entries"], r["bytes"], r["seconds"], paused=True))
                transport = r.get("transport", "grpc")
            f = self.source.call("final")
            t_final = time.perf_counter()
            rounds.append(RoundStat(len(rounds), f["entries"], f["bytes"], f["seconds"], paused=True))
            restored = self.target.call("wait_restored", timeout=p.target_timeout)
            t_done = time.perf_counter()
        except Exception as exc:
            resumed = False
            try:
                self.source.call("precopy_abort")
                if paused:
                    self.source.call("resume")
                    resumed = True
            except Exception:  # the source may be gone; report the first failure
                pass
            raise MigrationFailed(f"migration failed ({'source resumed' if resumed else 'source untouched'}): "
                                  f"{exc}", resumed) from exc
        if self.stop_source:
            try:
                self.source.call("stop")
            except (OSError, ConnectionError):
                pass
        final_bytes = sum(r.bytes for r in rounds if r.paused)
        res = MigrationResult(
            mode="precopy" if precopy else "stop_and_copy",
            downtime_ms=(t_done - t_paused) * 1e3, total_ms=(t_done - t_start) * 1e3,
            bytes_sent=sum(r.bytes for r in rounds), step=int(restored["step"]), state_bytes=state_bytes,
            rounds=rounds, pause_wait_ms=(t_paused - t_pause_req) * 1e3, final_bytes=final_bytes, transport=transport,
            final_ms=(t_final - t_paused) * 1e3)
        if int(restored["step"]) != int(pz["step"]):
            raise MigrationFailed(f"the target restored step {restored['step']}, the source paused at {pz['step']}",
                                  False)
        self.progress(f"{res.mode}: downtime {res.downtime_ms:.1f} ms, total {res.total_ms:.0f} ms, "
                      f"{res.bytes_sent / 1e6:.1f} MB sent, continuing at step {res.step}")
        return res


def stop_and_copy(source: WorkloadLink | str, target: WorkloadLink | str, *, secret: bytes,
                  sink: str | None = None, session: str | None = None, policy: PrecopyPolicy | None = None,
                  progress: Progress | None = None, stop_source: bool = True) -> MigrationResult:
    """Pause the source, send everything, restore on the target: the baseline pre-copy beats."""
    m = PrecopyMigration(source, target, secret=secret, sink=sink, session=session, policy=policy,
                         progress=progress, stop_source=stop_source)
    return m._migrate(precopy=False)


def new_session_id() -> str:
    return f"mig-{uuid.uuid4().hex[:12]}"
