"""The study workloads are deterministic and the Mooncake loader matches the data README."""

from __future__ import annotations

import pytest

from quiver.studies import workloads as w


def test_shared_prefix_is_deterministic_and_shares_prefixes():
    a = [r.chain for _, r in zip(range(300), w.SharedPrefixWorkload(seed=7).requests())]
    b = [r.chain for _, r in zip(range(300), w.SharedPrefixWorkload(seed=7).requests())]
    c = [r.chain for _, r in zip(range(300), w.SharedPrefixWorkload(seed=8).requests())]
    assert a == b
    assert a != c
    assert all(len(k) == w.KEY_BYTES for chain in a for k in chain)
    # every key of a chain carries its request's namespace
    assert all(len({k[: w.NAMESPACE_BYTES] for k in chain}) == 1 for chain in a)
    # shared system prompts: some pair of requests shares a first block
    firsts = [chain[0] for chain in a]
    assert len(set(firsts)) < len(firsts)
    # a key names its whole prefix: the same key never appears after two different parents
    parent_of = {}
    for chain in a:
        for i, k in enumerate(chain):
            parent = chain[i - 1] if i else None
            assert parent_of.setdefault(k, parent) == parent


def test_index_dataset_shape_and_determinism():
    d1 = w.index_dataset(5_000, probes=50)
    d2 = w.index_dataset(5_000, probes=50)
    assert d1 == d2
    assert len(d1.keys) == len(set(d1.keys)) == 5_000
    assert all(len(k) == 48 for k in d1.keys) and all(len(v) == 16 for v in d1.values)
    assert len(d1.probes) == 50
    assert 1 < len(d1.namespaces) <= 64
    # probes continue the same stream: some of their blocks are present, some are not
    keyset = set(d1.keys)
    present = sum(k in keyset for chain in d1.probes for k in chain)
    total = sum(len(chain) for chain in d1.probes)
    assert 0 < present < total


def test_latency_summary_nearest_rank():
    s = w.latency_summary([i * 1000 for i in range(1, 101)])
    assert s["calls"] == 100 and s["p50_us"] == 50 and s["p99_us"] == 99 and s["max_us"] == 100
    assert w.latency_summary([])["p50_us"] is None


@pytest.fixture(scope="module")
def trace():
    if not w.mooncake_path().exists():
        pytest.skip(f"Mooncake trace not found at {w.mooncake_path()} (set QUIVER_SHARED_DIR)")
    return w.load_mooncake()


def test_mooncake_figures_match_the_data_readme(trace):
    f = w.trace_figures(trace)
    assert f["requests"] == 3_993
    assert f["block_references"] == 121_877
    assert f["distinct_blocks"] == 43_924
    assert round(100 * f["repeat_share"], 1) == 64.0
    assert f["longest_prompt_blocks"] == 374


def test_mooncake_chains_are_deterministic_48_byte_keys(trace):
    chains = w.mooncake_chains(trace[:200])
    assert chains == w.mooncake_chains(trace[:200])
    assert all(len(k) == 48 and k[:16] == w.MOONCAKE_NAMESPACE for c in chains for k in c)
    # one hash_id maps to one key, distinct hash_ids to distinct keys
    pairs = {(h, k) for r, c in zip(trace[:200], chains) for h, k in zip(r.hash_ids, c)}
    assert len({h for h, _ in pairs}) == len(pairs) == len({k for _, k in pairs})


def test_shared_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("QUIVER_SHARED_DIR", str(tmp_path))
    assert w.mooncake_path() == tmp_path / "data" / w.MOONCAKE_FILE
