"""The segmented write-ahead log: frame format, records, writer, replay, compaction.

Frame (little-endian)::

    u32 length   bytes of payload (0 .. MAX_PAYLOAD)
    u32 crc      CRC32C over type byte + payload
    u8  type     PUT=1, DELETE=2, RESET=3
    payload

Records (payloads)::

    PUT     u64 seq, u64 length, u32 crc32c, u16 key_len, key   object is durable
    DELETE  u64 seq, u16 key_len, key                           object is dead
    RESET   u64 base_seq      first frame of a compacted segment: forget all
                              state replayed so far, the PUTs that follow are
                              the whole live set as of base_seq

Segments are ``wal/<id>.log`` with ``<id>`` a 16-digit decimal, replayed in id
order.  A frame that is torn, oversized, of unknown type, fails its CRC, is
malformed, or goes backwards in seq ends a valid run.  If a valid frame follows
in the segment, the bad bytes are a damaged region: skipped (``resync``), and
only the records in it are lost.  If nothing valid follows, it is the torn
tail: the segment is truncated there (and fsynced), so that new appends never
land behind garbage (where a later replay would never reach them).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Iterator

from quiver.walpub.checksum import crc32c
from quiver.walpub.io import FileSystem

T_PUT = 1
T_DELETE = 2
T_RESET = 3

HEADER = struct.Struct("<IIB")
PUT_FIXED = struct.Struct("<QQIH")
DEL_FIXED = struct.Struct("<QH")
RESET_FIXED = struct.Struct("<Q")
MAX_KEY_BYTES = 120            # hex name + ".blk" stays under NAME_MAX (255)
MAX_PAYLOAD = PUT_FIXED.size + MAX_KEY_BYTES
SEGMENT_RE = re.compile(r"^(\d{16})\.log$")


@dataclass(frozen=True)
class PutRecord:
    seq: int
    key: bytes
    length: int
    crc: int


@dataclass(frozen=True)
class DeleteRecord:
    seq: int
    key: bytes


@dataclass(frozen=True)
class ResetRecord:
    seq: int  # the base seq: state as of this seq follows


Record = PutRecord | DeleteRecord | ResetRecord


def encode(rec: Record) -> bytes:
    """One frame holding ``rec``."""
    if isinstance(rec, PutRecord):
        assert 0 < len(rec.key) <= MAX_KEY_BYTES and rec.seq > 0
        typ, payload = T_PUT, PUT_FIXED.pack(rec.seq, rec.length, rec.crc, len(rec.key)) + rec.key
    elif isinstance(rec, DeleteRecord):
        assert 0 < len(rec.key) <= MAX_KEY_BYTES and rec.seq > 0
        typ, payload = T_DELETE, DEL_FIXED.pack(rec.seq, len(rec.key)) + rec.key
    else:
        assert isinstance(rec, ResetRecord)
        typ, payload = T_RESET, RESET_FIXED.pack(rec.seq)
    assert len(payload) <= MAX_PAYLOAD
    body = bytes([typ]) + payload
    return struct.pack("<II", len(payload), crc32c(body)) + body


def _decode_payload(typ: int, p: bytes) -> Record | None:
    """The record in a CRC-valid frame, or None when it is malformed."""
    if typ == T_PUT and len(p) >= PUT_FIXED.size:
        seq, length, crc, klen = PUT_FIXED.unpack_from(p)
        key = p[PUT_FIXED.size:]
        if len(key) == klen and 0 < klen <= MAX_KEY_BYTES and seq > 0:
            return PutRecord(seq, key, length, crc)
    elif typ == T_DELETE and len(p) >= DEL_FIXED.size:
        seq, klen = DEL_FIXED.unpack_from(p)
        key = p[DEL_FIXED.size:]
        if len(key) == klen and 0 < klen <= MAX_KEY_BYTES and seq > 0:
            return DeleteRecord(seq, key)
    elif typ == T_RESET and len(p) == RESET_FIXED.size:
        return ResetRecord(RESET_FIXED.unpack(p)[0])
    return None


def iter_frames(buf: bytes, pos: int = 0, prev_seq: int = 0) -> Iterator[Record]:
    """Yield the records of a segment from ``pos`` one at a time; the generator's
    return value is (end of the valid run, why it stopped or None)."""
    end = len(buf)
    while pos < end:  # bounded: pos grows by >= HEADER.size per iteration
        if end - pos < HEADER.size:
            return pos, "torn header"
        length, crc, typ = HEADER.unpack_from(buf, pos)
        if length > MAX_PAYLOAD:
            return pos, "oversized frame"
        if end - pos - HEADER.size < length:
            return pos, "torn payload"
        body = buf[pos + 8 : pos + HEADER.size + length]
        if crc32c(body) != crc:
            return pos, "bad crc"
        rec = _decode_payload(typ, body[1:])
        if rec is None:
            return pos, "malformed record"
        if not isinstance(rec, ResetRecord):
            if rec.seq <= prev_seq:
                return pos, "seq went backwards"
            prev_seq = rec.seq
        yield rec
        pos += HEADER.size + length
    assert pos == end
    return pos, None


def decode_frames(buf: bytes) -> tuple[list[Record], int, str | None]:
    """Parse a segment: (records, end of the valid prefix, why it stopped or None)."""
    out: list[Record] = []
    frames = iter_frames(buf)
    while True:
        try:
            out.append(next(frames))
        except StopIteration as stop:
            valid, why = stop.value
            return out, valid, why


def resync(buf: bytes, start: int, prev_seq: int) -> int | None:
    """The first offset past ``start`` where a whole, CRC-valid, well-formed frame
    with a seq above ``prev_seq`` begins, or None.  As LevelDB's log reader skips
    a damaged block and goes on, replay skips a damaged region: one bad byte
    costs the records of the frames it hits, not the rest of the log.  A torn
    tail (nothing valid after it) is still cut.  O(bytes) with cheap checks
    first; runs only when a frame is bad."""
    end = len(buf)
    for q in range(start + 1, end - HEADER.size + 1):
        typ = buf[q + 8]
        if typ not in (T_PUT, T_DELETE, T_RESET):
            continue
        length = int.from_bytes(buf[q:q + 4], "little")
        if length > MAX_PAYLOAD or q + HEADER.size + length > end:
            continue
        body = buf[q + 8:q + HEADER.size + length]
        if crc32c(body) != int.from_bytes(buf[q + 4:q + 8], "little"):
            continue
        rec = _decode_payload(typ, body[1:])
        if rec is not None and (isinstance(rec, ResetRecord) or rec.seq > prev_seq):
            return q
    return None


def scan_segment(buf: bytes) -> tuple[list[Record], int, str | None, list[tuple[int, int, str]]]:
    """(records, end of the last valid run, why that run stopped or None,
    damaged regions skipped as (start, end, why)).  A bad frame followed by a
    valid one is a damaged region, skipped; one followed by nothing valid is
    the torn tail, where the caller cuts the segment."""
    out: list[Record] = []
    damaged: list[tuple[int, int, str]] = []
    pos, prev = 0, 0
    while True:
        frames = iter_frames(buf, pos, prev)
        while True:
            try:
                rec = next(frames)
            except StopIteration as stop:
                valid, why = stop.value
                break
            out.append(rec)
            if not isinstance(rec, ResetRecord):
                prev = rec.seq
        if why is None:
            return out, valid, None, damaged
        nxt = resync(buf, valid, prev)
        if nxt is None:
            return out, valid, why, damaged
        damaged.append((valid, nxt, why))
        pos = nxt


def segment_name(seg_id: int) -> str:
    assert 0 < seg_id < 10**16
    return f"{seg_id:016d}.log"


def list_segments(io: FileSystem, wal_dir: str) -> tuple[list[int], list[str]]:
    """(segment ids in order, names in wal/ that are not segments)."""
    ids, junk = [], []
    for name in io.listdir(wal_dir):
        m = SEGMENT_RE.match(name)
        if m and int(m.group(1)) > 0:
            ids.append(int(m.group(1)))
        else:
            junk.append(name)
    return sorted(ids), sorted(junk)


@dataclass
class ReplayResult:
    """What replaying the WAL found (and, with truncation, repaired)."""

    live: dict[bytes, PutRecord] = field(default_factory=dict)  # in seq order (of the segments read)
    last_seq: int = 0
    reset_base: int = 0          # base seq of the last RESET (0: none)
    records: int = 0             # frames read since (and including) the last RESET
    tail: list[Record] = field(default_factory=list)  # PUT/DELETE with seq > since_seq
    segments: list[int] = field(default_factory=list)  # every segment (read or skipped)
    skipped: list[int] = field(default_factory=list)   # segments not read: all their records <= since_seq
    complete: bool = True        # ``live`` is the whole live set (nothing before it was skipped)
    last_segment_size: int = 0
    truncated: list[tuple[int, int, str]] = field(default_factory=list)  # (seg, offset, why)
    discarded_segments: list[int] = field(default_factory=list)
    damaged: list[tuple[int, int, int, str]] = field(default_factory=list)  # (seg, start, end, why) skipped
    deleted: set[bytes] = field(default_factory=set)  # keys whose last record read is a DELETE


def first_record(io: FileSystem, path: str) -> Record | None:
    """The first record of a segment (reads one frame's worth), or None."""
    recs, _, _ = decode_frames(io.read_head(path, HEADER.size + MAX_PAYLOAD))
    return recs[0] if recs else None


def _first_to_read(io: FileSystem, wal_dir: str, ids: list[int], since_seq: int) -> tuple[int, int]:
    """(index of the first segment holding a record past ``since_seq``, base of the
    last RESET).  Segments before the last RESET are superseded; a segment whose
    successor starts at or below since_seq + 1 holds only records <= since_seq.
    Only first frames are read: O(segments), not O(records)."""
    heads = [first_record(io, f"{wal_dir}/{segment_name(i)}") for i in ids]
    start, base = 0, 0
    for i, h in enumerate(heads):
        if isinstance(h, ResetRecord):
            start, base = i, h.seq
    while start + 1 < len(ids) and heads[start + 1] is not None and heads[start + 1].seq <= since_seq + 1:
        start += 1
    return start, base


def replay(io: FileSystem, wal_dir: str, *, since_seq: int = 0, truncate: bool = True,
           tail_only: bool = False) -> ReplayResult:
    """Replay the segments in order; cut the log at its first bad frame.

    ``tail_only``: skip the segments whose records are all <= since_seq (the
    index already holds them), so opening costs the tail, not the log; ``live``
    then covers only what was read (``complete`` says whether that is all).
    ``truncate=False`` is the planted bug "no tail truncation": the bad bytes
    stay and the next append lands behind them."""
    r = ReplayResult()
    ids, _junk = list_segments(io, wal_dir)
    r.segments = list(ids)
    start = 0
    if tail_only and ids:
        start, r.reset_base = _first_to_read(io, wal_dir, ids, since_seq)
        r.skipped = ids[:start]
        r.complete = start == 0 or isinstance(first_record(io, f"{wal_dir}/{segment_name(ids[start])}"),
                                              ResetRecord)
    for i in range(start, len(ids)):
        seg = ids[i]
        path = f"{wal_dir}/{segment_name(seg)}"
        buf = io.read_file(path)
        recs, valid, why, damaged = scan_segment(buf)
        r.damaged += [(seg, a, b, w) for a, b, w in damaged]
        for rec in recs:
            r.records += 1
            if isinstance(rec, ResetRecord):
                r.live.clear()
                r.tail = [t for t in r.tail if t.seq > rec.seq]  # superseded below base
                r.reset_base = rec.seq
                r.records = 1
                r.complete = True
                r.last_seq = max(r.last_seq, rec.seq)
                continue
            if isinstance(rec, PutRecord):
                r.live.pop(rec.key, None)  # keep dict order = seq order
                r.live[rec.key] = rec
                r.deleted.discard(rec.key)
            else:
                r.live.pop(rec.key, None)
                r.deleted.add(rec.key)
            r.last_seq = max(r.last_seq, rec.seq)
            if rec.seq > since_seq:
                r.tail.append(rec)
        r.last_segment_size = valid
        if why is None:
            continue
        r.truncated.append((seg, valid, why))
        if not truncate:
            r.last_segment_size = len(buf)
            break
        fd = io.open_append(path)
        try:
            io.truncate(fd, valid)
            io.fsync(fd, "truncate")
        finally:
            io.close(fd)
        if i == len(ids) - 1:
            break
        # A bad end of a sealed segment is media damage (the protocol fsyncs a
        # segment before the next gets a frame): the later segments are the
        # log's continuation, so they are kept and replayed.
    return r


def iter_put_records(io: FileSystem, wal_dir: str, upto_seq: int) -> Iterator[PutRecord]:
    """PUT records with seq <= ``upto_seq``, oldest first, one segment in memory
    at a time (the disk tier's eviction order for blocks not touched since open)."""
    ids, _ = list_segments(io, wal_dir)
    start = 0
    for i, seg in enumerate(ids):
        if isinstance(first_record(io, f"{wal_dir}/{segment_name(seg)}"), ResetRecord):
            start = i
    for seg in ids[start:]:
        try:
            buf = io.read_file(f"{wal_dir}/{segment_name(seg)}")
        except FileNotFoundError:  # removed by a compaction meanwhile
            return
        for rec in iter_frames(buf):
            if rec.seq > upto_seq and not isinstance(rec, ResetRecord):
                return
            if isinstance(rec, PutRecord):
                yield rec


class WalWriter:
    """Appends frames to the active segment; rotates at ``segment_bytes``.

    Not thread-safe: the Volume's group commit lets one leader at a time in."""

    def __init__(self, io: FileSystem, wal_dir: str, segment_bytes: int, last_id: int, last_size: int):
        assert segment_bytes >= 128
        self.io, self.wal_dir, self.segment_bytes = io, wal_dir, segment_bytes
        self.active_id = last_id            # 0: none yet
        self.active_size = last_size
        self._fd: int | None = None
        self.rotations = 0
        # Reuse the last segment if it has room (recovery truncated it clean).
        if last_id and last_size < segment_bytes:
            self._fd = io.open_append(f"{wal_dir}/{segment_name(last_id)}")

    def append(self, data: bytes) -> None:
        """Write ``data`` (whole frames) to one segment and fsync it."""
        assert data
        if self._fd is None or (self.active_size > 0 and self.active_size + len(data) > self.segment_bytes):
            self._rotate()
        assert self._fd is not None
        self.io.write(self._fd, data)
        self.active_size += len(data)
        self.io.fsync(self._fd, "wal")

    def _rotate(self) -> None:
        if self._fd is not None:
            self.io.close(self._fd)  # already fsynced by the append that filled it
            self._fd = None
        new_id = self.active_id + 1
        fd = self.io.create(f"{self.wal_dir}/{segment_name(new_id)}")
        self.active_id, self.active_size, self._fd = new_id, 0, fd
        # The segment's name must be durable before a frame in it is acknowledged.
        self.io.fsync_dir(self.wal_dir, "wal_dir")
        self.rotations += 1

    def seal(self) -> None:
        """Close the active segment; the next append starts a new one."""
        if self._fd is not None:
            self.io.close(self._fd)
            self._fd = None
        self.active_size = self.segment_bytes  # forces rotation

    def close(self) -> None:
        if self._fd is not None:
            self.io.close(self._fd)
            self._fd = None


def compact(io: FileSystem, wal_dir: str, tmp_dir: str, seg_id: int, base_seq: int,
            live: list[PutRecord]) -> None:
    """Replace segments 1..seg_id by one segment ``seg_id`` holding RESET + live PUTs.

    Order (each step safe to crash after, see docs/WALPUB.md):
    write tmp/compact-<id>.tmp, fsync it; rename it over wal/<id>.log, fsync wal/;
    only then unlink the older segments (their loss no longer matters: the RESET
    frame makes replay forget whatever they held)."""
    assert seg_id > 0 and all(r.seq <= base_seq for r in live)
    tmp = f"{tmp_dir}/compact-{seg_id:016d}.tmp"
    if io.exists(tmp):
        io.unlink(tmp)
    frames = [encode(ResetRecord(base_seq))]
    frames += [encode(r) for r in sorted(live, key=lambda r: r.seq)]
    fd = io.create(tmp)
    try:
        io.write(fd, b"".join(frames))
        io.fsync(fd, "compact_file")
    finally:
        io.close(fd)
    io.rename(tmp, f"{wal_dir}/{segment_name(seg_id)}")
    io.fsync_dir(wal_dir, "compact_dir")
    ids, _ = list_segments(io, wal_dir)
    for old in ids:
        if old < seg_id:
            io.unlink(f"{wal_dir}/{segment_name(old)}")


__all__ = [
    "PutRecord", "DeleteRecord", "ResetRecord", "Record", "encode", "decode_frames",
    "replay", "ReplayResult", "first_record", "iter_put_records", "WalWriter", "compact", "list_segments", "segment_name",
    "MAX_KEY_BYTES",
]
