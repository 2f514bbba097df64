"""audio2motion: generator, SyncNet, postnet, LLE, bundles, metrics, the train-generator recipe.

Tiny configs on real clips: a session fixture runs the real recipe (preprocess two corpus clips at
64 px + a broken file, smoke-preset SyncNet + generator training) once; the tests share it.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from avatar.errors import BundleCorrupt, ClipTooShort, FeatureMismatch, InvalidInput, OutputExists, TrainingDiverged
from avatar.motion import lle_project, load_generator, load_postnet, train_postnet
from avatar.motion.data import Corpus
from avatar.motion.generator import VAEFlowGenerator
from avatar.motion.layers import FlowPrior
from avatar.motion.postnet import PRESETS as POST_PRESETS
from avatar.motion.train import PRESETS, cpu_threads, generator_loss

CLIPS = ["real3dportrait_May_5s.mp4", "retalking_face2.mp4"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """1 intra-op thread: the test machine is shared, and OpenMP spin-waits collapse there."""
    with cpu_threads(1):
        yield


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory, caplog_module=None):
    """(generator bundle dir, [dataset dirs]) from the real recipe on a 2-clip corpus + a broken clip."""
    from avatar_recipes.train_generator import train_generator

    root = tmp_path_factory.mktemp("motion")
    corpus = root / "corpus"
    corpus.mkdir()
    for name in CLIPS:
        (corpus / name).symlink_to(data_dir / "corpus" / name)
    (corpus / "broken.mp4").write_bytes(b"this is not a video")
    out = root / "gen"
    # GeneFace's VAE + flow generator: the documented alternative to the default tcn (tests/test_lipsync.py)
    train_generator(corpus, out, preset="smoke", progress=False, size=64, model="vae-flow")
    return out, sorted(p for p in (out / "cache").iterdir() if (p / "manifest.json").is_file())


@pytest.fixture(scope="module")
def gen(trained):
    return load_generator(trained[0], device="cpu")


@pytest.fixture(scope="module")
def may(trained) -> Path:
    return next(p for p in trained[1] if p.name.startswith("real3dportrait_May"))


def test_recipe_bundle_and_skipped_clip(trained):
    out, datasets = trained
    for f in ["generator.safetensors", "syncnet.safetensors", "config.json", "stats.json", "metrics.json"]:
        assert (out / f).is_file(), f
    assert len(datasets) == 2
    m = json.loads((out / "metrics.json").read_text())
    assert m["skipped_clips"] == ["broken.mp4"]
    assert m["clips"] == 2 and m["heldout_val"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["preset"] == "smoke" and cfg["generator"]["feature_dim"] == 80
    assert not list(out.parent.glob(f".{out.name}*")), "staging/temp dirs left behind"


def test_recipe_resumes_from_cache(trained, data_dir, tmp_path, caplog):
    from avatar_recipes.train_generator import prepare_corpus

    out, datasets = trained
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / CLIPS[0]).symlink_to(data_dir / "corpus" / CLIPS[0])
    with caplog.at_level(logging.INFO, logger="avatar_recipes.train_generator"):
        done, skipped = prepare_corpus(corpus, out / "cache", size=64, progress=False)
    assert [d.name for d in done] == [d.name for d in datasets if d.name.startswith("real3dportrait")]
    assert "cached" in caplog.text and not skipped


def test_recipe_refuses_existing_bundle(trained, data_dir):
    from avatar_recipes.train_generator import train_generator

    with pytest.raises(OutputExists):
        train_generator(data_dir / "corpus", trained[0], preset="smoke")


def test_flow_prior_is_invertible():
    torch.manual_seed(0)
    flow = FlowPrior(latent=16, hidden=16, kernel=3, n_layers=2, n_blocks=3, cond_channels=8)
    for p in flow.parameters():
        p.data.normal_(0, 0.1)
    z, c = torch.randn(2, 16, 12), torch.randn(2, 8, 12)
    u, logdet = flow(z, c)
    assert torch.allclose(flow.reverse(u, c), z, atol=1e-5)
    assert logdet.abs().sum() > 0


def test_generator_training_lowers_loss(may):
    """A fixed batch of real windows: 40 Adam steps lower the full GeneFace loss and the MSE term."""
    cfg = PRESETS["smoke"]
    corpus = Corpus([may], "train", min_frames=32)
    f, e = corpus.windows(np.random.default_rng(0), 4, 32)
    fm, fs, em, es = (torch.from_numpy(x) for x in corpus.fit_stats())
    ft, et = (torch.from_numpy(f) - fm) / fs, (torch.from_numpy(e).flatten(2) - em) / es
    torch.manual_seed(0)
    net = VAEFlowGenerator(replace(cfg.generator, feature_dim=80))
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        terms = generator_loss(net, ft, et, cfg, None, es, em)
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        losses.append((float(terms["total"].detach()), float(terms["mse"].detach())))
    first, last = np.mean(losses[:5], 0), np.mean(losses[-5:], 0)
    assert last[0] < 0.7 * first[0] and last[1] < 0.7 * first[1], losses


def test_predict_shapes_determinism_temperature(gen, may):
    from avatar.data.dataset import Dataset

    feats = np.asarray(Dataset(may).features)
    a = gen.predict(feats, temperature=1.0, seed=3)
    assert a.shape == (feats.shape[0] // 2, 68, 3) and a.dtype == np.float32 and np.isfinite(a).all()
    assert np.array_equal(a, gen.predict(feats, temperature=1.0, seed=3))
    assert not np.allclose(a, gen.predict(feats, temperature=1.0, seed=4))
    assert np.array_equal(gen.predict(feats, temperature=0.0, seed=1), gen.predict(feats, temperature=0.0, seed=2))
    assert gen.predict(feats[:3]).shape == (1, 68, 3)  # odd feature count: floor(F / 2) frames


def test_chunked_and_windowed_equal_single_pass(gen, may):
    from avatar.data.dataset import Dataset

    feats = np.tile(np.asarray(Dataset(may).features), (4, 1))  # ~20 s of real features
    full = gen.predict(feats, seed=7, chunk_frames=10**6)
    chunked = gen.predict(feats, seed=7, chunk_frames=24)
    np.testing.assert_allclose(chunked, full, atol=1e-5)
    ctx = gen.context_frames
    for t0 in (100, 101, 203):  # a window of the sequence, placed by start_frame (any phase)
        w0, w1 = t0 - ctx, t0 + 30 + ctx
        part = gen.predict(feats[2 * w0 : 2 * w1], seed=7, start_frame=w0)
        np.testing.assert_allclose(part[ctx : ctx + 30], full[t0 : t0 + 30], atol=1e-5)


def test_very_long_audio_runs_in_bounded_chunks(gen):
    feats = np.random.default_rng(0).standard_normal((2 * 25 * 60 * 10, 80)).astype(np.float32)  # 10 min
    out = gen.predict(feats * 2.0 + np.asarray(gen.stats.feature_mean, np.float32), chunk_frames=2000)
    assert out.shape == (15000, 68, 3) and np.isfinite(out).all()


def test_bad_inputs(gen):
    mean = np.asarray(gen.stats.feature_mean, np.float32)
    with pytest.raises(ClipTooShort):
        gen.predict(np.zeros((0, 80), np.float32))
    with pytest.raises(ClipTooShort):
        gen.predict(mean[None])
    with pytest.raises(FeatureMismatch, match="mel"):
        gen.predict(np.zeros((100, 1024), np.float32))
    with pytest.raises(FeatureMismatch, match="hubert"):
        gen.predict(np.tile(mean, (100, 1)), feature_kind="hubert")
    bad = np.tile(mean, (100, 1))
    bad[5, 3] = np.nan
    with pytest.raises(InvalidInput, match="NaN"):
        gen.predict(bad)
    with pytest.raises(InvalidInput):
        gen.predict(np.tile(mean, (100, 1)), temperature=-1)


def test_silent_audio_gives_finite_motion(gen):
    from avatar.audio import extract_features

    feats = extract_features(np.zeros(16000 * 3, np.float32), "mel", n_frames=75)
    out = gen.predict(feats, temperature=0.0)
    assert out.shape == (75, 68, 3) and np.isfinite(out).all()


def test_generator_bundle_roundtrip_bit_exact(trained, gen, tmp_path):
    from avatar.motion.bundle import save_module

    out = trained[0]
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("cache", "runs"))
    save_module(gen.net, copy / "generator.safetensors")  # re-save the loaded weights
    g2 = load_generator(copy, device="cpu")
    for (k, v), (k2, v2) in zip(gen.net.state_dict().items(), g2.net.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    feats = np.tile(np.asarray(gen.stats.feature_mean, np.float32), (60, 1))
    assert np.array_equal(gen.predict(feats, seed=1), g2.predict(feats, seed=1))
    assert g2.feature_kind == "mel" and g2.hubert_path is None


@pytest.mark.parametrize("missing", ["generator.safetensors", "syncnet.safetensors", "config.json", "stats.json"])
def test_generator_bundle_missing_file(trained, tmp_path, missing):
    copy = tmp_path / "b"
    shutil.copytree(trained[0], copy, ignore=shutil.ignore_patterns("cache", "runs"))
    (copy / missing).unlink()
    with pytest.raises(BundleCorrupt, match=missing.replace(".", r"\.")):
        load_generator(copy)


def test_generator_bundle_truncated_weights(trained, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(trained[0], copy, ignore=shutil.ignore_patterns("cache", "runs"))
    w = copy / "generator.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(BundleCorrupt, match="generator.safetensors"):
        load_generator(copy)
    with pytest.raises(BundleCorrupt):
        load_generator(tmp_path / "nope")


def test_postnet_train_load_apply(trained, may, tmp_path):
    out = train_postnet(may, trained[0], tmp_path / "pn", preset="smoke", progress=False)
    m = json.loads((out / "metrics.json").read_text())
    assert m["val_mouth_lmd"] <= m["generator_val_mouth_lmd"] + 1e-9  # selection never picks worse than identity
    assert m["corpus_clips"] >= 1 and len(m["history"]) >= 2
    pn = load_postnet(out, device="cpu")
    x = np.random.default_rng(0).standard_normal((300, 68, 3)).astype(np.float32) * 0.05
    y = pn.apply(x)
    assert y.shape == x.shape and np.isfinite(y).all()
    np.testing.assert_allclose(pn.apply(x, chunk=17), y, atol=1e-5)
    with pytest.raises(InvalidInput):
        pn.apply(np.zeros((10, 68, 2), np.float32))
    (out / "postnet.safetensors").unlink()
    with pytest.raises(BundleCorrupt, match="postnet.safetensors"):
        load_postnet(out)
    with pytest.raises(OutputExists):
        train_postnet(may, trained[0], out, preset="smoke", progress=False)


def test_postnet_amplitude_calibration(trained, may, tmp_path):
    """The fitted speech-amplitude gain (issue 18) restores the real opening size on the training frames,
    keeps the timing (Pearson r) and the rest shape, and old bundles without it load as gain 1."""
    from avatar.data import Dataset
    from avatar.motion.metrics import mouth_opening, pearson

    out = train_postnet(may, trained[0], tmp_path / "pn", preset="smoke", progress=False)
    m = json.loads((out / "metrics.json").read_text())
    pn = load_postnet(out, device="cpu")
    assert 1.0 <= pn.gain <= POST_PRESETS["smoke"].amplitude_gain_max and pn.gain == m["amplitude_gain"]
    ds, gen = Dataset(may), load_generator(trained[0], device="cpu")
    mean = np.asarray(ds.lm3d_mean, np.float32)
    tr = slice(ds.train_range.start, ds.train_range.stop)
    real = mouth_opening(np.asarray(ds.lm3d, np.float32))[tr]
    pred = gen.predict(np.asarray(ds.features, np.float32), temperature=1.0, seed=0)
    calibrated = mouth_opening(pn.apply(pred) + mean)[tr]
    plain_pn = load_postnet(out, device="cpu")
    plain_pn.gain = 1.0
    plain = mouth_opening(plain_pn.apply(pred) + mean)[tr]
    assert plain.std() / real.std() == pytest.approx(m["train_open_std_ratio"], rel=1e-4)
    # the size is the real one (or the clipped gain's best; the opening is a norm, so ~linear), the timing is untouched
    assert (
        calibrated.std() / real.std() == pytest.approx(min(1.0, m["train_open_std_ratio"] * pn.gain), rel=2e-2)
        or m["train_open_std_ratio"] > 1.0
    )
    assert pearson(calibrated, real) == pytest.approx(pearson(plain, real), abs=5e-3)
    # y' = rest + gain (y - rest) on the jaw + mouth only (the rest shape is the fixed point)
    lower = np.r_[0:17, 48:68]
    moved = pn.apply(pred[:50]) - plain_pn.apply(pred[:50])
    expect = (pn.gain - 1.0) * (plain_pn.apply(pred[:50])[:, lower] - pn.rest[lower])
    np.testing.assert_allclose(moved[:, lower], expect, atol=1e-5)
    assert np.abs(np.delete(moved, lower, axis=1)).max() == 0.0  # brows, eyes, nose untouched
    # a bundle written before the calibration (no amplitude keys) is the plain postnet
    stats = json.loads((out / "stats.json").read_text())
    for k in ("amplitude_gain", "amplitude_rest"):
        stats.pop(k)
    (out / "stats.json").write_text(json.dumps(stats))
    assert load_postnet(out, device="cpu").gain == 1.0
    stats["amplitude_rest"] = [0.0] * 5
    (out / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(BundleCorrupt, match="amplitude"):
        load_postnet(out)


def test_postnet_divergence_is_reported(trained, may, tmp_path):
    cfg = replace(POST_PRESETS["smoke"], lr=1e30, lr_disc=1e30)  # explodes within steps
    with pytest.raises(TrainingDiverged, match="NaN"):
        train_postnet(may, trained[0], tmp_path / "pn", preset=cfg, progress=False)
    assert not (tmp_path / "pn").exists()


def test_lle_projection():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((40, 68, 3)).astype(np.float32)
    # an affine combination of 3 reference frames is reproduced by the projection (blend 1)
    x = (0.5 * ref[0] + 0.3 * ref[1] + 0.2 * ref[2])[None]
    proj = lle_project(x, ref[:3], k=3, blend=1.0, reg=1e-9)
    np.testing.assert_allclose(proj, x, atol=1e-4)
    y = rng.standard_normal((5, 68, 3)).astype(np.float32)
    assert np.array_equal(lle_project(y, ref, blend=0.0), y)
    half = lle_project(y, ref, blend=0.5)
    full = lle_project(y, ref, blend=1.0)
    np.testing.assert_allclose(half, 0.5 * y + 0.5 * full, atol=1e-5)
    with pytest.raises(InvalidInput):
        lle_project(y, ref[:0])
    with pytest.raises(InvalidInput):
        lle_project(y, ref, blend=1.5)


def test_metrics_on_real_clip(trained, gen, may, data_dir):
    from avatar.media import load_audio
    from avatar.motion.metrics import evaluate_audio, evaluate_motion, mouth_opening, pearson

    r = evaluate_motion(gen, may)
    for name in ("generator", "generator+lle"):
        v = r[name]
        assert set(v) >= {"mouth_lmd", "lmd", "mouth_lmd_px", "lmd_px", "mouth_open_r", "sync_conf"}
        assert 0 < v["mouth_lmd"] < 1 and v["mouth_lmd_px"] > 0
    wav = load_audio(data_dir / "audio" / "dreamtalk_french1.wav")
    a = evaluate_audio(gen, wav)
    assert a["seconds"] > 5 and np.isfinite(a["open_mean"])
    lm = np.zeros((3, 68, 3), np.float32)
    lm[:, 66, 1] = [0.0, 1.0, 2.0]
    assert mouth_opening(lm)[2] > mouth_opening(lm)[1] > mouth_opening(lm)[0]
    assert pearson([1, 2, 3], [2, 4, 7]) > 0.9


def test_cli_help_lists_motion_commands():
    from avatar.cli import build_parser

    p = build_parser()
    for cmd in ("train-generator", "train-postnet", "eval-motion"):
        with pytest.raises(SystemExit) as e:
            p.parse_args([cmd, "--help"])
        assert e.value.code == 0


def _bars(err: str) -> bool:
    """Whether ``err`` holds tqdm progress-bar output."""
    return "%|" in err or "\r" in err


def test_cli_train_generator_and_postnet_seed_and_quiet(trained, may, tmp_path, capfd):
    """``train-generator`` / ``train-postnet`` ``--seed``: the same seed gives identical weights, another
    seed other weights; ``-q`` prints no progress bar (the run without it does)."""
    from safetensors.torch import load_file

    from avatar.cli import main
    from avatar.motion.generator import GENERATOR_FILE

    gen_dir = trained[0]

    def generator(seed: int, name: str, *flags: str) -> tuple[dict, str]:
        out = tmp_path / name
        shutil.copytree(gen_dir / "cache", out / "cache")  # the corpus preprocessed once, by the fixture
        assert (
            main(
                [
                    "train-generator",
                    str(gen_dir.parent / "corpus"),
                    "--out",
                    str(out),
                    "--preset",
                    "cpu-smoke",
                    "--seed",
                    str(seed),
                    "--device",
                    "cpu",
                    *flags,
                ]
            )
            == 0
        )
        return load_file(str(out / GENERATOR_FILE)), capfd.readouterr().err

    def postnet(seed: int, name: str, *flags: str) -> tuple[dict, str]:
        out = tmp_path / name
        assert (
            main(
                [
                    "train-postnet",
                    str(may),
                    "--generator",
                    str(gen_dir),
                    "--out",
                    str(out),
                    "--preset",
                    "cpu-smoke",
                    "--seed",
                    str(seed),
                    "--device",
                    "cpu",
                    *flags,
                ]
            )
            == 0
        )
        return load_file(str(out / "postnet.safetensors")), capfd.readouterr().err

    for train in (generator, postnet):
        (a, err_a), (b, err_b), (c, err_c) = (train(0, "a", "-q"), train(0, "b", "-q"), train(1, "c"))
        assert not _bars(err_a) and not _bars(err_b) and _bars(err_c), (train.__name__, err_a[-500:])
        assert a.keys() == b.keys() == c.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), train.__name__
        assert any(not torch.equal(a[k], c[k]) for k in a), train.__name__
        for d in ("a", "b", "c"):
            shutil.rmtree(tmp_path / d)


def test_feature_kind_mismatch_between_dataset_and_generator(trained, may, tmp_path):
    """A generator trained on one kind refuses datasets/features of another, naming both kinds."""
    from avatar.motion.metrics import evaluate_motion

    copy = tmp_path / "hub"
    shutil.copytree(trained[0], copy, ignore=shutil.ignore_patterns("cache", "runs"))
    stats = json.loads((copy / "stats.json").read_text())
    stats["feature_kind"] = "hubert"
    (copy / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(FeatureMismatch, match="hubert"):
        train_postnet(may, copy, tmp_path / "pn", preset="smoke", progress=False)
    with pytest.raises(FeatureMismatch, match="mel"):
        evaluate_motion(load_generator(copy), may)


def test_recipe_rejects_bad_arguments(tmp_path, data_dir):
    from avatar_recipes.train_generator import find_clips, train_generator

    with pytest.raises(InvalidInput, match="--hubert"):
        train_generator(data_dir / "corpus", tmp_path / "g", features="hubert")
    with pytest.raises(InvalidInput, match="preset"):
        train_generator(data_dir / "corpus", tmp_path / "g", preset="huge")
    with pytest.raises(InvalidInput, match="does not exist"):
        find_clips(tmp_path / "missing")
    pairs = dict((v.name, a) for v, a in find_clips(data_dir / "corpus"))
    assert pairs["KristiNoem.mp4"].name == "KristiNoem.wav" and pairs["retalking_face1.mp4"] is None


def test_hubert_features_path(tmp_path, data_dir):
    """A HuBERT-feature generator (tiny random HubertConfig, offline) predicts from HuBERT features of
    real audio, remembers its HuBERT directory, and refuses mel features."""
    from transformers import HubertConfig, HubertModel

    from avatar.audio import extract_features
    from avatar.media import load_audio
    from avatar.motion.bundle import MotionStats
    from avatar.motion.generator import Audio2Motion

    torch.manual_seed(0)
    hcfg = HubertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    HubertModel(hcfg).save_pretrained(tmp_path / "hubert")
    wav = load_audio(data_dir / "audio" / "RD_Radio31_000.wav")[: 16000 * 3]
    feats = extract_features(wav, "hubert", hubert_path=tmp_path / "hubert", n_frames=75)
    assert feats.shape == (150, 32)
    net = VAEFlowGenerator(replace(PRESETS["smoke"].generator, feature_dim=32))
    stats = MotionStats(
        "hubert",
        feats.mean(0).tolist(),
        (feats.std(0) + 1e-5).tolist(),
        [0.0] * 204,
        [0.01] * 204,
        {"hubert_path": str(tmp_path / "hubert")},
    )
    a2m = Audio2Motion(net, stats, device="cpu")
    assert a2m.predict(feats, feature_kind="hubert").shape == (75, 68, 3)
    assert a2m.hubert_path == str(tmp_path / "hubert")
    with pytest.raises(FeatureMismatch):
        a2m.predict(extract_features(wav, "mel", n_frames=75), feature_kind="mel")
