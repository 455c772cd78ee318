"""What `meshctl top` shows, kept current from the API.

* Slices: one `SliceService.Watch` stream (the initial list, then each change as it happens); when
  the stream ends or fails it is opened again after a pause (and lists again).
* GPUs (with their telemetry, MIG layout, pressure, thermal state and health), deployments and the
  newest events: one `AdminService.ListGpus`, one `DeploymentService.List` and one `EventService.List`
  call per refresh interval, each answering for the whole fleet. The API has no GPU or all-deployments watch (telemetry arrives from the agents
  every few seconds anyway); DeploymentService.Watch follows one deployment by name.

`Feed.data()` hands the screen a consistent copy; `changed` is set whenever something moved.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from mesh import errors

RETRY_S = 2.0


@dataclass
class Data:
    gpus: list[dict] = field(default_factory=list)
    slices: dict[str, dict] = field(default_factory=dict)
    deployments: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)         # newest first
    errors: dict[str, str] = field(default_factory=dict)      # source -> the last error, while it lasts
    at: float = 0.0


def read_gpus(client) -> list[dict]:
    from mesh.client import gpu_status_to_dict
    return [gpu_status_to_dict(g) for g in client.list_gpus()]


def read_deployments(client) -> list[dict]:
    from mesh.deployapi import deployment_to_dict
    return [deployment_to_dict(d) for d in client.list_deployments()]


def read_slices(client) -> dict[str, dict]:
    from mesh.client import slice_to_dict
    return {s.id: slice_to_dict(s) for s in client.list_slices()}


def read_events(client) -> list[dict]:
    """The newest events the caller may see (EventService), newest first."""
    from mesh.eventapi import event_to_dict
    return [event_to_dict(e) for e in reversed(client.list_events(limit=EVENTS_KEPT))]


EVENTS_KEPT = 200


def load_once(client) -> Data:
    """Everything, read once (for --once): errors of one source leave it empty and are named."""
    data = Data(at=time.time())
    for name, read, attr in (("gpus", read_gpus, "gpus"), ("slices", read_slices, "slices"),
                             ("deployments", read_deployments, "deployments"), ("events", read_events, "events")):
        try:
            setattr(data, attr, read(client))
        except errors.MeshError as e:
            data.errors[name] = e.message
    return data


class Feed:
    def __init__(self, client, interval: float = 2.0) -> None:
        self.client = client
        self.interval = interval
        self.changed = threading.Event()
        self._lock = threading.Lock()
        self._data = Data()
        self._stop = threading.Event()
        self._watch = None
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for target, name in ((self._follow_slices, "top-slices"), (self._refresh, "top-refresh")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        w = self._watch
        if w is not None:
            w.close()

    def data(self) -> Data:
        with self._lock:
            d = self._data
            return Data(list(d.gpus), dict(d.slices), list(d.deployments), list(d.events), dict(d.errors), d.at)

    def _set(self, **kw) -> None:
        with self._lock:
            for k, v in kw.items():
                setattr(self._data, k, v)
            self._data.at = time.time()
        self.changed.set()

    def _error(self, source: str, message: str | None) -> None:
        with self._lock:
            if message is None:
                self._data.errors.pop(source, None)
            else:
                self._data.errors[source] = message
        self.changed.set()

    def _refresh(self) -> None:
        while not self._stop.is_set():
            for source, read in (("gpus", read_gpus), ("deployments", read_deployments), ("events", read_events)):
                try:
                    self._set(**{source: read(self.client)})
                    self._error(source, None)
                except errors.MeshError as e:
                    self._error(source, e.message)
            self._stop.wait(self.interval)

    def _follow_slices(self) -> None:
        from gpumesh.v1 import slice_service_pb2
        from mesh.client import slice_to_dict
        deleted = slice_service_pb2.SliceEvent.DELETED
        while not self._stop.is_set():
            try:
                self._watch = watch = self.client.watch_slices(send_initial=True)
                self._set(slices={ev.slice.id: slice_to_dict(ev.slice) for ev in watch.initial
                                  if ev.type != deleted})
                self._error("slices", None)
                for ev in watch:
                    with self._lock:
                        if ev.type == deleted:
                            self._data.slices.pop(ev.slice.id, None)
                        else:
                            self._data.slices[ev.slice.id] = slice_to_dict(ev.slice)
                        self._data.at = time.time()
                    self.changed.set()
                    if self._stop.is_set():
                        return
            except errors.MeshError as e:
                if self._stop.is_set():
                    return
                self._error("slices", f"watch: {e.message}")
            self._stop.wait(RETRY_S)
