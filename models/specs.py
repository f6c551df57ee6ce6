"""One spec per served model: the single source of truth for its tensor contract, Triton config, card and README.

``python -m models.export --write-configs`` renders ``model_repository/<name>/config.pbtxt`` (and the
label files and READMEs) from these specs; ``python -m models.export`` also builds the torch modules
and exports ONNX. Tensor names, dtypes and dims (without the batch axis) are the production contract
(contracts doc section 5): do not change them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from torch import nn

from services.core import sentinel2
from services.core.bigearthnet import BIGEARTHNET_19_LABELS, BIGEARTHNET_43_LABELS
from services.core.model_card import ModelCard

from . import compression, linear_probe, rvq, sample_data, simclr, uc5_cfactor, uc6_locust

DataType = Literal["FP32", "INT64"]
_NUMPY_DTYPES: dict[str, type[np.generic]] = {"FP32": np.float32, "INT64": np.int64}

LABELS_FILENAME = "labels.txt"

# The compressor's seeded (untrained) transform is fitted on this many bundled sample patches (seeded choice); the
# trained one (``make train-compressor``) on the corpus' training scenes, bundled as a checkpoint.
COMPRESSION_INIT_PATCHES = 30
COMPRESSION_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "compression.pt"
COMPRESSION_METADATA = COMPRESSION_CHECKPOINT.with_suffix(".json")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: DataType  # KServe v2 protocol name; the config uses TYPE_<datatype>
    dims: tuple[int, ...]  # without the batch axis
    label_filename: str = ""

    @property
    def numpy_dtype(self) -> type[np.generic]:
        return _NUMPY_DTYPES[self.datatype]


@dataclass(frozen=True)
class Family:
    """The trained object behind one or more served models (the compression pair shares one)."""

    name: str
    seed: int
    create_untrained: Callable[[], nn.Module]  # architecture only: a checkpoint is loaded into it
    create_seeded: Callable[[int], nn.Module]  # the documented seeded initialisation
    description: str  # where seeded weights come from, for the README
    # A trained checkpoint that ships in the repository: ``make models`` exports it unless --checkpoint-dir has one.
    bundled_checkpoint: Path | None = None
    training_notes: Callable[[], str] | None = None  # README markdown on how the bundled checkpoint was made


@dataclass(frozen=True)
class PackagedOnnx:
    """An ONNX graph shipped in a registry package, served unchanged: ``make models`` fetches it, never builds it."""

    requirement: str  # pinned, e.g. "ukis-csmask==1.0.0"
    member: str  # path of the file inside the wheel
    sha256: str  # of the ONNX file; a fetched file with another digest is refused
    licence: str
    provenance: str  # human text for the README: who trained it on what, the paper
    companion: str = ""  # the package's own file with the normalisation statistics (for the README)

    @property
    def weights(self) -> str:
        return f"package:{self.requirement}/{self.member}:sha256={self.sha256}"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: Family | None  # None: a packaged ONNX graph (``packaged``), no torch module behind it
    serve: Callable[[nn.Module], nn.Module]  # training module -> the graph that is exported
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int
    card_fields: dict[str, object]  # every ModelCard field but ``weights``
    summary: str
    # Seeded random inputs of a batch, one array per input: export parity checks and tests use them.
    random_inputs: Callable[[np.random.Generator, int], list[np.ndarray]]
    notes: str = ""  # extra README markdown (conventions a client must know)
    labels: tuple[str, ...] = ()
    # Outputs with a declared range (sigmoid: 0..1) are compared on that scale; others on max |reference|.
    output_range: tuple[float, float] | None = None
    packaged: PackagedOnnx | None = None

    @property
    def seed(self) -> int:
        if self.family is None:
            raise ValueError(f"{self.name} is a packaged ONNX graph: it has no seed")
        return self.family.seed

    @property
    def seeded_weights(self) -> str:
        if self.packaged is not None:
            return self.packaged.weights
        return f"seeded-init:seed={self.seed}"

    def card(self, weights: str) -> ModelCard:
        fields = dict(self.card_fields)
        if not weights.startswith("checkpoint:"):
            fields.pop("entropy_prior", None)  # a prior belongs to trained weights, not to a seeded init
        return ModelCard(weights=weights, **fields)


def checkpoint_weights(filename: str, sha256: str) -> str:
    return f"checkpoint:{filename}:sha256={sha256}"


# ---------------------------------------------------------------------------------------------
# Shared Sentinel-2 conventions

SENTINEL2_CARD: dict[str, object] = {
    "input_kind": "sentinel2-l2a",
    "bands": list(sentinel2.SIMCLR_BAND_ORDER),
    "band_mean": [sentinel2.BIGEARTHNET_BAND_MEAN[b] for b in sentinel2.SIMCLR_BAND_ORDER],
    "band_std": [sentinel2.BIGEARTHNET_BAND_STD[b] for b in sentinel2.SIMCLR_BAND_ORDER],
    "normalisation": "standardise",
    "resampling_20m": "bilinear",
    "input_units": "L2A digital numbers (surface reflectance x 10000), standardised per band: (DN - band_mean) / band_std",
}

def decompressor_card(**fields: object) -> dict[str, object]:
    """Card fields every decompressor shares (codes in, the compressor's standardised bands out), plus ``fields``."""
    return {
        **SENTINEL2_CARD,
        "input_kind": "codes",
        "resampling_20m": "",
        "task": "decompress",
        "patch_size": 120,
        "output_units": "normalised reflectance; L2A digital number = value * band_std + band_mean",
        "output_range": "unbounded (normalised space of the compressor's input)",
        **fields,
    }


SENTINEL2_INPUT_120 = TensorSpec("input_sentinel2_10_bands_120", "FP32", (10, 120, 120))
REPRESENTATION = TensorSpec("representation_2048", "FP32", (simclr.REPRESENTATION_DIM,))
CODES = TensorSpec(
    "int64_latent32_15", "INT64", (60, 60, compression.CODEBOOK_LEVELS)
)  # name kept from production

# UC6 per-variable standardisation (our choice; no ERA5 sample ships with the project). Typical
# desert-locust breeding areas (Sahel, Arabian Peninsula): mostly dry days with rare heavy rain,
# warm temperatures. Units: ERA5-Land daily total precipitation in mm/day, 2 m temperature in K.
UC6_VARIABLES = ("precipitation", "temperature")
UC6_MEAN = (0.5, 298.15)  # mm/day, K (25 degC)
UC6_STD = (2.5, 7.0)


def _standard_normal(shape: tuple[int, ...]) -> Callable[[np.random.Generator, int], list[np.ndarray]]:
    return lambda rng, batch: [rng.standard_normal((batch, *shape), dtype=np.float32)]


def _random_representations(rng: np.random.Generator, batch: int) -> list[np.ndarray]:
    # Representations come out of ReLU + average pooling: non-negative.
    return [np.abs(rng.standard_normal((batch, simclr.REPRESENTATION_DIM), dtype=np.float32))]


def _random_codes(rng: np.random.Generator, batch: int) -> list[np.ndarray]:
    codes = rng.integers(0, compression.CODEBOOK_SIZE, size=(batch, *CODES.dims), dtype=np.int64)
    # Exercise the "unused level" convention: each position keeps a random number (1..8) of levels.
    kept = rng.integers(1, compression.CODEBOOK_LEVELS + 1, size=(batch, 60, 60, 1))
    codes[np.arange(compression.CODEBOOK_LEVELS)[None, None, None, :] >= kept] = compression.UNUSED_LEVEL
    return [codes]


# ---------------------------------------------------------------------------------------------
# Families (seeded initialisation of each trained object)


def _seeded(factory: Callable[[], nn.Module]) -> Callable[[int], nn.Module]:
    def create(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return factory().eval()

    return create


def _seeded_compression(seed: int) -> nn.Module:
    """The untrained codec: the transform fitted on seeded bundled sample patches, identity post-filter."""
    card = ModelCard(weights=f"seeded-init:seed={seed}", task="compress", **SENTINEL2_CARD)
    init_names, _ = compression_split(seed)
    codec = compression.BlockTransformCodec()
    with torch.no_grad():
        blocks = codec.to_blocks(torch.from_numpy(sample_data.load_patches(init_names, card)))
    compression.fit_block_transform(codec, blocks.reshape(-1, compression.BLOCK_VALUES))
    return codec.eval()


def compression_training_record() -> dict[str, object]:
    """``models/checkpoints/compression.json`` (written by make train-compressor): prior, corpus, budget."""
    return json.loads(COMPRESSION_METADATA.read_text()) if COMPRESSION_METADATA.is_file() else {}


COMPRESSION_EVALUATION = COMPRESSION_CHECKPOINT.with_name("compression-evaluation.json")


def _compression_training_notes() -> str:
    """Corpus, budget and the held-out evaluation table of the bundled checkpoint, for the model card."""
    record = compression_training_record()
    if not record:
        return ""
    corpus = record["corpus"]
    lines = [
        "## Training (make train-compressor)",
        "",
        f"- corpus: `make data` ({corpus['format']}, manifest sha256 `{corpus['manifest_sha256'][:16]}...`), split "
        f"**{corpus['split']}**: {corpus['patches']} patches of {len(corpus['scenes'])} scenes "
        "(the validation scenes are never read by training);",
        f"- transform: closed-form principal directions of the training blocks, {100 * record['transform_variance_kept']:.2f} % "
        "of the block variance in the 128 kept coefficients;",
        f"- post-filter: {record['post_filter']['steps']} Adam steps (batch {record['hyperparameters']['batch']}, "
        f"{record['hyperparameters']['crop']} px crops, random operating points), seed {record['seed']}, device "
        f"{record['device']}, budget {record['budget_minutes']:g} min, torch {record['torch']}; checked on "
        f"{record['post_filter']['development_patches']} patches of training scenes it never trained on "
        f"({', '.join(record['post_filter']['development_scenes'])}) and applied from quantiser scale "
        f"{record['post_filter']['applied_from_quantiser_scale']} on, where it lowered the error at every checked point;",
        f"- entropy prior: Laplace scales per (quantiser scale, coefficient, context), maximum likelihood on the "
        f"training codes; sha256 `{record['entropy_prior_sha256'][:16]}...`;",
        f"- checkpoint: `models/checkpoints/{record['checkpoint']}`, fp16, {record['bytes']} bytes, sha256 "
        f"`{record['sha256']}`.",
    ]
    if COMPRESSION_EVALUATION.is_file():
        evaluation = json.loads(COMPRESSION_EVALUATION.read_text())
        lines += [
            "",
            f"## Evaluation on held-out scenes (make eval-compression, {evaluation['created']})",
            "",
            f"{evaluation['patches']} validation patches of scenes never trained on ({', '.join(evaluation['scenes'])}). "
            "bpp = bits of the real `.codes` file / (N x 14,400); RMS % = 100 x RMSE / 10,000 DN over the 10 bands; "
            "JPEG 2000 / JPEG-XL (imagecodecs, per band, uint16) interpolated at the same bpp ('-': outside their "
            "measured curve).",
            "",
            "The residual-VQ compressor this replaced (seeded codebooks) measured 2.78 bpp at 7.53 % with one level on "
            "the 82 held-out patches of the corpus before configilm joined it; JPEG 2000 reached 3.25 % there.",
            "",
            "| levels | quantiser scale | bpp | RMS % | PSNR dB | JPEG 2000 RMS % | JPEG-XL RMS % |",
            "|---|---|---|---|---|---|---|",
        ]
        for point in evaluation["ours"]:
            refs = [point.get(k) for k in ("jpeg2000_rms_percent_at_bpp", "jpegxl_rms_percent_at_bpp")]
            lines.append(f"| {point['levels']} | {point['quantiser_scale']} | {point['bpp']:.3f} | "
                         f"{point['rms_percent']:.3f} | {point['psnr_db']:.2f} | "
                         + " | ".join("-" if r is None else f"{r:.3f}" for r in refs) + " |")
    return "\n".join(lines)


def _compression_prior() -> str:
    return str(compression_training_record().get("entropy_prior", ""))


def compression_split(seed: int) -> tuple[list[str], list[str]]:
    """(codebook-initialisation patches, held-out patches) of the bundled sample for ``seed``."""
    return sample_data.seeded_split(sample_data.sample_patch_names(), COMPRESSION_INIT_PATCHES, seed)


_NO_TRAINED_MEANING = "Outputs have the contract's shapes, types and ranges but no trained meaning."

SSL_CHECKPOINT = COMPRESSION_CHECKPOINT.with_name("ssl-simclr.pt")  # make train-ssl
PROBE_CHECKPOINTS = {43: COMPRESSION_CHECKPOINT.with_name("probe-43.pt"),  # make train-probe
                     19: COMPRESSION_CHECKPOINT.with_name("probe-19.pt")}
PROBE_EVALUATION = COMPRESSION_CHECKPOINT.with_name("probe-evaluation.json")


def _json_record(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _ssl_training_notes() -> str:
    """How the bundled SimCLR checkpoint was trained (models/checkpoints/ssl-simclr.json), for the model card."""
    record = _json_record(SSL_CHECKPOINT.with_suffix(".json"))
    if not record:
        return ""
    hp, data = record["hyperparameters"], record["corpus"]
    knn = record["knn"]
    lines = [
        "## Training (make train-ssl)",
        "",
        f"- SimCLR (D3.4 2.2, Table 1) on the corpus' training split (`make data`, {data['format']}): "
        f"{data['patches']} unlabelled patches of {len(data['scenes'])} scenes, levels {', '.join(data['levels'])} "
        "(L1C included: the L2A training scenes hold 61 patches; colour jitter covers the radiometric offset);",
        f"- LARS (momentum 0.9, trust coefficient {hp['lars_eta']}), learning rate {hp['learning_rate']}, "
        f"weight decay {hp['weight_decay']} off for biases and normalisation parameters, cosine annealing without restarts over "
        f"{record['cosine_steps']} updates; NT-Xent temperature {hp['temperature']}; projection "
        f"{' -> '.join(str(d) for d in hp['projection'])}; {hp['augmentation']};",
        f"- scale: batch {hp['batch']} x {hp['accumulation']} accumulation step(s) (Table 1: 128 x 8; CPU here), "
        f"{record['steps']} updates, {record['images_seen']} augmented views seen ({record['epochs']} full epochs), "
        f"{record['seconds'] / 60:.1f} min on {record['device']} ({record['threads']} threads, "
        f"{record['images_per_second']} views/s), budget {record['budget_minutes']:g} min, seed {record['seed']};",
        "- ImageNet preloading (Table 1: yes): not reachable here; training starts from the family's seeded "
        "initialisation;",
        f"- checkpoint: `models/checkpoints/{record['checkpoint']}`, fp16, {record['bytes']} bytes, sha256 "
        f"`{record['sha256']}`.",
        "",
        f"kNN feature-bank metric (D3.4 2.2; k = {hp['knn_k']}, 19-class labels, cosine similarity, micro-F1 of "
        "scores >= 0.5), logged during training and never used for a choice: training patches leave-one-scene-out "
        "against the other training scenes' bank, and the labelled validation-scene patches against the training "
        "bank.",
        "",
        "| update | views seen | kNN micro-F1, training (leave one scene out) | kNN micro-F1, validation scenes |",
        "|---|---|---|---|",
    ]
    lines += [f"| {e['step']} | {e['images']} | {e.get('train_loso_micro_f1', float('nan')):.3f} | "
              f"{e.get('validation_micro_f1', float('nan')):.3f} |" for e in knn]
    return "\n".join(lines)


def _probe_verdict(record: dict) -> str:
    """One sentence: does the served probe (100 % row) beat both baselines on unseen scenes, here and in CV?"""
    def versus(scores: dict) -> str:
        ssl, prior, random = (scores[k]["micro_f1"] for k in ("ssl", "prior", "random"))
        return (f"micro-F1 {ssl:.3f}, {'above' if ssl > prior else 'not above'} the frequency prior ({prior:.3f}) and "
                f"{'above' if ssl > random else 'not above'} the random-trunk probe ({random:.3f})")

    return (f"**Served probe on the strict held-out set: {versus(record['label_efficiency_held_out'][-1])}; in "
            f"scene-grouped cross-validation: {versus(record['cross_validation'])}.** With "
            f"{record['held_out_patches']} held-out patches one patch's labels move micro-F1 by several points.")


def _probe_training_notes(classes: int) -> Callable[[], str]:
    def notes() -> str:
        from .train_probe import format_tables  # torch-side module; imported when a card is rendered

        evaluation = _json_record(PROBE_EVALUATION)
        record = evaluation.get("probes", {}).get(str(classes))
        if not record:
            return ""
        probe = evaluation["probe"]
        return "\n".join([
            "## Training (make train-probe)",
            "",
            f"- frozen trunk: `{evaluation['ssl_checkpoint']}` (sha256 `{evaluation['ssl_sha256'][:16]}...`);",
            f"- {record['labelled_train_patches']} labelled patches of {record['labelled_train_scenes']} training "
            "scenes (the corpus' BigEarthNet patches whose labels their sources carry"
            + ("; BENv2 patches carry 19-class names only, so they train the 19-class probe alone" if classes == 43
               else "; 43-class labels mapped to 19 by the official nomenclature") + ");",
            f"- {probe['optimiser']}, {probe['steps']} full-batch steps, learning rate {probe['learning_rate']}, "
            f"{probe['loss']} with l2 = {record['l2']} chosen by scene-grouped cross-validation inside the training "
            f"scenes (grid {probe['l2_grid']}); threshold {evaluation['threshold']};",
            f"- checkpoint: `models/checkpoints/{record['checkpoint']}`, fp16, {record['bytes']} bytes, sha256 "
            f"`{record['sha256']}`.",
            "",
            "## Evaluation on unseen scenes",
            "",
            "Baselines: the same probe on the seeded-random trunk (where SimCLR training starts) and the "
            f"label-frequency prior (the k most frequent training labels, k chosen on the training labels: k = "
            f"{record['prior_k']} at 100 %). The validation scenes' labels were looked at only for these tables.",
            "",
            _probe_verdict(record),
            "",
            format_tables(record),
        ])

    return notes


_TRAINED_SHIPPED = ("The repository ships trained weights ({checkpoint}, {target}), which make models exports "
                    "instead.")

SIMCLR_FAMILY = Family(
    "simclr-resnet101", 1, simclr.SimCLRModel, _seeded(simclr.SimCLRModel),
    "He-normal convolutions, unit batch-norm, zero-init residual (last batch-norm scale of every "
    "bottleneck = 0, Goyal et al. 2017) so the untrained network gives bounded features; "
    "projection head with PyTorch's default initialisation. "
    + _TRAINED_SHIPPED.format(checkpoint="models/checkpoints/ssl-simclr.pt", target="make train-ssl"),
    bundled_checkpoint=SSL_CHECKPOINT,
    training_notes=_ssl_training_notes,
)
LINEAR_43_FAMILY = Family(
    "linear-probe-43", 2, lambda: linear_probe.LinearProbe(43), _seeded(lambda: linear_probe.LinearProbe(43)),
    "PyTorch's default Linear initialisation (uniform in +-1/sqrt(2048)). "
    + _TRAINED_SHIPPED.format(checkpoint="models/checkpoints/probe-43.pt", target="make train-probe"),
    bundled_checkpoint=PROBE_CHECKPOINTS[43],
    training_notes=_probe_training_notes(43),
)
LINEAR_19_FAMILY = Family(
    "linear-probe-19", 3, lambda: linear_probe.LinearProbe(19), _seeded(lambda: linear_probe.LinearProbe(19)),
    "PyTorch's default Linear initialisation (uniform in +-1/sqrt(2048)). "
    + _TRAINED_SHIPPED.format(checkpoint="models/checkpoints/probe-19.pt", target="make train-probe"),
    bundled_checkpoint=PROBE_CHECKPOINTS[19],
    training_notes=_probe_training_notes(19),
)
COMPRESSION_FAMILY = Family(
    "compression-transform", 4, compression.BlockTransformCodec, _seeded_compression,
    "untrained: the block transform fitted (principal directions of 8 x 8 x 10 DN blocks) on "
    f"{COMPRESSION_INIT_PATCHES} of the 42 bundled BigEarthNet sample patches (seeded choice), identity post-filter. "
    "The repository ships trained weights (models/checkpoints/compression.pt, make train-compressor), which "
    "make models exports instead.",
    bundled_checkpoint=COMPRESSION_CHECKPOINT,
    training_notes=_compression_training_notes,
)
UC5_FAMILY = Family(
    "uc5-cfactor", 5, uc5_cfactor.CFactorRegressor, _seeded(uc5_cfactor.CFactorRegressor),
    "PyTorch's default Conv2d/Linear initialisation. " + _NO_TRAINED_MEANING + " Not trained, and not faked: "
    "its training data (D3.4: 300,000 Sentinel-2 crops paired with C-factors from CMCC's lookup table) is not "
    "reachable from this project.",
)
UC6_FAMILY = Family(
    "uc6-locust", 6, uc6_locust.LocustConvLSTM, _seeded(uc6_locust.LocustConvLSTM),
    "PyTorch's default Conv2d/Linear initialisation. " + _NO_TRAINED_MEANING + " Not trained, and not faked: "
    "its training data (D3.4: 149,040 ERA5-Land precipitation/temperature sequences with 1,799 locust-breeding "
    "positives assembled by SISTEMA) is not reachable from this project.",
)

# ---------------------------------------------------------------------------------------------
# The six served models (seven entries: the linear probe exists for 43 and 19 classes)

_CLASSIFY_CARD: dict[str, object] = {
    "task": "classify",
    "output_kind": "tile-class-probabilities",
    "input_kind": "features",
    "input_units": "representation_2048 of Bigearth-net-ssl-label",
    "output_units": "independent probability per class (multi-label, sigmoid)",
    "output_range": "[0, 1]",
}

_CLASSIFY_NOTES = (
    "Ask for labels through Triton's classification extension: request the output with "
    "`class_count=k` and get BYTES entries `\"score:index:label\"`, labels from `labels.txt` (one name "
    "per line, index order).\n\n"
    "The 43 -> 19 class mapping and multi-hot helpers live in `services/core/bigearthnet.py`."
)

SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="Bigearth-net-ssl-label",
        family=SIMCLR_FAMILY,
        serve=lambda model: simclr.SimCLRRepresentation(model),
        inputs=(SENTINEL2_INPUT_120,),
        outputs=(REPRESENTATION,),
        max_batch_size=32,
        preferred_batch_sizes=(8, 16, 32),
        max_queue_delay_us=1000,
        card_fields={
            **SENTINEL2_CARD,
            "task": "ssl-features",
            "output_kind": "tile-vector",
            "patch_size": 120,
            "output_units": "SimCLR representation (dimensionless)",
            "output_range": "[0, inf) (ReLU then global average pooling)",
            "intended_use": "task-agnostic features of a 1.2 km Sentinel-2 L2A patch for downstream "
            "models (linear probes, regressors, retrieval)",
        },
        summary="SimCLR self-supervised feature extractor (D3.4 2.2): ResNet-101 on 10 Sentinel-2 bands, "
        "bottleneck blocks [3, 4, 23, 3], global average pooling to a 2048-d representation. The "
        "training projection head (Linear 2048->128 without bias, BatchNorm1d, ReLU, Linear 128->64) "
        "belongs to the torch module and its checkpoints but is not served.",
        random_inputs=_standard_normal(SENTINEL2_INPUT_120.dims),
    ),
    ModelSpec(
        name="Bigearth-net-linear-label",
        family=LINEAR_43_FAMILY,
        serve=lambda model: model,
        inputs=(REPRESENTATION,),
        outputs=(TensorSpec("classes_probability", "FP32", (43,), LABELS_FILENAME),),
        max_batch_size=256,
        preferred_batch_sizes=(64, 256),
        max_queue_delay_us=500,
        card_fields={
            **_CLASSIFY_CARD,
            "intended_use": "multi-label land cover of a BigEarthNet-style patch in the 43 CORINE classes",
        },
        summary="Linear probe over the SimCLR representation: Linear(2048, 43) + sigmoid, one independent "
        "probability per BigEarthNet CORINE level-3 class (43-class nomenclature, label_indices.json order).",
        notes=_CLASSIFY_NOTES,
        labels=BIGEARTHNET_43_LABELS,
        output_range=(0.0, 1.0),
        random_inputs=_random_representations,
    ),
    ModelSpec(
        name="Bigearth-net-linear-label-19",
        family=LINEAR_19_FAMILY,
        serve=lambda model: model,
        inputs=(REPRESENTATION,),
        outputs=(TensorSpec("classes_probability", "FP32", (19,), LABELS_FILENAME),),
        max_batch_size=256,
        preferred_batch_sizes=(64, 256),
        max_queue_delay_us=500,
        card_fields={
            **_CLASSIFY_CARD,
            "intended_use": "multi-label land cover in the BigEarthNet-19 nomenclature (Sumbul et al., "
            "arXiv:2105.07921), the nomenclature of BigEarthNet v2",
        },
        summary="Linear probe over the SimCLR representation: Linear(2048, 19) + sigmoid over the "
        "BigEarthNet-19 classes (D3.4 evaluates the SSL features on this 19-class task).",
        notes=_CLASSIFY_NOTES,
        labels=BIGEARTHNET_19_LABELS,
        output_range=(0.0, 1.0),
        random_inputs=_random_representations,
    ),
    ModelSpec(
        name="Bigearth-net-compression-compress-pytorch",
        family=COMPRESSION_FAMILY,
        serve=lambda model: compression.Compressor(model),
        inputs=(SENTINEL2_INPUT_120,),
        outputs=(CODES,),
        max_batch_size=64,
        preferred_batch_sizes=(16, 64),
        max_queue_delay_us=1000,
        card_fields={
            **SENTINEL2_CARD,
            "task": "compress",
            "patch_size": 120,
            "output_units": "code = round(transform coefficient / 100 DN) + 5000 per code position (60 x 60) and "
            "level (8); level l holds coefficients 16(l-1)..16l-1 of each 8 x 8 block",
            "output_range": "[0, 9999]",
            "intended_use": "lossy compression of Sentinel-2 L2A patches for storage and transfer; "
            "decode with Bigearth-net-compression-decompress-pytorch",
            "entropy_prior": _compression_prior(),
        },
        summary="Learned compression encoder (D3.4 2.3): each 8 x 8 block of the 10 bands (640 DN values) minus "
        "the training corpus' mean block is projected on 128 learned orthonormal basis vectors (the principal "
        "directions of the training blocks, ordered by variance); each coefficient is quantised with a 100 DN "
        "step into a code (code = q + 5000, clamped to 0..9999). Level l of the output holds coefficients "
        "16(l-1)..16l-1 of every block, laid out as a 4 x 4 group of code positions "
        "(services/core/transform_codes.py). No search: one 640 x 128 product per block.",
        notes="Output codes always hold all 8 levels at the base step. The Wrapper keeps the levels and the "
        "quantiser scale a workflow asks for (`meta_information.compression`) and entropy-codes the codes with "
        "the learned prior this card carries (`card.entropy_prior`, services/core/transform_codes.py).",
        random_inputs=_standard_normal(SENTINEL2_INPUT_120.dims),
    ),
    ModelSpec(
        name="Bigearth-net-compression-decompress-pytorch",
        family=COMPRESSION_FAMILY,
        serve=lambda model: compression.Decompressor(model),
        inputs=(CODES,),
        outputs=(TensorSpec("output_sentinel2_10_bands_120", "FP32", (10, 120, 120)),),
        max_batch_size=64,
        preferred_batch_sizes=(16, 64),
        max_queue_delay_us=1000,
        card_fields=decompressor_card(
            input_units="code in [0, 9999] per position and level (the compressor's); -1 = level not used",
            intended_use="reconstruct Sentinel-2 L2A patches from Bigearth-net-compression-compress-pytorch "
            "codes, with 1 to 8 levels",
            entropy_prior=_compression_prior(),
        ),
        summary="Learned compression decoder (D3.4 2.3): coefficient = (code - 5000) x 100 DN (0 for a level "
        "not used), the transpose of the learned basis plus the mean block back to 8 x 8 x 10 DN blocks, then a "
        "trained residual post-filter (three 3 x 3 convolutions, 10 -> 32 -> 32 -> 10) that removes block edges "
        "and quantisation error.",
        notes="**Fewer than 8 levels: code -1 marks an unused level.** Every negative code contributes a zero "
        "coefficient, so codes with levels k+1..8 set to -1 decode the first 16k coefficients of every block. "
        "Fewer levels: fewer bits, larger error (D3.4's dynamic number of codebooks).\n\n"
        "The output is in the compressor's input space (standardised per band); the card's `bands`, "
        "`band_mean` and `band_std` turn it back into L2A digital numbers "
        "(`services.core.sentinel2.denormalise`).",
        random_inputs=_random_codes,
    ),
    ModelSpec(
        name="uc5-cfactor",
        family=UC5_FAMILY,
        serve=lambda model: model,
        inputs=(TensorSpec("input_sentinel2_10_bands_24", "FP32", (10, uc5_cfactor.CROP_SIZE, uc5_cfactor.CROP_SIZE)),),
        outputs=(TensorSpec("c_factor", "FP32", (1,)),),
        max_batch_size=128,
        preferred_batch_sizes=(32, 128),
        max_queue_delay_us=500,
        card_fields={
            **SENTINEL2_CARD,
            "task": "uc5-cfactor",
            "output_kind": "tile-vector",
            "patch_size": uc5_cfactor.CROP_SIZE,
            "output_units": "RUSLE cover-management factor C (dimensionless)",
            "output_range": "[0, 1]",
            "intended_use": "UC5 soil erosion: C-factor of the location at the centre of a 24 x 24 pixel "
            "(240 m x 240 m) crop of the 10 m grid, same 10 bands and normalisation as Bigearth-net-ssl-label",
        },
        summary="UC5 soil-erosion C-factor regressor (D3.4 section 4): 3 convolution layers (10->32->64->128, "
        "3 x 3, ReLU, 2 x 2 max-pooling after the first two), global average pooling, a 1-layer MLP "
        "(Linear 128 -> 1) and a sigmoid, so the C-factor is in [0, 1].",
        notes="Crop: 24 x 24 pixels of the 10 m grid (240 m), centred on the location of interest, cut from "
        "the same stacked and normalised 10-band tile the SimCLR model reads (20 m bands upsampled x2 "
        "bilinear before cropping).",
        output_range=(0.0, 1.0),
        random_inputs=_standard_normal((10, uc5_cfactor.CROP_SIZE, uc5_cfactor.CROP_SIZE)),
    ),
    ModelSpec(
        name="uc6-locust",
        family=UC6_FAMILY,
        serve=lambda model: model,
        inputs=(TensorSpec("input", "FP32", (uc6_locust.TIME_STEPS, uc6_locust.VARIABLES, 12, 12)),),
        outputs=(TensorSpec("probability", "FP32", (1,)),),
        max_batch_size=256,
        preferred_batch_sizes=(64, 256),
        max_queue_delay_us=100,
        card_fields={
            "task": "uc6-locust",
            "output_kind": "tile-vector",
            "input_kind": "era5-sequence",
            "bands": list(UC6_VARIABLES),
            "band_mean": list(UC6_MEAN),
            "band_std": list(UC6_STD),
            "normalisation": "standardise",
            "patch_size": 12,
            "input_units": "precipitation in mm/day, temperature (2 m) in K; standardised per variable: "
            "(value - band_mean) / band_std; 4 consecutive daily steps, oldest first",
            "output_units": "probability of locust breeding suitability",
            "output_range": "[0, 1]",
            "intended_use": "UC6 one-class (positive-unlabelled) desert-locust breeding suitability of a "
            "12 x 12 cell window from 4 daily steps of precipitation and temperature",
        },
        summary="UC6 locust-breeding classifier (D3.4 section 4): a ConvLSTM cell (3 x 3 gate convolutions, 16 "
        "hidden channels) unrolled over the 4 time steps, then a linear head over the last hidden state "
        "(16 x 12 x 12 -> 1) and a sigmoid.",
        notes="Input layout [time, variable, row, col] = [4, 2, 12, 12]; variable 0 = precipitation "
        "(mm/day), variable 1 = temperature (K). The per-variable mean/std of the card (precipitation "
        f"{UC6_MEAN[0]} / {UC6_STD[0]} mm/day, temperature {UC6_MEAN[1]} / {UC6_STD[1]} K, i.e. "
        f"{UC6_MEAN[1] - 273.15:.0f} degC) were chosen for typical breeding areas, not fitted: a trained "
        "checkpoint must have been trained with these values or come with its own spec.",
        output_range=(0.0, 1.0),
        random_inputs=_standard_normal((uc6_locust.TIME_STEPS, uc6_locust.VARIABLES, 12, 12)),
    ),
)

# ---------------------------------------------------------------------------------------------
# The D3.4 residual-VQ (VQ-VAE) compressor pair: a second codec beside the transform coder (card codec residual-vq/1)

RVQ_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "rvq.pt"
RVQ_METADATA = RVQ_CHECKPOINT.with_suffix(".json")
RVQ_EVALUATION = RVQ_CHECKPOINT.with_name("rvq-evaluation.json")


def rvq_training_record() -> dict[str, object]:
    """``models/checkpoints/rvq.json`` (written by make train-compressor CODEC=rvq)."""
    return json.loads(RVQ_METADATA.read_text()) if RVQ_METADATA.is_file() else {}


def _rvq_training_notes() -> str:
    """Corpus, budget, codebook usage and the held-out evaluation table of the bundled RVQ checkpoint."""
    record = rvq_training_record()
    if not record:
        return ""
    corpus, training, usage = record["corpus"], record["training"], record["codebook_usage"]
    hyper = record["hyperparameters"]
    lines = [
        "## Training (make train-compressor CODEC=rvq)",
        "",
        f"- corpus: `make data` ({corpus['format']}, manifest sha256 `{corpus['manifest_sha256'][:16]}...`), split "
        f"**{corpus['split']}**: {corpus['fitted_patches']} patches fitted; training scenes "
        f"{', '.join(corpus['development_scenes'])} held out of the fit as development scenes "
        f"({corpus['development_patches']} patches checked); the validation scenes are never read by training;",
        f"- {training['steps']} Adam steps (fixed learning rate {hyper['learning_rate']:g}, batch {hyper['batch']} "
        f"crops of {hyper['crop']} px), the first {training['warmup_steps']} as a continuous autoencoder, then "
        f"RVQ with a random number of levels (1..8) per sample, commitment {hyper['commitment']:g}, EMA codebooks "
        f"(decay {hyper['ema_decay']:g}), {training['codes_reseeded']} dead codes re-seeded; seed {record['seed']}, "
        f"device {record['device']} ({record['threads']} threads), budget {record['budget_minutes']:g} min, "
        f"torch {record['torch']}; loss {training['loss_first25']:.4f} -> {training['loss_last25']:.4f};",
        f"- checkpoint: `models/checkpoints/{record['checkpoint']}`, fp16, {record['bytes']} bytes, sha256 "
        f"`{record['sha256']}`.",
        "",
        "Codebook usage (share of the 10,000 codes used; perplexity = 2^entropy of the code histogram), on "
        f"{usage['fitted_patches_encoded']} fitted patches / the development patches, and RMS % there:",
        "",
        "| level | used (fitted) | perplexity (fitted) | used (development) | perplexity (development) | "
        "development RMS % with levels 1..L |",
        "|---|---|---|---|---|---|",
    ]
    for fitted, dev, rms in zip(usage["fitted"], usage["development"], record["development_rms_percent_per_levels"]):
        lines.append(f"| {fitted['level']} | {fitted['used_fraction']:.3f} | {fitted['perplexity']:.0f} | "
                     f"{dev['used_fraction']:.3f} | {dev['perplexity']:.0f} | {rms:.3f} |")
    if RVQ_EVALUATION.is_file():
        evaluation = json.loads(RVQ_EVALUATION.read_text())
        lines += [
            "",
            f"## Evaluation on held-out scenes (make eval-compression, {evaluation['created']})",
            "",
            f"{evaluation['patches']} validation patches of scenes never trained on. bpp = bits of the real format-1 "
            "`.codes` files (the Wrapper's `write_compressed`, headers included) / (N x 14,400); RMS % = 100 x RMSE / "
            "10,000 DN over the 10 bands; SSL cosine = cosine of the served SSL model's features of original and "
            "reconstruction.",
            "",
            "| levels | bpp | RMS % | SSL cosine | JPEG 2000 RMS % at that bpp | JPEG-XL RMS % at that bpp |",
            "|---|---|---|---|---|---|",
        ]
        for point in evaluation["rvq"]:
            refs = [point.get(k) for k in ("jpeg2000_rms_percent_at_bpp", "jpegxl_rms_percent_at_bpp")]
            cosine = point.get("ssl_cosine")
            lines.append(f"| {point['levels']} | {point['bpp']:.3f} | {point['rms_percent']:.3f} | "
                         + ("-" if cosine is None else f"{cosine:.4f}") + " | "
                         + " | ".join("-" if r is None else f"{r:.3f}" for r in refs) + " |")
        prior = evaluation.get("learned_prior")
        if prior:
            lines += ["", prior["summary"]]
    return "\n".join(lines)


RVQ_FAMILY = Family(
    "compression-rvq", 7, rvq.ResidualVQCodec, _seeded(rvq.ResidualVQCodec),
    "PyTorch's default Conv2d/ConvTranspose2d initialisation, unit LayerNorms, codebooks N(0, 0.01^2). "
    + _NO_TRAINED_MEANING + " The repository ships trained weights (models/checkpoints/rvq.pt, make "
    "train-compressor CODEC=rvq), which make models exports instead.",
    bundled_checkpoint=RVQ_CHECKPOINT,
    training_notes=_rvq_training_notes,
)

RVQ_COMPRESS = "Bigearth-net-rvq-compress"
RVQ_DECOMPRESS = "Bigearth-net-rvq-decompress"

_RVQ_ARCHITECTURE = (
    "stride-2 3 x 3 convolution 10 -> 128 (dsf 2: 120 x 120 -> 60 x 60), two blocks of three sub-blocks of two "
    "3 x 3 convolutions (128 channels, LayerNorm over channels and ReLU before each, residual skips around every "
    "sub-block and block), a 3 x 3 convolution 128 -> 32"
)

RVQ_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name=RVQ_COMPRESS,
        family=RVQ_FAMILY,
        serve=lambda model: rvq.RVQCompressor(model),
        inputs=(SENTINEL2_INPUT_120,),
        outputs=(CODES,),
        # The nearest-code search holds a [N x 3600, 10000] FP32 distance matrix per level: 8 patches = 1.15 GB.
        max_batch_size=8,
        preferred_batch_sizes=(4, 8),
        max_queue_delay_us=1000,
        card_fields={
            **SENTINEL2_CARD,
            "task": "compress",
            "codec": "residual-vq/1",
            "patch_size": 120,
            "output_units": "codebook index per latent position (60 x 60) and level (8): level l quantises the "
            "residual levels 1..l-1 left",
            "output_range": "[0, 9999]",
            "intended_use": "lossy compression of Sentinel-2 L2A patches (the D3.4 VQ-VAE); decode with "
            f"{RVQ_DECOMPRESS}",
        },
        summary=f"D3.4 2.3 VQ-VAE encoder with residual vector quantisation (models/rvq.py): {_RVQ_ARCHITECTURE}, "
        "then 8 residual levels of 10,000 32-d code vectors (nearest code, level by level).",
        notes="Output codes always hold all 8 levels. The Wrapper keeps the first L levels a workflow asks for and "
        "writes `.codes` format 1 (per-file histograms, services/wrapper/outputs/compressed.py): this card has no "
        "entropy prior.",
        random_inputs=_standard_normal(SENTINEL2_INPUT_120.dims),
    ),
    ModelSpec(
        name=RVQ_DECOMPRESS,
        family=RVQ_FAMILY,
        serve=lambda model: rvq.RVQDecompressor(model),
        inputs=(CODES,),
        outputs=(TensorSpec("output_sentinel2_10_bands_120", "FP32", (10, 120, 120)),),
        max_batch_size=64,
        preferred_batch_sizes=(16, 64),
        max_queue_delay_us=1000,
        card_fields=decompressor_card(
            codec="residual-vq/1",
            input_units=f"codebook index in [0, 9999] per position and level ({RVQ_COMPRESS}'s); -1 = level "
            "not used",
            intended_use=f"reconstruct Sentinel-2 L2A patches from {RVQ_COMPRESS} codes, with 1 to 8 levels",
        ),
        summary="D3.4 2.3 VQ-VAE decoder: the sum of the used levels' code vectors, a 3 x 3 convolution 32 -> 128, "
        "the encoder's core mirrored, a stride-2 4 x 4 transposed convolution 128 -> 10 (60 x 60 -> 120 x 120).",
        notes="**Fewer than 8 levels: code -1 marks an unused level** (any negative code); codes with levels "
        "L+1..8 set to -1 decode the first L levels (D3.4's dynamic number of codebooks: one model for every L). "
        "A code above 9,999 reads as 9,999.\n\n"
        "The output is in the compressor's input space (standardised per band); the card's `bands`, "
        "`band_mean` and `band_std` turn it back into L2A digital numbers.",
        random_inputs=_random_codes,
    ),
)

SPECS = SPECS + RVQ_SPECS

# ---------------------------------------------------------------------------------------------
# Models served from a registry package's ONNX graph, unchanged (no torch module, no export)

# ukis-csmask 1.0.0, ukis_csmask/model_6b_l2a.json: "dataset_statistics" "img" [mean, std] in band_names order
# (blue, green, red, nir, swir16, swir22), reflectance in [0, 1].
CSMASK_L2A_MEAN = (0.26681777834892273, 0.27799084782600403, 0.28811994194984436, 0.36494743824005127,
                   0.2225709855556488, 0.17859040200710297)
CSMASK_L2A_STD = (0.33637598156929016, 0.3125455975532532, 0.311148464679718, 0.27260705828666687,
                  0.16653667390346527, 0.14328984916210175)
CSMASK_TILE = 256
CSMASK_PACKAGE = PackagedOnnx(
    requirement="ukis-csmask==1.0.0",
    member="ukis_csmask/model_6b_l2a.onnx",
    sha256="d11c530978637ca420eedc40791c62bf78997dd39e1201777e2527e4bd94904e",
    licence="Apache-2.0 (ukis-csmask, Copyright (c) 2020 German Aerospace Center (DLR))",
    provenance="German Aerospace Center (DLR), UKIS team: U-Net with an EfficientNet-B4 encoder (ImageNet "
    "initialisation, CE + Lovasz loss), model version 1.0.0-6BL2A, trained on SPARCS, CloudSEN12+ and additional "
    "custom samples compiled as Level-2A (Wieland, Fichtner, Martinis 2022, "
    "doi:10.5194/isprs-archives-XLIII-B3-2022-217-2022; Wieland, Li, Martinis 2019, doi:10.1016/j.rse.2019.05.022). "
    "Source: https://github.com/dlr-eoc/ukis-csmask, PyPI ukis-csmask 1.0.0.",
    companion="ukis_csmask/model_6b_l2a.json",
)

PACKAGED_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="s2-cloud-mask",
        family=None,
        serve=lambda model: model,
        # Tensor names and dims exactly as the package's graph defines them (input [batch_size, 6, 256, 256],
        # output [batch_size, 3, H, W] with symbolic H, W); the batch axis is symbolic, so batching is dynamic.
        inputs=(TensorSpec("input", "FP32", (6, CSMASK_TILE, CSMASK_TILE)),),
        outputs=(TensorSpec("output", "FP32", (3, CSMASK_TILE, CSMASK_TILE)),),
        max_batch_size=8,
        preferred_batch_sizes=(4, 8),
        max_queue_delay_us=2000,
        card_fields={
            "task": "generic",
            "input_kind": "sentinel2-l2a",
            "bands": ["B02", "B03", "B04", "B08", "B11", "B12"],
            "band_mean": list(CSMASK_L2A_MEAN),
            "band_std": list(CSMASK_L2A_STD),
            "normalisation": "standardise",
            "reflectance_scale": 1e-4,
            "reflectance_offset": "product",
            "working_resolution_m": 30.0,
            "resampling": "average",
            "tile_size": CSMASK_TILE,
            "tile_overlap": 0.2,
            "tile_padding": "symmetric",
            "blending": "tukey",
            "output_activation": "softmax",
            "nodata_value": 0.0,
            "nodata_policy": "mask",
            "output_kind": "pixel-classes",
            "class_names": ["clear", "cloud", "shadow"],
            "class_codes": [0, 1, 2],
            "class_colours": ["#2b8c3e", "#f2e600", "#6a00d5"],
            "input_units": "L2A surface reflectance in [0, 1] = (DN + BOA_ADD_OFFSET) / 10000 at 30 m, standardised "
            "per band: (reflectance - band_mean) / band_std",
            "output_units": "logits of clear / cloud / cloud shadow per pixel (softmax over axis 1)",
            "output_range": "unbounded logits",
            "intended_use": "cloud and cloud-shadow mask of Sentinel-2 L2A scenes (blue, green, red, nir, swir16, "
            "swir22 = B02, B03, B04, B08, B11, B12), best at about 30 m resolution",
            "licence": "Apache-2.0",
            "source": "pypi:ukis-csmask==1.0.0 (DLR)",
        },
        summary="Cloud and cloud-shadow segmentation of Sentinel-2 L2A (ukis-csmask 1.0.0, `model_6b_l2a.onnx`, "
        "served unchanged): a U-Net with an EfficientNet-B4 encoder, 6 bands in, per-pixel logits of "
        "clear / cloud / cloud shadow out.",
        notes="Processing, as ukis-csmask's `CSmask` does it (the reference; `tests/generic_kinds` and "
        "`bench/cloud_mask_agreement.py` check the platform against it): bands resampled to ~30 m, reflectance "
        "standardised with the mean/std of the package's `model_6b_l2a.json`, image padded by 51 pixels "
        "(symmetric) and cut into 256 x 256 tiles every 204 pixels (overlap 0.2), softmax per tile, tiles "
        "blended with a tapered cosine (Tukey, alpha 0.4) window, argmax. Class codes as the package defines "
        "them: 0 = clear, 1 = cloud, 2 = cloud shadow; 255 = no data (every band 0). The package's `valid` "
        "mask (invalid pixels buffered by 4) is not part of the served output.",
        random_inputs=_standard_normal((6, CSMASK_TILE, CSMASK_TILE)),
        packaged=CSMASK_PACKAGE,
    ),
)

ALL_SPECS: tuple[ModelSpec, ...] = SPECS + PACKAGED_SPECS
SPECS_BY_NAME: dict[str, ModelSpec] = {spec.name: spec for spec in ALL_SPECS}


def get_spec(name: str) -> ModelSpec:
    try:
        return SPECS_BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(SPECS_BY_NAME)}") from None
