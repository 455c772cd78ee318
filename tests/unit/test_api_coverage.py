"""The product rule "everything the API offers is reachable from the SDK and meshctl", checked against the
protos: every rpc of every proto/gpumesh/v1/*_service.proto must be called by a method of the SDK (mesh/*.py,
through that service's stub), and some command of meshctl (tools/meshctl/*.py, not its benchmark and
local-cluster harness) must call that SDK method or one that calls it. A new rpc without either fails here,
naming it; the only exceptions are in INTERNAL, each with its reason. The meshctl side is a textual check
(`.method(` somewhere in a command's source), so it proves a call exists, not that its output is right: the
per-command tests (test_meshctl_*.py) do that.

How the SDK is read (ast, no imports run): a stub is an attribute assigned `XServiceStub(...)` or a property
that returns one (mesh/client.py's `self._slices`, the mixins' `_deploysvc` and the like), or a Stub built
inline; a method reaches an rpc when it names `<stub>.<Rpc>`, or calls (`self.m(...)`) a method that does."""

from __future__ import annotations

import ast
import importlib
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[2]

# rpcs that neither the SDK nor meshctl offers, with why. Keep this to what only the platform's own components
# call: an rpc that an operator or a program could use belongs in the SDK and meshctl.
INTERNAL = {
    "NodeService.Register": "agent-only: a node agent announces itself with its node identity (agent certificate)",
    "NodeService.Heartbeat": "agent-only: keeps the registering agent's etcd lease alive",
    "NodeService.Sync": "agent-only: the agent's reconciliation stream (desired slices down, actual state up)",
}


def services() -> dict[str, list[str]]:
    """Service name -> its rpc names, from the generated descriptors of every *_service.proto."""
    found = {}
    for proto in sorted((ROOT / "proto" / "gpumesh" / "v1").glob("*_service.proto")):
        module = importlib.import_module(f"gpumesh.v1.{proto.stem}_pb2")
        for name, svc in module.DESCRIPTOR.services_by_name.items():
            found[name] = [m.name for m in svc.methods]
    return found


def _stub_service(node: ast.AST) -> str | None:
    """'SliceService' for a call `...SliceServiceStub(...)`, else None."""
    if isinstance(node, ast.Call):
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        if name.endswith("ServiceStub"):
            return name[:-len("Stub")]
    return None


def sdk_reach() -> dict[str, set[str]]:
    """'Service.Rpc' -> the SDK methods (public or not) that call it, directly or through other methods."""
    direct: dict[str, set[str]] = {}
    calls: dict[str, set[str]] = {}          # method -> the self.methods it calls
    for path in sorted((ROOT / "mesh").glob("*.py")):
        tree = ast.parse(path.read_text())
        stubs: dict[str, str] = {}           # attribute or property name -> service, in this file
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and _stub_service(node.value):
                for t in node.targets:
                    if isinstance(t, ast.Attribute):
                        stubs[t.attr] = _stub_service(node.value)
            if isinstance(node, ast.FunctionDef):
                for sub in ast.walk(node):
                    if _stub_service(sub) and any(isinstance(d, ast.Name) and d.id == "property"
                                                  for d in node.decorator_list):
                        stubs[node.name] = _stub_service(sub)
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            for fn in (n for n in cls.body if isinstance(n, ast.FunctionDef)):
                for sub in ast.walk(fn):
                    if not isinstance(sub, ast.Attribute):
                        continue
                    owner = sub.value
                    service = (_stub_service(owner) or (stubs.get(owner.attr) if isinstance(owner, ast.Attribute)
                                                        and isinstance(owner.value, ast.Name)
                                                        and owner.value.id == "self" else None))
                    if service:
                        direct.setdefault(f"{service}.{sub.attr}", set()).add(fn.name)
                    elif isinstance(owner, ast.Name) and owner.id == "self":
                        calls.setdefault(fn.name, set()).add(sub.attr)
    reach = {rpc: set(methods) for rpc, methods in direct.items()}
    for methods in reach.values():
        grew = True
        while grew:
            more = {m for m, callees in calls.items() if callees & methods} - methods
            methods |= more
            grew = bool(more)
    return reach


# meshctl files that use the API for their own ends (benchmarks, `meshctl up`'s local cluster and its demo)
# rather than offering it: a call there does not make an rpc reachable to an operator.
HARNESS = re.compile(r"^(bench.*|demo_.*|cluster)\.py$")


def meshctl_source() -> str:
    return "\n".join(p.read_text() for p in sorted((ROOT / "tools" / "meshctl").glob("*.py"))
                     if not HARNESS.match(p.name))


def coverage() -> dict[str, tuple[set[str], set[str]]]:
    """'Service.Rpc' -> (SDK methods that reach it, those of them meshctl calls): the audit's table."""
    reach, cli = sdk_reach(), meshctl_source()
    table = {}
    for service, rpcs in services().items():
        for rpc in rpcs:
            key = f"{service}.{rpc}"
            methods = {m for m in reach.get(key, set()) if not m.startswith("_")}
            table[key] = (methods, {m for m in methods if re.search(rf"\.{m}\(", cli)})
    return table


def test_every_rpc_has_an_sdk_method():
    missing = [rpc for rpc, (sdk, _) in coverage().items() if not sdk and rpc not in INTERNAL]
    assert not missing, (f"rpcs with no SDK method (add one to mesh/, with typed errors and a docstring, or, if "
                         f"only the platform's own components call it, to INTERNAL with why): {missing}")


def test_every_rpc_is_reachable_from_meshctl():
    missing = [f"{rpc} (SDK: {', '.join(sorted(sdk)) or 'none'})" for rpc, (sdk, cli) in coverage().items()
               if not cli and rpc not in INTERNAL]
    assert not missing, f"rpcs that no meshctl command reaches (add a subcommand in tools/meshctl/): {missing}"


def test_the_internal_list_is_honest():
    """Each exception names an rpc that exists, is not offered after all, and says why."""
    table = coverage()
    for rpc, why in INTERNAL.items():
        assert rpc in table, f"INTERNAL names {rpc}, which no *_service.proto defines"
        assert not table[rpc][0], f"{rpc} is in INTERNAL but the SDK offers it ({table[rpc][0]}): drop it there"
        assert len(why) > 20, f"INTERNAL[{rpc!r}] must say why it is internal"


def test_the_reader_sees_through_stubs_and_helpers():
    """The ast reading itself: a mixin's property stub, an inline Stub, a helper called by name, client.py's
    attribute stubs; so a pass above means something."""
    table = coverage()
    assert "get_cost" in table["CostService.GetCost"][1]                          # property stub (_costsvc)
    assert {"watch_serving_view", "serving_view", "replica_api_keys"} <= table["ServingViewService.Watch"][0]
    assert "edit_deployment" in table["DeploymentService.Update"][1]              # via update_deployment
    assert "allocate" in table["SliceService.Allocate"][1]                        # attribute stub (_slices)
    assert "generate" in table["InferenceService.Generate"][0]
    assert len(table) == sum(len(r) for r in services().values()) > 60


def test_a_new_rpc_without_a_method_is_named(monkeypatch):
    """What a proto change without an SDK method (or a meshctl command) looks like here."""
    import sys
    real = services()
    monkeypatch.setattr(sys.modules[__name__], "services",
                        lambda: {**real, "SliceService": real["SliceService"] + ["Resurrect"]})
    for check in (test_every_rpc_has_an_sdk_method, test_every_rpc_is_reachable_from_meshctl):
        try:
            check()
        except AssertionError as exc:
            assert "SliceService.Resurrect" in str(exc) and "SliceService.Allocate" not in str(exc)
        else:
            raise AssertionError(f"{check.__name__} let an rpc without an SDK method pass")
