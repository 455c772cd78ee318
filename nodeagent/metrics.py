"""Prometheus metrics of the agent (served on `metrics_listen`)."""

from prometheus_client import REGISTRY, Counter, Gauge

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


class TenantDisk:
    """Disk use and limits of each tenant on this node (user quotas: nodeagent/isolation/diskquota.py), read
    when scraped. `source`: a callable giving (tenant, Usage) pairs; None while the quota is off."""

    def __init__(self) -> None:
        self.source = None

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily
        if self.source is None:
            return
        used = GaugeMetricFamily("gpumesh_agent_tenant_disk_bytes", "Bytes a tenant's uid holds on the filesystem "
                                 "of the agent's state directory (its user quota's usage)", labels=["tenant"])
        limit = GaugeMetricFamily("gpumesh_agent_tenant_disk_limit_bytes", "The tenant's disk quota there "
                                  "(workload_disk_quota; 0: none)", labels=["tenant"])
        files = GaugeMetricFamily("gpumesh_agent_tenant_disk_inodes", "Files (inodes) a tenant's uid holds there",
                                  labels=["tenant"])
        try:
            for tenant, u in self.source():
                used.add_metric([tenant], u.bytes)
                limit.add_metric([tenant], u.bytes_limit)
                files.add_metric([tenant], u.inodes)
        except OSError:
            return          # the filesystem went away: no samples rather than a failed scrape
        yield from (used, limit, files)


TENANT_DISK = TenantDisk()
REGISTRY.register(TENANT_DISK)
