"""Issue 12 (operable): BlockStore.open's options from QUIVER_* variables and a TOML file.

Precedence is keyword > environment > file > default; every value goes through
the same validation as a keyword, so a bad one is a StoreConfigError naming its
source, and a refused open creates nothing.  Stores are real (opened on disk).
"""

from __future__ import annotations

import os

import pytest

from quiver.engine import config
from quiver.engine.errors import StoreConfigError
from quiver.engine.store import BlockStore
from store_child import make_case

MiB = 1 << 20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No option variable (or config file) from the developer's shell leaks in."""
    for var in list(os.environ):
        if var == config.CONFIG_ENV or var in {o.env for o in config.OPTIONS.values()}:
            monkeypatch.delenv(var)


def roundtrip(store) -> None:
    ident, tokens, blocks = make_case(5, 2)
    assert store.put(ident, tokens, blocks) == 2
    assert store.get(ident, tokens, 2).tobytes() == blocks.tobytes()


def test_environment_sets_options(tmp_path, monkeypatch):
    monkeypatch.setenv("QUIVER_RAM_BYTES", "64MiB")
    monkeypatch.setenv("QUIVER_CODEC", "lz4")
    monkeypatch.setenv("QUIVER_INDEX", "flat")
    monkeypatch.setenv("QUIVER_DISK_BYTES", "1 GiB")
    monkeypatch.setenv("QUIVER_L2_ENQUEUE_TIMEOUT_S", "0.5")
    monkeypatch.setenv("QUIVER_BOOTSTRAP", "off")
    monkeypatch.setenv("QUIVER_OBJECT_STORE", str(tmp_path / "l2"))
    with BlockStore.open(tmp_path / "s") as store:
        roundtrip(store)
        cfg = store.stats()["config"]
        assert store.codec == "lz4" and store.index == "flat"
        assert store.stats()["tiers"]["l1"]["capacity_bytes"] == 1 << 30
    assert cfg["ram_bytes"] == 64 * MiB and cfg["disk_bytes"] == 1 << 30
    assert cfg["l2_enqueue_timeout_s"] == 0.5 and cfg["bootstrap"] is False
    assert cfg["object_store"] == str(tmp_path / "l2") and (tmp_path / "l2" / "blocks").is_dir()
    assert cfg["sources"]["ram_bytes"] == "env QUIVER_RAM_BYTES"
    assert cfg["sources"]["path"] == "keyword" and cfg["sources"]["manifest_batch"] == "default"


def test_toml_file_sets_options_including_the_path(tmp_path, monkeypatch):
    path = tmp_path / "quiver.toml"
    path.write_text(f'path = "{tmp_path / "s"}"\nindex = "flat"\ncodec = "zstd"\nram_bytes = "8MiB"\n'
                    f"disk_bytes = {256 * MiB}\nl2_queue_max = 8\nl2_retry_interval_s = 1\n")
    with BlockStore.open(config=path) as store:  # no path argument: the file names it
        roundtrip(store)
        cfg = store.stats()["config"]
    assert cfg["path"] == str(tmp_path / "s") and cfg["codec"] == "zstd" and cfg["ram_bytes"] == 8 * MiB
    assert cfg["disk_bytes"] == 256 * MiB and cfg["l2_queue_max"] == 8 and cfg["l2_retry_interval_s"] == 1.0
    assert cfg["sources"]["codec"] == f"file {path}"
    monkeypatch.setenv("QUIVER_CONFIG", str(path))  # the same file through the environment
    with BlockStore.open() as store:
        assert store.codec == "zstd" and store.path == str(tmp_path / "s")


def test_keyword_beats_environment_beats_file(tmp_path, monkeypatch):
    path = tmp_path / "quiver.toml"
    path.write_text('codec = "zstd"\nindex = "flat"\nram_bytes = 0\n')
    monkeypatch.setenv("QUIVER_CONFIG", str(path))
    with BlockStore.open(tmp_path / "a") as store:
        assert store.codec == "zstd"
    monkeypatch.setenv("QUIVER_CODEC", "lz4")
    with BlockStore.open(tmp_path / "b") as store:
        assert store.codec == "lz4"
        src = store.stats()["config"]["sources"]
        assert src["codec"] == "env QUIVER_CODEC" and src["index"] == f"file {path}"
    with BlockStore.open(tmp_path / "c", codec="none") as store:  # an explicit default still wins
        assert store.codec == "none" and store.stats()["config"]["sources"]["codec"] == "keyword"
    other = tmp_path / "other.toml"
    other.write_text('codec = "lz4"\n')
    monkeypatch.delenv("QUIVER_CODEC")
    with BlockStore.open(tmp_path / "d", config=other) as store:  # config= beats QUIVER_CONFIG
        assert store.codec == "lz4"  # and nothing from the QUIVER_CONFIG file
        assert store.stats()["config"]["sources"]["index"] == "default"


@pytest.mark.parametrize("var, value, match", [
    ("QUIVER_RAM_BYTES", "lots", "QUIVER_RAM_BYTES must be a whole number of bytes"),
    ("QUIVER_RAM_BYTES", "-1", "QUIVER_RAM_BYTES"),
    ("QUIVER_RAM_BYTES", "1.5GiB", "QUIVER_RAM_BYTES"),
    ("QUIVER_L2_QUEUE_MAX", "0", r"l2_queue_max must be an int >= 1, got 0 \(from env QUIVER_L2_QUEUE_MAX\)"),
    ("QUIVER_L2_QUEUE_MAX", "many", "QUIVER_L2_QUEUE_MAX must be an int"),
    ("QUIVER_L2_RETRY_INTERVAL_S", "inf", r"l2_retry_interval_s must be .*\(from env QUIVER_L2_RETRY_INTERVAL_S\)"),
    ("QUIVER_L2_ENQUEUE_TIMEOUT_S", "soon", "QUIVER_L2_ENQUEUE_TIMEOUT_S must be a number of seconds"),
    ("QUIVER_BOOTSTRAP", "maybe", "QUIVER_BOOTSTRAP must be a bool"),
    ("QUIVER_CODEC", "lz5", r"codec must be one of .*\(from env QUIVER_CODEC\)"),
    ("QUIVER_L2_MODE", "async", r"l2_mode must be .*\(from env QUIVER_L2_MODE\)"),
    ("QUIVER_METRICS_PORT", "http", "QUIVER_METRICS_PORT must be an int"),
    ("QUIVER_METRICS_PORT", "99999", r"metrics_port must be .*\(from env QUIVER_METRICS_PORT\)"),
    ("QUIVER_S3_OPTIONS", "{not json", "QUIVER_S3_OPTIONS must be a JSON object"),
    ("QUIVER_S3_OPTIONS", '{"endpoint_url": "http://127.0.0.1:1"}', "without an s3:// object_store"),
    ("QUIVER_NAIVE", "1", "keyword argument"),
    ("QUIVER_GUARD", "0", "keyword argument"),
])
def test_bad_environment_values_are_typed_errors_and_create_nothing(tmp_path, monkeypatch, var, value, match):
    monkeypatch.setenv(var, value)
    with pytest.raises(StoreConfigError, match=match):
        BlockStore.open(tmp_path / "s")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("text, match", [
    ('codec = "lz4"\nram_byte = 5\n', r"unknown option\(s\) \['ram_byte'\]"),
    ('codec = "lz4\n', "not valid TOML"),
    ('ram_bytes = "lots"\n', "ram_bytes in file .* must be a whole number"),
    ("ram_bytes = true\n", r"ram_bytes must be an int >= 0, got True \(from file "),
    ("l2_enqueue_timeout_s = -1.0\n", r"l2_enqueue_timeout_s must be .*\(from file "),
    ("naive = true\n", r"\['naive'\] can only be given as keyword"),
    ("config = 'other.toml'\n", r"unknown option\(s\) \['config'\]"),
    ('[s3_options]\nendpoint_url = "http://127.0.0.1:1"\n', "without an s3:// object_store"),
])
def test_bad_files_are_typed_errors_and_create_nothing(tmp_path, text, match):
    path = tmp_path / "quiver.toml"
    path.write_text(text)
    with pytest.raises(StoreConfigError, match=match):
        BlockStore.open(tmp_path / "s", config=path)
    assert not (tmp_path / "s").exists()


def test_missing_config_file_and_missing_path_are_typed(tmp_path, monkeypatch):
    with pytest.raises(StoreConfigError, match="config file .*nope.toml"):
        BlockStore.open(tmp_path / "s", config=tmp_path / "nope.toml")
    monkeypatch.setenv("QUIVER_CONFIG", str(tmp_path / "nope.toml"))
    with pytest.raises(StoreConfigError, match="config file"):
        BlockStore.open(tmp_path / "s")
    monkeypatch.delenv("QUIVER_CONFIG")
    with pytest.raises(StoreConfigError, match="path is required"):
        BlockStore.open()
    assert not (tmp_path / "s").exists()


def test_other_quiver_variables_are_ignored(tmp_path, monkeypatch):
    """Tests, studies and the vLLM connector have QUIVER_* variables of their own;
    a misspelt option name is ignored too (docs/CONFIG.md says so)."""
    for var in ("QUIVER_SMOKE", "QUIVER_FULL", "QUIVER_RUN_COMMAND", "QUIVER_WALPUB_CRASHPOINT",
                "QUIVER_VLLM_PYTHON", "QUIVER_STORE_PATH", "QUIVER_TENANT", "QUIVER_RAMBYTES"):
        monkeypatch.setenv(var, "surely not a valid value: %%")
    with BlockStore.open(tmp_path / "s", index="flat") as store:
        roundtrip(store)
        src = store.stats()["config"]["sources"]
    assert set(src.values()) == {"keyword", "default"}


def test_s3_policies_from_a_file_or_json_become_their_objects(tmp_path, monkeypatch):
    from quiver.tier.objectstore import BreakerPolicy
    from quiver.tier.s3 import RetryPolicy

    path = tmp_path / "quiver.toml"
    path.write_text('object_store = "s3://bucket/p"\n[s3_options]\nendpoint_url = "http://127.0.0.1:9"\n'
                    "[s3_options.retry]\nmax_tries = 2\ntotal_s = 3.0\n[s3_options.breaker]\nfailures = 7\n")
    values, sources = config.resolve({}, config=path, environ={})
    opts = values["s3_options"]
    assert opts["retry"] == RetryPolicy(max_tries=2, total_s=3.0) and opts["breaker"] == BreakerPolicy(failures=7)
    assert sources["s3_options"] == sources["object_store"] == f"file {path}"
    values, sources = config.resolve({}, environ={"QUIVER_S3_OPTIONS": '{"retry": {"max_tries": 3}}'})
    assert values["s3_options"]["retry"].max_tries == 3 and sources["s3_options"] == "env QUIVER_S3_OPTIONS"
    with pytest.raises(StoreConfigError, match="not a valid RetryPolicy"):
        config.resolve({}, environ={"QUIVER_S3_OPTIONS": '{"retry": {"tries": 3}}'})


def test_sizes_parse_with_binary_suffixes():
    assert config.parse_size("4096", "x") == 4096
    assert config.parse_size("64MiB", "x") == 64 * MiB
    assert config.parse_size(" 2 gib ", "x") == 2 << 30
    assert config.parse_size("1_000", "x") == 1000
    for bad in ("", "1.5MiB", "-1", "10MB", "0x10"):
        with pytest.raises(StoreConfigError):
            config.parse_size(bad, "x")


def test_docs_config_table_lists_every_option():
    with open(os.path.join(REPO, "docs", "CONFIG.md")) as f:
        doc = f.read()
    for opt in config.OPTIONS.values():
        assert f"`{opt.name}`" in doc and (opt.env in doc or not opt.settable), opt.name
    assert config.CONFIG_ENV in doc
