"""Emotion deltas (avatar.motion.emotion): schedule, EAT-style category model (tiny training on real
MEAD clips), EAMM-style reference video, lip-sync preservation, clamping, errors."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from avatar.errors import AvatarNotFound, InvalidInput, InvalidMedia, NoFaceDetected
from avatar.motion import emotion as E
from avatar.pipeline.render import EMOTIONS, RenderOptions


# ------------------------------------------------------------------ schedule (no media needed)
def test_labels_match_render():
    assert set(E.LABELS) == set(EMOTIONS) and E.LABELS[0] == "neutral"


def test_parse_schedule():
    assert E.parse_emotion_schedule("happy") == [("happy", 0.0)]
    assert E.parse_emotion_schedule("neutral,happy@2.0,sad@5.5") == [("neutral", 0.0), ("happy", 2.0), ("sad", 5.5)]
    assert E.parse_emotion_schedule("happy@1") == [("neutral", 0.0), ("happy", 1.0)]
    for bad in ["joyful", "happy,sad", "happy@2,sad@1", "happy@x", "", "neutral,,sad@1"]:
        with pytest.raises(InvalidInput):
            E.parse_emotion_schedule(bad)


def test_render_options_accept_schedule_and_reject_bad_values():
    RenderOptions(emotion="neutral,happy@2.0,sad@5.5").validate()
    with pytest.raises(InvalidInput, match="unknown emotion"):
        RenderOptions(emotion="joyful").validate()
    with pytest.raises(InvalidInput, match="strength"):
        RenderOptions(emotion="happy", emotion_strength=-0.1).validate()
    with pytest.raises(InvalidInput, match="strength"):
        RenderOptions(emotion="happy", emotion_strength=1.6).validate()


def test_schedule_weights_crossfade():
    sched = E.parse_emotion_schedule("neutral,happy@2.0,sad@5.5")
    f = np.arange(0, 200)
    w = E.schedule_weights(sched, f)
    total = sum(w.values())
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    assert w["neutral"][:46].min() == 1.0 and w["happy"][60:130].min() == 1.0 and w["sad"][150:].min() == 1.0
    # smooth: no weight jumps by more than a crossfade step (0.3 s = 7.5 frames, raised cosine)
    for v in w.values():
        assert np.abs(np.diff(v)).max() < 0.25
    # block-wise evaluation equals whole-range evaluation (absolute frame indices)
    blocks = [E.schedule_weights(sched, f[i : i + 8])["happy"] for i in range(0, 200, 8)]
    np.testing.assert_array_equal(np.concatenate(blocks), w["happy"])


def test_clip_names_speakers_and_aliases(tmp_path):
    names = [
        "M030_front_happy_level3_001.mp4",
        "filby89+spectre__MEAD_M030_level_3_angry_016.mp4",
        "filby89+spectre__MEAD_W015_level_1_neutral_030.mp4",
        "eamm_sad.mp4",
        "eamm_fear.mp4",
        "filby89+spectre__LRS3_00002.mp4",
        "notes.txt",
    ]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    got = E.list_clips(tmp_path)
    assert got.keys() == {"M030", "W015", "eamm_sad", "eamm_fear"}
    assert sorted(lab for lab, _ in got["M030"]) == ["angry", "happy"]
    merged = E.list_clips([tmp_path], aliases={"eamm_sad": "M030"})
    assert sorted(lab for lab, _ in merged["M030"]) == ["angry", "happy", "sad"] and "eamm_sad" not in merged
    with pytest.raises(InvalidInput):
        E.list_clips([tmp_path, tmp_path / "missing"])


def test_mirror_and_symmetrize():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(68, 3))
    np.testing.assert_allclose(E.mirror(E.mirror(d)), d)
    s = E.symmetrize(d)
    np.testing.assert_allclose(E.mirror(s), s)
    # a one-sided smile (right corner only) becomes half on each side
    one = np.zeros((68, 3))
    one[54] = [0.1, -0.05, 0.0]
    sym = E.symmetrize(one)
    np.testing.assert_allclose(sym[54], [0.05, -0.025, 0.0])
    np.testing.assert_allclose(sym[48], [-0.05, -0.025, 0.0])


# ------------------------------------------------------------------ real clips, tiny training
CLIPS = [
    "M030_front_neutral_level1_001",
    "M030_front_happy_level3_001",
    "M030_front_surprised_level3_001",
    "W009_front_neutral_level1_001",
    "W009_front_happy_level3_001",
    "W009_front_surprised_level3_001",
]


@pytest.fixture(scope="module")
def clip_dir(data_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    for name in CLIPS:
        (d / f"{name}.mp4").symlink_to(data_dir / "emotion" / f"{name}.mp4")
    (d / "notes.txt").write_text("ignored")
    (d / "M030_front_unlabelled.mp4").symlink_to(data_dir / "emotion" / f"{CLIPS[0]}.mp4")
    return d


@pytest.fixture(scope="module")
def tracks(clip_dir):
    return E.track_speakers(clip_dir, progress=False)


@pytest.fixture(scope="module")
def trained(tracks, tmp_path_factory):
    """Tiny model trained on M030 only, held-out W009 -> (store root, metrics)."""
    store = tmp_path_factory.mktemp("store")
    cfg = E.EmotionConfig(hidden=64, code_dim=32, steps=300, batch=128, holdout="W009")
    metrics = E.train_emotion(None, store / "shared" / "emotion", cfg, progress=False, tracks=tracks)
    return store, metrics


def _models(store, st):
    """An avatar stand-in with the real W009 neutral track as its training landmarks."""
    root = store / "avatars" / "w009"
    root.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(root=root, lm3d_mean=st.neutral_mean, lm3d_ref=st.clips["neutral"][0])


def test_tracking_and_listing(tracks):
    by = {st.speaker: st for st in tracks}
    assert set(by) == {"M030", "W009"}
    for st in tracks:
        assert set(st.clips) == {"neutral", "happy", "surprised"}
        assert st.neutral_mean.shape == (68, 3)
        # the dataset convention: outer-eye-corner distance of the neutral mean is 1
        assert np.linalg.norm(st.neutral_mean[36] - st.neutral_mean[45]) == pytest.approx(1.0, abs=1e-4)
    # real expressions: surprise raises the brows (y down), happiness widens the mouth
    for st in tracks:
        d_sur = st.clips["surprised"][0].mean(0) - st.neutral_mean
        d_hap = st.clips["happy"][0].mean(0) - st.neutral_mean
        assert d_sur[17:27, 1].mean() < 0
        assert d_hap[54, 0] - d_hap[48, 0] > 0


def test_training_writes_artifacts_and_generalises(trained):
    store, metrics = trained
    out = store / "shared" / "emotion"
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "metrics.json"}
    assert json.loads((out / "metrics.json").read_text())["holdout"]["speaker"] == "W009"
    assert metrics["train_speakers"] == ["M030"]
    rows = metrics["holdout"]["labels"]
    assert set(rows) == {"happy", "surprised"}
    # direction learned on M030 transfers to the held-out speaker W009
    for label, r in rows.items():
        assert r["cosine"] > 0.3, (label, r)
    net = E.load_emotion_model(out)
    assert net.cfg.hidden == 64
    # the two baselines sit beside the model's rows; with one training speaker both are "copy M030"
    base = metrics["holdout"]["baselines"]
    assert set(base) == {"happy", "surprised"}
    for label, b in base.items():
        assert b["n_train"] == 1 and b["average_cos"] == pytest.approx(b["copy_cos"])
    assert metrics["recorded_neutral"] == ["M030"]


def test_calibration_gives_real_size_on_training_speaker(trained, tracks):
    """Strength 1 = the real displacement size (on the training speaker with a recorded neutral)."""
    store, metrics = trained
    net = E.load_emotion_model(store / "shared" / "emotion")
    st = {s.speaker: s for s in tracks}["M030"]
    stats = net.neutral_stats()
    real = E.speaker_displacements(st, stats)
    assert set(metrics["gains"]) == {"happy", "surprised"}
    for label in ("happy", "surprised"):
        lm = st.clips[label][0]
        pred = net.predict(E.causal_windows(E.speech_features(lm, lm.mean(0)), net.cfg.window), label).mean(0)
        pred = pred * E.region_scale(stats.template, st.neutral_mean)
        assert E.norm(pred) / E.norm(real[label]) == pytest.approx(1.0, abs=0.1), label
    # the stored neutral statistics: M030's neutral is the template, its two labels the expression directions
    np.testing.assert_allclose(stats.template, E.similarity_fit(st.neutral_mean, stats.template), atol=1e-5)
    assert len(stats.id_basis) == 0 and len(stats.ex_basis) == 2


def test_category_delta_properties(trained, tracks):
    store, _ = trained
    st = {s.speaker: s for s in tracks}["W009"]
    models = _models(store, st)
    lm = st.clips["neutral"][0][:40].copy()
    frames = np.arange(100, 140)

    # strength 0: bit-identical, nothing loaded
    f0 = E.build_emotion_delta(models, RenderOptions(emotion="happy", emotion_strength=0.0))
    assert np.array_equal(f0(lm, frames), lm)

    f = E.build_emotion_delta(models, RenderOptions(emotion="happy", emotion_strength=1.0))
    out = f(lm, frames)
    assert out.dtype == np.float32 and out.shape == lm.shape
    frozen = list(E.FROZEN)
    np.testing.assert_array_equal(out[:, frozen], lm[:, frozen])  # lip closure + lower jaw untouched
    moved = np.linalg.norm(out - lm, axis=-1)
    assert moved[:, [48, 54]].mean() > 1e-3
    # the smile widens the mouth corners on the held-out speaker
    d = (out - lm).mean(0)
    assert d[54, 0] - d[48, 0] > 0
    # mouth LMD vs the neutral output is small (only corners and their neighbours move)
    assert moved[:, 48:68].mean() < 0.05
    # deterministic and block-wise == whole
    g = E.build_emotion_delta(models, RenderOptions(emotion="happy"))
    blocks = np.concatenate([g(lm[i : i + 8], frames[i : i + 8]) for i in range(0, 40, 8)])
    np.testing.assert_allclose(blocks, out, atol=1e-6)
    # strength scales the displacement (before clamping: compare small strengths)
    a = E.build_emotion_delta(models, RenderOptions(emotion="happy", emotion_strength=0.2))(lm, frames) - lm
    b = E.build_emotion_delta(models, RenderOptions(emotion="happy", emotion_strength=0.4))(lm, frames) - lm
    assert np.linalg.norm(b) > 1.5 * np.linalg.norm(a)


def test_schedule_switches_over_time(trained, tracks):
    store, _ = trained
    st = {s.speaker: s for s in tracks}["W009"]
    models = _models(store, st)
    lm = st.clips["neutral"][0][:75].copy()
    frames = np.arange(75)
    out = E.build_emotion_delta(models, RenderOptions(emotion="neutral,happy@1.0"))(lm, frames)
    happy = E.build_emotion_delta(models, RenderOptions(emotion="happy"))(lm, frames)
    np.testing.assert_array_equal(out[:21], lm[:21])  # before 0.85 s: neutral, exact
    np.testing.assert_allclose(out[29:], happy[29:], atol=1e-6)  # after 1.15 s: happy
    step = np.abs(np.diff(out - lm, axis=0)).max()
    assert step < 0.5 * np.abs(happy - lm).max() + 1e-6  # crossfade, no jump


def test_clamp_stays_near_person_range(trained, tracks):
    store, _ = trained
    st = {s.speaker: s for s in tracks}["W009"]
    models = _models(store, st)
    lm = st.clips["neutral"][0][:20].copy()
    out = E.build_emotion_delta(models, RenderOptions(emotion="surprised", emotion_strength=1.5))(lm, np.arange(20))
    ref = models.lm3d_ref
    lo, hi = ref.min(0), ref.max(0)
    pad = E.CLAMP_MARGIN * (hi - lo)
    assert np.all(out >= np.minimum(lo - pad, lm) - 1e-6) and np.all(out <= np.maximum(hi + pad, lm) + 1e-6)


def test_missing_model_is_actionable(tracks, tmp_path):
    st = tracks[0]
    models = _models(tmp_path, st)
    with pytest.raises(AvatarNotFound, match="avatar train-emotion"):
        E.build_emotion_delta(models, RenderOptions(emotion="sad"))
    # all-neutral schedules need no model and change nothing
    f = E.build_emotion_delta(models, RenderOptions(emotion="neutral"))
    lm = st.clips["neutral"][0][:8]
    assert np.array_equal(f(lm, np.arange(8)), lm)
    with pytest.raises(InvalidInput):
        E.build_emotion_delta(models, SimpleNamespace(emotion="joyful", emotion_strength=1.0, emotion_video=None))
    with pytest.raises(InvalidInput):
        E.build_emotion_delta(models, SimpleNamespace(emotion="happy", emotion_strength=-1.0, emotion_video=None))


# ------------------------------------------------------------------ reference video (EAMM)
def test_reference_video_delta(tracks, data_dir, tmp_path):
    st = {s.speaker: s for s in tracks}["W009"]
    models = _models(tmp_path, st)
    ref = str(data_dir / "emotion" / "M030_front_surprised_level3_001.mp4")
    f = E.build_emotion_delta(models, RenderOptions(emotion_video=ref, emotion_strength=1.0))
    disp = models._emotion_ref_cache[next(iter(models._emotion_ref_cache))]
    n = len(disp)
    assert n == 94
    np.testing.assert_array_equal(disp[:, list(E.FROZEN)], 0.0)  # mouth occluded: speech does not leak
    assert np.abs(disp[:, 17:27]).max() > 1e-3  # brows move
    raw = E.reference_displacement(ref, models.lm3d_mean, smooth_s=0.0)
    jitter = lambda x: np.abs(np.diff(x, 2, axis=0)).mean()  # noqa: E731
    assert jitter(disp) < 0.7 * jitter(raw)  # temporally smoothed
    lm = np.repeat(st.neutral_mean[None], 3 * n, axis=0)
    frames = np.arange(3 * n)
    out = f(lm, frames)
    d = out - lm
    np.testing.assert_array_equal(d[:, list(E.FROZEN)], 0.0)
    # ping-pong loop: frame n-1+j mirrors frame n-1-j, no jump at the loop point
    np.testing.assert_allclose(d[n : 2 * n - 1], d[n - 2 :: -1][: n - 1], atol=1e-6)
    step = np.abs(np.diff(d, axis=0)).max(axis=(1, 2))
    assert step[n - 3 : n + 2].max() <= step[: n - 1].max() + 1e-6  # no jump at the loop point
    assert np.array_equal(
        E.build_emotion_delta(models, RenderOptions(emotion_video=ref, emotion_strength=0.0))(lm, frames), lm
    )


def _real(st, label):
    return (st.clips[label][0].mean(0) - st.neutral_mean) * E.MOVABLE_MASK


def test_reference_video_transfers_direction_and_size(trained, tracks, data_dir):
    """Issue 14: another person's emotional clip carries its expression onto the avatar (W009):
    the transferred delta points like W009's real neutral->surprised displacement and has its size,
    with the reference person's neutral clip and with the shared-statistics estimate (the trained
    model's). The lips and lower jaw stay with the audio."""
    store, _ = trained
    st = {s.speaker: s for s in tracks}["W009"]
    models = _models(store, st)
    ref = str(data_dir / "emotion" / "M030_front_surprised_level3_001.mp4")
    real = _real(st, "surprised")
    for neutral in (str(data_dir / "emotion" / "M030_front_neutral_level1_001.mp4"), None):
        models.__dict__.pop("_emotion_ref_cache", None)
        opts = RenderOptions(emotion_video=ref, emotion_neutral_video=neutral)
        f = E.build_emotion_delta(models, opts)
        disp = next(iter(models._emotion_ref_cache.values()))
        d = disp.mean(0)
        assert E.cosine(d, real) >= 0.6, neutral
        assert 0.7 <= E.norm(d) / E.norm(real) <= 1.3, neutral
        lm = st.clips["neutral"][0]
        out = f(lm, np.arange(len(lm)))
        np.testing.assert_array_equal(out[:, list(E.FROZEN)], lm[:, list(E.FROZEN)])
        assert np.linalg.norm(out - lm, axis=-1)[:, 48:68].mean() < 0.05  # mouth LMD vs neutral


def test_neutral_estimate_from_shared_statistics(tracks, data_dir):
    """Without any neutral clip of W009, her displacement measured against the shared-statistics
    neutral (M030 + W015 neutral shapes, M030's expression directions) points like the one measured
    against her recorded neutral, better than against the aligned template alone."""
    w015 = data_dir / "corpus2" / "filby89+spectre__MEAD_W015_level_1_neutral_030.mp4"
    if not w015.is_file():
        pytest.skip(f"{w015} not present")
    (lm,), _ = E.canonicalise_speaker([E.track_clip(w015)])
    by = {s.speaker: s for s in tracks}
    m030, w009 = by["M030"], by["W009"]
    stats = E.build_neutral_stats([m030.neutral_mean, lm.mean(0)], [_real(m030, lab) for lab in ("happy", "surprised")])
    basis = stats.id_basis.reshape(len(stats.id_basis), -1)
    assert basis.shape == (1, 204) and np.allclose(basis @ basis.T, 1.0, atol=1e-5)
    full, template_only = [], []
    for label in ("happy", "surprised"):
        real, clip_mean = _real(w009, label), w009.clips[label][0].mean(0)
        full.append(E.cosine(clip_mean - E.estimate_neutral(clip_mean, stats), real))
        template_only.append(E.cosine(clip_mean - E.estimate_neutral(clip_mean, stats.template), real))
    assert np.mean(full) >= 0.7 and np.mean(full) > np.mean(template_only), (full, template_only)


def test_reference_neutral_segment(tracks, data_dir):
    """A clip that starts neutral and then shows the emotion is measured against its own neutral
    segment; a clip that holds one expression throughout is not (its least expressive frames are
    still expressive)."""
    st = {s.speaker: s for s in tracks}["W009"]
    m030 = {s.speaker: s for s in tracks}["M030"]
    stats = E.NeutralStats.from_template(m030.neutral_mean)
    neu = E.track_clip(data_dir / "emotion" / "W009_front_neutral_level1_001.mp4")
    emo = E.track_clip(data_dir / "emotion" / "W009_front_surprised_level3_001.mp4")
    joined = E.TrackedClip(neu.path, np.concatenate([neu.points, emo.points]))
    r = E.measure_reference(joined, None, stats)
    assert r.neutral_source == "segment"
    d = r.disp[len(neu.points) :].mean(0)
    real = _real(st, "surprised")
    assert E.cosine(d, real) > 0.9 and 0.8 < E.norm(d) / E.norm(real) < 1.2
    held = E.measure_reference(emo, None, stats)
    assert held.neutral_source == "estimate"
    # the old behaviour (subtracting the clip's own mean) would leave no mean expression at all
    assert E.norm(held.disp.mean(0)) > 0.5 * E.norm(real)
    with pytest.raises(ValueError):
        E.measure_reference(emo, None, None)


def test_reference_video_errors(tracks, tmp_path):
    from avatar.media import VideoWriter

    models = _models(tmp_path, tracks[0])
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    with pytest.raises(InvalidMedia):
        E.build_emotion_delta(models, RenderOptions(emotion_video=str(bad)))
    with pytest.raises(InvalidMedia, match="not found"):
        E.build_emotion_delta(models, RenderOptions(emotion_video=str(tmp_path / "missing.mp4")))
    blank = tmp_path / "blank.mp4"
    with VideoWriter(blank, fps=25, size=(128, 128)) as w:
        for _ in range(20):
            w.write(np.full((128, 128, 3), 127, np.uint8))
    with pytest.raises(NoFaceDetected, match="face"):
        E.build_emotion_delta(models, RenderOptions(emotion_video=str(blank)))


# ------------------------------------------------------------------ CLI
def test_cli_errors(tmp_path):
    from avatar.cli import main

    assert main(["train-emotion", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == InvalidInput.exit_code
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train-emotion", str(empty), "--out", str(tmp_path / "o")]) == InvalidInput.exit_code


def test_cli_seed_and_quiet(clip_dir, tmp_path, capfd):
    """``train-emotion --seed``: the same seed gives identical weights, another seed other weights;
    ``-q`` hides the progress bars (tracking and training), which show without it."""
    from safetensors.torch import load_file

    from avatar.cli import main

    def run(seed: int, name: str, *flags: str) -> tuple[dict, str]:
        out = tmp_path / name
        assert (
            main(
                [
                    "train-emotion",
                    str(clip_dir),
                    "--out",
                    str(out),
                    "--steps",
                    "20",
                    "--seed",
                    str(seed),
                    "--cache",
                    str(tmp_path / "cache"),
                    "--device",
                    "cpu",
                    *flags,
                ]
            )
            == 0
        )
        return load_file(str(out / "model.safetensors")), capfd.readouterr().err

    a, err_a = run(0, "a", "-q")
    b, err_b = run(0, "b", "-q")
    c, err_c = run(1, "c")
    for err in (err_a, err_b):
        assert "%|" not in err and "\r" not in err and "train-emotion:" not in err, err[-500:]
    assert "train-emotion: 100%|" in err_c  # the bar the -q runs hid
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
