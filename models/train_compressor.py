"""``make train-compressor``: fit the compressor's transform, train its post-filter, fit its entropy prior.

Reads the training split of the corpus ``make data`` builds (``models.corpus``; the validation scenes are never
read here) and writes the bundled checkpoint the models are exported from:

- ``models/checkpoints/compression.pt``: fp16 state dict of ``models.compression.BlockTransformCodec``;
- ``models/checkpoints/compression.json``: its sha256, the entropy prior (the model card's ``entropy_prior``), the
  training corpus (manifest sha256, patches, scenes), seed, budget, device, steps and losses.

Stages (all seeded; the post-filter resumes from ``--work-dir``):
1. **transform**: mean block and the 128 principal directions of the training blocks (8 x 8 x 10 DN), closed form;
2. **post-filter**: Adam on the mean squared error in DN of decoded training patches, each sample decoded at a
   random operating point (quantiser scale, levels) so one filter serves every rate; random 8-aligned crops and
   flips; stops at ``--budget-minutes`` of wall time or ``--steps``; CUDA when present (``--device auto``);
3. **prior**: maximum-likelihood Laplace scales per (quantiser scale, coefficient, context) on the training codes,
   and the training corpus' RMS and bits per pixel at every operating point (rate control reads them).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from models import corpus
from models.torch_device import training_device
from models.compression import BlockTransformCodec, decoder_conditioning, fit_block_transform
from services.core import sentinel2
from services.core import transform_codes as tc
from services.core.logging import configure_logging

log = logging.getLogger("models.train_compressor")

ROOT = Path(__file__).resolve().parent
CHECKPOINT_DIR = ROOT / "checkpoints"
CHECKPOINT = CHECKPOINT_DIR / "compression.pt"
METADATA = CHECKPOINT_DIR / "compression.json"
SEED = 4
BAND_MEAN = np.array([sentinel2.BIGEARTHNET_BAND_MEAN[b] for b in sentinel2.SIMCLR_BAND_ORDER], np.float32)
BAND_STD = np.array([sentinel2.BIGEARTHNET_BAND_STD[b] for b in sentinel2.SIMCLR_BAND_ORDER], np.float32)


def normalise(patches: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((patches.astype(np.float32) - BAND_MEAN[:, None, None]) / BAND_STD[:, None, None])


@torch.no_grad()
def base_codes(codec: BlockTransformCodec, normalised: torch.Tensor, chunk: int = 32) -> np.ndarray:
    """Base quantised coefficients q [N, 15, 15, 128] int32, as the served compressor computes them."""
    parts = []
    for i in range(0, len(normalised), chunk):
        q = torch.round(codec.analyse(normalised[i:i + chunk]) / tc.BASE_STEP_DN)
        parts.append(torch.clamp(q, -tc.CODE_OFFSET, tc.CODEBOOK_SIZE - 1 - tc.CODE_OFFSET).to(torch.int32).numpy())
    return np.concatenate(parts)


def requantised(q: torch.Tensor, scale: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q' in base steps, used mask) the decoder sees for base codes q [B, 15, 15, 128] at per-sample scale and levels:
    what the Wrapper's requantisation and level choice give back."""
    s = scale.to(q.dtype)[:, None, None, None]
    symbols = torch.sign(q) * torch.div(q.abs() + torch.div(s, 2, rounding_mode="floor"), s, rounding_mode="floor")
    kept = torch.arange(tc.COEFFICIENTS)[None, :] < (levels[:, None] * tc.PER_LEVEL)
    used = kept[:, None, None, :].expand_as(q)
    return torch.where(used, symbols * s, torch.zeros_like(q)), used


def decode_batch(codec: BlockTransformCodec, q: torch.Tensor, used: torch.Tensor, filtered: bool = True) -> torch.Tensor:
    plain = codec.synthesise(q.to(torch.float32) * tc.BASE_STEP_DN)
    return codec.post_filter(plain, decoder_conditioning(q, used)) if filtered else plain


def train_post_filter(codec: BlockTransformCodec, normalised: torch.Tensor, q: np.ndarray, args: argparse.Namespace,
                      device: torch.device) -> dict:
    """Adam on DN MSE of decoded crops; resumable from ``args.work_dir/post_filter.pt``."""
    generator = torch.Generator().manual_seed(args.seed)
    codec.to(device)
    optimiser = torch.optim.Adam(codec.post_filter.parameters(), lr=args.learning_rate)
    state_path = args.work_dir / "post_filter.pt"
    step, losses = 0, []
    if state_path.is_file() and not args.restart:
        state = torch.load(state_path, map_location=device, weights_only=False)
        codec.post_filter.load_state_dict(state["post_filter"])
        optimiser.load_state_dict(state["optimiser"])
        generator.set_state(state["generator"])
        step, losses = state["step"], state["losses"]
        log.info("post-filter resumed", extra={"step": step})
    q_all = torch.from_numpy(q)
    band_std = codec.band_std.to(device)[None, :, None, None]
    scales = torch.tensor([s for s in tc.QUANTISER_SCALES if s >= args.filter_min_scale])
    started, crop_blocks = time.monotonic(), args.crop // tc.BLOCK
    codec.post_filter.train()
    while step < args.steps and (time.monotonic() - started) < args.budget_minutes * 60:
        pick = torch.randint(len(normalised), (args.batch,), generator=generator)
        by, bx = (int(v) for v in torch.randint(tc.BLOCKS_PER_SIDE - crop_blocks + 1, (2,), generator=generator))
        scale = scales[torch.randint(len(scales), (args.batch,), generator=generator)]
        levels = torch.randint(1, tc.LEVELS + 1, (args.batch,), generator=generator)
        with torch.no_grad():
            q_batch, used = requantised(q_all[pick], scale, levels)
            conditioning = decoder_conditioning(q_batch, used).to(device)
            full = codec.synthesise(q_batch.to(device, torch.float32) * tc.BASE_STEP_DN)  # block grid stays aligned
            rows = slice(by * tc.BLOCK, (by + crop_blocks) * tc.BLOCK)
            cols = slice(bx * tc.BLOCK, (bx + crop_blocks) * tc.BLOCK)
            decoded, target = full[:, :, rows, cols], normalised[pick][:, :, rows, cols].to(device)
            if bool(torch.rand((), generator=generator) < 0.5):
                decoded, target = decoded.flip(-1), target.flip(-1)
        error = (codec.post_filter(decoded, conditioning) - target) * band_std  # DN: the metric is RMS in DN
        loss = (error * error).mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 50 == 0 or step == args.steps:
            log.info("post-filter", extra={"step": step, "rms_dn_last50": math.sqrt(np.mean(losses[-50:]))})
            args.work_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"post_filter": codec.post_filter.state_dict(), "optimiser": optimiser.state_dict(),
                        "generator": generator.get_state(), "step": step, "losses": losses}, state_path)
    codec.post_filter.eval()
    codec.to("cpu")
    return {"steps": step, "seconds_this_run": time.monotonic() - started,
            "rms_dn_first50": math.sqrt(np.mean(losses[:50])) if losses else None,
            "rms_dn_last50": math.sqrt(np.mean(losses[-50:])) if losses else None}


@torch.no_grad()
def post_filter_check(codec: BlockTransformCodec, normalised: torch.Tensor, q: np.ndarray) -> list[dict]:
    """RMS % with and without the post-filter at every (scale, levels) on the development scenes (training scenes the
    post-filter never saw): the filter must not make any operating point worse."""
    rows = []
    target = normalised
    std = codec.band_std[None, :, None, None]
    q_all = torch.from_numpy(q)
    for s in tc.QUANTISER_SCALES:
        for levels in (1, 2, 4, tc.LEVELS):
            q_batch, used = requantised(q_all, torch.full((len(q),), s), torch.full((len(q),), levels))
            errors = [float((((decode_batch(codec, q_batch, used, filtered) - target) * std) ** 2).mean())
                      for filtered in (False, True)]
            rows.append({"quantiser_scale": s, "levels": levels,
                         "rms_percent_plain": 100 * math.sqrt(errors[0]) / 10000,
                         "rms_percent_filtered": 100 * math.sqrt(errors[1]) / 10000})
    return rows


def gate_scale(check: list[dict]) -> int:
    """The finest quantiser scale from which the filter lowered the error at every checked point of that scale and
    of every coarser one (65: at none)."""
    helps = {s: all(row["rms_percent_filtered"] < row["rms_percent_plain"]
                    for row in check if row["quantiser_scale"] == s) for s in tc.QUANTISER_SCALES}
    chosen = 65
    for s in sorted(tc.QUANTISER_SCALES, reverse=True):
        if not helps[s]:
            break
        chosen = s
    return chosen


def development_scenes(scenes: list[str]) -> set[str]:
    """Training scenes kept out of the post-filter's training to check it (never the validation scenes): the L1C
    s2cloudless scene and every fourth L2A BigEarthNet scene in name order."""
    l2a = sorted({scene for scene in scenes if "MSIL2A" in scene})
    return {scene for scene in scenes if scene == "S2_L1C_s2cloudless"} | set(l2a[::4])


def transform_rms_percent(codec: BlockTransformCodec, normalised: torch.Tensor, q: np.ndarray) -> np.ndarray:
    """RMS % of the transform alone (no post-filter) at every (scale, levels) on the training patches.

    Orthonormal basis: the error is the discarded coefficients' energy plus the quantisation error of the kept ones
    (Parseval), computed per block without decoding every operating point."""
    with torch.no_grad():
        centred = codec.to_blocks(normalised).to(torch.float64) - codec.block_mean.to(torch.float64)
        coefficients = (centred @ codec.basis.to(torch.float64)).numpy()
        total_energy = float((centred**2).sum())
    pixels = len(q) * tc.PATCH * tc.PATCH * tc.BANDS
    table = np.zeros((len(tc.QUANTISER_SCALES), tc.LEVELS))
    for si, s in enumerate(tc.QUANTISER_SCALES):
        restored = tc.requantise(q, s).astype(np.float64) * s * tc.BASE_STEP_DN
        for levels in range(1, tc.LEVELS + 1):
            kept = levels * tc.PER_LEVEL
            kept_energy = float((coefficients[..., :kept] ** 2).sum())
            quantisation = float(((coefficients[..., :kept] - restored[..., :kept]) ** 2).sum())
            mse = (total_energy - kept_energy + quantisation) / pixels
            table[si, levels - 1] = 100.0 * math.sqrt(max(mse, 0.0)) / 10000.0
    return table


def fit_entropy_prior(q: np.ndarray, rms: np.ndarray, source: str) -> tc.LaplaceContextPrior:
    flat = q.reshape(-1, tc.COEFFICIENTS)
    symbols = {s: tc.requantise(flat, s) for s in tc.QUANTISER_SCALES}
    draft = tc.fit_prior(symbols, rms, np.zeros_like(rms), source)
    pixels = len(q) * tc.PATCH * tc.PATCH
    bpp = np.array([[tc.ideal_bits(symbols[s], levels, s, draft) / pixels for levels in range(1, tc.LEVELS + 1)]
                    for s in tc.QUANTISER_SCALES])
    return tc.LaplaceContextPrior(draft.log_scales, rms, bpp, source)


def save_checkpoint(codec: torch.nn.Module, path: Path) -> str:
    """fp16 state dict (the weights that reach a fresh clone) of either compressor; returns its sha256."""
    state = {name: tensor.detach().cpu().to(torch.float16).contiguous() for name, tensor in codec.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def main(argv: list[str] | None = None) -> int:
    # --codec picks the compressor: transform (this module) or rvq (models.train_rvq, its own options)
    selector = argparse.ArgumentParser(add_help=False)
    selector.add_argument("--codec", choices=("transform", "rvq"), default="transform")
    chosen, rest = selector.parse_known_args(argv)
    if chosen.codec == "rvq":
        from models import train_rvq

        return train_rvq.main(rest)
    argv = rest
    parser = argparse.ArgumentParser(prog="python -m models.train_compressor", description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=None, help="built corpus (default $EOML_DATA_CACHE)")
    parser.add_argument("--out", type=Path, default=CHECKPOINT_DIR)
    parser.add_argument("--work-dir", type=Path, default=Path("build/train-compressor"),
                        help="resumable training state (not in git)")
    parser.add_argument("--restart", action="store_true", help="ignore the saved training state")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--budget-minutes", type=float, default=12.0, help="wall-time budget of the post-filter")
    parser.add_argument("--steps", type=int, default=4000, help="post-filter steps at most")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=64, help="training crop side in pixels (a multiple of 8)")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--filter-min-scale", type=int, default=16,
                        help="the post-filter trains on codes at this quantiser scale and coarser")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    args = parser.parse_args(argv)
    configure_logging("INFO", "text")
    torch.manual_seed(args.seed)
    device = training_device(args.device)
    root = args.corpus or corpus.cache_root()
    manifest_bytes = (root / "corpus.json").read_bytes()
    train = corpus.load_split("train", root)
    started = time.monotonic()
    normalised = normalise(train.patches)

    codec = BlockTransformCodec()
    with torch.no_grad():
        blocks = codec.to_blocks(normalised).reshape(-1, tc.BLOCK_VALUES)
    eigenvalues = fit_block_transform(codec, blocks)
    kept_variance = float(eigenvalues.sum() / torch.var(blocks.to(torch.float64), dim=0).sum())
    del blocks
    q = base_codes(codec, normalised)
    log.info("transform fitted", extra={"patches": len(train), "variance_kept": kept_variance})

    scenes_of_patch = np.array(train.scenes)
    development = np.isin(scenes_of_patch, sorted(development_scenes(train.scenes)))
    if development.all() or not development.any():
        raise SystemExit("the training split needs both development and post-filter training scenes "
                         f"(development: {sorted(development_scenes(train.scenes))})")
    fit = np.flatnonzero(~development)
    filter_report = train_post_filter(codec, normalised[fit], q[fit], args, device)
    check = post_filter_check(codec, normalised[development], q[development])
    filter_report["development_scenes"] = sorted(set(scenes_of_patch[development]))
    filter_report["development_patches"] = int(development.sum())
    filter_report["development_check"] = check
    worse = [row for row in check if row["rms_percent_filtered"] > row["rms_percent_plain"]]
    filter_report["development_points_worse_unguarded"] = len(worse)
    min_scale = gate_scale(check)
    codec.post_filter_min_scale.fill_(float(min_scale))
    filter_report["applied_from_quantiser_scale"] = min_scale
    rms = transform_rms_percent(codec, normalised, q)
    scenes = sorted(set(train.scenes))
    source = (f"corpus {corpus.CORPUS_FORMAT} sha256={hashlib.sha256(manifest_bytes).hexdigest()[:16]}: "
              f"{len(train)} training patches of {len(scenes)} scenes")
    prior = fit_entropy_prior(q, rms, source)
    sha256 = save_checkpoint(codec, args.out / CHECKPOINT.name)
    metadata = {
        "checkpoint": CHECKPOINT.name,
        "sha256": sha256,
        "bytes": (args.out / CHECKPOINT.name).stat().st_size,
        "entropy_prior": prior.to_text(),
        "entropy_prior_sha256": prior.sha256,
        "seed": args.seed,
        "device": str(device),
        "torch": torch.__version__,
        "budget_minutes": args.budget_minutes,
        "post_filter": filter_report,
        "hyperparameters": {"batch": args.batch, "crop": args.crop, "learning_rate": args.learning_rate,
                            "max_steps": args.steps},
        "corpus": {"format": corpus.CORPUS_FORMAT, "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                   "split": "train", "patches": len(train), "scenes": scenes},
        "transform_variance_kept": kept_variance,
        "train_rms_percent_transform_only": np.round(rms, 4).tolist(),
        "train_bpp": np.round(prior.train_bpp, 4).tolist(),
        "quantiser_scales": list(tc.QUANTISER_SCALES),
        "wall_seconds": time.monotonic() - started,
    }
    (args.out / METADATA.name).write_text(json.dumps(metadata, indent=2) + "\n")
    print(f"checkpoint {args.out / CHECKPOINT.name} ({metadata['bytes']} bytes, sha256 {sha256})")
    print(f"trained on {len(train)} patches of {len(scenes)} scenes; post-filter {filter_report['steps']} steps, "
          f"RMS {filter_report['rms_dn_first50']} -> {filter_report['rms_dn_last50']} DN (training crops)")
    print(f"post-filter on {filter_report['development_patches']} development patches "
          f"({', '.join(filter_report['development_scenes'])}): worse at {len(worse)} of {len(check)} operating points "
          f"without its gate; applied from quantiser scale {min_scale} on")
    for row in check:
        if row["levels"] == tc.LEVELS:
            print(f"  scale {row['quantiser_scale']:3d}, 8 levels: RMS {row['rms_percent_plain']:.3f} % -> "
                  f"{row['rms_percent_filtered']:.3f} %")
    print(f"{'scale':>5} " + " ".join(f"{f'L={levels}':>13}" for levels in range(1, tc.LEVELS + 1)))
    for si, s in enumerate(tc.QUANTISER_SCALES):
        print(f"{s:5d} " + " ".join(f"{prior.train_bpp[si, l]:5.2f}b {rms[si, l]:5.2f}%" for l in range(tc.LEVELS)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
