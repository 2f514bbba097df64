"""``make demo``: the whole product on real input with the CPU preset.

1. train the shared generator on ``DATA/corpus`` + ``DATA/corpus2`` (when present) and the emotion
   model on ``DATA/emotion``
   (each skipped when the demo store already has it),
2. onboard ``DATA/speakers/acosta_cnn_71s.mp4`` as avatar ``acosta``,
3. render ``DATA/audio/eng.wav`` (English) and ``DATA/audio/dreamtalk_German1.wav`` (German),
4. write ``compare.png`` (a rendered frame next to the real frame) and print paths + wall times.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from avatar.errors import InvalidInput

SPEAKER = "speakers/acosta_cnn_71s.mp4"
AUDIOS = {"eng": "audio/eng.wav", "german": "audio/dreamtalk_German1.wav"}


def _compare_png(av, video: Path, rendered_mp4: Path, out: Path) -> None:
    """Side by side: the real (cropped) source frame | the first rendered frame."""
    import cv2

    from avatar.media import iter_video_frames

    m = av.models.manifest
    box = m.get("dataset", {}).get("crop_box")
    crop = (int(box["x0"]), int(box["y0"]), int(box["side"])) if box else None
    real = next(iter(iter_video_frames(video, fps=25, crop=crop, size=av.size)))
    fake = next(iter(iter_video_frames(rendered_mp4, fps=25)))
    if fake.shape != real.shape:
        fake = cv2.resize(fake, real.shape[1::-1], interpolation=cv2.INTER_AREA)
    sheet = np.concatenate([real, fake], axis=1)
    cv2.imwrite(str(out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))


def run_demo(data: Path, out: Path, preset: str = "cpu-small", progress: bool = True) -> int:
    """Run the demo; returns 0. Raises InvalidInput when the media root is missing.

    ``progress=False`` (``avatar demo -q``) hides the progress bars of every stage it runs: generator
    and emotion training, onboarding, both renders."""
    from avatar.api import RenderOptions, load
    from avatar.pipeline.onboard import onboard
    from avatar.store import AvatarStore
    from avatar_recipes.train_generator import train_generator

    if not (data / SPEAKER).is_file():
        raise InvalidInput(f"demo media not found under {data}; pass --data (the shared/data directory)")
    out.mkdir(parents=True, exist_ok=True)
    store = AvatarStore(out / "store")
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    if not (store.generator_dir / "config.json").is_file():
        corpora = [d for d in (data / "corpus", data / "corpus2") if d.is_dir()]
        print(f"[demo] training the shared generator on {', '.join(str(c) for c in corpora)} (CPU preset)")
        train_generator(corpora, store.generator_dir, preset="cpu", progress=progress)
    times["train_generator"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if not (store.emotion_dir / "config.json").is_file():
        from avatar.motion.emotion import train_emotion

        print(f"[demo] training the shared emotion model on {data / 'emotion'} + the MEAD clips of {data / 'corpus2'}")
        # the MEAD clips of corpus2 add speakers (the other corpus2 clips carry no emotion label and are skipped)
        train_emotion(
            [d for d in (data / "emotion", data / "corpus2") if d.is_dir()], store.emotion_dir, progress=progress
        )
    times["train_emotion"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if not store.exists("acosta"):
        print(f"[demo] onboarding {data / SPEAKER} as 'acosta' (preset {preset})")
        onboard(data / SPEAKER, "acosta", store=store, preset=preset, bars=progress)
    times["onboard"] = time.perf_counter() - t0
    stage_seconds = store.manifest("acosta").get("stage_seconds", {})

    av = load("acosta", store=store)
    videos = {}
    for key, rel in AUDIOS.items():
        t0 = time.perf_counter()
        dst = out / f"acosta_{key}.mp4"
        res = av.render_to_mp4(data / rel, dst, RenderOptions(), progress=progress)
        times[f"render_{key}"] = time.perf_counter() - t0
        videos[key] = res
    _compare_png(av, data / SPEAKER, out / "acosta_eng.mp4", out / "compare.png")
    times["total"] = time.perf_counter() - t_all
    report = {
        "times_s": {k: round(v, 1) for k, v in times.items()},
        "onboard_stage_s": stage_seconds,
        "videos": videos,
        "compare_png": str(out / "compare.png"),
        "store": str(store.root),
        "metrics": store.info("acosta")["metrics"],
    }
    (out / "demo_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"[demo] videos: {', '.join(v['path'] for v in videos.values())}")
    print(f"[demo] real | rendered frame: {out / 'compare.png'}")
    print(
        f"[demo] the avatar lives in the demo's own store; use it with --store (or AVATAR_HOME={store.root}):\n"
        f"       avatar render --store {store.root} --avatar acosta --audio SPEECH.wav --out out.mp4"
    )
    return 0
