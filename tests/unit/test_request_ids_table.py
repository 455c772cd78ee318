"""The request-id table Allocate and Run share (controlplane/state/requestids.py): ids are dropped once older
than the retention, oldest first; a failed call forgets only an id it still owns."""

from controlplane.state import requestids
from controlplane.state.requestids import RequestIds


def test_ids_older_than_the_retention_are_dropped(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(requestids.time, "monotonic", lambda: now[0])
    ttl = [10.0]
    ids = RequestIds(lambda: ttl[0])
    ids.remember("t", "a", "w-1")
    now[0] = 105.0
    ids.remember("t", "b", "w-2")
    assert ids.lookup("t", "a") == "w-1"
    now[0] = 111.0
    assert ids.lookup("t", "a") is None and ids.lookup("t", "b") == "w-2"     # only the older one went
    now[0] = 200.0
    ids.remember("t", "c", "w-3")
    assert dict(ids) == {("t", "c"): "w-3"}                                 # never-retried ids do not pile up


def test_forget_drops_only_an_id_the_caller_still_owns():
    ids = RequestIds(lambda: 60.0)
    ids.remember("t", "a", "w-1")
    ids.forget("t", "a", "w-other")
    assert ids.lookup("t", "a") == "w-1"
    ids.forget("t", "a", "w-1")
    assert ids.lookup("t", "a") is None
