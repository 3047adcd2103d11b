"""What `python -m training.evaluate` shows of a report: the console table and the PNG plot.

A report lists its conditions (`report["conditions"]`, in order) and one row per number of
segments: exact match for the memory tasks, loss and perplexity (and loss by segment index) for
text.
"""

from __future__ import annotations

from pathlib import Path


def format_table(report: dict) -> str:
    metric = report["metric"]
    header = f"{'segments':>8} {'tokens':>7} " + " ".join(f"{c:>13}" for c in report["conditions"])
    lines = [f"{report['task']} ({metric}; {report['model']['model']})", header]
    for row in report["results"]:
        cells = []
        for c in report["conditions"]:
            cells.append(f"{row[c]['exact_match']:>13.3f}" if metric == "exact_match"
                         else f"{row[c]['loss']:>6.3f} ({row[c]['ppl']:>5.1f})")
        lines.append(f"{row['num_segments']:>8} {row['tokens']:>7} " + " ".join(cells))
    if "generate_check" in report:
        g = report["generate_check"]
        lines.append(f"generate() re-check: {g['agree']}/{g['samples']} samples agree with teacher-forced exact match")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    xs = [r["num_segments"] for r in rows]
    metric = "exact_match" if report["metric"] == "exact_match" else "loss"
    panels = 1 if metric == "exact_match" else 2
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for c in report["conditions"]:
        ax.plot(xs, [r[c][metric] for r in rows], marker="o", label=c)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("number of segments")
    ax.set_ylabel("exact match" if metric == "exact_match" else "loss (nats/token)")
    ax.set_title(f"{report['task']}: {metric.replace('_', ' ')} vs segments")
    ax.legend()
    if panels == 2:
        longest = rows[-1]
        ax = axes[0][1]
        for c in report["conditions"]:
            ax.plot(range(1, longest["num_segments"] + 1), longest[c]["segment_losses"], marker=".", label=c)
        ax.set_xlabel("segment index")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"loss by segment index ({longest['num_segments']} segments)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
