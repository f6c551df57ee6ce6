"""``FakeKubernetesApiServer``: a FAKE Kubernetes API server (an aiohttp app on loopback) for tests.

A real API server cannot run here. This fake implements only the REST endpoints the controller and the Kubernetes
step-config store call (ConfigMaps, Secrets, namespaced custom objects), keeps objects in memory, records every
request, and behaves like the real one where the code depends on it: 409 AlreadyExists on a second create, 404
NotFound, 422 on invalid names, custom-object replace needs ``metadata.resourceVersion`` (409 Conflict when stale),
``labelSelector`` equality filters, and an object with ``metadata.finalizers`` stays terminating (a
``deletionTimestamp``) after a DELETE until the test calls ``finalize``. With ``crd_schemas`` it also rejects custom objects that do not validate
(422), like ``fieldValidation=Strict``. It models the admission webhooks' immutable fields (``IMMUTABLE_FIELDS``: a
KafkaSource's ``spec.consumerGroup``): an update that changes one is denied with 400, as Knative's webhook does.

The official ``kubernetes`` client is pointed at it with ``Configuration(host=fake.url)``.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Mapping

from aiohttp import web


def schema_errors(document: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """Every violation of a JSON Schema, as ``path: message`` lines (empty when valid)."""
    from jsonschema import Draft202012Validator

    errors = sorted(Draft202012Validator(schema).iter_errors(document), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_CORE_KINDS = {"configmaps": "ConfigMap", "secrets": "Secret"}
# resource -> spec fields an update must not change (Knative's validating webhook for KafkaSources).
IMMUTABLE_FIELDS: dict[str, tuple[str, ...]] = {"kafkasources": ("consumerGroup",)}


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, str]
    body: Any


@dataclass
class _Store:
    objects: dict[tuple[str, str, str, str], dict[str, Any]] = field(default_factory=dict)


def _status(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}
    return web.json_response(body, status=code)


def _matches(labels: Mapping[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        key, _, value = term.partition("=")
        if labels.get(key) != value.lstrip("="):
            return False
    return True


class FakeKubernetesApiServer:
    """A FAKE API server: start() in a background thread, ``url`` for the client, ``requests`` to assert on."""

    def __init__(self, crd_schemas: Mapping[tuple[str, str], dict[str, Any]] | None = None) -> None:
        self.crd_schemas = dict(crd_schemas or {})
        self.requests: list[RecordedRequest] = []
        self.url = ""
        self._store = _Store()
        self._lock = threading.Lock()
        self._versions = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        # (method, status) or (method, status, path fragment): the next such request answers that status.
        self.fail_next: list[tuple[str, int] | tuple[str, int, str]] = []
        # Called with every request before it is answered: a test models what a controller in the cluster does
        # meanwhile (e.g. Knative deleting a consumer group with its source).
        self.on_request: Callable[[RecordedRequest], None] | None = None

    # -- test helpers ----------------------------------------------------------------------------------------

    def objects(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        """Stored objects of a resource (plural, e.g. ``configmaps``, ``kafkasources``)."""
        with self._lock:
            return [copy.deepcopy(o) for (_, res, ns, _), o in sorted(self._store.objects.items())
                    if res == resource and (namespace is None or ns == namespace)]

    def get_object(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        with self._lock:
            for (_, res, ns, nm), obj in self._store.objects.items():
                if (res, ns, nm) == (resource, namespace, name):
                    return copy.deepcopy(obj)
        return None

    def seed(self, api_prefix: str, resource: str, obj: dict[str, Any]) -> None:
        """Put an object in place as if another component created it (e.g. an InferenceService with a status)."""
        meta = obj["metadata"]
        with self._lock:
            stored = copy.deepcopy(obj)
            stored["metadata"].setdefault("resourceVersion", str(next(self._versions)))
            self._store.objects[(api_prefix, resource, meta["namespace"], meta["name"])] = stored

    def finalize(self, resource: str, namespace: str, name: str) -> None:
        """What the owning controller does when it is done with a terminating object: it goes."""
        with self._lock:
            for key in [k for k in self._store.objects if k[1:] == (resource, namespace, name)]:
                del self._store.objects[key]

    def fail(self, method: str, status: int, times: int = 1, path_contains: str = "") -> None:
        """Answer the next ``times`` ``method`` requests (whose path contains ``path_contains``) with ``status``: a
        409 storm (concurrent writers), 429 (API priority and fairness) or 5xx (an API server restarting)."""
        self.fail_next.extend([(method, status, path_contains)] * times)

    def calls(self, method: str | None = None, contains: str = "") -> list[RecordedRequest]:
        return [r for r in self.requests if (method is None or r.method == method) and contains in r.path]

    # -- server ----------------------------------------------------------------------------------------------

    def start(self) -> "FakeKubernetesApiServer":
        ready = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            port = self._runner.addresses[0][1]
            self.url = f"http://127.0.0.1:{port}"
            ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="fake-kubernetes-api", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake Kubernetes API server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> "FakeKubernetesApiServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- routing ---------------------------------------------------------------------------------------------

    @staticmethod
    def _parse(path: str) -> tuple[str, str, str | None, str | None] | None:
        """-> (api prefix, resource, namespace or None, name or None)."""
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["api", "v1"]:
            prefix, rest = "api/v1", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            prefix, rest = f"apis/{parts[1]}/{parts[2]}", parts[3:]
        else:
            return None
        namespace = None
        if len(rest) >= 2 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 2:
            return None
        return prefix, rest[0], namespace, rest[1] if len(rest) == 2 else None

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw) if raw else None
        recorded = RecordedRequest(request.method, request.path, dict(request.query), body)
        self.requests.append(recorded)
        if self.on_request is not None:
            self.on_request(recorded)
        for index, (method, status, *fragment) in enumerate(self.fail_next):
            if method == request.method and (not fragment or fragment[0] in request.path):
                del self.fail_next[index]
                reason = {409: "Conflict", 429: "TooManyRequests"}.get(status, "InternalError" if status >= 500
                                                                        else "Injected")
                return _status(status, reason, "injected failure")
        parsed = self._parse(request.path)
        if parsed is None:
            return _status(404, "NotFound", f"the server could not find the requested resource {request.path}")
        prefix, resource, namespace, name = parsed
        with self._lock:
            if request.method == "GET" and name is None:
                return self._list(prefix, resource, namespace, request.query.get("labelSelector", ""))
            if namespace is None:
                return _status(405, "MethodNotAllowed", "cluster-scoped writes are not implemented by this fake")
            if request.method == "POST" and name is None:
                return self._create(prefix, resource, namespace, body)
            if name is None:
                return _status(405, "MethodNotAllowed", f"{request.method} on a collection")
            key = (prefix, resource, namespace, name)
            if request.method == "GET":
                obj = self._store.objects.get(key)
                return web.json_response(obj) if obj else _status(404, "NotFound", f'{resource} "{name}" not found')
            if request.method == "PUT":
                return self._replace(key, body)
            if request.method == "DELETE":
                obj = self._store.objects.get(key)
                if obj is None:
                    return _status(404, "NotFound", f'{resource} "{name}" not found')
                if obj["metadata"].get("finalizers"):
                    # Like the real API server: an object with finalizers only gets a deletionTimestamp and stays
                    # (terminating) until its controller removes them (``finalize``).
                    obj["metadata"].setdefault("deletionTimestamp",
                                               datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
                    return web.json_response(obj)
                del self._store.objects[key]
                return web.json_response({"kind": "Status", "apiVersion": "v1", "status": "Success",
                                          "details": {"name": name, "kind": resource}})
        return _status(405, "MethodNotAllowed", request.method)

    def _invalid(self, prefix: str, resource: str, obj: Any) -> web.Response | None:
        if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
            return _status(400, "BadRequest", "body is not an object with metadata")
        name = obj["metadata"].get("name", "")
        limit = 253
        if not name or len(name) > limit or not _NAME.match(name):
            return _status(422, "Invalid", f'metadata.name: Invalid value: "{name}": must be a DNS-1123 subdomain')
        if resource in _CORE_KINDS:
            data = obj.get("data") or {}
            if not all(isinstance(v, str) for v in data.values()):
                return _status(400, "BadRequest", "data values must be strings")
            if not all(re.fullmatch(r"[-._a-zA-Z0-9]+", k) for k in data):
                return _status(422, "Invalid", "data keys must be [-._a-zA-Z0-9]+")
        else:
            schema = self.crd_schemas.get((prefix.removeprefix("apis/"), obj.get("kind", "")))
            if schema is not None:
                errors = schema_errors(obj, schema)
                if errors:
                    return _status(422, "Invalid", "; ".join(errors))
        return None

    def _create(self, prefix: str, resource: str, namespace: str, body: Any) -> web.Response:
        invalid = self._invalid(prefix, resource, body)
        if invalid is not None:
            return invalid
        name = body["metadata"]["name"]
        key = (prefix, resource, namespace, name)
        if key in self._store.objects:
            return _status(409, "AlreadyExists", f'{resource} "{name}" already exists')
        stored = copy.deepcopy(body)
        stored["metadata"].update(namespace=namespace, uid=str(uuid.uuid4()), resourceVersion=str(next(self._versions)),
                                  creationTimestamp=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"))
        self._store.objects[key] = stored
        return web.json_response(stored, status=201)

    def _replace(self, key: tuple[str, str, str, str], body: Any) -> web.Response:
        prefix, resource, namespace, name = key
        current = self._store.objects.get(key)
        if current is None:
            return _status(404, "NotFound", f'{resource} "{name}" not found')
        invalid = self._invalid(prefix, resource, body)
        if invalid is not None:
            return invalid
        given = body["metadata"].get("resourceVersion")
        if resource not in _CORE_KINDS and not given:
            # What the real API server answers for custom resources updated without a resourceVersion.
            return _status(422, "Invalid",
                           "metadata.resourceVersion: Invalid value: 0x0: must be specified for an update")
        if given and given != current["metadata"]["resourceVersion"]:
            return _status(409, "Conflict",
                           "the object has been modified; please apply your changes to the latest version")
        changed = [f"spec.{field}" for field in IMMUTABLE_FIELDS.get(resource, ())
                   if (current.get("spec") or {}).get(field) != (body.get("spec") or {}).get(field)]
        if changed:
            return _status(400, "BadRequest", f'admission webhook "validation.webhook.kafka.eventing.knative.dev" '
                                              f"denied the request: validation failed: Immutable fields changed "
                                              f"(-old +new): {', '.join(changed)}")
        stored = copy.deepcopy(body)
        stored["metadata"].update(namespace=namespace, uid=current["metadata"]["uid"],
                                  resourceVersion=str(next(self._versions)),
                                  creationTimestamp=current["metadata"]["creationTimestamp"])
        if "status" in current and "status" not in stored:
            stored["status"] = current["status"]
        self._store.objects[key] = stored
        return web.json_response(stored)

    def _list(self, prefix: str, resource: str, namespace: str | None, selector: str) -> web.Response:
        items = [copy.deepcopy(obj) for (p, res, ns, _), obj in sorted(self._store.objects.items())
                 if p == prefix and res == resource and (namespace is None or ns == namespace)
                 and _matches(obj["metadata"].get("labels") or {}, selector)]
        kind = _CORE_KINDS.get(resource, resource)
        return web.json_response({"kind": f"{kind}List", "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
                                  "items": items})
