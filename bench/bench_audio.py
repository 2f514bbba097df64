"""Audio feature throughput: log-mel and HuBERT on real speech (eng.wav, 60 s at 16 kHz).

Measured (median of ``--runs`` after one warm-up run, which also pays librosa/numba JIT and model
loading):

- ``x_realtime``: seconds of audio processed per second of wall time, batch ``extract_features``;
- ``stream_x_rt``: the same for ``StreamingFeatureExtractor`` fed 40 ms chunks (real-time service);
- ``lookahead_ms``: audio the streaming extractor needs after a frame's centre before it is final;
- ``chunk_err``: HuBERT only, mean / max |chunked - single pass| with 30 s blocks and the default
  5 s context (global attention makes block processing approximate; see avatar/audio/features.py);
- ``peak_rss_mb``: peak resident memory of this process after the row.

HuBERT runs either a local checkpoint (``--hubert DIR``, e.g. hubert-large-ls960-ft saved with
``save_pretrained``) or, without one, a tiny randomly initialised config (2 layers, 32-d) that only
measures the pipeline overhead, not HuBERT-large's cost.

Usage::

    python -m avatar_bench.bench_audio [--seconds 60] [--runs 3] [--hubert DIR]

Prints a table and appends it to ``bench/RESULTS.md`` (machine, git commit, date).
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from avatar_bench.common import append_results, markdown_table
from avatar_bench.common import commit as _commit
from avatar_bench.common import machine as _machine

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("AVATAR_TEST_DATA", ROOT.parent / "shared" / "data"))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _tiny_hubert(path: Path) -> Path:
    import torch
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    cfg = HubertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    HubertModel(cfg).save_pretrained(path)
    return path


def _timed(fn, runs: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def _stream(extractor, wav: np.ndarray, chunk: int = 640) -> np.ndarray:
    extractor.reset()
    outs = [extractor.push(wav[i : i + chunk]) for i in range(0, len(wav), chunk)]
    outs.append(extractor.flush())
    return np.concatenate(outs)


def main(argv: list[str] | None = None) -> int:
    from avatar.audio import (
        FeatureExtractor,
        StreamingFeatureExtractor,
        extract_features,
    )
    from avatar.media import load_audio

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="seconds of eng.wav to process")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per row (median reported)")
    ap.add_argument("--hubert", type=Path, default=None, help="local HuBERT checkpoint dir (default: tiny random)")
    args = ap.parse_args(argv)

    wav = load_audio(DATA / "audio" / "eng.wav")[: int(args.seconds * 16000)]
    dur = len(wav) / 16000
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hubert = args.hubert or _tiny_hubert(Path(tmp) / "hubert_tiny")
        label = "hubert (local)" if args.hubert else "hubert (tiny random)"
        for kind, name in (("mel", "mel"), ("hubert", label)):
            ext = FeatureExtractor(kind, hubert_path=hubert if kind == "hubert" else None)
            t, feats = _timed(lambda: ext(wav), args.runs)
            stream = StreamingFeatureExtractor(kind, hubert_path=hubert if kind == "hubert" else None)
            ts, sfeats = _timed(lambda: _stream(stream, wav), max(1, args.runs // 2))
            err = "exact" if kind == "mel" else "-"
            if kind == "hubert":
                single = extract_features(wav, kind, hubert_path=hubert, chunk_s=dur + 1)
                diff = np.abs(feats - single)
                err = f"{diff.mean():.3g} / {diff.max():.3g}"
            rows.append(
                {
                    "kind": name,
                    "dim": str(ext.dim),
                    "audio_s": f"{dur:.1f}",
                    "x_realtime": f"{dur / t:.1f}",
                    "stream_x_rt": f"{dur / ts:.1f}",
                    "lookahead_ms": f"{stream.lookahead_samples / 16:.0f}",
                    "chunk_err": err,
                    "peak_rss_mb": f"{_peak_rss_mb():.0f}",
                }
            )
    cols = list(rows[0])
    table = markdown_table(rows, cols)
    print(table)
    header = (
        f"\n## bench_audio: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, "
        f"commit {_commit()}\n\nMachine: {_machine()}. Median of {args.runs} runs (streaming: "
        f"{max(1, args.runs // 2)}) after a warm-up; streaming fed 40 ms chunks.\n\n"
    )
    append_results(header + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
