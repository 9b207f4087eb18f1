"""Human-facing output shared by the CLI and benchmarks: a results table and a bar chart."""
from __future__ import annotations

import json
from pathlib import Path

COLUMNS = ("R@1", "R@5", "R@10", "MdR", "MRR@10", "queries_per_s")


def format_table(records: list[dict], title: str = "") -> str:
    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.1f}" if abs(value) >= 1 or value == 0 else f"{value:.3f}"
        return str(value)

    header = ["method", "protocol", *COLUMNS]
    rows = [[str(r.get("method")), str(r.get("protocol"))] + [cell(r.get(c)) for c in COLUMNS] for r in records]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = [title] if title else []
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def write_metrics(records: list[dict], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(records, indent=2))
    return path


def plot_recall(records: list[dict], path: Path, title: str) -> Path:
    """Grouped bars of R@1/5/10 per method, queries/s in the legend labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = ("R@1", "R@5", "R@10")
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / max(len(records), 1)
    for i, rec in enumerate(records):
        xs = [j + i * width for j in range(len(ks))]
        label = f"{rec['method']} ({rec.get('queries_per_s', 0):.0f} q/s)"
        bars = ax.bar(xs, [rec[k] for k in ks], width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([j + width * (len(records) - 1) / 2 for j in range(len(ks))], ks)
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
