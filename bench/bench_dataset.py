"""Compact datasets (issue 12): stored size and training quality of JPEG-encoded frames vs raw frames.

One real slice of a speaker video is preprocessed once with lossless PNG frames (decoded pixels are
exactly the raw frames a format-1 dataset stored), then copied with its frames re-encoded as JPEG
q95 (4:4:4). Reported: bytes per minute of video (raw uint8 arrays, PNG, JPEG) and the 5-minute
extrapolation, the one-time decode speed, and validation PSNR of the same short head training
(same preset, steps, seed) on each, both evaluated against the raw frames.

Usage::

    python -m avatar_bench.bench_dataset                         # 12 s of acosta at 512 px, cpu-smoke, 300 steps
    python -m avatar_bench.bench_dataset --keep DIR              # keep DIR/png and DIR/jpeg (e.g. for make gpu-bundle)
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path


from avatar_bench.common import RESULTS, append_results, commit, machine, markdown_table

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("AVATAR_TEST_DATA", ROOT.parent / "shared" / "data"))
VIDEO = DATA / "speakers" / "acosta_cnn_71s.mp4"


def make_slice(video: Path, seconds: float, out: Path) -> Path:
    """The first ``seconds`` of ``video`` (video + audio) as an H.264 MP4 at ``out`` (near-lossless, crf 12)."""
    from avatar.media import VideoWriter, iter_video_frames, load_audio

    n = int(round(seconds * 25))
    frames = []
    for i, f in enumerate(iter_video_frames(video)):
        if i >= n:
            break
        frames.append(f)
    audio = load_audio(video)[: n * 640]
    with VideoWriter(out, fps=25, size=frames[0].shape[1::-1], audio=audio, audio_rate=16000, crf=12) as w:
        for f in frames:
            w.write(f)
    return out


def make_compact_dataset(
    video: Path, seconds: float, size: int, out: Path, codec: str = "jpeg", progress: bool = False
) -> Path:
    """Preprocess the first ``seconds`` of ``video`` at ``size`` px into dataset ``out`` (frames ``codec``)."""
    from avatar.pipeline.preprocess import PreprocessConfig, preprocess

    with tempfile.TemporaryDirectory(prefix="bench_ds_") as tmp:
        clip = make_slice(video, seconds, Path(tmp) / "slice.mp4")
        return preprocess(clip, out, PreprocessConfig(size=size, frame_codec=codec), progress=progress)


def _train_eval(ds_train: Path, ds_truth: Path, out: Path, preset: str, steps: int, frames: int) -> dict:
    from avatar.nerf.evaluate import evaluate_nerf
    from avatar.nerf.trainer import train_nerf

    t0 = time.perf_counter()
    train_nerf(ds_train, out, part="head", preset=preset, steps=steps, seed=0, progress=False, device="cpu")
    sec = time.perf_counter() - t0
    m = evaluate_nerf(ds_truth, out, max_frames=frames, progress=False, device="cpu")["render"]
    return {"train_s": sec, "psnr_full": m["psnr_full"], "psnr_face": m["psnr_face"], "psnr_mouth": m["psnr_mouth"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--video", type=Path, default=VIDEO)
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--preset", default="cpu-smoke")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--eval-frames", type=int, default=4)
    ap.add_argument("--keep", type=Path, default=None, help="keep the datasets in KEEP/png and KEEP/jpeg")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if not args.video.is_file():
        print(f"error: {args.video} not found; pass --video or set AVATAR_TEST_DATA", file=sys.stderr)
        return 2
    from avatar.data.convert import recode_frames
    from avatar.data.dataset import Dataset

    tmp = tempfile.TemporaryDirectory(prefix="bench_dataset_")
    work = args.keep or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    png = make_compact_dataset(args.video, args.seconds, args.size, work / "png", codec="png")
    t_pre = time.perf_counter() - t0
    jpg = recode_frames(png, work / "jpeg", {"codec": "jpeg", "quality": 95}, progress=False)
    rows = []
    dsp = Dataset(png)
    n, S = dsp.n_frames, dsp.size
    minutes = n / 25 / 60
    raw = n * S * S * 4  # frames [N,S,S,3] + masks [N,S,S], uint8, as format 1 stored them
    other = sum(p.stat().st_size for p in png.glob("*.npy") if not p.name.startswith(("frames_", "masks_")))
    rows.append(
        {
            "storage": "raw uint8 (format 1)",
            "frames+masks MB": f"{raw / 1e6:.1f}",
            "dataset MB": f"{(raw + other) / 1e6:.1f}",
            "MB / 5 min": f"{(raw + other) / minutes * 5 / 1e6:,.0f}",
            "decode all (s)": "-",
            "val PSNR full / face / mouth (dB)": "",
            "train (s)": "",
        }
    )
    results = {}
    for name, root in (("PNG (lossless = raw pixels)", png), ("JPEG q95 4:4:4", jpg)):
        ds = Dataset(root)
        enc = ds.frames.nbytes_encoded + ds.masks.nbytes_encoded
        total = ds.nbytes_on_disk() - sum(p.stat().st_size for p in (root / "preview").glob("*"))
        t = time.perf_counter()
        ds.frames.decode_all()
        ds.masks.decode_all()
        dec = time.perf_counter() - t
        r = _train_eval(root, png, work / f"model_{root.name}", args.preset, args.steps, args.eval_frames)
        results[root.name] = r
        rows.append(
            {
                "storage": name,
                "frames+masks MB": f"{enc / 1e6:.1f}",
                "dataset MB": f"{total / 1e6:.1f}",
                "MB / 5 min": f"{total / minutes * 5 / 1e6:,.0f}",
                "decode all (s)": f"{dec:.2f}",
                "val PSNR full / face / mouth (dB)": f"{r['psnr_full']:.2f} / {r['psnr_face']:.2f} / {r['psnr_mouth']:.2f}",
                "train (s)": f"{r['train_s']:.0f}",
            }
        )
    d = results["jpeg"]["psnr_full"] - results["png"]["psnr_full"]
    cols = list(rows[0])
    table = markdown_table(rows, cols)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = (
        f"\n## bench_dataset ({started})\n\nmachine: {machine()}; commit {commit()}. {args.video.name}, first "
        f"{args.seconds:g} s ({n} frames) at {S} px, preprocessed once ({t_pre:.0f} s); head NeRF {args.preset}, "
        f"{args.steps} steps, seed 0, trained on each storage and evaluated against the raw frames on "
        f"{args.eval_frames} validation frames. JPEG - PNG validation PSNR (full frame): {d:+.2f} dB. "
        f"'MB / 5 min' extrapolates linearly in clip length (previews excluded).\n\n{table}\n"
    )
    print(text)
    append_results(text, args.results)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
