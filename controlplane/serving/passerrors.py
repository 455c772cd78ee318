"""A deployment whose reconcile failed (controlplane/serving/deployments.py `reconcile_all`): the pass goes on with
the other deployments, and the failure is logged (structured, with the deployment), counted
(`gpumesh_deployment_reconcile_errors_total`) and told on the deployment as a Warning event `ReconcileFailed`, once
while its error stays the same (the pass runs every second: a failure that lasts would otherwise repeat it every
pass), again when the error changes or comes back after a pass that succeeded."""

from __future__ import annotations

import logging

from prometheus_client import Counter

from mesh import errors

logger = logging.getLogger("controlplane.serving.deployments")
ERRORS = Counter("gpumesh_deployment_reconcile_errors_total", "Deployment controller passes that failed for a "
                 "deployment (the pass went on with the others)", ["deployment"])
MAX_MESSAGE = 500


def _text(e: BaseException) -> str:
    return (str(e) or type(e).__name__)[:MAX_MESSAGE]


class PassErrors:
    """`event(name, type, reason, message)`: the deployment's event (DeploymentManager._event)."""

    def __init__(self, event) -> None:
        self.event = event
        self.failing: dict[str, str] = {}       # deployment -> the error its last Warning told
        self.counted: set[str] = set()          # deployments with a series in ERRORS

    def failed(self, name: str, e: BaseException) -> None:
        ERRORS.labels(name).inc()
        self.counted.add(name)
        text = _text(e)
        fields = {"deployment": name, "error": f"{type(e).__name__}: {text}"}
        # a MeshError is an outcome (etcd refused, a replica's slice gone); anything else is a bug: its traceback
        logger.error("deployment reconcile failed; the pass goes on with the other deployments",
                     exc_info=None if isinstance(e, errors.MeshError) else e, extra={"fields": fields})
        if self.failing.get(name) == text:
            return
        self.failing[name] = text
        try:
            self.event(name, "Warning", "ReconcileFailed", f"the deployment controller could not reconcile this "
                       f"deployment (retried every pass; the other deployments go on): {text}")
        except Exception:   # noqa: BLE001 - the event is best effort
            logger.exception("reconcile failure event of %s not recorded", name)

    def succeeded(self, name: str) -> None:
        self.failing.pop(name, None)

    def keep_only(self, names: set[str]) -> None:
        """Forget the deployments gone (their series go from the metric)."""
        for name in set(self.failing) - names:
            del self.failing[name]
        for name in self.counted - names:
            self.counted.discard(name)
            try:
                ERRORS.remove(name)
            except KeyError:
                pass
