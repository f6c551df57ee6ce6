"""``make train-ssl``: SimCLR on the corpus' training scenes, D3.4 2.2 / Table 1, at the scale this machine allows.

The served contract is unchanged: ``Bigearth-net-ssl-label`` maps 10 standardised bands (120 x 120, the card's
BigEarthNet band mean/std) to ``representation_2048`` of a ResNet-101; training adds the projection head 2048 -> 128
-> 64 and the NT-Xent loss (temperature 0.07) over two augmented views of each patch.

Table 1, as implemented here:
- batch 128 and 8 gradient-accumulation steps by default (``--batch``/``--accumulation`` lower them for a CPU);
- LARS (``LARS`` below): SGD with momentum 0.9 whose step of every weight tensor is scaled by the layer's trust ratio
  ``eta * ||w|| / ||g + wd w||``; biases and normalisation parameters get neither weight decay nor the adaptation
  (weight decay 1e-4 on the rest). ``eta`` is 1 by default: the Table's learning rate 3e-4 is then the relative step
  of a layer per update (SimCLR's eta = 0.001 with this learning rate would move weights by 3e-7 of their norm);
- cosine annealing without restarts over the run's optimiser steps, fixed once (from ``--steps``, or estimated from
  ``--budget-minutes`` and the measured speed of the first update) and kept across resumes;
- augmentation: random horizontal/vertical flips, 90-degree rotations, colour jitter (brightness, contrast and a
  per-band gain), Gaussian blur; no random crops (every view is the whole 120 x 120 patch);
- ImageNet preloading: not reachable here (no ImageNet weights for 10 bands ship in a pinned package, and the
  machine has no other network access); the trunk starts from the model family's seeded initialisation.

The kNN feature-bank metric (D3.4 2.2) is logged every ``--eval-every`` updates and never steers training: the
features of the labelled training patches are the bank (19-class labels: every labelled patch has them), each
query's label scores are the similarity-weighted mean of its k nearest bank labels. Two queries: the labelled
training patches themselves, leave-one-scene-out (training data only), and the labelled patches of the validation
scenes (looked at for the report, never for a choice).

Data: the training split of ``make data`` (``models.corpus``), L2A and L1C (``--levels``). L1C top-of-atmosphere
patches are used: the L2A training scenes hold only 61 patches, and the radiometric offset of L1C is of the kind
the colour jitter asks the network to ignore; they are standardised with the same L2A statistics.

Writes ``models/checkpoints/ssl-simclr.pt`` (fp16 state dict of ``models.simclr.SimCLRModel``) and
``ssl-simclr.json`` (budget, steps, images seen, speed, kNN log, sha256). Resumable from ``--work-dir``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import math
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models import corpus, linear_probe, simclr
from models.torch_device import training_device
from services.core.bigearthnet import multi_hot_19
from services.core.logging import configure_logging

log = logging.getLogger("models.train_ssl")

ROOT = Path(__file__).resolve().parent
CHECKPOINT_NAME = "ssl-simclr.pt"
SEED = 1  # the simclr-resnet101 family's seed: training starts from the seeded initialisation the cards describe
TEMPERATURE = 0.07
KNN_K = 5


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017) over SGD with momentum.

    Per parameter tensor: ``d = g + wd * w``; if the group adapts, ``d *= eta * ||w|| / ||d||`` (1 when either norm
    is 0); ``v = momentum * v + d``; ``w -= lr * v``. Groups with ``adapt=False`` and ``weight_decay=0`` hold the
    biases and normalisation parameters (``parameter_groups``)."""

    def __init__(self, groups: Iterable[dict], lr: float, momentum: float = 0.9, weight_decay: float = 1e-4,
                 eta: float = 1.0) -> None:
        super().__init__(groups, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta,
                                  "adapt": True})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                direction = param.grad.add(param, alpha=group["weight_decay"]) if group["weight_decay"] else \
                    param.grad.clone()
                if group["adapt"]:
                    weight_norm, direction_norm = torch.norm(param), torch.norm(direction)
                    trust = torch.where((weight_norm > 0) & (direction_norm > 0),
                                        group["eta"] * weight_norm / direction_norm, torch.ones_like(weight_norm))
                    direction.mul_(trust)
                state = self.state[param]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(param)
                velocity = state["momentum"].mul_(group["momentum"]).add_(direction)
                param.sub_(velocity, alpha=group["lr"])
        return loss


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Multiplicative weights (convolution and linear matrices) decay and adapt; biases and normalisation
    parameters (every tensor of one dimension) do neither (D3.4 2.2; SimCLR's LARS exclusion)."""
    decayed = [p for p in model.parameters() if p.ndim > 1]
    excluded = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decayed, "weight_decay": weight_decay, "adapt": True},
            {"params": excluded, "weight_decay": 0.0, "adapt": False}]


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Normalised temperature-scaled cross entropy over 2N views: each view's positive is its pair, the other
    2N - 2 views are its negatives (Sohn 2016; SimCLR eq. 1)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / temperature
    count = len(z1)
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(count, 2 * count), torch.arange(count)]).to(z.device)
    return F.cross_entropy(logits, targets)


def _gaussian_blur(image: torch.Tensor, sigma: float, size: int = 9) -> torch.Tensor:
    offsets = torch.arange(size, dtype=image.dtype) - size // 2
    kernel = torch.exp(-offsets**2 / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).to(image.device)
    bands = image.shape[0]
    padded = F.pad(image[None], (size // 2,) * 4, mode="reflect")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, size).expand(bands, 1, 1, size), groups=bands)
    return F.conv2d(rows, kernel.view(1, 1, size, 1).expand(bands, 1, size, 1), groups=bands)[0]


def augment(batch: torch.Tensor, generator: torch.Generator, jitter_probability: float = 0.8,
            blur_probability: float = 0.5) -> torch.Tensor:
    """One random view per standardised patch [N, bands, H, W]: flips, a 90-degree rotation, colour jitter (p 0.8:
    brightness +-0.4 std, contrast x0.6-1.4 about the patch mean, per-band gain x0.9-1.1), Gaussian blur (p 0.5,
    sigma 0.1-2 px). No cropping or resizing: the view has the input's shape and dtype."""
    def uniform(low: float, high: float, shape: tuple[int, ...] = ()) -> torch.Tensor:
        return low + (high - low) * torch.rand(shape, generator=generator)

    views = []
    for image in batch:
        if bool(torch.rand((), generator=generator) < 0.5):
            image = image.flip(-1)
        if bool(torch.rand((), generator=generator) < 0.5):
            image = image.flip(-2)
        image = torch.rot90(image, int(torch.randint(4, (), generator=generator)), dims=(-2, -1))
        if bool(torch.rand((), generator=generator) < jitter_probability):
            mean = image.mean()
            image = (image - mean) * float(uniform(0.6, 1.4)) + mean + float(uniform(-0.4, 0.4))
            image = image * uniform(0.9, 1.1, (image.shape[0], 1, 1)).to(image)
        if bool(torch.rand((), generator=generator) < blur_probability):
            image = _gaussian_blur(image, float(uniform(0.1, 2.0)))
        views.append(image.contiguous())
    return torch.stack(views)


def cosine_learning_rate(base: float, step: int, total: int) -> float:
    """Cosine annealing from ``base`` to 0 over ``total`` updates, no restart (SGDR without restarts)."""
    return base * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def knn_metrics(model: simclr.SimCLRModel, labelled: dict[str, tuple[torch.Tensor, np.ndarray, list[str]]],
                device: torch.device) -> dict[str, float]:
    """kNN feature-bank micro-F1 (scores >= 0.5) and mean absolute label distance: training patches leave-one-scene-
    out against the training bank, validation patches against the whole training bank."""
    bank_inputs, bank_targets, bank_scenes = labelled["train"]
    bank = simclr.representations(model.backbone, bank_inputs, device=device)
    out: dict[str, float] = {}
    scenes = np.array(bank_scenes)
    loso = np.zeros_like(bank_targets, dtype=np.float64)
    for scene in np.unique(scenes):
        inside = scenes == scene
        loso[inside] = linear_probe.knn_label_scores(bank[~inside], bank_targets[~inside], bank[inside], KNN_K)
    out["train_loso_micro_f1"] = linear_probe.micro_f1(bank_targets, (loso >= 0.5).astype(np.int64))
    out["train_loso_label_distance"] = float(np.abs(loso - bank_targets).mean())
    if "validation" in labelled:
        inputs, targets, _ = labelled["validation"]
        scores = linear_probe.knn_label_scores(bank, bank_targets, simclr.representations(
            model.backbone, inputs, device=device), KNN_K)
        out["validation_micro_f1"] = linear_probe.micro_f1(targets, (scores >= 0.5).astype(np.int64))
        out["validation_label_distance"] = float(np.abs(scores - targets).mean())
    return out


def load_labelled(root: Path | None) -> dict[str, tuple[torch.Tensor, np.ndarray, list[str]]]:
    out = {}
    for split in ("train", "validation"):
        patch_set, labels = corpus.labelled_split(split, root)
        if len(patch_set):
            out[split] = (simclr.standardise(patch_set.patches), np.stack([multi_hot_19(x.names) for x in labels]),
                          list(patch_set.scenes))
    return out


def fp16_state_bytes(model: nn.Module) -> bytes:
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models.train_ssl", description=__doc__.split("\n")[0])
    parser.add_argument("--budget-minutes", type=float, default=40.0, help="wall-clock budget of the training loop")
    parser.add_argument("--steps", type=int, default=0,
                        help="optimiser updates (the cosine's length); 0: as many as the budget allows, estimated "
                             "from the first update")
    parser.add_argument("--batch", type=int, default=128, help="patches per micro-batch (2 views each)")
    parser.add_argument("--accumulation", type=int, default=8, help="micro-batches per optimiser update")
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--eta", type=float, default=1.0, help="LARS trust coefficient")
    parser.add_argument("--levels", default="L2A,L1C", help="processing levels of the corpus used for training")
    parser.add_argument("--eval-every", type=int, default=10, help="updates between kNN feature-bank evaluations")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    parser.add_argument("--trunk", choices=("resnet101", "tiny"), default="resnet101",
                        help="tiny: one bottleneck per stage (tests only; the served model is resnet101)")
    parser.add_argument("--max-patches", type=int, default=0, help="use only the first N training patches (tests)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--data-root", type=Path, default=None, help="corpus folder (default $EOML_DATA_CACHE)")
    parser.add_argument("--work-dir", type=Path, default=Path.home() / ".cache" / "eoml" / "train-ssl")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--restart", action="store_true", help="ignore the resumable state in --work-dir")
    return parser


def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device = training_device(args.device)
    levels = tuple(args.levels.split(","))
    data = corpus.load_split("train", args.data_root, levels=levels)
    if args.max_patches:
        data = corpus.PatchSet(data.patches[:args.max_patches], data.patch_ids[:args.max_patches],
                               data.scenes[:args.max_patches], data.cloud_fraction[:args.max_patches])
    inputs = simclr.standardise(data.patches)
    labelled = load_labelled(args.data_root)
    batch = min(args.batch, len(inputs))
    layers = simclr.RESNET101_LAYERS if args.trunk == "resnet101" else simclr.TINY_LAYERS
    torch.manual_seed(args.seed)  # the family's seeded initialisation (models.specs SIMCLR_FAMILY)
    model = simclr.SimCLRModel(layers=layers).to(device)
    optimiser = LARS(parameter_groups(model, args.weight_decay), lr=args.learning_rate,
                     weight_decay=args.weight_decay, eta=args.eta)
    generator = torch.Generator().manual_seed(args.seed)
    state_path = args.work_dir / f"state-{args.trunk}.pt"
    progress = dict(step=0, total_steps=args.steps, images=0, seconds=0.0, losses=[], knn=[], epoch=0, cursor=0,
                    order=torch.randperm(len(inputs), generator=generator).tolist())
    if state_path.is_file() and not args.restart:
        state = torch.load(state_path, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        generator.set_state(state["generator"])
        progress = state["progress"]
        log.info("resumed", extra={"step": progress["step"], "total_steps": progress["total_steps"]})

    def save() -> None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        torch.save(dict(model=model.state_dict(), optimiser=optimiser.state_dict(), generator=generator.get_state(),
                        progress=progress), state_path.with_suffix(".tmp"))
        state_path.with_suffix(".tmp").replace(state_path)

    def evaluate() -> None:
        eval_started = time.monotonic()
        metrics = knn_metrics(model, labelled, device) if "train" in labelled else {}
        progress["eval_seconds"] = time.monotonic() - eval_started
        progress["knn"].append(dict(step=progress["step"], images=progress["images"], **metrics))
        log.info("knn", extra=progress["knn"][-1])

    def next_batch() -> torch.Tensor:
        if progress["cursor"] + batch > len(progress["order"]):  # drop the ragged end: every batch has `batch` pairs
            progress["order"] = torch.randperm(len(inputs), generator=generator).tolist()
            progress["cursor"], progress["epoch"] = 0, progress["epoch"] + 1
        pick = progress["order"][progress["cursor"]:progress["cursor"] + batch]
        progress["cursor"] += batch
        return inputs[pick]

    if not progress["knn"]:
        evaluate()
    model.train()
    started = time.monotonic()
    spent_before = progress["seconds"]
    # The budget is checked after each update: every invocation with updates left makes at least one.
    while not (progress["total_steps"] and progress["step"] >= progress["total_steps"]):
        spent = spent_before + time.monotonic() - started
        lr = cosine_learning_rate(args.learning_rate, progress["step"], progress["total_steps"] or 1)
        for group in optimiser.param_groups:
            group["lr"] = lr
        update_started = time.monotonic()
        optimiser.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(args.accumulation):
            pairs = next_batch()
            views = torch.cat([augment(pairs, generator), augment(pairs, generator)]).to(device)
            projected = model(views)
            loss = nt_xent(projected[:len(pairs)], projected[len(pairs):]) / args.accumulation
            loss.backward()
            total += float(loss.detach())
            progress["images"] += 2 * len(pairs)
        optimiser.step()
        progress["step"] += 1
        progress["losses"].append(total)
        if not progress["total_steps"]:  # fix the cosine's length once, from the first update's and kNN's speed
            per_update = time.monotonic() - update_started + progress.get("eval_seconds", 0.0) / args.eval_every
            progress["total_steps"] = max(1, int((args.budget_minutes * 60 - (spent + per_update)) / per_update) + 1)
            log.info("cosine length fixed", extra={"total_steps": progress["total_steps"],
                                                   "seconds_per_update": round(per_update, 1)})
        progress["seconds"] = spent_before + time.monotonic() - started
        log.info("update", extra={"step": progress["step"], "loss": round(total, 4), "lr": lr,
                                  "images_per_s": round(progress["images"] / max(progress["seconds"], 1e-9), 2)})
        if progress["step"] % args.eval_every == 0:
            evaluate()
            model.train()
            save()
        if spent_before + time.monotonic() - started >= args.budget_minutes * 60:
            break
    if not progress["knn"] or progress["knn"][-1]["step"] != progress["step"]:
        evaluate()
    progress["seconds"] = spent_before + time.monotonic() - started
    save()
    return write_checkpoint(model, args, data, levels, progress, device)


def write_checkpoint(model: simclr.SimCLRModel, args: argparse.Namespace, data: corpus.PatchSet,
                     levels: tuple[str, ...], progress: dict, device: torch.device) -> dict:
    args.output_dir.mkdir(parents=True, exist_ok=True)
    payload = fp16_state_bytes(model.cpu())
    path = args.output_dir / CHECKPOINT_NAME
    path.write_bytes(payload)
    manifest = json.loads(((args.data_root or corpus.cache_root()) / "corpus.json").read_text())
    record = {
        "checkpoint": CHECKPOINT_NAME, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest(),
        "trunk": args.trunk, "seed": args.seed, "device": str(device), "torch": torch.__version__,
        "threads": args.threads, "budget_minutes": args.budget_minutes,
        "steps": progress["step"], "cosine_steps": progress["total_steps"], "epochs": progress["epoch"],
        "images_seen": progress["images"], "seconds": round(progress["seconds"], 1),
        "images_per_second": round(progress["images"] / max(progress["seconds"], 1e-9), 2),
        "hyperparameters": {"batch": min(args.batch, len(data)), "accumulation": args.accumulation,
                            "learning_rate": args.learning_rate, "optimiser": "LARS (momentum 0.9)",
                            "lars_eta": args.eta, "weight_decay": args.weight_decay,
                            "weight_decay_excludes": "biases and normalisation parameters",
                            "schedule": "cosine annealing without restarts", "temperature": TEMPERATURE,
                            "projection": [simclr.REPRESENTATION_DIM, simclr.PROJECTION_HIDDEN, simclr.PROJECTION_DIM],
                            "augmentation": "flips, 90-degree rotations, colour jitter, Gaussian blur; no crops",
                            "imagenet_preloading": "not reachable here (seeded initialisation)", "knn_k": KNN_K},
        "corpus": {"format": manifest["format"], "split": "train", "levels": list(levels), "patches": len(data),
                   "scenes": sorted(set(data.scenes))},
        "losses": [round(x, 4) for x in progress["losses"]],
        "knn": progress["knn"],
    }
    path.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging("INFO", "text")
    record = train(args)
    print(f"steps {record['steps']} / {record['cosine_steps']}, images {record['images_seen']}, "
          f"{record['images_per_second']} images/s, checkpoint {record['bytes']} bytes sha256 {record['sha256']}")
    for entry in record["knn"]:
        print(json.dumps(entry))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
