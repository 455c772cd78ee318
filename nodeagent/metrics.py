"""Prometheus metrics of the agent (served on `metrics_listen`)."""

from prometheus_client import Counter, Gauge

RECONNECTS = Counter("gpumesh_agent_reconnects_total", "Sessions to the control plane that ended", ["node"])
OPERATIONS = Counter("gpumesh_agent_slice_operations_total", "Slice operations on the GPUs",
                     ["node", "op", "result"])
SLICES = Gauge("gpumesh_agent_slices", "Slices realized on the node", ["node"])
ORPHANS = Counter("gpumesh_agent_orphans_removed_total", "MIG instances removed because no slice owned them",
                  ["node"])
FIREWALL_INTACT = Gauge("gpumesh_agent_firewall_intact", "1 when the last check found the nftables table of the "
                        "workloads' confinement as the agent applied it, 0 when it was missing or changed "
                        "(nodeagent/isolation/nftkeeper.py)", ["table"])
FIREWALL_REAPPLIED = Counter("gpumesh_agent_firewall_reapplied_total", "nftables tables of the workloads' "
                             "confinement applied again after they went missing or changed", ["table"])
