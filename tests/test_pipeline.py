"""End to end on real input: onboarding (cpu-smoke) and rendering real speech to MP4."""

from __future__ import annotations

import json
import logging
import re
import shutil
import threading
import time

import numpy as np
import pytest

from avatar.cli import main as cli
from conftest import push_in_random_chunks
from avatar.errors import AvatarNotFound, InvalidInput, InvalidMedia, NoAudio, OutputExists


@pytest.fixture(scope="module")
def av(tiny_avatar):
    import avatar.api as api

    return api.load(tiny_avatar[1], store=tiny_avatar[0])


@pytest.fixture(scope="module")
def speech(data_dir) -> np.ndarray:
    from avatar.media import load_audio

    return load_audio(data_dir / "audio" / "RD_Radio31_000.wav")[: 16000 * 3 + 1234]


def _mouth_box(av) -> tuple[int, int, int, int]:
    """Pixel box of the mouth: the person's mean mouth landmarks projected with the mean pose."""
    from avatar.data.dataset import Intrinsics
    from avatar.motion.metrics import project
    from avatar.pipeline.controls import mean_pose

    m = av.models
    K = Intrinsics(**m.manifest["dataset"]["intrinsics"]).matrix()
    uv = project(m.lm3d_mean[None], mean_pose(m.pose_track)[None], m.manifest["dataset"]["head_scale"], K)[0, 48:68]
    x0, y0 = np.floor(uv.min(0)).astype(int) - 2
    x1, y1 = np.ceil(uv.max(0)).astype(int) + 3
    return x0, y0, x1, y1


def test_render_mp4_real_speech(tiny_avatar, data_dir, tmp_path, speech, caplog):
    """`avatar render` writes an H.264 MP4 with audio whose duration/frames/size match the speech;
    the input's own audio (48 kHz stereo here) is muxed at its rate and channels, not as 16 kHz mono."""
    from avatar.media import iter_video_frames, load_audio, load_audio_native, probe, resample_audio, write_wav
    from avatar.motion.metrics import pearson

    wav = tmp_path / "speech.wav"
    hi = resample_audio(speech, 16000, 48000)
    write_wav(wav, np.stack([hi, 0.5 * hi], axis=1), 48000)  # stereo, right channel 6 dB quieter
    out = tmp_path / "out.mp4"
    with caplog.at_level(logging.INFO, logger="avatar.pipeline.render"):
        rc = cli(
            [
                "render",
                "--avatar",
                tiny_avatar[1],
                "--audio",
                str(wav),
                "--out",
                str(out),
                "--store",
                str(tiny_avatar[0]),
            ]
        )
    assert rc == 0
    info = probe(out)
    n = round(len(speech) / 640)
    assert any(r.getMessage().startswith(f"rendering speech.wav: {n} frames, ~") for r in caplog.records)  # announced
    assert info.has_audio and info.has_video
    assert (info.audio_rate, info.audio_channels) == (48000, 2)
    muxed, rate = load_audio_native(out)
    assert rate == 48000 and muxed.shape[0] == 2
    assert 0.4 < np.abs(muxed[1]).mean() / np.abs(muxed[0]).mean() < 0.6, "channels were mixed"
    back = load_audio(out)[: len(speech)]
    assert pearson(back, speech[: len(back)]) > 0.95, "the muxed audio is not the input speech"
    assert (info.width, info.height) == (64, 64)
    assert abs(info.duration_s - len(speech) / 16000) <= 1 / 25 + 0.03
    frames = np.stack(list(iter_video_frames(out)))
    assert len(frames) == n
    assert frames.std() > 5, "frames are blank"


def test_render_eta_ignores_the_first_frames_warm_up(monkeypatch, tmp_path, capsys):
    """The progress bar starts after the first frame: a slow first frame (model warm-up) must not make
    the ETA read hours (issue 18: 10 h shown for a minutes-long render)."""
    from avatar.pipeline import render

    def frames(models, wav, options):
        time.sleep(1.5)  # warm-up
        for _ in range(60):
            time.sleep(0.01)
            yield np.zeros((16, 16, 3), np.uint8)

    monkeypatch.setattr(render, "render_frames", frames)
    res = render.render_to_mp4(type("M", (), {"size": 16})(), np.zeros(60 * 640, np.float32), tmp_path / "o.mp4")
    assert res["frames"] == 60
    etas = [int(m, 10) * 60 + int(s, 10) for m, s in re.findall(r"<(\d+):(\d+),", capsys.readouterr().err)]
    assert etas and max(etas) <= 3, etas  # counted from the first frame: 1.5 s x 59 would read 01:28


def test_mouth_moves_with_speech_not_silence(av, speech):
    """Speech drives the mouth landmarks and the rendered mouth region; silence keeps them still.

    The tiny test models (a 40-step generator, a 40-step NeRF) move the mouth only slightly, so the
    bounds are relative: speech vs digital silence of the same length.
    """
    import avatar.api as api

    x0, y0, x1, y1 = _mouth_box(av)

    def run(audio):
        session = av.stream(api.RenderOptions(still=True, blink=False, seed=1, temperature=0.0))
        frames = np.stack(session.push(audio) + session.finish()).astype(np.float32)
        lm = session.landmarks()
        opening = np.linalg.norm(lm[:, 66] - lm[:, 62], axis=-1)
        return np.abs(np.diff(frames[:, y0:y1, x0:x1], axis=0)).mean(), opening.std()

    talk_px, talk_open = run(speech)
    quiet_px, quiet_open = run(np.zeros_like(speech))
    assert talk_open > 5 * quiet_open, (
        f"mouth opening varies as much in silence ({quiet_open}) as in speech ({talk_open})"
    )
    assert talk_px > quiet_px, f"rendered mouth region: speech {talk_px} vs silence {quiet_px}"


def test_stream_equals_batch_any_chunking(av, speech):
    import avatar.api as api

    opts = api.RenderOptions(seed=5, size=32)
    batch = list(av.render(speech, opts))
    session = av.stream(opts)
    got = push_in_random_chunks(session, speech, seed=0, max_chunk=4000)
    assert len(got) == len(batch) == round(len(speech) / 640)
    assert all(np.array_equal(a, b) for a, b in zip(got, batch))
    assert 0 < session.lookahead_s <= 1.0
    # the session dropped the audio no block needs any more (bounded memory in a live session)
    assert session._audio_offset > 0 and session._audio_offset + len(session._audio) == len(speech)


def test_stream_lazy_pull_rewind_and_silence(av, speech):
    """feed/pull (one frame per step) equals batch; silence padding makes the next frame final; after
    rewind(k) + new audio, every frame from k + W//2 on equals the batch render of the audio kept
    before k followed by the new audio (what a barge-in shows)."""
    import avatar.api as api

    opts = api.RenderOptions(seed=5, size=32)
    a, b = speech[:32000], speech[32000:41000]
    batch = list(av.render(np.concatenate([a, b]), opts))
    s = av.stream(opts)
    got = []
    for i in range(0, len(a) + len(b), 2500):
        s.feed(np.concatenate([a, b])[i : i + 2500])
        step = s.pull()
        got += [f for _, f in step]
    s.end()
    got += [f for _, f in s.pull()]
    assert len(got) == len(batch) and all(np.array_equal(x, y) for x, y in zip(got, batch))

    # silence_needed: exactly enough silence for the next frame, nothing more
    s = av.stream(opts)
    n = s.silence_needed()
    s.feed(np.zeros(n - 1, np.float32))
    assert list(s.pull()) == []
    s.feed(np.zeros(1, np.float32))
    it = s.pull()
    assert next(it)[0] == 0 and s.silence_needed() == 0  # frame 1 is final too: one block of 8 was computed
    assert [t for t, _ in it] == list(range(1, 8 - av.models.nerf.window // 2))
    assert s.silence_needed() == 8 * 640

    # rewind: speech a, frames shown up to k, then new audio b replaces the rest
    s = av.stream(opts)
    s.rewind_frames = 30
    s.feed(a)
    shown = [t for t, _ in s.pull()]
    k = shown[-1] - 3
    dropped = s.rewind(k)
    assert dropped == len(a) - k * 640 and s.frames_emitted == k
    s.feed(b)
    s.end()
    after = dict(s.pull())
    assert min(after) == k
    ref = list(av.render(np.concatenate([a[: k * 640], b]), opts))
    half = av.models.nerf.window // 2
    assert len(after) + k == len(ref)
    assert all(np.array_equal(after[t], ref[t]) for t in range(k + half, len(ref)))
    with pytest.raises(InvalidInput):
        s.rewind(0)  # finished


def test_bad_inputs(av, tiny_avatar, tmp_path):
    import avatar.api as api

    with pytest.raises(AvatarNotFound, match="avatar onboard") as err:
        api.load("nobody", store=tiny_avatar[0])
    assert "--store" in str(err.value) and str(tiny_avatar[0]) in str(err.value)  # says where it looked
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
    assert (
        cli(
            [
                "render",
                "--avatar",
                "nobody",
                "--audio",
                str(bad),
                "--out",
                str(tmp_path / "x.mp4"),
                "--store",
                str(tiny_avatar[0]),
            ]
        )
        == AvatarNotFound.exit_code
    )
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
    assert state["done"] == ["preprocess", "motion", "postnet"]
    seen.clear()
    onboard(clip, "resumed", store=store, preset="cpu-smoke", progress=progress)
    assert ("preprocess", 1.0) in seen and ("postnet", 1.0) in seen
    assert store.exists("resumed")
    assert set(store.manifest("resumed")["stage_seconds"]) >= {"preprocess", "motion", "postnet", "head", "torso"}
