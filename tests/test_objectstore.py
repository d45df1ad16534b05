"""The L2 object store: one conformance suite over the local directory, moto and Ceph RGW,
then what is specific to each (atomic publish, conditional PUT, multipart, auth, processes).

Everything runs against real servers on 127.0.0.1 (tests/s3servers.py); faults
that need a proxy are in test_s3_faults.py.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import time
import traceback

import blake3
import crc32c
import pytest

from conftest import BUCKET
from quiver.tier.errors import (
    InvalidObjectKeyError,
    InvalidRangeError,
    ManifestCorruptError,
    ObjectCorruptError,
    ObjectStoreAuthError,
    ObjectStoreClosedError,
    ObjectStoreConfigError,
    ObjectStoreIOError,
)
from quiver.tier.objectstore import (
    LocalDirObjectStore,
    ObjectStore,
    decode_manifest,
    encode_manifest,
    key_from_name,
    object_name,
    open_object_store,
)
from quiver.tier.s3 import RetryPolicy, S3ObjectStore

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 1 << 20


def key_of(data: bytes) -> bytes:
    """Content-addressed, as the engine's chain keys are: 32 bytes."""
    return blake3.blake3(data).digest()


@pytest.fixture(params=["local", "moto", "rgw"])
def store(request, tmp_path) -> ObjectStore:
    if request.param == "local":
        s = LocalDirObjectStore(tmp_path / "l2")
        yield s
        s.close()
    else:
        yield request.getfixturevalue("s3_store_for")(request.param)  # skips rgw loudly if absent


@pytest.fixture
def s3_store_for(request, _aws_env, tmp_path, monkeypatch):
    """Open an S3ObjectStore on the named server with a fresh prefix (profile credentials)."""
    opened = []

    def make(name: str, **kw) -> S3ObjectStore:
        server = request.getfixturevalue(f"{name}_server")
        creds = tmp_path / f"credentials-{name}"
        creds.write_text(f"[q]\naws_access_key_id = {server.access_key}\n"
                         f"aws_secret_access_key = {server.secret_key}\n")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
        kw.setdefault("retry", RetryPolicy(max_tries=3, total_s=10.0))
        s = S3ObjectStore(BUCKET, f"t-{os.urandom(6).hex()}", endpoint_url=server.endpoint,
                          profile="q", **kw)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


# --- conformance: every implementation -----------------------------------------------------


def test_put_get_head_roundtrip(store):
    data = os.urandom(100_000)
    key = key_of(data)
    assert store.get(key) is None and store.head(key) is None
    assert store.put(key, data) is True
    assert store.get(key) == data
    assert store.head(key) == len(data)
    assert store.put(key, data) is False  # first writer wins; a repeat is a success
    assert store.get(key) == data


def test_empty_object(store):
    key = key_of(b"")
    assert store.put(key, b"") is True
    assert store.get(key) == b""
    assert store.head(key) == 0


def test_first_writer_wins_keeps_the_first_bytes(store):
    key = key_of(b"whatever")
    assert store.put(key, b"first") is True
    assert store.put(key, b"second, different") is False
    assert store.get(key) == b"first"


def test_ranged_get(store):
    data = os.urandom(10_000)
    key = key_of(data)
    store.put(key, data)
    assert store.get_range(key, 0, 10) == data[:10]
    assert store.get_range(key, 1234, 4000) == data[1234:5234]
    assert store.get_range(key, 9_990, 10) == data[-10:]
    assert store.get_range(key, 10_000, 0) == b""
    with pytest.raises(InvalidRangeError):
        store.get_range(key, 9_995, 10)  # past the end: never a short answer
    with pytest.raises(InvalidRangeError):
        store.get_range(key, 10_000, 1)
    with pytest.raises(InvalidRangeError):
        store.get_range(key, -1, 5)
    assert store.get_range(key_of(b"absent"), 0, 10) is None


def test_delete_is_idempotent_and_allows_republish(store):
    key = key_of(b"x")
    store.put(key, b"x")
    store.delete(key)
    assert store.get(key) is None and store.head(key) is None
    store.delete(key)
    assert store.put(key, b"x") is True


def test_list_keys(store):
    keys = {key_of(bytes([i])) for i in range(5)} | {b"\x00", b"\xff" * 64}
    for k in keys:
        store.put(k, k)
    assert set(store.list_keys()) == keys


def test_bad_keys_are_refused(store):
    for bad in (b"", b"x" * 65, "text", 5, None):
        with pytest.raises(InvalidObjectKeyError):
            store.put(bad, b"data")  # type: ignore[arg-type]
        with pytest.raises(InvalidObjectKeyError):
            store.get(bad)  # type: ignore[arg-type]


def test_manifest_bootstrap(store):
    published = [key_of(os.urandom(8)) for _ in range(300)]
    for k in published[:10]:
        store.put(k, k)
    assert store.read_manifests() == set()
    store.write_manifest(published[:100])
    store.write_manifest(published[100:])
    store.write_manifest([])  # writes nothing
    assert store.read_manifests() == set(published)
    # Compaction merges and removes the merged; the union is unchanged.
    assert store.compact_manifests() == 2
    assert store.read_manifests() == set(published)
    assert store.compact_manifests() == 0


def test_closed_store_refuses(store):
    store.close()
    with pytest.raises(ObjectStoreClosedError):
        store.get(key_of(b"k"))
    with pytest.raises(ObjectStoreClosedError):
        store.put(key_of(b"k"), b"k")
    store.close()  # twice is fine


def test_bytes_like_payloads(store):
    data = bytearray(os.urandom(1000))
    key = key_of(bytes(data))
    assert store.put(key, memoryview(data)) is True
    assert store.get(key) == bytes(data)


# --- manifests format ------------------------------------------------------------------------


def test_manifest_format_roundtrip_and_damage():
    keys = [b"a", b"\xff" * 64, bytes(32)]
    blob = encode_manifest(keys)
    assert decode_manifest(blob) == keys
    for cut in (0, 5, len(blob) - 1):
        with pytest.raises(ManifestCorruptError):
            decode_manifest(blob[:cut])
    flipped = bytearray(blob)
    flipped[14] ^= 1
    with pytest.raises(ManifestCorruptError):
        decode_manifest(bytes(flipped))


def test_object_names():
    key = bytes.fromhex("ab" * 32)
    assert object_name(key) == f"blocks/ab/{'ab' * 32}"
    assert key_from_name(object_name(key)) == key
    for junk in ("blocks/ab/zz", "blocks/cd/" + "ab" * 32, "manifests/x.qvm", "blocks/ab"):
        assert key_from_name(junk) is None


# --- local directory specifics -----------------------------------------------------------------


def test_local_layout_and_trailer(tmp_path):
    s = LocalDirObjectStore(tmp_path)
    data = b"payload"
    key = key_of(data)
    s.put(key, data)
    path = tmp_path / object_name(key)
    raw = path.read_bytes()
    assert raw[: len(data)] == data and raw[-4:] == b"QVOT"
    assert int.from_bytes(raw[len(data) : len(data) + 4], "little") == crc32c.crc32c(data)
    assert os.listdir(tmp_path / "tmp") == []  # nothing left in flight


def test_local_corrupt_object_is_an_error_then_a_miss(tmp_path):
    s = LocalDirObjectStore(tmp_path)
    data = os.urandom(4096)
    key = key_of(data)
    s.put(key, data)
    path = tmp_path / object_name(key)
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(ObjectCorruptError):
        s.get(key)
    assert s.get(key) is None  # removed, so the good copy can be published again
    assert s.put(key, data) is True and s.get(key) == data
    # A truncated file is no better than a flipped bit.
    path.write_bytes(path.read_bytes()[:-9])
    with pytest.raises(ObjectCorruptError):
        s.get(key)


def test_local_stale_tmp_is_cleared_on_open(tmp_path):
    LocalDirObjectStore(tmp_path).close()
    old = tmp_path / "tmp" / "dead.tmp"
    fresh = tmp_path / "tmp" / "inflight.tmp"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    LocalDirObjectStore(tmp_path)
    assert sorted(os.listdir(tmp_path / "tmp")) == ["inflight.tmp"]


def test_local_file_system_failure_is_typed_and_publishes_nothing(tmp_path):
    store = LocalDirObjectStore(tmp_path)
    store.put(b"k1", b"one")
    os.rmdir(tmp_path / "tmp")  # removed under the store: every publish now fails in the OS
    with pytest.raises(ObjectStoreIOError, match="publish"):
        store.put(b"k2", b"two")
    assert store.get(b"k2") is None and store.get(b"k1") == b"one"


def test_local_publish_fsyncs_file_and_directory(tmp_path, monkeypatch):
    """The atomic-publish discipline, observed: the tmp file is fsynced before the
    link into place, the directory after it, also when another writer won."""
    calls = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd):
        calls.append(("fsync", os.path.relpath(os.readlink(f"/proc/self/fd/{fd}"), tmp_path)))
        real_fsync(fd)

    def link(src, dst):
        calls.append(("link", os.path.relpath(dst, tmp_path)))
        real_link(src, dst)

    s = LocalDirObjectStore(tmp_path)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    key = key_of(b"k")
    name = object_name(key)
    for expect_created in (True, False):
        calls.clear()
        assert s.put(key, b"k") is expect_created
        link_at = calls.index(("link", name))
        assert calls[link_at - 1][0] == "fsync" and calls[link_at - 1][1].startswith("tmp/")
        assert calls[-1] == ("fsync", os.path.dirname(name))


_RACE_CHILD = textwrap.dedent("""
    import sys, time
    from quiver.tier.objectstore import open_object_store
    spec, key_hex, start_at = sys.argv[1], sys.argv[2], float(sys.argv[4])
    payload = sys.argv[3].encode() * int(sys.argv[5])
    store = open_object_store(spec)
    while time.time() < start_at:
        pass
    created = store.put(bytes.fromhex(key_hex), payload)
    print("CREATED" if created else "EXISTED", flush=True)
    store.close()
""")


def _race(spec: str, key: bytes, payloads: list[str], env: dict | None = None,
          repeat: int = 1) -> list[str]:
    """Start one process per payload (repeated ``repeat`` times), all calling put(key)
    at the same instant."""
    start_at = time.time() + 1.5
    procs = [
        subprocess.Popen([sys.executable, "-c", _RACE_CHILD, spec, key.hex(), p, str(start_at), str(repeat)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                         env=dict(os.environ, **(env or {})))
        for p in payloads
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-2000:]
        outs.append(out.strip())
    return outs


def test_local_open_races_another_opener(tmp_path):
    """Two processes opening one new directory at once: the other one makes a
    subdirectory between this one's check and its mkdir.  (A file system that
    does that on cue: a real race cannot be timed.)"""
    from quiver.walpub.io import OsFileSystem

    class OtherOpenerFirst(OsFileSystem):
        def isdir(self, path: str) -> bool:
            found = super().isdir(path)
            if not found and os.path.basename(path) == "manifests":
                os.mkdir(path)  # the other process, just after our check
            return found

    root = tmp_path / "l2"
    store = LocalDirObjectStore(root, io=OtherOpenerFirst())
    store.put(key_of(b"x"), b"x")
    assert LocalDirObjectStore(root).get(key_of(b"x")) == b"x"


def test_local_first_writer_wins_across_processes(tmp_path):
    key = key_of(b"raced")
    outs = _race(str(tmp_path), key, ["from-A", "from-B"])
    assert sorted(outs) == ["CREATED", "EXISTED"]
    winner = ["from-A", "from-B"][outs.index("CREATED")]
    assert LocalDirObjectStore(tmp_path).get(key) == winner.encode()


# --- opening ---------------------------------------------------------------------------------------


def test_open_object_store_specs(tmp_path):
    assert isinstance(open_object_store(str(tmp_path / "a")), LocalDirObjectStore)
    assert isinstance(open_object_store(tmp_path / "b"), LocalDirObjectStore)
    assert isinstance(open_object_store(None, default_dir=tmp_path / "c"), LocalDirObjectStore)
    for bad in (None, "", "gs://bucket/x"):
        with pytest.raises(ObjectStoreConfigError):
            open_object_store(bad)
    with pytest.raises(ObjectStoreConfigError):
        open_object_store(str(tmp_path / "d"), endpoint_url="http://127.0.0.1:1")


def test_open_s3_spec_with_env_credentials(s3_server, s3_prefix, monkeypatch):
    """The standard chain: AWS_ACCESS_KEY_ID/SECRET + AWS_ENDPOINT_URL, nothing passed in code."""
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    with open_object_store(f"s3://{BUCKET}/{s3_prefix}/") as s:
        assert isinstance(s, S3ObjectStore) and s.prefix == f"{s3_prefix}/"
        assert s.put(key_of(b"env"), b"env") is True
        assert s.get(key_of(b"env")) == b"env"


def test_missing_bucket_is_a_config_error(s3_server, s3_profile):
    with pytest.raises(ObjectStoreConfigError, match="does not exist"):
        S3ObjectStore("no-such-bucket-here", endpoint_url=s3_server.endpoint, profile=s3_profile)
    s = S3ObjectStore(f"created-{os.urandom(4).hex()}", endpoint_url=s3_server.endpoint,
                      profile=s3_profile, create_bucket=True)
    assert s.put(b"k", b"v") is True
    s.close()


# --- S3 specifics ----------------------------------------------------------------------------------


def test_server_answers_412_to_a_second_conditional_put(s3_server, s3_prefix):
    """What the server itself does (the contract our put relies on)."""
    import botocore.exceptions

    c = s3_server.client()
    name = f"{s3_prefix}/raw"
    c.put_object(Bucket=BUCKET, Key=name, Body=b"one", IfNoneMatch="*")
    with pytest.raises(botocore.exceptions.ClientError) as info:
        c.put_object(Bucket=BUCKET, Key=name, Body=b"two", IfNoneMatch="*")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert c.get_object(Bucket=BUCKET, Key=name)["Body"].read() == b"one"


def test_s3_stores_crc32c_metadata(s3_store, s3_server):
    data = os.urandom(5000)
    key = key_of(data)
    s3_store.put(key, data)
    head = s3_server.client().head_object(Bucket=BUCKET, Key=s3_store.prefix + object_name(key))
    assert head["Metadata"]["quiver-crc32c"] == f"{crc32c.crc32c(data):08x}"
    assert head["ContentLength"] == len(data)


def test_s3_object_damaged_at_rest_is_never_returned(s3_store, s3_server):
    """Replace the object behind the store's back (same metadata, other bytes): a real
    server serves it faithfully, and our CRC refuses it on every try."""
    data = os.urandom(5000)
    key = key_of(data)
    s3_store.put(key, data)
    name = s3_store.prefix + object_name(key)
    c = s3_server.client()
    c.put_object(Bucket=BUCKET, Key=name, Body=data[:-1] + bytes([data[-1] ^ 0xFF]),  # always other bytes
                 Metadata={"quiver-crc32c": f"{crc32c.crc32c(data):08x}"})
    with pytest.raises(ObjectCorruptError):
        s3_store.get(key)


def test_multipart_upload(s3_server, s3_store_for):
    s = s3_store_for(s3_server.name, multipart_threshold=5 * MiB, part_size=5 * MiB)
    data = os.urandom(11 * MiB)  # 3 parts: 5 + 5 + 1 MiB
    key = key_of(data)
    assert s.put(key, data) is True
    assert s.get(key) == data
    assert s.head(key) == len(data)
    assert s.get_range(key, 5 * MiB - 10, 20) == data[5 * MiB - 10 : 5 * MiB + 10]
    assert s.put(key, data) is False
    head = s3_server.client().head_object(Bucket=BUCKET, Key=s.prefix + object_name(key))
    assert head["ETag"].strip('"').endswith("-3")  # really a 3-part upload
    assert head["Metadata"]["quiver-crc32c"] == f"{crc32c.crc32c(data):08x}"
    uploads = s3_server.client().list_multipart_uploads(Bucket=BUCKET, Prefix=s.prefix)
    assert not uploads.get("Uploads")  # nothing left half-done


def test_server_conditional_complete_multipart(s3_server, s3_prefix):
    """Record what each server does with If-None-Match on CompleteMultipartUpload.

    moto answers 412; Ceph RGW 16.2 ignores it and overwrites.  That is why
    S3ObjectStore HEADs before a multipart upload (docs/OBJECTSTORE.md)."""
    import botocore.exceptions

    c = s3_server.client()
    name = f"{s3_prefix}/mpu"
    outcomes = []
    for _ in range(2):
        up = c.create_multipart_upload(Bucket=BUCKET, Key=name)["UploadId"]
        etag = c.upload_part(Bucket=BUCKET, Key=name, UploadId=up, PartNumber=1, Body=b"p")["ETag"]
        try:
            c.complete_multipart_upload(Bucket=BUCKET, Key=name, UploadId=up, IfNoneMatch="*",
                                        MultipartUpload={"Parts": [{"ETag": etag, "PartNumber": 1}]})
            outcomes.append(200)
        except botocore.exceptions.ClientError as exc:
            outcomes.append(exc.response["ResponseMetadata"]["HTTPStatusCode"])
            c.abort_multipart_upload(Bucket=BUCKET, Key=name, UploadId=up)
    assert outcomes == {"moto": [200, 412], "rgw": [200, 200]}[s3_server.name]


def test_server_ignores_a_wrong_x_amz_checksum(s3_server, s3_prefix):
    """Why our own CRC32C: neither server verifies S3's flexible checksums."""
    c = s3_server.client()
    c.put_object(Bucket=BUCKET, Key=f"{s3_prefix}/ck", Body=b"hello", ChecksumCRC32C="AAAAAA==")
    assert c.get_object(Bucket=BUCKET, Key=f"{s3_prefix}/ck")["Body"].read() == b"hello"


@pytest.mark.parametrize("wrong", ["secret", "access_key"])
def test_wrong_credentials_are_a_typed_auth_error_without_credentials(
        s3_server, s3_prefix, tmp_path, monkeypatch, caplog, wrong):
    bad_secret = "WRONG" + s3_server.secret_key if wrong == "secret" else s3_server.secret_key
    access_key = s3_server.access_key if wrong == "secret" else "AKIAQUIVERUNKNOWN000"
    creds = tmp_path / "bad-credentials"
    creds.write_text(f"[bad]\naws_access_key_id = {access_key}\n"
                     f"aws_secret_access_key = {bad_secret}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    caplog.set_level(logging.DEBUG)  # every logger, botocore's included
    t0 = time.monotonic()
    with pytest.raises(ObjectStoreAuthError) as info:
        S3ObjectStore(BUCKET, s3_prefix, endpoint_url=s3_server.endpoint, profile="bad",
                      retry=RetryPolicy(max_tries=5, total_s=30.0))
    assert time.monotonic() - t0 < 5.0  # a 403 is not retried
    exc = info.value
    shown = "\n".join([str(exc), repr(exc), *traceback.format_exception(exc)])
    for secret in (bad_secret, s3_server.secret_key, s3_server.access_key, access_key):
        assert secret not in shown
    assert exc.__cause__ is None and exc.__suppress_context__
    assert bad_secret not in caplog.text and s3_server.secret_key not in caplog.text
    expected = "SignatureDoesNotMatch" if wrong == "secret" else "InvalidAccessKeyId"
    assert "403" in str(exc)
    print(f"{s3_server.name}: {exc}")
    # The open failed on HEAD, whose answers carry no error code; a GET shows the code.
    assert _raw_get_error(s3_server, access_key, bad_secret) == f"403 {expected}"


def _raw_get_error(server, access_key: str, secret: str) -> str:
    import boto3
    import botocore.exceptions
    from botocore.config import Config

    c = boto3.client("s3", endpoint_url=server.endpoint, region_name="us-east-1",
                     aws_access_key_id=access_key, aws_secret_access_key=secret,
                     config=Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 1}))
    try:
        c.get_object(Bucket=BUCKET, Key="anything")
    except botocore.exceptions.ClientError as exc:
        return f'{exc.response["ResponseMetadata"]["HTTPStatusCode"]} {exc.response["Error"]["Code"]}'
    return "no error"


def test_server_content_md5_check(s3_server, s3_prefix):
    """Record whether the server checks Content-MD5 (RGW does; moto does not)."""
    import botocore.exceptions

    c = s3_server.client()
    wrong_md5 = "XrY7u+Ae7tCTyyK7j1rNww=="  # MD5 of b"hello world", not of the body
    try:
        c.put_object(Bucket=BUCKET, Key=f"{s3_prefix}/md5", Body=b"other bytes", ContentMD5=wrong_md5)
        outcome = "accepted"
    except botocore.exceptions.ClientError as exc:
        outcome = exc.response["Error"]["Code"]
    assert outcome == {"moto": "accepted", "rgw": "BadDigest"}[s3_server.name]


def test_repr_and_logs_carry_no_credentials(s3_store, s3_server, caplog):
    caplog.set_level(logging.DEBUG, logger="tier")
    s3_store.put(b"k", b"v")
    s3_store.get(b"k")
    text = repr(s3_store) + str(vars(s3_store).get("endpoint")) + caplog.text
    assert s3_server.secret_key not in text and s3_server.access_key not in text


def test_two_processes_publish_the_same_block_at_once(s3_server, s3_prefix):
    unit, repeat = "same-block-", 30_000  # the same ~330 KB from both: content-addressed
    key = key_of(unit.encode() * repeat)
    outs = _race(f"s3://{BUCKET}/{s3_prefix}", key, [unit, unit], env=s3_server.env(),
                 repeat=repeat)
    assert set(outs) <= {"CREATED", "EXISTED"} and "CREATED" in outs
    listed = s3_server.client().list_objects_v2(Bucket=BUCKET, Prefix=s3_prefix)
    assert [o["Key"] for o in listed["Contents"]] == [f"{s3_prefix}/{object_name(key)}"]
    body = s3_server.client().get_object(Bucket=BUCKET, Key=f"{s3_prefix}/{object_name(key)}")
    assert body["Body"].read() == unit.encode() * repeat
    # Report what the server did: exactly one creator when the conditional PUT is atomic.
    print(f"{s3_server.name}: concurrent conditional PUTs -> {sorted(outs)}")


_PUBLISHER = textwrap.dedent("""
    import os, sys, blake3
    from quiver.tier.objectstore import open_object_store
    store = open_object_store(sys.argv[1])
    keys = []
    for i in range(20):
        data = (b"block-%d-" % i) * 1000
        key = blake3.blake3(data).digest()
        assert store.put(key, data)
        keys.append(key)
    store.write_manifest(keys)
    store.close()
    print(",".join(k.hex() for k in keys))
""")


def test_process_b_reads_what_process_a_published(s3_server, s3_prefix, tmp_path, s3_store_for):
    """A publishes and exits; B, a fresh process elsewhere, bootstraps from manifests and
    reads every block byte-exact by key."""
    spec = f"s3://{BUCKET}/{s3_prefix}"
    env = dict(os.environ, **s3_server.env())
    a = subprocess.run([sys.executable, "-c", _PUBLISHER, spec], capture_output=True, text=True,
                       env=env, cwd=REPO, timeout=120)
    assert a.returncode == 0, a.stderr[-2000:]
    published = [bytes.fromhex(h) for h in a.stdout.strip().split(",")]
    reader = textwrap.dedent("""
        import sys, blake3
        from quiver.tier.objectstore import open_object_store
        store = open_object_store(sys.argv[1])
        keys = store.read_manifests()
        for key in sorted(keys):
            data = store.get(key)
            assert blake3.blake3(data).digest() == key
        print(len(keys))
    """)
    b_dir = tmp_path / "process-b"
    b_dir.mkdir()
    b = subprocess.run([sys.executable, "-c", reader, spec], capture_output=True, text=True,
                       env=dict(env, PYTHONPATH=REPO), cwd=b_dir, timeout=120)
    assert b.returncode == 0, b.stderr[-2000:]
    assert int(b.stdout) == len(published) == 20


def test_missing_profile_is_a_config_error(s3_server, _aws_env):
    with pytest.raises(ObjectStoreConfigError, match="profile"):
        S3ObjectStore(BUCKET, endpoint_url=s3_server.endpoint, profile="no-such-profile")


def test_endpoint_from_a_profile(s3_server, _aws_env, tmp_path, monkeypatch, s3_prefix):
    """endpoint_url in ~/.aws/config's profile (botocore >= 1.31), no code option."""
    config = tmp_path / "config"
    config.write_text(f"[profile ep]\nendpoint_url = {s3_server.endpoint}\nregion = us-east-1\n"
                      f"aws_access_key_id = {s3_server.access_key}\n"
                      f"aws_secret_access_key = {s3_server.secret_key}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    with open_object_store(f"s3://{BUCKET}/{s3_prefix}", profile="ep") as s:
        assert s.endpoint == s3_server.endpoint
        assert s.put(b"p", b"q") is True and s.get(b"p") == b"q"


@pytest.mark.slow
def test_latency_1mib(store, capsys):
    """Median PUT/GET of 1 MiB objects through the store (MD5 + CRC32C included).
    Printed, not asserted: a measurement for the report (run with -m slow -s)."""
    n = 30
    blobs = [os.urandom(MiB) for _ in range(n)]
    keys = [key_of(b) for b in blobs]
    puts, gets = [], []
    for k, b in zip(keys, blobs):
        t0 = time.perf_counter()
        assert store.put(k, b)
        puts.append(time.perf_counter() - t0)
    for k, b in zip(keys, blobs):
        t0 = time.perf_counter()
        assert store.get(k) == b
        gets.append(time.perf_counter() - t0)
    puts.sort()
    gets.sort()
    with capsys.disabled():
        print(f"\n{store!r}: 1 MiB x {n}: PUT median {puts[n // 2] * 1e3:.1f} ms "
              f"(p90 {puts[int(n * 0.9)] * 1e3:.1f}), GET median {gets[n // 2] * 1e3:.1f} ms "
              f"(p90 {gets[int(n * 0.9)] * 1e3:.1f})")
