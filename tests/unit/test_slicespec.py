"""Validation of SliceSpec: every refusal names the field and what is allowed."""

import math

import pytest

from gpumesh.v1 import types_pb2 as t
from mesh import errors
from mesh.slicespec import validate

GiB = 1 << 30


@pytest.mark.parametrize("name, spec, field, allowed_fragment", [
    ("missing tenant", dict(memory_bytes=GiB), "spec.tenant", "letters"),
    ("bad tenant", dict(tenant="a b", memory_bytes=GiB), "spec.tenant", "letters"),
    ("zero memory", dict(tenant="t"), "spec.memory_bytes", "0 with spec.mig_profile"),
    ("negative memory", dict(tenant="t", memory_bytes=-5), "spec.memory_bytes", "1 byte"),
    ("huge memory", dict(tenant="t", memory_bytes=1 << 50), "spec.memory_bytes", "at most"),
    ("memory above model", dict(tenant="t", memory_bytes=30 * GiB, gpu_model="L4"), "spec.memory_bytes", "at most"),
    ("share above 1", dict(tenant="t", memory_bytes=GiB, compute_share=1.5), "spec.compute_share", "(0, 1]"),
    ("negative share", dict(tenant="t", memory_bytes=GiB, compute_share=-0.1), "spec.compute_share", "(0, 1]"),
    ("nan share", dict(tenant="t", memory_bytes=GiB, compute_share=math.nan), "spec.compute_share", "(0, 1]"),
    ("unknown model", dict(tenant="t", memory_bytes=GiB, gpu_model="B9000"), "spec.gpu_model", "H100-80GB"),
    ("unknown profile", dict(tenant="t", mig_profile="5g.50gb"), "spec.mig_profile", "3g.40gb"),
    ("profile of another model", dict(tenant="t", mig_profile="3g.40gb", gpu_model="A100-40GB"),
     "spec.mig_profile", "3g.20gb"),
    ("profile on non-MIG model", dict(tenant="t", mig_profile="1g.10gb", gpu_model="L4"), "spec.mig_profile", "none"),
    ("mig on non-MIG model", dict(tenant="t", memory_bytes=GiB, gpu_model="T4", isolation=t.ISOLATION_MIG),
     "spec.isolation", "mps"),
    ("profile with mps", dict(tenant="t", mig_profile="1g.10gb", isolation=t.ISOLATION_MPS), "spec.mig_profile", "mig"),
    ("unknown isolation", dict(tenant="t", memory_bytes=GiB, isolation=42), "spec.isolation", "timeshare"),
    ("negative count", dict(tenant="t", memory_bytes=GiB, count=-1), "spec.count", "1 to 64"),
    ("count too big", dict(tenant="t", memory_bytes=GiB, count=1000), "spec.count", "1 to 64"),
    ("unknown topology", dict(tenant="t", memory_bytes=GiB, topology=9), "spec.topology", "same-node"),
    ("priority out of range", dict(tenant="t", memory_bytes=GiB, priority=5000), "spec.priority", "-1000 to 1000"),
    ("bad label key", dict(tenant="t", memory_bytes=GiB, labels={"": "x"}), "spec.labels['']", "letters"),
])
def test_refusals_name_field_and_allowed(name, spec, field, allowed_fragment):
    with pytest.raises(errors.InvalidArgument) as exc:
        validate(t.SliceSpec(**spec))
    assert exc.value.field == field, name
    assert allowed_fragment in str(exc.value), str(exc.value)
    assert exc.value.code.name == "INVALID_ARGUMENT"


def test_valid_specs_normalize():
    r = validate(t.SliceSpec(tenant="team-a", mig_profile="3g.40gb"))
    assert (r.isolation, r.mig_profile, r.count, r.memory_bytes) == ("mig", "3g.40gb", 1, 0)
    r = validate(t.SliceSpec(tenant="t", memory_bytes=8 * GiB, isolation=t.ISOLATION_MPS, gpu_model="h100",
                             count=4, topology=t.TOPOLOGY_SAME_NODE, priority=-3, labels={"app": "x"}))
    assert (r.gpu_model, r.isolation, r.count, r.topology, r.priority) == ("H100-80GB", "mps", 4, "same-node", -3)
    assert r.labels == {"app": "x"}
    assert validate(t.SliceSpec(tenant="t", memory_bytes=GiB)).isolation is None


@pytest.mark.parametrize("field, spec", [
    ("spec.tenant", dict(tenant="x" * 5000, memory_bytes=1)),
    ("spec.gpu_model", dict(tenant="t", gpu_model="G" * 5000, memory_bytes=1)),
    ("spec.mig_profile", dict(tenant="t", gpu_model="A100-40GB", mig_profile="9" * 5000)),
    ("spec.labels[", dict(tenant="t", memory_bytes=1, labels={"bad key " * 700: "v"})),
])
def test_a_huge_value_is_not_echoed_whole(field, spec):
    with pytest.raises(errors.InvalidArgument) as e:
        validate(t.SliceSpec(**spec))
    assert e.value.field.startswith(field) and len(str(e.value.message)) < 400 and "characters)" in e.value.message
