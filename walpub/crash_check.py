"""The checker: recover a crash state with a fresh Volume and check the five
invariants of docs/WALPUB.md §8, and the explorers that do this for every
crash state of a workload run.

* expectations: a :class:`Tracker` notes what a workload was told (publish and
  delete starts and acknowledgements) against the op count and turns them into
  an :class:`Expect` (*must*, *may*, *gone*) for any crash point;
* checks: :func:`check_recovered` (invariants 3 and 4), :func:`check_reads`
  (1 and 2), :func:`check_state` (all five on one state, including crashes
  inside recovery, plus a publish after recovery surviving the next power
  loss); findings are :class:`Violation`;
* explorers: :func:`explore` runs a workload on a recording
  :class:`~walpub.simfs.SimFileSystem`, builds every crash state of every point
  (:func:`~walpub.crash_states.crash_states`, bounded per point), and checks
  each, returning an :class:`ExploreResult`; :func:`explore_kill` first kills
  the workload (SIGKILL: the page cache survives), runs a second process, then
  cuts the power at every op of that one.

The explorers live here rather than with the enumerator because
:func:`check_state` itself enumerates crash states (of recovery), so the
dependency runs one way: simfs <- crash_states <- crash_check.  This is the
only one of the three modules that runs a Volume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from quiver.walpub.crash_states import crash_states
from quiver.walpub.errors import CorruptObjectError, ObjectNotFoundError, WalpubError
from quiver.walpub.simfs import CrashState, SimFileSystem, SimulatedKill


# ============================================================== expectations
class Tracker:
    """Records what a workload was told (acknowledgements) against the op count.

    Use ``tracker.publish(vol, key, data)`` etc. (or pass ``tracker.observer`` to
    the Volume so its internal deletes and evictions are seen)."""

    def __init__(self, sim: SimFileSystem):
        self.sim = sim
        self.data: dict[bytes, bytes] = {}

    def observer(self, event: str, keys: list[bytes]) -> None:
        kind = "del_begin" if event == "delete_begin" else "del_ack"
        for k in keys:
            self.sim.mark((kind, k))

    def publish(self, vol, key: bytes, data: bytes) -> bool:
        return self.publish_many(vol, [(key, data)])[0]

    def publish_many(self, vol, items) -> list[bool]:
        items = [(k, bytes(d)) for k, d in items]
        for k, d in items:
            assert self.data.setdefault(k, d) == d, "content-addressed: one key, one content"
            self.sim.mark(("pub_begin", k))
        res = vol.publish_many(items)
        for k, _ in items:
            self.sim.mark(("pub_ack", k))
        return res

    def expectations(self, n_ops: int) -> "Expect":
        state: dict[bytes, str] = {}
        for pos, event in self.sim.marks:
            if pos > n_ops:
                break
            ev, key = event
            if ev not in ("pub_begin", "pub_ack", "del_begin", "del_ack"):
                continue
            cur = state.get(key, "absent")
            if ev == "pub_begin":
                state[key] = cur if cur == "acked" else "pub"
            elif ev == "pub_ack":
                # A no-op publish of a key being deleted acknowledges nothing new.
                state[key] = cur if cur == "del" else "acked"
            elif ev == "del_begin":
                state[key] = "del"
            else:
                state[key] = "deleted"
        must = {k: self.data[k] for k, s in state.items() if s == "acked"}
        may = {k: self.data[k] for k, s in state.items() if s in ("pub", "del")}
        gone = {k for k, s in state.items() if s == "deleted"}
        return Expect(must, may, gone)


@dataclass
class Expect:
    must: dict[bytes, bytes]    # acknowledged and no delete started: readable, exact
    may: dict[bytes, bytes]     # in flight: absent, or exact
    gone: set[bytes]            # acknowledged deletes: absent


# ============================================================== checking
@dataclass
class Violation:
    invariant: str
    detail: str
    n_ops: int = -1
    desc: str = ""

    def __str__(self) -> str:
        return f"[{self.invariant}] after op {self.n_ops} ({self.desc}): {self.detail}"


@dataclass
class ExploreResult:
    points: int = 0
    states: int = 0              # crash states built (distinct per point)
    distinct: int = 0            # distinct on-disk states over the whole run
    checked: int = 0             # (state, expectations) pairs recovered and checked
    recovery_crash_states: int = 0
    violations: list[Violation] = field(default_factory=list)
    fsyncs: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations


ROOT_PATH = "/vol"


def logical_view(vol) -> dict[bytes, bytes]:
    """Every live key and its bytes as read through the volume."""
    out = {}
    for key in sorted(vol.keys()):
        try:
            out[key] = vol.read(key)
        except WalpubError as exc:
            out[key] = repr(type(exc)).encode()
    return out


def check_recovered(vol, sim: SimFileSystem, root: str = ROOT_PATH) -> list[Violation]:
    """Invariants 3 and 4 on a freshly recovered volume (before any read)."""
    from quiver.walpub.volume import iter_object_files, object_relpath, unpack_index_value

    v: list[Violation] = []
    live = set(vol.keys())
    for key, val in vol._records():
        length = unpack_index_value(key, val)[0]
        path = f"{root}/{object_relpath(key)}"
        if not sim.exists(path) or sim.file_size(path) != length:
            v.append(Violation("3-no-dangling-index", f"index entry {key.hex()} has no intact object"))
    if len(vol) != len(live):
        v.append(Violation("3-no-dangling-index", f"the volume counts {len(vol)} live, its index holds {len(live)}"))
    tmp = sim.listdir(f"{root}/tmp")
    if tmp:
        v.append(Violation("4-no-garbage", f"tmp/ not empty: {tmp}"))
    files = list(iter_object_files(sim, root))
    stray = [p for p, k in files if k is None or k not in live]
    if stray:
        v.append(Violation("4-no-garbage", f"orphan objects: {stray[:3]}"))
    missing = live - {k for _, k in files}
    if missing:
        v.append(Violation("3-no-dangling-index", f"live keys without object: {len(missing)}"))
    return v


def check_reads(vol, expect: Expect) -> list[Violation]:
    """Invariants 1 and 2: acknowledged blocks exact; nothing else wrong or back."""
    v: list[Violation] = []
    for key, data in expect.must.items():
        try:
            got = vol.read(key)
        except (ObjectNotFoundError, CorruptObjectError) as exc:
            v.append(Violation("1-acked-readable", f"{key.hex()[:16]}: {type(exc).__name__}"))
            continue
        if got != data:
            v.append(Violation("2-no-bad-bytes", f"{key.hex()[:16]} returned wrong bytes"))
    for key, data in expect.may.items():
        try:
            got = vol.read(key)
        except (ObjectNotFoundError, CorruptObjectError):
            continue
        if got != data:
            v.append(Violation("2-no-bad-bytes", f"in-flight {key.hex()[:16]} returned wrong bytes"))
    for key in vol.keys():
        if key not in expect.must and key not in expect.may:
            why = "deleted key came back" if key in expect.gone else "never-published key present"
            v.append(Violation("1-acked-readable", f"{key.hex()[:16]}: {why}"))
    return v


def check_state(state: CrashState, expect: Expect, *, volume_kwargs: dict | None = None,
                idempotence: bool = True, continue_after: bool = True,
                recovery_crashes: int = 0, max_states: int = 16, seed: int = 0,
                root: str = ROOT_PATH, index_factory: Callable[[], object] | None = None,
                ) -> tuple[list[Violation], int]:
    """Recover ``state`` and check the five invariants (plus, optionally, that a
    publish after recovery survives the next recovery).

    ``recovery_crashes`` > 0 also crashes the recovery itself at up to that many
    of its op boundaries (``max_states`` states each) and checks that recovering
    from each gives the same logical state.  Returns (violations, recovery crash
    states explored)."""
    from quiver.walpub.volume import Volume

    kw = dict(volume_kwargs or {})
    if index_factory is not None:
        kw["index"] = index_factory()   # one persistent index per simulated machine
    sim = SimFileSystem(state)
    if recovery_crashes:
        sim.start_recording()
    try:
        vol = Volume(root, io=sim, **kw)
    except Exception as exc:  # noqa: BLE001 - any failure to recover is the finding
        return [Violation("5-recovery", f"recovery raised {type(exc).__name__}: {exc}")], 0
    sim.recording = False
    v = check_recovered(vol, sim, root)
    after1 = sim.snapshot()
    view1 = logical_view(vol) if (idempotence or recovery_crashes) else None
    vol.close()
    explored = 0
    if idempotence:
        vol2 = Volume(root, io=sim, **kw)
        if sim.snapshot() != after1:
            v.append(Violation("5-idempotent", "a second recovery changed the files"))
        if logical_view(vol2) != view1:
            v.append(Violation("5-idempotent", "a second recovery changed the contents"))
        vol2.close()
    if recovery_crashes:
        vs, explored = _check_recovery_crashes(sim, kw, view1, recovery_crashes, max_states=max_states,
                                               seed=seed, root=root, index_factory=index_factory)
        v += vs
    vol = Volume(root, io=sim, **kw)
    v += check_reads(vol, expect)
    kw["capacity_bytes"] = None  # the probe must not evict what is being checked
    if continue_after:
        vol, vs = _check_publish_after_recovery(vol, sim, kw, expect, root, index_factory)
        v += vs
    vol.close()
    return v, explored


def _check_recovery_crashes(sim: SimFileSystem, kw: dict, view1: dict | None, recovery_crashes: int, *,
                            max_states: int, seed: int, root: str,
                            index_factory: Callable[[], object] | None) -> tuple[list[Violation], int]:
    """Invariant 5 inside recovery: crash the recovery recorded on ``sim`` at up
    to ``recovery_crashes`` of its op boundaries, recover each state again and
    compare with the first recovery's logical view ``view1``.  Returns
    (violations, crash states explored)."""
    from quiver.walpub.volume import Volume

    v: list[Violation] = []
    explored = 0
    pts = sim.points[1:]
    step = max(1, len(pts) // recovery_crashes)
    for pt in pts[::step][:recovery_crashes]:
        for st in crash_states(pt, sim.kinds, max_states=max_states, seed=seed):
            explored += 1
            s2 = SimFileSystem(st)
            kw2 = dict(kw, index=index_factory()) if index_factory is not None else kw
            try:
                vr = Volume(root, io=s2, **kw2)
            except Exception as exc:  # noqa: BLE001
                v.append(Violation("5-recovery-crash", f"re-recovery raised {exc!r}"))
                continue
            v += check_recovered(vr, s2, root)
            if logical_view(vr) != view1:
                v.append(Violation("5-recovery-crash",
                                   f"crash in recovery at op {pt.n_ops} ({pt.desc}) changed the result"))
            vr.close()
    return v, explored


def _check_publish_after_recovery(vol, sim: SimFileSystem, kw: dict, expect: Expect, root: str,
                                  index_factory: Callable[[], object] | None) -> tuple[object, list[Violation]]:
    """The "torn tail, then continue" check: close ``vol``, reopen on ``sim``,
    publish a probe, cut the power (keep exactly what was fsynced), recover and
    check the probe and ``expect``.  ``kw`` is the caller's and is updated (the
    index after the crash).  Returns (the volume last opened, which the caller
    closes; violations)."""
    from quiver.walpub.volume import Volume

    v: list[Violation] = []
    vol.close()
    vol = Volume(root, io=sim, **kw)
    probe = b"\xfe" * 31 + bytes([len(vol) % 251])
    data = b"after-recovery:" + probe
    try:
        if probe not in expect.must and probe not in expect.may:
            vol.publish(probe, data)
            vol.close()
            # A power loss now keeps exactly what was fsynced.
            s3 = SimFileSystem(sim.durable_state())
            if index_factory is not None:
                kw["index"] = kw["index"].after_crash()
            vol = Volume(root, io=s3, **kw)
            try:
                if vol.read(probe) != data:
                    v.append(Violation("1-acked-readable", "post-recovery publish read back wrong"))
            except WalpubError as exc:
                v.append(Violation("1-acked-readable", f"post-recovery publish lost: {type(exc).__name__}"))
            v += check_reads(vol, Expect(dict(expect.must), {**expect.may, probe: data}, expect.gone))
    except WalpubError as exc:
        v.append(Violation("1-acked-readable", f"publish after recovery failed: {exc!r}"))
    return vol, v


def explore(workload: Callable[[SimFileSystem, Tracker], None], *, volume_kwargs: dict | None = None,
            disabled_fsyncs: tuple[str, ...] = (), max_states_per_point: int = 32,
            point_stride: int = 1, idempotence_every: int = 1, continue_every: int = 1,
            recovery_crash_every: int = 0, recovery_crash_points: int = 6,
            stop_after: int | None = None, seed: int = 0,
            index_at: Callable[[int], tuple[object, Callable[[], object]]] | None = None) -> ExploreResult:
    """Run ``workload(sim, tracker)`` on a recording SimFileSystem, then check
    every crash state of every ``point_stride``-th op boundary.

    ``disabled_fsyncs`` plants bugs during the workload only (recovery runs
    correct).  ``stop_after``: stop at that many violations (bug hunts).
    ``index_at(n_ops)``: (version, factory) of the persistent index as a crash
    after op n_ops leaves it (see PersistentIndexTwin); default: memory-only
    "flat".  ``version`` (hashable) tells states apart for de-duplication."""
    sim = SimFileSystem()
    sim.disabled_fsyncs = set(disabled_fsyncs)
    tracker = Tracker(sim)
    sim.start_recording()
    workload(sim, tracker)
    sim.recording = False
    res = ExploreResult(points=len(sim.points), fsyncs=dict(sim.fsync_counts))
    digests: set[bytes] = set()
    checked: set = set()
    kw = dict(volume_kwargs or {})
    kw.pop("observer", None)
    k = 0
    for pt in sim.points[::point_stride]:
        expect = tracker.expectations(pt.n_ops)
        ekey = (frozenset(expect.must), frozenset(expect.may), frozenset(expect.gone))
        factory = None
        if index_at is not None:
            version, factory = index_at(pt.n_ops)
            ekey = (ekey, version)
        for st in crash_states(pt, sim.kinds, max_states=max_states_per_point, seed=seed):
            res.states += 1
            dg = st.digest()
            digests.add(dg)
            ck = (dg, ekey)
            if ck in checked:
                continue  # same bytes, same expectations: checked already
            checked.add(ck)
            res.checked += 1
            k += 1
            vs, n = check_state(
                st, expect, volume_kwargs=kw,
                idempotence=(k % idempotence_every == 0),
                continue_after=(continue_every > 0 and k % continue_every == 0),
                recovery_crashes=(recovery_crash_points if recovery_crash_every and k % recovery_crash_every == 0 else 0),
                seed=seed, index_factory=factory,
            )
            res.recovery_crash_states += n
            for x in vs:
                x.n_ops, x.desc = pt.n_ops, pt.desc
            res.violations += vs
            if stop_after is not None and len(res.violations) >= stop_after:
                res.distinct = len(digests)
                return res
    res.distinct = len(digests)
    return res


def explore_kill(workload: Callable[[SimFileSystem, Tracker], None], *, volume_kwargs: dict | None = None,
                 kill_stride: int = 1, max_states_per_point: int = 16,
                 next_disabled_fsyncs: tuple[str, ...] = (), seed: int = 0, kill_from: int = 0,
                 root: str = ROOT_PATH, stop_after: int | None = None) -> ExploreResult:
    """SIGKILL, then power loss: kill the workload after op n (for every
    ``kill_stride``-th n), run the next process on the surviving page cache
    (recovery + one publish), then cut the power at every op of that second
    process.  Catches a recovery that builds on what the dead process left
    un-fsynced.  ``next_disabled_fsyncs`` plants bugs in the second process."""
    from quiver.walpub.volume import Volume

    kw = dict(volume_kwargs or {})
    kw.pop("observer", None)
    probe, pdata = b"\xfd" * 32, b"second process"
    # Count the workload's ops once.
    base = SimFileSystem()
    workload(base, Tracker(base))
    res = ExploreResult()
    checked: set = set()
    for n in range(kill_from, base.n_ops, kill_stride):
        a = SimFileSystem()
        a.kill_at = n
        tr = Tracker(a)
        try:
            workload(a, tr)
        except SimulatedKill:
            pass
        b = a.clone()
        b.disabled_fsyncs = set(next_disabled_fsyncs)
        b.start_recording()
        acked_before = tr.expectations(a.n_ops)
        try:
            vol = Volume(root, io=b, **kw)
            b.mark(("pub_begin", probe))
            vol.publish(probe, pdata)
            b.mark(("pub_ack", probe))
            vol.close()
        except WalpubError as exc:
            res.violations.append(Violation("5-recovery", f"second process failed: {exc!r}", n, "kill"))
            continue
        b.recording = False
        res.points += len(b.points)
        acked_probe_at = next(pos for pos, ev in b.marks if ev == ("pub_ack", probe))
        for pt in b.points:
            must = dict(acked_before.must)
            may = dict(acked_before.may)
            if pt.n_ops >= acked_probe_at:
                must[probe] = pdata
            else:
                may[probe] = pdata
            expect = Expect(must, may, set(acked_before.gone))
            for st in crash_states(pt, b.kinds, max_states=max_states_per_point, seed=seed):
                res.states += 1
                key = (st.digest(), frozenset(must), frozenset(may))
                if key in checked:
                    continue
                checked.add(key)
                res.checked += 1
                vs, _ = check_state(st, expect, volume_kwargs=kw, idempotence=False,
                                    continue_after=False, root=root)
                for x in vs:
                    x.n_ops, x.desc = n, f"killed after op {n}; power lost at op {pt.n_ops} ({pt.desc})"
                res.violations += vs
                if stop_after is not None and len(res.violations) >= stop_after:
                    res.distinct = len({c[0] for c in checked})
                    return res
    res.distinct = len({c[0] for c in checked})
    return res
