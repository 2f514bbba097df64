"""`avatar preprocess` end to end on short re-encoded slices of the real clips (tiny sizes)."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest

from avatar.cli import main as cli_main
from avatar.data.dataset import ARRAYS, LEFT_EYE, MOUTH, RIGHT_EYE, Dataset
from avatar.errors import ClipTooShort, InvalidMedia, NoAudio, NoFaceDetected, OutputExists
from avatar.pipeline.preprocess import PreprocessConfig, preprocess, split_val_start

BLANK = range(40, 46)  # 6 frames (0.24 s) without a face in the main test clip


def make_clip(
    src: Path, dst: Path, seconds: float, blank=(), audio: bool = True, solid: bool = False, canvas=None
) -> Path:
    """Re-encode the first ``seconds`` of ``src`` (H.264 + AAC) at its own frame rate; frames with
    an index in ``blank`` are replaced by black; ``solid`` replaces every frame by a flat colour;
    ``canvas=(W, H, x, y)`` pastes each frame at (x, y) on a grey W x H canvas."""
    with av.open(str(src)) as ic, av.open(str(dst), "w") as oc:
        vs = ic.streams.video[0]
        ov = oc.add_stream("libx264", rate=vs.average_rate)
        ov.width, ov.height = (canvas[0], canvas[1]) if canvas else (vs.width, vs.height)
        ov.pix_fmt = "yuv420p"
        ov.time_base = vs.time_base
        streams = [vs]
        if audio and ic.streams.audio:
            ia = ic.streams.audio[0]
            oa = oc.add_stream("aac", rate=ia.rate)
            streams.append(ia)
        k = 0
        for pkt in ic.demux(*streams):
            for fr in pkt.decode():
                if fr.time is None or fr.time >= seconds:
                    continue
                if isinstance(fr, av.VideoFrame):
                    if k in blank or solid:
                        img = np.zeros((fr.height, fr.width, 3), np.uint8)
                        if solid:
                            img[:] = (40, 90, 160)
                        new = av.VideoFrame.from_ndarray(img, format="rgb24")
                        new.pts, new.time_base = fr.pts, fr.time_base
                        fr = new
                    if canvas:
                        img = np.full((canvas[1], canvas[0], 3), 128, np.uint8)
                        img[canvas[3] : canvas[3] + fr.height, canvas[2] : canvas[2] + fr.width] = fr.to_ndarray(
                            format="rgb24"
                        )
                        new = av.VideoFrame.from_ndarray(img, format="rgb24")
                        new.pts, new.time_base = fr.pts, fr.time_base
                        fr = new
                    k += 1
                    for p in ov.encode(fr):
                        oc.mux(p)
                else:
                    fr.pts = None
                    for p in oa.encode(fr):
                        oc.mux(p)
        for s in oc.streams:
            for p in s.encode():
                oc.mux(p)
    return dst


@pytest.fixture(scope="module")
def clips(data_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    acosta = data_dir / "speakers" / "acosta_cnn_71s.mp4"
    return {
        "main": make_clip(acosta, d / "acosta_3s.mp4", 3.0, blank=BLANK),
        "clean": make_clip(acosta, d / "acosta_clean_2s.mp4", 2.2),
        "short": make_clip(acosta, d / "acosta_1s.mp4", 1.0),
        "silent": make_clip(acosta, d / "acosta_silent.mp4", 2.2, audio=False),
        "noface": make_clip(acosta, d / "noface.mkv", 2.5, solid=True),
        "gap": make_clip(acosta, d / "gap.mp4", 3.0, blank=range(20, 50)),
        "wide": make_clip(acosta, d / "wide.mov", 2.2, canvas=(1280, 720, 700, 150)),
        "noem": make_clip(data_dir / "corpus" / "KristiNoem.mp4", d / "noem_3s.mp4", 3.0, audio=False),
    }


@pytest.fixture(scope="module")
def dataset(clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "acosta"
    preprocess(clips["main"], out, PreprocessConfig(size=128), progress=False)
    return Dataset(out)


def test_dataset_contract(dataset):
    ds = dataset
    n = ds.n_frames
    assert n == 75  # round(3.0 s x 25)
    s = 128
    shapes = {
        "frames": (n, s, s, 3),
        "masks": (n, s, s),
        "background": (s, s, 3),
        "audio": (n * 640,),
        "lm2d": (n, 68, 2),
        "lm3d": (n, 68, 3),
        "lm3d_mean": (68, 3),
        "blink": (n,),
        "pose": (n, 4, 4),
        "face_valid": (n,),
    }
    for name, shape in shapes.items():
        arr = getattr(ds, name)
        assert arr.shape == shape, name
        assert arr.dtype == np.dtype(ARRAYS[name][0] if name in ARRAYS else "uint8"), name  # frames/masks: encoded
    assert ds.features.shape == (2 * n, 80) and ds.feature_kind == "mel"
    assert np.isfinite(ds.features).all() and np.isfinite(ds.lm3d).all() and np.isfinite(ds.pose).all()
    m = ds.manifest
    assert m["encoding"] == {"frames": {"codec": "jpeg", "quality": 95}, "masks": {"codec": "png"}}
    assert ds.frames[0].shape == (s, s, 3) and set(np.unique(ds.masks[n // 2])) <= {0, 1, 2}
    assert not list(ds.root.glob("*.part")) and not (ds.root / "frames.npy").exists()
    assert m["size"] == 128 and m["fps"] == 25 and m["source"]["fps"] == 25.0 and m["source"]["audio_rate"] == 44100
    assert len(m["source"]["sha256"]) == 64 and m["crop_box"]["side"] > 0
    assert m["intrinsics"]["fx"] == pytest.approx(300.0) and m["intrinsics"]["cx"] == 64.0
    assert m["config"]["size"] == 128 and m["tools"]["mediapipe"] == "0.10.21"
    assert ds.val_range == range(n - 25, n) and m["split"]["val_start"] == split_val_start(n, 0.1, 25)
    assert 0 < m["quality"]["rotation_noise_deg"]["raw_deg"] < 5


def test_short_face_gap_is_interpolated_and_flagged(dataset):
    valid = np.asarray(dataset.face_valid)
    assert not valid[list(BLANK)].any()
    assert valid[:38].all() and valid[48:].all()  # the tracker re-acquires right after the gap
    assert dataset.manifest["flagged_frames"]["interpolated"] == np.flatnonzero(~valid).tolist()
    lm = np.asarray(dataset.lm2d)
    a, b = BLANK[0] - 1, BLANK[-1] + 1
    mid = lm[(a + b) // 2]
    assert np.linalg.norm(mid - 0.5 * (lm[a] + lm[b]), axis=-1).max() < 0.15 * 128


def test_landmarks_on_the_face(dataset):
    lm = np.asarray(dataset.lm2d)[np.asarray(dataset.face_valid)]
    s = dataset.size
    assert (lm >= 0).all() and (lm < s).all()
    eyes, mouth = lm[:, LEFT_EYE + RIGHT_EYE, 1].mean(1), lm[:, MOUTH, 1].mean(1)
    assert (eyes < mouth).all() and (mouth < lm[:, 8, 1]).all()  # eyes above mouth above chin
    assert (lm[:, 36, 0] < lm[:, 45, 0]).all()
    # the face box (jaw + brows) is a plausible part of the head-and-shoulders crop
    h = lm[:, 8, 1] - lm[:, 17:27, 1].min(1)
    assert (0.25 * s < h).all() and (h < 0.6 * s).all()
    # the stored frame really has a face there: face pixels differ from the background plate
    f = np.asarray(dataset.frames[0]).astype(int)
    cx, cy = lm[0, 30].astype(int)
    assert np.abs(f[cy, cx] - np.asarray(dataset.background)[cy, cx].astype(int)).sum() > 30


def test_pose_reprojects_canonical_landmarks(dataset):
    """Contract: pose[i] @ [head_scale * lm3d[i], 1] are camera coordinates that project onto lm2d."""
    ds = dataset
    k = ds.intrinsics.matrix()
    valid = np.asarray(ds.face_valid)
    cam = np.einsum("nij,nkj->nki", ds.pose[:, :3, :3], ds.head_scale * np.asarray(ds.lm3d)) + ds.pose[:, None, :3, 3]
    uv = np.einsum("ij,nkj->nki", k, cam)
    uv = uv[..., :2] / uv[..., 2:]
    err = np.linalg.norm(uv - ds.lm2d, axis=-1)[valid]
    assert np.median(err) < 0.02 * ds.size and np.percentile(err, 95) < 0.05 * ds.size
    assert np.linalg.norm(ds.lm3d_mean[36] - ds.lm3d_mean[45]) == pytest.approx(1.0, abs=1e-4)
    assert 0.3 < ds.pose[:, 2, 3].mean() < 3.0  # metres in front of the camera
    assert np.abs(np.asarray(ds.lm3d) - ds.lm3d_mean).max() < 0.6
    assert 0.05 < float(np.median(ds.blink)) < 0.6


def test_masks_and_background(dataset):
    m = np.asarray(dataset.masks)[np.asarray(dataset.face_valid)]
    frac = np.stack([(m == k).mean((1, 2)) for k in range(3)], 1)
    assert (frac[:, 2] > 0.05).all() and (frac[:, 2] < 0.6).all()
    assert (frac[:, 0] > 0.1).all() and (frac[:, 1] > 0.02).all()
    assert set(np.unique(m)) <= {0, 1, 2}
    bg = np.asarray(dataset.background)
    assert bg.std() > 3 and (bg.reshape(-1, 3).sum(1) > 0).mean() > 0.99  # no black holes left


def test_previews_written(dataset):
    import cv2

    for name in ("contact_sheet.png", "signals.png"):
        img = cv2.imread(str(dataset.root / "preview" / name))
        assert img is not None and img.shape[0] > 200 and img.std() > 10


def test_30fps_silent_video_with_separate_wav(clips, data_dir, tmp_path):
    out = preprocess(
        clips["noem"],
        tmp_path / "noem",
        PreprocessConfig(size=64),
        audio=data_dir / "corpus" / "KristiNoem.wav",
        progress=False,
    )
    ds = Dataset(out)
    assert ds.manifest["source"]["fps"] == pytest.approx(30.0)
    assert ds.n_frames == 75 and ds.features.shape[0] == 150 and ds.audio.shape == (75 * 640,)
    assert np.abs(ds.audio).max() > 0.01  # the wav's speech, not silence
    assert ds.manifest["source"]["audio_path"].endswith("KristiNoem.wav")
    assert np.asarray(ds.face_valid).mean() > 0.9


def test_wide_frame_is_cropped_around_the_face(clips, tmp_path):
    """A 1280x720 .mov with the speaker off-centre: one square window around the face."""
    ds = Dataset(preprocess(clips["wide"], tmp_path / "wide", PreprocessConfig(size=64), progress=False))
    box = ds.manifest["crop_box"]
    assert ds.manifest["source"]["width"] == 1280 and ds.manifest["source"]["height"] == 720
    assert 400 <= box["side"] <= 720 and box["x0"] >= 500 and box["x0"] + box["side"] <= 1280
    lm = np.asarray(ds.lm2d)
    nose = lm[:, 30]
    assert (np.abs(nose[:, 0] - 32) < 10).all() and (nose[:, 1] > 18).all() and (nose[:, 1] < 40).all()
    assert (np.asarray(ds.masks) == 0).mean() > 0.1


def test_hubert_features(clips, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.HubertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(32, 32, 32, 32, 32, 32, 32),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    hub = tmp_path / "hubert"
    transformers.HubertModel(cfg).save_pretrained(hub)
    out = preprocess(
        clips["clean"],
        tmp_path / "ds",
        PreprocessConfig(size=64, audio_features="hubert", hubert_path=str(hub)),
        progress=False,
    )
    ds = Dataset(out)
    assert ds.feature_kind == "hubert" and ds.features.shape == (2 * ds.n_frames, 32)


def _no_leftovers(out: Path) -> bool:
    return not out.exists() and not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir())


@pytest.mark.parametrize(
    "case, error, words",
    [
        ("missing", InvalidMedia, "not found"),
        ("text", InvalidMedia, ""),
        ("truncated", InvalidMedia, ""),
        ("audio_only", InvalidMedia, "no video"),
        ("silent", NoAudio, "--audio"),
        ("short", ClipTooShort, "at least 2 s"),
        ("noface", NoFaceDetected, "no face"),
        ("gap", NoFaceDetected, "no face 0.8-2.0 s"),
    ],
)
def test_bad_input(case, error, words, clips, data_dir, tmp_path):
    src = {
        "missing": tmp_path / "nope.mp4",
        "audio_only": data_dir / "audio" / "RD_Radio31_000.wav",
        "silent": clips["silent"],
        "short": clips["short"],
        "noface": clips["noface"],
        "gap": clips["gap"],
    }.get(case)
    if case == "text":
        src = tmp_path / "notes.mp4"
        src.write_text("this is not a video\n" * 50)
    if case == "truncated":
        src = tmp_path / "cut.mp4"
        data = (data_dir / "corpus" / "WDA_KatieHill_000.mp4").read_bytes()
        src.write_bytes(data[: len(data) // 3])
    out = tmp_path / "out"
    with pytest.raises(error) as e:
        preprocess(src, out, PreprocessConfig(size=64), progress=False)
    assert words in str(e.value)
    assert _no_leftovers(out)
    # the CLI turns it into a one-line message and a non-zero exit code
    assert cli_main(["preprocess", str(src), "--out", str(out), "--size", "64", "--quiet"]) == error.exit_code
    assert _no_leftovers(out)


def test_existing_output_is_refused_before_work(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExists):
        preprocess(tmp_path / "does_not_exist.mp4", out, progress=False)  # refused before the input is read
    assert (out / "keep.txt").read_text() == "x"


def test_cli_help_and_overwrite(clips, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["preprocess", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--out", "--size", "--audio-features", "--hubert", "--audio", "--overwrite"):
        assert opt in text
    out = tmp_path / "ds"
    out.mkdir()
    assert (
        cli_main(["preprocess", str(clips["clean"]), "--out", str(out), "--size", "64", "--quiet"])
        == OutputExists.exit_code
    )
    assert (
        cli_main(["preprocess", str(clips["clean"]), "--out", str(out), "--size", "64", "--quiet", "--overwrite"]) == 0
    )
    assert json.loads((out / "manifest.json").read_text())["n_frames"] == 55
