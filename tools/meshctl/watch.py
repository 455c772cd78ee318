"""`meshctl get slices|deployment NAME|migration ID -w`: the objects now, then a line per change (kubectl
get -w), over the Watch rpcs. Ctrl-C ends it (status 0); SIGTERM unwinds it (the stream is cancelled)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tools.meshctl.common import out


class Printer:
    """One line per change: a table row (the header once; column widths follow each row, as kubectl -w),
    a JSON object per line (`{"type": ..., "object": ...}`), or a YAML document per change."""

    def __init__(self, fmt: str, columns: list, event_column: bool = False) -> None:
        self.fmt = fmt
        self.columns = [c for c in columns if fmt == "wide" or not c[2]]
        self.event_column = event_column
        self.header_done = False

    def line(self, kind: str, doc: dict) -> str:
        from tools.meshctl.output import dump, render_table
        if self.fmt == "json":
            return json.dumps({"type": kind, "object": doc}) + "\n"
        if self.fmt == "yaml":
            return "---\n" + dump({"type": kind, "object": doc}, "yaml")
        headers = (["EVENT"] if self.event_column else []) + [c[0] for c in self.columns]
        row = ([kind] if self.event_column else []) + [c[1](doc) for c in self.columns]
        lines = render_table(headers, [row]).split("\n")
        text = ("" if self.header_done else lines[0] + "\n") + lines[1] + "\n"
        self.header_done = True
        return text

    def follow(self, changes: Iterable[tuple[str, dict]]) -> int:
        try:
            for kind, doc in changes:
                out(self.line(kind, doc))
        except KeyboardInterrupt:
            pass
        return 0


def slice_changes(watch: Any, keep: Callable[[dict], bool] = lambda d: True) -> Iterator[tuple[str, dict]]:
    """(ADDED|MODIFIED|DELETED, slice document) from a SliceWatch, initial state first; closes it at the end."""
    from gpumesh.v1 import slice_service_pb2 as S
    from mesh.client import slice_to_dict
    names = {S.SliceEvent.ADDED: "ADDED", S.SliceEvent.MODIFIED: "MODIFIED", S.SliceEvent.DELETED: "DELETED"}
    try:
        for ev in list(watch.initial) + [None]:
            if ev is None:
                break
            d = slice_to_dict(ev.slice)
            if keep(d):
                yield names.get(ev.type, "ADDED"), d
        for ev in watch:
            d = slice_to_dict(ev.slice)
            if keep(d):
                yield names.get(ev.type, "MODIFIED"), d
    finally:
        watch.close()


def object_changes(stream: Iterable[Any], to_dict: Callable[[Any], dict]) -> Iterator[tuple[str, dict]]:
    """A Watch that sends the whole object now and after each change: ADDED first, MODIFIED after, and
    unchanged repeats left out."""
    last = None
    for i, msg in enumerate(stream):
        d = to_dict(msg)
        if d == last:
            continue
        last = d
        yield ("ADDED" if i == 0 else "MODIFIED"), d


def watch_slices(mesh: Any, args: Any) -> int:
    from tools.meshctl.output import slice_columns
    state = (args.state or "").lower().replace("-", "_")
    names = set(args.names)

    def keep(d: dict) -> bool:
        return (not names or d["id"] in names or d["allocation_id"] in names) and (not state or d["state"] == state)
    w = mesh.watch_slices(tenant=args.tenant, node=args.node, send_initial=True)
    return Printer(args.output, slice_columns(), event_column=True).follow(slice_changes(w, keep))


def watch_deployment(mesh: Any, name: str, fmt: str) -> int:
    from mesh.deployapi import deployment_to_dict
    from tools.meshctl.deploy import deployment_columns
    return Printer(fmt, deployment_columns(), event_column=True).follow(
        object_changes(mesh.watch_deployment(name), deployment_to_dict))


def watch_migration(mesh: Any, id: str, fmt: str) -> int:
    from mesh.migrationapi import migration_to_dict
    from tools.meshctl.migrate import migration_columns
    return Printer(fmt, migration_columns(), event_column=True).follow(
        object_changes(mesh.watch_migration(id), migration_to_dict))
