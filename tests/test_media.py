"""avatar.media on real clips: probing, 25 fps resampling, audio decoding, MP4 writing, bad inputs."""

from __future__ import annotations

import itertools
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

from avatar.errors import InvalidInput, InvalidMedia, NoAudio
from avatar.media import (
    VideoWriter,
    count_resampled_frames,
    iter_video_frames,
    load_audio,
    probe,
    resample_audio,
    write_wav,
)


def _best_corr(a: np.ndarray, b: np.ndarray, max_lag: int = 3000) -> float:
    """Max normalised correlation of a and b over lags in [-max_lag, max_lag] (codec delays)."""
    n = min(len(a), len(b)) - 2 * max_lag
    ref = b[max_lag : max_lag + n]
    best = -1.0
    for lag in range(0, 2 * max_lag + 1, 1):
        seg = a[lag : lag + n]
        if len(seg) < n:
            break
        c = float(np.dot(seg, ref) / (np.linalg.norm(seg) * np.linalg.norm(ref) + 1e-12))
        best = max(best, c)
    return best


def _encode_audio(src: np.ndarray, sr: int, path: Path, codec: str) -> None:
    """Encode a mono float waveform with PyAV (mp3 via libmp3lame, m4a via aac)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=sr)
        s.layout = "mono"
        fmt = "fltp" if codec == "aac" else "s16p"
        for i in range(0, len(src), 4096):
            x = src[i : i + 4096]
            if fmt == "s16p":
                x = (x * 32767).astype(np.int16)
            f = av.AudioFrame.from_ndarray(x[None, :], format=fmt, layout="mono")
            f.sample_rate = sr
            f.pts = i
            f.time_base = Fraction(1, sr)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)


def test_probe_and_first_seconds_of_speaker_clip(data_dir):
    path = data_dir / "speakers" / "acosta_cnn_71s.mp4"
    info = probe(path)
    assert info.has_video and info.has_audio
    assert (info.width, info.height) == (512, 512)
    assert info.fps == pytest.approx(25.0)
    assert info.audio_rate == 44100 and info.audio_channels in (1, 2)
    assert 71.0 < info.duration_s < 71.5
    assert count_resampled_frames(info) == round(info.video_duration_s * 25)
    frames = list(itertools.islice(iter_video_frames(path), 60))  # first 2.4 s only
    assert len(frames) == 60
    assert all(f.shape == (512, 512, 3) and f.dtype == np.uint8 for f in frames)
    assert np.abs(frames[0].astype(int) - frames[30]).mean() > 0.5  # the video moves
    small = next(iter_video_frames(path, crop=(128, 96, 256), size=64))
    ref = frames[0][96 : 96 + 256, 128 : 128 + 256]
    assert small.shape == (64, 64, 3)
    assert np.abs(small.astype(float) - ref.reshape(64, 4, 64, 4, 3).mean((1, 3))).mean() < 2.0


def test_30fps_clip_resampled_to_25fps_by_timestamp(data_dir):
    path = data_dir / "corpus" / "KristiNoem.mp4"
    info = probe(path)
    assert info.fps == pytest.approx(30.0) and not info.has_audio
    native = list(iter_video_frames(path, fps=30, size=32))  # fps == source fps: every frame once
    assert len(native) == info.n_frames == count_resampled_frames(info, 30)
    out = list(iter_video_frames(path, fps=25, size=32))
    assert len(out) == count_resampled_frames(info) == round(info.duration_s * 25)
    # output frame i shows the source frame on screen at t = i / 25 s: index floor(i * 30 / 25)
    for i in range(0, len(out), 7):
        assert np.array_equal(out[i], native[(i * 6) // 5]), i


def test_silent_mp4_and_its_wav(data_dir):
    with pytest.raises(NoAudio, match="no audio stream"):
        load_audio(data_dir / "corpus" / "KristiNoem.mp4")
    wav = load_audio(data_dir / "corpus" / "KristiNoem.wav")
    info = probe(data_dir / "corpus" / "KristiNoem.wav")
    assert wav.dtype == np.float32 and wav.ndim == 1
    assert abs(len(wav) - info.duration_s * 16000) <= 2
    assert 0.01 < np.abs(wav).max() <= 1.0


@pytest.mark.parametrize("name,rate", [("chinese_news.wav", 48000), ("iplap_audio2.wav", 44100)])
def test_high_rate_audio_resampled_to_16k(data_dir, name, rate):
    path = data_dir / "audio" / name
    info = probe(path)
    assert info.audio_rate == rate
    wav = load_audio(path)
    assert wav.dtype == np.float32 and abs(len(wav) - round(info.duration_s * 16000)) <= 2
    raw, sr = soundfile.read(str(path), dtype="float32")
    ref = resample_audio(raw, sr)  # [T, C] array path gives the same signal
    assert abs(len(ref) - len(wav)) <= 2
    n = min(len(ref), len(wav))
    assert np.abs(ref[:n] - wav[:n]).max() < 2e-3
    # a 1 kHz tone keeps its frequency through 48 kHz -> 16 kHz
    t = np.arange(rate) / rate
    tone = resample_audio((0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32), rate)
    assert len(tone) == 16000
    assert np.argmax(np.abs(np.fft.rfft(tone))) == 1000


@pytest.mark.parametrize("codec,suffix", [("libmp3lame", ".mp3"), ("aac", ".m4a")])
def test_compressed_audio_from_real_wav(data_dir, tmp_path, codec, suffix):
    src = load_audio(data_dir / "audio" / "RD_Radio31_000.wav", sr=44100)[: 44100 * 3]
    path = tmp_path / f"speech{suffix}"
    _encode_audio(src, 44100, path, codec)
    info = probe(path)
    assert info.has_audio and not info.has_video and info.audio_rate == 44100
    wav = load_audio(path)
    assert abs(len(wav) - 3 * 16000) < 0.1 * 16000  # encoder priming/padding only
    ref = load_audio(data_dir / "audio" / "RD_Radio31_000.wav")[: 3 * 16000]
    assert _best_corr(wav, ref) > 0.95


def test_video_writer_round_trip(data_dir, tmp_path):
    audio = load_audio(data_dir / "audio" / "eng.wav")[: 16000 * 2]
    src = list(itertools.islice(iter_video_frames(data_dir / "corpus" / "WDA_KatieHill_000.mp4", size=(96, 64)), 50))
    out = tmp_path / "sub" / "out.mp4"
    with VideoWriter(out, fps=25, size=(96, 64), audio=audio, crf=18) as w:
        for f in src:
            w.write(f)
    assert w.n_frames == 50
    assert [p.name for p in out.parent.iterdir()] == ["out.mp4"]  # temp file renamed, none left
    info = probe(out)
    assert info.has_video and info.has_audio and (info.width, info.height) == (96, 64)
    assert info.fps == pytest.approx(25.0) and info.audio_rate == 16000
    assert info.duration_s == pytest.approx(2.0, abs=0.1)
    back = list(iter_video_frames(out))
    assert len(back) == 50 == count_resampled_frames(info)
    assert np.mean([np.abs(a.astype(int) - b).mean() for a, b in zip(src, back)]) < 6.0
    assert _best_corr(load_audio(out), audio, max_lag=1500) > 0.95


def test_video_writer_no_partial_file_on_error(tmp_path):
    out = tmp_path / "bad.mp4"
    with pytest.raises(RuntimeError):
        with VideoWriter(out, size=(32, 32)) as w:
            w.write(np.zeros((32, 32, 3), np.uint8))
            raise RuntimeError("renderer crashed")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InvalidInput, match="even"):
        VideoWriter(out, size=(33, 32))
    with pytest.raises(InvalidInput, match="uint8"):
        with VideoWriter(out, size=(32, 32)) as w:
            w.write(np.zeros((32, 32, 3), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_crop_outside_the_image_is_black(data_dir):
    path = data_dir / "corpus" / "real3dportrait_May_5s.mp4"
    full = next(iter_video_frames(path))
    h, w = full.shape[:2]
    f = next(iter_video_frames(path, crop=(-50, h - 100, 200)))
    assert f.shape == (200, 200, 3)
    assert f[:, :50].max() == 0 and f[100:].max() == 0
    assert np.array_equal(f[:100, 50:], full[h - 100 :, :150])


def test_corrupt_inputs(data_dir, tmp_path):
    real = data_dir / "corpus" / "retalking_face2.mp4"
    blob = real.read_bytes()
    cut = tmp_path / "truncated.mp4"  # index (moov) at the end: cut off
    cut.write_bytes(blob[: len(blob) // 2])
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    missing = tmp_path / "missing.mp4"
    # index first ("faststart", as VideoWriter writes): decodable head, missing tail
    fast = tmp_path / "fast.mp4"
    frames = list(itertools.islice(iter_video_frames(real, size=64), 75))
    with VideoWriter(fast, size=(64, 64), audio=load_audio(real)[: 3 * 16000]) as w:
        for f in frames:
            w.write(f)
    fast_cut = tmp_path / "fast_truncated.mp4"
    fast_cut.write_bytes(fast.read_bytes()[: fast.stat().st_size * 2 // 3])
    cases = {
        cut: "truncated",
        text: "not a readable media",
        empty: "empty",
        missing: "not found",
        fast_cut: "truncated|corrupt",
    }
    for path, msg in cases.items():
        with pytest.raises(InvalidMedia, match=msg) as e:
            probe(path)
        assert str(path) in str(e.value)
        with pytest.raises(InvalidMedia, match=msg):
            list(iter_video_frames(path))
        with pytest.raises(InvalidMedia, match=msg):
            load_audio(path)


def test_raw_audio_and_wav_helpers(tmp_path):
    with pytest.raises(NoAudio):
        resample_audio(np.zeros(0, np.float32), 16000)
    with pytest.raises(InvalidInput):
        resample_audio(np.zeros((2, 3, 4), np.float32), 16000)
    with pytest.raises(InvalidInput):
        resample_audio(np.zeros(10, np.int32), 16000)
    pcm = (np.sin(np.arange(8000) / 5) * 20000).astype(np.int16)
    x = resample_audio(pcm, 8000)
    assert x.dtype == np.float32 and len(x) == 16000 and np.abs(x).max() <= 1.0
    write_wav(tmp_path / "a.wav", x, 16000)
    y = load_audio(tmp_path / "a.wav")
    assert len(y) == 16000 and np.abs(x - y).max() < 1e-3


def test_variable_frame_rate_source(data_dir, tmp_path):
    """A VFR mp4 (irregular timestamps, made here from real frames): output frame i is the source
    frame whose display interval contains i / 25 s."""
    src = list(itertools.islice(iter_video_frames(data_dir / "corpus" / "real3dportrait_May_5s.mp4", size=64), 40))
    rng = np.random.default_rng(3)
    pts_ms = np.concatenate([[0], np.cumsum(rng.integers(15, 70, len(src) - 1))])
    path = tmp_path / "vfr.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        s.options = {"crf": "10", "bf": "0"}
        for img, t in zip(src, pts_ms):
            f = av.VideoFrame.from_ndarray(img, format="rgb24")
            f.pts, f.time_base = int(t), Fraction(1, 1000)
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    info = probe(path)
    out = list(iter_video_frames(path))
    assert len(out) == count_resampled_frames(info)
    for i, frame in enumerate(out):
        k = int(np.searchsorted(pts_ms, i * 40 + 1e-3, side="right") - 1)  # on screen at i / 25 s
        errs = [np.abs(frame.astype(int) - s_).mean() for s_ in src]
        assert np.argmin(errs) == k or errs[k] < 1.0, (i, k, int(np.argmin(errs)))
