"""Shared test fixtures: real media from ``$AVATAR_TEST_DATA`` (default ``../shared/data``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("AVATAR_TEST_DATA", REPO.parent / "shared" / "data"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """Root of the real test media; skips the test with a reason when absent."""
    if not DATA.is_dir():
        pytest.skip(f"real test media not found at {DATA}; set AVATAR_TEST_DATA")
    return DATA


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# --------------------------------------------------------------------------------------------
# A tiny real avatar, built once per test session and shared by the pipeline and service tests:
# a 3 s slice of speakers/acosta_cnn_71s.mp4 -> a "smoke" shared generator trained on it -> a tiny
# emotion model (2 MEAD clips) -> "cpu-smoke" onboarding. ``$AVATAR_TEST_STORE`` reuses a store.
SLICE_S = 3.0


def make_clip(data_dir: Path, clip: Path, seconds: float = SLICE_S) -> Path:
    """Write the first ``seconds`` of speakers/acosta_cnn_71s.mp4 (video + audio) to ``clip``."""
    from avatar_bench.bench_dataset import make_slice

    return make_slice(data_dir / "speakers" / "acosta_cnn_71s.mp4", seconds, clip)


def build_tiny_store(root: Path, data_dir: Path) -> tuple[Path, str]:
    """Onboard a tiny real avatar into a new store at ``root``; returns (store root, avatar name)."""
    from avatar.motion.emotion import EmotionConfig, train_emotion
    from avatar.motion.train import PRESETS as GEN_PRESETS
    from avatar.motion.train import train_generator
    from avatar.pipeline.onboard import onboard
    from avatar.pipeline.preprocess import PreprocessConfig, preprocess
    from avatar.store import AvatarStore

    clip = make_clip(data_dir, root / "clip.mp4")
    store = AvatarStore(root / "store")
    ds = root / "gen_dataset"
    preprocess(clip, ds, PreprocessConfig(size=64, audio_features="mel"), progress=False)
    train_generator([ds], store.generator_dir, GEN_PRESETS["smoke"], progress=False)
    clips = root / "emotion_clips"
    clips.mkdir()
    for label in ("neutral_level1", "happy_level3"):
        (clips / f"M030_front_{label}_001.mp4").symlink_to(data_dir / "emotion" / f"M030_front_{label}_001.mp4")
    train_emotion(clips, store.emotion_dir, EmotionConfig(hidden=32, steps=50), progress=False)
    onboard(clip, "tiny", store=store, preset="cpu-smoke")
    return store.root, "tiny"


@pytest.fixture(scope="session")
def tiny_avatar(data_dir, tmp_path_factory) -> tuple[Path, str]:
    """(store root, avatar name) of a tiny onboarded real avatar (see :func:`build_tiny_store`)."""
    env = os.environ.get("AVATAR_TEST_STORE")
    if env:
        from avatar.store import AvatarStore

        names = AvatarStore(env).names()
        if not names:
            pytest.skip(f"AVATAR_TEST_STORE={env} holds no avatar")
        return Path(env), names[0]
    return build_tiny_store(tmp_path_factory.mktemp("tiny_avatar"), data_dir)


def push_in_random_chunks(session, audio, seed: int, max_chunk: int) -> list:
    """Feed ``audio`` to a streaming session in random chunks of 0..max_chunk-1 samples, then finish;
    returns every frame the session produced (the stream == batch tests)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    got, i = [], 0
    while i < len(audio):
        k = int(rng.integers(0, max_chunk))
        got += session.push(audio[i : i + k])
        i += k
    return got + session.finish()
