"""A circuit breaker per replica: closed; open after K consecutive failures, or at once when the replica
refused or cut the connection (`trip`: a dead process does not get K more requests to prove it); after
`open_seconds` one half-open probe is let through; its success closes the circuit, its failure opens it
again. A circuit tripped by a connection failure is also probed by the gateway with a plain TCP connect
before any request may take its probe (`hold` keeps it open while nothing listens, `listening` lets the next
request be the probe), so no request is spent on a port that is still dead. Every probe has a number (`begin`),
and a verdict given on a probe (a TCP probe's `hold`/`listening`, a request's `release`) counts only while
that probe is the one in flight: a slow TCP probe that ends after the circuit has moved on (closed by a
request sent before it opened, opened again, probed by a request) changes nothing."""

from __future__ import annotations

import time

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"
STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class CircuitBreaker:
    def __init__(self, failures: int = 3, open_seconds: float = 5.0, clock=time.monotonic) -> None:
        self.threshold = failures
        self.open_seconds = open_seconds
        self.clock = clock
        self.consecutive = 0
        self.opened_at = 0.0
        self._state = CLOSED
        self.probing = False          # a half-open probe is in flight
        self._probe = 0               # the number of the latest probe (begin), so a late release frees only its own
        self.unreachable = False      # opened by a refused/cut connection: the gateway probes it by TCP

    @property
    def state(self) -> str:
        if self._state == OPEN and self.clock() - self.opened_at >= self.open_seconds:
            self._state = HALF_OPEN
            self.probing = False
        return self._state

    def allows(self) -> bool:
        """May a request go to this replica now (without taking the half-open probe)? Not while a circuit opened
        by a refused or cut connection has not passed its TCP probe."""
        s = self.state
        return s == CLOSED or (s == HALF_OPEN and not self.probing and not self.unreachable)

    def shut(self) -> bool:
        """The circuit keeps requests off the replica: open, or half-open while its TCP probe has not found the port
        listening (`allows` besides says whether the one probe is taken)."""
        s = self.state
        return s == OPEN or (s == HALF_OPEN and self.unreachable)

    def begin(self) -> int:
        """A request (or the gateway's TCP probe) was sent; in half-open it is the one probe: its number (0 when it
        is no probe)."""
        if self.state == HALF_OPEN:
            self.probing = True
            self._probe += 1
            return self._probe
        return 0

    def success(self) -> None:
        self.consecutive = 0
        self._state = CLOSED
        self.probing = False
        self.unreachable = False

    def trip(self) -> None:
        """The replica refused or cut the connection: open now, whatever the count."""
        self.consecutive += 1
        self._state = OPEN
        self.opened_at = self.clock()
        self.probing = False
        self.unreachable = True

    def _current(self, probe: int) -> bool:
        """Probe number `probe` is the one in flight, and no verdict was given since it began."""
        return self.probing and probe == self._probe

    def hold(self, probe: int) -> None:
        """TCP probe `probe` (begin's number) found nothing listening: stay open for another `open_seconds`."""
        if self._current(probe):
            self._state = OPEN
            self.opened_at = self.clock()
            self.probing = False

    def listening(self, probe: int) -> None:
        """TCP probe `probe` found the port listening: the next request is the half-open probe."""
        if self._current(probe):
            self.probing = False
            self.unreachable = False

    def failure(self) -> None:
        self.consecutive += 1
        if self._state == HALF_OPEN or self.consecutive >= self.threshold:
            self._state = OPEN
            self.opened_at = self.clock()
        self.probing = False

    def release(self, probe: int | None = None) -> None:
        """A request ended without a verdict (client went away): free the probe; with `probe` (begin's number),
        only while that probe is still the one in flight (not one taken since a verdict on it)."""
        if probe is None or probe == self._probe:
            self.probing = False
