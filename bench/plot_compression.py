"""Rate-distortion plot of bench/eval_compression.py's JSON (run with a Python that has matplotlib)."""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(source: str, target: str) -> None:
    result = json.loads(open(source).read())
    figure, axis = plt.subplots(figsize=(7, 4.5))
    curves: dict[str, list[tuple[float, float]]] = {}
    for point in result["baselines"] + result["ours"] + result.get("rvq", []):
        if "lossless" not in point["codec"]:
            curves.setdefault(point["codec"], []).append((point["bpp"], point["rms_percent"]))
    for codec, points in curves.items():
        points.sort()
        label = "transform coder (learned)" if codec == "ours (learned)" else codec
        axis.plot([b for b, _ in points], [r for _, r in points], marker="o", label=label)
    axis.set_xlabel("bits per pixel (10 bands, file bits / (N x 14,400))")
    axis.set_ylabel("RMS error, % of 10,000 DN")
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.grid(True, which="both", alpha=0.3)
    axis.set_title(f"{result['patches']} validation patches, {len(result['scenes'])} unseen scenes")
    axis.legend()
    figure.tight_layout()
    figure.savefig(target, dpi=120)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
