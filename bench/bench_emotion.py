"""Emotion model benchmark: cross-speaker per-label cosine, mouth LMD, training time.

Tracks every labelled clip of ``emotion/`` (MEAD M030 + W009, EAMM clips) once, then for each
direction (train on M030 + EAMM, test on W009; and vice versa) trains the category model
(:func:`avatar.motion.emotion.train_emotion`, default config unless ``--steps``) ``--runs`` times
(seeds 0..runs-1) and reports, per label on the held-out speaker:

- ``cosine``: cosine between the predicted and the real neutral-to-emotion displacement on
  brows / eyes / mouth corners (median over runs);
- ``mouth_lmd``: mean L2 displacement of the 20 mouth landmarks versus the neutral output, in
  canonical units (outer-eye-corner distance = 1; inner lips and outer-lip centres are 0 by
  construction, so this is the mouth-corner motion);
- strength 0 max |out - in| (must be exactly 0) and the training wall time (median).

Usage::

    python -m bench.bench_emotion [--runs 3] [--steps 1500] [--no-eamm]

Prints a table and appends it to ``bench/RESULTS.md`` (machine, git commit, date).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from bench.common import append_results
from bench.common import commit as _commit
from bench.common import machine as _machine

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("AVATAR_TEST_DATA", ROOT.parent / "shared" / "data"))




def main(argv: list[str] | None = None) -> int:
    from avatar.motion import emotion as E
    from avatar.pipeline.render import RenderOptions

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--no-eamm", action="store_true", help="train without the EAMM clips (no neutral clip)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    tracks = E.track_speakers(DATA / "emotion", progress=False)
    track_s = time.perf_counter() - t0
    if args.no_eamm:
        tracks = [t for t in tracks if t.speaker in ("M030", "W009")]
    lines = []
    for test in ("W009", "M030"):
        train_spk = [t.speaker for t in tracks if t.speaker != test]
        per_label: dict[str, list[dict]] = {}
        times, zero_err = [], 0.0
        for seed in range(args.runs):
            cfg = E.EmotionConfig(holdout=test, seed=seed)
            if args.steps:
                cfg.steps = args.steps
            with tempfile.TemporaryDirectory() as tmp:
                m = E.train_emotion(None, Path(tmp) / "shared" / "emotion", cfg, progress=False, tracks=tracks)
                st = next(t for t in tracks if t.speaker == test)
                (Path(tmp) / "avatars" / "x").mkdir(parents=True)
                models = SimpleNamespace(root=Path(tmp) / "avatars" / "x", lm3d_mean=st.neutral_mean,
                                         lm3d_ref=st.clips["neutral"][0])
                lm = st.clips["neutral"][0]
                f0 = E.build_emotion_delta(models, RenderOptions(emotion="happy", emotion_strength=0.0))
                zero_err = max(zero_err, float(np.abs(f0(lm, np.arange(len(lm))) - lm).max()))
            times.append(m["train_s"])
            for label, row in m["holdout"]["labels"].items():
                per_label.setdefault(label, []).append(row)
        lines.append(f"\n**train on {', '.join(train_spk)}; test on {test}** (train {statistics.median(times):.1f} s median, "
                     f"{args.runs} seeds; strength-0 max |out-in| = {zero_err:g})\n")
        lines.append("| label | cosine (median) | cosine min..max | mouth LMD | pred / real norm |")
        lines.append("|---|---|---|---|---|")
        cos_all = []
        for label in E.LABELS[1:]:
            rows = per_label.get(label)
            if not rows:
                continue
            cos = [r["cosine"] for r in rows]
            cos_all.append(statistics.median(cos))
            lines.append(f"| {label} | {statistics.median(cos):.3f} | {min(cos):.3f}..{max(cos):.3f} | "
                         f"{statistics.median(r['mouth_lmd'] for r in rows):.4f} | "
                         f"{statistics.median(r['pred_norm'] for r in rows):.3f} / {rows[0]['real_norm']:.3f} |")
        lines.append(f"| **mean** | {np.mean(cos_all):.3f} | | | |")
    header = (f"\n## bench_emotion ({datetime.date.today().isoformat()}, commit {_commit()})\n\n"
              f"Machine: {_machine()}. Tracking {sum(len(v) for t in tracks for v in t.clips.values())} clips: "
              f"{track_s:.1f} s. EAMM clips: {'no' if args.no_eamm else 'yes'}. "
              f"Canonical units (outer-eye-corner distance = 1).\n")
    text = header + "\n".join(lines) + "\n"
    print(text)
    append_results(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
