"""``make train-probe``: the 43- and 19-class linear probes on the frozen SimCLR trunk, and how good they are.

Labelled data: the corpus' BigEarthNet patches whose labels its sources carry (``corpus.bigearthnet_labels``).
BigEarthNet v1 sources give 43-class names (the 19-class targets follow by the official mapping); the bundled
sample's BENv2 patches give 19-class names only, so they train and test the 19-class probe alone.

Probe: ``Linear(2048, classes)`` + sigmoid, binary cross-entropy, full-batch Adam (``PROBE_STEPS`` at
``PROBE_LEARNING_RATE``) on the features standardised with the training features' mean/std, folded back into the
served layer afterwards (the served probe reads ``representation_2048`` as it comes). Threshold 0.5. The L2 penalty is
the one hyper-parameter, chosen by scene-grouped cross-validation inside the training scenes (micro-F1).

Evaluation (``models/checkpoints/probe-evaluation.json``, tables in the model cards):
- baselines: the same probe on the seeded-random trunk (the simclr family's seeded initialisation, where SimCLR
  training starts), and the label-frequency prior (every patch gets the k most frequent training labels, k chosen on
  the training labels);
- label efficiency (D3.4 2.2): probes fitted on 25 / 50 / 100 % of the labelled training patches (seeded subsets,
  ``SUBSET_SEEDS`` draws below 100 %) and scored on the strict held-out set: the labelled patches of the validation
  scenes, seen by neither the trunk nor the probe;
- scene-grouped k-fold cross-validation over every labelled patch (train and validation scenes): each fold's probe
  and prior never saw the fold's scenes; the trunk saw the training-split patches, without labels.
Metrics: micro-F1, macro-F1 (classes present in the test targets), mAP (macro, same classes), pooled over the
held-out patches (CV: over the out-of-fold predictions of all folds).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models import corpus, linear_probe, simclr
from models.train_ssl import CHECKPOINT_NAME as SSL_CHECKPOINT_NAME
from models.train_ssl import SEED as SSL_SEED
from services.core.bigearthnet import multi_hot_19, multi_hot_43
from services.core.logging import configure_logging

log = logging.getLogger("models.train_probe")

ROOT = Path(__file__).resolve().parent
EVALUATION_NAME = "probe-evaluation.json"
PROBE_NAMES = {43: "probe-43.pt", 19: "probe-19.pt"}
PROBE_STEPS = 300
PROBE_LEARNING_RATE = 0.01
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)
FRACTIONS = (0.25, 0.5, 1.0)
SUBSET_SEEDS = (0, 1, 2, 3, 4)
CV_FOLDS = 5
THRESHOLD = 0.5


@dataclass(frozen=True)
class Labelled:
    """Labelled patches of one split: features per trunk, targets per nomenclature (None: labels unknown)."""

    features: dict[str, np.ndarray]  # trunk name -> [N, 2048]
    targets: dict[int, np.ndarray]  # classes -> [N, classes] (rows of patches without that nomenclature: -1)
    scenes: np.ndarray
    patch_ids: list[str]

    def rows(self, classes: int) -> np.ndarray:
        return np.flatnonzero(self.targets[classes][:, 0] >= 0)


def targets_of(labels: list[corpus.PatchLabels]) -> dict[int, np.ndarray]:
    t43 = np.stack([multi_hot_43(x.names) if x.nomenclature == 43 else np.full(43, -1.0, np.float32) for x in labels])
    t19 = np.stack([multi_hot_19(x.names) for x in labels])
    return {43: t43.astype(np.int64), 19: t19.astype(np.int64)}


def fit_probe(features: np.ndarray, targets: np.ndarray, l2: float, steps: int = PROBE_STEPS,
              seed: int = 0) -> linear_probe.LinearProbe:
    """BCE probe on standardised features, returned as the served layer on raw features."""
    mean, std = features.mean(axis=0), features.std(axis=0)
    # A near-constant feature would get a huge folded weight (w / std) that blows up on other scenes: floor its std.
    std = np.maximum(std, 0.01 * float(std.mean()) + 1e-6)
    x = torch.from_numpy((features - mean) / std).float()
    y = torch.from_numpy(targets).float()
    torch.manual_seed(seed)
    layer = torch.nn.Linear(x.shape[1], y.shape[1])
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    optimiser = torch.optim.Adam(layer.parameters(), lr=PROBE_LEARNING_RATE)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = F.binary_cross_entropy_with_logits(layer(x), y) + l2 * layer.weight.pow(2).sum()
        loss.backward()
        optimiser.step()
    probe = linear_probe.LinearProbe(y.shape[1], x.shape[1])
    with torch.no_grad():  # w.(f - m)/s + b = (w/s).f + (b - w.(m/s))
        weight = layer.weight / torch.from_numpy(std).float()
        probe.linear.weight.copy_(weight)
        probe.linear.bias.copy_(layer.bias - weight @ torch.from_numpy(mean).float())
    return probe.eval()


@torch.no_grad()
def probe_scores(probe: linear_probe.LinearProbe, features: np.ndarray) -> np.ndarray:
    return probe(torch.from_numpy(features).float()).numpy()


def metrics(targets: np.ndarray, scores: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    return {"micro_f1": linear_probe.micro_f1(targets, predictions),
            "macro_f1": linear_probe.macro_f1(targets, predictions),
            "map": linear_probe.mean_average_precision(targets, scores)}


def scene_folds(scenes: np.ndarray, folds: int, seed: int = 0) -> list[np.ndarray]:
    """Scenes dealt into ``folds`` groups (seeded shuffle, then largest scene first onto the smallest fold)."""
    unique = np.random.default_rng(seed).permutation(np.unique(scenes))
    sizes = {scene: int((scenes == scene).sum()) for scene in unique}
    groups: list[list[str]] = [[] for _ in range(min(folds, len(unique)))]
    for scene in sorted(unique, key=lambda s: -sizes[s]):
        smallest = min(range(len(groups)), key=lambda g: sum(sizes[s] for s in groups[g]))
        groups[smallest].append(scene)
    return [np.flatnonzero(np.isin(scenes, group)) for group in groups]


def cross_validated(features: np.ndarray, targets: np.ndarray, scenes: np.ndarray, l2: float,
                    steps: int = PROBE_STEPS, folds: int = CV_FOLDS) -> tuple[dict[str, float], dict[str, float]]:
    """(probe metrics, frequency-prior metrics) of out-of-fold predictions pooled over scene-grouped folds."""
    scores, predictions = np.zeros(targets.shape), np.zeros(targets.shape, np.int64)
    prior_scores, prior_predictions = np.zeros(targets.shape), np.zeros(targets.shape, np.int64)
    for test in scene_folds(scenes, folds):
        train = np.setdiff1d(np.arange(len(targets)), test)
        probe = fit_probe(features[train], targets[train], l2, steps)
        scores[test] = probe_scores(probe, features[test])
        predictions[test] = (scores[test] >= THRESHOLD).astype(np.int64)
        prior = linear_probe.FrequencyPrior.fit(targets[train])
        prior_scores[test], prior_predictions[test] = prior.scores(len(test)), prior.predict(len(test))
    return metrics(targets, scores, predictions), metrics(targets, prior_scores, prior_predictions)


def choose_l2(features: np.ndarray, targets: np.ndarray, scenes: np.ndarray,
              steps: int = PROBE_STEPS) -> tuple[float, dict[str, float]]:
    """The L2 penalty with the best scene-grouped CV micro-F1 inside the training scenes (ties: the larger)."""
    results = {str(l2): cross_validated(features, targets, scenes, l2, steps)[0]["micro_f1"] for l2 in L2_GRID}
    best = max(L2_GRID, key=lambda l2: (results[str(l2)], l2))
    return best, results


def subset(rows: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    count = max(2, round(fraction * len(rows)))
    return np.sort(np.random.default_rng(seed).choice(rows, size=min(count, len(rows)), replace=False))


def _mean(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([run[key] for run in runs])) for key in runs[0]}


def label_efficiency(train: Labelled, held_out: Labelled, classes: int, l2: float,
                     steps: int = PROBE_STEPS) -> list[dict]:
    """Per training fraction: SSL probe, random-trunk probe and prior on the strict held-out set (mean over seeds)."""
    rows, test = train.rows(classes), held_out.rows(classes)
    y_test = held_out.targets[classes][test]
    table = []
    for fraction in FRACTIONS:
        runs: dict[str, list[dict[str, float]]] = {"ssl": [], "random": [], "prior": []}
        for seed in SUBSET_SEEDS if fraction < 1 else SUBSET_SEEDS[:1]:
            pick = subset(rows, fraction, seed)
            y = train.targets[classes][pick]
            for trunk in ("ssl", "random"):
                probe = fit_probe(train.features[trunk][pick], y, l2, steps)
                scores = probe_scores(probe, held_out.features[trunk][test])
                runs[trunk].append(metrics(y_test, scores, (scores >= THRESHOLD).astype(np.int64)))
            prior = linear_probe.FrequencyPrior.fit(y)
            runs["prior"].append(metrics(y_test, prior.scores(len(test)), prior.predict(len(test))))
        table.append({"fraction": fraction, "train_patches": len(subset(rows, fraction, 0)),
                      "draws": len(runs["ssl"]), **{name: _mean(values) for name, values in runs.items()}})
    return table


def load_trunks(ssl_checkpoint: Path, trunk: str) -> dict[str, simclr.SimCLRModel]:
    layers = simclr.RESNET101_LAYERS if trunk == "resnet101" else simclr.TINY_LAYERS
    torch.manual_seed(SSL_SEED)  # the simclr family's seeded initialisation (models.specs SIMCLR_FAMILY)
    random = simclr.SimCLRModel(layers=layers).eval()
    trained = simclr.SimCLRModel(layers=layers)
    trained.load_state_dict(torch.load(ssl_checkpoint, map_location="cpu", weights_only=True))
    return {"ssl": trained.float().eval(), "random": random}


def labelled_features(split: str, trunks: dict[str, simclr.SimCLRModel], root: Path | None) -> Labelled:
    patch_set, labels = corpus.labelled_split(split, root)
    inputs = simclr.standardise(patch_set.patches)
    features = {name: simclr.representations(model.backbone, inputs) for name, model in trunks.items()}
    return Labelled(features, targets_of(labels), np.array(patch_set.scenes), list(patch_set.patch_ids))


def probe_bytes(probe: linear_probe.LinearProbe) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.half() for k, v in probe.state_dict().items()}, buffer)
    return buffer.getvalue()


def evaluate_classes(train: Labelled, held_out: Labelled, classes: int,
                     steps: int = PROBE_STEPS) -> tuple[dict, linear_probe.LinearProbe]:
    rows = train.rows(classes)
    l2, l2_cv = choose_l2(train.features["ssl"][rows], train.targets[classes][rows], train.scenes[rows],
                             steps)
    log.info("l2 chosen on training scenes", extra={"classes": classes, "l2": l2})
    everything = {trunk: np.concatenate([train.features[trunk][rows], held_out.features[trunk][held_out.rows(classes)]])
                  for trunk in ("ssl", "random")}
    y_all = np.concatenate([train.targets[classes][rows], held_out.targets[classes][held_out.rows(classes)]])
    scenes_all = np.concatenate([train.scenes[rows], held_out.scenes[held_out.rows(classes)]])
    cv = {}
    for trunk in ("ssl", "random"):
        cv[trunk], cv["prior"] = cross_validated(everything[trunk], y_all, scenes_all, l2, steps)
    final = fit_probe(train.features["ssl"][rows], train.targets[classes][rows], l2, steps)
    prior = linear_probe.FrequencyPrior.fit(train.targets[classes][rows])
    record = {
        "classes": classes, "l2": l2, "l2_cv_micro_f1_training_scenes": l2_cv,
        "labelled_train_patches": len(rows), "labelled_train_scenes": len(np.unique(train.scenes[rows])),
        "held_out_patches": len(held_out.rows(classes)),
        "held_out_scenes": sorted(set(held_out.scenes[held_out.rows(classes)].tolist())),
        "prior_k": prior.k,
        "label_efficiency_held_out": label_efficiency(train, held_out, classes, l2, steps),
        "cross_validation": {"folds": min(CV_FOLDS, len(np.unique(scenes_all))), "patches": len(y_all),
                             "scenes": len(np.unique(scenes_all)), **cv},
    }
    return record, final


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m models.train_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--ssl-checkpoint", type=Path, default=ROOT / "checkpoints" / SSL_CHECKPOINT_NAME)
    parser.add_argument("--trunk", choices=("resnet101", "tiny"), default="resnet101",
                        help="architecture of --ssl-checkpoint (tiny: tests only)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--probe-steps", type=int, default=PROBE_STEPS, help="Adam steps per probe fit")
    parser.add_argument("--data-root", type=Path, default=None, help="corpus folder (default $EOML_DATA_CACHE)")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "checkpoints")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging("INFO", "text")
    torch.set_num_threads(args.threads)
    trunks = load_trunks(args.ssl_checkpoint, args.trunk)
    train = labelled_features("train", trunks, args.data_root)
    held_out = labelled_features("validation", trunks, args.data_root)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    ssl_sha = hashlib.sha256(args.ssl_checkpoint.read_bytes()).hexdigest()
    evaluation: dict = {"ssl_checkpoint": args.ssl_checkpoint.name, "ssl_sha256": ssl_sha, "threshold": THRESHOLD,
                        "probe": {"steps": args.probe_steps, "learning_rate": PROBE_LEARNING_RATE, "optimiser": "Adam",
                                  "loss": "binary cross-entropy + l2 * ||W||^2", "l2_grid": list(L2_GRID)},
                        "fractions": list(FRACTIONS), "subset_seeds": list(SUBSET_SEEDS), "probes": {}}
    for classes in (43, 19):
        record, probe = evaluate_classes(train, held_out, classes, args.probe_steps)
        payload = probe_bytes(probe)
        (args.output_dir / PROBE_NAMES[classes]).write_bytes(payload)
        record.update(checkpoint=PROBE_NAMES[classes], bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest())
        evaluation["probes"][str(classes)] = record
        print(format_tables(record))
    (args.output_dir / EVALUATION_NAME).write_text(json.dumps(evaluation, indent=1) + "\n")
    return 0


def format_tables(record: dict) -> str:
    """Markdown tables of one probe's record (model cards and stdout)."""
    def cells(m: dict[str, float]) -> str:
        return f"{m['micro_f1']:.3f} | {m['macro_f1']:.3f} | {m['map']:.3f}"

    lines = [f"Strict held-out set: {record['held_out_patches']} labelled patches of {len(record['held_out_scenes'])} "
             "validation scenes (unseen by trunk and probe). Mean over seeded subsets below 100 %.", "",
             "| labelled training patches | SSL probe micro-F1 | macro-F1 | mAP | random-trunk probe micro-F1 | "
             "macro-F1 | mAP | frequency prior micro-F1 | macro-F1 | mAP |", "|---" * 10 + "|"]
    for row in record["label_efficiency_held_out"]:
        lines.append(f"| {row['train_patches']} ({100 * row['fraction']:.0f} %, {row['draws']} draws) | "
                     f"{cells(row['ssl'])} | {cells(row['random'])} | {cells(row['prior'])} |")
    cv = record["cross_validation"]
    lines += ["", f"Scene-grouped {cv['folds']}-fold cross-validation over {cv['patches']} labelled patches of "
              f"{cv['scenes']} scenes (each fold's probe and prior never saw its scenes; the trunk saw the "
              "training-split patches without labels):", "",
              "| | micro-F1 | macro-F1 | mAP |", "|---|---|---|---|"]
    for name, label in (("ssl", "SSL probe"), ("random", "random-trunk probe"), ("prior", "frequency prior")):
        lines.append(f"| {label} | {cells(cv[name])} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
