"""The acceptance journal: a delivery the Wrapper answered 202 stays on record in the step's workflow bucket until
its step has ended, so that a Wrapper killed mid-step (SIGKILL, OOM kill, node loss) loses no accepted step.

Why it is needed: the KafkaSource commits a record's offset once the Wrapper answered 2xx, and the Wrapper answers
202 before processing. Between that answer and the end of the step, the journal entry is the only record of it.

An entry is ``<journal prefix>/<config name>/<entry id>.journal`` in the step's bucket (the Wrapper already has the
step's credentials to read its input, and needs no other storage): JSON (``JournalEntry``) holding the CloudEvent
attributes a step needs again (id, source, type, time, subject), the step message as received, the attempt number
and the owner (pod name + an id of the process). Never credentials, nor Kafka headers (they may carry tokens). The
``.journal`` suffix keeps entries out of every task's input listing, even for a step that reads the bucket root.

Life of an entry (``S3`` ``LastModified`` is the lease clock, so Wrappers on different nodes need no shared clock):

- **accept**: written with ``If-None-Match: *`` before the 202. Present already: the event is a duplicate (202, not
  run twice). The write failing: 503, and the source retries.
- **held**: while its step waits or runs, its owner re-writes it every quarter lease with ``If-Match`` on its own
  ETag; a failed condition means another Wrapper took it over, and the owner lets go.
- **ended** (SUCCESS, IGNORED, or CRITICAL with the dead-letter record written): deleted. A failure that could not be
  put on record keeps its entry, so that the step is tried again after the lease.
- **taken over** by a sweep when not renewed for a lease, or when written by an earlier process of the same pod (a
  restarted container: that process is dead): re-written with ``If-Match`` on the ETag just read, so that one
  Wrapper wins when several sweep at once, with attempt + 1 and the new owner.

Stores that refuse conditional writes (501) get plain writes: two Wrappers sweeping the same entry at the same
moment may then both run it (results are deterministic, so only the next-step message repeats).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Literal, Mapping

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.wrapper.inputs import S3Access, make_s3_client
from services.wrapper.inputs.s3_listing import S3Client, s3_failure

log = logging.getLogger(__name__)

JOURNAL_FORMAT = "eoml-wrapper-journal/1"
ENTRY_SUFFIX = ".journal"
ENTRY_CONTENT_TYPE = "application/json"
# The CloudEvent attributes a resumed step needs (id: dead-letter records and logs; time: the outputs' timestamps,
# so that a resumed step writes the same bytes). Extensions and Kafka headers are not kept.
KEPT_ATTRIBUTES = ("id", "source", "type", "time", "subject", "specversion")
# A journal write is a few hundred bytes: a short read timeout keeps a renewal round well inside the lease.
JOURNAL_READ_TIMEOUT_S = 15.0

_CONDITION_FAILED_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"}
_NOT_IMPLEMENTED_CODES = {"NotImplemented"}


class JournalUnavailable(Exception):
    """The workflow bucket refused a journal operation or could not be reached (the reason names no credential)."""


def _unavailable(error: Exception, action: str, client: S3Client, key: str) -> JournalUnavailable:
    return JournalUnavailable(s3_failure(error, action, client, key).reason)


class ConditionFailed(Exception):
    """A conditional write lost: the entry exists already, another Wrapper re-wrote it, or it is gone."""


class JournalOwner(BaseModel):
    model_config = ConfigDict(frozen=True)

    pod: str
    instance: str  # one per process: tells a restarted container apart from the process that wrote an entry

    @classmethod
    def for_this_process(cls, pod: str) -> "JournalOwner":
        return cls(pod=pod, instance=uuid.uuid4().hex[:16])


class JournalEntry(BaseModel):
    """One accepted delivery, as stored."""

    model_config = ConfigDict(frozen=True)

    format: Literal["eoml-wrapper-journal/1"] = JOURNAL_FORMAT
    config_name: str
    entry_id: str
    task: str
    event: dict[str, str]
    message: Any  # the step message as received (parsed JSON)
    accepted_at: datetime
    attempt: int = Field(1, ge=1)
    owner: JournalOwner

    def encode(self) -> bytes:
        return self.model_dump_json().encode("utf-8")

    @classmethod
    def decode(cls, data: bytes) -> "JournalEntry":
        """Raises ``ValueError`` for anything that is not an entry of this format."""
        try:
            return cls.model_validate_json(data)
        except ValidationError as error:
            raise ValueError(f"not a journal entry ({JOURNAL_FORMAT}): {error.error_count()} problem(s)") from None


def entry_id(attributes: Mapping[str, str]) -> str:
    """The entry id of a CloudEvent: a hash of its source, id and time.

    A redelivered record has the same three; a record of a re-created topic that reuses an offset has another time,
    so it is not mistaken for a duplicate. Without an id, a fresh one: no duplicate detection, as without a journal.
    """
    event_id = attributes.get("id", "")
    if not event_id:
        return f"noid-{uuid.uuid4().hex}"
    identity = json.dumps([attributes.get("source", ""), event_id, attributes.get("time", "")])
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:32]


def kept_attributes(attributes: Mapping[str, str]) -> dict[str, str]:
    return {name: attributes[name] for name in KEPT_ATTRIBUTES if attributes.get(name)}


def step_journal_prefix(journal_prefix: str, config_name: str) -> str:
    return f"{journal_prefix.strip('/')}/{config_name}/"


def entry_key(journal_prefix: str, config_name: str, entry: str) -> str:
    return f"{step_journal_prefix(journal_prefix, config_name)}{entry}{ENTRY_SUFFIX}"


@dataclass(frozen=True, slots=True)
class ListedEntry:
    key: str
    entry_id: str
    last_modified: datetime


class HeldEntry:
    """An entry this process owns: renewed until its step ends, then removed (or kept for a retry).

    Renewal and removal of one entry are serialised, so that a renewal can never re-create an entry just removed.
    """

    def __init__(self, journal: "AcceptanceJournal", client: S3Client, bucket: str, key: str, entry: JournalEntry,
                 body: bytes, etag: str) -> None:
        self.journal = journal
        self.client = client
        self.bucket = bucket
        self.key = key
        self.entry = entry
        self._body = body
        self._etag = etag
        self._lock = threading.Lock()
        self.state: Literal["held", "ended", "lost"] = "held"

    def renew(self) -> bool:
        """Re-write the entry (a fresh ``LastModified``); False once it is no longer held by this process."""
        with self._lock:
            if self.state != "held":
                return False
            try:
                self._etag = self.journal.put(self.client, self.bucket, self.key, self._body, if_match=self._etag)
            except ConditionFailed:
                self.state = "lost"
                log.warning("journal entry taken over by another Wrapper", extra={"key": self.key})
                return False
            except JournalUnavailable as error:
                # Kept as held: the next round tries again, and the lease leaves room for a few misses.
                log.warning("journal entry not renewed", extra={"key": self.key, "reason": str(error)})
            return True

    def remove(self) -> None:
        """The step has ended and is on record: the entry goes (unless another Wrapper owns it now)."""
        with self._lock:
            if self.state == "lost":
                return
            self.state = "ended"
            try:
                self.journal.delete(self.client, self.bucket, self.key)
            except JournalUnavailable as error:
                # The step will run again after the lease: outputs are identical, the next-step message repeats.
                log.error("journal entry of an ended step not removed", extra={"key": self.key, "reason": str(error)})

    def keep(self) -> None:
        """Stop renewing but leave the entry: once the lease has passed, a sweep runs the step again."""
        with self._lock:
            if self.state == "held":
                self.state = "ended"


class AcceptanceJournal:
    """Journal operations on one Wrapper's behalf; S3 clients are passed in (one per workflow bucket)."""

    def __init__(self, journal_prefix: str, owner: JournalOwner, lease_s: float) -> None:
        self.prefix = journal_prefix.strip("/")
        self.owner = owner
        self.lease = timedelta(seconds=lease_s)
        self._unconditional_endpoints: set[str] = set()

    # ---- S3 -----------------------------------------------------------------------------------------------------

    def put(self, client: S3Client, bucket: str, key: str, body: bytes, *, if_match: str = "",
            if_none_match: bool = False) -> str:
        """Write ``body`` (conditionally when asked and the store allows it); the new ETag."""
        endpoint = str(client.meta.endpoint_url)
        condition: dict[str, str] = {}
        if endpoint not in self._unconditional_endpoints:
            if if_match:
                condition["IfMatch"] = if_match
            elif if_none_match:
                condition["IfNoneMatch"] = "*"
        try:
            try:
                response = client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=ENTRY_CONTENT_TYPE,
                                             **condition)
            except ClientError as error:
                code = str(error.response.get("Error", {}).get("Code", ""))
                status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if condition and (code in _NOT_IMPLEMENTED_CODES or status == 501):
                    log.warning("the S3 endpoint refuses conditional writes: journal entries are written plainly",
                                extra={"endpoint": endpoint})
                    self._unconditional_endpoints.add(endpoint)
                    response = client.put_object(Bucket=bucket, Key=key, Body=body, ContentType=ENTRY_CONTENT_TYPE)
                elif condition and (code in _CONDITION_FAILED_CODES or status in (409, 412)):
                    raise ConditionFailed(key) from None
                else:
                    raise
        except (BotoCoreError, ClientError) as error:
            raise _unavailable(error, f"writing the journal entry {key}", client, key) from None
        return str(response.get("ETag", ""))

    def delete(self, client: S3Client, bucket: str, key: str) -> None:
        try:
            client.delete_object(Bucket=bucket, Key=key)
        except (BotoCoreError, ClientError) as error:
            raise _unavailable(error, f"removing the journal entry {key}", client, key) from None

    def entries(self, client: S3Client, bucket: str, config_name: str) -> list[ListedEntry]:
        """The entries of one step, oldest first."""
        prefix = step_journal_prefix(self.prefix, config_name)
        listed: list[ListedEntry] = []
        try:
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    name = item["Key"][len(prefix):]
                    if name.endswith(ENTRY_SUFFIX) and "/" not in name:
                        listed.append(ListedEntry(item["Key"], name[: -len(ENTRY_SUFFIX)], item["LastModified"]))
        except (BotoCoreError, ClientError) as error:
            raise _unavailable(error, f"listing the journal {prefix}", client, prefix) from None
        return sorted(listed, key=lambda e: (e.last_modified, e.key))

    def read(self, client: S3Client, bucket: str, key: str) -> tuple[JournalEntry, str] | None:
        """(entry, ETag), or None when it is gone; ``ValueError`` when it is not an entry this code can read."""
        try:
            response = client.get_object(Bucket=bucket, Key=key)
            with response["Body"] as body:
                data = body.read()
        except ClientError as error:
            if str(error.response.get("Error", {}).get("Code", "")) in ("NoSuchKey", "404"):
                return None
            raise _unavailable(error, f"reading the journal entry {key}", client, key) from None
        except BotoCoreError as error:
            raise _unavailable(error, f"reading the journal entry {key}", client, key) from None
        return JournalEntry.decode(data), str(response.get("ETag", ""))

    # ---- entries --------------------------------------------------------------------------------------------------

    def new_entry(self, config_name: str, task: str, attributes: Mapping[str, str], message: Any,
                  entry: str | None = None) -> JournalEntry:
        return JournalEntry(
            config_name=config_name, entry_id=entry or entry_id(attributes), task=task,
            event=kept_attributes(attributes), message=message, accepted_at=datetime.now(timezone.utc),
            owner=self.owner,
        )

    def record(self, client: S3Client, bucket: str, entry: JournalEntry) -> HeldEntry:
        """Write a new entry; ``ConditionFailed`` when it exists already (a duplicate delivery)."""
        key = entry_key(self.prefix, entry.config_name, entry.entry_id)
        body = entry.encode()
        etag = self.put(client, bucket, key, body, if_none_match=True)
        return HeldEntry(self, client, bucket, key, entry, body, etag)

    def is_abandoned(self, entry: JournalEntry, last_modified: datetime, now: datetime | None = None) -> bool:
        """Left by a dead Wrapper: written by an earlier process of this pod, or not renewed for a lease."""
        if entry.owner.pod == self.owner.pod and entry.owner.instance != self.owner.instance:
            return True
        return (now or datetime.now(timezone.utc)) - last_modified > self.lease

    def take_over(self, client: S3Client, bucket: str, key: str, entry: JournalEntry, etag: str) -> HeldEntry:
        """Own an abandoned entry (attempt + 1); ``ConditionFailed`` when another Wrapper changed it first."""
        taken = entry.model_copy(update={"attempt": entry.attempt + 1, "owner": self.owner})
        body = taken.encode()
        new_etag = self.put(client, bucket, key, body, if_match=etag or "*")
        return HeldEntry(self, client, bucket, key, taken, body, new_etag)


class S3ClientCache:
    """boto3 clients per endpoint and credentials, reused across deliveries (clients are thread-safe, and a client
    per delivery would cost CPU and a fresh connection on the hot path)."""

    def __init__(self, size: int = 32) -> None:
        self.size = size
        self._clients: OrderedDict[tuple[Any, ...], S3Client] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, access: S3Access) -> S3Client:
        access = access.model_copy(update={"read_timeout_s": min(access.read_timeout_s, JOURNAL_READ_TIMEOUT_S)})
        # In memory only: the key holds the secret so that rotated credentials get a new client.
        cache_key = (access.endpoint_url, access.region_name, access.aws_access_key_id.get_secret_value(),
                     access.aws_secret_access_key.get_secret_value(), access.max_attempts, access.connect_timeout_s,
                     access.read_timeout_s)
        with self._lock:
            client = self._clients.get(cache_key)
            if client is not None:
                self._clients.move_to_end(cache_key)
                return client
        client = make_s3_client(access)
        with self._lock:
            self._clients[cache_key] = client
            while len(self._clients) > self.size:
                self._clients.popitem(last=False)
        return client


__all__ = [
    "AcceptanceJournal",
    "ConditionFailed",
    "ENTRY_SUFFIX",
    "HeldEntry",
    "JOURNAL_FORMAT",
    "JournalEntry",
    "JournalOwner",
    "JournalUnavailable",
    "ListedEntry",
    "S3ClientCache",
    "entry_id",
    "entry_key",
    "kept_attributes",
    "step_journal_prefix",
]
