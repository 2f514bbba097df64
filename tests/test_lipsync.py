"""The default audio2motion (``tcn``, avatar.motion.regression) on real clips: input transform,
stream/chunk exactness, the whole-clip lip-sync evaluation with its baselines, silence, per-person
fine-tuning, several corpora. Lip-sync *quality* on unseen speakers is measured by
``bench/bench_lipsync.py`` (minutes of training), not here."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from avatar.motion.generator import load_generator
from avatar.motion.metrics import evaluate_clip, mouth_opening, pearson, silence_check
from avatar.motion.regression import RegressionConfig, finetune_generator, transform_features
from avatar.motion.train import PRESETS, cpu_threads

TRAIN = ["real3dportrait_May_5s.mp4", "retalking_face2.mp4", "retalking_face3.mp4"]
UNSEEN = "WDA_KatieHill_000.mp4"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with cpu_threads(1):
        yield


@pytest.fixture(scope="module")
def corpus(data_dir, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(corpus A dir, corpus B dir, dataset of an unseen speaker) from real clips."""
    from avatar_recipes.train_generator import prepare_corpus

    root = tmp_path_factory.mktemp("lipsync")
    a, b, c = root / "a", root / "b", root / "unseen"
    for d, names in ((a, TRAIN[:2]), (b, TRAIN[2:]), (c, [UNSEEN])):
        d.mkdir()
        for n in names:
            (d / n).symlink_to(data_dir / "corpus" / n)
    unseen = prepare_corpus(c, root / "unseen_cache", size=64, progress=False)[0][0]
    return a, b, unseen


@pytest.fixture(scope="module")
def tcn(corpus, tmp_path_factory) -> Path:
    """A tcn generator trained on two corpus directories (real recipe, small steps)."""
    from avatar_recipes.train_generator import train_generator

    out = tmp_path_factory.mktemp("tcn") / "gen"
    train_generator([corpus[0], corpus[1]], out, preset="smoke", progress=False, size=64, steps=150)
    return out


def test_several_corpora_pooled_and_model_recorded(tcn):
    import json

    m = json.loads((tcn / "metrics.json").read_text())
    cfg = json.loads((tcn / "config.json").read_text())
    assert m["model"] == "tcn" and cfg["generator"]["model"] == "tcn"
    assert len(m["corpus"]) == 2 and m["clips"] + m["heldout_clips"] == 3  # pooled from both directories
    assert np.isfinite(m["val_open_r"]) and m["best_step"] > 0
    gen = load_generator(tcn)
    assert gen.model == "tcn" and not gen.stochastic and gen.syncnet is not None


def test_transform_window_equals_whole_and_padding(corpus):
    from avatar.data.dataset import Dataset

    feats = np.asarray(Dataset(corpus[2]).features, np.float32)
    cfg = RegressionConfig()
    whole = transform_features(feats, cfg)
    assert whole.shape == (len(feats), 81) and np.isfinite(whole).all()
    a, b = 150, 190  # a window with the full history to its left transforms like the whole
    h = 2 * cfg.history_frames()
    part = transform_features(feats[a - h : b], cfg, start=a - h)
    np.testing.assert_allclose(part[h:], whole[a:b], atol=1e-5)
    # padding before the signal (negative absolute index) is left out of the statistics
    pad = np.concatenate([np.full((10, feats.shape[1]), -5.0, np.float32), feats[:40]])
    out = transform_features(pad, cfg, start=-10)
    np.testing.assert_allclose(out[10:], whole[:40], atol=1e-5)
    assert (out[:10, :-1] == 0).all() and (out[:10, -1] == -4.0).all()
    # loudness does not change the transformed input (log10 power shift)
    np.testing.assert_allclose(transform_features(feats + 0.7, cfg), whole, atol=1e-4)


def test_chunked_windowed_equal_single_pass(tcn, corpus):
    from avatar.data.dataset import Dataset

    gen = load_generator(tcn)
    feats = np.tile(np.asarray(Dataset(corpus[2]).features, np.float32), (3, 1))
    full = gen.predict(feats, chunk_frames=10**6)
    np.testing.assert_allclose(gen.predict(feats, chunk_frames=17), full, atol=1e-5)
    np.testing.assert_array_equal(
        gen.predict(feats, temperature=1.0, seed=1), gen.predict(feats, temperature=0.5, seed=9)
    )
    left = gen.history_frames + gen.context_frames
    for t0 in (100, 101, 333):
        w0, w1 = t0 - left, t0 + 30 + gen.context_frames
        part = gen.predict(feats[2 * w0 : 2 * w1], start_frame=w0)
        np.testing.assert_allclose(part[left : left + 30], full[t0 : t0 + 30], atol=1e-5)


@pytest.mark.parametrize("future", [-1, 2, 4, 6])
def test_tcn_lookahead_is_bounded(future):
    """A frame's output never depends on audio more than ``future_frames()`` video frames ahead (the
    streaming lookahead), and a cut right side keeps the output length."""
    import torch

    from avatar.motion.tcn import TCNGenerator

    cfg = RegressionConfig(future=future, hidden=16)
    net = TCNGenerator(cfg).eval()
    k = cfg.future_frames()
    assert k == (12 if future < 0 else future) and cfg.receptive_frames() >= k
    x = torch.randn(1, 2 * 60, cfg.input_dim)
    y = net(x)
    assert y.shape == (1, 60, cfg.n_basis)
    t = 30
    x2 = x.clone()
    x2[:, 2 * (t + k + 1) :] += 5.0  # audio from frame t + k + 1 on
    y2 = net(x2)
    torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1])
    assert not torch.allclose(y2[:, t + 1 :], y[:, t + 1 :])
    x3 = x.clone()
    x3[:, 2 * (t + k) :] += 5.0  # frame t + k is inside the lookahead of frame t
    assert not torch.allclose(net(x3)[:, t], y[:, t])


def test_evaluate_clip_reports_baselines(tcn, corpus):
    from avatar.audio import audio_energy
    from avatar.data.dataset import Dataset

    ds = Dataset(corpus[2])
    r = evaluate_clip(tcn, corpus[2])
    gt = np.asarray(ds.lm3d, np.float32) - np.asarray(ds.lm3d_mean, np.float32)
    from avatar.data.dataset import MOUTH

    base = float(np.linalg.norm(gt[:, MOUTH], axis=-1).mean())
    assert r["frames"] == ds.n_frames and abs(r["mean_shape_mouth_lmd"] - base) < 1e-6
    real = mouth_opening(np.asarray(ds.lm3d, np.float32))
    assert abs(r["energy_r"] - pearson(audio_energy(np.asarray(ds.audio), ds.n_frames), real)) < 1e-6
    assert abs(r["lmd_ratio"] - r["mouth_lmd"] / base) < 1e-9
    assert -1 <= r["open_r"] <= 1 and r["open_std_ratio"] > 0
    tail = evaluate_clip(tcn, corpus[2], part="val")
    assert tail["frames"] == len(ds.val_range)


def test_silence_gives_the_resting_mouth(corpus, tmp_path):
    """Digital silence -> the person's own quiet-frame mouth opening (within 1 std), and a mouth
    that opens less than on the same person's speech."""
    from avatar.data.dataset import Dataset
    from avatar.motion.train import train_generator
    from avatar_recipes.train_generator import prepare_corpus

    datasets = []
    for d in (corpus[0], corpus[1]):
        datasets += prepare_corpus(d, tmp_path / "cache", size=64, progress=False)[0]
    cfg = PRESETS["smoke"]
    cfg = replace(cfg, regression_fit=replace(cfg.regression_fit, steps=200, silence_prob=0.3, eval_every=50))
    gen = load_generator(train_generator(datasets, tmp_path / "gen", cfg, progress=False))
    s = silence_check(gen, corpus[2])
    assert s["silence_z"] <= 1.0, s
    speech = gen.predict(np.asarray(Dataset(corpus[2]).features, np.float32))
    mean = np.asarray(Dataset(corpus[2]).lm3d_mean, np.float32)
    assert s["silence_open_mean"] < mouth_opening(speech + mean).mean()


def test_person_finetune_never_worse_on_its_tail(tcn, corpus, tmp_path):
    import json

    out = finetune_generator(tcn, corpus[2], tmp_path / "person", preset="smoke", progress=False)
    m = json.loads((out / "metrics.json").read_text())
    assert m["person_val_open_r"] >= m["person_shared_val_open_r"] - 1e-9
    assert abs(evaluate_clip(out, corpus[2], part="val")["open_r"] - m["person_val_open_r"]) < 0.2
    assert (out / "syncnet.safetensors").is_file() and (out / "stats.json").is_file()
    with pytest.raises(Exception, match="fine-tuning preset"):
        finetune_generator(tcn, corpus[2], tmp_path / "p2", preset="huge")


def test_vae_flow_generator_is_copied_unchanged(data_dir, corpus, tmp_path):
    from avatar_recipes.train_generator import train_generator

    gen = train_generator(corpus[0], tmp_path / "vae", preset="smoke", progress=False, size=64, model="vae-flow")
    out = finetune_generator(gen, corpus[2], tmp_path / "person", preset="smoke", progress=False)
    assert (out / "generator.safetensors").read_bytes() == (gen / "generator.safetensors").read_bytes()
    assert load_generator(out).model == "vae-flow"


def test_eval_motion_cli_on_clips(tcn, corpus, capsys):
    from avatar.cli import main

    assert main(["eval-motion", "--generator", str(tcn), "--clips", str(corpus[2])]) == 0
    out = capsys.readouterr().out
    assert "open_r" in out and "energy_r" in out and "lmd_ratio" in out and "mean" in out


def test_opening_loss_rewards_shape_and_size():
    """``lambda_open``'s term: 0 for the real track, log(size ratio)^2 for a scaled opening, larger for
    an opening that does not follow the real one; still windows are left out."""
    import torch

    from avatar.motion.metrics import INNER_LOWER
    from avatar.motion.regression import opening_loss

    means = torch.zeros(2, 68, 3)
    t = torch.arange(32, dtype=torch.float32)
    open_ = 0.05 + 0.03 * torch.sin(t / 3.0)
    target = torch.zeros(2, 32, 68, 3)
    target[:, :, INNER_LOWER, 1] = open_[None, :, None]  # the lower inner lip moves down by the opening
    half = target.clone()
    half[:, :, INNER_LOWER, 1] *= 0.5
    flip = target.clone()
    flip[:, :, INNER_LOWER, 1] = (0.16 - open_)[None, :, None]  # opens when the real mouth closes
    flat = lambda x: x.reshape(2, 32, 204)  # noqa: E731
    assert float(opening_loss(flat(target), flat(target), means, 1e-3)) < 1e-5
    assert abs(float(opening_loss(flat(half), flat(target), means, 1e-3)) - float(np.log(0.5) ** 2)) < 1e-3
    assert abs(float(opening_loss(flat(flip), flat(target), means, 1e-3)) - 2.0) < 1e-3  # r = -1
    assert float(opening_loss(flat(half), flat(target), means, 1.0)) == 0.0  # no window moves enough
