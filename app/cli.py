"""The `dynface` command line.

    dynface restore SRC DEST [--catalog URI] [--pack NAME|URI] [--weights-dir DIR] [--aligned] [--method M]
                    [--guidance dps|closed_form] [--device D] [--shard-size N] [--compare]
                    [--option key=value ...]
    dynface review CATALOG_URI [--run RUN_ID] [--port 8765] [--reviewer NAME]
    dynface publish CATALOG_URI DEST [--require-review] [--run RUN_ID]
    dynface catalog sql CATALOG_URI "SELECT ..." [--as-of VERSION]
    dynface catalog compact|history CATALOG_URI; dynface catalog vacuum CATALOG_URI [--retain-hours H]
    dynface catalog migrate OLD_URI NEW_URI
    dynface pack random DIR [--resolution 32]
    dynface pack pin PACK --out DIR [--weights-dir DIR]
    dynface pack hash PACK [--weights-dir DIR]
    dynface evaluate [--pack PACK] [--hq DIR] [--methods M,...] [--out DIR] [--split test] ...
    dynface train starter OUT [--quick] ...; dynface train complete BASE OUT --data URI ... (app/train_cli.py)

Each subcommand is added by one `add_*_command(subparsers)` function listed in `SUBCOMMANDS`
(no plugin discovery): a new command is one more function and one more entry. Heavy imports
(torch, Prefect, Ray) happen inside the handlers, so `dynface --help` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from app.train_cli import add_train_command

# No process we start may send traffic off this machine (shared/design/PLATFORM.md); the caller's
# own settings win. The ephemeral Prefect server needs more than its 20 s default on a busy machine.
OFFLINE_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "AWS_EC2_METADATA_DISABLED": "true",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}

Handler = Callable[[argparse.Namespace], int]


def apply_offline_env(*, quiet: bool) -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if quiet:  # Prefect's per-task INFO lines would bury the progress bar
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def parse_option(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, value); the value is JSON when it parses (numbers, true/false, lists),
    else the plain string (`respacing=ddim10`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


# -- restore ----------------------------------------------------------------------------------------
def add_restore_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("restore", help="restore every face of an image folder or URI prefix")
    p.add_argument("source", help="folder, file or fsspec URI/prefix (s3://bucket/photos)")
    p.add_argument("dest", help="output folder or URI (restored/, faces/, compare/, catalog/)")
    p.add_argument("--catalog", default=None, help="catalog URI (default: DEST/catalog)")
    p.add_argument("--pack", default="starter", help="pack name or manifest path/URI (default: starter)")
    p.add_argument(
        "--weights-dir",
        default=None,
        help="folder or URI prefix holding the pack's weight files (e.g. the official DifFace files)",
    )
    p.add_argument("--aligned", action="store_true", help="inputs are aligned face crops (no detection)")
    p.add_argument(
        "--aligned-max-aspect",
        type=float,
        default=1.1,
        help="with --aligned: skip inputs whose longer side exceeds the shorter by more (default: 1.1)",
    )
    p.add_argument("--method", default="full", help="restoration method (default: full)")
    p.add_argument("--guidance", choices=("dps", "closed_form"), default=None, help="default: the pack's")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--shard-size", type=int, default=64, help="images per shard (default: 64)")
    p.add_argument("--wave-shards", type=int, default=2, help="shards sampled together (default: 2)")
    p.add_argument("--num-actors", type=int, default=None, help="Ray sampling actors (default: auto)")
    p.add_argument("--ray-address", default=None, help="Ray cluster (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--compare", action="store_true", help="also write input|output side-by-sides")
    p.add_argument("--keep-work", action="store_true", help="keep the run's work folder")
    p.add_argument(
        "--wait",
        action="store_true",
        help="if another run is restoring into the catalog, wait for it to end (default: refuse)",
    )
    p.add_argument(
        "--option",
        action="append",
        type=parse_option,
        default=[],
        metavar="KEY=VALUE",
        help="RestoreConfig override, repeatable (e.g. respacing=ddim50, eta=0.5)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="show Prefect's task logs")
    p.set_defaults(handler=run_restore)


class _ProgressBars(logging.Handler):
    """Turns the pipeline's progress records (tasks.work.report_progress) into a tqdm bar on stderr."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        from tqdm import tqdm

        self.bar = tqdm(total=0, unit="face", desc="restoring faces", file=sys.stderr, dynamic_ncols=True)

    def emit(self, record: logging.LogRecord) -> None:
        info = getattr(record, "dynface_progress", None)
        if not info:
            return
        if info["total_add"]:
            self.bar.total = (self.bar.total or 0) + info["total_add"]
            self.bar.refresh()
        if info["advance"]:
            self.bar.update(info["advance"])

    def close(self) -> None:
        self.bar.close()
        super().close()


def format_summary(summary: Any) -> str:
    """The closing text of `dynface restore`: counts by status, throughput, where things are."""
    counts = ", ".join(f"{status} {n}" for status, n in summary.counts.items())
    lines = [
        f"run {summary.run_id}: {summary.n_images} images ({counts}); "
        f"{summary.n_committed_before} already done before this run",
        f"faces restored: {summary.n_faces} ({summary.n_faces_failed} failed and kept unrestored), "
        f"{summary.faces_per_second:.3f} faces/s over {summary.seconds:.1f} s",
        f"outputs:  {summary.dest}/restored/  (aligned faces: {summary.dest}/faces/)",
    ]
    if summary.compare:
        lines.append(f"compare:  {summary.dest}/compare/")
    lines.append(f"catalog:  {summary.catalog}")
    query = "SELECT status, COUNT(*) FROM images GROUP BY status"
    lines.append(f'          dynface catalog sql {summary.catalog} "{query}"')
    return "\n".join(lines)


def preflight(args: argparse.Namespace) -> str | None:
    """Check the locations, the pack (every file located), the options and the device before anything
    starts (no service, no output); returns
    a note on what a CPU run of a large pack costs (None when there is nothing to say)."""
    import fsspec

    from app.costs import cpu_cost_note
    from catalogs.lease import LeaseHeldError, current_holder
    from dynface.core.device import resolve_device
    from dynface.packs.loading import load_dsst
    from dynface.packs.manifest import resolve_pack, verify_pinned
    from dynface.restorer import config_for
    from tasks.discover import check_locations, restore_overrides
    from tasks.work import check_bucket, join_uri, normalize_uri

    source, dest = normalize_uri(args.source), normalize_uri(args.dest)
    catalog = normalize_uri(args.catalog) if args.catalog else join_uri(dest, "catalog")
    check_locations(source, dest, catalog)
    fs, path = fsspec.core.url_to_fs(source)
    if not fs.exists(path):
        raise FileNotFoundError(f"source {args.source!r} does not exist")
    for uri in (dest, catalog):
        check_bucket(uri)
    holder = current_holder(catalog)
    if holder is not None and not args.wait:
        raise LeaseHeldError(holder, catalog)
    manifest = resolve_pack(args.pack, weights_dir=args.weights_dir, measure_unpinned=False)
    verify_pinned(manifest)
    overrides = restore_overrides(method=args.method, guidance=args.guidance, options=dict(args.option))
    config = config_for(manifest, overrides)
    notes = [pack_notice(manifest)] if manifest.notice else []
    if resolve_device(args.device).type == "cpu":
        notes.append(
            cpu_cost_note(
                config,
                dsst=load_dsst(manifest),
                has_se=manifest.has_se(),
                resolution=manifest.resolution,
                pack_name=manifest.name,
            )
        )
    return "\n".join(n for n in notes if n) or None


def pack_notice(manifest: Any) -> str:
    """The one line a pack asks to be shown before it restores anything (its manifest's `notice`)."""
    return f"dynface restore: note: {manifest.notice}"


EXIT_CANCELLED = 130  # what a shell reports for a command ended by Ctrl-C
EXIT_CATALOG_BUSY = 75  # EX_TEMPFAIL: another run holds the catalog's lease; try again later (or --wait)


@contextlib.contextmanager
def ctrl_c_stops_the_run() -> Iterator[None]:
    """First Ctrl-C: the run takes no new work, commits what is restored and closes as cancelled.
    A second one stops at once (KeyboardInterrupt). One press seen twice within half a second (a
    wrapper forwarding the terminal's signal) counts once."""
    from tasks.cancel import request_cancel, reset_cancel

    presses: list[float] = []

    def on_sigint(signum: int, frame: Any) -> None:
        now = time.monotonic()
        if presses and now - presses[-1] < 0.5:
            return
        presses.append(now)
        if len(presses) == 1:
            request_cancel()
            print(
                "\ndynface restore: stopping: no new work, committing what is restored"
                " (Ctrl-C again to stop at once)",
                file=sys.stderr,
            )
            return
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        raise KeyboardInterrupt

    reset_cancel()
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        reset_cancel()


def run_restore(args: argparse.Namespace) -> int:
    apply_offline_env(quiet=not args.verbose)
    with ctrl_c_stops_the_run():
        return _restore(args)


def _restore(args: argparse.Namespace) -> int:
    from catalogs.lease import LeaseHeldError
    from tasks.cancel import cancel_requested

    try:
        note = preflight(args)
    except LeaseHeldError as err:
        print(f"dynface restore: {err}", file=sys.stderr)
        return EXIT_CATALOG_BUSY
    except Exception as err:  # noqa: BLE001 - a bad pack, option or device: one line, nothing started
        print(f"dynface restore: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    if note:
        print(note, file=sys.stderr)
    from app.embedded_prefect import prefect_api
    from flows.restore_archive import restore_archive
    from tasks.work import PROGRESS_LOGGER

    progress_logger = logging.getLogger(PROGRESS_LOGGER)
    saved = (progress_logger.level, progress_logger.propagate)
    bars = _ProgressBars()
    progress_logger.addHandler(bars)
    progress_logger.setLevel(logging.INFO)
    progress_logger.propagate = False
    try:
        with prefect_api():
            if cancel_requested():  # Ctrl-C while starting: no run was begun
                print("dynface restore: stopped before the run began; nothing was written", file=sys.stderr)
                return EXIT_CANCELLED
            summary = restore_archive(
                source=args.source,
                dest=args.dest,
                catalog=args.catalog,
                pack=args.pack,
                weights_dir=args.weights_dir,
                aligned=args.aligned,
                aligned_max_aspect=args.aligned_max_aspect,
                shard_size=args.shard_size,
                device=args.device,
                guidance=args.guidance,
                method=args.method,
                compare=args.compare,
                options=dict(args.option),
                ray_address=args.ray_address,
                num_actors=args.num_actors,
                wave_shards=args.wave_shards,
                keep_work=args.keep_work,
                wait_for_catalog=args.wait,
            )
    except KeyboardInterrupt:
        message = "stopped at once (a run already begun is recorded as cancelled)"
        print(f"dynface restore: {message}", file=sys.stderr)
        return EXIT_CANCELLED
    except LeaseHeldError as err:  # another run took the lease after the preflight looked
        print(f"dynface restore: {err}", file=sys.stderr)
        return EXIT_CATALOG_BUSY
    except Exception as err:  # noqa: BLE001 - a crash is reported as a message and exit code 1
        print(f"dynface restore: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    finally:
        progress_logger.removeHandler(bars)
        progress_logger.setLevel(saved[0])
        progress_logger.propagate = saved[1]
        bars.close()
    print(format_summary(summary))
    return EXIT_CANCELLED if summary.status == "cancelled" else 0


# -- catalog ----------------------------------------------------------------------------------------
def add_catalog_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("catalog", help="query and maintain a run catalog (Delta Lake tables)")
    sub = p.add_subparsers(dest="catalog_command", required=True)
    q = sub.add_parser("sql", help="run SQL over the runs, images and faces tables")
    q.add_argument("catalog", help="catalog URI")
    q.add_argument("query", help='e.g. "SELECT status, COUNT(*) FROM images GROUP BY status"')
    q.add_argument("--max-rows", type=int, default=50)
    q.add_argument(
        "--as-of",
        type=int,
        default=None,
        metavar="VERSION",
        help="query the catalog as it was at this version of its images table (see `catalog history`)",
    )
    q.set_defaults(handler=run_catalog, catalog_action=catalog_sql)
    c = sub.add_parser("compact", help="merge small data files (safe while runs write)")
    c.add_argument("catalog", help="catalog URI")
    c.set_defaults(handler=run_catalog, catalog_action=catalog_compact)
    v = sub.add_parser("vacuum", help="delete data files that compaction replaced")
    v.add_argument("catalog", help="catalog URI")
    v.add_argument(
        "--retain-hours",
        type=int,
        default=168,
        help="keep files removed less than this long ago (default 168: --as-of reaches back a week)",
    )
    v.set_defaults(handler=run_catalog, catalog_action=catalog_vacuum)
    h = sub.add_parser("history", help="list every table version and the run that committed it")
    h.add_argument("catalog", help="catalog URI")
    h.add_argument("--limit", type=int, default=None, help="latest versions per table only")
    h.add_argument("--max-rows", type=int, default=200)
    h.set_defaults(handler=run_catalog, catalog_action=catalog_history)
    m = sub.add_parser("migrate", help="copy a catalog of the old run_id= folder layout into Delta tables")
    m.add_argument("old", help="URI of the old catalog (only read)")
    m.add_argument("new", help="URI of the new, empty catalog")
    m.set_defaults(handler=run_catalog, catalog_action=catalog_migrate)


def run_catalog(args: argparse.Namespace) -> int:
    """Every `dynface catalog` subcommand: its action's lines on stdout; an error is one line, exit 1."""
    apply_offline_env(quiet=True)
    try:
        lines = args.catalog_action(args)
    except Exception as err:  # noqa: BLE001 - SQL and storage errors become a message, not a traceback
        print(f"dynface catalog {args.catalog_command}: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0


def catalog_sql(args: argparse.Namespace) -> list[str]:
    from catalogs import Catalog, format_table, sql

    frame = sql(Catalog(args.catalog), args.query, as_of=args.as_of)
    return [format_table(frame, max_rows=args.max_rows)]


def catalog_compact(args: argparse.Namespace) -> list[str]:
    from catalogs import Catalog, compact

    return [f"{t.table}: {t.files_removed} files -> {t.files_added}" for t in compact(Catalog(args.catalog))]


def catalog_vacuum(args: argparse.Namespace) -> list[str]:
    from catalogs import Catalog, vacuum

    deleted = vacuum(Catalog(args.catalog), retain_hours=args.retain_hours)
    return [f"{table}: {len(files)} files deleted" for table, files in deleted.items()]


def catalog_history(args: argparse.Namespace) -> list[str]:
    from catalogs import Catalog, format_table, history

    return [format_table(history(Catalog(args.catalog), limit=args.limit), max_rows=args.max_rows)]


def catalog_migrate(args: argparse.Namespace) -> list[str]:
    from catalogs import Catalog, LegacyCatalog, migrate

    copied = migrate(LegacyCatalog(args.old), Catalog(args.new))
    return [f"{table}: {n} rows" for table, n in copied.items()]


# -- review and publish ---------------------------------------------------------------------------
def add_review_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("review", help="review restored faces in a local web app (127.0.0.1 only)")
    p.add_argument("catalog", help="catalog URI (e.g. out/run/catalog or s3://bucket/run/catalog)")
    p.add_argument("--run", default=None, help="review one run (default: every run of the catalog)")
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default: 8765)")
    p.add_argument("--reviewer", default=None, help="name recorded with each decision (default: the OS user)")
    p.set_defaults(handler=run_review)


def run_review(args: argparse.Namespace) -> int:
    apply_offline_env(quiet=True)
    from app.review.decisions import default_reviewer
    from app.review.service import ReviewService, UnknownRun
    from app.review.web import HOST, create_app, serve
    from catalogs import Catalog

    try:
        service = ReviewService(
            Catalog(args.catalog), reviewer=args.reviewer or default_reviewer(), run_id=args.run
        )
    except UnknownRun as err:
        print(f"dynface review: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - an unreadable catalog is a message, not a traceback
        print(
            f"dynface review: error: cannot read {args.catalog}: {type(err).__name__}: {err}", file=sys.stderr
        )
        return 1
    counts = service.counts()
    print(
        f"reviewing {len(service.faces)} faces ({counts.reviewed} reviewed, {counts.to_review} to review) "
        f"as {service.reviewer}: open http://{HOST}:{args.port}/  (Ctrl-C stops)"
    )
    serve(create_app(service), port=args.port)
    return 0


def add_publish_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("publish", help="write the final photos: rejected faces keep the source pixels")
    p.add_argument("catalog", help="catalog URI")
    p.add_argument("dest", help="folder or URI that receives the final photos")
    p.add_argument(
        "--require-review",
        action="store_true",
        help="paste only accepted faces (default: every face not rejected)",
    )
    p.add_argument("--run", default=None, help="publish one run (default: the latest row of every photo)")
    p.add_argument("--publisher", default=None, help="name recorded with the publication (default: OS user)")
    p.set_defaults(handler=run_publish)


def run_publish(args: argparse.Namespace) -> int:
    apply_offline_env(quiet=True)
    from app.review.decisions import default_reviewer
    from app.review.publish import format_publish_summary, publish
    from app.review.service import known_runs, unknown_run_message
    from catalogs import Catalog

    catalog = Catalog(args.catalog)
    try:
        if args.run is not None and args.run not in (runs := known_runs(catalog)):
            print(f"dynface publish: {unknown_run_message(args.run, runs)}", file=sys.stderr)
            return 2
        summary = publish(
            catalog,
            args.dest,
            require_review=args.require_review,
            run_id=args.run,
            publisher=args.publisher or default_reviewer(),
        )
    except Exception as err:  # noqa: BLE001 - storage and location errors become a message
        print(f"dynface publish: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(format_publish_summary(summary))
    return 1 if summary.failed else 0


# -- pack -------------------------------------------------------------------------------------------
def add_pack_command(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("pack", help="model pack tools")
    sub = p.add_subparsers(dest="pack_command", required=True)
    r = sub.add_parser("random", help="write a tiny random-weight pack (tests, demos; not a model)")
    r.add_argument("folder")
    r.add_argument("--resolution", type=int, default=32)
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(handler=run_pack_random)
    pin = sub.add_parser(
        "pin", help="copy a pack's manifest with the sha256 of every file it finds filled in"
    )
    pin.add_argument("pack", help="pack name, manifest path/URI or folder (e.g. difface)")
    pin.add_argument("--out", required=True, help="folder for the pinned manifest.yaml")
    pin.add_argument("--weights-dir", default=None, help="folder or URI prefix holding the weight files")
    pin.set_defaults(handler=run_pack_pin)
    hashes = sub.add_parser(
        "hash", help="print the sha256 of every file a pack uses and whether its manifest pins it"
    )
    hashes.add_argument("pack", help="pack name, manifest path/URI or folder")
    hashes.add_argument("--weights-dir", default=None, help="folder or URI prefix holding the weight files")
    hashes.set_defaults(handler=run_pack_hash)


def run_pack_hash(args: argparse.Namespace) -> int:
    """One line per component: sha256, pinned / matches / DIFFERS, file. Exit 1 when a pinned file
    differs, 2 when a file is missing; `dynface pack pin` writes a manifest pinning what is printed."""
    from dynface.checkpoints import sha256_of
    from dynface.packs.manifest import resolve_pack

    try:
        manifest = resolve_pack(args.pack, weights_dir=args.weights_dir, measure_unpinned=False)
    except Exception as err:  # noqa: BLE001 - a missing file: one line, exit status 2
        print(f"dynface pack hash: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    differs = False
    for name, spec in sorted(manifest.components.items()):
        uri = manifest.component_uri(name)
        digest = sha256_of(uri)
        if spec.sha256 is None:
            state = "not pinned"
        elif spec.sha256 == digest:
            state = "pinned, matches"
        else:
            state, differs = f"pinned {spec.sha256}, DIFFERS", True
        print(f"{name:6s} {digest}  {state}  {uri}")
    if any(spec.sha256 is None for spec in manifest.components.values()):
        print(f"pin them: dynface pack pin {args.pack} --out DIR", file=sys.stderr)
    return 1 if differs else 0


def run_pack_random(args: argparse.Namespace) -> int:
    from dynface.packs.writer import write_random_pack

    print(write_random_pack(args.folder, resolution=args.resolution, seed=args.seed))
    return 0


def run_pack_pin(args: argparse.Namespace) -> int:
    from dynface.packs.writer import pin_pack

    try:
        uri = pin_pack(args.pack, out=args.out, weights_dir=args.weights_dir)
    except Exception as err:  # noqa: BLE001 - a missing file or wrong hash: one line, exit status 2
        print(f"dynface pack pin: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    print(uri)
    return 0


# -- evaluate ---------------------------------------------------------------------------------------
def add_evaluate_command(subparsers: argparse._SubParsersAction) -> None:
    from dynface.paths import shared_dir

    p = subparsers.add_parser(
        "evaluate", help="evaluation protocol: degrade HQ faces, restore, score, report"
    )
    p.add_argument("--pack", default="starter")
    p.add_argument("--hq", default=str(shared_dir() / "data" / "hq_aligned"), help="folder/URI of HQ faces")
    p.add_argument(
        "--holdout", default=None, help="holdout.txt (or a pack folder holding one) to filter --hq"
    )
    p.add_argument("--protocol", choices=["random", "grid"], default="random")
    p.add_argument("--limit", type=int, default=40)
    p.add_argument(
        "--methods",
        default=None,
        help="comma-separated; a method + '@gt_rm' is given the ground truth as RM's output (default: the"
        " whole ablation ladder, then full@gt_rm, the oracle bound)",
    )
    p.add_argument("--out", default="out/evaluation")
    p.add_argument(
        "--seeds", default="2025,2026,2027", help="degradation seeds, comma-separated (at least 3 for a card)"
    )
    p.add_argument(
        "--split",
        choices=["test", "validation", "train"],
        default="test",
        help="the faces reported, by the pack's sha256-prefix rule (manifest 'splits')",
    )
    p.add_argument(
        "--tune-guidance",
        default=None,
        metavar="Z1,Z2,...",
        help="choose ζ among these on the validation split first (never on the reported faces)",
    )
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    w = p.add_argument_group("supplied metric weights (local paths or fsspec URIs; nothing is downloaded)")
    w.add_argument("--arcface", default=None, help="ArcFace ResNet-18 resnet18_110.pth: identity angle")
    w.add_argument("--fid-inception", default=None, help="pt_inception-2015-12-05-6726825d.pth: FID")
    w.add_argument("--vgg16", default=None, help="torchvision vgg16-397923af.pth: LPIPS and DISTS")
    w.add_argument("--lpips-head", default=None, help="LPIPS v0.1 vgg.pth (default: the lpips package's)")
    w.add_argument("--dists-head", default=None, help="DISTS weights.pt (default: dists-pytorch's)")
    p.set_defaults(handler=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from app.evaluate import run_evaluation
    from dynface.evaluation import DEFAULT_METHODS, ablation_markdown
    from dynface.metrics.supplied import MetricWeights

    methods = tuple(args.methods.split(",")) if args.methods else DEFAULT_METHODS
    weights = MetricWeights(
        arcface=args.arcface,
        fid_inception=args.fid_inception,
        vgg16=args.vgg16,
        lpips_head=args.lpips_head,
        dists_head=args.dists_head,
    )
    report, evaluation = run_evaluation(
        pack=args.pack,
        hq=args.hq,
        out=args.out,
        protocol=args.protocol,
        limit=args.limit,
        methods=methods,
        holdout=args.holdout,
        overrides=dict(parse_option(o) for o in args.option) or None,
        seeds=tuple(int(s) for s in args.seeds.split(",")),
        split=args.split,
        tune_guidance=tuple(float(z) for z in args.tune_guidance.split(",")) if args.tune_guidance else (),
        weights=weights,
    )
    print(ablation_markdown(evaluation.ablation))
    print(f"\nreport: {report}")
    return 0


# -- entry point ------------------------------------------------------------------------------------
SUBCOMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_restore_command,
    add_catalog_command,
    add_pack_command,
    add_evaluate_command,
    add_train_command,
    add_review_command,
    add_publish_command,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynface", description="DynFaceRestore blind face restoration")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
