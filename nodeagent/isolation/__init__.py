"""Confinement of the workloads the agent starts (issue 10, section 1).

One responsibility per module:

- `users`: which unprivileged uid/gid a tenant's workloads run as (configured map or a range).
- `probe`: what the host kernel offers (setuid, no_new_privs, namespaces, cgroup v1/v2, dmem).
- `cgroups`: per-workload memory/CPU/pids (and v1 devices) limits, v1 or v2 behind one protocol.
- `devices`: the device nodes a slice may open (real /dev, or the simulated host's stand-ins).
- `confine`: the in-namespace init that builds the private view and drops privileges
  (standard library only: the shim runs it by path).
- `plan`: the agent side, putting the pieces together into one spec per workload.
"""

from nodeagent.isolation.plan import ConfinePlan, Isolator, IsolationSettings   # noqa: F401
