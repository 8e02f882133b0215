"""Stage 5, sample: restore batches of aligned faces on Ray actors that load the pack once.

`BatchRestorer` is a plain class (try it on one batch without Ray); `sample_wave` runs it as Ray
actors, one batch per call, and collects the small result dicts each call returns (the pixels go
to the work folder). A batch that raises, or whose actor dies, marks its faces `failed` with the
error; the run goes on, and compose keeps those faces unrestored.

A run's actors (named `dynface-sampler-{run_id}-{i}`) are created on first use and reused by
every later wave of the run; `release_actors` ends them. Resources follow shared/design/PLATFORM.md: one
GPU per actor when the cluster has GPUs, else `num_gpus=0` and a fractional CPU share so the
driver's own tasks are never starved. More actors than GPUs share them in equal fractions (a request
Ray cannot place would wait forever), and actors that do not start within `ACTOR_START_TIMEOUT_S`
fail the stage with what they asked for and what the cluster has.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dynface.core.device import resolve_device
from dynface.core.plan import FacePlan
from dynface.packs.manifest import PackManifest
from dynface.restorer import FaceResult, Restorer
from tasks.cancel import CANCELLED_ERROR, cancel_requested
from tasks.tables import BATCHES, SAMPLES, failed_sample_row
from tasks.work import RunContext, read_png, report_progress, short_error, stage_task, write_png

ACTOR_NAMESPACE = "dynface"
CPU_ACTOR_SHARE = 0.5  # fractional CPUs per CPU actor (see module docstring)
# Loading a 512-px pack from S3 on a busy node can take minutes; an actor Ray cannot place never starts.
ACTOR_START_TIMEOUT_S = float(os.environ.get("DYNFACE_ACTOR_START_TIMEOUT_S", "900"))


def _node_id() -> str | None:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - the node id is diagnostic only
        return None


def result_row(face: dict[str, Any], res: FaceResult, seconds: float, node_id: str | None) -> dict[str, Any]:
    """What sampling did for one face (its plan is the estimate stage's, not repeated here)."""
    return {
        "image_id": face["image_id"],
        "face_index": face["face_index"],
        "sample_status": "ok",
        "sample_error": None,
        "restored_uri": face["restored_uri"],
        "std_final_px": list(res.std_final),
        "n_steps": res.n_steps,
        "guidance_residual": res.guidance_residual,
        "sample_seconds": seconds,
        "node_id": node_id,
    }


def failed_rows(faces: list[dict[str, Any]], error: str) -> list[dict[str, Any]]:
    return [failed_sample_row(f["image_id"], f["face_index"], error) for f in faces]


class BatchRestorer:
    """Holds one Restorer; `run(batch_uri)` restores a batch manifest's crops from their plans and
    writes the results.

    pack: a resolved manifest (the run's; every file's URI and sha256 fixed by the driver).
    num_threads: torch intra-op threads for CPU work (None leaves torch's default)."""

    def __init__(
        self,
        pack: str | PackManifest,
        overrides: dict[str, Any],
        device: str = "auto",
        num_threads: int | None = None,
    ) -> None:
        if num_threads is not None:
            torch.set_num_threads(max(1, int(num_threads)))
        self.restorer = Restorer.from_pack(pack, overrides=overrides, device=resolve_device(device))
        self.node_id = _node_id()

    def ready(self) -> bool:
        """Answers once the pack is loaded (the driver waits on it with a timeout)."""
        return True

    def run(self, batch_uri: str) -> list[dict[str, Any]]:
        """Restore every face of the batch; returns one small dict per face (no pixels)."""
        faces = BATCHES.read(batch_uri)
        crops = [read_png(face["crop_uri"]) for face in faces]
        t0 = time.perf_counter()
        results = self.restorer.restore(crops, plans=[FacePlan.from_row(face) for face in faces])
        seconds = (time.perf_counter() - t0) / max(1, len(faces))
        rows = []
        for face, res in zip(faces, results, strict=True):
            write_png(face["restored_uri"], res.image)
            rows.append(result_row(face, res, seconds, self.node_id))
        return rows


@dataclass(frozen=True)
class ActorPlan:
    """How many actors and what each asks Ray for."""

    num_actors: int
    num_cpus: float
    num_gpus: float  # 1 per actor, a fraction when more actors than GPUs were asked for, 0 on CPUs
    num_threads: int


def plan_actors(resources: dict[str, float], *, num_actors: int | None, n_batches: int) -> ActorPlan:
    """Actors for a cluster with `resources` (ray.cluster_resources()), never more than there are
    batches; `num_actors` overrides the count. With GPUs: one actor per GPU, or, when more actors
    are asked for, k = ⌈actors / GPUs⌉ actors sharing each GPU with 1/k of it each (so every actor fits
    on one GPU and all of them can be placed), never more than the cluster's CPUs hold at one CPU
    each. On CPUs: one single-threaded actor per core but one (left to the driver's stages): measured
    on 2 loaded cores, a 2-thread torch actor ran a batch 4x slower than a 1-thread one."""
    gpus = int(resources.get("GPU", 0.0))
    cpus = float(resources.get("CPU", 1.0))
    if num_actors is not None and num_actors < 1:
        raise ValueError("num_actors must be >= 1")
    if gpus >= 1:
        count = max(1, min(num_actors or gpus, n_batches, max(1, int(cpus))))
        per_gpu = math.ceil(count / gpus)
        return ActorPlan(num_actors=count, num_cpus=1.0, num_gpus=1.0 / per_gpu, num_threads=1)
    count = max(1, min(num_actors or max(1, int(cpus) - 1), n_batches))
    return ActorPlan(num_actors=count, num_cpus=CPU_ACTOR_SHARE, num_gpus=0, num_threads=1)


def actor_name(run_id: str, index: int) -> str:
    return f"dynface-sampler-{run_id}-{index}"


# Strong handles of each run's actors, kept by this (driver) process between the waves' sample
# tasks: Ray ends a non-detached actor once its creator's handles are gone, even when it is named,
# so handles looked up again by name alone would find dying actors.
_RUN_ACTORS: dict[str, list[Any]] = {}


# A sampling actor that dies (killed, out of memory) is restarted and its batch retried this many times;
# a batch that still kills it fails its faces with that reason, and a fresh actor takes the next batch.
ACTOR_RESTARTS = 2


def new_actor(ctx: RunContext, plan: ActorPlan, name: str) -> Any:
    import ray

    return (
        ray.remote(BatchRestorer)
        .options(
            name=name,
            namespace=ACTOR_NAMESPACE,
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus,
            max_restarts=ACTOR_RESTARTS,
            max_task_retries=ACTOR_RESTARTS,
            scheduling_strategy="SPREAD",
        )
        .remote(ctx.pack, ctx.overrides, ctx.device, plan.num_threads)
    )


def get_actors(ctx: RunContext, plan: ActorPlan, *, start_timeout_s: float | None = None) -> list[Any]:
    """The run's actors 0..n-1: those of earlier waves are reused, missing ones created and waited for
    (TimeoutError after `start_timeout_s`, default ACTOR_START_TIMEOUT_S, instead of waiting forever)."""
    import ray

    actors = _RUN_ACTORS.setdefault(ctx.run_id, [])
    created = []
    while len(actors) < plan.num_actors:
        created.append(len(actors))
        actors.append(new_actor(ctx, plan, actor_name(ctx.run_id, len(actors))))
    if created:
        timeout = ACTOR_START_TIMEOUT_S if start_timeout_s is None else start_timeout_s
        waiting = [actors[i].ready.remote() for i in created]
        # A failed start counts as started here: its batches then fail with the actor's error.
        _, pending = ray.wait(waiting, num_returns=len(waiting), timeout=timeout)
        if pending:
            for handle in _RUN_ACTORS.pop(ctx.run_id, []):
                ray.kill(handle)
            raise TimeoutError(
                f"{len(pending)} of {len(waiting)} sampling actors did not start within {timeout:.0f} s; "
                f"each asks num_gpus={plan.num_gpus:g}, num_cpus={plan.num_cpus:g}; "
                f"the cluster has {ray.cluster_resources()}"
            )
    return actors[: plan.num_actors]


def replace_actor(ctx: RunContext, plan: ActorPlan, index: int) -> Any:
    """A fresh actor in slot `index` of the run (after the one there died for good)."""
    import uuid

    actor = new_actor(ctx, plan, f"{actor_name(ctx.run_id, index)}-{uuid.uuid4().hex[:6]}")
    _RUN_ACTORS[ctx.run_id][index] = actor
    return actor


def actor_died(err: BaseException) -> bool:
    from ray.exceptions import RayActorError

    return isinstance(err, RayActorError)


def actor_error(err: BaseException) -> str:
    """A failed batch's reason; an actor that died on it every time is said so plainly."""
    if actor_died(err):
        tries = ACTOR_RESTARTS + 1
        return (
            f"the sampling actor died on this batch {tries} times (killed, e.g. out of memory): "
            + short_error(err)
        )
    return short_error(err)


def release_actors(run_id: str) -> int:
    """End the run's actors (idempotent); returns how many there were."""
    import ray

    actors = _RUN_ACTORS.pop(run_id, [])
    if ray.is_initialized():
        for handle in actors:
            ray.kill(handle)
    return len(actors)


def run_batches(
    actors: list[Any],
    batch_uris: list[str],
    *,
    respawn: Callable[[int], Any] | None = None,
    poll_seconds: float = 0.5,
) -> list[dict[str, Any]]:
    """Dispatch batches to idle actors (one call in flight per actor); failures become failed rows,
    and an actor that died for good is replaced by `respawn(index)` before it takes another batch.
    When the run is cancelled (tasks.cancel), no batch is dispatched any more, the actors still busy
    are ended, and the faces of every batch not finished are recorded as cancelled."""
    import ray

    faces_of = {uri: BATCHES.read(uri) for uri in batch_uris}
    report_progress("sample", total_add=sum(len(f) for f in faces_of.values()))
    pending = deque(batch_uris)
    idle = deque(range(len(actors)))
    in_flight: dict[Any, tuple[int, str]] = {}
    rows: list[dict[str, Any]] = []
    while (pending or in_flight) and not cancel_requested():
        while idle and pending:
            i, uri = idle.popleft(), pending.popleft()
            in_flight[actors[i].run.remote(uri)] = (i, uri)
        done, _ = ray.wait(list(in_flight), num_returns=1, timeout=poll_seconds)
        for ref in done:
            i, uri = in_flight.pop(ref)
            try:
                rows.extend(ray.get(ref))
            except Exception as err:  # noqa: BLE001 - a failed batch fails its faces, not the run
                rows.extend(failed_rows(faces_of[uri], f"sampling failed: {actor_error(err)}"))
                if actor_died(err) and respawn is not None:
                    actors[i] = respawn(i)
            idle.append(i)
            report_progress("sample", advance=len(faces_of[uri]))
    if pending or in_flight:  # cancelled
        for i, _ in in_flight.values():
            ray.kill(actors[i], no_restart=True)
        for uri in [*pending, *(uri for _, uri in in_flight.values())]:
            rows.extend(failed_rows(faces_of[uri], CANCELLED_ERROR))
    return rows


def sample_wave_rows(
    ctx: RunContext, batch_uris: list[str], *, num_actors: int | None = None
) -> list[dict[str, Any]]:
    """Restore the batches on the run's actors (Ray must be initialised); returns result rows."""
    import ray

    if not batch_uris:
        return []
    plan = plan_actors(ray.cluster_resources(), num_actors=num_actors, n_batches=len(batch_uris))
    actors = list(get_actors(ctx, plan))
    return run_batches(actors, batch_uris, respawn=lambda i: replace_actor(ctx, plan, i))


@stage_task("sample", retries=0)
def sample(ctx: RunContext, wave: int, batch_uris: list[str], num_actors: int | None = None) -> str:
    """Restore a wave's batches on Ray; returns the URI of the wave's result rows."""
    rows = sample_wave_rows(ctx, batch_uris, num_actors=num_actors)
    return SAMPLES.write(SAMPLES.wave_uri(ctx.work, wave), rows)
