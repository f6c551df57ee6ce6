"""Helpers of the deployment tests (a uniquely named module: every test package has its own conftest)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    # deploy/ holds scripts, not an installed package: import them from the checkout.
    sys.path.insert(0, str(REPO_ROOT))

from deploy.validate import Document, documents_from_text  # noqa: E402


def documents(text: str, source: str = "rendered") -> list[Document]:
    return documents_from_text(text, source)


def find(docs: list[Document], kind: str, *, api_prefix: str = "", namespace: str | None = None) -> list[dict]:
    """Bodies of the documents of one kind (optionally of an apiVersion prefix, in one namespace)."""
    return [
        d.body for d in docs
        if d.kind == kind and str(d.body.get("apiVersion", "")).startswith(api_prefix)
        and (namespace is None or d.body["metadata"].get("namespace") == namespace)
    ]


def env_of(container: dict) -> dict[str, str]:
    return {item["name"]: item.get("value", "") for item in container.get("env", [])}
