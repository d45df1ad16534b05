"""Deterministic workload generators for the studies.

- :class:`SharedPrefixWorkload`: synthetic request chains with shared prefixes
  (namespaces, shared system prompts per namespace, conversations that grow turn
  by turn).  Keys are built like Quiver's chain keys, so two requests share a
  k-block prefix exactly when they share the first k keys.
- :func:`index_dataset`: ``n`` distinct 48-byte index keys (16-byte identity
  namespace + 32-byte block key) with 16-byte values, drawn from that workload,
  plus probe chains for ``longest_prefix``.
- :func:`load_mooncake` / :func:`mooncake_chains`: the Mooncake FAST'25 trace
  (``../shared/data/mooncake_synthetic_trace.jsonl``), each request's hash_id
  chain mapped to a chain of 48-byte keys.

Everything is a pure function of its arguments and seed: the same call gives
the same bytes on every machine.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import blake3

NAMESPACE_BYTES = 16
BLOCK_KEY_BYTES = 32
KEY_BYTES = NAMESPACE_BYTES + BLOCK_KEY_BYTES  # 48
VALUE_BYTES = 16

REPO_ROOT = Path(__file__).resolve().parent.parent
MOONCAKE_FILE = "mooncake_synthetic_trace.jsonl"


def namespace(label: str | int) -> bytes:
    """A 16-byte identity namespace (stands in for a CacheIdentity fingerprint prefix)."""
    return blake3.blake3(b"quiver/study/namespace/" + str(label).encode()).digest()[:NAMESPACE_BYTES]


def _child(parent: bytes, content: bytes) -> bytes:
    """Next 32-byte chain key: BLAKE3(parent || content), as in engine.keys."""
    return blake3.blake3(parent + content).digest()


@dataclass(frozen=True)
class Request:
    """One synthetic request: its namespace index and its chain of 48-byte keys."""

    namespace_index: int
    chain: tuple[bytes, ...]


class SharedPrefixWorkload:
    """A deterministic stream of request chains with shared prefixes.

    Each request picks a namespace (uniformly), then either starts a new
    conversation on one of the namespace's shared system prompts (probability
    ``new_conversation_p``) or continues one of the namespace's open
    conversations by one turn.  Its chain is system prompt + every turn so far.
    At most ``open_conversations`` conversations stay open per namespace (the
    oldest is dropped), so memory is bounded.
    """

    def __init__(
        self,
        seed: int = 0,
        namespaces: int = 64,
        system_prompts: int = 4,
        system_blocks: tuple[int, int] = (4, 32),
        turn_blocks: tuple[int, int] = (1, 8),
        new_conversation_p: float = 0.3,
        open_conversations: int = 32,
    ):
        assert namespaces >= 1 and system_prompts >= 1 and open_conversations >= 1
        assert 1 <= system_blocks[0] <= system_blocks[1] and 1 <= turn_blocks[0] <= turn_blocks[1]
        self.seed = seed
        self.namespaces = namespaces
        self.system_prompts = system_prompts
        self.system_blocks = system_blocks
        self.turn_blocks = turn_blocks
        self.new_conversation_p = new_conversation_p
        self.open_conversations = open_conversations

    def requests(self) -> Iterator[Request]:
        """An endless, deterministic iterator of requests."""
        rng = random.Random(self.seed)
        ns = [namespace(f"{self.seed}/{i}") for i in range(self.namespaces)]
        prompts: list[list[list[bytes]]] = []  # [namespace][prompt] -> 32-byte keys
        for i in range(self.namespaces):
            per_ns = []
            for p in range(self.system_prompts):
                key = _child(b"quiver/study/root", ns[i])
                keys = []
                for b in range(rng.randint(*self.system_blocks)):
                    key = _child(key, b"sys/%d/%d" % (p, b))
                    keys.append(key)
                per_ns.append(keys)
            prompts.append(per_ns)
        open_convs: list[list[list[bytes]]] = [[] for _ in range(self.namespaces)]
        conv_id = 0
        while True:
            i = rng.randrange(self.namespaces)
            convs = open_convs[i]
            if not convs or rng.random() < self.new_conversation_p:
                conv = list(prompts[i][rng.randrange(self.system_prompts)])
                convs.append(conv)
                if len(convs) > self.open_conversations:
                    convs.pop(0)
            else:
                conv = convs[rng.randrange(len(convs))]
            conv_id += 1
            key = conv[-1]
            for b in range(rng.randint(*self.turn_blocks)):
                key = _child(key, b"turn/%d/%d" % (conv_id, b))
                conv.append(key)
            yield Request(i, tuple(ns[i] + k for k in conv))


@dataclass(frozen=True)
class IndexDataset:
    """``n`` records for the index studies plus probe chains.

    keys:   distinct 48-byte keys in first-appearance order (the order to insert).
    values: 16-byte values, one per key.
    probes: request chains that come after the dataset in the same workload
            stream: their prefixes are mostly present, their tails mostly not.
    namespaces: the 16-byte namespaces, for prefix scans.
    """

    keys: list[bytes]
    values: list[bytes]
    probes: list[tuple[bytes, ...]]
    namespaces: list[bytes]


def index_dataset(n: int, probes: int = 2_000, seed: int = 0, namespaces: int = 64) -> IndexDataset:
    """``n`` distinct keys from :class:`SharedPrefixWorkload`, 16-byte values, probes."""
    assert n >= 1
    wl = SharedPrefixWorkload(seed=seed, namespaces=namespaces)
    stream = wl.requests()
    seen: dict[bytes, None] = {}
    while len(seen) < n:
        for key in next(stream).chain:
            if key not in seen:
                seen[key] = None
                if len(seen) == n:
                    break
    keys = list(seen)
    vrng = random.Random(seed + 1)
    values = [vrng.randbytes(VALUE_BYTES) for _ in range(n)]
    probe_chains = [next(stream).chain for _ in range(probes)]
    ns = sorted({k[:NAMESPACE_BYTES] for k in keys})
    return IndexDataset(keys, values, probe_chains, ns)


# --- the Mooncake trace -------------------------------------------------------------

MOONCAKE_NAMESPACE = namespace("mooncake")


@dataclass(frozen=True)
class MooncakeRequest:
    """One line of the Mooncake trace."""

    timestamp: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def shared_dir() -> Path:
    """``$QUIVER_SHARED_DIR`` if set, else ``shared/`` beside the repository root."""
    env = os.environ.get("QUIVER_SHARED_DIR")
    return Path(env) if env else REPO_ROOT.parent / "shared"


def mooncake_path() -> Path:
    """Where the Mooncake trace lives."""
    return shared_dir() / "data" / MOONCAKE_FILE


def load_mooncake(path: str | os.PathLike | None = None) -> list[MooncakeRequest]:
    """Every request of the trace, in file order."""
    path = Path(path) if path is not None else mooncake_path()
    out = []
    with open(path, "r", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            out.append(
                MooncakeRequest(
                    int(rec["timestamp"]), int(rec["input_length"]), int(rec["output_length"]), tuple(rec["hash_ids"])
                )
            )
    return out


def mooncake_key(hash_id: int, ns: bytes = MOONCAKE_NAMESPACE) -> bytes:
    """48-byte key of one trace block: namespace + BLAKE3(hash_id as u64 LE).

    A hash_id already stands for a block given its whole prefix, so it is hashed
    on its own, not chained.
    """
    return ns + blake3.blake3(hash_id.to_bytes(8, "little")).digest()


def mooncake_chains(requests: list[MooncakeRequest], ns: bytes = MOONCAKE_NAMESPACE) -> list[list[bytes]]:
    """Each request's hash_id chain as a chain of 48-byte keys."""
    cache: dict[int, bytes] = {}
    chains = []
    for req in requests:
        chain = []
        for h in req.hash_ids:
            key = cache.get(h)
            if key is None:
                key = cache[h] = mooncake_key(h, ns)
            chain.append(key)
        chains.append(chain)
    return chains


def trace_figures(requests: list[MooncakeRequest]) -> dict:
    """Requests, block references, distinct blocks, repeat share, longest prompt."""
    refs = sum(len(r.hash_ids) for r in requests)
    distinct = len({h for r in requests for h in r.hash_ids})
    return {
        "requests": len(requests),
        "block_references": refs,
        "distinct_blocks": distinct,
        "repeat_share": (1 - distinct / refs) if refs else 0.0,
        "longest_prompt_blocks": max((len(r.hash_ids) for r in requests), default=0),
    }


# --- measurement helpers shared by the studies ------------------------------------


def latency_summary(samples_ns: list[int]) -> dict:
    """p50 / p99 / mean / max in microseconds of per-call timings (nanoseconds in)."""
    if not samples_ns:
        return {"calls": 0, "p50_us": None, "p99_us": None, "mean_us": None, "max_us": None}
    s = sorted(samples_ns)
    n = len(s)

    def pct(q: float) -> float:
        # nearest rank: the smallest sample with at least a share q of samples at or below it
        return s[min(n - 1, max(0, math.ceil(q * n) - 1))] / 1e3

    return {
        "calls": n,
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "mean_us": sum(s) / n / 1e3,
        "max_us": s[-1] / 1e3,
    }


_WARMED: set[str] = set()


def warm_up_backend(name: str, directory: str | os.PathLike) -> None:
    """Run every index operation once on a throwaway index in ``directory``.

    Done once per backend per process, outside any timing, so one-time costs
    (Numba compilation of the ART kernels, lazy imports, first-use allocations)
    are not charged to the first measured operation.  The ART study measures
    compile time on its own.
    """
    if name in _WARMED:
        return
    from quiver import index_backends
    data = index_dataset(256, probes=4, seed=12345)
    idx = index_backends.open(name, str(directory))
    try:
        idx.put_many(data.keys[:-1], data.values[:-1])
        idx.put(data.keys[-1], data.values[-1])
        assert idx.get(data.keys[0]) == data.values[0]
        idx.get_many(data.keys[:32])
        for _ in idx.scan_prefix(data.namespaces[0]):
            pass
        for _ in idx.scan_prefix(data.keys[0]):
            pass
        for chain in data.probes:
            idx.longest_prefix(chain)
        idx.delete(data.keys[-1])
        len(idx)
        idx.flush()
        idx.stats()
    finally:
        idx.close()
    if idx.persistent:
        index_backends.open(name, str(directory)).close()
    _WARMED.add(name)
