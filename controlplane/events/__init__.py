"""Durable events: what the control plane did and why, kept in etcd with bounded retention.

`EventLog` (log.py) is the in-memory table both the leader and standbys serve from; `Recorder`
(recorder.py) is the leader's writer of it; `EventService` (service.py) the API. Components emit with
one line, never waiting for etcd:

    ctl.recorder.emit("Deployment", "chat", "Normal", "ScaledUp", "replicas 1 -> 3", tenant="acme")
"""

from controlplane.events.log import EventLog
from controlplane.events.recorder import NORMAL, WARNING, NullRecorder, Recorder

__all__ = ["EventLog", "Recorder", "NullRecorder", "NORMAL", "WARNING"]
