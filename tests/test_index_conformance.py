"""One conformance suite for every residency-index backend.

Parametrised over ``index_backends.available()`` and written only against the
protocol (``Class(path, **opts)``, path a directory that memory-only backends
ignore), so a new backend passes it unchanged or is wrong.  A hypothesis state
machine checks each backend against a plain dict model.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from quiver import index_backends
from quiver.index_backends.errors import IndexBackendError, IndexClosedError, IndexLockedError, InvalidKeyError
from quiver.index_backends.protocol import IndexStats, ResidencyIndex

BACKENDS = index_backends.available()
MAX_SEQ = (1 << 64) - 1


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def opener(backend, tmp_path):
    """open_() opens ``backend`` at one directory under tmp_path; all handles are
    closed at teardown (close is idempotent)."""
    handles = []

    def open_():
        idx = index_backends.open(backend, tmp_path / "index")
        handles.append(idx)
        return idx

    yield open_
    for idx in handles:
        idx.close()


@pytest.fixture
def idx(opener):
    return opener()


def model_scan(model: dict, prefix: bytes) -> list[tuple[bytes, bytes]]:
    return sorted((k, v) for k, v in model.items() if k.startswith(prefix))


def model_longest(model: dict, chain) -> int:
    n = 0
    for k in chain:
        if k not in model:
            break
        n += 1
    return n


# -- shape ----------------------------------------------------------------------


def test_protocol_shape(idx, backend):
    assert isinstance(idx, ResidencyIndex)
    assert idx.name == backend
    assert isinstance(idx.persistent, bool)
    assert len(idx) == 0
    assert idx.get_applied_seq() == 0
    assert list(idx.scan_prefix(b"")) == []


# -- CRUD -----------------------------------------------------------------------


def test_crud_overwrite_delete(idx):
    k1, k2 = b"\x01" * 48, b"\x02" * 48
    assert idx.get(k1) is None
    idx.put(k1, b"one")
    assert idx.get(k1) == b"one"
    assert len(idx) == 1
    idx.put(k1, b"uno")  # overwrite: value replaced, count unchanged
    assert idx.get(k1) == b"uno"
    assert len(idx) == 1
    idx.put(k2, b"two")
    assert len(idx) == 2
    assert idx.delete(k1) is True
    assert idx.get(k1) is None
    assert idx.get(k2) == b"two"
    assert len(idx) == 1
    assert idx.delete(k1) is False  # already gone
    assert idx.delete(b"never-written") is False
    assert len(idx) == 1


def test_empty_value_is_not_absent(idx):
    idx.put(b"k", b"")
    assert idx.get(b"k") == b""
    assert idx.get_many([b"k", b"x"]) == [b"", None]
    assert idx.longest_prefix([b"k"]) == 1
    assert list(idx.scan_prefix(b"k")) == [(b"k", b"")]
    assert idx.delete(b"k") is True
    assert len(idx) == 0


def test_edge_bytes_in_keys_and_values(idx):
    pairs = {
        b"\x00": b"\x00",
        b"\x00\x00": b"\xff",
        b"\xff": b"\x00\xff",
        b"\xff\xff": b"v",
        b"a\x00b": b"w",
        bytes(range(256)): bytes(range(255, -1, -1)),
        b"\x00" * 100 + b"\xff": b"x" * 1000,
    }
    for k, v in pairs.items():
        idx.put(k, v)
    for k, v in pairs.items():
        assert idx.get(k) == v
    assert list(idx.scan_prefix(b"")) == sorted(pairs.items())
    assert len(idx) == len(pairs)


# -- ordered scans --------------------------------------------------------------


def _namespaced_keys(rng: random.Random) -> dict[bytes, bytes]:
    """48-byte keys (16-byte namespace + 32-byte key) with namespaces and key
    bytes that sit on byte boundaries (0x00, 0x7f, 0x80, 0xff)."""
    namespaces = [
        b"\x00" * 16,
        b"\x00" * 15 + b"\x01",
        b"\x7f" + b"\xff" * 15,
        b"\x80" + b"\x00" * 15,
        b"\xff" * 16,
        bytes(rng.randrange(256) for _ in range(16)),
    ]
    model = {}
    for ns in namespaces:
        for _ in range(40):
            tail = bytes(rng.randrange(256) for _ in range(32))
            model[ns + tail] = tail[:8]
        for fill in (b"\x00", b"\xff", b"\x7f", b"\x80"):
            model[ns + fill * 32] = fill
            model[ns + fill * 31 + b"\x01"] = fill + b"\x01"
    return model


def test_scan_every_prefix_length_of_48_byte_keys(idx):
    rng = random.Random(48)
    model = _namespaced_keys(rng)
    idx.put_many(list(model), list(model.values()))
    keys = sorted(model)
    probes = rng.sample(keys, 6) + [keys[0], keys[-1]]
    for length in range(0, 49):
        prefixes = {k[:length] for k in probes}
        # Prefixes that match nothing, just beside ones that do.
        for k in probes[:3]:
            if length:
                p = bytearray(k[:length])
                p[-1] ^= 0x80
                prefixes.add(bytes(p))
        for prefix in prefixes:
            got = list(idx.scan_prefix(prefix))
            assert got == model_scan(model, prefix), (length, prefix.hex())
    assert list(idx.scan_prefix(b"\xff" * 49)) == []
    assert list(idx.scan_prefix(b"\x00" * 48 + b"\x00")) == []


VARIABLE_KEYS = [
    b"\x00", b"\x00\x00", b"\x00\x00\x00", b"\x00\x01", b"\x00\xff",
    b"a", b"ab", b"ab\x00", b"ab\x00\x00", b"ab\xff", b"abc", b"abcd", b"abd", b"ac", b"b",
    b"\x7f", b"\x80", b"\xfe\xff", b"\xff", b"\xff\x00", b"\xff\xff", b"\xff\xff\xff",
    b"\xff\xff\xff\xff",
]


def test_scan_variable_length_keys_prefixes_of_each_other(idx):
    model = {k: b"v" + k for k in VARIABLE_KEYS}
    for k, v in model.items():
        idx.put(k, v)
    prefixes = {b""} | {k[:n] for k in VARIABLE_KEYS for n in range(len(k) + 1)}
    prefixes |= {b"aa", b"abce", b"ab\x01", b"\x01", b"\xff\xff\xff\xff\xff", b"\xfe", b"\x00\x02"}
    for prefix in sorted(prefixes):
        assert list(idx.scan_prefix(prefix)) == model_scan(model, prefix), prefix
    # Deleting a key that is a prefix of others leaves the others in the scan.
    idx.delete(b"ab")
    del model[b"ab"]
    assert list(idx.scan_prefix(b"ab")) == model_scan(model, b"ab")
    assert list(idx.scan_prefix(b"a")) == model_scan(model, b"a")


def test_scan_larger_than_one_chunk(idx):
    # More keys than any sane scan batch: continuation must neither skip nor repeat.
    ns = b"\x42" * 16
    keys = [ns + i.to_bytes(4, "big") + b"\x00" * 28 for i in range(3000)]
    other = [b"\x41" * 16 + b"\xff" * 32, b"\x43" * 16 + b"\x00" * 32]
    idx.put_many(keys + other, [b"v"] * (len(keys) + 2))
    got = [k for k, _ in idx.scan_prefix(ns)]
    assert got == keys
    assert len(list(idx.scan_prefix(b""))) == len(keys) + 2


def test_scan_is_lazy_iterator(idx):
    idx.put_many([b"p1", b"p2", b"q"], [b"1", b"2", b"3"])
    it = iter(idx.scan_prefix(b"p"))
    assert next(it) == (b"p1", b"1")
    assert next(it) == (b"p2", b"2")
    with pytest.raises(StopIteration):
        next(it)


# -- longest_prefix -------------------------------------------------------------


def test_longest_prefix(idx):
    chain = [bytes([i]) * 48 for i in range(1, 9)]
    assert idx.longest_prefix([]) == 0
    assert idx.longest_prefix(chain) == 0  # miss at start, nothing stored
    idx.put_many(chain, [b"r"] * len(chain))
    assert idx.longest_prefix(chain) == len(chain)  # all present
    idx.delete(chain[0])
    assert idx.longest_prefix(chain) == 0  # miss at start, rest present
    idx.put(chain[0], b"r")
    idx.delete(chain[5])
    assert idx.longest_prefix(chain) == 5  # stops at the first miss ...
    assert idx.longest_prefix(chain[6:]) == 2  # ... though later keys are present
    long_chain = [i.to_bytes(2, "big") * 24 for i in range(200)]
    idx.put_many(long_chain[:137], [b"x"] * 137)
    assert idx.longest_prefix(long_chain) == 137


# -- bulk -----------------------------------------------------------------------


def test_put_many_get_many(idx):
    rng = random.Random(7)
    keys = [bytes(rng.randrange(256) for _ in range(48)) for _ in range(2000)]
    values = [k[:4] + i.to_bytes(4, "little") for i, k in enumerate(keys)]
    idx.put_many(keys, values)
    assert len(idx) == len(set(keys))
    assert idx.get_many(keys) == values
    absent = [b"\x00absent" + bytes([i]) for i in range(5)]
    mixed = [keys[0], absent[0], keys[1], absent[1], keys[2]]
    assert idx.get_many(mixed) == [values[0], None, values[1], None, values[2]]
    assert idx.get_many([]) == []
    assert list(idx.scan_prefix(b"")) == sorted(zip(keys, values))


def test_put_many_duplicates_last_wins_and_empty_batch(idx):
    idx.put_many([b"k", b"j", b"k"], [b"1", b"2", b"3"])
    assert idx.get(b"k") == b"3"
    assert len(idx) == 2
    idx.put_many([], [])
    assert len(idx) == 2
    idx.put_many((b"t",), (b"tuple",))  # any sequence, not only lists
    assert idx.get(b"t") == b"tuple"


def test_put_many_rejects_whole_batch(idx):
    idx.put(b"keep", b"1")
    with pytest.raises(InvalidKeyError):
        idx.put_many([b"a", b"", b"c"], [b"1", b"2", b"3"])
    with pytest.raises(InvalidKeyError):
        idx.put_many([b"a", "b"], [b"1", b"2"])
    with pytest.raises(TypeError):
        idx.put_many([b"a", b"b"], [b"1", "2"])
    with pytest.raises(ValueError):
        idx.put_many([b"a", b"b"], [b"1"])
    assert idx.get(b"a") is None  # nothing of a refused batch was written
    assert len(idx) == 1


# -- applied_seq ----------------------------------------------------------------


def test_applied_seq(idx):
    assert idx.get_applied_seq() == 0
    idx.set_applied_seq(41)
    assert idx.get_applied_seq() == 41
    idx.set_applied_seq(MAX_SEQ)
    assert idx.get_applied_seq() == MAX_SEQ
    idx.set_applied_seq(0)
    assert idx.get_applied_seq() == 0
    with pytest.raises(ValueError):
        idx.set_applied_seq(-1)
    with pytest.raises(ValueError):
        idx.set_applied_seq(MAX_SEQ + 1)
    for bad in ("5", 5.0, None, True):
        with pytest.raises(TypeError):
            idx.set_applied_seq(bad)
    assert idx.get_applied_seq() == 0
    assert len(idx) == 0  # metadata is not a record


def test_write_batch_puts_then_deletes_then_seq(opener, backend):
    idx = opener()
    idx.put(b"old", b"o")
    idx.write_batch([b"a", b"b", b"old"], [b"1", b"2", b"3"], [b"b", b"gone-already"], 7)
    assert (idx.get(b"a"), idx.get(b"b"), idx.get(b"old")) == (b"1", None, b"3")
    assert len(idx) == 2 and idx.get_applied_seq() == 7
    idx.write_batch([], [], [b"a"], 8)  # deletes only
    assert idx.get(b"a") is None and len(idx) == 1 and idx.get_applied_seq() == 8
    if idx.persistent:
        idx.flush()
        idx.close()
        idx = opener()
        assert idx.get(b"old") == b"3" and len(idx) == 1 and idx.get_applied_seq() == 8


def test_write_batch_validates_everything_first(idx):
    idx.write_batch([b"k"], [b"v"], [], 3)
    for keys, values, deletes, seq, err in [
        ([b"x"], [b"v"], [b""], 4, InvalidKeyError),
        ([b"x"], ["v"], [], 4, TypeError),
        ([b"x", b"y"], [b"v"], [], 4, ValueError),
        ([b"x"], [b"v"], [b"k"], -1, ValueError),
        ([b"x"], [b"v"], [b"k"], "4", TypeError),
    ]:
        with pytest.raises(err):
            idx.write_batch(keys, values, deletes, seq)
    assert idx.get(b"k") == b"v" and idx.get(b"x") is None and idx.get_applied_seq() == 3


# -- reopen ---------------------------------------------------------------------


def test_reopen(opener):
    idx = opener()
    model = {bytes([i]) * 48: bytes([i]) for i in range(50)}
    model[b"\x00"] = b""
    idx.put_many(list(model), list(model.values()))
    idx.delete(bytes([3]) * 48)
    del model[bytes([3]) * 48]
    idx.set_applied_seq(12345)
    persistent = idx.persistent
    idx.close()

    again = opener()
    assert again.persistent == persistent
    if persistent:
        assert len(again) == len(model)
        assert list(again.scan_prefix(b"")) == sorted(model.items())
        assert again.get_applied_seq() == 12345
        assert again.stats().records == len(model)
        # Writes after a reopen persist too, and the count stays exact.
        again.put(b"new", b"n")
        again.delete(bytes([4]) * 48)
        again.set_applied_seq(12346)
        again.close()
        third = opener()
        assert len(third) == len(model)
        assert third.get(b"new") == b"n"
        assert third.get(bytes([4]) * 48) is None
        assert third.get_applied_seq() == 12346
    else:
        assert len(again) == 0
        assert list(again.scan_prefix(b"")) == []
        assert again.get_applied_seq() == 0
        assert again.stats().persistent is False


# -- stats ----------------------------------------------------------------------


def test_stats(idx):
    s = idx.stats()
    assert isinstance(s, IndexStats)
    assert s.records == 0
    assert s.persistent is idx.persistent
    rng = random.Random(3)
    keys = [bytes(rng.randrange(256) for _ in range(48)) for _ in range(500)]
    idx.put_many(keys, [b"v" * 32] * len(keys))
    idx.delete(keys[0])
    idx.flush()
    s = idx.stats()
    assert s.records == len(idx) == 499
    for field in (s.bytes_on_disk, s.bytes_written, s.memory_bytes):
        assert isinstance(field, int) and field >= 0
    assert s.detail is None or isinstance(s.detail, dict)
    if idx.persistent:
        # 499 live 48-byte keys went to disk: at least their key bytes were written.
        assert s.bytes_on_disk > 0
        assert s.bytes_written >= 499 * 48
    else:
        assert s.bytes_on_disk == 0
        assert s.bytes_written == 0


# -- typed errors ---------------------------------------------------------------

BAD_KEYS = ["text", 7, None, bytearray(b"k"), memoryview(b"k"), b""]


@pytest.mark.parametrize("bad", BAD_KEYS, ids=lambda b: type(b).__name__ + ("-empty" if b == b"" else ""))
def test_bad_keys_raise_invalid_key(idx, bad):
    assert issubclass(InvalidKeyError, IndexBackendError)
    with pytest.raises(InvalidKeyError):
        idx.put(bad, b"v")
    with pytest.raises(InvalidKeyError):
        idx.get(bad)
    with pytest.raises(InvalidKeyError):
        idx.delete(bad)
    with pytest.raises(InvalidKeyError):
        idx.get_many([b"ok", bad])
    with pytest.raises(InvalidKeyError):
        idx.put_many([b"ok", bad], [b"v", b"v"])
    with pytest.raises(InvalidKeyError):
        idx.longest_prefix([b"ok", bad])
    assert len(idx) == 0


@pytest.mark.parametrize("bad", ["text", 7, None, bytearray(b"k")], ids=lambda b: type(b).__name__)
def test_bad_scan_prefix_raises_at_call(idx, bad):
    # Refused when called, not at the first next() of a generator.
    with pytest.raises(InvalidKeyError):
        idx.scan_prefix(bad)


def test_bad_values_raise_type_error(idx):
    for bad in ("text", 1, None, bytearray(b"v")):
        with pytest.raises(TypeError):
            idx.put(b"k", bad)
    assert idx.get(b"k") is None


def test_use_after_close(idx):
    idx.put(b"k", b"v")
    idx.close()
    idx.close()  # idempotent
    calls = [
        lambda: idx.put(b"k", b"v"),
        lambda: idx.put_many([b"k"], [b"v"]),
        lambda: idx.get(b"k"),
        lambda: idx.get_many([b"k"]),
        lambda: idx.delete(b"k"),
        lambda: idx.scan_prefix(b""),
        lambda: idx.longest_prefix([b"k"]),
        lambda: len(idx),
        idx.flush,
        idx.stats,
        idx.get_applied_seq,
        lambda: idx.set_applied_seq(1),
    ]
    for call in calls:
        with pytest.raises(IndexClosedError):
            call()


# -- model-based state machine --------------------------------------------------

NAMESPACES = [b"\x00" * 16, b"\xff" * 16]
short_keys = st.lists(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]), min_size=1, max_size=4).map(bytes)
ns_keys = st.tuples(st.sampled_from(NAMESPACES), st.lists(st.sampled_from([0x00, 0x42, 0xFF]), min_size=0, max_size=3)).map(
    lambda t: t[0] + bytes(t[1]) + b"\x00" * (32 - len(t[1]))
)
keys_st = st.one_of(short_keys, ns_keys)
values_st = st.binary(max_size=8)
prefixes_st = st.one_of(st.just(b""), keys_st.flatmap(lambda k: st.integers(0, len(k)).map(lambda n: k[:n])))


class IndexMachine(RuleBasedStateMachine):
    backend: str = ""

    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix=f"quiver-sm-{self.backend}-"))
        self.idx = index_backends.open(self.backend, self.dir / "index")
        self.model: dict[bytes, bytes] = {}
        self.seq = 0

    @rule(k=keys_st, v=values_st)
    def put(self, k, v):
        self.idx.put(k, v)
        self.model[k] = v

    @rule(items=st.lists(st.tuples(keys_st, values_st), max_size=8))
    def put_many(self, items):
        self.idx.put_many([k for k, _ in items], [v for _, v in items])
        self.model.update(items)

    @rule(k=keys_st)
    def delete(self, k):
        assert self.idx.delete(k) == (k in self.model)
        self.model.pop(k, None)

    @rule(k=keys_st)
    def get(self, k):
        assert self.idx.get(k) == self.model.get(k)

    @rule(ks=st.lists(keys_st, max_size=8))
    def get_many(self, ks):
        assert self.idx.get_many(ks) == [self.model.get(k) for k in ks]

    @rule(prefix=prefixes_st)
    def scan_prefix(self, prefix):
        assert list(self.idx.scan_prefix(prefix)) == model_scan(self.model, prefix)

    @rule(ks=st.lists(keys_st, max_size=6))
    def longest_prefix(self, ks):
        assert self.idx.longest_prefix(ks) == model_longest(self.model, ks)

    @rule(items=st.lists(st.tuples(keys_st, values_st), max_size=6), dels=st.lists(keys_st, max_size=4),
          seq=st.integers(0, MAX_SEQ))
    def write_batch(self, items, dels, seq):
        self.idx.write_batch([k for k, _ in items], [v for _, v in items], dels, seq)
        self.model.update(items)
        for k in dels:
            self.model.pop(k, None)
        self.seq = seq

    @rule(seq=st.integers(0, MAX_SEQ))
    def set_applied_seq(self, seq):
        self.idx.set_applied_seq(seq)
        self.seq = seq

    @precondition(lambda self: self.idx.persistent)
    @rule(flush_first=st.booleans())
    def reopen(self, flush_first):
        if flush_first:
            self.idx.flush()
        self.idx.close()
        self.idx = index_backends.open(self.backend, self.dir / "index")

    @invariant()
    def same_len_and_seq(self):
        assert len(self.idx) == len(self.model)
        assert self.idx.get_applied_seq() == self.seq

    def teardown(self):
        self.idx.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.parametrize("name", BACKENDS)
def test_state_machine_against_dict_model(name):
    machine = type(f"IndexMachine_{name}", (IndexMachine,), {"backend": name})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=40,
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            database=None,
        ),
    )


def test_persistent_index_refuses_second_open(opener):
    first = opener()
    if not first.persistent:
        second = opener()  # memory-only: independent, empty
        first.put(b"k", b"v")
        assert second.get(b"k") is None
        return
    with pytest.raises(IndexLockedError):
        opener()
    first.put(b"k", b"v")  # the refused open did not disturb the open handle
    first.close()
    assert opener().get(b"k") == b"v"  # the lock went with close()
