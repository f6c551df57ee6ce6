"""A workflow step's stored configuration: written by the ML Controller, read by the Wrapper.

The production controller stored the whole DSL message, credentials included, in a ConfigMap (contracts defect 1).
Here settings and credentials are stored apart: ``StepConfig`` (a ConfigMap on Kubernetes, a JSON file locally) and
``StepCredentials`` (a Secret on Kubernetes, a 0600 file locally). Both are addressed by the step's config name,
which is also the path of the Wrapper URI that the KafkaSource delivers to (``/json-config-<topic>``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, SecretStr

from .contracts import WorkflowMessage
from .redaction import LOG_MASK, Redactor, collect_secrets, without_credential_keys

CONFIG_NAME_PREFIX = "json-config-"
DNS1123_MAX = 63
_DNS1123_INVALID = re.compile(r"[^a-z0-9-]+")


def dns1123_name(value: str, *, prefix: str = "", max_length: int = DNS1123_MAX) -> str:
    """A DNS-1123 label for ``prefix + value``; unique per distinct ``value``.

    Lower-cased, invalid characters replaced by ``-``, and always suffixed with a short hash of the raw value, so
    topics that sanitise alike (``a.b`` / ``a_b`` / ``A-B``) never collide and cut-off names stay distinct.
    """
    digest = hashlib.sha256(value.encode("utf-8")).hexdigest()[:8]
    body = _DNS1123_INVALID.sub("-", (prefix + value).lower()).strip("-")
    body = body[: max_length - len(digest) - 1].rstrip("-")
    return f"{body}-{digest}" if body else digest


def step_config_name(topic_in: str) -> str:
    """The name of a step's stored configuration, ConfigMap and Wrapper URI path: ``json-config-<topic>-<hash>``."""
    return dns1123_name(topic_in, prefix=CONFIG_NAME_PREFIX)


class StepConfig(BaseModel):
    """Everything a Wrapper needs for one workflow step, except the credentials."""

    model_config = ConfigDict(frozen=True)

    config_name: str
    workflow_name: str
    topic_in: str
    topic_out: str
    namespace: str
    service_name: str
    component_name: str = ""
    bucket: str
    region_name: str = "us-east-1"
    endpoint_url: str | None = None
    bootstrap_servers: str = ""
    # The verbatim DSL message minus credentials, for audit and for fields this code does not know yet.
    message: dict = {}


class StepCredentials(BaseModel):
    model_config = ConfigDict(frozen=True)

    aws_access_key_id: SecretStr
    aws_secret_access_key: SecretStr
    # Every other ``S3_bucket`` field of the message (``aws_session_token``, fields a DSL adds): kept with the
    # credentials, never in the stored settings.
    extra: dict[str, SecretStr] = {}

    def model_post_init(self, _context: Any) -> None:
        # Whichever process holds a step's credentials masks them in its log lines from then on.
        LOG_MASK.add(self.secret_values())

    def revealed_extra(self) -> dict[str, str]:
        return {name: value.get_secret_value() for name, value in self.extra.items()}

    def secret_values(self) -> frozenset[str]:
        """Every credential value of the step (the keys, and the leaves of each extra field, JSON ones included),
        for ``services.core.redaction.Redactor``."""
        return (collect_secrets({"credentials": self.revealed_extra()})
                | {self.aws_access_key_id.get_secret_value(), self.aws_secret_access_key.get_secret_value()}
                | frozenset(self.revealed_extra().values()))


# What of ``S3_bucket`` may be stored in the open; everything else is treated as a credential.
PUBLIC_S3_FIELDS = ("s3-bucket-name", "region_name", "endpoint_url")


def without_secret_keys(value: Any) -> Any:
    """A copy of ``value`` without the entries whose key looks like a credential (``*token*``, ``apiKey``, ...)."""
    return without_credential_keys(value)


def step_config_from_message(message: WorkflowMessage, bootstrap_servers: str) -> tuple[StepConfig, StepCredentials]:
    """Split a ``published`` DSL message into the stored settings and the credentials."""
    if message.S3_bucket is None:
        raise ValueError("a published workflow message needs S3_bucket")
    endpoint = message.S3_bucket.endpoint_url
    if endpoint and "@" in urlsplit(endpoint).netloc:
        raise ValueError("S3_bucket.endpoint_url carries credentials (user:password@); refused")
    public = message.model_dump(by_alias=True, mode="json")
    bucket = dict(public.get("S3_bucket") or {})
    public["S3_bucket"] = {name: bucket[name] for name in PUBLIC_S3_FIELDS if name in bucket}
    extra = {name: SecretStr(value if isinstance(value, str) else json.dumps(value))
             for name, value in bucket.items()
             if name not in PUBLIC_S3_FIELDS and name not in ("aws_access_key_id", "aws_secret_access_key")}
    credentials = StepCredentials(
        aws_access_key_id=message.S3_bucket.aws_access_key_id,
        aws_secret_access_key=message.S3_bucket.aws_secret_access_key,
        extra=extra,
    )
    # By key (credential-like keys dropped), then by value: a credential of this message under an innocent key, in
    # JSON held in a string, or in a signed URL never reaches the ConfigMap / config file / status API.
    redactor = Redactor(credentials.secret_values() | collect_secrets(public))
    public = redactor.redact(without_secret_keys(public))
    endpoint_url = redactor.text(endpoint) if endpoint else endpoint
    config = StepConfig(
        config_name=step_config_name(message.Topics.in_),
        workflow_name=message.workflow_name,
        topic_in=message.Topics.in_,
        topic_out=message.Topics.out,
        namespace=message.ML.Namespace,
        service_name=message.ML.ServiceName,
        component_name=message.ML.component_name,
        bucket=message.S3_bucket.bucket_name,
        region_name=message.S3_bucket.region_name,
        endpoint_url=endpoint_url,
        bootstrap_servers=bootstrap_servers,
        message=public,
    )
    return config, credentials


class StepConfigNotFound(KeyError):
    pass


@runtime_checkable
class StepConfigStore(Protocol):
    """Where step configurations live. Implementations: ``LocalStepConfigStore`` (a directory) and the Kubernetes
    store (ConfigMap + Secret per step) in ``services.core.step_config_k8s``."""

    def put(self, namespace: str, config: StepConfig, credentials: StepCredentials) -> None:
        """Create or replace (idempotent: re-publishing updates)."""

    def get(self, namespace: str, config_name: str) -> tuple[StepConfig, StepCredentials]:
        """Raises ``StepConfigNotFound``."""

    def delete(self, namespace: str, config_name: str) -> bool:
        """True when something was deleted; deleting what is absent is not an error."""

    def list(self, namespace: str | None = None) -> list[StepConfig]:
        """Every stored step (of one namespace, or of all)."""


class LocalStepConfigStore:
    """Directory store: ``<root>/<namespace>/<config_name>.json`` and ``.credentials.json`` (mode 0600)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def _paths(self, namespace: str, config_name: str) -> tuple[Path, Path]:
        for part in (namespace, config_name):
            if not part or "/" in part or part.startswith("."):
                raise ValueError(f"invalid store key component {part!r}")
        directory = self.root / namespace
        return directory / f"{config_name}.json", directory / f"{config_name}.credentials.json"

    def put(self, namespace: str, config: StepConfig, credentials: StepCredentials) -> None:
        config_path, secret_path = self._paths(namespace, config.config_name)
        config_path.parent.mkdir(parents=True, exist_ok=True)
        secret = {
            "aws_access_key_id": credentials.aws_access_key_id.get_secret_value(),
            "aws_secret_access_key": credentials.aws_secret_access_key.get_secret_value(),
            "extra": credentials.revealed_extra(),
        }
        # Write-then-rename: a reader never sees a half-written file.
        tmp_secret = secret_path.with_suffix(".tmp")
        fd = os.open(tmp_secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(secret, handle)
        os.replace(tmp_secret, secret_path)
        tmp_config = config_path.with_suffix(".tmp")
        tmp_config.write_text(config.model_dump_json())
        os.replace(tmp_config, config_path)

    def get(self, namespace: str, config_name: str) -> tuple[StepConfig, StepCredentials]:
        config_path, secret_path = self._paths(namespace, config_name)
        try:
            config = StepConfig.model_validate_json(config_path.read_text())
            credentials = StepCredentials.model_validate_json(secret_path.read_text())
        except FileNotFoundError:
            raise StepConfigNotFound(f"no step configuration {config_name!r} in namespace {namespace!r}") from None
        return config, credentials

    def delete(self, namespace: str, config_name: str) -> bool:
        deleted = False
        for path in self._paths(namespace, config_name):
            try:
                path.unlink()
                deleted = True
            except FileNotFoundError:
                pass
        return deleted

    def list(self, namespace: str | None = None) -> list[StepConfig]:
        directories = [self.root / namespace] if namespace else sorted(p for p in self.root.glob("*") if p.is_dir())
        configs = []
        for directory in directories:
            for path in sorted(directory.glob("*.json")):
                if not path.name.endswith(".credentials.json"):
                    configs.append(StepConfig.model_validate_json(path.read_text()))
        return configs
