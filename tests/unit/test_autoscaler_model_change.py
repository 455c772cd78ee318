"""The autoscaler's figures describe one model (controlplane/controllers/autoscaler.py `_model_identity`): once
the deployment's model identity changes, the time in service measured under the old model no longer sizes the
forecast floor (nor does the old model's figure on the status); the new variant's registry figures do until
its own are measured, and a FiguresReset event says so. Before, the old figures sized replicas through every
quiet window after the change."""

from __future__ import annotations

import pytest

from controlplane.controllers import autoscale_signals
from controlplane.controllers.autoscaler import AutoscalerController
from gpumesh.v1 import deployment_service_pb2 as D
from gpumesh.v1 import model_service_pb2 as M
from tests.unit.test_autoscaler_controller import Manager, _forecast_rate, _pass, _predictive_deployment, replica


def variant(name: str, tokens_per_second: float, max_tokens: int, ttft: float) -> M.Variant:
    v = M.Variant(name=name, backend=M.BACKEND_VLLM, artifact=f"/models/{name}")
    v.measured["H100-80GB"].CopyFrom(M.Measurement(tokens_per_second=tokens_per_second, max_tokens=max_tokens,
                                                   ttft_seconds=ttft))
    return v


# model A's registry figures: 0.5 + 64/32 = 2.5 s; model B's: 0.2 + 16/20 = 1.0 s
VARIANTS = {"smol": variant("a-q4", 32, 64, 0.5), "big": variant("b-q8", 20, 16, 0.2)}


async def measured_under_a(monkeypatch):
    """A controller that measured 4 s in service under model A (4 in flight at 1 request/s)."""
    _forecast_rate(monkeypatch, {"chat": 1.5})
    r, _ = replica(1)
    dm = Manager(_predictive_deployment(), [r])
    dm._resolve = lambda spec: (VARIANTS[spec.model], (2 if spec.model == "smol" else 4) << 30)
    clock = [1.0]
    ctl = AutoscalerController(dm, dm.registry, clock=lambda: clock[0], forecast_every=0)
    total = 0.0
    dm.store.loads["r-1"] = replica(1, total=total, at=1)[1]
    await _pass(ctl)
    for t in range(2, 6):
        clock[0], total = float(t), total + 1
        dm.store.loads["r-1"] = replica(1, running=4, total=total, at=t)[1]
        d = await _pass(ctl)
    assert d.signals["service_s"] == pytest.approx(4.0) and d.desired == 6          # 1.5/s x 4 s
    return dm, ctl, clock, total


def edit(dm: Manager, **fields) -> None:
    d = D.Deployment()
    d.CopyFrom(dm.store.deployments["chat"])
    for k, v in fields.items():
        setattr(d.spec, k, v)
    dm.store.deployments["chat"] = d


async def test_a_model_change_drops_the_figures_measured_under_the_old_model(monkeypatch):
    dm, ctl, clock, total = await measured_under_a(monkeypatch)
    assert dm.store.deployments["chat"].status.autoscaler.signals["service_s"] == pytest.approx(4.0)
    edit(dm, model="big")                    # DeploymentService.Update to model B
    for t in (6, 7, 30):                     # quiet (no request): A's 4 s were kept, inside the window and after
        clock[0] = float(t)
        dm.store.loads["r-1"] = replica(1, running=0, total=total, at=t)[1]
        d = await _pass(ctl)
        assert d.signals["service_s"] == pytest.approx(1.0), (t, d.reason)           # B's registry figure
        assert d.signals["ttft_free_s"] == pytest.approx(0.2)
        assert d.signals["forecast_upper"] == pytest.approx(1.5)                   # 1.5/s x 1 s, not x 4 s
    assert d.desired == 2           # (past the windows: the load seen under A no longer panics)
    assert ctl.states["chat"].figures_from == "registry"
    resets = [e for e in dm.events if e[1] == "FiguresReset"]
    assert len(resets) == 1 and resets[0][0] == "Normal"
    assert "model 'smol' -> 'big'" in resets[0][2] and "variant 'a-q4' -> 'b-q8'" in resets[0][2]
    assert "service 4 s" in resets[0][2]
    # B's own requests measure B's figures (2 in flight at 1 request/s: 2 s)
    for t in range(31, 35):
        clock[0], total = float(t), total + 1
        dm.store.loads["r-1"] = replica(1, running=2, total=total, at=t)[1]
        d = await _pass(ctl)
    assert d.signals["service_s"] == pytest.approx(2.0) and ctl.states["chat"].figures_from == "measured"


async def test_no_figures_of_the_new_model_means_no_floor_not_the_old_ones(monkeypatch):
    dm, ctl, clock, total = await measured_under_a(monkeypatch)
    VARIANTS_B = dict(VARIANTS, big=M.Variant(name="b-q8", backend=M.BACKEND_VLLM))     # B never benched
    dm._resolve = lambda spec: (VARIANTS_B[spec.model], 4 << 30)
    edit(dm, model="big")
    clock[0] = 6.0
    dm.store.loads["r-1"] = replica(1, running=0, total=total, at=6)[1]
    d = await _pass(ctl)
    assert "service_s" not in d.signals and "forecast_upper" not in d.signals, d.reason


@pytest.mark.parametrize("change", [dict(replicas=3), dict(restart_stamp="now"), dict(priority=7)])
async def test_what_does_not_change_the_model_keeps_the_figures(monkeypatch, change):
    dm, ctl, clock, total = await measured_under_a(monkeypatch)
    edit(dm, **change)
    clock[0] = 6.0
    dm.store.loads["r-1"] = replica(1, running=0, total=total, at=6)[1]
    d = await _pass(ctl)
    assert d.signals["service_s"] == pytest.approx(4.0) and not [e for e in dm.events if e[1] == "FiguresReset"]


def test_the_identity_covers_what_changes_a_requests_speed():
    v = VARIANTS["smol"]
    spec = D.DeploymentSpec(name="chat", model="smol", variant="a-q4")
    base = autoscale_signals.model_identity(spec, v, 2 << 30)
    for field, value in (("concurrency", 8), ("gpu_layers", 20), ("device", "cpu"), ("context", 4096)):
        other = D.DeploymentSpec()
        other.CopyFrom(spec)
        setattr(other.backend, field, value)
        assert autoscale_signals.model_identity(other, v, 2 << 30) != base, field
    assert autoscale_signals.model_identity(spec, v, 4 << 30) != base                 # another slice size
    assert autoscale_signals.model_identity(spec, v, 2 << 30, D.DeploymentSpec(model="smol", variant="q2")) != base
    assert autoscale_signals.model_identity(spec, None, 0) is None                    # unresolved: not compared


async def test_a_new_leader_ignores_status_figures_of_another_model(monkeypatch):
    """The status names the model identity its figures describe (`figures_model`): a leader that takes over
    after a model change the previous one had not yet written figures for sizes with the new variant's registry
    figures, not the old model's on the status; figures of the same identity, or of a status written before the
    field, are used."""
    dm, ctl, clock, total = await measured_under_a(monkeypatch)
    status = dm.store.deployments["chat"].status.autoscaler
    assert status.figures_model == autoscale_signals.identity_digest(ctl.states["chat"].identity) != ""
    assert status.signals["service_s"] == pytest.approx(4.0)

    async def new_leader(model: str, figures_model: str | None):
        d = D.Deployment()
        d.CopyFrom(dm.store.deployments["chat"])
        d.spec.model = model
        if figures_model is not None:
            d.status.autoscaler.figures_model = figures_model
        dm.store.deployments["chat"] = d
        leader = AutoscalerController(dm, dm.registry, clock=lambda: clock[0], forecast_every=0)
        clock[0] += 1
        dm.store.loads["r-1"] = replica(1, running=0, total=total, at=clock[0])[1]
        return leader, await _pass(leader)

    leader, d = await new_leader("big", None)             # the status still names model A's identity
    assert d.signals["service_s"] == pytest.approx(1.0) and leader.states["chat"].figures_from == "registry"
    assert dm.store.deployments["chat"].status.autoscaler.figures_model == \
        autoscale_signals.identity_digest(leader.states["chat"].identity)       # rewritten for model B at once
    dm.store.deployments["chat"].status.autoscaler.signals["service_s"] = 3.0  # (B's, as a leader would write)
    leader, d = await new_leader("big", None)
    assert d.signals["service_s"] == pytest.approx(3.0) and leader.states["chat"].figures_from == "status"
    leader, d = await new_leader("big", "")               # written by a version without the field: as before
    assert d.signals["service_s"] == pytest.approx(3.0) and leader.states["chat"].figures_from == "status"
