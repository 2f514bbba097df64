"""avatar.audio on real speech: 50 Hz alignment, chunked == single pass, streaming == batch, HuBERT path."""

from __future__ import annotations

import json

import librosa
import numpy as np
import pytest
import torch

from avatar.audio import (
    FEATURE_KINDS,
    FeatureExtractor,
    FeatureStats,
    StreamingFeatureExtractor,
    audio_energy,
    extract_features,
    n_feature_frames,
)
from avatar.errors import FeatureMismatch, InvalidInput, NoAudio
from avatar.media import load_audio


@pytest.fixture(scope="module")
def eng(data_dir) -> np.ndarray:
    """First 10.01 s of real English speech at 16 kHz (odd length on purpose)."""
    return load_audio(data_dir / "audio" / "eng.wav")[: 160_000 + 163]


@pytest.fixture(scope="module")
def hubert_dir(tmp_path_factory):
    """A tiny randomly initialised HuBERT (same architecture family as hubert-large: layer-norm
    conv front end, stable layer norm) saved with save_pretrained, like a real local checkpoint."""
    from transformers import HubertConfig, HubertModel

    torch.manual_seed(0)
    cfg = HubertConfig(
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
    path = tmp_path_factory.mktemp("hubert_tiny")
    HubertModel(cfg).save_pretrained(path)
    return path


def _stream(extractor: StreamingFeatureExtractor, wav: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    outs, i = [], 0
    while i < len(wav):
        k = int(rng.choice([0, 1, 7, 320, 333, 1000, 4800, 9999]))
        outs.append(extractor.push(wav[i : i + k]))
        i += k
    outs.append(extractor.flush())
    assert all(o.dtype == np.float32 and o.shape[1] == extractor.dim for o in outs)
    return np.concatenate(outs)


def test_mel_shape_rate_and_video_alignment(eng, data_dir):
    assert FEATURE_KINDS == ("mel", "hubert")
    f = extract_features(eng)
    assert f.dtype == np.float32 and f.shape == (n_feature_frames(len(eng)), 80) == (501, 80)
    assert np.isfinite(f).all() and f.min() >= -5.0
    n = len(eng) // 640  # 250 whole video frames
    g = extract_features(eng, n_frames=n)
    assert g.shape == (2 * n, 80) and np.array_equal(g, f[: 2 * n])
    h = extract_features(eng, n_frames=n + 3)  # longer video: edge frames repeated
    assert h.shape == (2 * n + 6, 80)
    assert np.array_equal(h[: len(f)], f) and np.array_equal(h[len(f) :], np.repeat(f[-1:], 2 * n + 6 - len(f), 0))
    # 48 kHz stereo news speech, resampled by load_audio
    news = load_audio(data_dir / "audio" / "chinese_news.wav")
    fn = extract_features(news, n_frames=200)
    assert fn.shape == (400, 80) and np.isfinite(fn).all()


def test_mel_centring_matches_librosa(eng):
    """Frame t is centred on sample 320 t + 160: equals librosa's centred STFT of audio shifted by 160."""
    f = extract_features(eng[:48_000])
    ref = librosa.feature.melspectrogram(
        y=eng[160:48_000],
        sr=16000,
        n_fft=1024,
        hop_length=320,
        win_length=640,
        n_mels=80,
        fmin=55,
        fmax=7600,
        power=1.0,
        center=True,
        pad_mode="constant",
    )
    ref = np.log10(np.maximum(ref, 1e-5)).T
    assert np.abs(f[2:140] - ref[2:140]).max() < 1e-4


def test_mel_chunked_equals_single_pass(eng):
    single = extract_features(eng, chunk_s=60.0)
    chunked = extract_features(eng, chunk_s=1.37)
    assert chunked.shape == single.shape
    assert np.abs(chunked - single).max() <= 1e-5


def test_mel_streaming_equals_batch(eng):
    s = StreamingFeatureExtractor("mel")
    assert s.lookahead_samples == 512
    out = _stream(s, eng, seed=1)
    batch = extract_features(eng)
    assert out.shape == batch.shape
    assert np.abs(out - batch).max() <= 1e-5
    # a frame is emitted as soon as its centre + lookahead is available, not later
    s.reset()
    got = s.push(eng[:16000])
    assert len(got) == (16000 - 160 - 512) // 320 + 1
    with pytest.raises(InvalidInput):
        s.flush()
        s.push(eng[:10])


def test_silence_energy_and_mel(eng):
    silence = np.zeros(16000, np.float32)
    e = audio_energy(silence, 25)
    assert e.shape == (25,) and e.dtype == np.float32 and np.all(e == 0)
    m = extract_features(silence)
    assert np.isfinite(m).all() and np.allclose(m, -5.0)
    noise = np.random.default_rng(0).normal(0, 1e-4, 16000).astype(np.float32)
    en = audio_energy(noise, 25)
    assert en.max() < 2e-4 and en.std() < 5e-5  # low and flat
    speech = audio_energy(eng, len(eng) // 640)
    assert np.median(speech) > 50 * en.max()
    i = 100
    assert speech[i] == pytest.approx(np.sqrt(np.mean(eng[640 * i : 640 * (i + 1)].astype(np.float64) ** 2)), rel=1e-5)
    # loud video frames have louder mel frames (the two features agree on timing)
    mel_loud = extract_features(eng, n_frames=len(speech)).reshape(len(speech), 2, 80).mean((1, 2))
    assert np.corrcoef(np.log(speech + 1e-6), mel_loud)[0, 1] > 0.8


def test_hubert_single_pass_matches_model(eng, hubert_dir):
    from transformers import HubertModel

    wav = eng[: 48_000 + 77]
    f = extract_features(wav, "hubert", hubert_path=hubert_dir)
    n = n_feature_frames(len(wav))
    assert f.shape == (n, 32) and f.dtype == np.float32
    model = HubertModel.from_pretrained(hubert_dir).eval()
    x = (wav - wav.mean()) / np.sqrt(wav.var() + 1e-7)
    x = np.concatenate([np.zeros(40, np.float32), x, np.zeros(320 * (n - 1) + 400 - 40 - len(wav), np.float32)])
    with torch.no_grad():
        ref = model(torch.from_numpy(x)[None]).last_hidden_state[0].numpy()
    assert np.abs(f - ref).max() < 1e-4
    g = extract_features(wav, "hubert", hubert_path=hubert_dir, n_frames=len(wav) // 640)
    assert g.shape == (2 * (len(wav) // 640), 32)


def test_hubert_chunked_vs_single_pass(eng, hubert_dir):
    eng = eng[:96_000]
    single = extract_features(eng, "hubert", hubert_path=hubert_dir, chunk_s=60.0)
    # context covering the whole clip: the block arithmetic itself is exact
    full_ctx = extract_features(eng, "hubert", hubert_path=hubert_dir, chunk_s=2.0, context_s=8.0)
    assert np.abs(full_ctx - single).max() < 1e-4
    # bounded context: global attention makes this approximate; more context is closer
    errs = [
        np.abs(extract_features(eng, "hubert", hubert_path=hubert_dir, chunk_s=2.0, context_s=c) - single).mean()
        for c in (0.5, 4.0)
    ]
    assert errs[1] < errs[0]


def test_hubert_streaming_equals_batch(eng, hubert_dir):
    s = StreamingFeatureExtractor("hubert", hubert_path=hubert_dir, block_s=0.2, context_s=0.4)
    assert s.lookahead_samples == 320 * 30 - 120
    wav = eng[: 48_000 + 5]
    out = _stream(s, wav, seed=2)
    batch = extract_features(wav, "hubert", hubert_path=hubert_dir, chunk_s=0.2, context_s=0.4)
    assert out.shape == batch.shape == (n_feature_frames(len(wav)), 32)
    assert np.abs(out - batch).max() < 1e-4


def test_feature_extractor_caches_and_describes(eng, hubert_dir):
    a = FeatureExtractor("hubert", hubert_path=hubert_dir)
    b = FeatureExtractor("hubert", hubert_path=str(hubert_dir))
    assert a._backend.model is b._backend.model  # loaded once
    d = a.describe()
    assert d["kind"] == "hubert" and d["dim"] == 32 and d["rate_hz"] == 50 and len(d["config_sha256"]) == 64
    json.dumps(d)
    mel = FeatureExtractor("mel")
    assert mel.dim == 80 and mel.describe()["n_mels"] == 80
    assert mel(eng[:16000], n_frames=25).shape == (50, 80)


def test_errors(tmp_path, hubert_dir):
    with pytest.raises(NoAudio):
        extract_features(np.zeros(0, np.float32))
    with pytest.raises(InvalidInput, match="float"):
        extract_features(np.zeros(1000, np.int16))
    with pytest.raises(InvalidInput, match="mono"):
        extract_features(np.zeros((1000, 2), np.float32))
    with pytest.raises(InvalidInput, match="NaN"):
        extract_features(np.full(1000, np.nan, np.float32))
    with pytest.raises(InvalidInput, match="unknown audio feature kind"):
        extract_features(np.zeros(1000, np.float32), kind="deepspeech")
    with pytest.raises(InvalidInput, match="hubert_path"):
        extract_features(np.zeros(1000, np.float32), kind="hubert")
    with pytest.raises(InvalidInput, match="not found"):
        FeatureExtractor("hubert", hubert_path=tmp_path / "nope")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(InvalidInput, match="not HuBERT"):
        FeatureExtractor("hubert", hubert_path=tmp_path / "bert")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((hubert_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(InvalidInput, match="safetensors"):
        FeatureExtractor("hubert", hubert_path=pickled)
    with pytest.raises(InvalidInput):
        audio_energy(np.zeros(100, np.float32), 0)


def test_feature_stats(eng):
    f = extract_features(eng)
    stats = FeatureStats.fit(f[i : i + 97] for i in range(0, len(f), 97))
    assert stats.mean.dtype == np.float32 and stats.mean.shape == (80,)
    assert np.allclose(stats.mean, f.mean(0), atol=1e-4) and np.allclose(stats.std, f.std(0), rtol=1e-4)
    z = stats.normalize(f)
    assert np.allclose(z.mean(0), 0, atol=1e-3) and np.allclose(z.std(0), 1, atol=1e-3)
    back = FeatureStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert np.array_equal(back.mean, stats.mean) and np.array_equal(back.std, stats.std)
    with pytest.raises(FeatureMismatch):
        stats.normalize(np.zeros((3, 1024), np.float32))
    with pytest.raises(InvalidInput):
        FeatureStats.fit([])
    with pytest.raises(InvalidInput):
        FeatureStats.from_dict({"mean": [0.0]})


@pytest.mark.cuda
def test_hubert_on_cuda_matches_cpu(eng, hubert_dir):
    wav = eng[:32_000]
    cpu = FeatureExtractor("hubert", hubert_path=hubert_dir, device="cpu")(wav)
    gpu = FeatureExtractor("hubert", hubert_path=hubert_dir, device="cuda")(wav)
    assert gpu.dtype == np.float32 and gpu.shape == cpu.shape
    assert np.abs(cpu - gpu).max() < 1e-2  # TF32 matmuls on Ampere/Hopper
