"""End to end on real input: onboarding (cpu-smoke) and rendering real speech to MP4."""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from avatar.cli import main as cli
from avatar.errors import AvatarNotFound, InvalidInput, InvalidMedia, NoAudio, OutputExists


@pytest.fixture(scope="module")
def av(tiny_avatar):
    import avatar.api as api

    return api.load(tiny_avatar[1], store=tiny_avatar[0])


@pytest.fixture(scope="module")
def speech(data_dir) -> np.ndarray:
    from avatar.media import load_audio

    return load_audio(data_dir / "audio" / "RD_Radio31_000.wav")[: 16000 * 3 + 1234]


def _mouth_box(store: Path, name: str, size: int) -> tuple[int, int, int, int]:
    from avatar.data import Dataset

    ds = Dataset(store / "work" / name / "dataset")
    mouth = np.asarray(ds.lm2d[:, 48:68]).reshape(-1, 2) * (size / ds.size)
    x0, y0 = np.floor(mouth.min(0)).astype(int)
    x1, y1 = np.ceil(mouth.max(0)).astype(int) + 1
    return x0, y0, x1, y1


def test_render_mp4_real_speech(tiny_avatar, data_dir, tmp_path, speech):
    """`avatar render` writes an H.264 MP4 with audio whose duration/frames/size match the speech."""
    from avatar.media import iter_video_frames, probe, write_wav

    wav = tmp_path / "speech.wav"
    write_wav(wav, speech, 16000)
    out = tmp_path / "out.mp4"
    rc = cli(["render", "--avatar", tiny_avatar[1], "--audio", str(wav), "--out", str(out), "--store", str(tiny_avatar[0])])
    assert rc == 0
    info = probe(out)
    n = round(len(speech) / 640)
    assert info.has_audio and info.has_video
    assert (info.width, info.height) == (64, 64)
    assert abs(info.duration_s - len(speech) / 16000) <= 1 / 25 + 0.03
    frames = np.stack(list(iter_video_frames(out)))
    assert len(frames) == n
    assert frames.std() > 5, "frames are blank"


def test_mouth_moves_with_speech_not_silence(av, tiny_avatar, speech):
    """The mouth region changes over time with speech, and more than with silence of equal length."""
    opts = dict(still=True, blink=False, seed=1, temperature=0.0)
    import avatar.api as api

    box = _mouth_box(tiny_avatar[0], tiny_avatar[1], av.size)
    x0, y0, x1, y1 = box

    def mouth_motion(audio):
        frames = np.stack(list(av.render(audio, api.RenderOptions(**opts)))).astype(np.float32)
        mouth = frames[:, y0:y1, x0:x1]
        return np.abs(np.diff(mouth, axis=0)).mean()

    talk = mouth_motion(speech)
    quiet = mouth_motion(np.zeros_like(speech))
    assert talk > 0.2, f"mouth region static under speech ({talk:.3f})"
    assert talk > 1.5 * quiet, f"mouth moves as much in silence ({quiet:.3f}) as in speech ({talk:.3f})"


def test_stream_equals_batch_any_chunking(av, speech):
    import avatar.api as api

    opts = api.RenderOptions(seed=5, size=32)
    batch = list(av.render(speech, opts))
    rng = np.random.default_rng(0)
    session = av.stream(opts)
    got, i = [], 0
    while i < len(speech):
        k = int(rng.integers(0, 4000))
        got += session.push(speech[i : i + k])
        i += k
    got += session.finish()
    assert len(got) == len(batch) == round(len(speech) / 640)
    assert all(np.array_equal(a, b) for a, b in zip(got, batch))
    assert 0 < session.lookahead_s <= 1.0


def test_bad_inputs(av, tiny_avatar, tmp_path):
    import avatar.api as api

    with pytest.raises(AvatarNotFound, match="avatar onboard"):
        api.load("nobody", store=tiny_avatar[0])
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 10)
    with pytest.raises(InvalidMedia):
        list(av.render(bad))
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(InvalidMedia):
        list(av.render(empty))
    with pytest.raises(NoAudio):
        list(av.render(np.zeros(0, np.float32)))
    not_a_dir = tmp_path / "store_file"
    not_a_dir.write_text("x")
    with pytest.raises(InvalidInput, match="not a directory"):
        api.load("tiny", store=not_a_dir)
    with pytest.raises(InvalidInput, match="emotion"):
        list(av.render(np.zeros(16000, np.float32), api.RenderOptions(emotion="bored")))
    # CLI: a clear one-line error and a non-zero exit code
    assert cli(["render", "--avatar", "nobody", "--audio", str(bad), "--out", str(tmp_path / "x.mp4"),
                "--store", str(tiny_avatar[0])]) == AvatarNotFound.exit_code
    assert not (tmp_path / "x.mp4").exists()


def test_store_commands(tiny_avatar, tmp_path, capsys):
    store = tmp_path / "store"
    shutil.copytree(tiny_avatar[0] / "avatars", store / "avatars")
    assert cli(["list", "--store", str(store)]) == 0
    assert "tiny" in capsys.readouterr().out
    assert cli(["show", "tiny", "--store", str(store)]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["source"]["sha256"] and manifest["preset"] == "cpu-smoke" and "stage_seconds" in manifest
    assert cli(["delete", "tiny", "--store", str(store)]) == 0
    assert cli(["show", "tiny", "--store", str(store)]) == AvatarNotFound.exit_code


def test_onboard_validation(tiny_avatar, tmp_path):
    from avatar.pipeline.onboard import onboard
    from avatar.store import AvatarStore

    store = AvatarStore(tiny_avatar[0])
    clip = tiny_avatar[0].parent / "clip.mp4"
    for bad in ("../evil", "a/b", "", ".hidden"):
        with pytest.raises(InvalidInput, match="invalid avatar name"):
            onboard(clip, bad, store=store, preset="cpu-smoke")
    with pytest.raises(OutputExists, match="--overwrite"):
        onboard(clip, "tiny", store=store, preset="cpu-smoke")
    with pytest.raises(AvatarNotFound, match="train-generator"):
        onboard(clip, "other", store=AvatarStore(tmp_path / "empty_store"), preset="cpu-smoke")
    with pytest.raises(InvalidMedia, match="not found"):
        onboard(tmp_path / "missing.mp4", "other", store=store, preset="cpu-smoke")


def test_onboard_resumes_after_interruption(tiny_avatar, tmp_path):
    """Cancel after the postnet stage; the rerun skips finished stages and completes the bundle."""
    from avatar.pipeline.onboard import Cancelled, onboard
    from avatar.store import AvatarStore

    src = AvatarStore(tiny_avatar[0])
    store = AvatarStore(tmp_path / "store")
    shutil.copytree(src.generator_dir, store.generator_dir)
    clip = tiny_avatar[0].parent / "clip.mp4"
    cancel = threading.Event()
    seen = []

    def progress(stage, fraction, message):
        seen.append((stage, fraction))
        if stage == "postnet" and fraction >= 1.0:
            cancel.set()

    with pytest.raises(Cancelled):
        onboard(clip, "resumed", store=store, preset="cpu-smoke", progress=progress, cancel=cancel)
    assert not store.exists("resumed"), "a cancelled onboarding must not leave a bundle"
    state = json.loads((store.work_dir("resumed") / "state.json").read_text())
    assert state["done"] == ["preprocess", "postnet"]
    seen.clear()
    onboard(clip, "resumed", store=store, preset="cpu-smoke", progress=progress)
    assert ("preprocess", 1.0) in seen and ("postnet", 1.0) in seen
    assert store.exists("resumed")
    assert set(store.manifest("resumed")["stage_seconds"]) >= {"preprocess", "postnet", "head", "torso", "bundle"}
