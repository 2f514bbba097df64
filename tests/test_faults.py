"""Fault and hostile-input suite (issue 13): what an untrusted client or a crash must not break.

Fast tests use a real gRPC server on 127.0.0.1 and, where only the server's own code is under test
(limits, send timeout, deadline, size cap), a stand-in avatar that produces frames instantly. Tests
on bundles and the CLI use copies of the session's tiny real avatar (tests/conftest.py). Tests that
take more than ~30 s are marked ``slow`` (kill -9 of onboarding/render/server, the 2-minute soak).
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st

from avatar.errors import BundleCorrupt, InvalidInput, ResourceLimit
from avatar_service import avatar_pb2 as pb
from avatar_service.client import AvatarClient
from avatar_service.server import AvatarServer, ServerConfig

REPO = Path(__file__).resolve().parents[1]
ADMIN = "faults-admin-token-0123456789"
RENDER = "faults-render-token-0123456789"
TOKENS = {ADMIN: frozenset({"admin"}), RENDER: frozenset({"render"})}


def cli(argv) -> int:
    from avatar.cli import main

    return main([str(a) for a in argv])


def _flac_silence(seconds: float, sr: int = 8000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * sr), np.int16), sr, format="FLAC")
    return buf.getvalue()


def _wav(x: np.ndarray, sr: int = 16000) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype="FLOAT")
    return buf.getvalue()


# ---- stand-in avatar: the server's code paths without seconds-per-frame NeRF rendering -----------
class FakeAvatar:
    """Quacks like :class:`avatar.api.Avatar` for the server: noise frames, no models."""

    fps = 25

    def __init__(self, name: str, size: int = 256, delay_s: float = 0.0, frames: int | None = None):
        self.name, self.size, self.delay_s, self.frames = name, size, delay_s, frames
        self.sizes: list[int] = []
        self.produced = 0
        self.closed = threading.Event()

    def info(self) -> dict:
        return {"name": self.name, "size": self.size, "fps": 25, "created": "", "metrics": {}}

    def _frame(self, size: int) -> np.ndarray:
        time.sleep(self.delay_s)
        self.produced += 1
        return np.random.default_rng(self.produced).integers(0, 255, (size, size, 3), dtype=np.uint8)

    def render(self, wav, options):
        size = options.size or self.size
        self.sizes.append(size)
        n = self.frames if self.frames is not None else int(round(len(wav) / 640))
        try:
            for _ in range(n):
                yield self._frame(size)
        finally:
            self.closed.set()

    def stream(self, options):
        avatar = self
        size = options.size or self.size
        self.sizes.append(size)

        class Session:  # the StreamSession interface the stream pacer uses (service/stream.py)
            lookahead_s = 0.0
            rewind_frames = 0

            def __init__(self):
                self.samples, self.frames_emitted, self.finished = 0, 0, False

            def feed(self, pcm):
                self.samples += len(pcm)

            def end(self):
                self.finished = True

            def pull(self):
                while self.frames_emitted < self.samples // 640:
                    self.frames_emitted += 1
                    yield self.frames_emitted - 1, avatar._frame(size)

            def silence_needed(self):
                return 0 if self.finished else max(0, (self.frames_emitted + 1) * 640 - self.samples)

            def rewind(self, frame):
                dropped = max(0, self.samples - frame * 640)
                self.samples, self.frames_emitted = min(self.samples, frame * 640), min(self.frames_emitted, frame)
                return dropped

            def push(self, pcm):
                self.feed(pcm)
                return [f for _, f in self.pull()]

            def finish(self):
                self.end()
                return [f for _, f in self.pull()]

            def set_options(self, **kw):
                pass

        return Session()


def _install_fake(server: AvatarServer, fake: FakeAvatar) -> None:
    """Make ``fake`` an avatar of ``server``'s store (a manifest on disk, the object in the cache)."""
    d = server.servicer.store.avatar_dir(fake.name)
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text("{}")
    with server.servicer.cache._lock:
        server.servicer.cache._items[fake.name] = fake


def _start(store: Path, **overrides) -> AvatarServer:
    cfg = ServerConfig(
        store=str(store),
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        max_streams=1,
        idle_timeout_s=5.0,
        send_timeout_s=1.5,
        max_audio_s=20.0,
        max_message_mb=8,
        cache_size=4,
    )
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return AvatarServer(cfg, TOKENS).start()


@pytest.fixture()
def server(tmp_path):
    srv = _start(tmp_path / "store")
    yield srv
    srv.stop(0)


def _active_streams(server) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=5).read().decode()
    return float(next(l.split()[-1] for l in text.splitlines() if l.startswith("avatar_active_streams ")))


# ---- 1. audio decode bounded by max_audio_s --------------------------------------------------------
def test_audio_decode_stops_at_the_limit(tmp_path):
    """A 10-minute FLAC of silence (a few KB) must not be decoded whole to find it is too long."""
    from avatar.media import load_audio

    flac = tmp_path / "silence.flac"
    flac.write_bytes(_flac_silence(600))
    assert flac.stat().st_size < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(ResourceLimit, match="limit of 2 s"):
            load_audio(flac, max_seconds=2.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"decoding held {peak / 2**20:.1f} MB; the whole file is 600 s * 16 kHz * 4 B = 37 MB"
    # a header that declares the duration (WAV) is refused before decoding; within the limit it decodes
    wav = tmp_path / "long.wav"
    wav.write_bytes(_wav(np.zeros(16000 * 30, np.float32)))
    with pytest.raises(ResourceLimit):
        load_audio(wav, max_seconds=2.0)
    assert len(load_audio(wav, max_seconds=31.0)) == 16000 * 30


def test_render_rpc_refuses_long_audio_without_decoding_it(server):
    with AvatarClient(f"127.0.0.1:{server.port}", token=RENDER) as c:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            list(c.render("nobody", _flac_silence(3600)))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "20 s" in e.value.details()
        assert time.monotonic() - t0 < 10


# ---- 2. a client that stops reading frees its slot -------------------------------------------------
@pytest.mark.parametrize("method", ["Render", "StreamRender"])
def test_client_that_stops_reading_frees_its_slot(server, method):
    fake = FakeAvatar("fake", size=256)
    _install_fake(server, fake)
    # no BDP probing: the client's HTTP/2 window stays small, as a slow reader's would
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.http2.bdp_probe", 0)])
    stub = __import__("avatar_service.avatar_pb2_grpc", fromlist=["x"]).AvatarServiceStub(channel)
    md = (("authorization", f"Bearer {ADMIN}"),)
    audio = np.zeros(16000 * 19, np.float32)
    png = pb.FrameEncoding(format=pb.IMAGE_FORMAT_PNG)
    if method == "Render":
        stuck = stub.Render(pb.RenderRequest(avatar="fake", audio=_wav(audio), encoding=png), metadata=md)
    else:
        f32 = pb.AudioFormat(encoding=pb.AudioFormat.ENCODING_FLOAT32)
        reqs = [
            pb.StreamRenderRequest(
                config=pb.StreamConfig(avatar="fake", encoding=png, realtime=False, audio_format=f32)
            )
        ]
        reqs += [
            pb.StreamRenderRequest(audio=pb.AudioChunk(data=audio[i : i + 16000].tobytes()))
            for i in range(0, len(audio), 16000)
        ]
        stuck = stub.StreamRender(iter(reqs), metadata=md)
    # never read `stuck`: its frames fill the flow-control window and the server's send blocks
    t0 = time.monotonic()
    while _active_streams(server) < 1 and time.monotonic() - t0 < 10:
        time.sleep(0.05)
    assert _active_streams(server) == 1
    while _active_streams(server) > 0 and time.monotonic() - t0 < 30:
        time.sleep(0.1)
    freed_after = time.monotonic() - t0
    assert _active_streams(server) == 0, "the slot of a client that reads nothing is never freed"
    assert fake.produced < 450, "the server rendered the whole request for a client that reads nothing"
    # the slot is usable again
    short = FakeAvatar("short", size=32, frames=2)
    _install_fake(server, short)
    with AvatarClient(f"127.0.0.1:{server.port}", token=RENDER) as c:
        assert len(list(c.render("short", _wav(np.zeros(1280, np.float32))))) == 2
    with pytest.raises(grpc.RpcError) as e:
        for _ in stuck:
            pass
    assert e.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)
    channel.close()
    assert freed_after < 25


# ---- 7. deadline between frames, size cap ----------------------------------------------------------
def test_deadline_stops_the_render_between_frames(server):
    fake = FakeAvatar("slow", size=32, delay_s=0.2)
    _install_fake(server, fake)
    with AvatarClient(f"127.0.0.1:{server.port}", token=RENDER) as c:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            list(c.render("slow", _wav(np.zeros(16000 * 10, np.float32)), timeout=1.0))
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert fake.closed.wait(3.0), "the server kept rendering after the deadline"
        assert time.monotonic() - t0 < 4.0
        assert fake.produced < 20  # 250 frames were asked for


def test_requested_size_is_capped_at_the_avatars(server):
    fake = FakeAvatar("small", size=64, frames=2)
    _install_fake(server, fake)
    with AvatarClient(f"127.0.0.1:{server.port}", token=RENDER) as c:
        call = c.render("small", _wav(np.zeros(1280, np.float32)), {"size": 1024}, image_format="png")
        frames = list(call)
    assert call.header.size == 64 and fake.sizes == [64]
    assert all(f.image.shape == (64, 64, 3) for f in frames)


# ---- 4. names ---------------------------------------------------------------------------------------
@settings(max_examples=400, deadline=None)
@given(st.text(max_size=80))
def test_accepted_names_stay_in_the_store_and_are_printable(name):
    from avatar.store import AvatarStore, validate_name

    try:
        validate_name(name)
    except InvalidInput:
        return
    assert 1 <= len(name) <= 64
    assert name.isprintable() and name == name.strip() and "\n" not in name and "\0" not in name
    assert not any(ch in name for ch in "/\\:") and ".." not in name and not name.startswith((".", "-"))
    root = Path("/nonexistent-store")
    d = AvatarStore(root).avatar_dir(name)
    assert d.parent == root / "avatars" and d.name == name


@pytest.mark.parametrize("bad", ["abc\n", "abc\r", "a\tb", "abc\0", "\nabc", "x" * 65, "ab/c", "..", "a..b"])
def test_names_with_control_characters_are_refused(bad, tmp_path, capsys):
    from avatar.store import validate_name

    with pytest.raises(InvalidInput):
        validate_name(bad)
    if "\0" not in bad:  # argv cannot carry NUL
        assert cli(["show", bad, "--store", tmp_path]) == InvalidInput.exit_code
        assert capsys.readouterr().err.startswith("error: invalid avatar name")


def test_names_and_filenames_over_rpc(server, tmp_path):
    with AvatarClient(f"127.0.0.1:{server.port}", token=ADMIN) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.get_avatar("abc\n")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        reqs = [pb.OnboardRequest(metadata=pb.OnboardMetadata(name="abc\n", preset="cpu-smoke"))]
        with pytest.raises(grpc.RpcError) as e:
            c.stub.Onboard(iter(reqs), metadata=c.metadata)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # a NUL (and separators) in the upload's file name: never INTERNAL
        reqs = [
            pb.OnboardRequest(
                metadata=pb.OnboardMetadata(name="okname", preset="cpu-smoke", filename="x.m\0p4/../../etc")
            ),
            pb.OnboardRequest(video_chunk=b"not a video" * 10),
        ]
        job = c.stub.Onboard(iter(reqs), metadata=c.metadata)
        assert job.job_id
    from avatar_service.server import upload_suffix

    assert upload_suffix("clip.MOV") == ".mov" and upload_suffix("a\0b") == ".mp4"
    assert upload_suffix("x.m\0p4") == ".mp4" and upload_suffix("../../x") == ".mp4"


# ---- 5. bundle validation ---------------------------------------------------------------------------
@pytest.fixture()
def store_copy(tiny_avatar, tmp_path) -> Path:
    """A private copy of the tiny avatar's store (avatars + shared models)."""
    root = tmp_path / "store"
    shutil.copytree(tiny_avatar[0] / "avatars", root / "avatars")
    return root


def _bundle_files(bundle: Path) -> list[str]:
    return sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file())


def _flip(path: Path, n: int = 4096) -> None:
    data = bytearray(path.read_bytes())
    start = len(data) // 2 if len(data) > 2 * n else 0
    for i in range(start, min(len(data), start + n)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_bundle_records_checksums(tiny_avatar):
    bundle = tiny_avatar[0] / "avatars" / tiny_avatar[1]
    manifest = json.loads((bundle / "manifest.json").read_text())
    files = [f for f in _bundle_files(bundle) if f != "manifest.json"]
    assert sorted(manifest["files"]) == files
    from avatar.store.bundle import sha256_file

    assert all(manifest["files"][f]["sha256"] == sha256_file(bundle / f) for f in files)


def test_corrupting_each_bundle_file_is_detected(store_copy, tiny_avatar, capsys):
    """Damage each bundle file in turn, two ways: 4 KB of flipped bytes (same size) and truncation.
    Loading always raises BundleCorrupt naming the file; `avatar list` never fails, keeps listing the
    other avatar, and shows the damaged one as BROKEN whenever the quick check can see it (a
    truncated file, any damage to the manifest)."""
    from avatar.pipeline.bundle import AvatarModels
    from avatar.store import AvatarStore

    name = tiny_avatar[1]
    bundle = store_copy / "avatars" / name
    shutil.copytree(bundle, store_copy / "avatars" / "good")
    (store_copy / "avatars" / "good" / "manifest.json").write_text(
        (bundle / "manifest.json").read_text().replace(f'"name": "{name}"', '"name": "good"')
    )
    files = _bundle_files(bundle)
    assert len(files) >= 8
    pristine = {f: (bundle / f).read_bytes() for f in files}
    checked = 0
    for f in files:
        for mode in ("flip", "truncate"):
            if mode == "flip":
                _flip(bundle / f)
            else:
                (bundle / f).write_bytes(pristine[f][: len(pristine[f]) // 2])
            try:
                with pytest.raises(BundleCorrupt) as e:
                    AvatarModels(bundle, device="cpu")
                assert "re-onboard" in str(e.value)
                if f != "manifest.json":
                    assert f in str(e.value), (f, str(e.value))
                rows = {r["name"]: r for r in AvatarStore(store_copy).list(include_broken=True)}
                assert "size" in rows["good"]
                assert cli(["list", "--store", store_copy]) == 0
                out = capsys.readouterr().out
                assert "good" in out
                if mode == "truncate" or f == "manifest.json":
                    assert f"{name:<24} BROKEN" in out, (f, mode, out)
            finally:
                (bundle / f).write_bytes(pristine[f])
            checked += 1
    assert checked == 2 * len(files)
    AvatarModels(bundle, device="cpu")  # restored: loads again


def test_broken_manifests_list_as_broken(store_copy, tiny_avatar, capsys):
    from avatar.store import AvatarStore

    name = tiny_avatar[1]
    mpath = store_copy / "avatars" / name / "manifest.json"
    good = json.loads(mpath.read_text())
    cases = {
        "no size": {k: v for k, v in good.items() if k != "size"},
        "size is text": {**good, "size": "64"},
        "files not an object": {**good, "files": []},
        "path escapes": {**good, "files": {**good["files"], "../../etc/passwd": {"sha256": "0", "size": 1}}},
        "not an object": [1, 2],
    }
    for label, manifest in cases.items():
        mpath.write_text(json.dumps(manifest))
        rows = AvatarStore(store_copy).list(include_broken=True)
        assert rows == [{"name": name, "broken": rows[0]["broken"]}], label
        assert AvatarStore(store_copy).list() == [], label
        assert cli(["list", "--store", store_copy]) == 0, label
        assert "BROKEN" in capsys.readouterr().out, label
        with pytest.raises(BundleCorrupt):
            AvatarStore(store_copy).info(name)
    mpath.write_text("{ truncated")
    assert cli(["show", name, "--store", store_copy]) == BundleCorrupt.exit_code
    # over RPC: ListAvatars skips it (never INTERNAL), GetAvatar says FAILED_PRECONDITION
    srv = _start(store_copy)
    try:
        with AvatarClient(f"127.0.0.1:{srv.port}", token=ADMIN) as c:
            assert c.list_avatars() == []
            with pytest.raises(grpc.RpcError) as e:
                c.get_avatar(name)
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert str(store_copy) not in e.value.details()
    finally:
        srv.stop(0)


def _rewrite_tensor(bundle: Path, rel: str, change) -> None:
    """Rewrite one safetensors file with ``change(dict) -> dict`` and record its new checksum, as a
    buggy writer would (so only the shape/finite checks can catch it)."""
    from safetensors.numpy import load_file, save_file

    from avatar.store.bundle import sha256_file

    path = bundle / rel
    save_file(change(load_file(str(path))), str(path))
    mpath = bundle / "manifest.json"
    m = json.loads(mpath.read_text())
    m["files"][rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    mpath.write_text(json.dumps(m))


def test_wrong_shapes_nan_weights_and_bad_blink_are_bundle_corrupt(store_copy, tiny_avatar):
    from avatar.pipeline.bundle import AvatarModels
    from avatar.store.bundle import sha256_file

    bundle = store_copy / "avatars" / tiny_avatar[1]
    pristine = {f: (bundle / f).read_bytes() for f in _bundle_files(bundle)}
    head = sorted(p.relative_to(bundle).as_posix() for p in (bundle / "nerf" / "head").rglob("*.safetensors"))[0]

    def restore():
        for f, data in pristine.items():
            (bundle / f).write_bytes(data)

    def first_float(d):
        return next(k for k, v in d.items() if v.dtype.kind == "f" and v.size > 1)

    cases = [
        ("track shape", "track.safetensors", lambda d: {**d, "lm3d_mean": d["lm3d_mean"][:10]}),
        ("weights shape", head, lambda d: {**d, first_float(d): d[first_float(d)].reshape(-1)[:-1].copy()}),
        ("NaN weight", head, lambda d: {**d, first_float(d): np.full_like(d[first_float(d)], np.nan)}),
    ]
    for label, rel, change in cases:
        _rewrite_tensor(bundle, rel, change)
        with pytest.raises(BundleCorrupt) as e:
            AvatarModels(bundle, device="cpu")
        assert rel.split("/")[0] in str(e.value) or "nerf" in str(e.value), (label, str(e.value))
        restore()
    # malformed blink.json with a matching checksum
    (bundle / "blink.json").write_text('{"rate_per_min": "often"}')
    m = json.loads((bundle / "manifest.json").read_text())
    m["files"]["blink.json"] = {
        "sha256": sha256_file(bundle / "blink.json"),
        "size": (bundle / "blink.json").stat().st_size,
    }
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleCorrupt, match="blink.json"):
        AvatarModels(bundle, device="cpu")
    restore()


# ---- 6. CLI: one line, never a traceback ----------------------------------------------------------
def test_render_output_path_problems_fail_before_work(tiny_avatar, tmp_path, capsys, monkeypatch, data_dir):
    import avatar.api

    audio = data_dir / "audio" / "RD_Radio31_000.wav"
    loads = []
    monkeypatch.setattr(avatar.api, "load", lambda *a, **k: loads.append(1) or (_ for _ in ()).throw(AssertionError))
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    cases = {
        "out is a dir": (tmp_path, "is a directory"),
        "parent is a file": (blocker / "x.mp4", "is a file"),
        "grandparent is a file": (blocker / "d" / "x.mp4", "is a file"),
    }
    if os.geteuid() != 0:
        cases["read-only dir"] = (ro / "x.mp4", "not writable")
    for label, (out, msg) in cases.items():
        code = cli(["render", "--avatar", tiny_avatar[1], "--audio", audio, "--out", out, "--store", tiny_avatar[0]])
        err = capsys.readouterr().err
        assert code == InvalidInput.exit_code and msg in err and err.count("\n") == 1, (label, err)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1024))
    code = cli(
        ["render", "--avatar", tiny_avatar[1], "--audio", audio, "--out", tmp_path / "o.mp4", "--store", tiny_avatar[0]]
    )
    err = capsys.readouterr().err
    assert code == ResourceLimit.exit_code and "disk space" in err and err.count("\n") == 1
    assert loads == [], "the avatar was loaded before the output path was checked"
    ro.chmod(0o700)


def test_disk_full_during_render_is_one_line(tiny_avatar, tmp_path, capsys, monkeypatch):
    from avatar.media import VideoWriter

    def full(self, frame):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    monkeypatch.setattr(VideoWriter, "write", full)
    wav = tmp_path / "a.wav"
    wav.write_bytes(_wav(np.zeros(1600, np.float32)))
    out = tmp_path / "o.mp4"
    code = cli(["render", "--avatar", tiny_avatar[1], "--audio", wav, "--out", out, "--store", tiny_avatar[0]])
    err = capsys.readouterr().err
    errors = [line for line in err.replace("\r", "\n").splitlines() if "error" in line.lower()]
    assert code == 74 and "Traceback" not in err and len(errors) == 1, err
    assert errors[0][errors[0].index("error:") :].startswith("error: No space left on device")
    assert not out.exists() and not list(tmp_path.glob(".o.*"))


def test_device_and_broken_pipe(tiny_avatar, tmp_path, capsys):
    import torch

    if not torch.cuda.is_available():
        code = cli(["serve", "--device", "cuda", "--store", tmp_path, "--port", "0"])
        err = capsys.readouterr().err
        assert code == InvalidInput.exit_code and "CUDA is not available" in err and err.count("\n") == 1
    code = cli(["serve", "--device", "tpu:7", "--store", tmp_path, "--port", "0"])
    assert code == InvalidInput.exit_code and "device" in capsys.readouterr().err
    # `avatar show NAME | head -1`: head exits early, we must not print a BrokenPipe traceback
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        f"{sys.executable} -m avatar.cli show {tiny_avatar[1]} --store {tiny_avatar[0]} | head -c 1",
        shell=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.stdout == "{" and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_unexpected_errors_are_one_line(monkeypatch, tmp_path, capsys):
    from avatar.store import AvatarStore

    def bug(self, include_broken=False):
        raise KeyError("boom")

    monkeypatch.setattr(AvatarStore, "list", bug)
    code = cli(["list", "--store", tmp_path])
    err = capsys.readouterr().err
    assert code == 70 and err.startswith("error: unexpected KeyError") and err.count("\n") == 1, err


# ---- 7. safer defaults ------------------------------------------------------------------------------
def test_safe_defaults_and_denied_calls_logged(tmp_path, caplog):
    assert ServerConfig().host == "127.0.0.1"
    srv = _start(tmp_path / "s")
    try:
        assert srv.metrics._http.server_address[0] == "127.0.0.1"
        caplog.set_level(logging.INFO, logger="avatar.service.access")
        bad = "wrong-token-0123456789abcdef"
        with AvatarClient(f"127.0.0.1:{srv.port}", token=bad) as c:
            with pytest.raises(grpc.RpcError):
                c.list_avatars()
        with AvatarClient(f"127.0.0.1:{srv.port}", token=None) as c:
            with pytest.raises(grpc.RpcError):
                c.list_avatars()
        denied = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("denied")]
        assert {d["code"] for d in denied} == {"PERMISSION_DENIED", "UNAUTHENTICATED"}
        assert all(d["method"] == "ListAvatars" and d["peer"] for d in denied)
        assert not any(bad in r.getMessage() or bad in json.dumps(getattr(r, "fields", {})) for r in caplog.records)
    finally:
        srv.stop(0)
    with caplog.at_level(logging.WARNING, logger="avatar_service.server"):
        srv = _start(tmp_path / "s2", host="0.0.0.0")
        srv.stop(0)
    assert any("PLAINTEXT" in r.getMessage() for r in caplog.records)
    assert srv.metrics_port and not any("PLAINTEXT" in r.getMessage() for r in caplog.records if r.levelno < 30)


# ---- 8. leftovers and permissions ------------------------------------------------------------------
def test_stale_temps_and_spools_are_cleaned(tmp_path):
    from avatar.atomic import atomic_dir, clean_stale_temps

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pid = dead.pid
    (tmp_path / f".dataset.tmp-{pid}-abc").mkdir()
    (tmp_path / f".dataset.tmp-{os.getpid()}-live").mkdir()
    (tmp_path / f".o.{pid}.x1y2.tmp.mp4").write_bytes(b"partial")
    (tmp_path / f".o.{os.getpid()}.x1y2.tmp.mp4").write_bytes(b"being written")
    removed = clean_stale_temps(tmp_path, "dataset") + clean_stale_temps(tmp_path, "o.mp4")
    assert sorted(p.name for p in removed) == sorted([f".dataset.tmp-{pid}-abc", f".o.{pid}.x1y2.tmp.mp4"])
    assert (tmp_path / f".dataset.tmp-{os.getpid()}-live").exists()
    # permissions of a finished atomic dir follow the umask, not mkdtemp's 0700
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as d:
            (d / "w.safetensors").write_bytes(b"x")
            os.chmod(d / "w.safetensors", 0o600)
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "w.safetensors").stat().st_mode & 0o777 == 0o644
    # the spool of a dead server is removed when the next one starts
    spool_root = tmp_path / "store" / "spool"
    (spool_root / f"{pid}-abcd").mkdir(parents=True)
    (spool_root / f"{pid}-abcd" / "upload.mp4").write_bytes(b"x" * 1000)
    # ... and so are half-assembled bundles, killed preprocess temps and abandoned work dirs
    avatars, work = tmp_path / "store" / "avatars", tmp_path / "store" / "work"
    (avatars / f".kim.tmp-{pid}-x1").mkdir(parents=True)
    (work / "old" / f".dataset.tmp-{pid}-y").mkdir(parents=True)
    (work / "fresh" / f".dataset.tmp-{pid}-z").mkdir(parents=True)
    (work / "fresh" / "state.json").write_text("{}")
    ten_days = time.time() - 10 * 86400
    (work / "old" / "state.json").write_text("{}")
    for p in [work / "old", *(work / "old").rglob("*")]:
        os.utime(p, (ten_days, ten_days))
    srv = _start(tmp_path / "store")
    try:
        assert not (spool_root / f"{pid}-abcd").exists()
        assert not (avatars / f".kim.tmp-{pid}-x1").exists()
        assert not (work / "old").exists()
        assert (work / "fresh" / "state.json").exists() and not (work / "fresh" / f".dataset.tmp-{pid}-z").exists()
        assert srv.servicer.spool.parent == spool_root
    finally:
        srv.stop(0)
    assert not srv.servicer.spool.exists()


def test_failed_onboarding_removes_its_work_dir(tiny_avatar, tmp_path):
    from avatar.errors import InvalidMedia
    from avatar.pipeline.onboard import onboard
    from avatar.store import AvatarStore

    store = AvatarStore(tmp_path / "store")
    shutil.copytree(AvatarStore(tiny_avatar[0]).generator_dir, store.generator_dir)
    bad = tmp_path / "audio_only.wav"
    bad.write_bytes(_wav(np.zeros(16000 * 3, np.float32)))
    with pytest.raises(InvalidMedia):
        onboard(bad, "nofaces", store=store, preset="cpu-smoke")
    assert not store.work_dir("nofaces").exists()
    assert not store.exists("nofaces")


def test_jobs_are_reconciled_at_start(tmp_path):
    from avatar_service.jobs import FAILED, JobManager

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    journal = tmp_path / "jobs"
    journal.mkdir()
    (journal / "j1.json").write_text(
        json.dumps(
            {
                "job_id": "j1",
                "avatar": "a",
                "preset": "cpu-smoke",
                "overwrite": False,
                "state": "RUNNING",
                "created_unix": time.time(),
                "server_pid": dead.pid,
            }
        )
    )
    (journal / "old.json").write_text(
        json.dumps(
            {
                "job_id": "old",
                "avatar": "a",
                "preset": "p",
                "overwrite": False,
                "state": "SUCCEEDED",
                "created_unix": 1.0,
                "finished_unix": 1.0,
                "server_pid": dead.pid,
            }
        )
    )
    (journal / "junk.json").write_text("{")
    jm = JobManager(tmp_path, max_running=1)
    try:
        job = jm.get("j1")  # the old JSON journal is imported into the job table
        assert job.state == FAILED and job.error_code == "ABORTED" and "resume" in job.error
        assert jm.get("old") is None and not list(journal.glob("*.json"))
        assert jm.table.get("j1").state == FAILED
    finally:
        jm.close()


# ---- kill -9 at random points, then rerun (slow) ----------------------------------------------------
def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "AVATAR_TOKENS": f"{ADMIN}=admin"}


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _leftovers(store: Path, name: str) -> list[str]:
    """Half-written things that must not survive a finished rerun."""
    found = [p.name for p in (store / "avatars").glob(f".{name}.*")]
    found += [str(p) for p in (store / "work").glob(f"{name}/.*.tmp-*")]
    return found


@pytest.mark.slow
def test_kill9_during_onboarding_then_rerun(tiny_avatar, tmp_path):
    """kill -9 the CLI onboarding at random points; after each kill nothing half-written looks valid;
    the rerun completes a bundle that validates fully, with the same tracks as an uninterrupted run."""
    from safetensors.numpy import load_file

    from avatar.pipeline.bundle import AvatarModels
    from avatar.store import AvatarStore

    rng = random.Random(int(os.environ.get("FAULT_SEED", "13")))
    store = AvatarStore(tmp_path / "store")
    shutil.copytree(AvatarStore(tiny_avatar[0]).generator_dir, store.generator_dir)
    clip = tiny_avatar[0].parent / "clip.mp4"
    cmd = [
        sys.executable,
        "-m",
        "avatar.cli",
        "onboard",
        str(clip),
        "--name",
        "killed",
        "--preset",
        "cpu-smoke",
        "--store",
        str(store.root),
    ]
    kills = []
    for attempt in range(3):  # each run resumes the last one; kill points spread over the stages
        proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = rng.uniform(3.0, 12.0)
        try:
            proc.wait(delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            state = store.work_dir("killed") / "state.json"
            kills.append((round(delay, 1), json.loads(state.read_text()).get("done", []) if state.is_file() else []))
        if store.exists("killed"):  # finished before the kill, or the bundle is complete
            AvatarModels(store.avatar_dir("killed"), device="cpu")
            break
        assert store.list() == []
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode in (0, 3), proc.stderr[-2000:]  # 3: it finished before a kill landed
    assert "Traceback" not in proc.stderr
    assert kills, "no kill landed"
    models = AvatarModels(store.avatar_dir("killed"), device="cpu")  # checksums, shapes, finite weights
    assert models.size == 64
    assert _leftovers(store.root, "killed") == [] and not store.work_dir("killed").exists()
    ref = load_file(str(tiny_avatar[0] / "avatars" / tiny_avatar[1] / "track.safetensors"))
    got = load_file(str(store.avatar_dir("killed") / "track.safetensors"))
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}
    np.testing.assert_allclose(got["pose_track"], ref["pose_track"], atol=1e-4)
    np.testing.assert_array_equal(got["background"], ref["background"])
    print(f"\nkills (seconds, stages done): {kills}")


@pytest.mark.slow
def test_kill9_during_render_then_rerun(tiny_avatar, tmp_path, data_dir):
    from avatar.media import probe

    audio = tmp_path / "speech.wav"
    from avatar.media import load_audio

    sf.write(audio, load_audio(data_dir / "audio" / "RD_Radio31_000.wav")[:16000], 16000)
    out = tmp_path / "o.mp4"
    cmd = [
        sys.executable,
        "-m",
        "avatar.cli",
        "render",
        "--avatar",
        tiny_avatar[1],
        "--audio",
        str(audio),
        "--out",
        str(out),
        "--store",
        str(tiny_avatar[0]),
    ]
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while not list(tmp_path.glob(".o.*.tmp.mp4")) and time.monotonic() - t0 < 120 and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(random.Random(13).uniform(0.0, 1.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed render left a file at --out"
    stale = list(tmp_path.glob(".o.*.tmp.mp4"))
    assert stale, "the kill landed after the render finished"
    done = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(tmp_path.glob(".o.*")) == [], "the killed render's temp file survived the rerun"
    assert probe(out).n_frames == 25
    # same result as a render that was never interrupted
    ref = tmp_path / "ref.mp4"
    cmd[cmd.index(str(out))] = str(ref)
    assert subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, timeout=600).returncode == 0
    from avatar.media import iter_video_frames

    a = np.stack(list(iter_video_frames(out))).astype(np.float32)
    b = np.stack(list(iter_video_frames(ref))).astype(np.float32)
    assert a.shape == b.shape and np.abs(a - b).mean() < 1.0


@pytest.mark.slow
def test_kill9_of_the_server_takes_its_onboarding_worker_along(tiny_avatar, tmp_path):
    """kill -9 `avatar serve` during an onboarding: the worker dies within seconds; the next server
    removes the dead server's spool and resumes the job (its video is kept in STORE/jobs/inputs), which
    succeeds; a resubmission of the same name meanwhile is refused (one writer per avatar)."""
    from avatar.pipeline.bundle import AvatarModels
    from avatar.store import AvatarStore

    store = AvatarStore(tmp_path / "store")
    shutil.copytree(AvatarStore(tiny_avatar[0]).generator_dir, store.generator_dir)
    clip = tiny_avatar[0].parent / "clip.mp4"

    def serve():
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "avatar.cli",
                "serve",
                "--store",
                str(store.root),
                "--port",
                "0",
                "--metrics-port",
                "-1",
            ],
            env=_env(),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        line = proc.stdout.readline()
        return proc, json.loads(line)["port"]

    srv, port = serve()
    try:
        with AvatarClient(f"127.0.0.1:{port}", token=ADMIN) as c:
            job = c.onboard(clip, "orphan", preset="cpu-smoke")
            t0 = time.monotonic()
            while c.get_job(job["job_id"])["state"] != "RUNNING" and time.monotonic() - t0 < 30:
                time.sleep(0.2)
            time.sleep(3.0)  # the worker is importing / preprocessing
            workers = [
                p for p in _children(srv.pid) if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()
            ]
            assert workers, "no onboarding worker found"
        spools = list((store.root / "spool").iterdir())
        assert spools
    finally:
        srv.send_signal(signal.SIGKILL)
        srv.wait()
    t0 = time.monotonic()
    while any(_alive(p) for p in workers) and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    assert not any(_alive(p) for p in workers), "the onboarding worker outlived the server"
    srv, port = serve()
    try:
        assert not any(s.exists() for s in spools), "the dead server's spooled upload survived"
        with AvatarClient(f"127.0.0.1:{port}", token=ADMIN) as c:
            old = c.get_job(job["job_id"])
            assert old["state"] in ("QUEUED", "RUNNING"), old
            with pytest.raises(grpc.RpcError) as e:
                c.onboard(clip, "orphan", preset="cpu-smoke")
            assert (
                e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "already being onboarded" in e.value.details()
            )
            for state in c.watch_job(job["job_id"]):
                pass
            assert state["state"] == "SUCCEEDED", state
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.wait(30)
    AvatarModels(store.avatar_dir("orphan"), device="cpu")
    assert _leftovers(store.root, "orphan") == [] and not store.work_dir("orphan").exists()


# ---- soak (slow) ------------------------------------------------------------------------------------
def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_soak_four_streams(tiny_avatar, tmp_path, data_dir):
    """4 StreamRender streams on 127.0.0.1 for SOAK_S seconds (default 120) against an `avatar serve`
    process, RSS sampled every second. 0 errors, and RSS growth after the warm-up < 5 %.

    With 4 streams in flight RSS jumps by +-50 MB from second to second (frames, encoders, gRPC
    buffers), so growth is measured between two *idle* points: the streams pause after the warm-up
    (half the run) and at the end, and the server's RSS is read once they are idle (median of 3 s)."""
    from avatar.media import load_audio

    duration = float(os.environ.get("SOAK_S", "120"))
    warmup = duration / 2
    cfg = tmp_path / "serve.json"
    cfg.write_text(json.dumps({"max_streams": 4, "max_audio_s": 30}))
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
            "--config",
            str(cfg),
        ],
        env=_env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    port = json.loads(proc.stdout.readline())["port"]
    speech = load_audio(data_dir / "audio" / "RD_Radio31_000.wav")[16000 : 16000 + 8000]  # 0.5 s
    run = threading.Event()
    stop = threading.Event()
    idle = threading.Semaphore(0)
    counts = {"streams": 0, "frames": 0}
    errors: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        with AvatarClient(f"127.0.0.1:{port}", token=ADMIN) as c:
            while not stop.is_set():
                if not run.is_set():
                    idle.release()
                    run.wait()
                    continue
                try:
                    chunks = [speech[s : s + 1600] for s in range(0, len(speech), 1600)]
                    frames = list(c.stream(tiny_avatar[1], chunks, {"seed": i}, realtime=False, timeout=120))
                    with lock:
                        counts["streams"] += 1
                        counts["frames"] += len(frames)
                except grpc.RpcError as e:
                    errors.append(f"{e.code().name}: {e.details()}")

    def idle_rss() -> float:
        run.clear()
        for _ in threads:
            assert idle.acquire(timeout=180)
        time.sleep(1.0)
        samples = []
        for _ in range(3):
            samples.append(_rss_mb(proc.pid))
            time.sleep(1.0)
        return float(np.median(samples))

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(4)]
    rss = []
    try:
        run.set()
        t0 = time.monotonic()
        for t in threads:
            t.start()
        base = None
        while time.monotonic() - t0 < duration:
            rss.append((time.monotonic() - t0, _rss_mb(proc.pid)))
            if base is None and rss[-1][0] >= warmup:
                base = idle_rss()
                run.set()
            time.sleep(1.0)
        last = idle_rss()
        stop.set()
        run.set()
        for t in threads:
            t.join(180)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    growth = (last - base) / base
    summary = {
        "seconds": duration,
        "streams": counts["streams"],
        "frames": counts["frames"],
        "errors": len(errors),
        "rss_start_mb": round(rss[0][1], 1),
        "rss_idle_after_warmup_mb": round(base, 1),
        "rss_peak_mb": round(max(r for _, r in rss), 1),
        "rss_idle_end_mb": round(last, 1),
        "growth_pct": round(100 * growth, 2),
        "rss_every_10s_mb": [round(r) for _, r in rss[::10]],
    }
    print("\nsoak:", json.dumps(summary))
    assert errors == []
    assert counts["streams"] >= 4
    assert growth < 0.05, summary


@pytest.mark.slow
def test_disk_full_during_an_onboarding_checkpoint(tiny_avatar, tmp_path, capsys, monkeypatch):
    """ENOSPC while the head NeRF saves a checkpoint: one line, exit 74, the work dir is kept and the
    rerun resumes after the finished stages."""
    from avatar.nerf.checkpoint import Checkpoint
    from avatar.store import AvatarStore

    store = AvatarStore(tmp_path / "store")
    shutil.copytree(AvatarStore(tiny_avatar[0]).generator_dir, store.generator_dir)
    clip = tiny_avatar[0].parent / "clip.mp4"

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.path))

    with monkeypatch.context() as m:
        m.setattr(Checkpoint, "save", full)
        code = cli(["onboard", clip, "--name", "full", "--preset", "cpu-smoke", "--store", store.root])
    err = capsys.readouterr().err
    assert code == 74 and "Traceback" not in err and err.count("error:") == 1, err[-2000:]
    assert err.split("error:")[1].strip().startswith("No space left on device"), err[-2000:]
    assert not store.exists("full")
    state = json.loads((store.work_dir("full") / "state.json").read_text())
    assert "preprocess" in state["done"] and "postnet" in state["done"] and "head" not in state["done"]
    assert cli(["onboard", clip, "--name", "full", "--preset", "cpu-smoke", "--store", store.root]) == 0
    assert store.exists("full") and not store.work_dir("full").exists()
