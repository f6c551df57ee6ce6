"""Render every deployment variant offline and validate it (``make deploy-dry-run``).

    python deploy/render.py [--out build/manifests] [--helm tools/bin/helm] [--kubectl tools/bin/kubectl]

Variants: the chart with its default values, the chart with ``values-prod.yaml``, and each kustomize overlay under
``deploy/overlays/``. For each: ``helm lint --strict`` (chart variants), the rendered YAML written to
``<out>/<variant>.yaml``, and every document validated (``deploy/validate.py``: upstream CRDs for custom kinds,
Kubernetes schemas for core kinds, the platform's policies). Exit status 1 if anything fails.

The functions are what the tests call; nothing here needs a cluster.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from deploy.validate import DEFAULT_KUBE_VERSION, Problem, documents_from_text, validate_documents  # noqa: E402

CHART_DIR = REPO_ROOT / "charts" / "eo-inference-platform"
OVERLAYS_DIR = REPO_ROOT / "deploy" / "overlays"
# Placeholder S3 credentials: the chart refuses to render without credentials (or an existing Secret).
CI_VALUES = CHART_DIR / "ci" / "placeholder-credentials-values.yaml"
PROD_VALUES = CHART_DIR / "values-prod.yaml"
DEFAULT_HELM = REPO_ROOT / "tools" / "bin" / "helm"
DEFAULT_KUBECTL = REPO_ROOT / "tools" / "bin" / "kubectl"
RELEASE = "eoml"
NAMESPACE = "eoml"
TOOL_TIMEOUT_S = 120


class ToolError(RuntimeError):
    """helm or kubectl failed; the message carries its output."""


@dataclass(frozen=True)
class Tools:
    helm: Path = DEFAULT_HELM
    kubectl: Path = DEFAULT_KUBECTL

    def check(self) -> None:
        for binary in (self.helm, self.kubectl):
            if not binary.is_file():
                raise ToolError(f"{binary} is missing: run 'make tools'")


@dataclass
class VariantResult:
    name: str
    manifest: Path | None = None
    documents: int = 0
    problems: list[Problem] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.errors


def _run(command: Sequence[str | Path]) -> str:
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True,
                            timeout=TOOL_TIMEOUT_S, check=False, cwd=REPO_ROOT)
    if result.returncode != 0:
        shown = " ".join(str(part) for part in command)
        raise ToolError(f"{shown} exited {result.returncode}:\n{(result.stderr or result.stdout).strip()}")
    return result.stdout


def _value_args(values_files: Sequence[Path], set_values: Sequence[str]) -> list[str]:
    args: list[str] = []
    for values_file in values_files:
        args += ["--values", str(values_file)]
    for assignment in set_values:
        args += ["--set", assignment]
    return args


def helm_lint(tools: Tools, values_files: Sequence[Path] = (), set_values: Sequence[str] = (),
              chart: Path = CHART_DIR) -> str:
    """``helm lint --strict``; raises ToolError on any error or warning."""
    return _run([tools.helm, "lint", "--strict", chart, *_value_args(values_files, set_values)])


def helm_template(tools: Tools, values_files: Sequence[Path] = (), set_values: Sequence[str] = (),
                  chart: Path = CHART_DIR, release: str = RELEASE, namespace: str = NAMESPACE,
                  kube_version: str = DEFAULT_KUBE_VERSION) -> str:
    """The chart rendered as one multi-document YAML stream."""
    return _run([tools.helm, "template", release, chart, "--namespace", namespace, "--kube-version", kube_version,
                 *_value_args(values_files, set_values)])


def kustomize_build(tools: Tools, overlay: Path, kube_version: str = DEFAULT_KUBE_VERSION) -> str:
    """``kubectl kustomize`` of an overlay that inflates the chart with helm (offline)."""
    # The chart lives outside the overlay directory, which kustomize only reads with LoadRestrictionsNone.
    return _run([tools.kubectl, "kustomize", "--enable-helm", "--helm-command", tools.helm,
                 "--helm-kube-version", kube_version, "--load-restrictor", "LoadRestrictionsNone", overlay])


def overlays(overlays_dir: Path = OVERLAYS_DIR) -> list[Path]:
    return sorted(path.parent for path in overlays_dir.glob("*/kustomization.yaml"))


def _finish(result: VariantResult, text: str, out_dir: Path | None, kube_version: str) -> VariantResult:
    documents = documents_from_text(text, f"{result.name}.yaml")
    result.documents = len(documents)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        result.manifest = out_dir / f"{result.name}.yaml"
        result.manifest.write_text(text, encoding="utf-8")
    result.problems = validate_documents(documents, kube_version=kube_version)
    return result


def render_chart_variant(tools: Tools, name: str, values_files: Sequence[Path], out_dir: Path | None = None,
                         kube_version: str = DEFAULT_KUBE_VERSION) -> VariantResult:
    result = VariantResult(name)
    try:
        helm_lint(tools, values_files)
        text = helm_template(tools, values_files, kube_version=kube_version)
    except ToolError as error:
        result.errors.append(str(error))
        return result
    return _finish(result, text, out_dir, kube_version)


def render_overlay(tools: Tools, overlay: Path, out_dir: Path | None = None,
                   kube_version: str = DEFAULT_KUBE_VERSION) -> VariantResult:
    result = VariantResult(f"overlay-{overlay.name}")
    try:
        text = kustomize_build(tools, overlay, kube_version)
    except ToolError as error:
        result.errors.append(str(error))
        return result
    return _finish(result, text, out_dir, kube_version)


def render_all(tools: Tools, out_dir: Path | None, kube_version: str = DEFAULT_KUBE_VERSION) -> list[VariantResult]:
    """Every variant: chart defaults, chart prod values, each overlay."""
    tools.check()
    results = [
        render_chart_variant(tools, "default", [CI_VALUES], out_dir, kube_version),
        render_chart_variant(tools, "prod", [PROD_VALUES], out_dir, kube_version),
    ]
    results += [render_overlay(tools, overlay, out_dir, kube_version) for overlay in overlays()]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Render and validate every deployment variant offline.")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "build" / "manifests")
    parser.add_argument("--helm", type=Path, default=DEFAULT_HELM)
    parser.add_argument("--kubectl", type=Path, default=DEFAULT_KUBECTL)
    parser.add_argument("--kube-version", default=DEFAULT_KUBE_VERSION)
    args = parser.parse_args(argv)
    try:
        results = render_all(Tools(args.helm, args.kubectl), args.out, args.kube_version)
    except ToolError as error:
        print(f"render: {error}", file=sys.stderr)
        return 1
    for result in results:
        for error in result.errors:
            print(f"{result.name}: {error}")
        for problem in result.problems:
            print(problem)
        status = "ok" if result.ok else "FAILED"
        where = f" -> {result.manifest}" if result.manifest else ""
        print(f"{result.name}: {result.documents} documents, {len(result.problems)} problems, {status}{where}")
    return 0 if all(result.ok for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
