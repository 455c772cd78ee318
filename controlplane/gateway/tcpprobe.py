"""The gateway's TCP probe of replicas whose circuit a refused or cut connection opened (breaker.py): when such
a circuit is due for its half-open probe, the gateway first connects to the replica's port; while nothing
listens the circuit stays open (`hold`), and once something does the next request is the half-open probe
(`listening`). The probe takes the breaker's probe number, so no request takes the probe while the connect
runs, and its verdict counts only while that number is still the probe in flight."""

from __future__ import annotations

import asyncio

from controlplane.gateway import metrics as M
from controlplane.gateway.breaker import STATE_VALUE


class TcpProber:
    def __init__(self, stats, on_listening) -> None:
        self.stats = stats                      # StatsTable
        self.on_listening = on_listening        # () -> None: a replica may take requests again (Admission.kick)
        self.inflight: set[str] = set()         # replica keys with a connect running

    def start_due(self, view) -> None:
        """Start a probe for each replica of `view` whose unreachable circuit is due for its half-open probe."""
        for d in view.deployments.values():
            for r in d.replicas:
                s = self.stats.by_replica.get(r.key)
                if (s is None or not s.breaker.unreachable or r.key in self.inflight
                        or s.breaker.state != "half-open" or s.breaker.probing):
                    continue
                probe = s.breaker.begin()       # no request takes the probe while the connect runs
                self.inflight.add(r.key)
                asyncio.get_running_loop().create_task(self.probe(r.key, r.endpoint, s, probe))

    async def probe(self, key: str, endpoint: str, s, probe: int) -> None:
        """Connect to `endpoint`; the verdict counts only while `probe` (its breaker.begin number) is still the
        probe in flight (a connect that took its 2 s must not free or reopen a circuit that moved on)."""
        host, _, port = endpoint.rpartition(":")
        try:
            _, w = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), 2.0)
            w.close()
            s.breaker.listening(probe)          # the next request is the half-open probe
            self.on_listening()
        except (OSError, asyncio.TimeoutError, ValueError):
            s.breaker.hold(probe)
        finally:
            self.inflight.discard(key)
            M.CIRCUIT.labels(key).set(STATE_VALUE[s.breaker.state])
