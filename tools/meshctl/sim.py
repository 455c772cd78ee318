"""`meshctl sim`: replay the Alibaba GPU trace through the control plane's scheduler.

No gRPC, no etcd: the scheduler's own framework and plugins (the code behind Allocate) place the
trace's pods on an in-memory fleet of the trace's nodes. Arrival mode follows the FGD paper's
artifact: pods shuffled by seed, topped up with random draws from the trace until the GPUs asked
for reach --load-max of capacity, no departures, a pod that fits nowhere is skipped. The curve
gives unallocated and fragmented GPUs at every --step of arrived load, averaged over seeds. The
scheduler learns the request mix from the arrivals, as the live control plane does (--mix online),
or gets the whole trace's mix up front, as the artifact does (--mix trace).
"""

from __future__ import annotations

import argparse
import functools
import os

from tools.meshctl.common import CliError, info, out, positive_float, positive_int, subcommand

EPILOG = """\
examples:
  meshctl sim --policy default --seeds 10 -o json
  meshctl sim --policy default,fgd --mix trace --seeds 10   # the artifact's protocol: the trace's mix up front
  meshctl sim --policy random,packing,bestfit,fgd,default --seeds 10 --plot curves.png
  meshctl sim --pods gpushare100 --policy default,fgd
  meshctl sim --nodes all_node --pods cpu050 --policy bestfit
  meshctl sim --mode timeline --policy default,fgd --seeds 3
  meshctl sim --policy packing --node-order file

--nodes and --pods take a trace file name (gpu_node, all_node; default, gpushare40, cpu050,
...) under the trace directory ($MESH_TRACE_DIR or ../shared/traces/alibaba-gpu-v2023), or a path.
--mix online (the default) lets the scheduler learn the request mix from the arrivals, as the live
control plane does; --mix trace gives it the whole trace's mix up front, as the FGD artifact does.
With -o json one policy prints {"policy", "mix", "seeds", "capacity_gpus", "curve": [{"load",
"unallocated_gpus", "fragmented_gpus"}, ...], ...}; several print a list of those. Ties between equal
scores go to the smallest node name: names get a seeded random prefix by default, as the artifact's node
names are; --node-order file keeps the list's order. Timeline curves are averaged over seeds too.
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = subcommand(sub, "sim", help="replay the Alibaba GPU trace through the scheduler",
                   description=__doc__.split("\n\n", 1)[1], epilog=EPILOG, skip=("timeout",))
    p.add_argument("--nodes", default="gpu_node", metavar="FILE", help="node list (default: gpu_node)")
    p.add_argument("--pods", default="default", metavar="FILE", help="pod list (default: default)")
    p.add_argument("--trace-dir", default="", metavar="DIR", help="where the openb_*.csv files are")
    p.add_argument("--policy", default="default", metavar="NAME[,NAME...]",
                   help="scheduler profile(s): default, fgd, fgd-exact, bestfit, packing, spread, random")
    p.add_argument("--seeds", type=positive_int, default=10, metavar="N", help="seeds 0..N-1 (default: 10)")
    p.add_argument("--load-max", type=positive_float, default=1.3, metavar="X",
                   help="arrived GPUs as a fraction of capacity where arrivals stop (default: 1.3)")
    p.add_argument("--step", type=positive_float, default=0.01, metavar="X",
                   help="curve resolution in arrived load (default: 0.01)")
    p.add_argument("--mode", choices=("arrivals", "timeline"), default="arrivals",
                   help="arrivals (the artifact's protocol) or timeline (creation/deletion times, departures)")
    p.add_argument("--node-order", choices=("shuffled", "file"), default="shuffled",
                   help="node order that breaks ties: shuffled per seed, as the artifact does (default), or the file's")
    p.add_argument("--mix", choices=("online", "trace"), default="online",
                   help="the request mix the scheduler weighs fragmentation by: online, learned from a sliding "
                        "window of arrivals as the live control plane does (default), or trace, the whole trace's "
                        "up front as the FGD artifact does")
    p.add_argument("--at", type=float, default=1.0, metavar="LOAD", help="load of the table's columns (default: 1.0)")
    p.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1, metavar="N",
                   help="worker processes (default: the CPU count)")
    p.add_argument("--plot", metavar="FILE.png", help="draw the policies' curves (needs matplotlib: pip install .[sim])")
    p.set_defaults(func=run_sim)


@functools.lru_cache(maxsize=4)
def _load(nodes_path: str, pods_path: str):
    from tools.replay import sim, trace
    nodes, pods = trace.load_nodes(nodes_path), trace.load_pods(pods_path)
    return nodes, pods, sim.typical_mix(pods)


def _one(task: tuple) -> dict:
    from tools.replay import sim
    mode, nodes_path, pods_path, policy, seed, load_max, step, order, mix_mode = task
    nodes, pods, mix = _load(nodes_path, pods_path)
    if mode == "timeline":
        r = sim.run_timeline(nodes, pods, policy, seed, mix=mix, order=order, mix_mode=mix_mode)
    else:
        r = sim.run_arrivals(nodes, pods, policy, seed, load_max=load_max, step=step, mix=mix, order=order,
                             mix_mode=mix_mode)
    return {"policy": policy, "seed": seed, "capacity": r.capacity_gpus, "curve": r.curve, "placed": r.placed,
            "skipped": r.skipped, "decisions": r.decisions, "seconds": r.seconds}


def simulate(nodes: str, pods: str, policies: list[str], seeds: int, load_max: float = 1.3, step: float = 0.01,
             mode: str = "arrivals", jobs: int = 1, trace_dir: str = "", progress=None,
             order: str = "shuffled", mix: str = "online") -> list[dict]:
    """One result document per policy (the shape `-o json` prints); `mix`: how the scheduler gets the
    request mix (`online`: learned from the arrivals, as the live control plane does; `trace`: the
    whole trace's, up front, as the FGD artifact does)."""
    from tools.replay import sim, trace
    nodes_path, pods_path = trace.trace_path(nodes, trace_dir, "node"), trace.trace_path(pods, trace_dir, "pod")
    for what, path in (("--nodes", nodes_path), ("--pods", pods_path)):
        if not os.path.exists(path):
            raise CliError(f"{what}: no trace file {path}")
    for pol in policies:
        if pol not in sim.POLICIES:
            raise CliError(f"--policy: unknown policy {pol!r}; allowed: {', '.join(sim.POLICIES)}")
    if mix not in sim.MIX_MODES:
        raise CliError(f"--mix: unknown mode {mix!r}; allowed: {', '.join(sim.MIX_MODES)}")
    tasks = [(mode, nodes_path, pods_path, pol, seed, load_max, step, order, mix) for pol in policies
             for seed in range(seeds)]
    results: list[dict] = []
    if jobs > 1 and len(tasks) > 1:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(max_workers=min(jobs, len(tasks))) as pool:
            for r in pool.map(_one, tasks):
                results.append(r)
                if progress:
                    progress(r)
    else:
        for t in tasks:
            results.append(_one(t))
            if progress:
                progress(results[-1])
    docs = []
    for pol in policies:
        runs = [sim.Run(r["policy"], r["seed"], r["capacity"], r["curve"], r["placed"], r["skipped"],
                        r["decisions"], r["seconds"]) for r in results if r["policy"] == pol]
        decisions = sum(r.decisions for r in runs)
        docs.append({"policy": pol, "seeds": seeds, "capacity_gpus": runs[0].capacity_gpus,
                     "nodes": os.path.basename(nodes_path), "pods": os.path.basename(pods_path), "mode": mode,
                     "skipped_pods": round(sum(r.skipped for r in runs) / len(runs), 1),
                     "ms_per_decision": round(1000 * sum(r.seconds for r in runs) / max(1, decisions), 3),
                     "node_order": order, "mix": mix,
                     "curve": sim.average(runs, step) if mode == "arrivals" else sim.average_timeline(runs)})
    return docs


def plot(docs: list[dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CliError("--plot needs matplotlib: pip install 'gpumesh[sim]'") from None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for d in docs:
        xs = [100 * p["load"] for p in d["curve"]]
        label = f"{d['policy']} ({d['seeds']} seed{'s' if d['seeds'] > 1 else ''})"
        axes[0].plot(xs, [p["unallocated_gpus"] for p in d["curve"]], label=label)
        axes[1].plot(xs, [p["fragmented_gpus"] for p in d["curve"]], label=label)
    for ax, what in zip(axes, ("unallocated GPUs", "fragmented GPUs")):
        ax.set_xlabel("arrived GPU requests (% of capacity)")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        ax.legend()
    d = docs[0]
    fig.suptitle(f"{d['pods']} on {d['nodes']} ({d['capacity_gpus']} GPUs)")
    axes[0].set_xlim(0, None)
    axes[0].set_ylim(0, None)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_sim(args: argparse.Namespace) -> int:
    from tools.meshctl.output import dump, render_table
    from tools.replay import sim
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    total = len(policies) * args.seeds
    done = [0]
    from tools.meshctl.progress import for_args
    say = for_args(args).step                  # quiet with -o json|yaml

    def progress(r: dict) -> None:
        done[0] += 1
        point = sim.at_load(r["curve"], args.at) or {}
        say(f"[{done[0]}/{total}] {r['policy']} seed {r['seed']}: {point.get('unallocated_gpus')} unallocated GPUs "
             f"at {100 * args.at:g}% load, {r['seconds']:.1f}s")

    docs = simulate(args.nodes, args.pods, policies, args.seeds, args.load_max, args.step, args.mode, args.jobs,
                    args.trace_dir, progress, args.node_order, args.mix)
    if args.plot:
        plot(docs, args.plot)
        info(f"wrote {args.plot}")
    if args.output in ("json", "yaml"):
        out(dump(docs[0] if len(docs) == 1 else docs, args.output))
        return 0
    rows = []
    for d in docs:
        p = sim.at_load(d["curve"], args.at) or {}
        rows.append([d["policy"], d["mix"], d["capacity_gpus"], p.get("unallocated_gpus"), p.get("fragmented_gpus"),
                     d["skipped_pods"], d["ms_per_decision"]])
    out(render_table(["POLICY", "MIX", "GPUS", f"UNALLOCATED@{100 * args.at:g}%", f"FRAGMENTED@{100 * args.at:g}%",
                      "SKIPPED PODS", "MS/DECISION"], rows))
    return 0
