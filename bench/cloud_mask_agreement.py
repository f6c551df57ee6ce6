"""Agreement of the platform's cloud masks with ukis-csmask's own ``CSmask`` on the same real inputs.

For each input (the 42 BigEarthNet sample patches, and eodal 0.2.1's full L2A scene T32TMT 2019-05-30,
1103 x 1100 pixels at 10 m, fetched into ``build/packages/``, never committed):

- the card-driven functions (``services.wrapper.generic_kinds``) build the working stack from the raw bands
  (bands of the card, ``average`` resampling to 30 m, georeferencing kept), scale, normalise, tile and blend,
  with inference by OUR inference server (a real process, ``tritonclient`` gRPC) serving
  ``model_repository/s2-cloud-mask``;
- ``ukis_csmask.CSmask(img, band_order, product_level="l2a", nodata_value=0)`` runs directly (its own ONNX
  Runtime session on the package's file) on the same working stack in reflectance, [rows, cols, bands].

Agreement = share of the pixels with data where both masks give the same class. Target: >= 99.9 %.

    .venv/bin/python bench/cloud_mask_agreement.py [--patches N] [--no-scene] [--quicklooks DIR]

Prints a table and writes ``bench/results/cloud-mask-agreement-<UTC stamp>.json`` (and ``...-latest.json``).
Needs ``ukis-csmask`` (``pip install -e '.[bench]'``); ``services/`` never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from services.core.model_card import ModelCard, class_colour_table  # noqa: E402
from services.local_platform.infra import free_ports  # noqa: E402
from services.wrapper import generic_kinds  # noqa: E402

MODEL = "s2-cloud-mask"
REPOSITORY = PROJECT_ROOT / "model_repository"
SAMPLE = PROJECT_ROOT / "data" / "bigearthnet-sample"
RESULTS = PROJECT_ROOT / "bench" / "results"
# ukis-csmask's band names for the card's Sentinel-2 bands (B02, B03, B04, B08, B11, B12).
CSMASK_BAND_NAMES = {"B02": "blue", "B03": "green", "B04": "red", "B08": "nir", "B11": "swir16", "B12": "swir22"}
TARGET_AGREEMENT = 0.999


@dataclass
class NamedScene:
    name: str
    scene: generic_kinds.SceneBands


@dataclass
class AgreementRow:
    name: str
    shape: list[int]
    pixels_with_data: int
    agreeing: int
    platform_fractions: dict[str, float]
    reference_fractions: dict[str, float]
    platform_seconds: float
    reference_seconds: float
    codes: np.ndarray | None = field(default=None, repr=False)

    @property
    def agreement(self) -> float:
        return self.agreeing / self.pixels_with_data if self.pixels_with_data else 1.0


# ---------------------------------------------------------------------------------------------
# Inputs


def read_geotiff_bands(path: Path, names: Sequence[str] | None = None) -> generic_kinds.SceneBands:
    """A multi-band GeoTIFF (band names from its descriptions, or ``names``) as ``SceneBands``."""
    import rasterio

    with rasterio.open(path) as dataset:
        bands = list(names or dataset.descriptions)
        arrays = dataset.read()
        return generic_kinds.SceneBands(
            bands=dict(zip(bands, arrays)), transform=dataset.transform,
            crs=dataset.crs.to_wkt() if dataset.crs else None,
        )


def read_patch(folder: Path) -> generic_kinds.SceneBands:
    """A BigEarthNet patch folder: every band file at its native resolution, georeferencing of the 10 m grid."""
    import warnings

    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    bands: dict[str, np.ndarray] = {}
    transform, crs = None, None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        for path in sorted(folder.glob("*_B*.tif")):
            band = path.stem.rsplit("_", 1)[-1]
            with rasterio.open(path) as dataset:
                bands[band] = dataset.read(1)
                if band == "B02" and dataset.crs is not None:
                    transform, crs = dataset.transform, dataset.crs.to_wkt()
    return generic_kinds.SceneBands(bands=bands, transform=transform, crs=crs)


def sample_patches(limit: int | None = None) -> list[NamedScene]:
    names = [entry["patch"] for entry in json.loads((SAMPLE / "index.json").read_text())]
    return [NamedScene(name, read_patch(SAMPLE / "patches" / name)) for name in names[:limit]]


def eodal_scene() -> NamedScene:
    from models.packaged import fetch_eodal_scene

    path = fetch_eodal_scene()
    return NamedScene(f"eodal:{path.name}", read_geotiff_bands(path))


# ---------------------------------------------------------------------------------------------
# Our inference server, a real process


def start_inference_server(repository: Path, models: Sequence[str], log_path: Path,
                           timeout_s: float = 180.0) -> tuple[subprocess.Popen[bytes], str]:
    """Our server (``python -m services.inference.cli``) on ``repository`` loading ``models``; (process, gRPC url)."""
    http_port, grpc_port, metrics_port = free_ports(3)
    args = [
        sys.executable, "-m", "services.inference.cli", "--model-repository", str(repository),
        "--http-port", str(http_port), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port),
        "--http-address", "127.0.0.1", "--grpc-address", "127.0.0.1", "--log-format", "text",
        "--exit-timeout-secs", "2", "--model-control-mode", "explicit",
    ]
    for model in models:
        args += ["--load-model", model]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(args, cwd=PROJECT_ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"inference server exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1.0) as response:
                if response.status == 200:
                    return process, f"127.0.0.1:{grpc_port}"
        except OSError:
            pass
        time.sleep(0.2)
    stop_process(process)
    raise RuntimeError(f"inference server not ready within {timeout_s} s:\n{log_path.read_text()[-3000:]}")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# ---------------------------------------------------------------------------------------------
# The comparison


def reference_mask(stack: generic_kinds.WorkingStack, card: ModelCard, batch_size: int) -> np.ndarray:
    """``ukis_csmask.CSmask`` on the working stack in reflectance: its ``csm`` class ids [rows, cols]."""
    import warnings

    from ukis_csmask.mask import CSmask

    image = np.ascontiguousarray(np.moveaxis(generic_kinds.reflectance(stack.values, card), 0, -1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "smaller than the internal tiling size": patches are 40 x 40
        mask = CSmask(image, [CSMASK_BAND_NAMES[band] for band in card.bands], product_level="l2a",
                      nodata_value=card.nodata_value, batch_size=batch_size,
                      providers=["CPUExecutionProvider"])
    return mask.csm[..., 0]


def compare(item: NamedScene, card: ModelCard, infer: generic_kinds.InferFn, batch_size: int) -> AgreementRow:
    started = time.perf_counter()
    result = generic_kinds.process_scene(item.scene, card, infer, batch_size)
    platform_seconds = time.perf_counter() - started
    assert isinstance(result, generic_kinds.PixelClassResult)
    stack = generic_kinds.working_stack(item.scene, card)
    started = time.perf_counter()
    reference = reference_mask(stack, card, batch_size)
    reference_seconds = time.perf_counter() - started
    valid = result.codes != generic_kinds.CLASS_NODATA_CODE
    reference_codes = np.asarray(card.codes, dtype=np.uint8)[reference]  # CSmask's ids are the channel indices
    reference_fractions = {
        name: float(np.mean(reference_codes[valid] == code)) if valid.any() else 0.0
        for name, code in zip(card.class_names, card.codes)
    }
    return AgreementRow(
        name=item.name, shape=list(result.codes.shape), pixels_with_data=int(valid.sum()),
        agreeing=int(np.count_nonzero(result.codes[valid] == reference_codes[valid])),
        platform_fractions=result.fractions, reference_fractions=reference_fractions,
        platform_seconds=platform_seconds, reference_seconds=reference_seconds, codes=result.codes,
    )


def summarise(rows: Sequence[AgreementRow], card: ModelCard) -> dict[str, Any]:
    pixels = sum(r.pixels_with_data for r in rows)
    agreeing = sum(r.agreeing for r in rows)
    patches = [r for r in rows if not r.name.startswith("eodal:")]

    def pooled(subset: Sequence[AgreementRow]) -> dict[str, float]:
        total = sum(r.pixels_with_data for r in subset)
        return {name: (sum(r.platform_fractions[name] * r.pixels_with_data for r in subset) / total if total else 0.0)
                for name in card.class_names}

    return {
        "pixels_with_data": pixels,
        "agreeing_pixels": agreeing,
        "agreement": agreeing / pixels if pixels else 1.0,
        "min_agreement_per_input": min((r.agreement for r in rows), default=1.0),
        "target": TARGET_AGREEMENT,
        "patches_class_fractions": pooled(patches),
        "scene_class_fractions": pooled([r for r in rows if r.name.startswith("eodal:")]),
    }


def format_table(rows: Sequence[AgreementRow], card: ModelCard) -> str:
    names = list(card.class_names)
    header = f"{'input':<52} {'pixels':>8} {'agree %':>9} " + " ".join(f"{n + ' %':>9}" for n in names) + f" {'ours s':>7} {'ref s':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.name[-52:]:<52} {r.pixels_with_data:>8} {100 * r.agreement:>9.4f} "
            + " ".join(f"{100 * r.platform_fractions[n]:>9.2f}" for n in names)
            + f" {r.platform_seconds:>7.2f} {r.reference_seconds:>7.2f}"
        )
    return "\n".join(lines)


def run(items: Sequence[NamedScene], batch_size: int, log_path: Path) -> tuple[list[AgreementRow], ModelCard]:
    process, url = start_inference_server(REPOSITORY, [MODEL], log_path)
    try:
        card, config = generic_kinds.served_card(url, MODEL)
        infer = generic_kinds.triton_infer(url, MODEL, config["input"][0]["name"], config["output"][0]["name"])
        return [compare(item, card, infer, batch_size) for item in items], card
    finally:
        stop_process(process)


def write_quicklooks(items: Sequence[NamedScene], rows: Sequence[AgreementRow], card: ModelCard, folder: Path) -> list[Path]:
    from services.wrapper.outputs import quicklook

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for item, row in zip(items, rows):
        stack = generic_kinds.working_stack(item.scene, card)
        rgb_bands = {band: stack.values[card.bands.index(band)] for band in quicklook.TRUE_COLOUR_BANDS}
        stem = item.name.replace(":", "_").removesuffix(".tiff")
        table = class_colour_table(card)
        for suffix, data in (
            ("true-colour", quicklook.true_colour_png(rgb_bands, stack.nodata)),
            ("cloud-mask", quicklook.mask_overlay_png(rgb_bands, row.codes, table, transparent_codes=[card.codes[0]],
                                                      nodata=stack.nodata)),
        ):
            path = folder / f"{stem}.{suffix}.png"
            path.write_bytes(data)
            written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=int, default=None, help="number of sample patches (default: all 42)")
    parser.add_argument("--no-scene", action="store_true", help="leave out the eodal scene")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--quicklooks", type=Path, help="write true-colour and mask-overlay PNGs of the scene here")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    items = sample_patches(args.patches)
    if not args.no_scene:
        items.append(eodal_scene())
    with tempfile.TemporaryDirectory() as scratch:
        rows, card = run(items, args.batch_size, Path(scratch) / "inference-server.log")
    print(format_table(rows, card))
    summary = summarise(rows, card)
    print(f"\nagreement {100 * summary['agreement']:.4f} % of {summary['pixels_with_data']} pixels with data "
          f"(lowest per input {100 * summary['min_agreement_per_input']:.4f} %; target {100 * TARGET_AGREEMENT:.1f} %)")
    for label in ("patches", "scene"):
        fractions = summary[f"{label}_class_fractions"]
        print(f"{label}: " + ", ".join(f"{name} {100 * value:.2f} %" for name, value in fractions.items()))
    if args.quicklooks:
        scene_items = [(i, r) for i, r in zip(items, rows) if i.name.startswith("eodal:")]
        for path in write_quicklooks([i for i, _ in scene_items], [r for _, r in scene_items], card, args.quicklooks):
            print(f"quicklook: {path}")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    report = {
        "created": stamp,
        "model": MODEL,
        "card_weights": card.weights,
        "batch_size": args.batch_size,
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg(), "python": platform.python_version()},
        "summary": summary,
        "inputs": [{k: v for k, v in asdict(r).items() if k != "codes"} | {"agreement": r.agreement} for r in rows],
    }
    args.results.mkdir(parents=True, exist_ok=True)
    for path in (args.results / f"cloud-mask-agreement-{stamp}.json", args.results / "cloud-mask-agreement-latest.json"):
        path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"results: {args.results / f'cloud-mask-agreement-{stamp}.json'}")
    return 0 if summary["agreement"] >= TARGET_AGREEMENT else 1


if __name__ == "__main__":
    sys.exit(main())
