"""Fixtures for the deployment tests: the real helm and kubectl binaries (``make tools``) and rendered manifests."""

from __future__ import annotations

import pytest

import deploy_test_support  # noqa: F401  (puts the checkout on sys.path for deploy.*)
from deploy.render import CI_VALUES, PROD_VALUES, Tools, helm_template


@pytest.fixture(scope="session")
def tools() -> Tools:
    """helm and kubectl from tools/bin; missing binaries fail the tests (``make test`` installs them first)."""
    found = Tools()
    missing = [str(path) for path in (found.helm, found.kubectl) if not path.is_file()]
    if missing:
        pytest.fail(f"missing {', '.join(missing)}: run 'make tools'")
    return found


@pytest.fixture(scope="session")
def default_manifest(tools: Tools) -> str:
    """The chart with its default values (plus the CI placeholder credentials it needs to render)."""
    return helm_template(tools, [CI_VALUES])


@pytest.fixture(scope="session")
def prod_manifest(tools: Tools) -> str:
    return helm_template(tools, [PROD_VALUES])
