"""Validate rendered Kubernetes manifests offline: schemas for every document, and the platform's own policies.

    python deploy/validate.py build/manifests/default/ build/manifests/prod.yaml ...

- Custom kinds (KServe, Knative, Strimzi) are checked against the upstream CRDs in ``deploy/crds/``, strictly: a field
  the API server would prune (unknown where the CRD does not preserve unknown fields) is an error.
- Core kinds are checked against the Kubernetes OpenAPI schemas of ``--kube-version`` (PyPI ``kubernetes-validate``,
  strict: unknown fields are errors).
- A kind with no schema is an error, never a silent pass.
- Policies (what the chart promises): every container runs as non-root with a read-only root filesystem, no
  privilege escalation, all capabilities dropped, the RuntimeDefault seccomp profile, and bounded resources (requests
  and limits for cpu and memory); a read-only root filesystem comes with an emptyDir on /tmp; RBAC is namespaced, with
  no wildcards; no two documents name the same object.

What no schema catches (admission webhooks, CEL rules, typos under fields that accept anything) needs a cluster.
Exit status: 0 when every document passes, 1 otherwise (each problem on one line), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import jsonschema
import kubernetes_validate
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from services.core.crd_schema import crd_identity, crd_json_schema_from_document, load_crd  # noqa: E402

DEFAULT_CRD_DIR = REPO_ROOT / "deploy" / "crds"
DEFAULT_KUBE_VERSION = "1.31"


@dataclass(frozen=True)
class Problem:
    source: str
    kind: str
    name: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f" at {self.path}" if self.path else ""
        return f"{self.source}: {self.kind}/{self.name}{where}: {self.message}"


@dataclass(frozen=True)
class Document:
    source: str
    body: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.body.get("kind", "?"))

    @property
    def name(self) -> str:
        metadata = self.body.get("metadata") or {}
        return str(metadata.get("name", "?")) if isinstance(metadata, dict) else "?"


# -- loading -------------------------------------------------------------------------------------------------------


def documents_from_text(text: str, source: str) -> list[Document]:
    """Every non-empty YAML document of a multi-document stream."""
    return [Document(source, body) for body in yaml.safe_load_all(text) if body is not None]


def documents_from_paths(paths: Iterable[Path]) -> list[Document]:
    """Documents of the given files, and of every *.yaml/*.yml under the given directories (sorted)."""
    documents: list[Document] = []
    for path in paths:
        files = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
        for file in files:
            documents.extend(documents_from_text(file.read_text(encoding="utf-8"), str(file)))
    return documents


# -- schemas -------------------------------------------------------------------------------------------------------


class CrdSchemas:
    """JSON Schemas of the custom kinds described by the CRD files of a directory, by (apiVersion, kind)."""

    def __init__(self, crd_dir: Path = DEFAULT_CRD_DIR, strict: bool = True) -> None:
        self.strict = strict
        self._crds: dict[tuple[str, str], dict[str, Any]] = {}
        for file in sorted(crd_dir.glob("*.yaml")):
            crd = load_crd(file)
            group, kind, versions = crd_identity(crd)
            for version in versions:
                self._crds[(f"{group}/{version}", kind)] = crd
        if not self._crds:
            raise ValueError(f"no CustomResourceDefinitions in {crd_dir}")

    def knows(self, api_version: str, kind: str) -> bool:
        return (api_version, kind) in self._crds

    @functools.lru_cache(maxsize=None)
    def validator(self, api_version: str, kind: str) -> jsonschema.Draft202012Validator:
        crd = self._crds[(api_version, kind)]
        schema = crd_json_schema_from_document(crd, api_version.rsplit("/", 1)[-1], strict=self.strict)
        return jsonschema.Draft202012Validator(schema)


def _json_path(parts: Iterable[Any]) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in parts).lstrip(".")


def schema_problems(document: Document, crds: CrdSchemas, kube_version: str = DEFAULT_KUBE_VERSION) -> list[Problem]:
    """Schema errors of one document (custom kinds: CRD; core kinds: Kubernetes OpenAPI)."""
    body, kind, name = document.body, document.kind, document.name

    def problem(path: str, message: str) -> Problem:
        return Problem(document.source, kind, name, path, message)

    if not isinstance(body, dict):
        return [problem("", f"not a mapping but {type(body).__name__}")]
    api_version = body.get("apiVersion")
    if not isinstance(api_version, str) or not isinstance(body.get("kind"), str):
        return [problem("", "apiVersion and kind must be strings")]
    if crds.knows(api_version, kind):
        errors = sorted(crds.validator(api_version, kind).iter_errors(body), key=lambda e: list(e.absolute_path))
        return [problem(_json_path(error.absolute_path), error.message) for error in errors]
    try:
        kubernetes_validate.validate(body, kube_version, strict=True)
    except kubernetes_validate.SchemaNotFoundError:
        return [problem("", f"no schema for {api_version} {kind} (neither a Kubernetes {kube_version} kind nor a "
                            f"CRD in deploy/crds/)")]
    except kubernetes_validate.ValidationError as error:
        return [problem(_json_path(error.absolute_path), error.message)]
    return []


# -- policies ------------------------------------------------------------------------------------------------------

_POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def _pod_specs(body: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], list[tuple[str, dict[str, Any]]]]]:
    """(path, pod-level spec, [(path, container)]) for every pod a workload document describes."""
    kind, api_version = body.get("kind"), str(body.get("apiVersion", ""))
    spec = body.get("spec") or {}
    if api_version.startswith("serving.knative.dev/") and kind in ("Service", "Configuration"):
        pod = ((spec.get("template") or {}).get("spec")) or {}
        yield "spec.template.spec", pod, [
            (f"spec.template.spec.containers[{i}]", c) for i, c in enumerate(pod.get("containers") or [])
        ]
    elif api_version.startswith("serving.kserve.io/") and kind == "InferenceService":
        for component in ("predictor", "transformer", "explainer"):
            pod = spec.get(component)
            if not pod:
                continue
            containers = [(f"spec.{component}.containers[{i}]", c) for i, c in enumerate(pod.get("containers") or [])]
            if pod.get("model"):
                containers.insert(0, (f"spec.{component}.model", pod["model"]))
            yield f"spec.{component}", pod, containers
    elif api_version.startswith("serving.kserve.io/") and kind in ("ServingRuntime", "ClusterServingRuntime"):
        yield "spec", spec, [(f"spec.containers[{i}]", c) for i, c in enumerate(spec.get("containers") or [])]
    elif kind == "Pod":
        yield "spec", spec, [(f"spec.containers[{i}]", c) for i, c in enumerate(spec.get("containers") or [])]
    elif kind in _POD_TEMPLATE_KINDS or kind == "CronJob":
        template = spec.get("template") or {}
        base = "spec.template.spec"
        if kind == "CronJob":
            template = ((spec.get("jobTemplate") or {}).get("spec") or {}).get("template") or {}
            base = "spec.jobTemplate.spec.template.spec"
        pod = template.get("spec") or {}
        yield base, pod, [(f"{base}.containers[{i}]", c) for i, c in enumerate(pod.get("containers") or [])]


def _container_problems(pod: dict[str, Any], container: dict[str, Any], kind: str) -> list[tuple[str, str]]:
    pod_context = pod.get("securityContext") or {}
    context = container.get("securityContext") or {}

    def effective(field: str) -> Any:
        return context.get(field, pod_context.get(field))

    found: list[tuple[str, str]] = []
    if effective("runAsNonRoot") is not True:
        found.append(("securityContext.runAsNonRoot", "must be true"))
    if effective("runAsUser") == 0:
        found.append(("securityContext.runAsUser", "must not be 0 (root)"))
    if context.get("readOnlyRootFilesystem") is not True:
        found.append(("securityContext.readOnlyRootFilesystem", "must be true"))
    if context.get("allowPrivilegeEscalation") is not False:
        found.append(("securityContext.allowPrivilegeEscalation", "must be false"))
    if context.get("privileged") is True:
        found.append(("securityContext.privileged", "must not be true"))
    if "ALL" not in ((context.get("capabilities") or {}).get("drop") or []):
        found.append(("securityContext.capabilities.drop", "must contain ALL"))
    if (context.get("capabilities") or {}).get("add"):
        found.append(("securityContext.capabilities.add", "must be empty"))
    seccomp = (effective("seccompProfile") or {}).get("type")
    if seccomp not in ("RuntimeDefault", "Localhost"):
        found.append(("securityContext.seccompProfile.type", f"must be RuntimeDefault, not {seccomp!r}"))
    resources = container.get("resources") or {}
    for bound in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in (resources.get(bound) or {}):
                found.append((f"resources.{bound}.{resource}", "must be set"))
    # A runtime's container gets its volumes from the InferenceService that uses it: checked there.
    if context.get("readOnlyRootFilesystem") is True and kind not in ("ServingRuntime", "ClusterServingRuntime"):
        empty_dirs = {v.get("name") for v in pod.get("volumes") or [] if "emptyDir" in v}
        mounts = {m.get("mountPath"): m.get("name") for m in container.get("volumeMounts") or []}
        if mounts.get("/tmp") not in empty_dirs:
            found.append(("volumeMounts", "a read-only root filesystem needs an emptyDir mounted on /tmp"))
    return found


def policy_problems(document: Document) -> list[Problem]:
    """Violations of the platform's security and resource policies by one document."""
    body = document.body
    if not isinstance(body, dict):
        return []
    problems: list[Problem] = []

    def problem(path: str, message: str) -> None:
        problems.append(Problem(document.source, document.kind, document.name, path, message))

    for pod_path, pod, containers in _pod_specs(body):
        if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
            problem(pod_path, "must not share the host's network, PID or IPC namespace")
        for volume in pod.get("volumes") or []:
            if "hostPath" in volume:
                problem(f"{pod_path}.volumes", f"hostPath volume {volume.get('name')!r} is not allowed")
        if not containers:
            problem(pod_path, "no containers")
        for container_path, container in containers:
            for field, message in _container_problems(pod, container, document.kind):
                problem(f"{container_path}.{field}", message)

    if body.get("kind") in ("ClusterRole", "ClusterRoleBinding"):
        problem("", "cluster-wide RBAC is not allowed: grant namespaced Roles")
    if body.get("kind") == "Role":
        for index, rule in enumerate(body.get("rules") or []):
            for field in ("apiGroups", "resources", "verbs"):
                if "*" in (rule.get(field) or []):
                    problem(f"rules[{index}].{field}", "wildcards are not allowed")
    return problems


def duplicate_problems(documents: Iterable[Document]) -> list[Problem]:
    """Two documents for the same object (group, kind, namespace, name): the second would overwrite the first."""
    seen: dict[tuple[str, str, str, str], str] = {}
    problems = []
    for document in documents:
        body = document.body
        if not isinstance(body, dict):
            continue
        group = str(body.get("apiVersion", "")).rsplit("/", 1)[0] if "/" in str(body.get("apiVersion", "")) else ""
        namespace = str((body.get("metadata") or {}).get("namespace", ""))
        key = (group, document.kind, namespace, document.name)
        if key in seen:
            problems.append(Problem(document.source, document.kind, document.name, "metadata.name",
                                    f"also defined in {seen[key]} (namespace {namespace or '-'})"))
        else:
            seen[key] = document.source
    return problems


def validate_documents(
    documents: list[Document],
    crds: CrdSchemas | None = None,
    kube_version: str = DEFAULT_KUBE_VERSION,
    policies: bool = True,
) -> list[Problem]:
    """Every problem of a set of documents meant to be applied together."""
    crds = crds or default_crd_schemas()
    problems: list[Problem] = []
    for document in documents:
        problems.extend(schema_problems(document, crds, kube_version))
        if policies:
            problems.extend(policy_problems(document))
    problems.extend(duplicate_problems(documents))
    return problems


@functools.lru_cache(maxsize=None)
def crd_schemas(crd_dir: Path = DEFAULT_CRD_DIR) -> CrdSchemas:
    """The (cached) schemas of a CRD directory: parsing megabytes of CRDs once per process is enough."""
    return CrdSchemas(crd_dir.resolve())


def default_crd_schemas() -> CrdSchemas:
    return crd_schemas(DEFAULT_CRD_DIR)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Validate rendered Kubernetes manifests offline.")
    parser.add_argument("paths", nargs="+", type=Path, help="YAML files or directories of them (validated together)")
    parser.add_argument("--crd-dir", type=Path, default=DEFAULT_CRD_DIR, help="upstream CRDs for custom kinds")
    parser.add_argument("--kube-version", default=DEFAULT_KUBE_VERSION, help="Kubernetes version of the core schemas")
    parser.add_argument("--no-policies", action="store_true", help="check schemas only")
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.paths if not path.exists()]
    if missing:
        parser.exit(2, f"validate: no such file or directory: {', '.join(missing)}\n")
    documents = documents_from_paths(args.paths)
    if not documents:
        parser.exit(2, "validate: no YAML documents found\n")
    problems = validate_documents(documents, crd_schemas(args.crd_dir), args.kube_version, not args.no_policies)
    for problem in problems:
        print(problem)
    kinds = sorted({f"{d.kind}" for d in documents})
    print(f"validate: {len(documents)} documents ({', '.join(kinds)}), {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
