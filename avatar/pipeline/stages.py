"""The onboarding stages and their presets: what each stage reads and writes in the work directory,
and :func:`run_stage`, which runs one. Shared by the local path (:func:`avatar.pipeline.onboard.onboard`)
and the Ray path (``avatar/pipeline/distributed.py``); both import it, neither imports the other for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from avatar.errors import InvalidInput


@dataclass(frozen=True)
class OnboardPreset:
    """Per-preset sizes and the stage presets they select.

    Attributes:
        size: dataset frame side (pixels). nerf: NeRF trainer preset name. postnet: postnet preset.
        lle_ref: number of training frames kept as the LLE reference set.
    """

    size: int
    nerf: str
    postnet: str
    lle_ref: int = 2000


PRESETS: dict[str, OnboardPreset] = {
    "cpu-smoke": OnboardPreset(size=64, nerf="cpu-smoke", postnet="smoke", lle_ref=200),
    "cpu-small": OnboardPreset(size=128, nerf="cpu-small", postnet="cpu"),
    "gpu-full": OnboardPreset(size=512, nerf="gpu-full", postnet="gpu"),
}

STAGES = ["preprocess", "motion", "postnet", "head", "torso", "bundle"]
#: the stages each training stage reads (the Ray backend runs motion -> postnet and head -> torso side by side)
STAGE_DEPS: dict[str, tuple[str, ...]] = {"preprocess": (), "motion": ("preprocess",), "postnet": ("motion",),
                                          "head": ("preprocess",), "torso": ("head",)}


def run_stage(stage: str, work: Path, video: Path, preset: str, gen_dir: Path, audio: str | Path | None = None,
              cb=None, cancel=None, show_bars: bool = False, gen=None) -> None:
    """Run one training stage of an onboarding in ``work``: it reads the files of the stages in
    ``STAGE_DEPS[stage]`` and writes its own (``dataset/``, ``generator/``, ``postnet/``, ``nerf/head``,
    ``nerf/torso``), so any process that sees ``work`` can run it (a Ray task on another node).

    Args:
        cb: ``callback(fraction, message)``. cancel: an Event-like (``is_set()``), checked between steps.
        show_bars: tqdm bars. gen: the loaded shared generator (loaded from ``gen_dir`` when None).
    """
    p = PRESETS[preset]
    dataset_dir, motion_dir, postnet_dir, nerf_dir = (work / d for d in ("dataset", "generator", "postnet", "nerf"))
    if stage == "preprocess":
        from avatar.pipeline.preprocess import PreprocessConfig, preprocess

        if gen is None:
            from avatar.motion import load_generator

            gen = load_generator(gen_dir, device="cpu")
        cfg = PreprocessConfig(size=p.size, audio_features=gen.feature_kind, hubert_path=gen.hubert_path)
        preprocess(video, dataset_dir, cfg, audio=audio, overwrite=True, progress=show_bars)
    elif stage == "motion":
        from avatar.motion.regression import finetune_generator

        finetune_generator(gen_dir, dataset_dir, motion_dir, preset=p.postnet, overwrite=True,
                           progress=show_bars, callback=cb, cancel=cancel)
    elif stage == "postnet":
        from avatar.motion.postnet import train_postnet

        train_postnet(dataset_dir, motion_dir, postnet_dir, preset=p.postnet, overwrite=True,
                      corpus_cache=gen_dir / "cache" if (gen_dir / "cache").is_dir() else None,
                      progress=show_bars, callback=cb, cancel=cancel)
    elif stage in ("head", "torso"):
        from avatar.nerf.trainer import train_nerf

        train_nerf(dataset_dir, nerf_dir, part=stage, preset=p.nerf, progress=show_bars, callback=cb, cancel=cancel)
    else:
        raise InvalidInput(f"unknown onboarding stage {stage!r}; one of {', '.join(STAGE_DEPS)}")
