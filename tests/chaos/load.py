"""Concurrent allocations with request ids, and a fault injected part-way through."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import threading
import time
import uuid
from collections.abc import Callable

from mesh import errors
from tests.chaos.conftest import wait_for


@dataclasses.dataclass
class Load:
    acked: dict = dataclasses.field(default_factory=dict)     # request id -> allocation id
    failed: list = dataclasses.field(default_factory=list)
    retried: list = dataclasses.field(default_factory=list)
    fault_result: object = None
    seconds: float = 0.0


def allocate_under_fault(mesh, tenant: str, count: int, clients: int, fault: Callable[[], object],
                         profile: str = "1g.10gb", retry_for: float = 30.0) -> Load:
    """`count` allocations from `clients` threads; `fault()` runs once a third are acknowledged."""
    load, lock = Load(), threading.Lock()

    def one(i: int) -> None:
        rid = f"r{i:04d}-{uuid.uuid4().hex[:6]}"
        deadline = time.monotonic() + retry_for
        while True:
            try:
                resp = mesh.allocate(tenant=tenant, mig_profile=profile, request_id=rid, no_wait=True)
                with lock:
                    load.acked[rid] = resp.allocation_id
                return
            except (errors.ResourceExhausted, errors.Unavailable) as e:
                # During a takeover a node may be NotReady until its agent re-registers, and etcd may
                # be electing: a client with a deadline tries again with the same request id.
                with lock:
                    load.retried.append(rid)
                if time.monotonic() > deadline:
                    with lock:
                        load.failed.append(f"{rid}: {type(e).__name__}: {e}")
                    return
                time.sleep(0.2)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    load.failed.append(f"{rid}: {type(e).__name__}: {e}")
                return

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(one, i) for i in range(count)]
        wait_for(lambda: len(load.acked) >= count // 3, 60, "a third of the allocations")
        load.fault_result = fault()
        concurrent.futures.wait(futures)
    load.seconds = time.monotonic() - t0
    return load
