"""The onboarding stages and their presets: what each stage reads and writes in the work directory,
and :func:`run_stage`, which runs one. Shared by the local path (:func:`avatar.pipeline.onboard.onboard`)
and the Ray path (``avatar/pipeline/distributed.py``); both import it, neither imports the other for it.

It is also the one preset registry of every command: the names ``cpu-smoke | cpu-small | gpu-full``
(:data:`PRESET_NAMES`) and, for each training stage, its own preset of that name
(:data:`STAGE_PRESETS`, :func:`stage_preset`). The stages keep their own tables (the generator and
postnet say ``smoke | cpu | gpu``); the CLI takes the unified names and the old ones as deprecated
aliases (:data:`PRESET_ALIASES`, :func:`unified_preset`).
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


#: the preset names every command takes: seconds for tests / the 2-core CPU setting / the product on one GPU
PRESET_NAMES: tuple[str, ...] = ("cpu-smoke", "cpu-small", "gpu-full")
PRESET_HELP = "cpu-smoke (seconds: tests), cpu-small (the 2-core CPU setting), gpu-full (the product, one GPU)"
#: old names (``train-generator`` / ``train-postnet``), still accepted with a warning
PRESET_ALIASES: dict[str, str] = {"smoke": "cpu-smoke", "cpu": "cpu-small", "gpu": "gpu-full"}
_MOTION = {new: old for old, new in PRESET_ALIASES.items()}  # the motion stages still use the old names
#: each training stage's own preset for each unified name: the keys of ``avatar.motion.train.PRESETS``
#: (generator), ``avatar.motion.postnet.PRESETS`` and ``avatar.motion.regression.FINETUNE_PRESETS``
#: (postnet: both person stages), ``avatar.nerf.presets.PRESETS`` (nerf) and :data:`PRESETS` (onboard)
STAGE_PRESETS: dict[str, dict[str, str]] = {
    "onboard": {n: n for n in PRESET_NAMES},
    "nerf": {n: n for n in PRESET_NAMES},
    "generator": dict(_MOTION),
    "postnet": dict(_MOTION),
}


def unified_preset(name: str) -> tuple[str, bool]:
    """``(unified name, True when name was a deprecated alias)`` for a preset name of any command.

    Raises:
        InvalidInput: not a preset name.
    """
    if name in PRESET_NAMES:
        return name, False
    if name in PRESET_ALIASES:
        return PRESET_ALIASES[name], True
    raise InvalidInput(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")


def stage_preset(stage: str, name: str) -> str:
    """The preset of training stage ``stage`` (a key of :data:`STAGE_PRESETS`) for preset ``name``
    (a unified name or an alias), e.g. ``stage_preset("generator", "cpu-small") == "cpu"``.

    Raises:
        InvalidInput: unknown stage or preset name.
    """
    if stage not in STAGE_PRESETS:
        raise InvalidInput(f"unknown stage {stage!r}; one of {', '.join(STAGE_PRESETS)}")
    return STAGE_PRESETS[stage][unified_preset(name)[0]]


PRESETS: dict[str, OnboardPreset] = {
    n: OnboardPreset(size=size, nerf=stage_preset("nerf", n), postnet=stage_preset("postnet", n), lle_ref=lle_ref)
    for n, size, lle_ref in (("cpu-smoke", 64, 200), ("cpu-small", 128, 2000), ("gpu-full", 512, 2000))
}

STAGES = ["preprocess", "motion", "postnet", "head", "torso", "bundle"]
#: the stages each training stage reads (the Ray backend runs motion -> postnet and head -> torso side by side)
STAGE_DEPS: dict[str, tuple[str, ...]] = {
    "preprocess": (),
    "motion": ("preprocess",),
    "postnet": ("motion",),
    "head": ("preprocess",),
    "torso": ("head",),
}


def run_stage(
    stage: str,
    work: Path,
    video: Path,
    preset: str,
    gen_dir: Path,
    audio: str | Path | None = None,
    cb=None,
    cancel=None,
    show_bars: bool = False,
    gen=None,
    seed: int = 0,
) -> None:
    """Run one training stage of an onboarding in ``work``: it reads the files of the stages in
    ``STAGE_DEPS[stage]`` and writes its own (``dataset/``, ``generator/``, ``postnet/``, ``nerf/head``,
    ``nerf/torso``), so any process that sees ``work`` can run it (a Ray task on another node).

    Args:
        cb: ``callback(fraction, message)``. cancel: an Event-like (``is_set()``), checked between steps.
        show_bars: tqdm bars. gen: the loaded shared generator (loaded from ``gen_dir`` when None).
        seed: the training stages' seed (motion fine-tuning, postnet, head and torso NeRF); preprocess
            samples nothing.
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

        finetune_generator(
            gen_dir,
            dataset_dir,
            motion_dir,
            preset=p.postnet,
            overwrite=True,
            progress=show_bars,
            callback=cb,
            cancel=cancel,
            seed=seed,
        )
    elif stage == "postnet":
        from avatar.motion.postnet import train_postnet

        train_postnet(
            dataset_dir,
            motion_dir,
            postnet_dir,
            preset=p.postnet,
            overwrite=True,
            corpus_cache=gen_dir / "cache" if (gen_dir / "cache").is_dir() else None,
            progress=show_bars,
            callback=cb,
            cancel=cancel,
            seed=seed,
        )
    elif stage in ("head", "torso"):
        from avatar.nerf.trainer import train_nerf

        train_nerf(
            dataset_dir, nerf_dir, part=stage, preset=p.nerf, seed=seed, progress=show_bars, callback=cb, cancel=cancel
        )
    else:
        raise InvalidInput(f"unknown onboarding stage {stage!r}; one of {', '.join(STAGE_DEPS)}")
