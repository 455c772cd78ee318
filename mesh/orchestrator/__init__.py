"""The orchestrator's rules, pure (no gRPC, no etcd, no clock of their own): a fleet view and
forecasts in, actions with their reasons out. The leader-only controller and `meshctl replay` call
the same functions (docs/prediction.md, "The orchestrator").

    from mesh.orchestrator import warm_actions, move_actions, resize_actions
"""

from mesh.orchestrator.actions import Action
from mesh.orchestrator.moves import GpuView, MoveLedger, MovePolicy, WorkloadView, move_actions
from mesh.orchestrator.resize import ResizePolicy, SliceView, resize_actions
from mesh.orchestrator.warm import WarmPolicy, burst_quantile, warm_actions, warm_need

__all__ = ["Action", "GpuView", "MoveLedger", "MovePolicy", "ResizePolicy", "SliceView", "WarmPolicy",
           "WorkloadView", "burst_quantile", "move_actions", "resize_actions", "warm_actions", "warm_need"]
