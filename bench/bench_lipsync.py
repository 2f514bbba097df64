"""Lip-sync on speakers the shared audio2motion never saw, next to the trivial baselines.

    .venv/bin/python -m avatar_bench.bench_lipsync --data ../shared/data [--model tcn] [--seeds 3] [--folds 4]
    .venv/bin/python -m avatar_bench.bench_lipsync --avatar NAME --store DIR --dataset WORK/NAME/dataset   # render path

What it measures (whole clips, :func:`avatar.motion.metrics.evaluate_clip`):

1. **Leave-one-speaker-out folds** of the corpora (``corpus/`` + ``corpus2/``): the clips are
   grouped by speaker (file-name heuristics, :func:`speaker_group`), the groups split into
   ``--folds`` folds; each fold's clips (>= 3 s) are evaluated with a generator trained on the
   other folds.
2. **Unseen speakers** (``speakers/*.mp4``, never in a corpus): a generator trained on all
   corpora, evaluated on each whole clip; then the same clip's validation tail after per-person
   fine-tuning on its training part (the onboarding path).
3. **Silence**: mouth opening on 3 s of digital silence vs the person's own quiet frames.
4. **Languages**: Pearson r of the mouth opening vs the audio energy for every file in ``audio/``.

Each number is the median over ``--seeds`` training seeds. Baselines beside every r and LMD:
the person's mean shape (mouth LMD of a zero expression) and the audio RMS-energy envelope (its
r with the real mouth opening). Prints tables and appends them to ``bench/RESULTS.md``.
Clips are preprocessed once into ``--cache`` (128 px; only landmarks and audio are used).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import re
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from avatar_bench.common import append_results, markdown_table
from avatar_bench.common import commit as _commit
from avatar_bench.common import machine as _machine

log = logging.getLogger("bench_lipsync")


def speaker_group(name: str) -> str:
    """Speaker identity of a corpus clip from its file name (clips of one person share a group)."""
    n = re.sub(r"-[0-9a-f]{12}(-[0-9a-f]{12})?-(mel|hubert)$", "", name).split("__")[-1]
    m = re.match(r"MEAD_([MW]\d{3})", n)
    if m:
        return m.group(1)
    for person in ("andrew", "feifeili", "reagan"):
        if n.startswith(person):
            return person
    return n


def clip_name(name: str) -> str:
    """A cached dataset's directory name without its config hashes (the clip's file stem)."""
    return re.sub(r"-[0-9a-f]{12}.*$", "", name)


def _fmt(x: float) -> str:
    return "nan" if x != x else f"{x:.3f}"


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def _train(datasets: list[Path], out: Path, model: str, steps: int | None, seed: int, preset: str) -> Path:
    from avatar.motion.train import PRESETS, train_generator

    cfg = replace(PRESETS[preset], model=model, seed=seed, syncnet_steps=min(PRESETS[preset].syncnet_steps, 200))
    if steps:
        cfg = replace(cfg, steps=steps, regression_fit=replace(cfg.regression_fit, steps=steps))
    return train_generator(datasets, out, cfg, overwrite=True, progress=False)


def _parse_overrides(pairs: list[str], flag: str, *configs) -> list[dict]:
    """``KEY=VALUE`` strings -> one dict of typed values per dataclass in ``configs`` (a key goes to the
    first that has that field; tuples as ``1,2,4``). Exits with a message for an unknown key."""
    import dataclasses

    def parse(kind: str, value: str):
        if kind.startswith("tuple"):
            return tuple(int(v) for v in value.split(","))
        return {"int": int, "float": float, "bool": lambda v: v.lower() in ("1", "true", "yes")}.get(kind, float)(value)

    kinds = [{f.name: str(f.type) for f in dataclasses.fields(c)} for c in configs]
    out: list[dict] = [{} for _ in configs]
    for pair in pairs:
        key, _, value = pair.partition("=")
        i = next((i for i, k in enumerate(kinds) if key in k), None)
        if i is None:
            raise SystemExit(f"{flag} {pair}: no field {key!r} in {' or '.join(c.__name__ for c in configs)}")
        out[i][key] = parse(kinds[i][key], value)
    return out


def _override_fit(pairs: list[str], preset: str) -> None:
    """Apply ``KEY=VALUE`` overrides to the shared-training preset (a RegressionTrainConfig field, or a
    RegressionConfig field for the architecture, e.g. ``hidden=192`` or ``dilations=1,2,4,8``) and to
    every fine-tuning preset (training fields only: fine-tuning keeps the shared architecture)."""
    from avatar.motion import regression, train

    fit, arch = _parse_overrides(pairs, "--fit", regression.RegressionTrainConfig, regression.RegressionConfig)
    p = train.PRESETS[preset]
    train.PRESETS[preset] = replace(
        p, regression_fit=replace(p.regression_fit, **fit), regression=replace(p.regression, **arch)
    )
    _override_finetune_fields({k: v for k, v in fit.items() if k != "steps"})


def _override_finetune_fields(over: dict) -> None:
    """Replace fields of every per-person fine-tuning preset (``--ft``, and ``--fit`` but its steps)."""
    from avatar.motion import regression

    for k, v in list(regression.FINETUNE_PRESETS.items()):
        regression.FINETUNE_PRESETS[k] = replace(v, **over)


def avatar_checks(store: Path, name: str, dataset: Path, data: Path) -> str:
    """Render-path lip-sync of an onboarded avatar (fine-tuned audio2motion + postnet, the landmarks
    the NeRFs receive): its validation tail driven by its own audio, every driving-audio file,
    digital silence. Returns a markdown section."""
    from avatar.api import load
    from avatar.audio import audio_energy
    from avatar.data.dataset import Dataset
    from avatar.media import load_audio
    from avatar.motion.metrics import mouth_opening, pearson
    from avatar.pipeline.render import landmarks_for_audio
    from avatar.store import AvatarStore

    m = load(name, store=AvatarStore(store)).models
    ds = Dataset(dataset)
    real = mouth_opening(np.asarray(ds.lm3d))
    tail = slice(ds.val_range.start, ds.val_range.stop)
    own = mouth_opening(landmarks_for_audio(m, np.asarray(ds.audio, np.float32)))
    rows = [
        {
            "input": "own audio, validation tail",
            "r vs real opening": _fmt(pearson(own[tail], real[tail])),
            "open-energy r": "",
            "std / real std": _fmt(float(own[tail].std() / real[tail].std())),
        }
    ]
    for wav in sorted((data / "audio").glob("*.wav")):
        w = load_audio(wav)
        o = mouth_opening(landmarks_for_audio(m, w))
        rows.append(
            {
                "input": wav.name,
                "r vs real opening": "",
                "open-energy r": _fmt(pearson(o, audio_energy(w, len(o)))),
                "std / real std": _fmt(float(o.std() / real.std())),
            }
        )
    sil = mouth_opening(landmarks_for_audio(m, np.zeros(16000 * 3, np.float32)))[25:]
    e = audio_energy(np.asarray(ds.audio, np.float32), ds.n_frames)
    quiet = real[e <= np.percentile(e, 10)]
    z = abs(sil.mean() - quiet.mean()) / quiet.std()
    return "\n".join(
        [
            f"\n### Render path of avatar `{name}` ({datetime.date.today()}, commit {_commit()})",
            "Fine-tuned audio2motion + postnet, block-wise exactly as rendered (`landmarks_for_audio`). "
            f"Digital silence: mouth opening {sil.mean():.4f} vs the person's quiet frames {quiet.mean():.4f} +- "
            f"{quiet.std():.4f} (z = {z:.2f}).",
            "",
            markdown_table(rows, list(rows[0])),
            "",
        ]
    )


def _prepare(args) -> tuple[list[Path], list[Path], dict[Path, Path]]:
    """Preprocess (cached) the corpora and the speakers clips; returns (corpus datasets, speakers
    datasets, {dataset: the dataset whose landmarks score it}) — itself, or with ``--eval-cache`` the
    same clip tracked there (clips missing from it are dropped)."""
    from avatar_recipes.train_generator import prepare_corpus

    size = {"size": args.size} if args.size else {}
    corpus = []
    for name in args.corpora.split(","):
        done, _ = prepare_corpus(args.data / name, args.cache / name, progress=False, **size)
        corpus += done
    speakers, _ = prepare_corpus(args.data / "speakers", args.cache / "speakers", progress=False, **size)
    truth = {d: d for d in corpus + speakers}  # the dataset whose landmarks score a clip
    if args.eval_cache:
        esize = {"size": args.eval_size} if args.eval_size else {}
        other = []
        for name in [*args.corpora.split(","), "speakers"]:
            other += prepare_corpus(args.data / name, args.eval_cache / name, progress=False, **esize)[0]
        by_clip = {clip_name(d.name): d for d in other}
        truth = {d: by_clip.get(clip_name(d.name)) for d in truth}
        corpus = [d for d in corpus if truth[d] is not None]
        speakers = [d for d in speakers if truth[d] is not None]
    return corpus, speakers, truth


def main(argv=None) -> int:
    from avatar.motion.metrics import evaluate_audio, evaluate_clip, silence_check
    from avatar.motion.regression import finetune_generator

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data"))
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "avatar-bench-lipsync")
    ap.add_argument(
        "--size",
        type=int,
        default=None,
        help="frame side (px) the clips are tracked at (default: train-generator's cache size)",
    )
    ap.add_argument(
        "--eval-cache",
        type=Path,
        default=None,
        help="score against the landmarks of this cache instead (e.g. tracked at another --eval-size)",
    )
    ap.add_argument("--eval-size", type=int, default=None)
    ap.add_argument("--model", default="tcn", choices=["tcn", "vae-flow"])
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="override the preset's training steps")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--folds", type=int, default=4)
    ap.add_argument("--corpora", default="corpus,corpus2")
    ap.add_argument("--min-seconds", type=float, default=3.0, help="shortest fold clip evaluated")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--label", default="", help="a note for the results heading (e.g. the lever tried)")
    ap.add_argument(
        "--fit",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a RegressionTrainConfig field (shared training and fine-tuning) or a "
        "RegressionConfig field (architecture; e.g. --fit hidden=192): a lever under test",
    )
    ap.add_argument(
        "--ft",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a RegressionTrainConfig field of per-person fine-tuning only",
    )
    ap.add_argument("--avatar", default=None, help="only the render-path checks of this onboarded avatar")
    ap.add_argument("--store", type=Path, default=None, help="with --avatar: its store")
    ap.add_argument("--dataset", type=Path, default=None, help="with --avatar: its dataset (work dir, --keep-work)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.avatar:
        text = avatar_checks(args.store, args.avatar, args.dataset, args.data)
        print(text)
        if not args.no_append:
            append_results(text)
        return 0
    t_start = time.time()
    if args.fit:
        _override_fit(args.fit, args.preset)
    if args.ft:
        from avatar.motion.regression import RegressionTrainConfig

        _override_finetune_fields(_parse_overrides(args.ft, "--ft", RegressionTrainConfig)[0])

    corpus, speakers, truth = _prepare(args)
    groups = sorted({speaker_group(d.name) for d in corpus})
    perm = np.random.default_rng(0).permutation(groups)
    folds = [set(perm[i :: args.folds]) for i in range(args.folds)]  # --folds 0: unseen speakers only
    from avatar.data.dataset import Dataset

    long_enough = {d: Dataset(d).n_frames >= args.min_seconds * 25 for d in corpus}
    fold_rows: dict[str, list[dict]] = {}
    spk_rows: dict[str, list[dict]] = {}
    tail_rows: dict[str, list[dict]] = {}
    sil_rows: dict[str, list[dict]] = {}
    lang_rows: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for seed in range(args.seeds):
            for k, fold in enumerate(folds):
                train = [d for d in corpus if speaker_group(d.name) not in fold]
                gen = _train(train, tmp / f"fold{k}", args.model, args.steps, seed, args.preset)
                for d in corpus:
                    if speaker_group(d.name) in fold and long_enough[d]:
                        fold_rows.setdefault(d.name, []).append(evaluate_clip(gen, truth[d]))
                log.info("seed %d fold %d done", seed, k)
            gen = _train(corpus, tmp / "all", args.model, args.steps, seed, args.preset)
            for d in speakers:
                spk_rows.setdefault(d.name, []).append(evaluate_clip(gen, truth[d]))
                sil_rows.setdefault(d.name, []).append(silence_check(gen, truth[d]))
                person = finetune_generator(
                    gen, d, tmp / f"person-{d.name}", preset=args.preset, overwrite=True, progress=False
                )
                tail_rows.setdefault(d.name, []).append(
                    {
                        **evaluate_clip(person, truth[d], part="val"),
                        "shared_r": evaluate_clip(gen, truth[d], part="val")["open_r"],
                        "silence_z_person": silence_check(person, truth[d])["silence_z"],
                    }
                )
            from avatar.media import load_audio

            for wav in sorted((args.data / "audio").glob("*.wav")):
                r = evaluate_audio(gen, load_audio(wav), temperature=0.0, lm3d_mean=Dataset(speakers[0]).lm3d_mean)
                lang_rows.setdefault(wav.name, []).append(r["open_energy_r"])

    def med(rows: list[dict], key: str) -> float:
        return _median([r[key] for r in rows])

    def short(name: str) -> str:
        return clip_name(name)[-40:]

    fold_table = [
        {
            "clip": short(n),
            "s": f"{rows[0]['frames'] / 25:.0f}",
            "r": _fmt(med(rows, "open_r")),
            "energy r": _fmt(med(rows, "energy_r")),
            "LMD / mean shape": _fmt(med(rows, "lmd_ratio")),
            "std ratio": _fmt(med(rows, "open_std_ratio")),
        }
        for n, rows in sorted(fold_rows.items())
    ]
    fold_table = fold_table or [{"clip": "(no LOSO folds run)"}]
    fr = [med(rows, "open_r") for rows in fold_rows.values()]
    fe = [med(rows, "energy_r") for rows in fold_rows.values()]
    fl = [med(rows, "lmd_ratio") for rows in fold_rows.values()]
    spk_table = []
    for n, rows in sorted(spk_rows.items()):
        t, s = tail_rows[n], sil_rows[n]
        spk_table.append(
            {
                "clip": short(n),
                "r": _fmt(med(rows, "open_r")),
                "energy r": _fmt(med(rows, "energy_r")),
                "LMD": _fmt(med(rows, "mouth_lmd")),
                "mean-shape LMD": _fmt(med(rows, "mean_shape_mouth_lmd")),
                "std ratio": _fmt(med(rows, "open_std_ratio")),
                "tail r shared": _fmt(med(t, "shared_r")),
                "tail r person": _fmt(med(t, "open_r")),
                "tail std ratio person": _fmt(med(t, "open_std_ratio")),
                "tail energy r": _fmt(med(t, "energy_r")),
                "silence z shared": _fmt(med(s, "silence_z")),
                "silence z person": _fmt(med(t, "silence_z_person")),
            }
        )
    lang_table = [{"audio": n, "open-energy r": _fmt(_median(v))} for n, v in sorted(lang_rows.items())]
    summary = (
        f"LOSO folds ({len(fold_rows)} clips >= {args.min_seconds:.0f} s, {len(groups)} speakers, {args.folds} folds): "
        f"mean r {_fmt(float(np.nanmean(fr)))} vs energy baseline {_fmt(float(np.nanmean(fe)))}; "
        f"r > energy on {sum(a > b for a, b in zip(fr, fe))}/{len(fr)} clips; "
        f"mouth LMD / mean-shape LMD {_fmt(float(np.nanmean(fl)))} (mean of clips). "
        f"Unseen speakers: mean r {_fmt(float(np.nanmean([med(r, 'open_r') for r in spk_rows.values()])))}."
    )
    text = "\n".join(
        [
            f"\n## Lip-sync on unseen speakers ({args.model}{', ' + args.label if args.label else ''}) — "
            f"{datetime.date.today()}, commit {_commit()}",
            f"Machine: {_machine()}. `python -m avatar_bench.bench_lipsync --model {args.model} --seeds {args.seeds} "
            f"--folds {args.folds}{' --steps ' + str(args.steps) if args.steps else ''}`; medians of {args.seeds} seed(s); "
            f"{time.time() - t_start:.0f} s in all.",
            "",
            summary,
            "",
            "Speakers outside every corpus (whole clip; then the validation tail after per-person fine-tuning):",
            "",
            markdown_table(spk_table, list(spk_table[0])),
            "",
            "Driving audio (no ground truth): mouth opening vs audio energy:",
            "",
            markdown_table(lang_table, ["audio", "open-energy r"]),
            "",
            "<details><summary>LOSO clips</summary>",
            "",
            markdown_table(fold_table, list(fold_table[0])),
            "",
            "</details>",
            "",
        ]
    )
    print(text)
    if not args.no_append:
        append_results(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
