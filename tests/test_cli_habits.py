"""CLI conventions every command shares: ``avatar --version`` (one version, pyproject's) and
``list --json``."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest

import avatar
from avatar.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_version_is_pyprojects(capsys):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert avatar.__version__ == version
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"avatar {version}"


def test_list_json(tmp_path, capsys):
    assert main(["list", "--json", "--store", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == []


# ---- the flags every command shares (issue 17) -------------------------------------------------
def _leaves():
    from avatar.cli import _leaf_parsers, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(_leaf_parsers(sub))


def test_every_command_takes_quiet_and_verbose():
    for path, p in _leaves().items():
        for flag in ("-q", "--quiet", "-v", "--verbose"):
            assert flag in p._option_string_actions, f"avatar {path} lacks {flag}"


def test_train_and_render_commands_take_device():
    from avatar.cli import DEVICE_COMMANDS

    leaves = _leaves()
    for path in DEVICE_COMMANDS:
        if path in leaves:  # an area may be absent from an install (service, recipes)
            assert "--device" in leaves[path]._option_string_actions, f"avatar {path} lacks --device"
    for path in ("render", "train-nerf", "eval-motion", "train-generator", "train-postnet", "onboard", "train-emotion"):
        assert "--seed" in leaves[path]._option_string_actions, f"avatar {path} lacks --seed"


def test_device_flag_is_the_default_device_while_the_command_runs(monkeypatch):
    """``--device`` reaches stages that pick their own device (resolve_device(None)), and only while
    the command runs."""
    from avatar import runtime
    from avatar.motion import commands as motion_commands

    seen = {}

    def fake(args):
        seen["device"] = str(runtime.resolve_device(None))
        seen["verbose"] = args.verbose
        return 0

    monkeypatch.setattr(motion_commands, "_train_postnet", fake)
    before = str(runtime.resolve_device(None))
    assert main(["train-postnet", "ds", "--generator", "g", "--out", "o", "--device", "cpu", "-v"]) == 0
    assert seen == {"device": "cpu", "verbose": 1}
    assert str(runtime.resolve_device(None)) == before
    assert runtime.resolve_device("cpu").type == "cpu"


def test_onboard_seed_and_quiet_reach_every_training_stage(monkeypatch, tmp_path, capsys):
    """``onboard --seed N -q``: the seed reaches each training stage (motion fine-tuning, postnet, head
    and torso NeRF) and ``-q`` turns their bars off; without the flags: seed 0, bars on. (The seeds
    themselves are checked for determinism by train-generator / train-postnet / train-emotion tests.)"""
    from avatar.motion import postnet, regression
    from avatar.nerf import trainer
    from avatar.pipeline import onboard as onboard_module
    from avatar.pipeline.stages import run_stage

    seen: dict = {}
    monkeypatch.setattr(onboard_module, "onboard", lambda *a, **kw: seen.update(onboard=kw) or tmp_path)
    assert main(["onboard", "v.mp4", "--name", "n", "--seed", "7", "-q", "--store", str(tmp_path)]) == 0
    assert seen["onboard"]["seed"] == 7 and seen["onboard"]["bars"] is False
    assert main(["onboard", "v.mp4", "--name", "n", "--store", str(tmp_path)]) == 0
    assert seen["onboard"]["seed"] == 0 and seen["onboard"]["bars"] is True
    capsys.readouterr()

    calls = []
    for module, name in ((regression, "finetune_generator"), (postnet, "train_postnet"), (trainer, "train_nerf")):
        monkeypatch.setattr(module, name, lambda *a, _n=name, **kw: calls.append((_n, kw["seed"], kw["progress"])))
    for stage in ("motion", "postnet", "head", "torso"):
        run_stage(stage, tmp_path, tmp_path / "v.mp4", "cpu-smoke", tmp_path / "gen", seed=7, show_bars=False)
    assert calls == [
        ("finetune_generator", 7, False),
        ("train_postnet", 7, False),
        ("train_nerf", 7, False),
        ("train_nerf", 7, False),
    ]


def test_demo_quiet_reaches_every_stage(monkeypatch, tmp_path, capsys):
    """``demo -q`` hands ``progress=False`` to the demo and the demo to every stage it runs (generator
    and emotion training, onboarding, both renders); without ``-q`` the bars stay on. The stages are
    stubs: only the flag's path is under test (the real demo takes ~35 minutes)."""
    import avatar.api
    import avatar.motion.emotion
    import avatar.store
    import avatar_recipes.demo
    import avatar_recipes.train_generator
    from avatar.pipeline import onboard as onboard_module

    seen: dict = {}
    real_run_demo = avatar_recipes.demo.run_demo
    monkeypatch.setattr(avatar_recipes.demo, "run_demo", lambda *a, **kw: seen.update(kw) or 0)
    assert main(["demo", "-q", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 0
    assert seen["progress"] is False
    assert main(["demo", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 0
    assert seen["progress"] is True

    class Store:  # an empty store: every stage runs
        def __init__(self, root):
            self.root = Path(root)
            self.generator_dir, self.emotion_dir = self.root / "gen", self.root / "emo"

        def exists(self, name):
            return False

        def manifest(self, name):
            return {}

        def info(self, name):
            return {"metrics": {}}

    class Avatar:
        def render_to_mp4(self, audio, dst, options, progress=True):
            calls.append(("render", progress))
            return {"path": str(dst)}

    (tmp_path / avatar_recipes.demo.SPEAKER).parent.mkdir(parents=True)
    (tmp_path / avatar_recipes.demo.SPEAKER).touch()
    monkeypatch.setattr(avatar.store, "AvatarStore", Store)
    monkeypatch.setattr(
        avatar_recipes.train_generator, "train_generator", lambda *a, **kw: calls.append(("generator", kw["progress"]))
    )
    monkeypatch.setattr(
        avatar.motion.emotion, "train_emotion", lambda *a, **kw: calls.append(("emotion", kw["progress"]))
    )
    monkeypatch.setattr(onboard_module, "onboard", lambda *a, **kw: calls.append(("onboard", kw["bars"])))
    monkeypatch.setattr(avatar.api, "load", lambda *a, **kw: Avatar())
    monkeypatch.setattr(avatar_recipes.demo, "_compare_png", lambda *a: None)
    for progress in (False, True):
        calls: list = []
        assert real_run_demo(tmp_path, tmp_path / "out", preset="cpu-smoke", progress=progress) == 0
        assert calls == [
            ("generator", progress),
            ("emotion", progress),
            ("onboard", progress),
            ("render", progress),
            ("render", progress),
        ]
    capsys.readouterr()


def test_json_errors_leave_stdout_empty(tmp_path, capsys):
    """A failing ``--json`` command prints its error on stderr only: stdout stays parseable (empty)."""
    assert main(["show", "nobody", "--json", "--store", str(tmp_path)]) != 0
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: ")


def test_render_and_show_json_on_a_real_avatar(tiny_avatar, tmp_path, capsys, data_dir):
    """``--json``: one JSON object on stdout and nothing else."""
    root, name = tiny_avatar
    audio = data_dir / "speakers" / "acosta_cnn_71s.mp4"
    from avatar.media import load_audio
    from avatar.media.audio import write_wav

    wav = tmp_path / "a.wav"
    write_wav(wav, load_audio(audio)[:16000], 16000)
    assert (
        main(
            [
                "render",
                "--avatar",
                name,
                "--audio",
                str(wav),
                "--out",
                str(tmp_path / "o.mp4"),
                "--store",
                str(root),
                "--json",
                "-q",
                "--device",
                "cpu",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out)
    assert res["path"] == str(tmp_path / "o.mp4") and res["frames"] == 25 and res["wall_s"] > 0
    assert main(["show", name, "--json", "--store", str(root)]) == 0
    assert json.loads(capsys.readouterr().out)["size"] > 0


@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_completion_script(shell, capsys, tmp_path):
    """``avatar completion SHELL`` prints a script generated from the parser: every subcommand and
    nested client action is in it; the bash one parses and completes subcommands and preset names."""
    import shutil
    import subprocess

    assert main(["completion", shell]) == 0
    script = capsys.readouterr().out
    for word in ("render", "onboard", "train-nerf", "completion", "--preset", "--json", "cpu-smoke"):
        assert word in script, word
    if shell == "bash" and shutil.which("bash"):
        (tmp_path / "c.bash").write_text(script)
        probe = (
            'source c.bash; t(){ COMP_WORDS=("$@"); COMP_CWORD=$((${#COMP_WORDS[@]}-1)); COMP_LINE="$*"; '
            'COMP_POINT=${#COMP_LINE}; COMPREPLY=(); _shtab_avatar avatar "${COMP_WORDS[-1]}" x; echo "${COMPREPLY[*]}"; }; '
            't avatar ren; t avatar train-nerf --preset ""'
        )
        out = subprocess.run(["bash", "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.splitlines()
        assert lines[0] == "render" and {"cpu-smoke", "cpu-small", "gpu-full"} <= set(lines[1].split())


# ---- one preset vocabulary (avatar/pipeline/stages.py) -------------------------------------------
def test_stage_presets_name_each_stages_own_presets():
    from avatar.motion.postnet import PRESETS as POSTNET
    from avatar.motion.regression import FINETUNE_PRESETS
    from avatar.motion.train import PRESETS as GENERATOR
    from avatar.nerf.presets import PRESETS as NERF
    from avatar.pipeline.stages import PRESET_ALIASES, PRESET_NAMES, PRESETS, STAGE_PRESETS, stage_preset

    own = {"onboard": [PRESETS], "nerf": [NERF], "generator": [GENERATOR], "postnet": [POSTNET, FINETUNE_PRESETS]}
    for stage, tables in own.items():
        assert set(STAGE_PRESETS[stage]) == set(PRESET_NAMES)
        for name in PRESET_NAMES:
            for table in tables:
                assert stage_preset(stage, name) in table, (stage, name)
    # the old names mean what they meant: train-generator / train-postnet ran exactly these presets
    for old, new in PRESET_ALIASES.items():
        assert stage_preset("generator", new) == old == stage_preset("postnet", old)
    assert {n: (p.nerf, p.postnet) for n, p in PRESETS.items()} == {
        "cpu-smoke": ("cpu-smoke", "smoke"),
        "cpu-small": ("cpu-small", "cpu"),
        "gpu-full": ("gpu-full", "gpu"),
    }


@pytest.mark.parametrize(
    "argv, handed, warned",
    [
        (["train-generator", "c", "--out", "o"], "cpu", False),  # the default is unchanged
        (["train-generator", "c", "--out", "o", "--preset", "cpu-smoke"], "smoke", False),
        (["train-generator", "c", "--out", "o", "--preset", "gpu"], "gpu", True),
        (["train-postnet", "d", "--generator", "g", "--out", "o", "--preset", "gpu-full"], "gpu", False),
        (["train-postnet", "d", "--generator", "g", "--out", "o", "--preset", "smoke"], "smoke", True),
        (["train-nerf", "d", "--out", "o"], "cpu-small", False),
        (["train-nerf", "d", "--out", "o", "--preset", "smoke"], "cpu-smoke", True),
        (["onboard", "v.mp4", "--name", "n", "--preset", "cpu"], "cpu-small", True),
    ],
)
def test_every_command_takes_the_unified_preset_names(argv, handed, warned, monkeypatch, capsys):
    from avatar.motion import commands as motion_commands
    from avatar.nerf import commands as nerf_commands
    from avatar.pipeline import commands as pipeline_commands

    seen = {}

    def fake(args):
        seen["preset"] = args.preset
        return 0

    for module, name in (
        (motion_commands, "_train_generator"),
        (motion_commands, "_train_postnet"),
        (nerf_commands, "_train"),
        (pipeline_commands, "cmd_onboard"),
    ):
        monkeypatch.setattr(module, name, fake)
    assert main(argv) == 0
    assert seen["preset"] == handed
    err = capsys.readouterr().err
    assert ("deprecated" in err) == warned and len([ln for ln in err.splitlines() if "deprecated" in ln]) == int(warned)


def test_unknown_preset_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train-generator", "c", "--out", "o", "--preset", "huge"])
    assert e.value.code == 2 and "cpu-smoke" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--preset", "gpu-full"])  # the demo runs on the CPU presets only


# ---- packaging: the app layers install under the project's name (docs/ARCHITECTURE.md "Packaging") ----
def test_app_layers_install_under_the_projects_name(tmp_path):
    """``service/``, ``recipes/``, ``bench/`` install as ``avatar_service``, ``avatar_recipes``,
    ``avatar_bench``: importable from any working directory, nothing named ``service`` / ``recipes`` /
    ``bench`` installed, and the ``avatar`` command has serve, client, demo, train-emotion."""
    import subprocess
    import sys

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert meta["tool"]["setuptools"]["package-dir"] == {
        "avatar_service": "service",
        "avatar_recipes": "recipes",
        "avatar_bench": "bench",
    }
    assert "graft service" in (REPO / "MANIFEST.in").read_text()  # the sdist keeps the folders
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    probe = (
        "import importlib.util, avatar_service.server, avatar_recipes.demo, avatar_bench.common\n"
        "print([n for n in ('service', 'recipes', 'bench') if importlib.util.find_spec(n)])"
    )
    r = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"
    r = subprocess.run(
        [sys.executable, "-m", "avatar.cli", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    for command in ("serve", "client", "demo", "train-emotion", "train-generator"):
        assert re.search(rf"^    {command}\b", r.stdout, re.M), command


def test_a_missing_optional_dependency_names_its_extra(monkeypatch, capsys):
    """A command whose optional stack is not installed ends with the extra to install and exit 69."""
    from avatar.motion import commands as motion_commands

    def needs_ray(args):
        raise ModuleNotFoundError("No module named 'ray'", name="ray")

    monkeypatch.setattr(motion_commands, "_train_postnet", needs_ray)
    assert main(["train-postnet", "ds", "--generator", "g", "--out", "o"]) == 69
    err = capsys.readouterr().err
    assert "needs `ray`" in err and "pip install 'avatar[ray]'" in err and "Traceback" not in err
