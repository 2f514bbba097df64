"""Emotion benchmark (issue 14): leave-one-speaker-out per label with baselines, reference-video transfer.

Data: every labelled MEAD clip of ``emotion/`` (M030 + W009 x 8 labels, the six EAMM clips) and
``corpus2/`` (spectre ``MEAD_*``: M003 x2, M024, M026, M030, W015 neutral, W023, W036, W040).
Persons: the EAMM sad clip shows M030, the EAMM happy clip M003, and the EAMM fear and surprised clips one woman (checked
by eye on their first frames), so they are merged (:data:`SAME_PERSON`); otherwise one name = one
person.

**Category model (EAT-style), leave-one-speaker-out.** For each person with an emotional clip, the
model is trained on all the others (:func:`avatar.motion.emotion.train_on`) and evaluated on the
held-out person (:func:`avatar.motion.emotion.evaluate_speaker`: cosine on brows / eyes / mouth
corners between the predicted and the real mean displacement, and predicted / real size), next to
the two baselines (:func:`avatar.motion.emotion.baselines`): the plain average of the training
persons' displacements, and copying one training person (mean over the choices). Truth is "real"
only for persons with a recorded neutral clip (M030, W009); for the others it is measured against
the shared-statistics neutral estimate (built from the training persons only), reported apart.

**Reference video (EAMM-style).** For avatar persons with a recorded neutral (M030, W009; their
neutral clip = the avatar's landmarks), the transferred mean delta
(:func:`avatar.motion.emotion.measure_reference` + :func:`~avatar.motion.emotion.retarget_scale`)
vs the avatar person's real displacement of the same label: from another person's clip with and
without that person's neutral clip, from every other MEAD clip of the label (estimate), and from the
avatar person's own clip (estimate). Statistics for estimates come from the model trained without
the avatar person.

**Before** (``--before-commit``, default d9ae493, the code before issue 14): that commit's
``avatar/motion/emotion.py`` (read with ``git show``) trained on ``emotion/`` only as ``make demo``
did, evaluated on M030 / W009 with the same truth, and its reference path.

Usage::

    python -m avatar_bench.bench_emotion [--runs 1] [--steps 1500] [--cache /tmp/emotion_tracks] [--no-before]

Prints the tables and appends them to ``bench/RESULTS.md`` (machine, git commit, date).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from avatar_bench.common import ROOT, append_results, commit, machine

DATA = Path(os.environ.get("AVATAR_TEST_DATA", ROOT.parent / "shared" / "data"))
#: names that show the same person (checked by eye on the first frames of the clips)
SAME_PERSON = {"eamm_sad": "M030", "eamm_happy": "M003", "eamm_fear": "eamm_F1", "eamm_surprised": "eamm_F1"}


def _dirs():
    return [DATA / "emotion", DATA / "corpus2"]


def _fmt(x, nd=2):
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.{nd}f}"


def loso(tracks, runs: int, steps: int | None, **cfg_kw):
    """Per held-out person: model rows + baselines. Returns {speaker: {label: row}}, train times.
    ``cfg_kw`` overrides :class:`avatar.motion.emotion.EmotionConfig` fields."""
    from avatar.motion import emotion as E

    out, times = {}, []
    for held in [st for st in tracks if any(lab != "neutral" for lab in st.clips)]:
        per_seed = []
        for seed in range(runs):
            cfg = E.EmotionConfig(holdout=held.speaker, seed=seed, **cfg_kw)
            if steps:
                cfg.steps = steps
            net, m = E.train_on(tracks, cfg)
            times.append(m["train_s"])
            rows = E.evaluate_speaker(net, held, allow_estimated=True)
            base = E.baselines([st for st in tracks if st.speaker != held.speaker], held, net.neutral_stats())
            per_seed.append((rows, base, net))
        merged = {}
        for label in per_seed[0][0]:
            if label not in per_seed[0][1]:
                continue
            r = {k: float(np.median([p[0][label][k] for p in per_seed])) for k in ("cosine", "size_ratio", "mouth_lmd")}
            r.update(per_seed[0][1][label])
            r["estimated_truth"] = per_seed[0][0][label]["estimated_truth"]
            merged[label] = r
        out[held.speaker] = {"rows": merged, "net": per_seed[0][2]}
        print(
            f"[loso] {held.speaker}: "
            + ", ".join(f"{k} {v['cosine']:.2f}/{v['average_cos']:.2f}" for k, v in merged.items()),
            flush=True,
        )
    return out, times


def loso_table(res, labels, estimated: bool) -> list[str]:
    lines = [
        "| label | persons | model cosine | avg-baseline cosine | copy-one cosine | model size ratio | avg size | copy size | model > avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    allm, alla, allc, alls = [], [], [], []
    for label in labels:
        rows = [
            (spk, r["rows"][label])
            for spk, r in res.items()
            if label in r["rows"] and r["rows"][label]["estimated_truth"] == estimated
        ]
        if not rows:
            continue
        m = np.mean([r["cosine"] for _, r in rows])
        a = np.mean([r["average_cos"] for _, r in rows])
        c = np.mean([r["copy_cos"] for _, r in rows])
        s = np.mean([r["size_ratio"] for _, r in rows])
        allm += [r["cosine"] for _, r in rows]
        alla += [r["average_cos"] for _, r in rows]
        allc += [r["copy_cos"] for _, r in rows]
        alls += [r["size_ratio"] for _, r in rows]
        lines.append(
            f"| {label} | {', '.join(s_ for s_, _ in rows)} | {m:.3f} | {a:.3f} | {c:.3f} | {s:.2f} | "
            f"{np.mean([r['average_size'] for _, r in rows]):.2f} | {np.mean([r['copy_size'] for _, r in rows]):.2f} | "
            f"{'yes' if m > a else 'NO'} |"
        )
    if allm:
        lines.append(
            f"| **mean (all rows)** | | **{np.mean(allm):.3f}** | {np.mean(alla):.3f} | {np.mean(allc):.3f} | "
            f"{np.mean(alls):.2f} | | | |"
        )
    return lines


def reference_rows(tracks, clips, res):
    """Transfer rows: (avatar, label, source kind, reference name, cos, size proportions, size range)."""
    from avatar.motion import emotion as E

    by = {st.speaker: st for st in tracks}
    rows = []
    for avatar in ("M030", "W009"):
        st = by[avatar]
        stats = res[avatar]["net"].neutral_stats()  # trained without the avatar person
        real = E.speaker_displacements(st, stats)
        avatar_track = st.clips["neutral"][0]
        for label in E.LABELS[1:]:
            if label not in real:
                continue
            cands = []
            for spk, items in clips.items():
                for lab, path, tc in items:
                    if lab != label:
                        continue
                    if spk == avatar:
                        cands.append(("own clip, estimate", path.stem, tc, None))
                    else:
                        neutral = [t for lab2, _, t in items if lab2 == "neutral"]
                        cands.append(("other person, estimate", path.stem, tc, None))
                        if neutral:
                            cands.append(("other person + neutral clip", path.stem, tc, neutral[0]))
            for kind, name, tc, neu in cands:
                ref = E.measure_reference(tc, neu, stats)
                d_p = ref.disp.mean(0) * E.retarget_scale(ref, st.neutral_mean)
                d_r = ref.disp.mean(0) * E.retarget_scale(ref, st.neutral_mean, avatar_track, "range")
                rows.append(
                    (
                        avatar,
                        label,
                        kind,
                        name,
                        E.cosine(d_p, real[label]),
                        E.norm(d_p) / E.norm(real[label]),
                        E.norm(d_r) / E.norm(real[label]),
                        ref.neutral_source,
                    )
                )
    return rows


def reference_table(rows) -> list[str]:
    kinds = ["other person + neutral clip", "other person, estimate", "own clip, estimate"]
    lines = [
        "| reference | pairs | mean cosine | min cosine | cos >= 0.7 | size ratio (proportions) | size ratio (range) |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in kinds:
        rs = [r for r in rows if r[2] == kind]
        if not rs:
            continue
        c = np.array([r[4] for r in rs])
        lines.append(
            f"| {kind} | {len(rs)} | {c.mean():.3f} | {c.min():.2f} | {int((c >= 0.7).sum())}/{len(c)} | "
            f"{np.mean([r[5] for r in rs]):.2f} | {np.mean([r[6] for r in rs]):.2f} |"
        )
    lines += [
        "",
        "Per label (mean cosine / size ratio with proportions retargeting; references):",
        "",
        "| label | " + " | ".join(kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    labels = list(dict.fromkeys(r[1] for r in rows))
    for label in labels:
        cells = []
        for kind in kinds:
            rs = [r for r in rows if r[1] == label and r[2] == kind]
            cells.append(
                f"{np.mean([r[4] for r in rs]):.2f} / {np.mean([r[5] for r in rs]):.2f} "
                f"({', '.join(sorted({_short(r[3]) for r in rs}))})"
                if rs
                else "-"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _short(stem: str) -> str:
    from avatar.motion import emotion as E

    return E.speaker_of(stem) if "MEAD_" in stem or "_front_" in stem else stem


def _load_old(rev: str):
    src = subprocess.run(
        ["git", "show", f"{rev}:avatar/motion/emotion.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / f"emotion_{rev}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"emotion_{rev}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def before(rev: str, clips, new_tracks, runs: int) -> list[str]:
    """The previous implementation: LOSO on M030 / W009 trained on emotion/ (as the demo did),
    and its reference path, scored with the new code's truth (recorded neutral)."""
    from avatar.motion import emotion as E

    old = _load_old(rev)
    old_tracks = old.track_speakers(DATA / "emotion", progress=False)
    by_new = {st.speaker: st for st in new_tracks}
    lines = [
        f"\n**Before ({rev}: trained on emotion/ only, as `make demo`; held out M030 / W009)**\n",
        "| label | model cosine M030 | model cosine W009 | size ratio M030 | size ratio W009 |",
        "|---|---|---|---|---|",
    ]
    per = {}
    for held in ("M030", "W009"):
        rs = []
        for seed in range(runs):
            with tempfile.TemporaryDirectory() as tmp:
                m = old.train_emotion(
                    None, Path(tmp) / "e", old.EmotionConfig(holdout=held, seed=seed), progress=False, tracks=old_tracks
                )
            rs.append(m["holdout"]["labels"])
        per[held] = {
            lab: (
                float(np.median([r[lab]["cosine"] for r in rs])),
                float(np.median([r[lab]["pred_norm"] / r[lab]["real_norm"] for r in rs])),
            )
            for lab in rs[0]
        }
    for lab in E.LABELS[1:]:
        a, b = per["M030"].get(lab), per["W009"].get(lab)
        lines.append(f"| {lab} | {_fmt(a and a[0])} | {_fmt(b and b[0])} | {_fmt(a and a[1])} | {_fmt(b and b[1])} |")
    allc = [v[0] for h in per.values() for v in h.values()]
    alls = [v[1] for h in per.values() for v in h.values()]
    lines.append(f"| **mean** | {np.mean(allc):.3f} (both) | | {np.mean(alls):.2f} (both) | |")
    # old reference path on the same pairs (other person's clip; its own mean removed)
    cos_o, size_o = [], []
    for avatar, other in (("M030", "W009"), ("W009", "M030")):
        st = by_new[avatar]
        for lab, path, tc in clips[other]:
            if lab == "neutral" or "_front_" not in path.stem:
                continue
            (lm,), _ = old.canonicalise_speaker([old.TrackedClip(path, tc.points)])
            disp = ((lm - lm.mean(0)[None]) * old._MOVABLE_MASK[None]).mean(0) * old.region_scale(
                lm.mean(0), st.neutral_mean
            )
            real = (np.concatenate(st.clips[lab]).mean(0) - st.neutral_mean) * E.MOVABLE_MASK
            cos_o.append(E.cosine(disp, real))
            size_o.append(E.norm(disp) / E.norm(real))
    lines.append(
        f"\nBefore, reference video (other person's clip, its own mean removed): mean cosine {np.mean(cos_o):.3f} "
        f"(min {np.min(cos_o):.2f}, max {np.max(cos_o):.2f}), size ratio {np.mean(size_o):.3f} over {len(cos_o)} pairs."
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    import torch

    from avatar.motion import emotion as E

    torch.set_num_threads(1)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=1, help="seeds per held-out person (median)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument(
        "--cache", default=str(Path(tempfile.gettempdir()) / "emotion_tracks"), help="tracked-landmark cache"
    )
    ap.add_argument("--before-commit", default="d9ae493")
    ap.add_argument("--no-before", action="store_true")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--no-neutral-weight", type=float, default=None, help="EmotionConfig.no_neutral_weight override")
    ap.add_argument("--no-symmetric", action="store_true", help="train on the raw (not symmetrised) displacements")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    tracks = E.track_speakers(_dirs(), progress=False, cache_dir=args.cache, aliases=SAME_PERSON)
    listing = E.list_clips(_dirs(), SAME_PERSON)
    clips = {
        spk: [(lab, p, E.track_clip(p, cache_dir=args.cache)) for lab, p in items] for spk, items in listing.items()
    }
    track_s = time.perf_counter() - t0
    n_clips = sum(len(v) for v in listing.values())

    kw = {"symmetric": not args.no_symmetric}
    if args.no_neutral_weight is not None:
        kw["no_neutral_weight"] = args.no_neutral_weight
    res, times = loso(tracks, args.runs, args.steps, **kw)
    ref_rows = reference_rows(tracks, clips, res)

    labels = E.LABELS[1:]
    persons = ", ".join(st.speaker + ("*" if st.neutral_mean is not None else "") for st in tracks)
    lines = [
        f"\n## bench_emotion: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, commit {commit()}\n",
        f"Machine: {machine()}. {n_clips} labelled MEAD clips, {len(tracks)} persons "
        f"({persons}; * = recorded neutral clip); "
        f"tracking {track_s:.1f} s (cache {args.cache}). Category model: {args.runs} seed(s) per held-out person, "
        f"training {np.median(times):.1f} s median, config overrides {kw}. Canonical units (outer-eye-corner distance = 1); cosine and size on "
        "brows + eyes + mouth corners.\n",
        "**After: leave-one-person-out, truth against a recorded neutral clip (M030, W009)**\n",
    ]
    lines += loso_table(res, labels, estimated=False)
    lines += [
        "\n**After: leave-one-person-out, persons without a neutral clip (truth against the shared-statistics "
        "neutral estimate from the training persons: carries identity error and leans towards the training average)**\n"
    ]
    lines += loso_table(res, labels, estimated=True)
    lines += [
        "\n**After: reference video (EAMM path), avatar = M030 or W009 (neutral clip as its landmarks), "
        "transferred mean delta vs the avatar person's real displacement of the same label**\n"
    ]
    lines += reference_table(ref_rows)
    src = {}
    for r in ref_rows:
        src[r[7]] = src.get(r[7], 0) + 1
    lines.append(f"\nNeutral source chosen: {src}.")
    if not args.no_before:
        lines += before(args.before_commit, clips, tracks, args.runs)
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_append:
        append_results(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
