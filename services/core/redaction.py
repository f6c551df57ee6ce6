"""The one place that decides what a credential is and removes it from anything we store, log or publish.

Redaction by key name alone let values through whose key did not look secret (``accessKeyId``, ``apiKey``,
``passphrase``), JSON held in a string (a structured CloudEvent's ``data``), and signed URLs. So:

1. ``collect_secrets`` gathers every credential VALUE a message carries: the values under credential-like keys at any
   depth, JSON inside strings included (``is_credential_key`` is the one key rule).
2. ``Redactor(secrets).redact(value)`` returns a copy in which credential-like keys are masked, every collected
   value is replaced wherever it appears (in any string, whatever its key), JSON strings are redacted inside and
   re-encoded, and signed query parameters of URLs (``X-Amz-Signature``, ``sig``, ``token``, ...) are masked.
3. ``LOG_MASK`` holds the credential values this process has read (bounded, most recent kept); the log formatters
   (``services.core.logging``) apply it to every line, so a value that reaches a log line through an exception text
   is masked too. It is process configuration, like a log filter, not request state: it only ever removes text.

Values shorter than ``MIN_SECRET_LENGTH`` are masked by key only: replacing them by value would rewrite ordinary
words and numbers everywhere.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable

REDACTED = "***"
MIN_SECRET_LENGTH = 6
LOG_MASK_CAPACITY = 4096

# Key words, compared after lower-casing and dropping ``_``, ``-``, ``.`` and spaces (so ``accessKeyId``,
# ``access_key_id`` and ``Access-Key-Id`` are one key).
_CREDENTIAL_KEY_WORDS = (
    "secret", "password", "passwd", "passphrase", "pwd", "token", "credential", "accesskey", "privatekey", "apikey",
    "authorization", "authheader", "signature", "sessionkey", "clientkey", "sasl", "cookie", "bearer",
    "ssecustomerkey", "encryptionkey", "signingkey", "connectionstring",
)
# Too short to match inside other words (``author``, ``keyboard``): only as the whole key.
_CREDENTIAL_KEYS_EXACT = frozenset({"auth", "authkey", "pass", "pin", "otp"})
_KEY_SEPARATORS = re.compile(r"[_\-.\s]")

# Query parameters that sign or authorise a URL: AWS SigV4/V2 presigned URLs, Azure SAS, GCS signed URLs, tokens.
SIGNED_QUERY_PARAMETERS = (
    "X-Amz-Signature", "X-Amz-Credential", "X-Amz-Security-Token", "AWSAccessKeyId", "Signature", "sig",
    "X-Goog-Signature", "X-Goog-Credential", "GoogleAccessId", "token", "access_token", "id_token", "api_key",
    "apikey", "key", "password", "secret", "auth", "code",
)
_SIGNED_QUERY = re.compile(
    r"(?P<name>[?&;](?:" + "|".join(re.escape(p) for p in SIGNED_QUERY_PARAMETERS) + r")=)(?P<value>[^&#;\s\"'<>]+)",
    re.IGNORECASE)
# ``key: value`` / ``key=value`` / ``"key": "value"`` pairs in free text (an unparseable body, an error message).
_TEXT_PAIR = re.compile(
    r"(?P<key>[\"']?[A-Za-z0-9_.\-]*(?:" + "|".join(("secret", "password", "passwd", "passphrase", "token",
                                                      "credential", r"access[_-]?key", r"private[_-]?key",
                                                      r"api[_-]?key", "authorization", "signature"))
    + r")[A-Za-z0-9_.\-]*[\"']?\s*[:=]\s*)(?P<value>\"(?:[^\"\\]|\\.)*\"|'[^']*'"
    # An HTTP authorization value keeps its scheme word: "Authorization: Bearer <token>" masks the token too.
    r"|(?:(?:Bearer|Basic|Digest|Token|AWS4-HMAC-SHA256|Negotiate)\s+)?[^\s,;&}\]]+)",
    re.IGNORECASE)
# The user-info of a URL (``scheme://user:password@host``): a password in a URL, under any key.
_URL_USERINFO = re.compile(r"(?<=://)(?P<userinfo>[^/@\s\"'<>]+)@")


def is_credential_key(key: object) -> bool:
    """Whether the value under ``key`` is a credential (``aws_secret_access_key``, ``apiKey``, ``passphrase``, ...)."""
    if not isinstance(key, str):
        return False
    folded = _KEY_SEPARATORS.sub("", key.lower())
    return folded in _CREDENTIAL_KEYS_EXACT or any(word in folded for word in _CREDENTIAL_KEY_WORDS)


def _json_container(text: str) -> Any:
    """The object or array a string holds as JSON, else None (cheap check first: most strings are not JSON)."""
    stripped = text.strip()
    if len(stripped) < 2 or stripped[0] not in "{[" or stripped[-1] not in "}]":
        return None
    try:
        value = json.loads(stripped)
    except ValueError:
        return None
    return value if isinstance(value, (dict, list)) else None


def _leaf_strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        inner = _json_container(value)
        if inner is None:
            yield value
        else:
            yield from _leaf_strings(inner)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _leaf_strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaf_strings(item)
    elif hasattr(value, "get_secret_value"):  # pydantic SecretStr
        yield from _leaf_strings(value.get_secret_value())


def collect_secrets(value: Any) -> frozenset[str]:
    """Every credential value in ``value``: whatever sits under a credential-like key (all of its leaves, when it is
    a structure), at any depth, JSON strings and pydantic models included. Short values are left out (see module)."""
    found: set[str] = set()

    def walk(item: Any) -> None:
        if hasattr(item, "model_dump"):  # a pydantic model: its fields by their wire names, SecretStr revealed
            walk({name: getattr(item, name, None) for name in type(item).model_fields}
                 | dict(getattr(item, "model_extra", None) or {}))
        elif isinstance(item, dict):
            for key, child in item.items():
                if is_credential_key(key):
                    found.update(_leaf_strings(child))
                else:
                    walk(child)
        elif isinstance(item, (list, tuple)):
            for child in item:
                walk(child)
        elif isinstance(item, str):
            inner = _json_container(item)
            if inner is not None:
                walk(inner)
            else:
                for match in _TEXT_PAIR.finditer(item):
                    found.add(_pair_value(match.group("value")))
                for match in _URL_USERINFO.finditer(item):
                    found.add(match.group("userinfo"))
    walk(value)
    return frozenset(s for s in found if len(s) >= MIN_SECRET_LENGTH)


def _pair_value(value: str) -> str:
    """The secret of a ``key: value`` pair: unquoted, without an authorization scheme word."""
    stripped = value.strip("\"'")
    return stripped.split(None, 1)[1] if " " in stripped and stripped.split(None, 1)[0].isalpha() else stripped


_PREFIX = 4  # < MIN_SECRET_LENGTH
_ALTERNATION_LIMIT = 64


class _SecretMatcher:
    """Replaces known values in a text. A few: one regular-expression alternation. Many (a process's log mask):
    an index by their first characters, so a line costs one dictionary look-up per character, not one scan per
    secret. Longest first either way, so a secret that contains another is replaced whole."""

    def __init__(self, secrets: Iterable[str]) -> None:
        ordered = sorted({s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}, key=len, reverse=True)
        self.pattern = re.compile("|".join(re.escape(s) for s in ordered)) if 0 < len(ordered) <= _ALTERNATION_LIMIT \
            else None
        self.index: dict[str, list[str]] = {}
        if len(ordered) > _ALTERNATION_LIMIT:
            for secret in ordered:
                self.index.setdefault(secret[:_PREFIX], []).append(secret)

    def replace(self, text: str) -> str:
        if self.pattern is not None:
            return self.pattern.sub(REDACTED, text)
        if not self.index:
            return text
        parts: list[str] = []
        start = position = 0
        while position <= len(text) - MIN_SECRET_LENGTH:
            for secret in self.index.get(text[position:position + _PREFIX], ()):
                if text.startswith(secret, position):
                    parts += [text[start:position], REDACTED]
                    position = start = position + len(secret)
                    break
            else:
                position += 1
        return "".join(parts) + text[start:] if parts else text


def redact_signed_urls(text: str) -> str:
    """``text`` with the values of signing/authorising query parameters masked."""
    return _SIGNED_QUERY.sub(lambda m: m.group("name") + REDACTED, text)


@dataclass(frozen=True)
class Redactor:
    """Removes ``secrets`` (values) and anything under credential-like keys from what it is given."""

    secrets: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "_matcher", _SecretMatcher(self.secrets))

    def text(self, text: str) -> str:
        """One string: secret values, signed URL parameters and ``key=value`` credential pairs masked; JSON inside
        the string redacted as a structure and re-encoded."""
        inner = _json_container(text)
        if inner is not None:
            cleaned = self.redact(inner)
            return text if cleaned == inner else json.dumps(cleaned)
        matcher: _SecretMatcher = getattr(self, "_matcher")
        text = _URL_USERINFO.sub(REDACTED + "@", redact_signed_urls(matcher.replace(text)))
        return _TEXT_PAIR.sub(lambda m: m.group("key") + REDACTED, text)

    def redact(self, value: Any) -> Any:
        """A copy of ``value`` (dicts, lists, strings, scalars) with every credential removed."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {key: (REDACTED if is_credential_key(key) else self.redact(item)) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.redact(item) for item in value]
        return value


def redact(value: Any, secrets: Iterable[str] = ()) -> Any:
    """``value`` with ``secrets`` and every credential it carries itself removed (see ``Redactor``)."""
    return Redactor(frozenset(secrets) | collect_secrets(value)).redact(value)


def without_credential_keys(value: Any) -> Any:
    """A copy of ``value`` without the entries whose key is credential-like (what a stored configuration keeps)."""
    if isinstance(value, dict):
        return {key: without_credential_keys(item) for key, item in value.items() if not is_credential_key(key)}
    if isinstance(value, list):
        return [without_credential_keys(item) for item in value]
    return value


class LogMask:
    """The credential values this process has read, for the log formatters (bounded: the most recent are kept)."""

    def __init__(self, capacity: int = LOG_MASK_CAPACITY) -> None:
        self.capacity = capacity
        self._values: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._redactor = Redactor()

    def add(self, secrets: Iterable[str]) -> None:
        with self._lock:
            changed = False
            for secret in secrets:
                if isinstance(secret, str) and len(secret) >= MIN_SECRET_LENGTH:
                    changed = changed or secret not in self._values
                    self._values[secret] = None
                    self._values.move_to_end(secret)
            while len(self._values) > self.capacity:
                self._values.popitem(last=False)
            if changed:
                self._redactor = Redactor(frozenset(self._values))

    def redactor(self) -> Redactor:
        return self._redactor


LOG_MASK = LogMask()


def remember_for_logs(value: Any) -> frozenset[str]:
    """Collect the credentials ``value`` carries, mask them in this process's logs from now on, and return them."""
    secrets = collect_secrets(value)
    LOG_MASK.add(secrets)
    return secrets
