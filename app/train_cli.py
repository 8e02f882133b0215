"""`dynface train starter|complete`: the training commands. Each builds its options value
(StarterOptions, CompleteOptions) once from the arguments and hands it to the library. The library
(and torch) is imported inside the handlers, so that `dynface --help` stays fast."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from dynface.train.complete_plan import CompleteOptions
    from dynface.train.starter_options import StarterOptions

T = TypeVar("T")
RM_PAIR_SOURCES = ("pool", "fresh")  # dynface.train.plan.RM_PAIR_SOURCES, without importing torch here


def add_train_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train model packs")
    sub = p.add_subparsers(dest="train_command", required=True)
    s = sub.add_parser("starter", help="train the starter pack from scratch (weights/starter/MODEL_CARD.md)")
    add_starter_arguments(s)
    s.set_defaults(handler=run_train_starter)
    c = sub.add_parser(
        "complete",
        help="complete a pack that has a prior and an RM (e.g. difface) with SE, DGSA and a DSST table",
    )
    add_complete_arguments(c)
    c.set_defaults(handler=run_train_complete)


# -- train starter ----------------------------------------------------------------------------------
def add_starter_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", nargs="?", default="weights/starter")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and steps (seconds; for tests)")
    parser.add_argument("--budget-minutes", type=float, default=75.0)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 when the machine is idle)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--check", action="store_true", help="only check an existing pack (no training)")
    parser.add_argument(
        "--force", action="store_true", help="overwrite a pack already in OUT (e.g. weights/starter)"
    )
    parser.add_argument("--note", action="append", default=[], help="a line for the model card (repeatable)")
    parser.add_argument("--reuse-prior", default=None, help="take the prior from this pack folder")
    parser.add_argument(
        "--vgg16", default=None, help="torchvision vgg16-397923af.pth: adds DISTS to DGSA's loss"
    )
    parser.add_argument("--dists-head", default=None, help="DISTS weights.pt (default: dists-pytorch's)")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="every stage's steps times this (GPU)")
    parser.add_argument(
        "--stage-steps", action="append", default=[], metavar="STAGE=N", help="one stage's steps (repeatable)"
    )
    parser.add_argument(
        "--stage-minutes",
        action="append",
        default=[],
        metavar="STAGE=M",
        help="one stage's total time budget in minutes, earlier runs in the work dir included (repeatable)",
    )
    parser.add_argument(
        "--rm-pairs",
        choices=RM_PAIR_SOURCES,
        default="pool",
        help="RM's pairs: the fixed pool, or a fresh degradation per sample (GPU runs)",
    )
    parser.add_argument(
        "--pair-workers", type=int, default=0, help="processes making fresh pairs (--rm-pairs fresh)"
    )
    parser.add_argument(
        "--prior-masked-share",
        type=float,
        default=0.0,
        help="share of each prior batch from re-aligned UTKFace crops, loss on original pixels (0: none)",
    )


def options_from_args(args: argparse.Namespace, cls: type[T], **converted: Any) -> T:
    """`cls` (an options dataclass) from the flags named after its fields, plus the `converted` values
    of the flags that need parsing or another name."""
    names = {f.name for f in fields(cls)} - set(converted)  # type: ignore[arg-type]
    return cls(**{k: v for k, v in vars(args).items() if k in names}, **converted)


def starter_options(args: argparse.Namespace) -> StarterOptions:
    from dynface.train.plan import parse_stage_values
    from dynface.train.starter_options import StarterOptions

    return options_from_args(
        args,
        StarterOptions,
        progress=not args.no_progress,
        stage_steps=parse_stage_values(args.stage_steps, int),
        stage_minutes=parse_stage_values(args.stage_minutes, float),
        notes=tuple(args.note),
    )


def run_train_starter(args: argparse.Namespace) -> int:
    import torch

    from dynface.train.starter import check_pack, report_json, train_starter

    torch.set_num_threads(args.threads)
    if args.check:
        print(json.dumps(check_pack(args.out_dir, data_dir=args.data_dir), indent=1))
        return 0
    existing = Path(args.out_dir) / "manifest.json"
    if existing.is_file() and not args.force:
        print(
            f"dynface train starter: {existing} exists: training would replace that pack's weights, card and"
            " results with a new run's; choose another folder, or pass --force",
            file=sys.stderr,
        )
        return 2
    report = train_starter(args.out_dir, starter_options(args))
    print(json.dumps(report_json(report), indent=1))
    return 0


# -- train complete ---------------------------------------------------------------------------------
def add_complete_arguments(c: argparse.ArgumentParser) -> None:
    c.add_argument("base", help="base pack: name, manifest path/URI or folder (never modified)")
    c.add_argument("out", help="folder or URI for the completed pack")
    c.add_argument("--data", required=True, help="folder or fsspec URI of HQ aligned faces")
    c.add_argument(
        "--steps", action="append", default=[], metavar="N|STAGE=N", help="steps of every stage or one"
    )
    c.add_argument("--batch", action="append", default=[], metavar="STAGE=N", help="a stage's global batch")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--resume", action="store_true", help="continue the checkpoints of an earlier run")
    c.add_argument("--quick", action="store_true", help="tiny networks, a few steps per stage (tests)")
    c.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    c.add_argument("--checkpoint-uri", default=None, help="folder or fsspec URI for the stage checkpoints")
    c.add_argument("--workers", type=int, default=0, help="data-parallel Ray Train workers (0: this process)")
    c.add_argument("--ray-address", default=None, help="train on this Ray cluster")
    c.add_argument("--device", default="cpu", help="cpu, or cuda (one GPU per Ray worker)")
    c.add_argument("--weights-dir", default=None, help="folder or URI holding the base pack's weight files")
    c.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="DGSA step (bf16 on cuda)")
    c.add_argument(
        "--no-checkpointing", action="store_true", help="keep the frozen UNet's activations (more memory)"
    )
    c.add_argument("--limit", type=int, default=None, help="train on the first N faces only")
    c.add_argument("--vgg16", default=None, help="torchvision vgg16-397923af.pth: adds DISTS to DGSA's loss")
    c.add_argument("--degrade-resolution", type=int, default=512, help="px the degradations are made at")
    c.add_argument("--threads", type=int, default=1, help="torch threads")


def complete_options(args: argparse.Namespace) -> CompleteOptions:
    from dynface.train.complete_plan import CompleteOptions, parse_batches, parse_steps

    return options_from_args(
        args,
        CompleteOptions,
        steps=parse_steps(args.steps),
        batch_sizes=parse_batches(args.batch),
        checkpointing=not args.no_checkpointing,
    )


def run_completion(
    base: str, out: str, data: str, options: CompleteOptions, *, ray_address: str | None, threads: int
) -> dict[str, Any]:
    """One completion with the application's Ray Train runner (the CLI and the `train-complete` flow)."""
    import torch

    from app.train_parallel import ray_data_parallel
    from dynface.train.complete import complete, report_json

    torch.set_num_threads(threads)
    runner = ray_data_parallel(
        options.workers, ray_address, use_gpu=options.device.startswith("cuda"), threads=threads
    )
    return report_json(complete(base, out, data, options, data_parallel=runner))


def run_train_complete(args: argparse.Namespace) -> int:
    options = complete_options(args)
    report = run_completion(
        args.base, args.out, args.data, options, ray_address=args.ray_address, threads=args.threads
    )
    print(json.dumps(report, indent=1))
    return 0 if report["finished"] else 3
