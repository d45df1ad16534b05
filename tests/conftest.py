"""S3 fixtures: real servers on 127.0.0.1, started once per session (tests/s3servers.py).

``s3_server`` is parametrised over moto and Ceph RGW.  RGW is skipped, loudly,
when radosgw is not installed and cannot be installed; set QUIVER_SKIP_RGW=1 to
skip it on purpose.
"""

from __future__ import annotations

import os
import sys
import uuid
import warnings

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from s3servers import MotoServer, RgwServer, RgwUnavailable  # noqa: E402

BUCKET = "quiver-test"


@pytest.fixture(scope="session")
def _aws_env():
    """Keep the developer's own AWS configuration out of the tests."""
    with pytest.MonkeyPatch.context() as mp:
        for var in list(os.environ):
            if var.startswith("AWS_"):
                mp.delenv(var)
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        yield mp


@pytest.fixture(scope="session")
def moto_server(_aws_env):
    moto = MotoServer()
    moto.server.client().create_bucket(Bucket=BUCKET)
    yield moto.server
    moto.stop()


@pytest.fixture
def creds(moto_server, tmp_path, monkeypatch):
    """AWS profile "q" holding moto's keys (a silent or proxied endpoint never checks them)."""
    path = tmp_path / "credentials"
    path.write_text(f"[q]\naws_access_key_id = {moto_server.access_key}\n"
                    f"aws_secret_access_key = {moto_server.secret_key}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(path))
    return "q"


@pytest.fixture(scope="session")
def rgw_server(_aws_env):
    if os.environ.get("QUIVER_SKIP_RGW"):
        pytest.skip("QUIVER_SKIP_RGW is set: Ceph RGW tests skipped on purpose")
    try:
        rgw = RgwServer()
    except RgwUnavailable as exc:
        msg = f"!!! CEPH RGW NOT TESTED: {exc} !!!"
        warnings.warn(msg)
        pytest.skip(msg)
    rgw.server.client().create_bucket(Bucket=BUCKET)
    yield rgw.server
    rgw.stop()


@pytest.fixture(scope="session", params=["moto", "rgw"])
def s3_server(request):
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture
def s3_profile(s3_server, _aws_env, tmp_path, monkeypatch):
    """A shared-credentials file with the server's keys as profile 'quiver-test'."""
    creds = tmp_path / "credentials"
    creds.write_text(
        "[quiver-test]\n"
        f"aws_access_key_id = {s3_server.access_key}\n"
        f"aws_secret_access_key = {s3_server.secret_key}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    return "quiver-test"


@pytest.fixture
def s3_prefix():
    """A fresh prefix per test, so tests sharing the bucket never see each other."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3_store(s3_server, s3_profile, s3_prefix):
    from quiver.tier.s3 import RetryPolicy, S3ObjectStore

    store = S3ObjectStore(
        BUCKET, s3_prefix, endpoint_url=s3_server.endpoint, profile=s3_profile,
        retry=RetryPolicy(max_tries=3, total_s=10.0),
    )
    yield store
    store.close()
