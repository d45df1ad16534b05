"""The L2 object store over S3 (boto3): any S3-compatible server (AWS, Ceph RGW, moto...).

Same interface and naming as the local directory store (tier.objectstore).
Why each choice (docs/OBJECTSTORE.md has more):

- First writer wins: PUT carries ``If-None-Match: *``; a 412 means the same
  content-addressed object exists already, which is success (``put`` -> False).
- Integrity: each PUT sends ``Content-MD5`` (the server refuses a body damaged
  on the way in) and stores the CRC32C of the object as user metadata
  ``quiver-crc32c``; each GET checks the bytes received against Content-Length
  and that CRC, and retries a short or damaged body.  No S3 server we tested
  verifies ``x-amz-checksum-*``, so botocore's flexible checksums are off.
- Retries are ours, not botocore's (botocore's are disabled): at most
  ``RetryPolicy.max_tries`` tries, all within ``total_s`` or the caller's
  budget (``tier.objectstore.deadline``), whichever ends first; exponential
  backoff with jitter.  Each try's socket timeouts are sized to the time left
  (``try_timeouts``), so no try outlives the deadline; a silent server costs
  at most the budget.  Logging: the first failed try after an answer is
  the outage's one WARNING, every further failure and retry DEBUG, and the
  first answer after it one INFO (the breaker is told not to announce again).
- A circuit breaker (``tier.objectstore.CircuitBreaker``) counts failed tries
  that say the server is not answering (connection errors, timeouts); once
  open, operations are refused at once (``ObjectStoreUnavailableError``) until
  a probe (half-open, after a cool-down) gets an answer.
- Configuration is the standard AWS chain (env vars, AWS_ENDPOINT_URL,
  profiles, config files, instance roles); nothing here reads secrets itself.
  Credentials never appear in reprs, logs or messages: errors are built from
  the error code and object name only and do not chain botocore's exception.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import boto3
import botocore.exceptions as bex
import botocore.session
from botocore.config import Config

from quiver.tier.errors import (
    InvalidRangeError,
    ObjectCorruptError,
    ObjectStoreAuthError,
    ObjectStoreConfigError,
    ObjectStoreRequestError,
    ObjectStoreUnreachableError,
)
from quiver.tier.objectstore import (
    BreakerPolicy,
    CircuitBreaker,
    ObjectStore,
    current_deadline,
)
from quiver.walpub.checksum import crc32c

log = logging.getLogger("quiver.tier.s3")

CRC_META = "quiver-crc32c"
MiB = 1 << 20
T = TypeVar("T")

_RETRY_STATUS = {500, 502, 503, 504, 429}
_RETRY_CODES = {
    "SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError",
    "ServiceUnavailable", "ConditionalRequestConflict", "OperationAborted",
}
_AUTH_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken",
    "ExpiredToken", "TokenRefreshRequired", "InvalidClientTokenId",
}
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds on one operation's tries: count, total time, backoff and socket timeouts."""

    max_tries: int = 5
    total_s: float = 20.0
    base_delay_s: float = 0.05
    max_delay_s: float = 2.0
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_tries < 1 or self.total_s <= 0 or self.base_delay_s < 0:
            raise ObjectStoreConfigError(f"bad retry policy {self}")

    def delay(self, attempt: int) -> float:
        """Backoff before try ``attempt + 1``: exponential, capped, with jitter."""
        return min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)


#: No try starts with less than this left: its timeouts could not be met.
MIN_TRY_S = 0.05
# Socket timeouts shorter than the policy's come from this ladder (0.05 s x 2^k),
# so a handful of clients serve every budget (one botocore client per pair).
_LADDER = tuple(MIN_TRY_S * 2**k for k in range(16))


def _floor_step(x: float) -> float:
    """The largest ladder value <= x (0.0 when x < MIN_TRY_S)."""
    best = 0.0
    for v in _LADDER:
        if v > x:
            break
        best = v
    return best


def try_timeouts(policy: RetryPolicy, remaining_s: float) -> tuple[float, float] | None:
    """(connect, read) socket timeouts of a try that must end within ``remaining_s``.

    The policy's own when they fit; otherwise shrunk (from a fixed ladder) so
    that connect + read <= remaining_s -- a try can never outlive the deadline,
    even against a server that accepts and never answers.  A quarter of the
    time goes to connect (a connection that succeeds is fast), the rest to the
    wait for the answer.  None when too little is left to try at all."""
    c, r = policy.connect_timeout_s, policy.read_timeout_s
    if remaining_s >= c + r:
        return c, r
    connect = min(c, _floor_step(max(remaining_s / 4, MIN_TRY_S)))
    read = min(r, _floor_step(remaining_s - connect))
    if connect <= 0 or read <= 0:
        return None
    return connect, read


class _Damaged(Exception):
    """A body that failed its length or CRC check on one try (retried)."""


@dataclass
class _Fail:
    """How one failed try is classified."""

    kind: str  # "retry", "auth", "nobucket", "request"
    detail: str  # error code or exception class: never a message from the server

    @property
    def silent(self) -> bool:
        """The server did not answer at all (connection error, timeout, cut body):
        what the circuit breaker counts.  A 5xx/429 is an answer."""
        return self.kind == "retry" and not self.detail.startswith("HTTP ")

    @property
    def timed_out(self) -> bool:
        """The try waited out a socket timeout (the expensive kind of failure)."""
        return self.detail in ("ReadTimeoutError", "ConnectTimeoutError")


def _status(exc: bex.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _code(exc: bex.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code") or "")


def _classify(exc: BaseException) -> _Fail | None:
    """Map one try's exception to a decision; None means "not ours, re-raise"."""
    if isinstance(exc, _Damaged):
        return _Fail("damaged", str(exc))
    if isinstance(exc, bex.ClientError):
        status, code = _status(exc), _code(exc)
        # A HEAD answer has no body, so botocore uses the status as the code.
        detail = f"HTTP {status}" if code in ("", str(status)) else f"HTTP {status} {code}"
        if status in _RETRY_STATUS or code in _RETRY_CODES:
            return _Fail("retry", detail)
        if status == 403 or code in _AUTH_CODES:
            return _Fail("auth", detail)
        if code == "NoSuchBucket":
            return _Fail("nobucket", code)
        return _Fail("request", detail)
    if isinstance(exc, (bex.HTTPClientError, bex.ConnectionError, bex.IncompleteReadError)):
        return _Fail("retry", type(exc).__name__)
    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError)):
        return _Fail("auth", type(exc).__name__)
    return None


def _safe_endpoint(url: str | None) -> str | None:
    """The endpoint without any userinfo or query (for reprs and messages)."""
    if not url:
        return None
    p = urlsplit(url)
    host = p.hostname or ""
    if p.port:
        host = f"{host}:{p.port}"
    return f"{p.scheme}://{host}{p.path}"


class S3ObjectStore(ObjectStore):
    """The object store in an S3 bucket under ``prefix``.

    ``endpoint_url``/``profile``/``region`` override the AWS chain's values;
    with none given, boto3 resolves everything (AWS_ENDPOINT_URL, AWS_PROFILE,
    ~/.aws/config ...).  Objects of ``multipart_threshold`` bytes or more are
    uploaded in ``part_size`` parts.  ``create_bucket`` creates a missing
    bucket (tests, first use); otherwise a missing bucket is a config error.
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        profile: str | None = None,
        region: str | None = None,
        retry: RetryPolicy | None = None,
        multipart_threshold: int = 64 * MiB,
        part_size: int = 16 * MiB,
        create_bucket: bool = False,
        max_pool_connections: int = 16,
        breaker: BreakerPolicy | None = None,
        check_bucket: bool = True,
        legacy_names: bool | None = None,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ObjectStoreConfigError(f"bad bucket name {bucket!r}")
        if part_size < 5 * MiB or multipart_threshold < part_size:
            raise ObjectStoreConfigError("part_size must be >= 5 MiB and <= multipart_threshold")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.retry = retry or RetryPolicy()
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.legacy_names = None if legacy_names is None else bool(legacy_names)
        self._create_bucket = create_bucket
        try:
            core = botocore.session.Session(profile=profile)
            scoped = core.get_scoped_config()
        except bex.ProfileNotFound:
            name = profile or os.environ.get("AWS_PROFILE")
            raise ObjectStoreConfigError(f"AWS profile {name!r} not found") from None
        session = boto3.session.Session(botocore_session=core, region_name=region)
        custom_endpoint = bool(
            endpoint_url
            or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or scoped.get("endpoint_url")
        )
        config = Config(
            region_name=session.region_name or "us-east-1",
            connect_timeout=self.retry.connect_timeout_s,
            read_timeout=self.retry.read_timeout_s,
            retries={"total_max_attempts": 1},  # ours, bounded: see _call
            max_pool_connections=max_pool_connections,
            # Path-style for custom endpoints (a local server has no bucket DNS names).
            s3={"addressing_style": "path" if custom_endpoint else "auto"},
            # Neither moto nor RGW 16 verifies x-amz-checksum-* (tested: a wrong
            # one is accepted), so they would cost CPU for nothing; our CRC32C
            # goes in metadata and is checked by us on every GET.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client = session.client("s3", endpoint_url=endpoint_url, config=config)
        self.endpoint = _safe_endpoint(self._client.meta.endpoint_url)
        # Clients with shorter socket timeouts, for tries that must fit a budget
        # (try_timeouts); made on first use, one per (connect, read) pair.
        self._session, self._endpoint_url, self._config = session, endpoint_url, config
        self._sized: dict[tuple[float, float], object] = {}
        self._sized_lock = threading.Lock()
        self._breaker = CircuitBreaker(breaker, name=f"S3 s3://{bucket}/{self.prefix} at {self.endpoint}",
                                       logger=log, announce=False)  # _failing() / _answered() announce
        self._failing_since: float | None = None  # first failed try of the current outage (monotonic)
        self._failed_tries = 0
        self._outage_lock = threading.Lock()
        if check_bucket:
            try:
                self._check_bucket(create_bucket)
            except BaseException:
                self.close()
                raise

    def __repr__(self) -> str:
        return f"S3ObjectStore(bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint={self.endpoint!r})"

    def close(self) -> None:
        if not self._closed:
            self._client.close()
            with self._sized_lock:
                for c in self._sized.values():
                    c.close()
                self._sized.clear()
        super().close()

    def probe(self) -> None:
        """HEAD the bucket (creating it if asked at construction): the breaker's trial."""
        self._check_bucket(self._create_bucket, probe=True)

    def _client_for(self, sizes: tuple[float, float]):
        if sizes == (self.retry.connect_timeout_s, self.retry.read_timeout_s):
            return self._client
        with self._sized_lock:
            self._check_open()
            c = self._sized.get(sizes)
            if c is None:
                c = self._session.client("s3", endpoint_url=self._endpoint_url, config=self._config.merge(
                    Config(connect_timeout=sizes[0], read_timeout=sizes[1])))
                self._sized[sizes] = c
            return c

    # --- the bounded retry loop ---------------------------------------------------
    def _call(self, op: str, name: str, attempt_fn: Callable[[object], T], probe: bool = False) -> T:
        """Run one try at a time until success, a final answer, or the budget is spent.

        ``attempt_fn(client)`` makes one request.  The budget is the policy's
        (max_tries, total_s) and the caller's (``deadline``), whichever ends
        first; each try's timeouts fit what is left.  The circuit breaker
        admits or refuses the operation before its first try; a half-open
        trial makes one try only, and an operation whose try timed out stops
        retrying once the breaker is open.  ``probe`` marks the breaker's trial
        (``CircuitBreaker.caller_trials``)."""
        self._check_open()
        policy = self.retry
        start = time.monotonic()
        deadline = start + policy.total_s
        caller = current_deadline()
        if caller is not None:
            deadline = min(deadline, caller)
        where = f"{op} s3://{self.bucket}/{self.prefix}{name}"
        token = self._breaker.acquire(probe)
        if token is None:
            raise self._breaker.refusal(where) from None
        attempt, fail = 0, None
        try:
            while True:
                sizes = try_timeouts(policy, deadline - time.monotonic())
                if sizes is None:
                    raise self._spent(where, attempt, time.monotonic() - start, fail) from None
                client = self._client_for(sizes)
                attempt += 1
                self.counts.request(op, retry=attempt > 1)
                try:
                    result = attempt_fn(client)
                except Exception as exc:  # noqa: BLE001 - classified below, re-raised if unknown
                    fail = _classify(exc)
                    if fail is None:
                        raise
                else:
                    self._breaker.success()
                    self._answered()
                    return result
                if fail.kind in ("retry", "damaged"):
                    self._failing(where, fail.detail)
                else:
                    self._answered()
                if fail.silent:
                    self._breaker.failure(f"{op}: {fail.detail}")
                    # A trial makes one try; and once the breaker is open, another
                    # timed-out try would only wait out the same silence again.
                    if token == "trial" or (fail.timed_out and self._breaker.state != CircuitBreaker.CLOSED):
                        raise self._spent(where, attempt, time.monotonic() - start, fail) from None
                elif fail.kind != "damaged":
                    self._breaker.success()  # an answer, even if a refusal
                self._settle(where, fail)
                now = time.monotonic()
                pause = policy.delay(attempt)
                if attempt >= policy.max_tries or now + pause >= deadline:
                    raise self._spent(where, attempt, now - start, fail) from None
                log.debug("%s: try %d failed (%s); retrying in %.3fs", where, attempt, fail.detail, pause)
                time.sleep(pause)
        finally:
            if token == "trial":
                self._breaker.end_trial()

    def _failing(self, where: str, detail: str) -> None:
        """A try failed: the first failure after an answer is the outage's one WARNING.

        Not for a closed store: a try that outlived close (a worker close did not
        wait for) says nothing anyone still needs to hear."""
        if self._closed:
            log.debug("%s: a try failed after close (%s)", where, detail)
            return
        with self._outage_lock:
            first = self._failing_since is None
            if first:
                self._failing_since = time.monotonic()
            self._failed_tries += 1
        if first:
            log.warning("S3 at %s is failing (%s: %s); retrying within each operation's budget -- further "
                        "failures are logged at DEBUG until it answers again", self.endpoint, where, detail)

    def _answered(self) -> None:
        """A try got an answer: the end of an outage, if one was announced (one INFO)."""
        if self._failing_since is None:  # the common case: no lock
            return
        with self._outage_lock:
            since, n = self._failing_since, self._failed_tries
            self._failing_since, self._failed_tries = None, 0
        if since is not None:
            log.info("S3 at %s answers again after %d failed tries in %.1fs", self.endpoint, n,
                     time.monotonic() - since)

    @staticmethod
    def _spent(where: str, attempt: int, elapsed: float, fail: _Fail | None) -> Exception:
        """The error of an operation whose tries or time ran out."""
        if fail is not None and fail.kind == "damaged":
            return ObjectCorruptError(f"{where}: {fail.detail}, on all {attempt} tries; not returned")
        if fail is None:
            return ObjectStoreUnreachableError(
                f"{where}: the caller's time budget was spent before a try", attempts=0, elapsed_s=elapsed)
        return ObjectStoreUnreachableError(
            f"{where}: no answer after {attempt} tries in {elapsed:.2f}s (last: {fail.detail})",
            attempts=attempt, elapsed_s=elapsed,
        )

    @staticmethod
    def _settle(where: str, fail: _Fail) -> None:
        """Raise the final error of a failure retrying cannot fix."""
        if fail.kind == "auth":
            raise ObjectStoreAuthError(
                f"{where}: refused ({fail.detail}); check the AWS credentials/profile"
            ) from None
        if fail.kind == "nobucket":
            raise ObjectStoreConfigError(f"{where}: bucket does not exist") from None
        if fail.kind == "request":
            raise ObjectStoreRequestError(f"{where}: {fail.detail}") from None

    # --- objects --------------------------------------------------------------------
    def _get_range_named(self, name: str, start: int, length: int) -> bytes | None:
        if length == 0:
            size = self._head_named(name)
            if size is not None and start > size:
                raise InvalidRangeError(f"start {start} is past the end of {name} ({size} bytes)")
            return None if size is None else b""
        full = self.prefix + name
        end = start + length - 1

        def attempt(c) -> bytes | None:
            try:
                r = c.get_object(Bucket=self.bucket, Key=full, Range=f"bytes={start}-{end}")
            except bex.ClientError as exc:
                if _status(exc) == 404 and _code(exc) != "NoSuchBucket":
                    return None
                if _status(exc) == 416:
                    raise InvalidRangeError(f"range [{start}, {end + 1}) is past the end of {name}") from None
                raise
            body = r["Body"].read()
            m = _CONTENT_RANGE.fullmatch(r.get("ContentRange") or "")
            if m is None:  # the server ignored Range and sent the whole object
                _check_length(body, r)
                if start + length > len(body):
                    raise InvalidRangeError(f"range [{start}, {end + 1}) is past the end of {name}")
                return body[start : start + length]
            first, last, total = int(m[1]), int(m[2]), m[3]
            if total != "*" and start + length > int(total):
                raise InvalidRangeError(
                    f"range [{start}, {end + 1}) is past the end of {name} ({total} bytes)"
                )
            if first != start or last != end or len(body) != length:
                raise _Damaged(f"ranged body {len(body)} bytes ({first}-{last}) for {length} asked")
            return body

        return self._call("get_range", name, attempt)

    def _head_named(self, name: str) -> int | None:
        full = self.prefix + name
        return self._call("head", name, lambda c: self._head_full(c, full))

    # --- primitives -----------------------------------------------------------------
    def _put_named(self, name: str, data: bytes) -> bool:
        if not isinstance(data, bytes):
            data = bytes(data)
        meta = {CRC_META: f"{crc32c(data):08x}"}
        if len(data) >= self.multipart_threshold:
            return self._put_multipart(name, data, meta)
        full = self.prefix + name
        md5 = _md5_b64(data)

        def attempt(c) -> bool:
            try:
                c.put_object(
                    Bucket=self.bucket, Key=full, Body=data, IfNoneMatch="*",
                    ContentMD5=md5, Metadata=meta, ContentType="application/octet-stream",
                )
            except bex.ClientError as exc:
                if _status(exc) == 412:  # published first by someone (maybe our own lost try)
                    return False
                raise
            return True

        return self._call("put", name, attempt)

    def _put_multipart(self, name: str, data: bytes, meta: dict[str, str]) -> bool:
        """Upload in parts; the final Complete carries If-None-Match.

        Ceph RGW 16 ignores If-None-Match on Complete (verified), so we HEAD
        first: a racing second uploader there overwrites the object with the
        same bytes (content-addressed), which is harmless."""
        full = self.prefix + name
        if self._call("head", name, lambda c: self._head_full(c, full)) is not None:
            return False
        upload_id = self._call(
            "create_multipart", name,
            lambda c: c.create_multipart_upload(
                Bucket=self.bucket, Key=full, Metadata=meta, ContentType="application/octet-stream"
            )["UploadId"],
        )
        try:
            parts = []
            view = memoryview(data)
            for number, off in enumerate(range(0, len(data), self.part_size), start=1):
                chunk = bytes(view[off : off + self.part_size])
                md5 = _md5_b64(chunk)

                def upload(c, chunk: bytes = chunk, number: int = number, md5: str = md5) -> str:
                    return c.upload_part(
                        Bucket=self.bucket, Key=full, UploadId=upload_id,
                        PartNumber=number, Body=chunk, ContentMD5=md5,
                    )["ETag"]

                parts.append({"ETag": self._call("upload_part", name, upload), "PartNumber": number})
            tries = 0

            def complete(c) -> bool:
                nonlocal tries
                tries += 1
                try:
                    c.complete_multipart_upload(
                        Bucket=self.bucket, Key=full, UploadId=upload_id,
                        MultipartUpload={"Parts": parts}, IfNoneMatch="*",
                    )
                except bex.ClientError as exc:
                    if _status(exc) == 412:
                        return False
                    # An earlier try completed but its answer was lost: the upload is gone.
                    if _code(exc) == "NoSuchUpload" and tries > 1 and self._head_full(c, full) is not None:
                        return False
                    raise
                return True

            return self._call("complete_multipart", name, complete)
        except BaseException:
            self._abort_quietly(full, upload_id)
            raise

    def _abort_quietly(self, full: str, upload_id: str) -> None:
        """One try to abort a failed upload (parts would otherwise cost storage),
        within the caller's budget; skipped while the breaker refuses calls."""
        caller = current_deadline()
        left = self.retry.total_s if caller is None else caller - time.monotonic()
        sizes = try_timeouts(self.retry, left)
        if sizes is None or self._breaker.state != CircuitBreaker.CLOSED:
            log.debug("abort of a multipart upload under %s skipped (no time left or store down)", full)
            return
        try:
            self._client_for(sizes).abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id)
        except Exception as exc:  # noqa: BLE001 - best effort; the error being raised matters more
            log.warning("abort of a multipart upload under %s failed (%s)", full, type(exc).__name__)

    def _head_full(self, c, full: str) -> int | None:
        try:
            return int(c.head_object(Bucket=self.bucket, Key=full)["ContentLength"])
        except bex.ClientError as exc:
            if _status(exc) == 404:
                return None
            raise

    def _get_named(self, name: str) -> bytes | None:
        full = self.prefix + name

        def attempt(c) -> bytes | None:
            try:
                r = c.get_object(Bucket=self.bucket, Key=full)
            except bex.ClientError as exc:
                if _status(exc) == 404 and _code(exc) != "NoSuchBucket":
                    return None
                raise
            body = r["Body"].read()
            _check_length(body, r)
            want = r.get("Metadata", {}).get(CRC_META)
            if want is not None and f"{crc32c(body):08x}" != want.lower():
                raise _Damaged("body fails its CRC32C")
            return body

        return self._call("get", name, attempt)

    def _list_named(self, prefix: str) -> list[str]:
        names: list[str] = []
        token: str | None = None
        skip = len(self.prefix)
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("list", prefix, lambda c, kw=kwargs: c.list_objects_v2(**kw))
            names.extend(obj["Key"][skip:] for obj in page.get("Contents", ()))
            if not page.get("IsTruncated"):
                return sorted(names)
            token = page["NextContinuationToken"]

    def _any_named(self, prefix: str) -> bool:
        kwargs = {"Bucket": self.bucket, "Prefix": self.prefix + prefix, "MaxKeys": 1}
        page = self._call("list", prefix, lambda c: c.list_objects_v2(**kwargs))
        return bool(page.get("Contents"))

    def _delete_named(self, name: str) -> None:
        full = self.prefix + name
        self._call("delete", name, lambda c: c.delete_object(Bucket=self.bucket, Key=full))

    def _check_bucket(self, create: bool, probe: bool = False) -> None:
        """Fail at open, not at the first put, if the bucket is missing or refused."""

        def attempt(c) -> bool:
            try:
                c.head_bucket(Bucket=self.bucket)
                return True
            except bex.ClientError as exc:
                if _status(exc) == 404:
                    return False
                raise

        if self._call("head_bucket", "", attempt, probe=probe):
            return
        if not create:
            raise ObjectStoreConfigError(f"bucket {self.bucket!r} does not exist at {self.endpoint}")

        def make(c) -> None:
            try:
                c.create_bucket(Bucket=self.bucket)
            except bex.ClientError as exc:
                if _code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        self._call("create_bucket", "", make)


def _check_length(body: bytes, response: dict) -> None:
    """A body shorter (or longer) than its Content-Length is damaged, never data."""
    want = response.get("ContentLength")
    if want is None or len(body) != int(want):
        raise _Damaged(f"body of {len(body)} bytes, Content-Length {want}")


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
