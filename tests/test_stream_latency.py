"""The streaming engine's lookahead (issue 15): the right audio context derived from the avatar's
models, the block length and the NeRF window's right half as session parameters, the reported
lookahead equal to the audio a frame really waits for, and a low-latency avatar (a ``future=4``
generator + the causal postnet that follows it) under 0.30 s whose stream equals its batch render.
Real clips (the tiny avatar of ``conftest.py``), CPU, smoke-size models."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from avatar.errors import InvalidInput
from conftest import push_in_random_chunks
from avatar.pipeline.render import (
    CTX_RIGHT,
    Latency,
    MotionEngine,
    RenderOptions,
    StreamSession,
    landmarks_for_audio,
    motion_right_frames,
    render_frames,
    stream_latency,
)


@pytest.fixture(scope="module")
def models(tiny_avatar):
    import avatar.api as api

    return api.load(tiny_avatar[1], store=tiny_avatar[0], device="cpu").models


@pytest.fixture(scope="module")
def speech(data_dir) -> np.ndarray:
    from avatar.media import load_audio

    return load_audio(data_dir / "audio" / "RD_Radio31_000.wav")[: 16000 * 3 + 1234]


@pytest.fixture(scope="module")
def low_models(models, tiny_avatar, tmp_path_factory):
    """The tiny avatar with a low-latency motion chain trained the way an onboarding builds it: a
    smoke tcn generator with ``future=4`` on the tiny avatar's generator corpus, then the postnet
    (``future`` left to follow the generator)."""
    from avatar.motion import load_generator, load_postnet
    from avatar.motion.postnet import train_postnet
    from avatar.motion.train import PRESETS, train_generator

    dataset = Path(tiny_avatar[0]).parent / "gen_dataset"
    if not (dataset / "manifest.json").is_file():
        pytest.skip(f"no generator dataset beside the test store ({dataset})")
    root = tmp_path_factory.mktemp("low_latency")
    smoke = PRESETS["smoke"]
    cfg = replace(smoke, regression=replace(smoke.regression, future=4))
    train_generator([dataset], root / "gen", cfg, progress=False)
    train_postnet(dataset, root / "gen", root / "postnet", preset="smoke", progress=False)
    m = copy.copy(models)
    m.generator = load_generator(root / "gen", device="cpu")
    m.postnet = load_postnet(root / "postnet", device="cpu")
    return m


def _emission_waits(models, block=None, nerf_right=None, frames=40) -> list[int]:
    """Samples of audio after the start of frame ``t``'s audio that arrived before frame ``t`` was
    emitted, for each ``t`` (audio fed 40 ms at a time; the NeRF is stubbed: only timing matters)."""
    s = StreamSession(models, RenderOptions(size=32), block=block, nerf_right=nerf_right)
    s.frames.frame = lambda t, lm3d, n_final, pose=None: np.zeros((1, 1, 3), np.uint8)
    rng = np.random.default_rng(0)
    waits: dict[int, int] = {}
    while len(waits) < frames:
        s.feed(0.1 * rng.standard_normal(640).astype(np.float32))
        for t, _ in s.pull():
            waits[t] = s.samples - 640 * t
    return [waits[t] for t in range(frames)]


def test_default_avatar_keeps_its_context_and_088_s(models):
    """A symmetric avatar's models reach 12 (tcn) + 4 (postnet) = 16 frames past a block:
    capped at CTX_RIGHT = 12, today's window, so the default lookahead stays (8 + 12 + 2) / 25 = 0.88 s
    and it is the real worst-case wait of a frame."""
    assert models.generator.future_frames == 12 and models.postnet.future_frames == 4
    assert motion_right_frames(models) == 16
    lat = stream_latency(models)
    assert models.nerf.window == 5 and (lat.block, lat.ctx_right, lat.nerf_right) == (8, CTX_RIGHT, 2)
    assert lat.lookahead_s == pytest.approx(0.88)
    assert StreamSession(models, RenderOptions()).lookahead_s == pytest.approx(0.88)
    assert max(_emission_waits(models)) == lat.lookahead_frames * 640
    # smaller blocks / NeRF right half lower it; the models' 12 frames stay
    assert stream_latency(models, block=2, nerf_right=0).lookahead_s == pytest.approx((2 + 12) / 25)


def test_latency_parameters_are_validated(models):
    for bad in (0, 65, 2.0, True):
        with pytest.raises(InvalidInput, match="block"):
            StreamSession(models, RenderOptions(), block=bad)
    for bad in (-1, models.nerf.window // 2 + 1):
        with pytest.raises(InvalidInput, match="nerf_right"):
            StreamSession(models, RenderOptions(), nerf_right=bad)


def test_low_latency_avatar_under_300_ms(low_models):
    """The postnet trained on a future=4 generator is causal; the chain reaches 4 + 0 = 4 frames;
    block 2 with one frame of NeRF look-ahead, block 1 with the full centred window (2) or block 3
    without any -> 7 frames = 0.28 s, and the reported lookahead is the real worst-case wait of a frame."""
    m = low_models
    assert m.generator.config.future == 4 and m.generator.future_frames == 4
    assert m.postnet.net.cfg.future == 0 and m.postnet.future_frames == 0
    assert motion_right_frames(m) == 4
    assert stream_latency(m).lookahead_s == pytest.approx((8 + 4 + 2) / 25)
    for block, nerf_right in ((2, 1), (1, 2), (3, 0)):
        lat = stream_latency(m, block=block, nerf_right=nerf_right)
        assert lat.lookahead_s == pytest.approx(0.28) and lat.lookahead_s <= 0.30
        assert max(_emission_waits(m, block, nerf_right)) == lat.lookahead_frames * 640


def test_low_latency_stream_equals_batch(low_models, speech):
    """Stream (any chunking) == batch render with the same block / NeRF right half, bit for bit, and the
    landmarks equal landmarks_for_audio with that block."""
    opts = RenderOptions(seed=5, size=32)
    batch = list(render_frames(low_models, speech, opts, block=2, nerf_right=1))
    s = StreamSession(low_models, opts, block=2, nerf_right=1)
    assert s.lookahead_s == pytest.approx(0.28)
    got = push_in_random_chunks(s, speech, seed=1, max_chunk=3000)
    assert len(got) == len(batch) == round(len(speech) / 640)
    assert all(np.array_equal(a, b) for a, b in zip(got, batch))
    np.testing.assert_array_equal(s.landmarks(), landmarks_for_audio(low_models, speech, opts, block=2))
    # the clamped NeRF window changes the frames only through the landmarks it no longer reads ahead
    full = list(render_frames(low_models, speech, opts, block=2))
    assert any(not np.array_equal(a, b) for a, b in zip(full, batch))


def test_derived_right_context_is_the_models_real_reach(low_models, speech):
    """With the derived 4 frames a block's landmarks equal those computed with more right context (the
    audio after it cannot change them); with one frame less they do not: the context is exact, not a guess."""
    opts = RenderOptions(seed=5, blink=False)
    lat = stream_latency(low_models, block=2)
    wider = MotionEngine(low_models, opts, replace(lat, ctx_right=lat.ctx_right + 7))
    exact = MotionEngine(low_models, opts, lat)
    short = MotionEngine(low_models, opts, replace(lat, ctx_right=lat.ctx_right - 1))
    blocks = range(3, 30)
    ref = [wider.block(b, speech, None) for b in blocks]
    for b, r in zip(blocks, ref):
        np.testing.assert_allclose(exact.block(b, speech, None), r, atol=1e-5)
    assert max(np.abs(short.block(b, speech, None) - r).max() for b, r in zip(blocks, ref)) > 1e-3
    assert isinstance(lat, Latency) and lat.ctx_right == 4


def test_train_generator_future_flag(tmp_path):
    """``avatar train-generator --future N`` reaches RegressionConfig.future; bad values fail before any work."""
    import argparse

    from avatar.motion.commands import register
    from avatar_recipes.train_generator import train_generator

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["train-generator", str(tmp_path), "--out", str(tmp_path / "gen"), "--future", "4"])
    assert args.future == 4
    with pytest.raises(InvalidInput, match="tcn"):
        train_generator(tmp_path, tmp_path / "gen", preset="smoke", model="vae-flow", future=4)
    with pytest.raises(InvalidInput, match="future"):
        train_generator(tmp_path, tmp_path / "gen", preset="smoke", future=-1)


@pytest.mark.parametrize("future", [-1, 0, 1, 2])
def test_postnet_future_bounds_its_right_reach(future):
    """A postnet with ``future=n`` reads n frames of generator output after a frame (symmetric: its
    radius 4), keeps 2 x radius frames of receptive field, and its chunked apply equals one pass."""
    import torch

    from avatar.motion.postnet import CNNPostNet, Postnet, PostnetConfig

    torch.manual_seed(0)
    net = CNNPostNet(PostnetConfig(channels=(16, 16, 16), future=future)).eval()
    for p in net.parameters():  # the last conv starts at zero (identity): give it weights
        torch.nn.init.normal_(p, std=0.2)
    k = 4 if future < 0 else future
    assert net.right == k and net.left + net.right == 8
    post = Postnet(net, np.zeros(204, np.float32), np.ones(204, np.float32), "cpu")
    x = np.random.default_rng(0).standard_normal((60, 68, 3)).astype(np.float32)
    y = post.apply(x)
    np.testing.assert_allclose(post.apply(x, chunk=7), y, rtol=1e-5, atol=1e-5)  # float32 conv sum order
    t = 30
    x2 = x.copy()
    x2[t + k + 1 :] += 1.0
    np.testing.assert_allclose(post.apply(x2)[: t + 1], y[: t + 1], atol=1e-6)
    x3 = x.copy()
    x3[t + k :] += 1.0
    assert np.abs(post.apply(x3)[t] - y[t]).max() > 1e-4
    x4 = x.copy()
    x4[: t - (8 - k) + 1] += 1.0  # the left side reaches 8 - k frames back
    assert np.abs(post.apply(x4)[t] - y[t]).max() > 1e-4
