"""Rate-distortion of the learned compressor against JPEG 2000 and JPEG-XL on the corpus' validation split.

``make eval-compression`` (after ``make data`` and ``make models``). For every validation patch (whole scenes the
compressor never saw, ``models.corpus.VALIDATION_SCENES``):

- ours: the exported encoder's codes, written with the Wrapper's own file writer
  (``services.wrapper.outputs.compressed.write_transform_codes``, the learned prior of the model card) at every
  quantiser scale with all 8 levels and at every level count with the default scale, so bits per pixel are those
  of the real ``.codes`` file (header included); each file is read back (``read_compressed``), the exported decoder
  reconstructs and ``denormalise`` maps back to DN;
- JPEG 2000 (OpenJPEG through imagecodecs) per band, uint16, at several PSNR targets, and lossless (reversible 5/3);
- JPEG 2000 multi-component: one codestream per resolution group (10 m, 20 m bands), ``bench/eval_rvq.py``;
- JPEG-XL (libjxl through imagecodecs) per band, uint16, at several butteraugli distances, and lossless;
- the residual-VQ compressor (``Bigearth-net-rvq-*``, D3.4's VQ-VAE) at L = 1..8 levels through the Wrapper's
  format-1 writer, one file per validation scene, and the learned-prior measurement (``bench/eval_rvq.py``).

bpp = file bits / (N x 120 x 120), all 10 bands together (D3.4's measure); RMS% = 100 x RMSE / 10,000 DN over the 10
bands on the 10 m grid; PSNR against a 10,000 DN peak (reflectance 1.0). D3.4 2.3.6's downstream question: cosine
similarity of SSL features and agreement of the classifier's top label between original and reconstructed patches;
every point of every codec gets ``ssl_cosine`` on the same seeded subset of validation patches (``--ssl-patches``).

Prints a table, writes ``bench/results/compression-<time>.json`` and ``compression-latest.json``, and a PNG plot
when matplotlib is there (``--plot-python``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import eval_rvq  # noqa: E402
from models import corpus  # noqa: E402
from services.core import sentinel2  # noqa: E402
from services.core.model_card import ModelCard  # noqa: E402
from services.core import transform_codes  # noqa: E402
from services.wrapper.outputs.compressed import OperatingPoint, read_compressed, write_transform_codes  # noqa: E402
from services.wrapper.outputs.types import BandScale, PatchMetadata  # noqa: E402

PEAK_DN = 10_000.0
ENCODER = "Bigearth-net-compression-compress-pytorch"
DECODER = "Bigearth-net-compression-decompress-pytorch"
SSL = "Bigearth-net-ssl-label"
CLASSIFIER = "Bigearth-net-linear-label"
J2K_PSNR_TARGETS = (34, 38, 41, 44, 48, 52, 56, 60, 66, 72)  # imagecodecs' level: PSNR target against 65535
JXL_DISTANCES = (0.3, 0.6, 1.0, 2.0, 4.0, 8.0, 16.0, 25.0)
DEFAULT_SCALE = 8  # the Wrapper's default quantiser scale (EOML_WRAPPER_COMPRESS_QUANTISER_SCALE)


def distortion(original: np.ndarray, restored: np.ndarray) -> dict[str, float]:
    error = restored.astype(np.float64) - original.astype(np.float64)
    rmse = float(np.sqrt(np.mean(error**2)))
    return {"rmse_dn": rmse, "rms_percent": 100.0 * rmse / PEAK_DN,
            "psnr_db": float(20 * np.log10(PEAK_DN / rmse)) if rmse > 0 else float("inf")}


def codec_point(name: str, setting: object, bits: int, original: np.ndarray, restored: np.ndarray) -> dict:
    return {"codec": name, "setting": setting, "bpp": bits / (original.shape[0] * 14_400),
            **distortion(original, restored)}


def per_band(encode, decode, patches: np.ndarray) -> tuple[int, np.ndarray]:
    bits, restored = 0, np.empty_like(patches)
    for n in range(patches.shape[0]):
        for band in range(patches.shape[1]):
            data = encode(np.ascontiguousarray(patches[n, band]))
            bits += len(data) * 8
            restored[n, band] = decode(data)
    return bits, restored


def baselines(patches: np.ndarray, cosine: eval_rvq.SslCosine | None = None) -> list[dict]:
    import imagecodecs

    settings = [("JPEG 2000", f"psnr16={target}", lambda b, t=target: imagecodecs.jpeg2k_encode(b, level=t),
                 imagecodecs.jpeg2k_decode) for target in J2K_PSNR_TARGETS]
    settings.append(("JPEG 2000 lossless", "reversible", lambda b: imagecodecs.jpeg2k_encode(b, reversible=True),
                     imagecodecs.jpeg2k_decode))
    settings += [("JPEG-XL", f"distance={distance}",
                  lambda b, d=distance: imagecodecs.jpegxl_encode(b, distance=d, effort=7), imagecodecs.jpegxl_decode)
                 for distance in JXL_DISTANCES]
    settings.append(("JPEG-XL lossless", "lossless", lambda b: imagecodecs.jpegxl_encode(b, lossless=True),
                     imagecodecs.jpegxl_decode))
    points = []
    for codec, setting, encode, decode in settings:
        bits, restored = per_band(encode, decode, patches)
        point = codec_point(codec, setting, bits, patches, restored)
        if cosine is not None:
            point["ssl_cosine"] = cosine(restored)
        points.append(point)
    return points


class OnnxModel:
    """A model of the repository run in-process with ONNX Runtime, in batches."""

    def __init__(self, repository: Path, name: str) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(repository / name / "1" / "model.onnx"),
                                            providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, batch: np.ndarray, size: int = 8) -> np.ndarray:
        return np.concatenate([self.session.run(None, {self.input: batch[i:i + size]})[0]
                               for i in range(0, len(batch), size)])


def card_of(repository: Path, name: str) -> ModelCard:
    from services.inference.model_config import parse_config_text

    config = parse_config_text((repository / name / "config.pbtxt").read_text())
    return ModelCard.from_parameters(dict(config.parameters))


def operating_points(scales: list[int], levels: list[int]) -> list[tuple[int, int]]:
    """(levels, quantiser scale): every scale at 8 levels, every level count at the default scale."""
    points = [(8, scale) for scale in scales] + [(level, DEFAULT_SCALE) for level in levels if level != 8]
    return list(dict.fromkeys(points))


def ours(patches: np.ndarray, repository: Path, points: list[tuple[int, int]]
         ) -> tuple[list[dict], dict[str, np.ndarray]]:
    card = card_of(repository, ENCODER)
    prior = transform_codes.LaplaceContextPrior.from_text(card.entropy_prior)
    normalised = sentinel2.normalise(patches.astype(np.float32), card)
    codes = OnnxModel(repository, ENCODER)(normalised, size=32)
    decoder = OnnxModel(repository, DECODER)
    scale = BandScale(tuple(card.bands), tuple(card.band_mean), tuple(card.band_std))
    metadata = [PatchMetadata(patch_id=f"p{n}") for n in range(len(patches))]
    results, restored_by_point = [], {}
    for levels, quantiser_scale in points:
        written = write_transform_codes(codes, OperatingPoint(levels, quantiser_scale=quantiser_scale), prior,
                                        metadata, scale, ENCODER, "1")
        decoded = read_compressed(written.file.data, prior)
        restored = np.clip(np.rint(sentinel2.denormalise(decoder(decoded.codes, size=32), card)), 0, 65535)
        setting = f"L={levels} s={quantiser_scale}"
        restored_by_point[setting] = restored
        point = codec_point("ours (learned)", setting, len(written.file.data) * 8, patches, restored)
        point.update(levels=levels, quantiser_scale=quantiser_scale,
                     estimated_rms_percent=written.stats.estimated_rms_percent)
        results.append(point)
    return results, restored_by_point


def downstream(patches: np.ndarray, restored_by_point: dict[str, np.ndarray], repository: Path) -> list[dict]:
    """D3.4 2.3.6: do the SSL features and the classifier's answer survive compression?"""
    card = card_of(repository, SSL)
    ssl, classifier = OnnxModel(repository, SSL), OnnxModel(repository, CLASSIFIER)
    features = ssl(sentinel2.normalise(patches.astype(np.float32), card))
    top = classifier(features).argmax(axis=1)
    rows = []
    for setting, restored in restored_by_point.items():
        other = ssl(sentinel2.normalise(restored.astype(np.float32), card))
        cosine = (features * other).sum(1) / (np.linalg.norm(features, axis=1) * np.linalg.norm(other, axis=1))
        rows.append({"setting": setting, "ssl_cosine_mean": float(cosine.mean()), "ssl_cosine_min": float(cosine.min()),
                     "top_label_agreement": float((classifier(other).argmax(axis=1) == top).mean())})
    return rows


def interpolate_rms(curve: list[dict], bpp: float) -> float | None:
    """RMS% of a codec's curve at ``bpp`` (linear in bpp between its points; None outside its range)."""
    points = sorted((p["bpp"], p["rms_percent"]) for p in curve)
    for (b0, r0), (b1, r1) in zip(points, points[1:]):
        if b0 <= bpp <= b1:
            return r0 + (r1 - r0) * (bpp - b0) / (b1 - b0) if b1 > b0 else r0
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--corpus", type=Path, default=None, help="built corpus (default $EOML_DATA_CACHE)")
    parser.add_argument("--limit", type=int, default=0, help="at most this many validation patches (0 = all)")
    parser.add_argument("--exclude-scene", action="append", default=[],
                        help="leave this validation scene out (e.g. the large eodal scene, to see the BigEarthNet "
                        "patches alone); repeatable")
    parser.add_argument("--tag", default="", help="suffix of the result files (compression-<tag>-latest.json)")
    parser.add_argument("--levels", type=int, nargs="*", default=list(range(1, 9)),
                        help="level counts evaluated at the default quantiser scale")
    parser.add_argument("--scales", type=int, nargs="*", default=list(transform_codes.QUANTISER_SCALES),
                        help="quantiser scales evaluated with all 8 levels")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--record", type=Path, default=None,
                        help="also write the summary the model card renders (models/checkpoints/compression-evaluation.json)")
    parser.add_argument("--plot-python", default="", help="a Python with matplotlib for the PNG")
    parser.add_argument("--rvq-record", type=Path, default=None,
                        help="also write the RVQ summary its model card renders (models/checkpoints/rvq-evaluation.json)")
    parser.add_argument("--ssl-patches", type=int, default=16,
                        help="validation patches (seeded choice) whose SSL features every operating point compares")
    parser.add_argument("--prior-patches", type=int, default=64,
                        help="training patches whose RVQ codes fit the learned-prior measurement")
    parser.add_argument("--no-rvq", action="store_true", help="leave the RVQ compressor out")
    args = parser.parse_args(argv)

    validation = corpus.load_split("validation", args.corpus, levels=("L2A",))
    keep = np.flatnonzero(~np.isin(np.array(validation.scenes), args.exclude_scene))[: args.limit or None]
    patches = validation.patches[keep]
    scenes = sorted({validation.scenes[i] for i in keep})
    started = time.perf_counter()
    subset = np.sort(np.random.default_rng(0).permutation(len(patches))[:args.ssl_patches])
    cosine = eval_rvq.SslCosine(OnnxModel(args.repository, SSL), card_of(args.repository, SSL), patches, subset)
    base = baselines(patches, cosine)
    base += eval_rvq.jpeg2000_multicomponent(patches, tuple(card_of(args.repository, ENCODER).bands), codec_point,
                                             cosine)
    mine, restored = ours(patches, args.repository, operating_points(args.scales, args.levels))
    for point in mine:
        point["ssl_cosine"] = cosine(restored[point["setting"]])
    effects = downstream(patches[subset], {k: v[subset] for k, v in restored.items()}, args.repository)
    del restored
    rvq, prior = [], None
    if not args.no_rvq:
        rvq_card = card_of(args.repository, eval_rvq.RVQ_ENCODER)
        encoder = OnnxModel(args.repository, eval_rvq.RVQ_ENCODER)
        rvq, codes, records = eval_rvq.rvq_points(
            patches, [validation.scenes[i] for i in keep], lambda x: encoder(x, size=4),
            lambda c: OnnxModel(args.repository, eval_rvq.RVQ_DECODER)(c, size=8), rvq_card, codec_point, cosine)
        train_codes, source = eval_rvq.training_codes(lambda x: encoder(x, size=4), rvq_card, args.corpus,
                                                      args.prior_patches, seed=0)
        prior = eval_rvq.learned_prior(records, codes, train_codes, len(patches) * 14_400, source)
        print(prior["summary"])
    j2k = [p for p in base if p["codec"] == "JPEG 2000"]
    jxl = [p for p in base if p["codec"] == "JPEG-XL"]
    for point in mine + rvq:
        point["jpeg2000_rms_percent_at_bpp"] = interpolate_rms(j2k, point["bpp"])
        point["jpegxl_rms_percent_at_bpp"] = interpolate_rms(jxl, point["bpp"])

    print(f"validation: {len(patches)} patches of {len(scenes)} scenes never trained on")
    print(f"{'codec':20} {'setting':16} {'bpp':>7} {'RMS%':>7} {'PSNR dB':>8} {'J2K RMS% same bpp':>18} "
          f"{'JXL RMS% same bpp':>18}")
    for point in base + mine + rvq:
        refs = [point.get(key) for key in ("jpeg2000_rms_percent_at_bpp", "jpegxl_rms_percent_at_bpp")]
        print(f"{point['codec']:20} {str(point['setting']):16} {point['bpp']:7.3f} {point['rms_percent']:7.3f} "
              f"{point['psnr_db']:8.2f} " + " ".join(f"{'-' if r is None else f'{r:.3f}':>18}" for r in refs))
    low_rate = [p for p in mine if p["bpp"] <= 4.0]
    compared = [p for p in low_rate if p["jpeg2000_rms_percent_at_bpp"] is not None]
    verdict = {
        "points_at_or_below_4_bpp": len(low_rate),
        "compared_with_jpeg2000": len(compared),
        "below_jpeg2000": sum(p["rms_percent"] < p["jpeg2000_rms_percent_at_bpp"] for p in compared),
        "compared_with_jpegxl": sum(p["jpegxl_rms_percent_at_bpp"] is not None for p in low_rate),
        "below_jpegxl": sum(p["jpegxl_rms_percent_at_bpp"] is not None
                            and p["rms_percent"] < p["jpegxl_rms_percent_at_bpp"] for p in low_rate),
    }
    print(f"operating points <= 4 bpp: {verdict['points_at_or_below_4_bpp']}; below JPEG 2000 at the same bpp: "
          f"{verdict['below_jpeg2000']} of {verdict['compared_with_jpeg2000']} within its curve; below JPEG-XL: "
          f"{verdict['below_jpegxl']} of {verdict['compared_with_jpegxl']}")
    print(f"{'setting':>10} {'SSL cosine mean':>16} {'min':>7} {'top label agrees':>17}")
    for row in effects:
        print(f"{row['setting']:>10} {row['ssl_cosine_mean']:16.4f} {row['ssl_cosine_min']:7.4f} "
              f"{row['top_label_agreement']:17.3f}")

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = {"created": stamp, "patches": int(len(patches)), "scenes": scenes, "excluded_scenes": args.exclude_scene,
              "seconds": time.perf_counter() - started, "baselines": base, "ours": mine, "downstream": effects,
              "verdict": verdict, "rvq": rvq, "rvq_learned_prior": prior, "ssl_patches": len(subset),
              "units": {"bpp": "file bits / (N x 14400)", "rms_percent": "100 x RMSE / 10000 DN",
                        "psnr_db": "against 10000 DN"}}
    args.out.mkdir(parents=True, exist_ok=True)
    prefix = f"compression-{args.tag}" if args.tag else "compression"
    for name in (f"{prefix}-{stamp}.json", f"{prefix}-latest.json"):
        (args.out / name).write_text(json.dumps(result, indent=2) + "\n")
    if args.record is not None:
        keep = ("codec", "setting", "levels", "quantiser_scale", "bpp", "rms_percent", "psnr_db",
                "jpeg2000_rms_percent_at_bpp", "jpegxl_rms_percent_at_bpp")
        summary = {"created": stamp, "patches": result["patches"], "scenes": result["scenes"],
                   "ours": [{k: p[k] for k in keep} for p in mine], "verdict": verdict, "downstream": effects}
        args.record.write_text(json.dumps(summary, indent=2) + "\n")
    if args.rvq_record is not None and rvq:
        write_rvq_record(args.rvq_record, result)
    if args.plot_python:
        subprocess.run([args.plot_python, str(ROOT / "bench" / "plot_compression.py"),
                        str(args.out / f"{prefix}-latest.json"),
                        str(args.out / f"rate-distortion{'-' + args.tag if args.tag else ''}.png")], check=True)
    return 0


def write_rvq_record(path: Path, result: dict) -> None:
    """The RVQ summary its model card renders, with every codec's curve beside it for the README."""
    keep = ("codec", "setting", "bpp", "rms_percent", "psnr_db", "ssl_cosine")
    rvq_keep = keep + ("levels", "files", "bpp_one_file", "jpeg2000_rms_percent_at_bpp", "jpegxl_rms_percent_at_bpp")
    met = [p for p in result["rvq"] if p["bpp"] <= 8.0 and p["rms_percent"] <= 2.0]
    summary = {"created": result["created"], "patches": result["patches"], "scenes": result["scenes"],
               "ssl_patches": result["ssl_patches"],
               "rvq": [{k: p.get(k) for k in rvq_keep} for p in result["rvq"]],
               "others": [{k: p.get(k) for k in keep} for p in result["baselines"] + result["ours"]],
               "target": {"rule": "<= 2 % RMS at <= 8 bpp", "met_at_levels": [p["levels"] for p in met]},
               "learned_prior": result["rvq_learned_prior"]}
    path.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
