"""The `restore-archive` flow: restore every face of an image archive, resumable, with a catalog.

Plain Python composing the stage tasks of `tasks/`; only URIs and ids pass between them. Shards
(`shard_size` images) are processed in waves of `wave_shards` shards: detect/align and std
estimation per shard, bucketing over the wave, sampling on Ray actors, then compose, score and
commit per shard. Sampling is submitted (a Prefect future whose thread waits on Ray) so that the
driver's CPU stages overlap it: while wave w samples, wave w-1 is composed, scored and committed
and wave w+1 is detected and estimated. A crash loses at most the two waves in flight; a re-run
(same config) picks up where the catalog ends.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

from prefect import flow
from prefect.logging import get_run_logger

from app.raylocal import connect_ray
from catalogs.lease import Heartbeat, LeaseLostError, LeaseRecord, acquire
from dynface.restorer import Method
from tasks.bucket import bucket
from tasks.cancel import cancel_requested
from tasks.commit import commit, compact_tables
from tasks.compose import compose
from tasks.detect_align import detect_align
from tasks.discover import discover, prepare_run
from tasks.estimate import estimate_std
from tasks.runs import RunSummary, close_abandoned_runs, close_run, finalize, write_run_row
from tasks.sample import release_actors, sample
from tasks.score import score
from tasks.work import RunContext, chunks, remove_tree, short_error


class StageClock:
    """Accumulated wall seconds per stage name, kept by the flow's thread (sampling's seconds overlap
    the other stages': they run from submission to collection, see `_wait`)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def run(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        with self.stage(name):
            return fn(*args)


InFlight = tuple[list[int], Any, float]  # a wave being sampled: its shards, future, submission time


def _submit_sample(
    ctx: RunContext, wave: int, shards: list[int], batch_uris: list[str], num_actors: int | None
) -> InFlight:
    """Start a wave's sampling in the flow's task runner (the thread waits on the Ray actors)."""
    return shards, sample.submit(ctx, wave, batch_uris, num_actors), time.perf_counter()


def _wait(in_flight: InFlight | None, clock: StageClock) -> tuple[list[int], str] | None:
    """The shards and sample rows URI of the wave in flight, once it has sampled (None: no wave).
    Clock: `sample_wait` is the driver idle here; `sample` runs from submission to collection."""
    if in_flight is None:
        return None
    shards, future, submitted = in_flight
    with clock.stage("sample_wait"):
        uri = future.result()
    clock.add("sample", time.perf_counter() - submitted)
    return shards, uri


def _finish(
    clock: StageClock, ctx: RunContext, shards: list[int], samples_uri: str, heartbeat: Heartbeat
) -> None:
    for shard in shards:
        clock.run("compose", compose, ctx, shard, samples_uri)
        clock.run("score", score, ctx, shard, samples_uri)
        _check_lease(heartbeat)
        clock.run("commit", commit, ctx, shard, samples_uri)


def _check_lease(heartbeat: Heartbeat) -> None:
    """A run whose lease was taken (it missed its renewals and was presumed dead) commits nothing more."""
    if heartbeat.lost:
        raise LeaseLostError(f"run lost the catalog lease to another run: {heartbeat.lease.catalog}")


@flow(name="restore-archive")
def restore_archive(
    source: str,
    dest: str,
    catalog: str | None = None,
    pack: str = "starter",
    weights_dir: str | None = None,
    aligned: bool = False,
    aligned_max_aspect: float = 1.1,
    shard_size: int = 64,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    guidance: Literal["dps", "closed_form"] | None = None,
    method: Method = "full",
    compare: bool = False,
    options: dict[str, Any] | None = None,
    ray_address: str | None = None,
    num_actors: int | None = None,
    wave_shards: int = 2,
    keep_work: bool = False,
    wait_for_catalog: bool = False,
    compact_catalog: bool = True,
) -> RunSummary:
    """Restore the faces of every image under `source` into `dest`, recording them in the catalog.

    source/dest: folders or fsspec URIs (dest must differ from source; if inside it, it is never
    read as input). catalog: default `{dest}/catalog`. pack: pack name or manifest URI.
    weights_dir: folder (or URI prefix) holding the pack's weight files, e.g. the official DifFace
    files for `pack="difface"`; searched before the manifest's variable and its own folder.
    aligned: inputs are aligned face crops (no detection); one whose longer side exceeds the shorter
    by more than `aligned_max_aspect` is skipped (aligned crops are square). guidance: None keeps
    the pack's mode.
    options: extra RestoreConfig overrides (e.g. {"respacing": "ddim10"}). ray_address: None uses
    RAY_ADDRESS or starts a local Ray. num_actors: None picks one per GPU (or one per CPU but one).
    wave_shards: shards sampled together (more keeps more actors busy, commits less often).
    keep_work: keep `{dest}/.work/{run_id}` (intermediate crops and tables) after success.
    wait_for_catalog: when another run holds the catalog's lease, wait for it instead of failing.
    compact_catalog: compact the catalog's runs, images and faces tables when the run ends, after
    its lease is released (a failed compaction is logged; the run's rows are committed already).
    """
    if shard_size < 1 or wave_shards < 1:
        raise ValueError("shard_size and wave_shards must be >= 1")
    started_at = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    ctx = prepare_run(
        source=source,
        dest=dest,
        catalog=catalog,
        pack=pack,
        weights_dir=weights_dir,
        aligned=aligned,
        aligned_max_aspect=aligned_max_aspect,
        device=device,
        compare=compare,
        method=method,
        guidance=guidance,
        options=options,
    )

    def tell_waiting(holder: LeaseRecord) -> None:
        get_run_logger().info("catalog in use by run %s (host %s): waiting", holder.run_id, holder.host)

    lease = acquire(ctx.catalog, ctx.run_id, wait=wait_for_catalog, on_wait=tell_waiting)
    with Heartbeat(lease) as heartbeat:
        for abandoned in close_abandoned_runs(ctx):
            get_run_logger().info("run %s had stopped without closing: recorded as abandoned", abandoned)
        summary = _run(
            ctx, started_at, t0, heartbeat, shard_size, ray_address, num_actors, wave_shards, keep_work
        )
    if compact_catalog:  # outside the lease: compaction is safe beside another run's appends
        try:
            compact_tables(ctx.catalog)
        except Exception as err:  # noqa: BLE001 - the next run or `dynface catalog compact` redoes it
            get_run_logger().warning("catalog compaction failed: %s", short_error(err))
    return summary


def _run(
    ctx: RunContext,
    started_at: dt.datetime,
    t0: float,
    heartbeat: Heartbeat,
    shard_size: int,
    ray_address: str | None,
    num_actors: int | None,
    wave_shards: int,
    keep_work: bool,
) -> RunSummary:
    """The run itself, under the catalog's lease: its `running` row, the waves, its closing row."""
    write_run_row(ctx, started_at=started_at, status="running")
    clock = StageClock()
    try:
        found = clock.run("discover", discover, ctx, shard_size)
        get_run_logger().info(
            "run %s: %d new images in %d shards (%d already committed)",
            ctx.run_id,
            found.n_new,
            len(found.shards),
            found.n_committed,
        )
        if found.shards:
            with clock.stage("ray_connect"):
                ray_conn = connect_ray(ray_address)
            in_flight: InFlight | None = None
            try:
                for wave, shards in enumerate(chunks(list(range(len(found.shards))), wave_shards)):
                    if cancel_requested():  # Ctrl-C: no new wave; the one in flight ends below
                        break
                    _check_lease(heartbeat)
                    for shard in shards:
                        clock.run("detect_align", detect_align, ctx, shard)
                    for shard in shards:
                        clock.run("estimate_std", estimate_std, ctx, shard)
                    batch_uris = clock.run("bucket", bucket, ctx, wave, shards)
                    done = _wait(in_flight, clock)
                    in_flight = _submit_sample(ctx, wave, shards, batch_uris, num_actors)
                    if done is not None:
                        _finish(clock, ctx, *done, heartbeat)
                done = _wait(in_flight, clock)
                in_flight = None
                if done is not None:
                    _finish(clock, ctx, *done, heartbeat)
            finally:
                if in_flight is not None:  # an error elsewhere: let the sampling thread end first
                    with contextlib.suppress(Exception):
                        in_flight[1].wait()
                release_actors(ctx.run_id)
                ray_conn.shutdown()
        status = "cancelled" if cancel_requested() else "completed"
        seconds = time.perf_counter() - t0
        summary = finalize(ctx, started_at, seconds, dict(clock.seconds), found.n_committed, status)
    except BaseException as err:
        stopped = isinstance(err, KeyboardInterrupt) or cancel_requested()
        status = "cancelled" if stopped else "failed"
        error = "stopped at once (a second Ctrl-C)" if stopped else short_error(err)
        with contextlib.suppress(Exception):  # the original error matters more than this row
            close_run(ctx, started_at=started_at, status=status, error=error)
        raise
    if not keep_work:
        remove_tree(ctx.work.root)
    return summary
