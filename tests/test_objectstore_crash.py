"""Crash suite for the local-directory L2 (tier.objectstore.LocalDirObjectStore).

The store's file calls go through walpub's I/O layer, so a workload (puts into
new and shared shard directories, a duplicate put, manifests, a delete, a
manifest compaction) is recorded on the crash-simulating SimFileSystem, and
every power-loss state of every recorded point is reopened and checked against
the module's promises:

* acked:     every object whose ``put`` returned (and no delete begun) is
             readable byte-exact, verified by its CRC32C trailer; head and a
             ranged read agree;
* no-torn:   no object is ever served torn or wrong (an in-flight one is absent
             or exact), and no read finds a damaged file under a final name;
* deleted:   a key whose ``delete`` returned stays deleted;
* manifests: ``read_manifests`` never meets a torn manifest, includes every key
             of every acknowledged ``write_manifest``, and lists only keys whose
             object exists (or whose delete has begun: a manifest is a hint);
* listing:   ``list_keys`` holds only keys that were put.

Planted bugs: each "l2_*" fsync disabled in turn during the workload must make
the check fail for at least one state.  A kill-then-power-loss campaign covers
a second writer that finds a shard directory or an object another (killed)
writer left in the page cache only.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

from quiver.tier.errors import ObjectCorruptError
from quiver.tier.objectstore import MANIFESTS_DIR, LocalDirObjectStore, object_name
from quiver.walpub.crash_states import crash_states
from quiver.walpub.io import FSYNC_LABELS
from quiver.walpub.simfs import SimFileSystem, SimulatedKill

ROOT = "/l2"
LABELS = ("l2_layout", "l2_object", "l2_parent", "l2_dir", "l2_manifest", "l2_manifest_dir", "l2_delete")


def K(shard: int, i: int) -> bytes:
    """A 32-byte key in shard directory blocks/<shard:02x>/ (object names are
    sharded on the key's last byte: tier.objectstore.object_name)."""
    return bytes([i]) + bytes(30) + bytes([shard])


def D(key: bytes) -> bytes:
    return b"block-" + key[:2].hex().encode() * 20  # 86 bytes: torn variants apply


A, B, C, E, F = K(0x11, 1), K(0x11, 2), K(0x33, 1), K(0x44, 1), K(0x11, 3)


class Rec:
    def __init__(self, sim: SimFileSystem):
        self.sim = sim
        self.put_keys: set[bytes] = set()

    def put(self, s: LocalDirObjectStore, key: bytes) -> bool:
        self.put_keys.add(key)
        self.sim.mark(("put_begin", (key,)))
        created = s.put(key, D(key))
        self.sim.mark(("put_ack", (key,)))
        return created

    def delete(self, s: LocalDirObjectStore, key: bytes) -> None:
        self.sim.mark(("del_begin", (key,)))
        s.delete(key)
        self.sim.mark(("del_ack", (key,)))

    def manifest(self, s: LocalDirObjectStore, keys: list[bytes]) -> None:
        s.write_manifest(keys)
        self.sim.mark(("manifest_ack", tuple(keys)))

    def expect(self, n_ops: int) -> tuple[set, set, set, set, set]:
        """(acked, in flight, deleted, delete begun at some time, manifest keys acked)."""
        state: dict[bytes, str] = {}
        del_begun: set[bytes] = set()
        manifest: set[bytes] = set()
        for pos, (ev, keys) in self.sim.marks:
            if pos > n_ops:
                break
            for k in keys:
                if ev == "put_begin":
                    state[k] = "acked" if state.get(k) == "acked" else "pub"
                elif ev == "put_ack":
                    state[k] = "acked"
                elif ev == "del_begin":
                    state[k] = "del"
                    del_begun.add(k)
                elif ev == "del_ack":
                    state[k] = "deleted"
                else:
                    manifest.add(k)
        acked = {k for k, s in state.items() if s == "acked"}
        may = {k for k, s in state.items() if s in ("pub", "del")}
        gone = {k for k, s in state.items() if s == "deleted"}
        return acked, may, gone, del_begun, manifest


def workload(sim: SimFileSystem, rec: Rec) -> None:
    s = LocalDirObjectStore(ROOT, io=sim)      # creates the layout
    assert rec.put(s, A) is True               # new shard blocks/11/
    assert rec.put(s, B) is True               # same shard
    assert rec.put(s, C) is True               # another new shard
    assert rec.put(s, A) is False              # duplicate: first writer won
    rec.manifest(s, [A, B, C])
    assert rec.put(s, E) is True
    rec.delete(s, B)
    rec.manifest(s, [E])
    s.compact_manifests()                      # merge two, delete the merged
    assert rec.put(s, F) is True               # blocks/11/ again, after the delete
    s.close()


def record(disabled: tuple[str, ...] = ()) -> tuple[SimFileSystem, Rec]:
    sim = SimFileSystem()
    sim.disabled_fsyncs = set(disabled)
    rec = Rec(sim)
    sim.start_recording()
    workload(sim, rec)
    sim.recording = False
    return sim, rec


def check_state(st, acked, may, gone, del_begun, manifest, put_keys) -> list[str]:
    sim = SimFileSystem(st)
    try:
        s = LocalDirObjectStore(ROOT, io=sim)
    except Exception as exc:  # noqa: BLE001 - any failure to open is the finding
        return [f"open: raised {exc!r}"]
    v = []
    # Manifests first: a torn one found by a block read would be removed before.
    try:
        listed = s.read_manifests()
    except Exception as exc:  # noqa: BLE001
        v.append(f"manifests: read_manifests raised {type(exc).__name__}")
        listed = None
    for key in sorted(put_keys):
        try:
            got = s.get(key)
        except ObjectCorruptError:
            v.append("no-torn: a damaged file under a final name")
            continue
        if got is not None and got != D(key):
            v.append("no-torn: wrong bytes served")
        if key in acked:
            if got is None:
                v.append("acked: an acknowledged object is missing")
            elif s.head(key) != len(D(key)) or s.get_range(key, 3, 40) != D(key)[3:43]:
                v.append("acked: head or ranged read disagrees")
        elif key in gone and got is not None:
            v.append("deleted: an acknowledged delete came back")
        elif key not in may and key not in acked and got is not None:
            v.append("no-torn: an object never put is present")
    if listed is not None:
        if not manifest <= listed:
            v.append("manifests: keys of an acknowledged manifest are missing")
        for key in listed - del_begun:
            if key not in put_keys or s.head(key) is None:
                v.append("manifests: lists an object that does not exist")
                break
    if not set(s.list_keys()) <= put_keys:
        v.append("listing: a key never put")
    s.close()
    return v


def run_campaign(sim: SimFileSystem, rec: Rec, max_states: int = 48) -> dict:
    out = {"points": len(sim.points), "states": 0, "bad_states": 0, "why": Counter()}
    for pt in sim.points:
        exp = rec.expect(pt.n_ops)
        for st in crash_states(pt, sim.kinds, max_states=max_states):
            out["states"] += 1
            v = check_state(st, *exp, rec.put_keys)
            if v:
                out["bad_states"] += 1
                out["why"].update(x.split(":")[0] for x in v)
    return out


def test_labels_are_registered():
    assert set(LABELS) <= set(FSYNC_LABELS)


def test_every_crash_state_keeps_the_promises():
    sim, rec = record()
    assert all(sim.fsync_counts[label] > 0 for label in LABELS), sim.fsync_counts
    r = run_campaign(sim, rec)
    print(f"\nlocal L2 crash campaign: {r['points']} points, {r['states']} states, fsyncs {dict(sim.fsync_counts)}")
    assert r["points"] > 60 and r["states"] > 500, r
    assert r["bad_states"] == 0, r


# What each planted bug must break (besides failing at least one state).
PLANTED = {
    "l2_layout": "acked",        # blocks/ (with everything in it) can vanish
    "l2_object": "no-torn",      # the link outlives the data: a torn file under its final name
    "l2_parent": "acked",        # blocks/11/ (and its objects) can vanish
    "l2_dir": "acked",           # the link itself can vanish after put returned
    "l2_manifest": "manifests",  # a torn manifest under its final name
    "l2_manifest_dir": "manifests",  # an acknowledged manifest can vanish
    "l2_delete": "deleted",      # an acknowledged delete comes back
}


@pytest.mark.parametrize("label", LABELS)
def test_planted_bug_each_l2_fsync_is_load_bearing(label):
    sim, rec = record(disabled=(label,))
    assert sim.skipped_fsyncs[label] > 0
    r = run_campaign(sim, rec)
    print(f"\nplanted bug {label}: {r['bad_states']} of {r['states']} crash states fail: {dict(r['why'])}")
    assert r["bad_states"] > 0, r
    assert PLANTED[label] in r["why"], r


@pytest.mark.parametrize("old_rule", [False, True])
def test_kill_then_power_loss_second_writer(old_rule):
    """Writer 1 creates the store, publishes X into a new shard and is killed at
    every op: the root, the shard directory, or X itself may exist in the page
    cache only.  Writer 2 (a new process on that page cache) then opens the
    store and publishes X (a duplicate, maybe) and Y into the same shard.  A
    power loss at any op after writer 2's puts returned must keep both (so open
    fsyncs the root's parent even when the root exists, and a writer's first
    use of a shard directory fsyncs blocks/ even when the directory exists).
    ``old_rule``: skip blocks/'s fsync when the shard directory exists (the
    rule before this suite) -- loses acknowledged objects."""
    X, Y = K(0x55, 1), K(0x55, 2)

    def first(sim):
        LocalDirObjectStore(ROOT, io=sim).put(X, D(X))

    base = SimFileSystem()
    first(base)
    states = bad = 0
    for n in range(base.n_ops + 1):
        a = SimFileSystem()
        a.kill_at = n
        try:
            first(a)
        except SimulatedKill:
            pass
        b = a.clone()
        b.start_recording()
        s = LocalDirObjectStore(ROOT, io=b)
        if old_rule and b.isdir(f"{ROOT}/blocks/55"):
            s._durable_dirs.add(f"{ROOT}/blocks/55")
        s.put(X, D(X))
        s.put(Y, D(Y))
        acked_at = b.n_ops
        s.close()
        b.recording = False
        for pt in b.points:
            if pt.n_ops < acked_at:
                continue
            for st in crash_states(pt, b.kinds, max_states=48):
                states += 1
                bad += bool(check_state(st, {X, Y}, set(), set(), set(), set(), {X, Y}))
    print(f"\nkill then power loss (old_rule={old_rule}): {bad} of {states} states lose an acknowledged object")
    assert states >= 5
    if old_rule:
        assert bad > 0
    else:
        assert bad == 0, f"{bad} of {states} states lost an acknowledged object"


def test_real_and_simulated_file_systems_write_the_same_store(tmp_path):
    sim = SimFileSystem()
    real = tmp_path / "l2"
    for s in (LocalDirObjectStore(ROOT, io=sim), LocalDirObjectStore(real)):
        assert s.put(A, D(A)) and s.put(C, D(C)) and not s.put(A, D(A))
        s.write_manifest([A, C])
        assert s.get(A) == D(A) and s.get_range(C, 5, 10) == D(C)[5:15] and s.head(C) == len(D(C))
        assert sorted(s.list_keys()) == [A, C] and s.read_manifests() == {A, C}
        s.close()
    for key in (A, C):
        assert sim.read_file(f"{ROOT}/{object_name(key)}") == (real / object_name(key)).read_bytes()
    assert sim.listdir(f"{ROOT}/tmp") == os.listdir(real / "tmp") == []
    assert len(sim.listdir(f"{ROOT}/{MANIFESTS_DIR}")) == len(os.listdir(real / MANIFESTS_DIR)) == 1


def test_link_in_both_file_systems(tmp_path):
    """FileSystem.link: a second name for the same file, never replacing; in the
    simulator the new entry is pending in its directory until that directory is
    fsynced, and points at the inode's durable data."""
    from quiver.walpub.io import OsFileSystem

    osfs = OsFileSystem()
    fd = osfs.create(str(tmp_path / "a"))
    osfs.write(fd, b"data")
    osfs.close(fd)
    osfs.link(str(tmp_path / "a"), str(tmp_path / "b"))
    assert (tmp_path / "b").read_bytes() == b"data"
    with pytest.raises(FileExistsError):
        osfs.link(str(tmp_path / "a"), str(tmp_path / "b"))

    sim = SimFileSystem()
    sim.mkdir("/d")
    sim.mkdir("/e")
    sim.fsync_dir("/", "l2_layout")
    fd = sim.create("/d/a")
    sim.write(fd, b"data")
    sim.fsync(fd, "l2_object")
    sim.close(fd)
    sim.fsync_dir("/d", "l2_dir")
    sim.start_recording()
    sim.link("/d/a", "/e/b")
    with pytest.raises(FileExistsError):
        sim.link("/d/a", "/e/b")
    with pytest.raises(FileNotFoundError):
        sim.link("/d/missing", "/e/c")
    sim.unlink("/d/a")
    assert sim.read_file("/e/b") == b"data" and not sim.exists("/d/a")
    seen = {tuple(st.files) for st in crash_states(sim.points[-1], sim.kinds)}
    # Each of the two pending entries (link in /e, unlink in /d) persists or not.
    assert seen == {
        (("/d/a", b"data"),),
        (("/d/a", b"data"), ("/e/b", b"data")),
        (("/e/b", b"data"),),
        (),
    }
    sim.fsync_dir("/e", "l2_dir")
    assert all(("/e/b", b"data") in st.files for st in crash_states(sim.points[-1], sim.kinds))
