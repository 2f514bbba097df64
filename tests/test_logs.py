"""Third-party log noise (avatar/logs.py): fd 2 goes to /dev/null inside ``quiet_native`` and always
comes back; mediapipe's C++ start-up and per-frame warnings stay out of stderr unless verbose."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from avatar.logs import ENV_VERBOSE, quiet_native

REPO = Path(__file__).resolve().parents[1]


def test_quiet_native_restores_fd2_also_on_errors(capfd, monkeypatch):
    monkeypatch.delenv(ENV_VERBOSE, raising=False)
    before = os.fstat(2).st_ino
    os.write(2, b"before\n")
    with pytest.raises(RuntimeError):
        with quiet_native():
            os.write(2, b"hidden\n")
            with quiet_native():  # re-entrant: the inner exit does not restore early
                os.write(2, b"hidden 2\n")
            os.write(2, b"hidden 3\n")
            raise RuntimeError("boom")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "before\nafter\n"
    assert os.fstat(2).st_ino == before
    monkeypatch.setenv(ENV_VERBOSE, "1")
    with quiet_native():
        os.write(2, b"kept\n")
    assert capfd.readouterr().err == "kept\n"


_SCRIPT = """
import numpy as np
from avatar.face.landmarks import FaceDetector, FaceMeshTracker
from avatar.face.masks import PersonSegmenter
img = np.full((256, 256, 3), 127, np.uint8)
with FaceDetector() as det, FaceMeshTracker() as mesh, PersonSegmenter() as seg:
    for _ in range(3):
        det(img), mesh(img), seg(img)
print("ok")
"""


def test_mediapipe_quiet_unless_verbose():
    pytest.importorskip("mediapipe")
    env = {k: v for k, v in os.environ.items() if k not in (ENV_VERBOSE, "GLOG_minloglevel", "TF_CPP_MIN_LOG_LEVEL")}
    quiet = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert quiet.returncode == 0 and quiet.stdout == "ok\n", quiet.stderr[-2000:]
    assert quiet.stderr == ""
    loud = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        cwd=REPO,
        env={**env, ENV_VERBOSE: "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert loud.returncode == 0
    assert "W0000" in loud.stderr or "TensorFlow Lite" in loud.stderr  # what the quiet run hid
