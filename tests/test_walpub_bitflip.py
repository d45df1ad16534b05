"""Bit flips in a real walpub volume (media errors the crash model leaves out).

Single-bit flips in objects (one per object of a copied pristine volume) and in
WAL segments (one per copy); every flip is classified and no read may ever
return wrong bytes (invariant 2).  Object flips must be a dropped record at
recovery (verify="crc") or a CorruptObjectError on read (verify="size"); a WAL
flip must cut the log exactly at the frame holding it.  The study runs >= 10,000
flips (studies/bench_walpub.py); this file runs a few hundred.
"""

from __future__ import annotations

import quiver.walpub.volume

from quiver import walpub
from quiver.studies import walpub_campaign as wc


def test_object_flips_are_always_detected(tmp_path):
    st = wc.object_flip_batches(str(tmp_path), 2, 60, seed=5)
    assert not st.violations, "\n".join(st.violations[:10])
    assert st.object_flips == st.flips == 120
    assert st.object_detected_at_recovery == 60 and st.object_detected_at_read == 60
    assert st.wrong_bytes_served == 0 and st.undetected_no_effect == 0


def test_wal_flips_cost_only_the_flipped_frame(tmp_path):
    """Finding 5 (issue 13): one flipped bit used to cut the log at its frame and
    drop every later record (588 flips cost 5,615 blocks).  Replay now skips the
    damaged frame and goes on: a flip costs at most the one record it hit."""
    st = wc.wal_flips(str(tmp_path), 40, seed=5)
    assert not st.violations, "\n".join(st.violations[:10])
    assert st.wal_flips == 40 and st.wal_cut_lost_records + st.wal_cut_no_loss == 40
    assert st.wal_cut_lost_records > 0 and st.acked_blocks_lost > 0   # detected, not hidden
    assert st.max_blocks_lost_per_flip == 1
    assert st.wrong_bytes_served == 0 and st.undetected_no_effect == 0


def test_campaign_catches_a_checksum_blind_volume(tmp_path, monkeypatch):
    """Planted bug: walpub's CRC32C replaced by a constant.  The flips then go
    unnoticed and the campaign must report wrong bytes served."""
    monkeypatch.setattr(walpub.volume, "crc32c", lambda data, value=0: 0)
    st = wc.object_flip_batches(str(tmp_path), 2, 20, seed=6)
    # Every read of a flipped object returns its wrong bytes: 20 in the verify="crc"
    # batch (nothing dropped), 2 x 20 in the verify="size" one (read twice).
    assert st.wrong_bytes_served == 60
    assert st.object_detected_at_recovery == 0 and st.object_detected_at_read == 0
    assert len(st.violations) >= 40
