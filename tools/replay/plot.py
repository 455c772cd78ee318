"""`meshctl replay --plot FILE.png`: per controller over time, the allocation waits, the GPUs at
critical memory pressure, the warm slices held and the migrations so far (one seed's run)."""

from __future__ import annotations

import os

from tools.meshctl.common import CliError

COLORS = {"none": "tab:gray", "reactive": "tab:orange", "predictive": "tab:blue"}


def check(path: str) -> None:
    """Before the replay runs: the file can be written and matplotlib is there."""
    if not path.lower().endswith(".png"):
        raise CliError(f"--plot: {path} must end in .png")
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise CliError(f"--plot: no directory {d}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError("--plot needs matplotlib: pip install .[sim]") from None


def draw(timelines: dict[str, list[dict]], path: str, title: str = "", bin_s: float = 3600.0) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(4, 1, figsize=(9, 8.5), sharex=True)
    for name, rows in timelines.items():
        if not rows:
            continue
        t0 = rows[0]["t"]
        hours = [(r["t"] - t0) / 3600 for r in rows]
        color = COLORS.get(name)
        # waits: the share of the allocations in each hour that waited for a carve, and the longest wait
        bins: dict[int, list[int]] = {}
        for r in rows:
            b = bins.setdefault(int((r["t"] - t0) // bin_s), [0, 0])
            b[0] += r["allocations"]
            b[1] += r["waited"]
        xs = sorted(bins)
        axes[0].step([x * bin_s / 3600 for x in xs], [100 * bins[x][1] / bins[x][0] if bins[x][0] else 0 for x in xs],
                     where="post", color=color, label=name, lw=1)
        axes[1].plot(hours, [r["critical"] for r in rows], color=color, label=name, lw=0.8)
        axes[2].plot(hours, [r["warm"] for r in rows], color=color, label=name, lw=0.8)
        axes[3].plot(hours, [r["migrations"] for r in rows], color=color, label=name, lw=1)
    labels = ("% of the hour's allocations\nthat waited for a carve", "GPUs at critical\nmemory pressure",
              "warm slices held", "migrations so far")
    for ax, label in zip(axes, labels):
        ax.set_ylabel(label, fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
    axes[0].legend(fontsize=8, loc="upper right")
    axes[-1].set_xlabel("hours into the replay window", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
