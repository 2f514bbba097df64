"""Quality of an onboarded avatar on its own held-out validation tail (issue: end-to-end workflow).

Drives the avatar with the validation tail's *audio* through the whole pipeline (features ->
generator -> postnet -> landmarks -> NeRFs) with the tracked head poses of those frames, and
compares with the real frames:

* PSNR (full frame) of the full pipeline, beside the NeRF-only PSNR from the *tracked* landmarks
  and two baselines (background plate; mean training frame);
* mouth LMD in pixels: landmarks re-detected (MediaPipe FaceMesh -> iBUG-68) on the rendered
  frames versus on the real frames, mouth points 48-67, for both drivings;
* the mouth amplitude end to end (issue 18): inner-lip opening of the re-detected landmarks, its
  std on the rendered frames / on the real frames (target 0.8-1.2) and its Pearson r with the real
  opening; with the postnet's speech-amplitude gain and, beside it, without it (gain 1).

Usage::

    python -m avatar_bench.bench_avatar_quality --store demo_out/store --avatar acosta --dataset DS [--max-frames 100]

``DS`` is a dataset of the same video at the avatar's size (``avatar preprocess VIDEO --out DS
--size 128``); prints a table and appends it to ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import numpy as np

from avatar_bench.common import append_results, commit, machine


def mouth_lmd(a: np.ndarray, b: np.ndarray) -> float:
    ok = ~(np.isnan(a).any((1, 2)) | np.isnan(b).any((1, 2)))
    return float(np.linalg.norm(a[ok] - b[ok], axis=-1).mean()) if ok.any() else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", type=Path, required=True)
    ap.add_argument("--avatar", required=True)
    ap.add_argument("--dataset", type=Path, required=True, help="dataset of the same video at the avatar's size")
    ap.add_argument(
        "--max-frames", type=int, default=100, help="validation frames evaluated (from the start of the tail)"
    )
    ap.add_argument(
        "--sheet",
        type=Path,
        default=None,
        help="write a PNG: real frames (top row) over each driving's render, the 6 most open real mouths",
    )
    ap.add_argument("--no-append", action="store_true")
    args = ap.parse_args(argv)

    import avatar.api as api
    from avatar.data import Dataset
    from avatar.data.dataset import SAMPLES_PER_FRAME
    from avatar.nerf.evaluate import inner_lip_opening, mouth_amplitude, psnr, redetect_mouth
    from avatar.pipeline.render import FrameEngine, RenderOptions, landmarks_for_audio

    av = api.load(args.avatar, store=args.store)
    ds = Dataset(args.dataset)
    if ds.size != av.size:
        raise SystemExit(f"dataset size {ds.size} != avatar size {av.size}; preprocess with --size {av.size}")
    v0 = ds.val_range.start
    n = min(args.max_frames, len(ds.val_range))
    wav = np.asarray(ds.audio[v0 * SAMPLES_PER_FRAME : (v0 + n) * SAMPLES_PER_FRAME])
    real = [np.asarray(ds.frames[v0 + i]) for i in range(n)]
    poses = np.asarray(ds.pose[v0 : v0 + n])
    opts = RenderOptions(blink=False, temperature=0.0)
    t0 = time.perf_counter()
    engine = FrameEngine(av.models, opts)
    drivings = {"full pipeline (val audio)": landmarks_for_audio(av.models, wav, opts)[:n]}
    post = av.models.postnet
    gain = getattr(post, "gain", 1.0)
    if gain != 1.0:  # the same avatar without its speech-amplitude calibration, for the before/after
        post.gain = 1.0
        drivings["full pipeline, gain 1 (uncalibrated)"] = landmarks_for_audio(av.models, wav, opts)[:n]
        post.gain = gain
    drivings["NeRF only (tracked landmarks)"] = np.asarray(ds.lm3d[v0 : v0 + n])
    rendered = {k: [engine.frame(i, lm, n, pose=poses[i]) for i in range(n)] for k, lm in drivings.items()}
    dt = time.perf_counter() - t0
    mean_train = np.mean([np.asarray(ds.frames[i], np.float64) for i in range(0, ds.val_range.start, 10)], axis=0)
    mouth_real = redetect_mouth(real)
    nan = float("nan")
    rows = {}
    for k, frames in rendered.items():
        mouth = redetect_mouth(frames)
        rows[k] = (
            np.mean([psnr(a, b) for a, b in zip(frames, real)]),
            mouth_lmd(mouth, mouth_real),
            *mouth_amplitude(mouth, mouth_real),
        )
    if args.sheet is not None:
        import cv2

        ok = ~np.isnan(mouth_real).any((1, 2))
        pick = np.sort(np.flatnonzero(ok)[np.argsort(-inner_lip_opening(mouth_real[ok]))[:6]])
        grid = np.concatenate(
            [np.concatenate([np.asarray(f[i]) for i in pick], axis=1) for f in [real, *rendered.values()]], axis=0
        )
        cv2.imwrite(str(args.sheet), cv2.cvtColor(grid.astype(np.uint8), cv2.COLOR_RGB2BGR))
        print(f"sheet: {args.sheet} (rows: real, {', '.join(rendered)}; frames {v0 + pick})")
    rows["background plate"] = (np.mean([psnr(np.asarray(ds.background), b) for b in real]), nan, nan, nan)
    rows["mean training frame"] = (np.mean([psnr(mean_train, b) for b in real]), nan, nan, nan)
    lines = [
        "| driving | PSNR full frame (dB) | mouth LMD (px, re-detected) | opening std / real | opening r |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {k} | {p:.2f} | {m:.2f} | {sr:.2f} | {r:.2f} |" for k, (p, m, sr, r) in rows.items()]
    table = "\n".join(lines)
    print(table)
    text = (
        f"\n## bench_avatar_quality: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}, commit {commit()}\n\n"
        f"Machine: {machine()}. Avatar `{args.avatar}` ({av.size} px, preset {av.models.manifest.get('preset')}), "
        f"first {n} validation frames of {ds.root.name}; postnet amplitude gain {gain:.2f}; render {dt:.0f} s.\n\n{table}\n"
    )
    if not args.no_append:
        append_results(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
