"""Render options are defined once, by the dataclass :class:`avatar.pipeline.render.RenderOptions`; the
gRPC message ``avatar.v1.RenderOptions`` and the ``avatar render`` flags must follow it. This test
fails when one of the three gains or loses an option the others lack."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from avatar.pipeline.commands import add_render_options
from avatar.pipeline.render import RenderOptions

#: options that name files on the machine that renders: the CLI and the Python API take them, the
#: service does not (a client must not make the server open paths of its choosing)
LOCAL_ONLY = {"emotion_video", "emotion_neutral_video"}
#: dataclass field -> its ``avatar render`` flag where the name differs
CLI_FLAG = {"blink": "no_blink", "lle_blend": "lle"}


def _fields() -> set[str]:
    return {f.name for f in dataclasses.fields(RenderOptions)}


def test_proto_matches_the_dataclass():
    pb = pytest.importorskip("avatar_service.avatar_pb2", reason="the [serve] extra is not installed")
    proto = set(pb.RenderOptions.DESCRIPTOR.fields_by_name)
    assert proto == _fields() - LOCAL_ONLY, (
        f"proto RenderOptions vs the dataclass: only in the proto {sorted(proto - _fields())}, missing from "
        f"the proto {sorted(_fields() - LOCAL_ONLY - proto)}; add fields at the end of the message in "
        "proto/avatar/v1/avatar.proto, run `make proto`, and map them in service/server.py render_options"
    )


def test_server_maps_every_proto_field(monkeypatch):
    pb = pytest.importorskip("avatar_service.avatar_pb2", reason="the [serve] extra is not installed")
    pytest.importorskip("grpc")
    from avatar_service.server import render_options

    msg = pb.RenderOptions(
        emotion="happy",
        emotion_strength=0.5,
        still=True,
        blink=False,
        blink_rate=7.0,
        temperature=0.5,
        seed=3,
        size=64,
        head_speed=2.0,
        head_amplitude=0.5,
        lle_blend=0.25,
    )
    assert {f.name for f, _ in msg.ListFields()} == set(pb.RenderOptions.DESCRIPTOR.fields_by_name)
    opts = render_options(msg)
    assert opts == RenderOptions(
        emotion="happy",
        emotion_strength=0.5,
        still=True,
        blink=False,
        blink_rate=7.0,
        temperature=0.5,
        seed=3,
        size=64,
        head_speed=2.0,
        head_amplitude=0.5,
        lle_blend=0.25,
    )


def test_cli_has_a_flag_per_option():
    p = argparse.ArgumentParser()
    add_render_options(p)
    dests = {a.dest for a in p._actions}
    missing = {f for f in _fields() if CLI_FLAG.get(f, f) not in dests}
    assert not missing, f"`avatar render` lacks flags for {sorted(missing)} (avatar/pipeline/commands.py)"
