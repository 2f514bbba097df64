"""The gRPC service end to end: a real server on 127.0.0.1 (port 0) called with the real client.

Tests that need a rendered avatar use the session fixture ``avatar_store`` from
``tests/test_service_fixtures.py``-style logic below: ``$AVATAR_TEST_STORE`` (a store with an
onboarded avatar), else a tiny avatar onboarded here with the ``cpu-smoke`` preset.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from avatar.errors import InvalidInput
from avatar_service import avatar_pb2 as pb
from avatar_service.auth import load_tokens, parse_tokens
from avatar_service.client import AvatarClient
from avatar_service.codec import PcmDecoder, decode_frame, encode_frame
from avatar_service.server import AvatarServer, ServerConfig

ADMIN = "admin-token-0123456789abcdef"
RENDER = "render-token-0123456789abcdef"
ONBOARD = "onboard-token-0123456789abcdef"
TOKENS = {ADMIN: frozenset({"admin"}), RENDER: frozenset({"render"}), ONBOARD: frozenset({"onboard"})}


def _wav_bytes(x: np.ndarray, sr: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _code(excinfo) -> grpc.StatusCode:
    return excinfo.value.code()


def _start(store: Path, **overrides) -> AvatarServer:
    cfg = ServerConfig(
        store=str(store),
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        max_streams=2,
        idle_timeout_s=1.5,
        max_audio_s=10.0,
        max_message_mb=2,
        max_video_mb=1,
        cache_size=2,
        max_jobs=1,
        job_cancel_grace_s=3.0,
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return AvatarServer(cfg, TOKENS).start()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server on an empty store (no avatars, no shared generator)."""
    srv = _start(tmp_path_factory.mktemp("empty_store"))
    yield srv
    srv.stop(0)


@pytest.fixture()
def admin(server):
    with AvatarClient(f"127.0.0.1:{server.port}", token=ADMIN) as c:
        yield c


@pytest.fixture(scope="session")
def speech(data_dir) -> np.ndarray:
    """8 s of real speech (RD_Radio31_000.wav), float32 mono 16 kHz."""
    from avatar.media import load_audio

    return load_audio(data_dir / "audio" / "RD_Radio31_000.wav")


# ---- units: wire formats and tokens ------------------------------------------------------------
def test_pcm_decoder_is_chunking_invariant(data_dir):
    from avatar.media import load_audio

    x = load_audio(data_dir / "audio" / "chinese_news.wav", sr=48000)[: 48000 * 2]
    raw = (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
    one = PcmDecoder(pb.AudioFormat.ENCODING_PCM16, 48000)
    ref = np.concatenate([one.push(raw), one.finish()])
    rng = np.random.default_rng(0)
    dec, parts, i = PcmDecoder(pb.AudioFormat.ENCODING_PCM16, 48000), [], 0
    while i < len(raw):  # odd byte counts split samples across chunks
        n = int(rng.integers(1, 5000))
        parts.append(dec.push(raw[i : i + n]))
        i += n
    got = np.concatenate(parts + [dec.finish()])
    assert abs(len(ref) - 32000) <= 1
    np.testing.assert_array_equal(got, ref)
    with pytest.raises(InvalidInput):
        PcmDecoder(pb.AudioFormat.ENCODING_PCM16, 1000)
    with pytest.raises(InvalidInput):
        PcmDecoder(pb.AudioFormat.ENCODING_FLOAT32, 16000).push(np.array([np.nan], "<f4").tobytes())


def test_png_frames_roundtrip_exactly():
    img = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_frame(encode_frame(img, pb.IMAGE_FORMAT_PNG)), img)
    jpg = decode_frame(encode_frame(img, pb.IMAGE_FORMAT_JPEG, 95))
    assert jpg.shape == img.shape
    with pytest.raises(InvalidInput):
        encode_frame(img, pb.IMAGE_FORMAT_JPEG, 101)


def test_token_parsing(tmp_path, monkeypatch):
    assert parse_tokens("# ops\nabcdefghijklmnop0=render,onboard; qrstuvwxyz0123456=admin") == {
        "abcdefghijklmnop0": frozenset({"render", "onboard"}),
        "qrstuvwxyz0123456": frozenset({"admin"}),
    }
    for bad in ("abcdefghijklmnop0", "abcdefghijklmnop0=root", "short=render"):
        with pytest.raises(InvalidInput):
            parse_tokens(bad)
    monkeypatch.delenv("AVATAR_TOKENS", raising=False)
    with pytest.raises(InvalidInput, match="no API tokens"):
        load_tokens(None)
    f = tmp_path / "tokens"
    f.write_text("abcdefghijklmnop0=render\n")
    f.chmod(0o644)
    with pytest.raises(InvalidInput, match="chmod 600"):  # other users could read the tokens
        load_tokens(f)
    f.chmod(0o600)
    monkeypatch.setenv("AVATAR_TOKENS", "qrstuvwxyz0123456=admin")
    assert set(load_tokens(f)) == {"abcdefghijklmnop0", "qrstuvwxyz0123456"}


# ---- health, reflection, auth ------------------------------------------------------------------
def test_health_needs_no_token_and_reflection_lists_services(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service="avatar.v1.AvatarService"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as e:  # reflection needs a token like every non-health RPC
            list(stub.ServerReflectionInfo(iter([req])))
        assert _code(e) == grpc.StatusCode.UNAUTHENTICATED
        (resp,) = list(stub.ServerReflectionInfo(iter([req]), metadata=(("authorization", f"Bearer {RENDER}"),)))
        names = {s.name for s in resp.list_services_response.service}
        assert {"avatar.v1.AvatarService", "grpc.health.v1.Health"} <= names


def test_auth_failures(server):
    target = f"127.0.0.1:{server.port}"
    with AvatarClient(target) as c, pytest.raises(grpc.RpcError) as e:
        c.list_avatars()
    assert _code(e) == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in e.value.details()
    with AvatarClient(target, token="not-a-known-token-at-all") as c, pytest.raises(grpc.RpcError) as e:
        c.list_avatars()
    assert _code(e) == grpc.StatusCode.PERMISSION_DENIED
    with AvatarClient(target, token=ONBOARD) as c, pytest.raises(grpc.RpcError) as e:
        c.list_avatars()
    assert _code(e) == grpc.StatusCode.PERMISSION_DENIED and "render" in e.value.details()
    with AvatarClient(target, token=RENDER) as c:
        assert c.list_avatars() == []
        with pytest.raises(grpc.RpcError) as e:
            c.get_job("abc")
        assert _code(e) == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as e:  # streaming RPCs are guarded too
            list(c.watch_job("abc"))
        assert _code(e) == grpc.StatusCode.PERMISSION_DENIED


# ---- error codes without an avatar -------------------------------------------------------------
def _leaks(details: str, server) -> bool:
    """Whether an error message shows a server path (store, spool, temp dir)."""
    import tempfile

    return any(p in details for p in (server.cfg.store, str(server.servicer.spool), tempfile.gettempdir(), "spool"))


def test_avatar_errors(admin, server):
    with pytest.raises(grpc.RpcError) as e:
        admin.get_avatar("nobody")
    assert _code(e) == grpc.StatusCode.NOT_FOUND and "ListAvatars" in e.value.details()
    assert not _leaks(e.value.details(), server)
    with pytest.raises(grpc.RpcError) as e:
        admin.get_avatar("../etc")
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT


def test_render_errors(admin, server, speech):
    wav = _wav_bytes(speech[:16000])
    cases = [
        (dict(audio=wav), grpc.StatusCode.NOT_FOUND),  # no such avatar
        (dict(audio=b"RIFF garbage, not audio" * 10), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(audio=b""), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(audio=wav, options={"emotion": "bogus"}), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(audio=wav, options={"temperature": 7.0}), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(audio=_wav_bytes(np.tile(speech, 2))), grpc.StatusCode.RESOURCE_EXHAUSTED),  # 16 s > 10 s limit
        (dict(audio=os.urandom(3 << 20)), grpc.StatusCode.RESOURCE_EXHAUSTED),  # > 2 MB message
    ]
    for kwargs, code in cases:
        with pytest.raises(grpc.RpcError) as e:
            list(admin.render("nobody", **kwargs))
        assert _code(e) == code, (kwargs.get("options"), e.value.details())
        assert e.value.details() and not _leaks(e.value.details(), server), e.value.details()


def test_stream_errors(admin, server):
    chunk = np.zeros(1600, np.float32)
    with pytest.raises(grpc.RpcError) as e:
        list(admin.stream("nobody", [chunk]))
    assert _code(e) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:
        list(admin.stream("nobody", [chunk], sample_rate=123))
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT and "sample_rate" in e.value.details()
    # first message must be the config
    stub, md = admin.stub, admin.metadata
    with pytest.raises(grpc.RpcError) as e:
        list(stub.StreamRender(iter([pb.StreamRenderRequest(audio=pb.AudioChunk(data=b"\0\0"))]), metadata=md))
    assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT
    # idle: the client opens the stream and sends nothing
    gate = threading.Event()

    def silent():
        gate.wait(10)
        return
        yield

    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.StreamRender(silent(), metadata=md))
    gate.set()
    assert _code(e) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 8


# ---- onboarding jobs ---------------------------------------------------------------------------
def test_onboard_errors(tmp_path, server):
    with AvatarClient(f"127.0.0.1:{server.port}", token=ONBOARD) as c:
        video = tmp_path / "v.mp4"
        video.write_bytes(b"x" * 1000)
        for kwargs, code in [
            (dict(name="bad/name"), grpc.StatusCode.INVALID_ARGUMENT),
            (dict(name="ok", preset="huge"), grpc.StatusCode.INVALID_ARGUMENT),
        ]:
            with pytest.raises(grpc.RpcError) as e:
                c.onboard(video, **kwargs)
            assert _code(e) == code
        empty = tmp_path / "empty.mp4"
        empty.write_bytes(b"")
        with pytest.raises(grpc.RpcError) as e:
            c.onboard(empty, "ok")
        assert _code(e) == grpc.StatusCode.INVALID_ARGUMENT
        big = tmp_path / "big.mp4"
        big.write_bytes(b"\0" * (3 << 19))  # 1.5 MB > 1 MB limit
        with pytest.raises(grpc.RpcError) as e:
            c.onboard(big, "ok", chunk_mb=1)
        assert _code(e) == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as e:
            c.get_job("nope")
        assert _code(e) == grpc.StatusCode.NOT_FOUND


def test_onboard_jobs_queue_fail_and_cancel(tmp_path, server):
    """Real worker processes: a job on a non-video fails with a useful error; with one slot a
    second job queues and can be cancelled before it starts; a running job can be cancelled."""
    bogus = tmp_path / "clip.mp4"
    bogus.write_bytes(b"this is not a video" * 100)
    with AvatarClient(f"127.0.0.1:{server.port}", token=ONBOARD) as c:
        a = c.onboard(bogus, "first")
        b = c.onboard(bogus, "second")
        assert a["state"] in ("QUEUED", "RUNNING") and b["state"] == "QUEUED" and b["queue_position"] >= 1
        assert c.cancel_job(b["job_id"])["state"] == "CANCELLED"
        states = [j["state"] for j in c.watch_job(a["job_id"], timeout=120)]
        final = c.get_job(a["job_id"])
        assert states[-1] == "FAILED" and final["state"] == "FAILED"
        # the empty store has no shared generator (or the file is not a video): either way a clear message
        assert final["error_code"] in ("NOT_FOUND", "INVALID_ARGUMENT") and len(final["error"]) > 20
        assert c.get_job(b["job_id"])["state"] == "CANCELLED"
        # cancel a running job: the worker is stopped
        d = c.onboard(bogus, "third")
        for j in c.watch_job(d["job_id"], timeout=60):
            if j["state"] == "RUNNING":
                c.cancel_job(d["job_id"])
        assert c.get_job(d["job_id"])["state"] in ("CANCELLED", "FAILED")


# ---- observability -----------------------------------------------------------------------------
def test_metrics_and_access_log(admin, server, caplog):
    with caplog.at_level(logging.INFO, logger="avatar.service.access"), pytest.raises(grpc.RpcError):
        admin.get_avatar("ghost")
    rec = [r for r in caplog.records if r.name == "avatar.service.access"][-1]
    assert rec.fields["method"] == "GetAvatar" and rec.fields["code"] == "NOT_FOUND"
    assert rec.fields["avatar"] == "ghost" and len(rec.fields["token"]) == 8 and ADMIN not in json.dumps(rec.fields)
    from avatar_service.observability import JsonFormatter

    assert json.loads(JsonFormatter().format(rec))["code"] == "NOT_FOUND"
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    assert 'avatar_requests_total{code="NOT_FOUND",method="GetAvatar"}' in text
    assert 'avatar_requests_total{code="UNAUTHENTICATED"' in text or "avatar_active_streams" in text


def test_tls(tmp_path, speech):
    if shutil.which("openssl") is None:
        pytest.skip("openssl command not available to make a test certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    srv = _start(tmp_path / "store", tls_cert=str(cert), tls_key=str(key), metrics_port=None)
    try:
        with AvatarClient(f"localhost:{srv.port}", token=RENDER, tls_ca=cert) as c:
            assert c.list_avatars() == []
        with AvatarClient(f"localhost:{srv.port}", token=RENDER) as c, pytest.raises(grpc.RpcError) as e:
            c.list_avatars(timeout=3)  # plaintext against a TLS port
        assert _code(e) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        srv.stop(0)


def test_serve_command_starts_and_stops(tmp_path):
    env = dict(os.environ, AVATAR_TOKENS=f"{ADMIN}=admin")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "avatar.cli",
            "serve",
            "--store",
            str(tmp_path),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics-port",
            "-1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        port = json.loads(line)["port"]
        from avatar.cli import main

        assert main(["client", "--target", f"127.0.0.1:{port}", "--token", ADMIN, "list"]) == 0
        assert main(["client", "--target", f"127.0.0.1:{port}", "--token", "wrong-token-xxxxxxxx", "list"]) == 1
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
    logs = [json.loads(x) for x in proc.stderr.read().splitlines() if x.startswith("{")]
    assert any(r.get("method") == "ListAvatars" and r.get("code") == "OK" for r in logs)


def test_client_cli_onboard_and_job(server, tmp_path, capsys):
    from avatar.cli import main

    video = tmp_path / "talk.mp4"
    video.write_bytes(b"not really a video" * 50)
    base = ["client", "--target", f"127.0.0.1:{server.port}", "--token", ONBOARD]
    assert main(base + ["onboard", str(video), "--name", "cli-job", "--preset", "cpu-smoke"]) == 0
    job = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert job["avatar"] == "cli-job" and job["state"] in ("QUEUED", "RUNNING")
    assert main(base + ["job", job["job_id"], "--cancel"]) == 0
    assert main(base + ["job", job["job_id"], "--watch"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["state"] in ("CANCELLED", "FAILED")
    assert main(base + ["job", "no-such-job"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
