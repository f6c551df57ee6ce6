"""``make train-compressor CODEC=rvq``: train the D3.4 residual-VQ compressor (``models.rvq``) on the training scenes.

Reads the corpus' training split only (the validation scenes are never read here) and writes:

- ``models/checkpoints/rvq.pt``: fp16 state dict of ``models.rvq.ResidualVQCodec`` (the served weights);
- ``models/checkpoints/rvq.json``: its sha256, corpus, seed, budget, device, steps, losses, codebook usage per level
  and RMS % per number of levels on development scenes.

Training (seeded, resumable from ``--work-dir`` every ``--save-every`` steps, ``--restart`` ignores the state):

1. **warm-up**: the encoder and decoder as a continuous autoencoder (no quantiser) for ``--warmup-fraction`` of the
   budget (or of ``--steps``), so the codebooks start from meaningful latents;
2. **codebook initialisation**: each level's 10,000 code vectors sampled from the residuals its predecessors leave
   on the latents of training patches;
3. **RVQ**: every sample of a batch is decoded from a random number of levels L in 1..8 (D3.4's dynamic number of
   codebooks), straight-through gradients to the encoder, a commitment loss, EMA codebook updates over all 8
   levels, dead codes re-seeded from the batch's residuals; Adam with a fixed learning rate on the mean squared error
   in digital numbers (the metric is RMS in DN); random crops and flips.

The development check runs on training scenes held out of the fit (``models.train_compressor.development_scenes``):
RMS % at L = 1..8 and codebook usage there, beside usage on the fitted patches.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from models import corpus, rvq
from models.torch_device import training_device
from models.train_compressor import BAND_STD, CHECKPOINT_DIR, development_scenes, normalise, save_checkpoint
from services.core.logging import configure_logging

log = logging.getLogger("models.train_rvq")

CHECKPOINT = CHECKPOINT_DIR / "rvq.pt"
METADATA = CHECKPOINT_DIR / "rvq.json"
SEED = 7
STATE_FILE = "rvq-state.pt"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m models.train_compressor --codec rvq", description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=None, help="built corpus (default $EOML_DATA_CACHE)")
    parser.add_argument("--out", type=Path, default=CHECKPOINT_DIR)
    parser.add_argument("--work-dir", type=Path, default=Path("build/train-rvq"), help="resumable state (not in git)")
    parser.add_argument("--restart", action="store_true", help="ignore the saved training state")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--budget-minutes", type=float, default=25.0, help="wall-time budget of this run's training")
    parser.add_argument("--steps", type=int, default=100_000, help="training steps at most (warm-up included)")
    parser.add_argument("--warmup-fraction", type=float, default=0.2,
                        help="the warm-up ends at this fraction of the budget or of --steps, whichever comes first")
    parser.add_argument("--warmup-steps", type=int, default=0,
                        help="end the warm-up after exactly this many steps instead (reproducible across resumes)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=32, help="training crop side in pixels (even)")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam, fixed (D3.4)")
    parser.add_argument("--commitment", type=float, default=0.25)
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--init-patches", type=int, default=32, help="patches whose latents seed the codebooks")
    parser.add_argument("--usage-patches", type=int, default=48, help="fitted patches the usage report encodes")
    parser.add_argument("--dev-patches", type=int, default=24, help="development patches the final check decodes")
    parser.add_argument("--max-patches", type=int, default=0, help="use at most this many training patches (tests)")
    parser.add_argument("--save-every", type=int, default=25)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    return parser.parse_args(argv)


def dn_weights(device: torch.device) -> torch.Tensor:
    """Per-band std relative to their mean: normalised-space errors times this are proportional to DN errors."""
    weights = torch.from_numpy(BAND_STD / BAND_STD.mean())
    return weights.to(device)[None, :, None, None]


def random_crops(patches: torch.Tensor, batch: int, crop: int, generator: torch.Generator) -> torch.Tensor:
    pick = torch.randint(len(patches), (batch,), generator=generator)
    # even offsets keep the stride-2 grid aligned with the full patch's
    offsets = torch.randint((patches.shape[-1] - crop) // 2 + 1, (batch, 2), generator=generator) * 2
    crops = torch.stack([patches[int(p), :, int(r):int(r) + crop, int(c):int(c) + crop]
                         for p, (r, c) in zip(pick, offsets)])
    flips = torch.rand(batch, generator=generator) < 0.5
    crops[flips] = crops[flips].flip(-1)
    return crops


@torch.no_grad()
def encode_patches(codec: rvq.ResidualVQCodec, patches: torch.Tensor, device: torch.device, chunk: int = 8) -> torch.Tensor:
    return torch.cat([codec.encode(patches[i:i + chunk].to(device)) for i in range(0, len(patches), chunk)])


@torch.no_grad()
def patch_codes(codec: rvq.ResidualVQCodec, patches: torch.Tensor, device: torch.device, chunk: int = 8) -> torch.Tensor:
    return torch.cat([codec.codes(patches[i:i + chunk].to(device)).cpu() for i in range(0, len(patches), chunk)])


@torch.no_grad()
def rms_percent_per_level(codec: rvq.ResidualVQCodec, patches: torch.Tensor, codes: torch.Tensor,
                          device: torch.device, chunk: int = 8) -> list[float]:
    """RMS % of 10,000 DN of patches decoded from their first L levels, L = 1..8."""
    std = torch.from_numpy(BAND_STD)[None, :, None, None]
    out = []
    for levels in range(1, rvq.LEVELS + 1):
        total = 0.0
        for i in range(0, len(patches), chunk):
            decoded = codec.reconstruct(rvq.keep_levels(codes[i:i + chunk].to(device), levels)).cpu()
            total += float((((decoded - patches[i:i + chunk]) * std) ** 2).sum())
        out.append(100.0 * math.sqrt(total / patches.numel()) / 10000.0)
    return out


def usage_rows(codes: torch.Tensor) -> list[dict]:
    return [{"level": u.level, "used_fraction": round(u.used_fraction, 4), "perplexity": round(u.perplexity, 1)}
            for u in rvq.codebook_usage(codes)]


def load_fp16_checkpoint(path: Path) -> rvq.ResidualVQCodec:
    codec = rvq.ResidualVQCodec()
    state = torch.load(path, map_location="cpu", weights_only=True)
    codec.load_state_dict({k: v.to(codec.state_dict()[k].dtype) for k, v in state.items()}, strict=True)
    return codec.eval()


class Trainer:
    """The resumable training loop (state: weights, EMA statistics, optimiser, generator, step, losses)."""

    def __init__(self, codec: rvq.ResidualVQCodec, fit: torch.Tensor, args: argparse.Namespace,
                 device: torch.device) -> None:
        self.codec, self.fit, self.args, self.device = codec.to(device), fit, args, device
        self.generator = torch.Generator().manual_seed(args.seed)
        self.optimiser = torch.optim.Adam([*codec.encoder.parameters(), *codec.decoder.parameters()],
                                          lr=args.learning_rate)
        self.step, self.losses, self.initialised, self.reseeded = 0, [], False, 0
        self.warmup_steps: int | None = None
        self.state_path = args.work_dir / STATE_FILE
        self.weights = dn_weights(device)

    def resume(self) -> None:
        if self.args.restart or not self.state_path.is_file():
            return
        state = torch.load(self.state_path, map_location=self.device, weights_only=False)
        self.codec.load_state_dict(state["codec"])
        self.codec.quantiser.load_training_statistics(state["quantiser_statistics"])
        self.optimiser.load_state_dict(state["optimiser"])
        self.generator.set_state(state["generator"])
        self.step, self.losses, self.initialised = state["step"], state["losses"], state["initialised"]
        self.reseeded, self.warmup_steps = state["reseeded"], state["warmup_steps"]
        log.info("resumed", extra={"step": self.step, "initialised": self.initialised})

    def save(self) -> None:
        self.args.work_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"codec": self.codec.state_dict(), "quantiser_statistics": self.codec.quantiser.training_statistics(),
                    "optimiser": self.optimiser.state_dict(), "generator": self.generator.get_state(),
                    "step": self.step, "losses": self.losses, "initialised": self.initialised,
                    "reseeded": self.reseeded, "warmup_steps": self.warmup_steps}, self.state_path)

    def initialise_codebooks(self) -> None:
        pick = torch.randperm(len(self.fit), generator=self.generator)[:self.args.init_patches]
        latents = encode_patches(self.codec, self.fit[pick], self.device)
        self.codec.quantiser.initialise(latents.reshape(-1, rvq.CODE_DIM), self.generator)
        self.initialised = True
        self.warmup_steps = self.step
        log.info("codebooks initialised", extra={"step": self.step, "vectors": latents.shape[0] * 3600})

    def train_step(self) -> float:
        args = self.args
        x = random_crops(self.fit, args.batch, args.crop, self.generator).to(self.device)
        latent = self.codec.encode(x)
        if not self.initialised:
            decoded = self.codec.decode_latent(latent)
            loss = ((decoded - x) * self.weights).pow(2).mean()
        else:
            flat = latent.reshape(-1, rvq.CODE_DIM)
            indices, cumulative, residuals = self.codec.quantiser.quantise(flat.detach())
            levels = torch.randint(1, rvq.LEVELS + 1, (args.batch,), generator=self.generator).to(self.device)
            per_vector = levels.repeat_interleave(flat.shape[0] // args.batch) - 1
            quantised = cumulative[per_vector, torch.arange(flat.shape[0], device=self.device)].reshape(latent.shape)
            straight_through = latent + (quantised - latent).detach()
            decoded = self.codec.decode_latent(straight_through)
            reconstruction = ((decoded - x) * self.weights).pow(2).mean()
            loss = reconstruction + args.commitment * (latent - quantised).pow(2).mean()
            self.reseeded += self.codec.quantiser.ema_update(indices, residuals, self.step, args.ema_decay,
                                                             self.generator)
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        return float(loss.detach())

    def run(self) -> dict:
        args = self.args
        started = time.monotonic()
        budget = args.budget_minutes * 60
        self.codec.train()
        while self.step < args.steps and time.monotonic() - started < budget:
            if args.warmup_steps:
                warm = self.step >= args.warmup_steps
            else:
                warm = (self.step >= args.warmup_fraction * args.steps
                        or time.monotonic() - started >= args.warmup_fraction * budget)
            if not self.initialised and warm:
                self.initialise_codebooks()
            loss = self.train_step()
            self.losses.append(loss)
            self.step += 1
            if self.step % args.save_every == 0 or self.step == args.steps:
                log.info("rvq", extra={"step": self.step, "phase": "rvq" if self.initialised else "warm-up",
                                       "loss_last": float(np.mean(self.losses[-args.save_every:])),
                                       "reseeded": self.reseeded})
                self.save()
        if not self.initialised:  # a budget too small for the warm-up still yields data-seeded codebooks
            self.initialise_codebooks()
        self.save()
        self.codec.eval()
        return {"steps": self.step, "warmup_steps": self.warmup_steps, "seconds_this_run": time.monotonic() - started,
                "codes_reseeded": self.reseeded,
                "loss_first25": float(np.mean(self.losses[:25])) if self.losses else None,
                "loss_last25": float(np.mean(self.losses[-25:])) if self.losses else None,
                "loss_every_25": [round(float(np.mean(self.losses[i:i + 25])), 5)
                                  for i in range(0, len(self.losses), 25)]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("INFO", "text")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    device = training_device(args.device)
    root = args.corpus or corpus.cache_root()
    manifest_bytes = (root / "corpus.json").read_bytes()
    train = corpus.load_split("train", root)
    scenes_of_patch = np.array(train.scenes)
    development = np.isin(scenes_of_patch, sorted(development_scenes(train.scenes)))
    fit_index, dev_index = np.flatnonzero(~development), np.flatnonzero(development)
    if args.max_patches:
        fit_index, dev_index = fit_index[:args.max_patches], dev_index[:max(1, args.max_patches // 2)]
    if not len(fit_index) or not len(dev_index):
        raise SystemExit("the training split needs both development and fitted scenes")
    fit = normalise(train.patches[fit_index])
    dev_index = dev_index[np.sort(np.random.default_rng(args.seed).permutation(len(dev_index))[:args.dev_patches])]
    dev = normalise(train.patches[dev_index])
    started = time.monotonic()

    codec = rvq.ResidualVQCodec()
    trainer = Trainer(codec, fit, args, device)
    trainer.resume()
    report = trainer.run()

    codec.to("cpu")
    usage_pick = torch.randperm(len(fit), generator=torch.Generator().manual_seed(args.seed))[:args.usage_patches]
    fit_codes = patch_codes(codec, fit[usage_pick], torch.device("cpu"))
    dev_codes = patch_codes(codec, dev, torch.device("cpu"))
    dev_rms = rms_percent_per_level(codec, dev, dev_codes, torch.device("cpu"))
    sha256 = save_checkpoint(codec, args.out / CHECKPOINT.name)
    scenes = sorted(set(train.scenes))
    metadata = {
        "checkpoint": CHECKPOINT.name,
        "sha256": sha256,
        "bytes": (args.out / CHECKPOINT.name).stat().st_size,
        "codec": "residual-vq/1",
        "seed": args.seed,
        "device": str(device),
        "threads": args.threads,
        "torch": torch.__version__,
        "budget_minutes": args.budget_minutes,
        "training": report,
        "hyperparameters": {k: getattr(args, k) for k in ("batch", "crop", "learning_rate", "commitment", "ema_decay",
                                                          "warmup_fraction", "init_patches", "steps")},
        "architecture": {"channels": rvq.CHANNELS, "code_dim": rvq.CODE_DIM, "levels": rvq.LEVELS,
                         "codebook_size": rvq.CODEBOOK_SIZE, "downscaling": rvq.DOWNSCALING,
                         "parameters": sum(p.numel() for p in codec.parameters()),
                         "codebook_values": codec.quantiser.codebooks.numel()},
        "corpus": {"format": corpus.CORPUS_FORMAT, "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                   "split": "train", "patches": len(train), "scenes": scenes,
                   "fitted_patches": len(fit_index), "development_patches": len(dev_index),
                   "development_scenes": sorted(set(scenes_of_patch[dev_index]))},
        "codebook_usage": {"fitted_patches_encoded": len(usage_pick), "fitted": usage_rows(fit_codes),
                           "development": usage_rows(dev_codes)},
        "development_rms_percent_per_levels": [round(v, 4) for v in dev_rms],
        "wall_seconds": time.monotonic() - started,
    }
    (args.out / METADATA.name).write_text(json.dumps(metadata, indent=2) + "\n")
    print(f"checkpoint {args.out / CHECKPOINT.name} ({metadata['bytes']} bytes, sha256 {sha256})")
    print(f"{report['steps']} steps ({report['warmup_steps']} warm-up), loss {report['loss_first25']} -> "
          f"{report['loss_last25']}, {report['codes_reseeded']} codes re-seeded")
    print("development RMS % per levels: " + ", ".join(f"L={i + 1} {v:.3f}" for i, v in enumerate(dev_rms)))
    for fitted, developed in zip(metadata["codebook_usage"]["fitted"], metadata["codebook_usage"]["development"]):
        print(f"level {fitted['level']}: used {fitted['used_fraction']:.3f} (fitted) / {developed['used_fraction']:.3f} "
              f"(development), perplexity {fitted['perplexity']:.0f} / {developed['perplexity']:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
