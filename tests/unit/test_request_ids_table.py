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


def test_the_fingerprint_ignores_only_the_id_and_how_the_caller_waits():
    from gpumesh.v1 import slice_service_pb2 as S, types_pb2 as T

    def req(**kw):
        fields = dict(spec=T.SliceSpec(tenant="t", mig_profile="1g.10gb", labels={"a": "1", "b": "2"}),
                      request_id="r-1")
        fields.update(kw)
        return S.AllocateRequest(**fields)
    fp = requestids.allocate_fingerprint(req())
    assert fp.startswith("sha256:") and len(fp) == 7 + 64
    assert requestids.allocate_fingerprint(req(request_id="r-2", no_wait=True, timeout_seconds=60)) == fp
    assert requestids.allocate_fingerprint(req(spec=T.SliceSpec(tenant="t", mig_profile="1g.10gb",
                                                                labels={"b": "2", "a": "1"}))) == fp
    assert requestids.allocate_fingerprint(req(spec=T.SliceSpec(tenant="t", mig_profile="2g.20gb"))) != fp


def test_durable_values_old_and_new():
    assert requestids.decode(b"a-123") == ("a-123", "")                       # written before fingerprints
    assert requestids.decode(requestids.encode("a-123", "sha256:ab")) == ("a-123", "sha256:ab")
    assert requestids.encode("a-123", "") == b"a-123"
    ids = RequestIds(lambda: 60.0, "Allocate")
    ids.load("t", "old", b"a-1")
    ids.load("t", "new", requestids.encode("a-2", "sha256:ab"))
    assert ids.check("t", "old", "sha256:cd") == "a-1"                        # no fingerprint kept: as before
    assert ids.check("t", "new", "sha256:ab") == "a-2"
    import pytest
    from mesh import errors
    with pytest.raises(errors.RequestIdReused, match="request_id: 'new' was used by an earlier Allocate call"):
        ids.check("t", "new", "sha256:cd")
    ids.pop(("t", "new"))
    assert ("t", "new") not in ids.fingerprints and ids.check("t", "new", "sha256:cd") is None
