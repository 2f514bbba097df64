"""The browser console of ``avatar serve --web`` (service/web.py) with the session's tiny real avatar.

Fast tests drive the JSON API through aiohttp's test client, and a live WebRTC session through an
aiortc peer in the test (speech in, video + audio out). The ``slow`` test opens the page in a real
headless Chromium (Debian's /usr/bin/chromium, `make test-browser`) with a fake microphone fed
from audio/eng.wav: it plays a rendered MP4, runs a live session until 25 frames were shown, and
saves a screenshot to /tmp/avatar_web_console.png.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("aiohttp", reason="the web console needs the [web] extra: pip install -e '.[web]'")
pytest.importorskip("aiortc", reason="the web console needs the [web] extra: pip install -e '.[web]'")

from aiohttp import FormData  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from avatar_service.server import AvatarServer, ServerConfig  # noqa: E402
from avatar_service.web import WebApp, WebServer  # noqa: E402

ADMIN = "web-admin-token-0123456789"
RENDER = "web-render-token-0123456789"
TOKENS = {ADMIN: frozenset({"admin"}), RENDER: frozenset({"render"})}
SCREENSHOT = Path("/tmp/avatar_web_console.png")
CHROMIUM = Path("/usr/bin/chromium")


def _auth(token: str = ADMIN) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def server(tiny_avatar):
    """A gRPC server object (not listening) whose servicer the web app shares; 2 render slots."""
    cfg = ServerConfig(
        store=str(tiny_avatar[0]),
        host="127.0.0.1",
        port=0,
        metrics_port=None,
        max_streams=2,
        max_audio_s=30.0,
        cache_size=2,
        job_cancel_grace_s=1.0,
    )
    srv = AvatarServer(cfg, TOKENS)
    yield srv
    srv.servicer.close()
    srv.metrics.close()


@pytest.fixture(scope="session")
def speech(data_dir) -> np.ndarray:
    """0.6 s of real English speech, float32 mono 16 kHz (15 frames; eng.wav is near-silent before 2.5 s)."""
    from avatar.media import load_audio

    return load_audio(data_dir / "audio" / "eng.wav")[48000 : 48000 + 9600]


def _wav(x: np.ndarray, sr: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def run_client(server, body):
    """Run ``await body(client)`` against a fresh WebApp on ``server``'s servicer (aiohttp test client)."""

    async def main():
        app = WebApp(server.servicer, TOKENS)
        async with TestClient(TestServer(app.app)) as client:
            client.webapp = app
            return await body(client)

    return asyncio.run(main())


def _active(server) -> float:
    return server.metrics.active_streams._value.get()


# ---- auth and pages ------------------------------------------------------------------------------
def test_page_is_public_and_the_api_needs_a_token_with_its_scope(server):
    async def body(c):
        r = await c.get("/")
        assert r.status == 200 and "Avatar console" in await r.text()
        r = await c.get("/static/app.js")
        assert r.status == 200 and "RTCPeerConnection" in await r.text()
        r = await c.get("/api/avatars")
        assert r.status == 401 and "Bearer" in (await r.json())["error"]
        r = await c.get("/api/avatars", headers={"Authorization": "Basic abc"})
        assert r.status == 401
        r = await c.get("/api/avatars", headers=_auth("not-a-known-token-0000000000"))
        assert r.status == 403 and "unknown token" in (await r.json())["error"]
        # a render-only token may list but not onboard nor see jobs
        assert (await c.get("/api/avatars", headers=_auth(RENDER))).status == 200
        r = await c.post("/api/onboard", headers=_auth(RENDER), data=FormData({"name": "x"}))
        assert r.status == 403 and "onboard" in (await r.json())["error"]
        assert (await c.get("/api/jobs/abc", headers=_auth(RENDER))).status == 403
        assert (await c.post("/api/webrtc/offer", json={})).status == 401
        info = await (await c.get("/api/info", headers=_auth())).json()
        assert info["device"] == "cpu" or info["device"].startswith("cuda")
        assert "cpu-smoke" in info["presets"]

    run_client(server, body)


def test_serve_command_with_web_port(tiny_avatar):
    """`avatar serve --web 0` serves the page and the API on the gRPC host, with the same tokens, and
    stops cleanly on SIGTERM."""
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    env = dict(os.environ, AVATAR_TOKENS=f"{RENDER}=render")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "avatar.cli",
            "serve",
            "--store",
            str(tiny_avatar[0]),
            "--port",
            "0",
            "--metrics-port",
            "-1",
            "--web",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        info = json.loads(line)
        assert info["web_url"] == f"http://127.0.0.1:{info['web_port']}/"
        page = urllib.request.urlopen(info["web_url"], timeout=10).read().decode()
        assert "Avatar console" in page
        req = urllib.request.Request(info["web_url"] + "api/avatars", headers=_auth(RENDER))
        names = [a["name"] for a in json.loads(urllib.request.urlopen(req, timeout=10).read())["avatars"]]
        assert tiny_avatar[1] in names
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(info["web_url"] + "api/avatars", timeout=10)
        assert e.value.code == 401
    finally:
        proc.terminate()
        assert proc.wait(20) == 0


# ---- avatars -------------------------------------------------------------------------------------
def test_list_and_preview(server, tiny_avatar):
    import cv2

    name = tiny_avatar[1]

    async def body(c):
        avatars = (await (await c.get("/api/avatars", headers=_auth())).json())["avatars"]
        info = next(a for a in avatars if a["name"] == name)
        assert info["size"] > 0 and info["fps"] == 25
        r = await c.get(f"/api/avatars/{name}/preview.png", headers=_auth(RENDER))
        assert r.status == 200 and r.content_type == "image/png"
        png = await r.read()
        img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (info["size"], info["size"], 3)
        assert img.astype(np.float32).std() > 2.0  # a rendered face, not a blank image
        assert await (await c.get(f"/api/avatars/{name}/preview.png", headers=_auth())).read() == png  # cached
        r = await c.get("/api/avatars/nobody/preview.png", headers=_auth())
        assert r.status == 404 and (await r.json())["code"] == "NOT_FOUND"
        assert (await c.get("/api/avatars/..%2Fx/preview.png", headers=_auth())).status == 400
        return png

    run_client(server, body)
    assert _active(server) == 0  # the preview's render slot was released


# ---- render an uploaded audio file ---------------------------------------------------------------
def test_render_upload_returns_an_mp4_of_the_avatar(server, tiny_avatar, speech, tmp_path):
    from avatar import api
    from avatar.media import iter_video_frames, load_audio

    name = tiny_avatar[1]

    async def body(c):
        fd = FormData()
        fd.add_field("avatar", name)
        fd.add_field("options", json.dumps({"seed": 3, "still": True}))
        fd.add_field("audio", _wav(speech), filename="speech.wav", content_type="audio/wav")
        r = await c.post("/api/render", data=fd, headers=_auth(RENDER))
        assert r.status == 200, await r.text()
        assert r.content_type == "video/mp4"
        assert int(r.headers["X-Frames"]) == round(len(speech) / 640)
        return await r.read()

    data = run_client(server, body)
    out = tmp_path / "web.mp4"
    out.write_bytes(data)
    frames = np.stack(list(iter_video_frames(out)))
    ref = np.stack(list(api.load(name, store=tiny_avatar[0]).render(speech, api.RenderOptions(seed=3, still=True))))
    assert frames.shape == ref.shape
    # the same frames as the Python API, up to H.264 coding
    assert np.abs(frames.astype(np.float32) - ref.astype(np.float32)).mean() < 6.0
    audio = load_audio(out)
    assert abs(len(audio) - len(speech)) < 1600 and np.abs(audio).max() > 0.5 * np.abs(speech).max()  # muxed in
    assert _active(server) == 0


def test_render_errors(server, tiny_avatar, speech):
    name = tiny_avatar[1]

    async def post(c, fields, audio=True):
        fd = FormData(default_to_multipart=True)
        for k, v in fields.items():
            fd.add_field(k, v)
        if audio:
            fd.add_field("audio", _wav(speech), filename="s.wav")
        r = await c.post("/api/render", data=fd, headers=_auth())
        return r.status, (await r.json())["error"]

    async def body(c):
        status, msg = await post(c, {"avatar": name, "options": json.dumps({"temperature": 9})})
        assert status == 400 and "temperature" in msg
        status, msg = await post(c, {"avatar": name, "options": json.dumps({"emotion_video": "/etc/passwd"})})
        assert status == 400 and "unknown render option" in msg
        status, msg = await post(c, {"avatar": name, "options": "{not json"})
        assert status == 400 and "JSON" in msg
        status, msg = await post(c, {"avatar": "nobody"})
        assert status == 404
        status, msg = await post(c, {"avatar": name}, audio=False)
        assert status == 400 and "audio" in msg
        fd = FormData()
        fd.add_field("avatar", name)
        fd.add_field("audio", b"this is not audio at all", filename="x.wav")
        r = await c.post("/api/render", data=fd, headers=_auth())
        body = await r.json()
        assert r.status == 400 and str(server.servicer.spool) not in body["error"]  # no server paths
        r = await c.post("/api/render", data=b"{}", headers={**_auth(), "Content-Type": "application/json"})
        assert r.status == 400

    run_client(server, body)
    assert _active(server) == 0


# ---- onboarding ----------------------------------------------------------------------------------
def test_onboard_submit_poll_and_cancel(server, tiny_avatar, data_dir, tmp_path):
    from conftest import make_clip

    clip = make_clip(data_dir, tmp_path / "clip.mp4", seconds=1.0)

    async def submit(c, name, preset="cpu-smoke", overwrite="0"):
        fd = FormData()
        fd.add_field("name", name)
        fd.add_field("preset", preset)
        fd.add_field("overwrite", overwrite)
        fd.add_field("video", clip.read_bytes(), filename="clip.mp4", content_type="video/mp4")
        r = await c.post("/api/onboard", data=fd, headers=_auth())
        return r.status, await r.json()

    async def body(c):
        status, err = await submit(c, tiny_avatar[1])
        assert status == 409 and "overwrite" in err["error"]
        status, err = await submit(c, "webnew", preset="turbo")
        assert status == 400 and "preset" in err["error"]
        status, err = await submit(c, "bad/name")
        assert status == 400
        status, job = await submit(c, "webnew")
        assert status == 202 and job["avatar"] == "webnew" and job["state"] in ("QUEUED", "RUNNING")
        assert "video" not in job
        r = await c.get(f"/api/jobs/{job['job_id']}", headers=_auth())
        assert r.status == 200 and (await r.json())["job_id"] == job["job_id"]
        r = await c.post(f"/api/jobs/{job['job_id']}/cancel", headers=_auth())
        assert r.status == 200
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:
            state = (await (await c.get(f"/api/jobs/{job['job_id']}", headers=_auth())).json())["state"]
            if state not in ("QUEUED", "RUNNING"):
                break
            await asyncio.sleep(0.3)
        assert state == "CANCELLED"
        assert (await c.get("/api/jobs/nope", headers=_auth())).status == 404

    run_client(server, body)
    assert not (Path(tiny_avatar[0]) / "avatars" / "webnew").exists()


# ---- live WebRTC, with an aiortc peer as the browser ----------------------------------------------
def test_webrtc_offer_errors(server, tiny_avatar):
    async def body(c):
        r = await c.post("/api/webrtc/offer", data=b"nope", headers=_auth())
        assert r.status == 400
        r = await c.post(
            "/api/webrtc/offer", json={"avatar": tiny_avatar[1], "sdp": "v=0\r\nm=video 9 x\r\n"}, headers=_auth()
        )
        assert r.status == 400 and "audio" in (await r.json())["error"]
        r = await c.post("/api/webrtc/offer", json={"avatar": "nobody", "sdp": "m=audio"}, headers=_auth())
        assert r.status == 404
        assert (await c.get("/api/webrtc/nope/stats", headers=_auth())).status == 404

    run_client(server, body)
    assert _active(server) == 0


def test_mono_resampler_mixes_down_and_does_not_depend_on_packets():
    """48 kHz stereo s16 packets (what aiortc's Opus decoder gives) -> 16 kHz mono, the same for
    20 ms packets as for one packet, and the channel mean."""
    import av

    from avatar_service.web import MonoResampler

    t = np.arange(48000) / 48000
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), 0.1 * np.sin(2 * np.pi * 300 * t)
    pcm = (np.stack([left, right], axis=1) * 32767).astype(np.int16)

    def packets(step):
        for i in range(0, len(pcm), step):
            f = av.AudioFrame.from_ndarray(pcm[i : i + step].reshape(1, -1), format="s16", layout="stereo")
            f.sample_rate = 48000
            yield f

    a = np.concatenate([MonoResampler()(f) for f in [*packets(48000)]])
    r = MonoResampler()
    b = np.concatenate([r(f) for f in packets(960)])
    assert abs(len(a) - 16000) < 400 and len(a) == len(b)
    np.testing.assert_allclose(a, b, atol=1e-4)
    # the channel mean: 0.25 at 440 Hz + 0.05 at 300 Hz, at 16 kHz
    spec = np.abs(np.fft.rfft(a * np.hanning(len(a)))) / len(a)
    hz = np.fft.rfftfreq(len(a), 1 / 16000)
    peak440, peak300 = spec[np.abs(hz - 440) < 3].max(), spec[np.abs(hz - 300) < 3].max()
    assert abs(hz[spec.argmax()] - 440) < 3
    assert 4.0 < peak440 / peak300 < 6.0


def test_live_session_frames_carry_their_audio_and_interrupt_returns_to_idle(server, tiny_avatar):
    """The live session runs on the StreamRender pacer: frame i carries input samples [640 i, 640 (i + 1));
    an interrupt drops the queued speech and the frames after it are idle (silence)."""
    from avatar.api import RenderOptions
    from avatar_service.web import LiveSession

    x = np.random.default_rng(0).uniform(-0.5, 0.5, 640 * 100).astype(np.float32)  # 4 s

    async def body():
        live = LiveSession(
            "t",
            server.servicer.cache.get(tiny_avatar[1]),
            RenderOptions(size=32),
            asyncio.get_running_loop(),
            10.0,
            30.0,
        )
        live._thread.start()
        live._queued += x.size
        live._inbox.put(x)
        got = []
        while len(got) < 8:
            got.append(await asyncio.wait_for(live._frames.get(), 60))
        live.interrupt()
        while True:
            item = await asyncio.wait_for(live._frames.get(), 60)
            got.append(item)
            if item[3] and len([g for g in got if g[3]]) >= 5:
                break
        await live.close()
        return got, live.stats

    got, stats = asyncio.run(body())
    assert [g[0] for g in got] == list(range(len(got)))
    speech = [g for g in got if not g[3]]
    assert 8 <= len(speech) < 60 and all(g[3] for g in got[len(speech) :])
    for i, _, audio, _ in speech:
        np.testing.assert_array_equal(audio, x[640 * i : 640 * (i + 1)])
    assert all(not g[2].any() for g in got[len(speech) :])
    assert stats["interrupts"] == 1 and stats["idle_frames"] >= 5


def test_webrtc_session_that_never_connects_frees_its_slot(server, tiny_avatar):
    """An offer whose peer never applies the answer (no ICE) is closed after connect_timeout_s."""
    from aiortc import AudioStreamTrack, RTCPeerConnection

    async def body(c):
        c.webapp.connect_timeout_s = 1.0
        pc = RTCPeerConnection()
        pc.addTrack(AudioStreamTrack())
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        r = await c.post(
            "/api/webrtc/offer",
            headers=_auth(),
            json={"avatar": tiny_avatar[1], "sdp": pc.localDescription.sdp, "type": "offer"},
        )
        assert r.status == 200, await r.text()
        sid = (await r.json())["session"]
        assert _active(server) == 1 and sid in c.webapp.sessions
        for _ in range(50):
            await asyncio.sleep(0.1)
            if sid not in c.webapp.sessions and _active(server) == 0:
                break
        await pc.close()
        return sid in c.webapp.sessions

    assert run_client(server, body) is False
    assert _active(server) == 0


def test_webrtc_offer_low_latency_block(server, tiny_avatar):
    """The offer's ``block`` / ``nerf_right`` reach the live session: the answer reports the computed
    lookahead ((2 + 12 + 1) / 25 = 0.60 s on the tiny symmetric avatar, 0.88 s by default) and the
    resolved values; out-of-range or non-integer values are 400 with the field's valid range, before a
    render slot is taken."""
    from aiortc import AudioStreamTrack, RTCPeerConnection

    async def offer(c, **latency):
        pc = RTCPeerConnection()
        pc.addTrack(AudioStreamTrack())
        pc.addTransceiver("video", direction="recvonly")
        await pc.setLocalDescription(await pc.createOffer())
        r = await c.post(
            "/api/webrtc/offer",
            headers=_auth(RENDER),
            json={"avatar": tiny_avatar[1], "sdp": pc.localDescription.sdp, "type": "offer", **latency},
        )
        body = await r.json()
        if r.status == 200:
            await c.post(f"/api/webrtc/{body['session']}/close", headers=_auth())
        await pc.close()
        return r.status, body

    async def body(c):
        return [
            await offer(c),
            await offer(c, block=2, nerf_right=1),
            await offer(c, block=None, nerf_right=0),
            await offer(c, block=-1),
            await offer(c, block=2.5),
            await offer(c, nerf_right=3),
        ]

    (s0, default), (s1, low), (s2, no_nerf), *bad = run_client(server, body)
    assert s0 == s1 == s2 == 200, (default, low, no_nerf)
    assert default["lookahead_s"] == pytest.approx(0.88) and (default["block"], default["nerf_right"]) == (8, 2)
    assert low["lookahead_s"] == pytest.approx(0.60) and (low["block"], low["nerf_right"]) == (2, 1)
    assert no_nerf["lookahead_s"] == pytest.approx(0.80) and (no_nerf["block"], no_nerf["nerf_right"]) == (8, 0)
    (s3, e3), (s4, e4), (s5, e5) = bad
    assert s3 == s4 == s5 == 400
    assert "offer.block" in e3["error"] and "1..64" in e3["error"]
    assert "offer.block" in e4["error"] and "integer" in e4["error"]
    assert "offer.nerf_right" in e5["error"] and "0..2" in e5["error"]
    for _ in range(50):
        if _active(server) == 0:
            break
        time.sleep(0.1)
    assert _active(server) == 0


def test_form_fields_are_bounded(server, tiny_avatar):
    async def body(c):
        fd = FormData(default_to_multipart=True)
        fd.add_field("avatar", tiny_avatar[1])
        fd.add_field("options", "x" * 100_000)
        r = await c.post("/api/render", data=fd, headers=_auth())
        assert r.status == 400 and "too long" in (await r.json())["error"]

    run_client(server, body)


def test_webrtc_session_returns_video_and_the_speech(server, tiny_avatar, data_dir):
    """An aiortc peer sends 3 s of speech in real time; it gets >= 8 video frames of the avatar's size
    and an audio track that carries the speech back; the stats name every first-frame stage."""
    from aiortc import AudioStreamTrack, RTCPeerConnection, RTCSessionDescription
    import av
    import fractions

    from avatar.media import load_audio

    speech48 = load_audio(data_dir / "audio" / "eng.wav", sr=48000)[48000 * 3 : 48000 * 6]

    class Speech(AudioStreamTrack):
        """20 ms packets of 48 kHz stereo s16 speech at real-time pace (what a browser's Opus decodes to)."""

        def __init__(self):
            super().__init__()
            self.i = 0

        async def recv(self):
            await super().recv()  # paces 20 ms packets at real time; we replace its 8 kHz silence
            n = 960
            x = speech48[self.i * n : (self.i + 1) * n]
            x = np.pad(x, (0, n - len(x)))
            pcm = (np.repeat(x[:, None], 2, axis=1) * 32767).astype(np.int16).reshape(1, -1)
            out = av.AudioFrame.from_ndarray(pcm, format="s16", layout="stereo")
            out.sample_rate, out.pts, out.time_base = 48000, self.i * n, fractions.Fraction(1, 48000)
            self.i += 1
            return out

    async def body(c):
        pc = RTCPeerConnection()
        pc.addTrack(Speech())
        pc.addTransceiver("video", direction="recvonly")
        got = {"video": [], "audio": [], "streams": set()}

        @pc.on("track")
        def on_track(track):
            async def read():
                while True:
                    try:
                        f = await track.recv()
                    except Exception:
                        return
                    got[track.kind].append(f.to_ndarray() if track.kind == "audio" else f.to_ndarray(format="rgb24"))

            asyncio.ensure_future(read())

        await pc.setLocalDescription(await pc.createOffer())
        r = await c.post(
            "/api/webrtc/offer",
            headers=_auth(RENDER),
            json={
                "avatar": tiny_avatar[1],
                "sdp": pc.localDescription.sdp,
                "type": "offer",
                "options": {"still": True},
            },
        )
        assert r.status == 200, await r.text()
        answer = await r.json()
        # one MediaStream id for both tracks (a=msid), so browsers lip-sync them
        msids = {line.split()[0] for line in answer["sdp"].splitlines() if line.startswith("a=msid:")}
        assert len(msids) == 1
        assert _active(server) == 1
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
        t0 = time.monotonic()
        while len(got["video"]) < 8 and time.monotonic() - t0 < 60:
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        stats = await (await c.get(f"/api/webrtc/{answer['session']}/stats", headers=_auth())).json()
        closed = await (await c.post(f"/api/webrtc/{answer['session']}/close", headers=_auth())).json()
        await pc.close()
        return got, stats, closed, answer

    got, stats, closed, answer = run_client(server, body)
    size = answer["size"]
    assert len(got["video"]) >= 8
    assert all(f.shape == (size, size, 3) for f in got["video"])
    assert np.stack(got["video"]).astype(np.float32).std() > 2.0
    audio = np.concatenate([a.reshape(-1) for a in got["audio"]]).astype(np.float32) / 32768
    assert np.sqrt(np.mean(audio**2)) > 0.005  # the speech came back (silence before the first frame)
    st = stats["stages"]
    for k in ("connect", "lookahead_wait", "motion", "nerf", "pacing_send", "audio_in_to_frame_out"):
        assert st[k] is not None and st[k] >= 0, k
    # the engine needs BLOCK + CTX_RIGHT = 20 frames (0.8 s) of audio before frame 0
    assert 0.7 < st["lookahead_wait"] < 3.0
    assert st["audio_in_to_frame_out"] >= st["lookahead_wait"] + st["nerf"]
    assert stats["frames_sent"] >= 8 and stats["render_fps"] > 0 and closed["frames_sent"] >= 8
    for _ in range(50):
        if _active(server) == 0:
            break
        time.sleep(0.1)
    assert _active(server) == 0  # the session's render slot was released


# ---- a real browser --------------------------------------------------------------------------------
@pytest.mark.slow
def test_browser_plays_an_mp4_and_a_live_webrtc_session(server, tiny_avatar, data_dir, tmp_path):
    """Headless Debian Chromium with a fake microphone (eng.wav): render + play an MP4, a live session
    until >= 25 frames were shown with an audio track, an onboarding upload cancelled from the page;
    saves SCREENSHOT."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: `make test-browser` installs Debian's chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the python package playwright")
    from avatar.media import load_audio
    from conftest import make_clip

    mic = tmp_path / "mic.wav"
    sf.write(mic, load_audio(data_dir / "audio" / "eng.wav", sr=48000)[48000 * 3 :], 48000, subtype="PCM_16")
    clip = tmp_path / "hello.wav"
    sf.write(clip, load_audio(data_dir / "audio" / "eng.wav")[48000:64000], 16000, subtype="PCM_16")
    web = WebServer(server.servicer, TOKENS, host="127.0.0.1", port=0).start()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={mic}",
    ]
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=flags, headless=True)
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(web.url)
            page.fill("#token", ADMIN)  # render + onboard
            page.click("#token-form button")
            page.wait_for_selector(f".card.selected[data-name='{tiny_avatar[1]}']")
            page.wait_for_function("document.querySelector('.card img').naturalWidth > 0", timeout=60000)
            # render an uploaded audio file and play the MP4
            page.set_input_files("#render-audio", str(clip))
            page.click("#render-form button")
            page.wait_for_function("document.getElementById('render-video').readyState >= 2", timeout=120000)
            page.wait_for_function("document.getElementById('render-video').currentTime > 0.3", timeout=30000)
            size = page.evaluate("document.getElementById('render-video').videoWidth")
            assert size == page.evaluate("document.querySelector('.card img').naturalWidth")
            # the live session, microphone = the fake device playing eng.wav
            page.click("#live-start")
            page.wait_for_function("window.avatarLive.frames >= 25", timeout=120000)
            page.wait_for_function(
                "window.avatarLive.server && window.avatarLive.server.frames_sent >= 25", timeout=10000
            )
            live = page.evaluate("window.avatarLive")
            page.screenshot(path=str(SCREENSHOT), full_page=True)  # the live session running
            page.click("#live-stop")
            # onboarding from the page: upload, the job's state shows up, cancel it
            page.set_input_files("#onboard-video", str(make_clip(data_dir, tmp_path / "talk.mp4", seconds=1.0)))
            page.fill("#onboard-name", "browser-job")
            page.select_option("#onboard-preset", "cpu-smoke")
            page.click("#onboard-form button[type=submit]")
            page.wait_for_function(
                "/browser-job: (QUEUED|RUNNING)/.test(document.getElementById('onboard-status').textContent)",
                timeout=30000,
            )
            page.click("#onboard-cancel")
            page.wait_for_function(
                "/CANCELLED/.test(document.getElementById('onboard-status').textContent)", timeout=60000
            )
            page.screenshot(path=str(SCREENSHOT.with_name("avatar_web_console_onboard.png")), full_page=True)
            browser.close()
    finally:
        web.stop()
    print("live session:", json.dumps(live))
    print("screenshot:", SCREENSHOT)
    assert not errors, errors
    assert live["frames"] >= 25 and live["audioTracks"] >= 1 and live["videoTracks"] >= 1
    assert live["firstFrameMs"] is not None and live["firstFrameMs"] > 0
    assert live["server"]["stages"]["audio_in_to_frame_out"] > 0
    assert SCREENSHOT.stat().st_size > 10_000
    for _ in range(50):
        if _active(server) == 0:
            break
        time.sleep(0.1)
    assert _active(server) == 0
