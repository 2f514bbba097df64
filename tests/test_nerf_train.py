"""NeRF training on a real 3-second slice (preprocessed at 64 px): loss goes down, checkpoints
round-trip bit-exactly, a killed run resumes to the same step, torso + inference + eval work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from avatar.errors import InvalidInput

REPO = Path(__file__).resolve().parents[1]


def _slice(src: Path, dst: Path, seconds: float) -> None:
    """First ``seconds`` of a video (with audio) re-encoded with PyAV."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        vs, as_ = inp.streams.video[0], inp.streams.audio[0]
        ov = out.add_stream("libx264", rate=25)
        ov.width, ov.height, ov.pix_fmt = vs.codec_context.width, vs.codec_context.height, "yuv420p"
        oa = out.add_stream("aac", rate=as_.codec_context.sample_rate)
        for frame in inp.decode(vs, as_):
            if frame.time is not None and frame.time >= seconds:
                continue
            if isinstance(frame, av.VideoFrame):
                out.mux(ov.encode(frame.reformat(format="yuv420p")))
            else:
                frame.pts = None
                out.mux(oa.encode(frame))
        out.mux(ov.encode())
        out.mux(oa.encode())


@pytest.fixture(scope="module")
def dataset(request, tmp_path_factory) -> Path:
    """A real dataset: 3 s of acosta_cnn_71s.mp4 through ``avatar preprocess`` at 64 px, or the
    already preprocessed dataset ``$AVATAR_TEST_DATASET`` (the GPU bundle's, on hosts without the
    preprocessing stack or the source media)."""
    env = os.environ.get("AVATAR_TEST_DATASET")
    if env:
        if not (Path(env) / "manifest.json").is_file():
            pytest.fail(f"AVATAR_TEST_DATASET={env} is not a dataset directory")
        return Path(env)
    data_dir = request.getfixturevalue("data_dir")
    from avatar.pipeline.preprocess import PreprocessConfig, preprocess

    tmp = tmp_path_factory.mktemp("nerf_data")
    clip = tmp / "slice.mp4"
    _slice(data_dir / "speakers" / "acosta_cnn_71s.mp4", clip, 3.0)
    return preprocess(clip, tmp / "ds", PreprocessConfig(size=64), progress=False)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> Path:
    from avatar.nerf.trainer import train_nerf

    out = tmp_path_factory.mktemp("nerf_model")
    train_nerf(dataset, out, part="head", preset="cpu-smoke", steps=30, seed=0, progress=False)
    return out


def _fixed_batch_mse(head, dataset) -> float:
    from avatar.data.dataset import Dataset
    from avatar.nerf.presets import get_preset
    from avatar.nerf.render import composite
    from avatar.nerf.datamanager import HeadBatch, Scene
    from avatar.nerf.trainer import _head_forward

    scene = Scene(Dataset(dataset), get_preset("cpu-smoke"), torch.device("cpu"))
    batch = HeadBatch(scene, np.random.default_rng(123))
    with torch.no_grad():
        r = _head_forward(head, scene, batch, False, torch.Generator().manual_seed(0))
    return float(((composite(batch.bg, r["rgb"], r["acc"]) - batch.target) ** 2).mean())


def test_train_lowers_loss(dataset, trained):
    from avatar.data.dataset import Dataset
    from avatar.nerf.model import build_head, head_aabb, load_head
    from avatar.nerf.presets import get_preset
    from avatar.nerf.datamanager import Scene

    cfg = get_preset("cpu-smoke")
    scene = Scene(Dataset(dataset), cfg, torch.device("cpu"))
    torch.manual_seed(0)
    fresh = build_head(cfg, len(scene.train), head_aabb(np.asarray(scene.ds.lm3d_mean), cfg.head.box_margin))
    scene.init_head_stats(fresh)
    head, info = load_head(trained / "head")
    before, after = _fixed_batch_mse(fresh, dataset), _fixed_batch_mse(head, dataset)
    assert after < 0.8 * before, (before, after)
    metrics = json.loads((trained / "head" / "metrics.json").read_text())
    assert metrics["steps"] == 30 and info["size"] == 64
    assert not (trained / "head" / "checkpoint.safetensors").exists()
    assert json.loads((trained / "head" / "config.json").read_text())["config"]["preset"] == "cpu-smoke"


def test_checkpoint_round_trip_bit_exact(dataset, tmp_path):
    from avatar.data.dataset import Dataset
    from avatar.nerf.presets import get_preset
    from avatar.nerf.checkpoint import Checkpoint
    from avatar.nerf.datamanager import Scene
    from avatar.nerf.model import build_head
    from avatar.nerf.trainer import _head_step, _make_optimizer

    cfg = get_preset("cpu-smoke")
    scene = Scene(Dataset(dataset), cfg, torch.device("cpu"))

    def fresh():
        h = build_head(cfg, len(scene.train), scene.aabb)
        return h, _make_optimizer(h, cfg)

    head, opt = fresh()
    rng, gen = np.random.default_rng(1), torch.Generator().manual_seed(1)
    for s in range(2):
        loss, _ = _head_step(head, scene, rng, gen, s, 10)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ck = Checkpoint(tmp_path / "checkpoint.safetensors")
    ck.save(2, head, opt, rng, gen)
    expect_np, expect_gen, expect_torch = rng.random(), torch.rand(3, generator=gen), torch.rand(3)
    head2, opt2 = fresh()
    rng2, gen2 = np.random.default_rng(99), torch.Generator().manual_seed(99)
    step, _ = ck.load(head2, opt2, rng2, gen2)
    assert step == 2
    for (k, a), (_, b) in zip(head.state_dict().items(), head2.state_dict().items()):
        assert torch.equal(a, b), k
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        for name in s1[k]:
            assert torch.equal(torch.as_tensor(s1[k][name]), torch.as_tensor(s2[k][name]))
    assert rng2.random() == expect_np
    assert torch.equal(torch.rand(3, generator=gen2), expect_gen) and torch.equal(torch.rand(3), expect_torch)


def test_kill_and_resume_reaches_same_step(dataset, tmp_path, monkeypatch):
    # bit-exact comparisons need one CPU thread (the order of multi-threaded float reductions varies);
    # AVATAR_THREADS is what the trainer's configure_threads() follows, here and in the subprocess
    monkeypatch.setenv("AVATAR_THREADS", "1")
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "avatar.cli",
        "train-nerf",
        str(dataset),
        "--out",
        str(out),
        "--part",
        "head",
        "--preset",
        "cpu-smoke",
        "--steps",
        "40",
        "--seed",
        "3",
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "head" / "checkpoint.safetensors"
    deadline = time.time() + 240
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert ckpt.exists(), "no checkpoint was written before the run ended"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "head" / "model.safetensors").exists()
    from safetensors import safe_open

    with safe_open(str(ckpt), framework="pt") as f:
        killed_at = int(f.metadata()["step"])
    assert 10 <= killed_at < 40
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / "head" / "metrics.json").read_text())["steps"] == 40
    assert not ckpt.exists()
    # deterministic: an uninterrupted run with the same seed gives the same weights, bit for bit
    from safetensors.torch import load_file

    from avatar.nerf.trainer import train_nerf

    train_nerf(dataset, tmp_path / "straight", part="head", preset="cpu-smoke", steps=40, seed=3, progress=False)
    a, b = (
        load_file(str(out / "head" / "model.safetensors")),
        load_file(str(tmp_path / "straight" / "head" / "model.safetensors")),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_torso_inference_and_eval(dataset, trained, tmp_path):
    from avatar.data.dataset import Dataset
    from avatar.nerf import load_nerf
    from avatar.nerf.evaluate import evaluate_nerf
    from avatar.nerf.datamanager import landmark_window
    from avatar.nerf.trainer import train_nerf

    train_nerf(dataset, trained, part="torso", preset="cpu-smoke", steps=8, progress=False)
    assert json.loads((trained / "torso" / "metrics.json").read_text())["steps"] == 8
    nerf = load_nerf(trained, device="cpu")
    ds = Dataset(dataset)
    assert nerf.size == 64 and nerf.window == 5
    f = np.array([ds.val_range.start, ds.val_range.start + 3])
    win = torch.from_numpy(np.asarray(ds.lm3d)[landmark_window(ds.n_frames, f, nerf.window)])
    pose = torch.from_numpy(np.asarray(ds.pose)[f])
    img = nerf.render(win, pose, blink=torch.from_numpy(np.asarray(ds.blink)[f]), size=48)
    assert img.shape == (2, 48, 48, 3) and img.dtype == torch.uint8
    full = nerf.render(win[:1], pose[:1])
    assert full.shape == (1, 64, 64, 3)
    with pytest.raises(InvalidInput):
        nerf.render(win[:, :, :10], pose)
    m = evaluate_nerf(dataset, trained, out=tmp_path / "eval", max_frames=2, progress=False)
    for name in ("render", "frozen_frame", "mean_frame", "background"):
        assert set(m[name]) == {f"{k}_{r}" for k in ("psnr", "ssim") for r in ("full", "face", "mouth")}
    # the frozen-frame baseline by hand: the last training frame against each evaluated frame
    from avatar.nerf.evaluate import fidelity_table, ssim
    from avatar.nerf.datamanager import mouth_box

    S = ds.size
    frozen = np.asarray(ds.frames[ds.train_range[-1]]).astype(np.float64)
    assert m["frozen_frame_index"] == ds.train_range[-1] and len(m["frames"]) == 2
    full, mouth = [], []
    for f in m["frames"]:
        gt = np.asarray(ds.frames[f]).astype(np.float64)
        x0, y0, x1, y1 = mouth_box(ds.lm2d[f], S)
        full.append(10 * np.log10(255.0**2 / np.mean((frozen - gt) ** 2)))
        mouth.append(10 * np.log10(255.0**2 / np.mean((frozen[y0:y1, x0:x1] - gt[y0:y1, x0:x1]) ** 2)))
    assert m["frozen_frame"]["psnr_full"] == pytest.approx(np.mean(full), abs=1e-3)
    assert m["frozen_frame"]["psnr_mouth"] == pytest.approx(np.mean(mouth), abs=1e-3)
    assert 0 < m["frozen_frame"]["ssim_full"] < 1 and ssim(
        frozen.astype(np.uint8), frozen.astype(np.uint8)
    ) == pytest.approx(1.0)
    table = (tmp_path / "eval" / "table.txt").read_text()
    assert table == fidelity_table(m) + "\n" and all(n in table for n in ("render", "frozen_frame", "mean_frame"))
    assert (tmp_path / "eval" / "side_by_side.mp4").stat().st_size > 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n_frames"] == 2
    assert set(m["mouth_amplitude"]) == {"std_ratio", "r"}  # 2 frames: NaN (needs >= 3 with faces)


def test_mouth_amplitude():
    """The std ratio / r of the inner-lip opening: half the movement reads 0.5, the same 1, a face that is
    missing in either image drops that frame."""
    from avatar.nerf.evaluate import mouth_amplitude

    rng = np.random.default_rng(0)
    real = rng.normal(50, 0.1, (40, 20, 2)).astype(np.float32)
    real[:, 17:20, 1] += rng.uniform(0, 8, (40, 1))  # lower inner lip (iBUG 65-67) moves down: the opening
    half = real.copy()
    half[:, 17:20, 1] = real[:, 17:20, 1].mean(0) + 0.5 * (real[:, 17:20, 1] - real[:, 17:20, 1].mean(0))
    ratio, r = mouth_amplitude(real, real)
    assert ratio == pytest.approx(1.0) and r == pytest.approx(1.0)
    ratio, r = mouth_amplitude(half, real)
    assert 0.4 < ratio < 0.6 and r > 0.9
    gone = half.copy()
    gone[:38] = np.nan
    assert all(np.isnan(mouth_amplitude(gone, real)))


def test_bad_inputs(dataset, tmp_path):
    from avatar.nerf.trainer import train_nerf

    with pytest.raises(InvalidInput):
        train_nerf(dataset, tmp_path / "x", preset="nope")
    with pytest.raises(InvalidInput):
        train_nerf(dataset, tmp_path / "y", part="torso", preset="cpu-smoke")


def test_cli_help():
    from avatar.cli import build_parser

    parser = build_parser()
    for cmd in ("train-nerf", "eval-nerf"):
        with pytest.raises(SystemExit):
            parser.parse_args([cmd, "--help"])


def test_head_box_holds_the_hair(dataset):
    """The head NeRF's box must meet the rays of (nearly) every head-mask pixel: on this clip the old
    box (landmark box + margin, no room on top) met only ~95 %, cutting the hair along a straight line
    (the seam / ghost crown of issue 18)."""
    from avatar.data.dataset import Dataset
    from avatar.nerf.model import head_aabb
    from avatar.nerf.presets import get_preset
    from avatar.nerf.datamanager import head_box_coverage

    ds = Dataset(dataset)
    cfg = get_preset("cpu-small")
    train = np.arange(ds.train_range.start, ds.train_range.stop)
    lm = np.asarray(ds.lm3d_mean)
    old = head_box_coverage(ds, head_aabb(lm, cfg.head.box_margin, 0.0), train)
    new = head_box_coverage(ds, head_aabb(lm, cfg.head.box_margin, cfg.head.box_top), train)
    assert old < 0.99, old  # the regression this guards against is visible on this clip
    assert new >= 0.995, new


@pytest.fixture(scope="module")
def trained_longer(dataset, tmp_path_factory) -> Path:
    """A head trained for 120 cpu-smoke steps (~10 s idle): enough for its opacity to settle."""
    from avatar.nerf.trainer import train_nerf

    out = tmp_path_factory.mktemp("nerf_model_120")
    train_nerf(dataset, out, part="head", preset="cpu-smoke", steps=120, seed=0, progress=False)
    return out


def test_head_alpha_stays_on_the_head(dataset, trained_longer):
    """Rendered head opacity (the layer composited over torso and plate) outside the tracked head mask
    (grown by 2 px) stays near zero: no semi-transparent band above the hair; inside it the head is
    mostly opaque. Measured on held-out frames with their tracked poses."""
    import cv2

    from avatar.data.dataset import MASK_HEAD, Dataset
    from avatar.nerf.inference import load_nerf
    from avatar.nerf.datamanager import landmark_window

    ds = Dataset(dataset)
    nerf = load_nerf(trained_longer, device="cpu")
    lm3d = torch.from_numpy(np.asarray(ds.lm3d, np.float32).copy())
    pose = torch.from_numpy(np.asarray(ds.pose, np.float32).copy())
    blink = torch.from_numpy(np.asarray(ds.blink, np.float32).copy())
    kernel = np.ones((5, 5), np.uint8)
    frames = list(ds.val_range)[:: max(1, len(ds.val_range) // 3)][:3]
    for f in frames:
        win = landmark_window(ds.n_frames, np.array([f]), nerf.window)
        alpha = nerf.head_alpha(lm3d[win], pose[f][None], blink[f][None])[0].numpy()
        head = np.asarray(ds.masks[f]) == MASK_HEAD
        outside = ~cv2.dilate(head.astype(np.uint8), kernel).astype(bool)
        rows = np.flatnonzero(head.any(1))
        above = outside.copy()
        above[rows[0] :] = False  # the rows above the hair
        assert alpha.shape == head.shape and 0.0 <= alpha.min() and alpha.max() <= 1.0 + 1e-5
        assert alpha[outside].mean() < 0.05, (f, alpha[outside].mean())
        assert (alpha[above] > 0.2).mean() < 0.01, (f, (alpha[above] > 0.2).mean())
        assert alpha[head].mean() > 0.8, (f, alpha[head].mean())
