"""Before a bucket is first written: does its S3 endpoint honour conditional create (``If-None-Match: *``)?

Every guarantee of a run folder rests on it (one manifest per delivery, so one announcement; see ``results``).
S3 implementations differ: older MinIO ignored the header (both racers "win"), some answer 501 NotImplemented. So
on the first use of an (endpoint, bucket) pair a process writes a probe object create-only twice: the first write
must succeed and the second be refused (412/409). Anything else is an ``S3ConfigurationError``: permanent, one
dead-letter record and a CRITICAL naming the endpoint, never retried. The probe is deleted (best effort). Verified
pairs are remembered for the life of the process (``ConditionalCreateCheck`` lives in the ``StepRuntime``).
"""

from __future__ import annotations

import logging
import secrets
import threading

from botocore.exceptions import BotoCoreError, ClientError

from services.wrapper.inputs.s3_listing import S3Client
from services.wrapper.results import ObjectExists, ResultWriteError, S3ConfigurationError, create_only, shown_endpoint

log = logging.getLogger(__name__)

PROBE_FOLDER = "_eoml-capability-probes"


class ConditionalCreateCheck:
    """The (endpoint, bucket) pairs this process found honouring conditional create."""

    def __init__(self) -> None:
        self._verified: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def verified(self, client: S3Client, bucket: str) -> bool:
        with self._lock:
            return (client.meta.endpoint_url or "", bucket) in self._verified

    def ensure(self, client: S3Client, bucket: str, result_prefix: str) -> None:
        """Return when the bucket's endpoint honours ``If-None-Match: *``; ``S3ConfigurationError`` when it does not;
        ``ResultWriteError`` (transient or not, as S3 answered) when the probe could not be written at all."""
        pair = (client.meta.endpoint_url or "", bucket)
        if self.verified(client, bucket):
            return
        endpoint = shown_endpoint(client)
        key = f"{result_prefix.strip('/')}/{PROBE_FOLDER}/{secrets.token_hex(8)}"
        try:
            create_only(client, bucket, key, b"conditional-create probe", "the conditional-create probe")
        except ObjectExists:
            # A fresh random key exists only when the client's retry of our own first PUT met it: no verdict yet.
            raise ResultWriteError("the conditional-create probe's first write was retried; checking again later",
                                   transient=True) from None
        try:
            create_only(client, bucket, key, b"conditional-create probe", "the conditional-create probe")
        except ObjectExists:
            honoured = True
        else:
            honoured = False
        finally:
            try:
                client.delete_object(Bucket=bucket, Key=key)
            except (BotoCoreError, ClientError) as error:
                log.warning("capability probe not deleted", extra={"key": key, "error": str(error)})
        if not honoured:
            raise S3ConfigurationError(
                f"S3 endpoint {endpoint} (bucket {bucket!r}) ignores conditional create: a second write of the same "
                "key with If-None-Match: * succeeded. Two runs of one delivery could then both announce; the Wrapper needs "
                "an S3 implementation that refuses a create-only PUT of an existing key (412)"
            )
        with self._lock:
            self._verified.add(pair)
        log.info("S3 endpoint honours conditional create", extra={"endpoint": endpoint, "bucket": bucket})
