"""What the agent's mesh registrar registered, on disk: what a restarted agent can recover.

A registered host buffer's memory is a POSIX shared memory segment; it
outlives the agent process (mesh/transport/shm.py). One small JSON file per
buffer (`<state_dir>/mesh/<node>/<buffer id>.json`, mode 0600) says which
connection and slice it was registered for, its transport, size, segment and
base address, so that after a restart the agent can report it (`MeshHello
.recoverable`), re-adopt it when the control plane asks (`MeshRegister
.recover`), or unlink it when no connection knows it any more. The secret is
never written here: the control plane holds it and sends it with the request.
"""

from __future__ import annotations

import json
import logging
import os
import re

from mesh.fsmodes import replace_private
from mesh.logs import log

logger = logging.getLogger(__name__)
FIELDS = {"buffer_id": str, "connection_id": str, "slice_id": str, "transport": str, "size": int,
          "shm_name": str, "address": int}
BUFFER_ID = re.compile(r"^b-[A-Za-z0-9_.-]{1,58}$")
SLICE_ID = re.compile(r"^s-[A-Za-z0-9_.-]{1,60}$")
SEGMENT_PREFIX = "gpumesh-"      # mesh/transport/shm.py PREFIX: a buffer's segment is PREFIX + its id


class BufferRecords:
    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def _path(self, buffer_id: str) -> str:
        if not BUFFER_ID.match(buffer_id):
            raise ValueError(f"buffer_id: {buffer_id!r} is not a buffer id (b-...)")
        return os.path.join(self.directory, buffer_id + ".json")

    def save(self, record: dict) -> None:
        rec = {k: t(record[k]) for k, t in FIELDS.items()}
        replace_private(self._path(rec["buffer_id"]), json.dumps(rec))

    def drop(self, buffer_id: str) -> None:
        try:
            os.unlink(self._path(buffer_id))
        except (OSError, ValueError):
            pass

    def get(self, buffer_id: str) -> dict | None:
        return self.load().get(buffer_id)

    def load(self) -> dict[str, dict]:
        """Every well-formed record by buffer id (a malformed file is logged and skipped)."""
        out: dict[str, dict] = {}
        try:
            names = sorted(os.listdir(self.directory))
        except OSError:
            return out
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue
            try:
                with open(os.path.join(self.directory, name)) as f:
                    raw = json.load(f)
                rec = {k: t(raw[k]) for k, t in FIELDS.items()}
                if rec["buffer_id"] + ".json" != name or not BUFFER_ID.match(rec["buffer_id"]):
                    raise ValueError("the buffer id does not match the file name")
                if not SLICE_ID.match(rec["slice_id"]):
                    raise ValueError(f"slice_id {rec['slice_id']!r} is not a slice id")
                if rec["shm_name"] and rec["shm_name"] != SEGMENT_PREFIX + rec["buffer_id"]:
                    raise ValueError(f"shm_name {rec['shm_name']!r} is not the buffer's segment")
            except (OSError, ValueError, KeyError, TypeError) as e:
                log(logger, logging.WARNING, "skipping a malformed mesh buffer record", file=name, error=str(e))
                continue
            out[rec["buffer_id"]] = rec
        return out
