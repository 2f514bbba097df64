"""StreamRender's real-time features through the gRPC service with the tiny real avatar: each frame's
own audio, idle frames while no audio arrives, interrupt (barge-in), the idle limit, and the call
deadline stopping the server's work. The pacer itself is :mod:`avatar_service.stream`.

Timing bounds are loose (the 2-core test machine is shared with training jobs); the measured values
are printed (``pytest -s``) and recorded in docs/SERVING.md.
"""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest

from avatar_service.client import INTERRUPT, AvatarClient
from avatar_service.server import AvatarServer, ServerConfig
from avatar_service.stream import FrameAudio

TOKEN = "stream-admin-token-0123456789"
SIZE = 32


@pytest.fixture(scope="module")
def server(tiny_avatar):
    cfg = ServerConfig(
        store=str(tiny_avatar[0]),
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        max_streams=2,
        idle_timeout_s=5.0,
        max_idle_s=3.0,
        max_audio_s=60.0,
        cache_size=1,
    )
    srv = AvatarServer(cfg, {TOKEN: frozenset({"admin"})}).start()
    yield srv
    srv.stop(0)


@pytest.fixture(scope="module")
def client(server, tiny_avatar):
    with AvatarClient(f"127.0.0.1:{server.port}", token=TOKEN) as c:
        c.get_avatar(tiny_avatar[1])
        server.servicer.cache.get(tiny_avatar[1])  # loaded before the timed tests
        yield c


@pytest.fixture(scope="module")
def speech(data_dir) -> np.ndarray:
    """1 s of real speech, float32 mono 16 kHz."""
    from avatar.media import load_audio

    return load_audio(data_dir / "audio" / "RD_Radio31_000.wav")[16000:32000]


def _active_streams(server) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    return float(next(l.split()[-1] for l in text.splitlines() if l.startswith("avatar_active_streams ")))


def test_frame_audio_timeline_cut_and_rates():
    """Frame i gets samples [i r / 25, (i + 1) r / 25) of the timeline; a cut restarts there."""
    x = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    fa = FrameAudio(16000)
    for s in range(0, len(x), 999):
        fa.add(x[s : s + 999])
    got = [fa.take(i) for i in range(10)]
    np.testing.assert_array_equal(np.concatenate(got), x[:6400])
    fa.cut(10)
    fa.add(np.ones(640, np.float32))
    np.testing.assert_array_equal(fa.take(10), np.ones(640, np.float32))
    assert not fa.take(11).any()  # nothing there: silence
    fa = FrameAudio(48000)
    fa.add(x, last=True)
    parts = [fa.take(i) for i in range(25)]
    assert all(len(p) == 1920 for p in parts)
    from avatar.media import resample_audio

    ref = resample_audio(x, 16000, 48000)[:48000]
    assert np.corrcoef(np.concatenate(parts), ref)[0, 1] > 0.99


def test_each_frame_carries_its_audio_and_stream_equals_render(client, tiny_avatar, speech):
    """Frame audio played back to back is the input (float32 16 kHz, exactly); frames equal Render's."""
    import io

    import soundfile as sf

    rng = np.random.default_rng(3)
    chunks = np.split(speech, np.sort(rng.choice(np.arange(1, len(speech)), size=7, replace=False)))
    call = client.stream(tiny_avatar[1], iter(chunks), {"seed": 1, "size": SIZE}, image_format="png", realtime=False)
    got = list(call)
    n = round(len(speech) / 640)
    assert [f.index for f in got] == list(range(n)) and not any(f.idle for f in got)
    assert call.header.output_audio.sample_rate == 16000 and call.summary.idle_frames == 0
    audio = np.concatenate([f.audio for f in got])
    np.testing.assert_array_equal(audio, np.pad(speech, (0, n * 640 - len(speech))))
    buf = io.BytesIO()
    sf.write(buf, speech, 16000, format="WAV", subtype="FLOAT")
    ref = list(client.render(tiny_avatar[1], buf.getvalue(), {"seed": 1, "size": SIZE}, image_format="png"))
    assert len(ref) == n and all(np.array_equal(a.image, b.image) for a, b in zip(got, ref))
    # PCM16 at 48 kHz out: 1920 samples a frame, the same sound
    call = client.stream(
        tiny_avatar[1], iter([speech]), {"size": SIZE}, realtime=False, output_rate=48000, output_encoding="pcm16"
    )
    got = list(call)
    assert call.header.output_audio.sample_rate == 48000
    assert all(len(f.audio) == 1920 for f in got)
    from avatar.media import resample_audio

    ref48 = resample_audio(speech, 16000, 48000)
    out = np.concatenate([f.audio for f in got])[: len(ref48)]
    assert np.corrcoef(out, ref48[: len(out)])[0, 1] > 0.99


def test_idle_frames_then_speech(client, tiny_avatar, speech):
    """No audio for 1.5 s: idle frames (silence, blinks, head track) at the frame rate; then the speech
    starts at the next frame to be sent and shows exactly what a batch render of that timeline shows."""

    def chunks():
        time.sleep(1.5)
        yield speech

    t0 = time.monotonic()
    call = client.stream(tiny_avatar[1], chunks(), {"seed": 2, "size": SIZE}, image_format="png")
    got = list(call)
    assert [f.index for f in got] == list(range(len(got)))
    idle = [f for f in got if f.idle]
    cut = next(f.index for f in got if not f.idle)
    assert idle and all(f.index < cut for f in idle), "idle frames only before the speech"
    assert call.summary.idle_frames == len(idle) == cut and len(got) == cut + round(len(speech) / 640)
    assert all(not f.audio.any() for f in idle)
    np.testing.assert_array_equal(np.concatenate([f.audio for f in got[cut:]])[: len(speech)], speech)
    times = np.array([f.received for f in idle])
    fps = (len(times) - 1) / max(times[-1] - times[0], 1e-6)
    print(f"\nidle: first idle frame {times[0] - t0:.2f} s after the call, {len(idle)} idle frames at {fps:.1f} fps")
    assert len(idle) >= 10 and fps > 8  # 25 fps when the renderer keeps up (about 22-25 here at 32 px)
    # the speech frames equal a batch render of silence up to the cut, then the speech
    from avatar import api

    av = api.load(tiny_avatar[1], store=tiny_avatar[0])
    ref = list(
        av.render(np.concatenate([np.zeros(cut * 640, np.float32), speech]), api.RenderOptions(seed=2, size=SIZE))
    )
    half = av.models.nerf.window // 2
    assert len(ref) == len(got)
    assert all(np.array_equal(got[t].image, ref[t]) for t in range(cut + half, len(got)))


def test_interrupt_drops_queued_audio_and_returns_to_idle(client, tiny_avatar, speech):
    seen = threading.Event()
    sent: dict = {}

    def chunks():
        yield np.tile(speech, 4)  # 4 s queued at once
        seen.wait(30)
        sent["t"] = time.monotonic()
        yield INTERRUPT
        time.sleep(1.0)

    call = client.stream(tiny_avatar[1], chunks(), {"size": SIZE})
    got = []
    for f in call:
        got.append(f)
        if len(got) == 10:
            seen.set()
    assert [f.index for f in got] == list(range(len(got)))
    ((ack, ack_t),) = call.interrupts
    after = [f for f in got if f.index >= ack.next_frame]
    assert after and all(f.idle for f in after) and not any(f.idle for f in got[: ack.next_frame])
    assert 10 <= ack.next_frame < 100 and ack.dropped_audio_s > 1.0
    assert call.summary.interrupts == 1 and call.summary.idle_frames == len(after)
    latency = after[0].received - sent["t"]
    print(
        f"\ninterrupt: acknowledged after {ack_t - sent['t']:.3f} s, first idle frame after {latency:.3f} s, "
        f"{ack.dropped_audio_s:.2f} s of audio and {ack.dropped_frames} rendered frames dropped"
    )
    assert latency < 2.0


def test_idle_limit_ends_the_stream_with_a_clear_status(client, tiny_avatar, server):
    gate = threading.Event()

    def silent():
        gate.wait(20)
        return
        yield

    got = []
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        for f in client.stream(tiny_avatar[1], silent(), {"size": SIZE}, end=False):
            got.append(f)
    gate.set()
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "idle limit reached" in e.value.details()
    assert 2.9 < time.monotonic() - t0 < 8 and len(got) > 10 and all(f.idle for f in got)


def test_deadline_stops_the_server_promptly(client, tiny_avatar, server, speech):
    """A 3 s deadline on a stream with 20 s of audio queued: the server stops within a frame's work."""
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        list(client.stream(tiny_avatar[1], iter([np.tile(speech, 20)]), {"size": 64}, realtime=False, timeout=3.0))
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    while _active_streams(server) > 0 and time.monotonic() - t0 < 20:
        time.sleep(0.005)
    stop = time.monotonic() - t0 - 3.0
    print(f"\ndeadline: the server released the stream {stop:.3f} s after the 3 s deadline")
    assert _active_streams(server) == 0 and stop < 1.0


# ---- low latency: StreamConfig.block / nerf_right (issue 15) ---------------------------------------
def test_low_latency_stream_reports_its_lookahead_and_equals_the_library(client, tiny_avatar, server, speech):
    """block=2, nerf_right=1 over gRPC: the header reports the session's computed lookahead, lower than the
    default's ((2 + 12 + 1) / 25 = 0.60 s vs 0.88 s on the tiny symmetric avatar) and the resolved values;
    the frames (any chunking) equal the library's render_frames with the same block / NeRF right half."""
    from avatar.api import RenderOptions
    from avatar.pipeline.render import StreamSession, render_frames

    models = server.servicer.cache.get(tiny_avatar[1]).models
    default = client.stream(tiny_avatar[1], iter([speech[:1280]]), {"size": SIZE}, realtime=False)
    assert len(list(default)) == 2
    assert default.header.lookahead_s == pytest.approx(0.88)
    assert (default.header.block, default.header.nerf_right) == (8, 2)

    audio = speech[:6000]  # 9.4 frames: the rounding of the tail
    rng = np.random.default_rng(11)
    chunks = np.split(audio, np.sort(rng.choice(np.arange(1, len(audio)), size=5, replace=False)))
    call = client.stream(
        tiny_avatar[1],
        iter(chunks),
        {"seed": 4, "size": SIZE},
        image_format="png",
        realtime=False,
        block=2,
        nerf_right=1,
    )
    got = list(call)
    opts = RenderOptions(seed=4, size=SIZE)
    assert call.header.lookahead_s == pytest.approx(StreamSession(models, opts, block=2, nerf_right=1).lookahead_s)
    assert call.header.lookahead_s == pytest.approx(0.60)
    assert call.header.lookahead_s < default.header.lookahead_s
    assert (call.header.block, call.header.nerf_right) == (2, 1)
    ref = list(render_frames(models, audio, opts, block=2, nerf_right=1))
    n = round(len(audio) / 640)
    assert [f.index for f in got] == list(range(n)) and len(ref) == n and call.summary.frames == n
    assert all(np.array_equal(a.image, b) for a, b in zip(got, ref))
    # nerf_right 0 is a value, not "unset"; block 0 is the default
    call = client.stream(tiny_avatar[1], iter([speech[:640]]), {"size": SIZE}, realtime=False, block=0, nerf_right=0)
    assert len(list(call)) == 1
    assert (call.header.block, call.header.nerf_right) == (8, 0) and call.header.lookahead_s == pytest.approx(0.80)


@pytest.mark.parametrize(
    "latency, field, valid",
    [
        ({"block": -1}, "block", "1..64"),
        ({"block": 65}, "block", "1..64"),
        ({"nerf_right": -1}, "nerf_right", ">= 0"),
        ({"nerf_right": 3}, "nerf_right", "0..2"),
        ({"block": 2, "nerf_right": 5}, "nerf_right", "0..2"),
    ],
)
def test_bad_block_or_nerf_right_is_invalid_argument(client, tiny_avatar, server, speech, latency, field, valid):
    """Out-of-range latency settings end the call with INVALID_ARGUMENT naming the field and its valid
    range (nerf_right's upper bound is the avatar's NeRF window, 5 -> 2); no frame is rendered, no slot kept."""
    call = client.stream(tiny_avatar[1], iter([speech[:1280]]), {"size": SIZE}, realtime=False, **latency)
    with pytest.raises(grpc.RpcError) as e:
        list(call)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"StreamConfig.{field}" in e.value.details() and valid in e.value.details(), e.value.details()
    t0 = time.monotonic()
    while _active_streams(server) > 0 and time.monotonic() - t0 < 10:
        time.sleep(0.01)
    assert _active_streams(server) == 0


def test_client_cli_stream_low_latency(server, tiny_avatar, speech, tmp_path, capsys):
    """``avatar client stream --low-latency`` (= --block 2 --nerf-right 1) reaches the server and prints the
    session's lookahead; ``--block`` out of range fails with the server's message and exit code 1."""
    import json

    import soundfile as sf

    from avatar.cli import main

    wav = tmp_path / "speech.wav"
    sf.write(wav, speech[:3200], 16000, subtype="FLOAT")
    base = [
        "client",
        "--target",
        f"127.0.0.1:{server.port}",
        "--token",
        TOKEN,
        "stream",
        "--avatar",
        tiny_avatar[1],
        "--audio",
        str(wav),
        "--size",
        str(SIZE),
        "--no-realtime",
        "-q",
    ]
    assert main(base + ["--out", str(tmp_path / "low.mp4"), "--low-latency"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["frames"] == 5 and (out["block"], out["nerf_right"]) == (2, 1)
    assert out["lookahead_s"] == pytest.approx(0.60)
    assert main(base + ["--out", str(tmp_path / "bad.mp4"), "--block", "99"]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


# ---- the pacer alone: a fake clock and an instant fake session ------------------------------------
class _FakeSession:
    """StreamSession's interface without models: frame t is a 2x2 image of value t % 256, final as soon
    as its 640 samples are there (no lookahead)."""

    lookahead_s = 0.0

    def __init__(self):
        self.samples, self.frames_emitted, self.finished, self.rewind_frames = 0, 0, False, 0

    def feed(self, pcm):
        self.samples += len(pcm)

    def end(self):
        self.finished = True

    def pull(self):
        while (
            self.frames_emitted < -(-self.samples // 640)
            if self.finished
            else self.frames_emitted < self.samples // 640
        ):
            self.frames_emitted += 1
            yield self.frames_emitted - 1, np.full((2, 2, 3), (self.frames_emitted - 1) % 256, np.uint8)

    def silence_needed(self):
        return 0 if self.finished else max(0, (self.frames_emitted + 1) * 640 - self.samples)

    def rewind(self, frame):
        dropped = max(0, self.samples - frame * 640)
        self.samples, self.frames_emitted = min(self.samples, frame * 640), min(self.frames_emitted, frame)
        return dropped

    def set_options(self, **kw):
        pass


def _run_pacer(script, **cfg):
    """Run a Pacer on a fake clock; ``script`` = [(time_s, event)]. Returns [(clock, output)] and the pacer."""
    from avatar_service.stream import Pacer, PacerConfig

    clock = {"t": 0.0}
    script = list(script)

    def receive(timeout):
        if script and script[0][0] <= clock["t"] + timeout:
            clock["t"] = max(clock["t"], script[0][0])
            return script.pop(0)[1]
        clock["t"] += timeout if timeout > 0 else 1e-4  # time passes even when polling
        return None

    pacer = Pacer(_FakeSession(), PacerConfig(**cfg), clock=lambda: clock["t"])
    out = [(clock["t"], o) for o in pacer.run(receive, lambda: True)]
    return out, pacer


def test_pacer_idle_then_speech_on_a_fake_clock():
    from avatar_service.stream import Audio, End

    out, pacer = _run_pacer([(1.0, Audio(np.ones(6400, np.float32))), (1.2, End())])
    frames = [o for _, o in out]
    assert [f.index for f in frames] == list(range(len(frames)))
    cut = next(f.index for f in frames if not f.idle)
    assert all(f.idle for f in frames[:cut]) and not any(f.idle for f in frames[cut:])
    assert len(frames) - cut == 10 and all((f.audio == 1).all() for f in frames[cut:])
    assert all(not f.audio.any() for f in frames[:cut])
    t = [c for c, _ in out]
    assert 0.45 < t[0] < 0.6  # start grace 0.5 s
    assert 9 <= cut <= 14  # idle at 25 fps from 0.5 s until the speech at 1.0 s (+ the idle frame being shown)
    assert np.allclose(np.diff(t[:cut]), 0.04, atol=0.002)  # paced at 25 fps
    assert pacer.stats["idle_frames"] == cut and pacer.stats["frames"] == len(frames)


def test_pacer_interrupt_and_idle_limit_on_a_fake_clock():
    from avatar_service.stream import Audio, End, IdleLimitReached, Interrupt, Interrupted

    out, pacer = _run_pacer([(0.0, Audio(np.ones(640 * 50, np.float32))), (0.5, Interrupt()), (1.0, End())])
    acks = [o for _, o in out if isinstance(o, Interrupted)]
    frames = [o for _, o in out if not isinstance(o, Interrupted)]
    assert len(acks) == 1 and [f.index for f in frames] == list(range(len(frames)))
    k = acks[0].next_frame
    assert 11 <= k <= 14 and acks[0].dropped_audio_s == pytest.approx((50 - k) * 0.04)
    assert not any(f.idle for f in frames[:k]) and frames[k:] and all(f.idle for f in frames[k:])
    assert pacer.stats["interrupt_latency_s"] < 0.05
    # nothing at all: idle frames, then the idle limit
    with pytest.raises(IdleLimitReached, match="idle limit reached"):
        _run_pacer([], idle_limit_s=2.0)
    # without idle frames: frames only from audio; End right after the speech ends the stream
    out, _ = _run_pacer([(0.2, Audio(np.ones(1000, np.float32))), (0.3, End())], idle=False)
    assert [o.index for _, o in out] == [0, 1] and not any(o.idle for _, o in out)
