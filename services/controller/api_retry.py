"""Bounded retries of Kubernetes API calls that failed for a reason that passes: 429 (API priority and fairness,
too many requests), 5xx (an API server or its etcd restarting, a webhook timing out) and connection errors.

Every method call of the wrapped client (``CoreV1Api``, ``CustomObjectsApi``) is retried with exponential backoff
(``backoff_s * 2^(n-1)`` before retry n) up to ``attempts`` times in all, each attempt bounded by
``request_timeout_s``; the last error is raised as it came, so the caller still classifies it with ``is_transient``
(the message is then answered 503 / retried by the consumer, and dead-lettered after the last retry). A 409 is not
retried here: what it means depends on the call (AlreadyExists on a create, a stale ``resourceVersion`` on a
replace), so the driver handles it where it knows which.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ApiRetryPolicy:
    attempts: int = 6
    backoff_s: float = 0.5
    request_timeout_s: float = 10.0

    def backoff(self, retry_number: int) -> float:
        return self.backoff_s * (2 ** (retry_number - 1))

    @property
    def worst_case_s(self) -> float:
        """Longest one call can take: every attempt timing out, plus every backoff."""
        return self.attempts * self.request_timeout_s + sum(self.backoff(n) for n in range(1, self.attempts))


def is_transient(error: BaseException) -> bool:
    """Infrastructure trouble worth a retry: the API server or network (429, 5xx, no answer), not the message."""
    status = getattr(error, "status", None)
    if status is not None:
        return status == 0 or status == 429 or status >= 500
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    try:
        import urllib3

        return isinstance(error, urllib3.exceptions.HTTPError)
    except ImportError:  # pragma: no cover - urllib3 comes with the kubernetes client
        return False


class RetryingApi:
    """Proxy of a Kubernetes API client whose methods retry transient failures (see the module docstring)."""

    def __init__(self, api: Any, policy: ApiRetryPolicy = ApiRetryPolicy(),
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self._api = api
        self._policy = policy
        self._sleep = sleep

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._api, name)
        if not callable(target) or name.startswith("_"):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            kwargs.setdefault("_request_timeout", self._policy.request_timeout_s)
            for attempt in range(1, self._policy.attempts + 1):
                try:
                    return target(*args, **kwargs)
                except Exception as error:
                    if attempt == self._policy.attempts or not is_transient(error):
                        raise
                    wait_s = self._policy.backoff(attempt)
                    log.warning("kubernetes API call failed, retrying", extra={
                        "call": name, "status": getattr(error, "status", None), "attempt": attempt,
                        "of": self._policy.attempts, "retry_in_s": wait_s})
                    self._sleep(wait_s)
            raise AssertionError("unreachable")

        return call
