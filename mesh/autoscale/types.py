"""The autoscaler's vocabulary: a deployment's scaling policy, what it observes, what it decides.

Pure data, no I/O: the control plane's autoscaler controller (controlplane/controllers/autoscaler.py) and
`meshctl bench autoscale` (on a simulated clock) both drive ``mesh.autoscale`` with these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

METRICS = ("concurrency", "queue", "kv_cache", "ttft")
SIZINGS = ("erlang", "poisson", "little")     # how a predictive policy turns a forecast rate into replicas


@dataclass(frozen=True)
class ScalingPolicy:
    """A deployment's scaling policy (the Python side of ``gpumesh.v1.ScalingPolicy``).

    ``target`` is per replica in the unit of ``metric``: in-flight requests (concurrency), waiting requests
    (queue), KV-cache use 0-1 (kv_cache), or a time-to-first-token objective in milliseconds (ttft).
    """

    min_replicas: int = 1
    max_replicas: int = 1
    metric: str = "concurrency"
    target: float = 1.0
    stable_window_s: float = 60.0          # Knative's stable window: the average that scales normally
    panic_window_s: float = 6.0            # Knative's panic window: the short average that detects a burst
    panic_threshold: float = 2.0           # panic when the panic-window demand is this many times the ready capacity
    scale_up_delay_s: float = 0.0          # stabilization before a scale-up (fast)
    scale_down_delay_s: float = 120.0      # stabilization before a scale-down (slow): the highest want in it wins
    max_scale_up_rate: float = 10.0        # at most this many times the ready replicas in one step
    scale_to_zero_after_s: float = 0.0     # idle this long -> 0 replicas (0: never; needs min_replicas == 0)
    predictive: bool = False               # add replicas ahead of the forecast's upper quantile
    lead_time_s: float = 0.0               # how far ahead (0: the measured cold start from the registry)
    forecast_quantile: float = 0.9         # which upper quantile of the forecast to provision for
    cost_ceiling_per_hour: float = 0.0     # dollars per hour the deployment may never exceed (0: none)
    variants: tuple[str, ...] = ()         # variant order to add replicas of when the first does not fit
    # predictive sizing (mesh/autoscale/planner.py): the same rules in the live controller and the bench
    slo_ttft_ms: float = 0.0               # the TTFT objective served (0: none; a ttft policy's target is it)
    sizing: str = ""                       # "erlang" | "poisson" | "little" ("": erlang with an SLO, else little)
    sizing_quantile: float = 0.7           # erlang: P(wait > the SLO's room) <= 1 - this; poisson: P(busy) <= 1 - it
    nowcast: bool = True                   # the forecast rate never below the rate so far in the bucket under way
    catch_up: bool = True                  # median floor, no scale-down delay when a cold start fits the room

    @property
    def slo_ms(self) -> float:
        """The TTFT objective in milliseconds (0: none): ``slo_ttft_ms``, else a ttft policy's target."""
        return self.slo_ttft_ms or (self.target if self.metric == "ttft" else 0.0)

    @property
    def sizing_rule(self) -> str:
        """The sizing rule in force: ``sizing``, else erlang when the SLO is known, else little."""
        return self.sizing or ("erlang" if self.slo_ms > 0 else "little")


@dataclass(frozen=True)
class Sample:
    """One observation of a deployment's load (summed over its ready replicas unless said otherwise)."""

    t: float                    # seconds, the caller's clock (wall time or a simulated clock)
    in_flight: float = 0.0      # requests being served
    queue: float = 0.0          # requests waiting (gateway queue plus backends' waiting)
    kv_cache: float = 0.0       # mean KV-cache use of the ready replicas, 0-1
    ttft_ms: float = 0.0        # recent time to first token, milliseconds (0: unknown)
    request_rate: float = 0.0   # arrivals per second over the last interval
    ready: int = 0              # ready replicas when sampled


@dataclass(frozen=True)
class Decision:
    """What the autoscaler wants now, and why."""

    desired: int
    mode: str                   # "stable" | "panic" | "predictive" | "idle" (scale to zero) | "hold"
    reason: str                 # one sentence an operator reads in the event
    bound_by: str = ""          # "" | "min" | "max" | "cost_ceiling" | "pool" | "stabilization"; the controller
                                # adds "unknown_load" (controlplane/controllers/autoscale_freshness.py)
    signals: dict[str, float] = field(default_factory=dict)   # the values behind it, for the event and metrics
