"""Emotion in rendered frames: face-region PSNR of each label vs the neutral render, NaN/blank check.

Usage::

    python -m avatar_bench.bench_emotion_render --store demo_out/store --avatar acosta [--seconds 2]

Renders the same speech (``eng.wav``, first ``--seconds``) neutral and with each of the 8 MEAD
labels at strength 1 and 1.5 (fixed seed, still head, no blinks), and reports the PSNR of the
face box (the mean head pose's projected landmark box) against the neutral render (lower = more
change), whether any frame has NaN/constant pixels, and the render time. Appends to
``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path

import numpy as np

from avatar_bench.common import ROOT, append_results, commit, machine

DATA = Path(os.environ.get("AVATAR_TEST_DATA", ROOT.parent / "shared" / "data"))


def face_box(models) -> tuple[int, int, int, int]:
    """Pixel box of the person's mean landmarks under the mean pose (x0, y0, x1, y1)."""
    from avatar.data.dataset import Intrinsics
    from avatar.motion.metrics import project
    from avatar.pipeline.controls import mean_pose

    K = Intrinsics(**models.manifest["dataset"]["intrinsics"]).matrix()
    uv = project(
        models.lm3d_mean[None], mean_pose(models.pose_track)[None], models.manifest["dataset"]["head_scale"], K
    )[0]
    x0, y0 = np.maximum(np.floor(uv.min(0)).astype(int), 0)
    x1, y1 = np.ceil(uv.max(0)).astype(int) + 1
    return int(x0), int(y0), int(x1), int(y1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--avatar", required=True)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)

    import avatar.api as api
    from avatar.media import load_audio
    from avatar.nerf.evaluate import psnr
    from avatar.pipeline.render import EMOTIONS

    av = api.load(args.avatar, store=args.store)
    wav = load_audio(DATA / "audio" / "eng.wav")[: int(args.seconds * 16000)]
    x0, y0, x1, y1 = face_box(av.models)

    def render(label: str, strength: float) -> np.ndarray:
        opts = api.RenderOptions(emotion=label, emotion_strength=strength, still=True, blink=False, seed=0)
        return np.stack(list(av.render(wav, opts)))

    neutral = render("neutral", 1.0)
    rows = []
    for label in EMOTIONS[1:]:
        for strength in (1.0, 1.5):
            frames = render(label, strength)
            face_psnr = psnr(frames[:, y0:y1, x0:x1], neutral[:, y0:y1, x0:x1])
            blank = int(sum(float(f.std()) < 1.0 for f in frames))
            rows.append((label, strength, face_psnr, blank, len(frames)))
    lines = [
        "| emotion | strength | face PSNR vs neutral (dB) | blank/constant frames | frames |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {lab} | {s} | {p:.2f} | {b} | {n} |" for lab, s, p, b, n in rows]
    table = "\n".join(lines)
    print(table)
    if not args.no_append:
        append_results(
            f"\n## bench_emotion_render: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, commit {commit()}\n\n"
            f"Machine: {machine()}. Avatar `{args.avatar}` ({av.size} px), first {args.seconds} s of eng.wav, "
            f"still head, no blinks, seed 0; face box {x0},{y0}-{x1},{y1}. Frames are uint8, so NaN cannot "
            f"reach the output; a blank frame is one with pixel std < 1.\n\n{table}\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
