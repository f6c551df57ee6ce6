"""Throughput against latency from a benchmark result file (runs in ``.venv-bench``: matplotlib only).

One panel per model; one line per target and protocol, a point per concurrency (labelled), x = p50
latency (log scale), y = throughput (log scale too when it spans more than 20x). perf_analyzer's
figures for our server are dashed.

    .venv-bench/bin/python bench/plot_results.py bench/results/latest.json bench/results/throughput-latency.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

STYLE = {  # (target, protocol) -> colour, marker
    ("in-process", "in-process"): ("black", "o"),
    ("ours", "http"): ("tab:blue", "s"),
    ("ours", "grpc"): ("tab:cyan", "D"),
    ("kserve", "http"): ("tab:red", "^"),
    ("kserve", "grpc"): ("tab:orange", "v"),
    ("triton", "http"): ("tab:green", "P"),
    ("triton", "grpc"): ("tab:olive", "X"),
}


def series(report: dict[str, Any], model: str) -> dict[str, list[tuple[int, float, float]]]:
    """label -> [(concurrency, p50 ms, throughput)] sorted by concurrency."""
    lines: dict[str, list[tuple[int, float, float]]] = {}
    for m in report["measurements"]:
        if m["model"] != model or not m["latency_ms"]:
            continue
        label = m["target"] if m["target"] == "in-process" else f"{m['target']} {m['protocol']}"
        lines.setdefault(label, []).append((m["concurrency"], m["latency_ms"]["p50"], m["throughput_per_s"]))
    for p in report.get("perf_analyzer", []):
        if p["model"] != model or p["error"] or "p50" not in p["latency_ms"]:
            continue
        label = f"perf_analyzer ours {p['protocol']}"
        lines.setdefault(label, []).append((p["concurrency"], p["latency_ms"]["p50"], p["throughput_per_s"]))
    return {label: sorted(points) for label, points in lines.items()}


def style_for(label: str) -> dict[str, Any]:
    words = label.split()
    if words[0] == "perf_analyzer":
        colour, marker = STYLE.get(("ours", words[-1]), ("grey", "x"))
        return {"color": colour, "marker": marker, "linestyle": "--", "alpha": 0.6, "markerfacecolor": "none"}
    key = ("in-process", "in-process") if words[0] == "in-process" else (words[0], words[-1])
    colour, marker = STYLE.get(key, ("grey", "x"))
    return {"color": colour, "marker": marker, "linestyle": "-"}


def plot(report: dict[str, Any], png_path: Path) -> None:
    models = sorted({m["model"] for m in report["measurements"]})
    figure, axes = plt.subplots(1, max(1, len(models)), figsize=(6.5 * max(1, len(models)), 5), squeeze=False)
    for axis, model in zip(axes[0], models):
        for label, points in series(report, model).items():
            concurrency = [p[0] for p in points]
            latency = [p[1] for p in points]
            throughput = [p[2] for p in points]
            axis.plot(latency, throughput, label=label, **style_for(label))
            for c, x, y in zip(concurrency, latency, throughput):
                axis.annotate(f"c{c}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        axis.set_xscale("log")
        throughputs = [y for points in series(report, model).values() for _, _, y in points if y > 0]
        if throughputs and max(throughputs) / min(throughputs) > 20:
            # The in-process ceiling of a tiny model can be 100x the servers: keep both readable.
            axis.set_yscale("log")
        axis.set_xlabel("p50 latency (ms, log scale)")
        axis.set_ylabel("throughput (inferences/s)")
        axis.set_title(model)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    host = report.get("host", {})
    figure.suptitle(
        f"batch 1, closed loop, {report['settings']['duration_s']} s per point, "
        f"{host.get('cpus')} CPUs, {report['started_at']}",
        fontsize=9,
    )
    figure.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, dpi=110)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(f"usage: {argv[0]} RESULTS.json OUT.png", file=sys.stderr)
        return 2
    plot(json.loads(Path(argv[1]).read_text()), Path(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
