"""The local platform's security settings: one shared token for its entry points, and its S3 endpoint policy.

``eo-platform up`` writes a random token to ``<root>/auth-token`` (mode 0600, readable by this user only); every
service of the stack gets ``EOML_AUTH_MODE=token`` with that file, so the controller and the Wrappers refuse POSTs
without it, and the controller's local event plane presents it (``Authorization: Bearer``) as Knative's dispatcher
presents its OIDC token on a cluster. S3 is moto on plain http on loopback: the policy allows exactly that endpoint.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

TOKEN_FILE = "auth-token"


def write_platform_token(root: Path) -> Path:
    path = Path(root) / TOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    # Created 0600 from the start: the token is never readable by others, not even for an instant.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secrets.token_urlsafe(32))
    return path


def security_env(token_file: str | os.PathLike[str], s3_endpoint: str) -> dict[str, str]:
    """Environment of every service of the local stack."""
    port = s3_endpoint.rsplit(":", 1)[-1]
    return {"EOML_AUTH_MODE": "token", "EOML_AUTH_TOKEN_FILE": str(token_file),
            "EOML_S3_POLICY_ALLOW_HTTP": "true", "EOML_S3_POLICY_ALLOW_PRIVATE": "true",
            "EOML_S3_POLICY_ALLOWED_ENDPOINTS": f"{s3_endpoint},http://localhost:{port}"}


def platform_auth_headers(token_file: str | os.PathLike[str]) -> dict[str, str]:
    """What the CLI sends to the stack's entry points."""
    return {"Authorization": f"Bearer {Path(token_file).read_text(encoding='utf-8').strip()}"}

