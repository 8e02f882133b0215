"""The `restore-archive` flow: restore every face of an image archive, resumable, with a catalog.

Plain Python composing the stage tasks of `tasks/`; only URIs and ids pass between them. Shards
(`shard_size` images) are processed in waves of `wave_shards` shards: detect/align and std
estimation per shard, bucketing over the wave, sampling on Ray actors, then compose, score and
commit per shard. A wave's shards are committed before the next wave starts, so a crash loses
at most the wave in flight and a re-run (same config) picks up where the catalog ends.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

from prefect import flow
from prefect.logging import get_run_logger

from dynface.raylocal import connect_ray
from dynface.restorer import Method
from tasks.bucket import bucket
from tasks.commit import RunSummary, commit, finalize, write_run_row
from tasks.compose import compose
from tasks.detect_align import detect_align
from tasks.discover import discover, prepare_run
from tasks.estimate import estimate_std
from tasks.sample import release_actors, sample
from tasks.score import score
from tasks.work import chunks, remove_tree


class StageClock:
    """Accumulated wall seconds per stage name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0

    def run(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        with self.stage(name):
            return fn(*args)


@flow(name="restore-archive")
def restore_archive(
    source: str,
    dest: str,
    catalog: str | None = None,
    pack: str = "starter",
    aligned: bool = False,
    shard_size: int = 64,
    device: Literal["auto", "cpu", "cuda"] = "auto",
    guidance: Literal["dps", "closed_form"] | None = None,
    method: Method = "full",
    compare: bool = False,
    options: dict[str, Any] | None = None,
    ray_address: str | None = None,
    num_actors: int | None = None,
    wave_shards: int = 4,
    keep_work: bool = False,
) -> RunSummary:
    """Restore the faces of every image under `source` into `dest`, recording them in the catalog.

    source/dest: folders or fsspec URIs (dest must differ from source; if inside it, it is never
    read as input). catalog: default `{dest}/catalog`. pack: pack name or manifest URI.
    aligned: inputs are aligned face crops (no detection). guidance: None keeps the pack's mode.
    options: extra RestoreConfig overrides (e.g. {"respacing": "ddim10"}). ray_address: None uses
    RAY_ADDRESS or starts a local Ray. num_actors: None picks one per GPU (or one per CPU but one).
    wave_shards: shards sampled together (more keeps more actors busy, commits less often).
    keep_work: keep `{dest}/.work/{run_id}` (intermediate crops and tables) after success.
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
        aligned=aligned,
        device=device,
        compare=compare,
        method=method,
        guidance=guidance,
        options=options,
    )
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
            try:
                for wave, shards in enumerate(chunks(list(range(len(found.shards))), wave_shards)):
                    for shard in shards:
                        clock.run("detect_align", detect_align, ctx, shard)
                    for shard in shards:
                        clock.run("estimate_std", estimate_std, ctx, shard)
                    batch_uris = clock.run("bucket", bucket, ctx, wave, shards)
                    samples_uri = clock.run("sample", sample, ctx, wave, batch_uris, num_actors)
                    for shard in shards:
                        clock.run("compose", compose, ctx, shard, samples_uri)
                        clock.run("score", score, ctx, shard)
                        clock.run("commit", commit, ctx, shard)
            finally:
                release_actors(ctx.run_id)
                ray_conn.shutdown()
        summary = finalize(ctx, started_at, time.perf_counter() - t0, dict(clock.seconds), found.n_committed)
    except BaseException:
        with contextlib.suppress(Exception):  # the original error matters more than this row
            write_run_row(ctx, started_at=started_at, status="failed")
        raise
    if not keep_work:
        remove_tree(ctx.work.root)
    return summary
