"""Rendering through the gRPC service with a real (tiny) avatar.

The avatar is the session's tiny real avatar (``tiny_avatar`` in tests/conftest.py: a 3 s slice of
speakers/acosta_cnn_71s.mp4 -> a ``smoke`` shared generator -> ``cpu-smoke`` onboarding), or the
store named by ``$AVATAR_TEST_STORE``.
"""

from __future__ import annotations

import io
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf

from conftest import make_clip
from avatar_service.client import AvatarClient
from avatar_service.server import AvatarServer, ServerConfig

TOKEN = "render-admin-token-0123456789"
SLICE_S = 3.0


@pytest.fixture(scope="session")
def avatar_store(tiny_avatar) -> tuple[Path, str]:
    """The session's tiny real avatar (tests/conftest.py: ``tiny_avatar``)."""
    return tiny_avatar


@pytest.fixture(scope="module")
def server(avatar_store):
    cfg = ServerConfig(
        store=str(avatar_store[0]),
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        max_streams=2,
        idle_timeout_s=5.0,
        max_audio_s=30.0,
        cache_size=1,
    )
    srv = AvatarServer(cfg, {TOKEN: frozenset({"admin"})}).start()
    yield srv
    srv.stop(0)


@pytest.fixture(scope="module")
def client(server):
    with AvatarClient(f"127.0.0.1:{server.port}", token=TOKEN) as c:
        yield c


@pytest.fixture(scope="session")
def speech(data_dir) -> np.ndarray:
    """0.22 s of real speech (5.5 frames: exercises the rounding of the tail), float32 mono 16 kHz.

    Short because the CPU renderer takes seconds per frame on the shared 2-core test machine."""
    from avatar.media import load_audio

    return load_audio(data_dir / "audio" / "RD_Radio31_000.wav")[16000 : 16000 + 3500]


def _wav(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, 16000, format="WAV", subtype="FLOAT")  # float: decodes to exactly these samples
    return buf.getvalue()


def _active_streams(server) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    return float(next(l.split()[-1] for l in text.splitlines() if l.startswith("avatar_active_streams ")))


def _wait_idle(server, limit_s: float = 20.0) -> float:
    """Wait until no render is in flight on ``server``; returns the active count at the end."""
    t0 = time.monotonic()
    while _active_streams(server) > 0 and time.monotonic() - t0 < limit_s:
        time.sleep(0.05)
    return _active_streams(server)


@pytest.fixture(scope="module")
def rendered(client, avatar_store, speech):
    """Frames of one Render call (PNG, small output size, fixed seed)."""
    call = client.render(avatar_store[1], _wav(speech), {"seed": 3, "size": 48}, image_format="png")
    frames = list(call)
    return call, frames


def test_list_and_get(client, avatar_store):
    name = avatar_store[1]
    assert name in [a["name"] for a in client.list_avatars()]
    info = client.get_avatar(name)
    assert info["name"] == name and info["fps"] == 25 and info["size"] > 0 and info["created"]


def test_avatar_cache_is_a_bounded_lru(server, avatar_store):
    cache = server.servicer.cache  # cache_size=1 in this module
    a = cache.get(avatar_store[1])
    assert cache.get(avatar_store[1]) is a and cache.names() == [avatar_store[1]]
    cache.evict(avatar_store[1])
    assert cache.names() == []
    b = cache.get(avatar_store[1])
    assert b is not a and len(cache.names()) == 1


def test_render_frames(rendered, speech):
    call, frames = rendered
    n = round(len(speech) / 640)
    assert [f.index for f in frames] == list(range(n))
    assert call.header.total_frames == n and call.summary.frames == n
    assert frames[-1].timestamp_s == pytest.approx((n - 1) / 25)
    assert all(f.image.shape == (48, 48, 3) and f.image.dtype == np.uint8 for f in frames)
    assert call.summary.first_frame_latency_s > 0
    assert np.std(np.stack([f.image for f in frames]).astype(np.float32)) > 1.0  # real images, not blank


def test_stream_irregular_chunks_equals_render(client, avatar_store, rendered, speech):
    """Streaming the same audio in irregular chunks gives exactly the Render frames (PNG)."""
    _, ref = rendered
    rng = np.random.default_rng(7)
    cuts = np.sort(rng.choice(np.arange(1, len(speech)), size=9, replace=False))
    chunks = np.split(speech, cuts)  # irregular sizes, from a few samples to ~1000
    call = client.stream(avatar_store[1], iter(chunks), {"seed": 3, "size": 48}, image_format="png", realtime=False)
    got = list(call)
    assert call.header.lookahead_s > 0
    assert [f.index for f in got] == list(range(len(ref)))
    assert call.summary.frames == len(ref)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a.image, b.image)


def test_stream_pcm16_resampled_options_update_and_pacing(client, avatar_store, data_dir):
    """44.1 kHz PCM16 input, an options update mid-stream, real-time pacing at 25 fps."""
    from avatar.media import load_audio, resample_audio

    speech = load_audio(data_dir / "audio" / "RD_Radio31_000.wav")[16000 : 16000 + 6400]  # 0.4 s -> 10 frames
    x = resample_audio(speech, 16000, 44100)
    pcm = (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
    pieces = [pcm[i : i + 3001] for i in range(0, len(pcm), 3001)]  # odd sizes split samples
    pieces.insert(len(pieces) // 2, {"emotion_strength": 0.5})
    call = client.stream(
        avatar_store[1], iter(pieces), {"size": 32}, sample_rate=44100, encoding="pcm16", image_format="jpeg"
    )
    got = list(call)
    assert [f.index for f in got] == list(range(10))
    # realtime pacing: frame i is not sent before frame 0 + i/25 (all audio was sent at once)
    assert got[-1].received - got[0].received >= 9 / 25 * 0.9


def test_stream_emotion_switch_mid_stream(client, avatar_store, speech):
    """Switching to an emotion mid-stream keeps every frame (count matches the audio) and changes the face."""
    n = round(len(speech) / 640)
    neutral = [
        f.image
        for f in client.stream(
            avatar_store[1], iter([speech]), {"seed": 2, "size": 48}, image_format="png", realtime=False
        )
    ]
    call = client.stream(
        avatar_store[1],
        iter([speech[:3200], {"emotion": "happy", "emotion_strength": 1.5}, speech[3200:]]),
        {"seed": 2, "size": 48},
        image_format="png",
        realtime=False,
    )
    happy = [f.image for f in call]
    assert len(neutral) == len(happy) == n
    assert any(not np.array_equal(a, b) for a, b in zip(neutral, happy)), "the emotion switch changed no frame"


def test_stream_bad_update_is_invalid_argument(client, avatar_store, speech):
    with pytest.raises(grpc.RpcError) as e:
        list(client.stream(avatar_store[1], iter([speech[:3200], {"emotion": "furious"}]), realtime=False))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "emotion" in e.value.details()


def test_cancel_and_deadline_free_the_slot(client, server, avatar_store, speech):
    long = np.tile(speech, 120)  # ~26 s: cannot finish before the cancel or the 1 s deadline
    call = client.render(avatar_store[1], _wav(long), {"size": 32})
    it = iter(call)
    next(it)
    call.cancel()
    with pytest.raises(grpc.RpcError) as e:
        list(it)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    with pytest.raises(grpc.RpcError) as e:
        list(client.render(avatar_store[1], _wav(long), {"size": 32}, timeout=1.0))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert _wait_idle(server) == 0  # the server stopped both renders and released their slots


def test_too_many_streams_is_resource_exhausted(client, server, avatar_store, speech):
    gate = threading.Event()

    def held():
        yield speech[:1600]
        gate.wait(20)

    calls = [client.stream(avatar_store[1], held(), {"size": 32}, realtime=False, end=False) for _ in range(2)]
    try:
        for c in calls:  # both sessions started (header received)
            next(iter(c._call))
        with pytest.raises(grpc.RpcError) as e:
            list(client.stream(avatar_store[1], iter([speech[:1600]]), realtime=False))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        gate.set()
        for c in calls:
            c.cancel()
        assert _wait_idle(server) == 0


def test_client_cli_render_and_stream_write_mp4(server, avatar_store, speech, tmp_path):
    from avatar.cli import main
    from avatar.media import probe

    wav = tmp_path / "speech.wav"
    wav.write_bytes(_wav(speech))
    base = ["client", "--target", f"127.0.0.1:{server.port}", "--token", TOKEN]
    assert (
        main(
            base
            + [
                "render",
                "--avatar",
                avatar_store[1],
                "--audio",
                str(wav),
                "--out",
                str(tmp_path / "r.mp4"),
                "--size",
                "64",
            ]
        )
        == 0
    )
    assert (
        main(
            base
            + [
                "stream",
                "--avatar",
                avatar_store[1],
                "--audio",
                str(wav),
                "--out",
                str(tmp_path / "s.mp4"),
                "--size",
                "64",
                "--chunk-ms",
                "70",
                "--no-realtime",
            ]
        )
        == 0
    )
    n = round(len(speech) / 640)
    for name in ("r.mp4", "s.mp4"):
        info = probe(tmp_path / name)
        assert info.has_audio and abs(info.n_frames - n) <= 1, info


@pytest.mark.slow
def test_onboard_rpc_creates_a_renderable_avatar(client, avatar_store, data_dir, tmp_path, speech):
    """Onboard over gRPC (upload in chunks, worker process, WatchJob) and render the new avatar."""
    from avatar.store import AvatarStore

    if not (AvatarStore(avatar_store[0]).generator_dir / "config.json").is_file():
        pytest.skip("the test store has no shared generator to onboard with")
    clip = make_clip(data_dir, tmp_path / "clip.mp4")
    job = client.onboard(clip, "via-rpc", preset="cpu-smoke", overwrite=True, chunk_mb=1)
    seen = [j for j in client.watch_job(job["job_id"], timeout=1800)]
    assert seen[-1]["state"] == "SUCCEEDED", seen[-1]
    # WatchJob sends the latest state on change (fast successive updates may coalesce)
    assert len({(j["stage"], j["progress"]) for j in seen}) >= 3 and seen[-1]["stage"] == "bundle"
    assert client.get_avatar("via-rpc")["name"] == "via-rpc"
    frames = list(client.render("via-rpc", _wav(speech), {"size": 32}))
    assert len(frames) == round(len(speech) / 640)
