"""Report section of the codecs on model KV and int8's error inside the model
(studies/bench_kv_codecs.py, group ``kv-codecs``)."""

from __future__ import annotations

from .report_common import (DASH, _absent, _div, _ex, _is_num, _limit, _mb, _section_head, _txt, _x, fmt,
                            reproduce_line, table)

GROUPS = ["kv-codecs"]


def kv_codecs_section(mode: str, benches: list[dict], groups: dict) -> list[str]:
    lines = _section_head("kv-codecs", "Codecs on model KV, and int8's error in the model (group `kv-codecs`)")
    codecs = [b for b in benches if "codec" in _ex(b)]
    model = next((_ex(b) for b in benches if "exact_perplexity" in _ex(b)), None)
    crc = _limit(groups, "test_crc32c")
    if codecs:
        e0 = _ex(codecs[0])
        rows = []
        for b in codecs:
            e = _ex(b)
            name = f"{e.get('codec')}{'+shuffle' if e.get('shuffle') else ''}"
            rows.append([name, "lossy" if e.get("lossy") else "lossless", _x(e.get("ratio")),
                         fmt(e.get("encode_mb_per_s")), fmt(e.get("decode_mb_per_s")), fmt(e.get("blocks"), "int"),
                         fmt(e.get("payload_bytes"), "mib")])
        pub = e0.get("published_reference") or {}
        if pub:
            rows.append([f"{pub.get('codec', DASH)} — published, not measured here", "lossless",
                         f"×{pub.get('ratio_low', DASH)}–{pub.get('ratio_high', DASH)}", DASH, DASH, DASH, DASH])
        lines += [
            f"KV source: {_txt(e0.get('kv_source'))}; blocks {fmt(e0.get('block_shape'))} {fmt(e0.get('dtype'))}. "
            "Random weights, not trained: no outlier channels, so the ratios are this model's, not a promise. "
            f"Ratio = raw / envelope bytes. CRC32C in this run: {fmt(_mb(crc))} MB/s (no envelope codes faster than "
            f"its checksum). Published row: {_txt(pub.get('source'))}.", "",
        ]
        lines += table(["codec", "kind", "ratio", "encode MB/s", "decode MB/s", "blocks", "MiB"], rows)
        lz4 = next((_ex(b).get("ratio") for b in codecs if _ex(b).get("codec") == "lz4" and not _ex(b).get("shuffle")), None)
        if pub and _is_num(lz4) and _is_num(pub.get("ratio_low")):
            lines += [f"LZ4 here: ×{lz4:.2f}, against the published ×{pub['ratio_low']}–{pub.get('ratio_high')} "
                      f"({_x(_div(lz4, pub['ratio_low']))} of the published low end).", ""]
    if model is not None:
        rows = []
        for name in ("int8", "float16"):
            rows.append([name if name == "int8" else "float16 rounding (yardstick)",
                         fmt(model.get(f"logit_max_abs_diff_{name}")), fmt(model.get(f"logit_max_abs_{name}")),
                         fmt(model.get(f"teacher_forced_argmax_agreement_{name}"), "pct"),
                         fmt(model.get(f"greedy_agreement_{name}"), "pct"),
                         fmt(model.get(f"greedy_first_divergence_{name}"), "int"),
                         fmt(model.get(f"perplexity_{name}")), fmt(model.get(f"perplexity_delta_{name}"))])
        m = model.get("model") or {}
        lines += [
            "### int8 inside the model", "",
            f"Prefix of {fmt(m.get('prefix'), 'int')} tokens restored from int8 blocks vs the exact float32 KV, "
            f"same model ({fmt(m.get('layers'), 'int')} layers): {fmt(model.get('continuation_tokens'), 'int')}-token "
            f"teacher-forced continuation, {fmt(model.get('greedy_steps'), 'int')} greedy steps. Exact perplexity "
            f"{fmt(model.get('exact_perplexity'))}; max |KV error| {fmt(model.get('kv_max_abs_error'))}. "
            f"{_txt(model.get('note'))}.", "",
        ]
        lines += table(["KV", "max |logit Δ|", "max |logit|", "teacher-forced argmax agreement", "greedy agreement",
                        "first greedy divergence", "perplexity", "Δ perplexity"], rows)
    return lines + [reproduce_line(mode, benches), ""]


def section(mode: str, groups: dict, plots, q: dict) -> list[str]:
    return kv_codecs_section(mode, groups["kv-codecs"], groups)


def headline_rows(groups: dict, available: list[str]) -> list[list[str]]:
    kv = [_ex(b) for b in groups.get("kv-codecs", []) if "codec" in _ex(b)]
    if not kv:
        return [["Compression ratio on model KV", _absent("kv-codecs"), DASH, "[kv-codecs](#kv-codecs)"]]
    parts = [f"{e.get('codec')}{'+shuffle' if e.get('shuffle') else ''} {_x(e.get('ratio'))}"
             for e in kv if e.get("codec") != "none"]
    pub = kv[0].get("published_reference") or {}
    return [["Compression ratio on model KV", "; ".join(parts),
             f"published ds4 LZ4 ×{pub.get('ratio_low', DASH)}–{pub.get('ratio_high', DASH)} (not measured here)",
             "[kv-codecs](#kv-codecs)"]]
