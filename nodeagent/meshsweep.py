"""A starting agent removes the mesh segments that a killed run of its own left and no record names.

A buffer's segment outlives the agent on purpose (a restarted agent re-adopts
it from its record, nodeagent/meshrecords.py). But the segment exists a little
before its record is written (registration) and a little after the record is
dropped (deregistration), and the records directory can be lost: an agent
killed (SIGKILL, OOM) in such a moment leaves a segment that nothing names, and
before this sweep it stayed in /dev/shm until a reboot.

Which segments are whose: a segment's name (`gpumesh-b-<connection>-<slice>`)
does not say which agent made it, and several agents can share a host (a local
cluster, the tests). Its header does: the agent writes its `owner_tag` (its
node and records directory, mesh/transport/shm.py) into every segment it makes
or re-adopts. The sweep, run once when the registrar starts (before it
registers anything, after it has loaded its records), removes a segment only
when all of these hold:

* its header carries this agent's owner tag (another agent's, or one made by an
  agent before the tag existed, is left alone);
* no record of this agent names it (those are what the control plane recovers
  or revokes when the agent's Sync stream opens);
* this process does not hold it, and the pid in its header is not a live
  process other than this one (an agent of the same node and directory running
  now: two test runs on one machine; a container's agent restarted as the same
  pid still sweeps its predecessor's).

Each removal is logged at WARNING; a link of it in a slice's private /dev/shm
(workload isolation) goes too, so the memory is freed.
"""

from __future__ import annotations

import logging
import os

from mesh.logs import log
from mesh.procs import pid_alive
from mesh.transport import shm

logger = logging.getLogger(__name__)


def sweep_orphan_segments(node: str, owner: bytes, keep: set[str], isolator=None) -> list[str]:
    """Unlink this agent's segments (header tag `owner`) that are not in `keep` (the names its records give)
    and no live process holds; the names removed."""
    me, removed = os.getpid(), []
    for name in shm.buffer_segments():
        if name in keep or name in shm._OWNED:          # noqa: SLF001 - this process's own live segments
            continue
        head = shm.segment_owner(name)
        if head is None or head[1] != owner or owner == shm.NO_OWNER:
            continue
        pid = head[0]
        if pid != me and 0 < pid < shm.PID_MAX and pid_alive(pid):
            continue
        if not shm.unlink_segment(name):
            continue
        links = _unshare(isolator, name)
        log(logger, logging.WARNING, "mesh segment left by a killed run of this agent removed: no buffer record "
            "names it", node=node, segment=name, owner_pid=pid, slice_links=links)
        removed.append(name)
    return removed


def _unshare(isolator, name: str) -> int:
    """Remove the links of `name` in the slices' private /dev/shm directories; how many there were."""
    root = getattr(isolator, "shm_root", "")
    try:
        slices = sorted(os.listdir(root)) if root else []
    except OSError:
        return 0
    n = 0
    for sid in slices:
        if sid.startswith("s-") and os.path.lexists(os.path.join(root, sid, name)):
            isolator.unshare_segment(sid, name)
            n += 1
    return n
