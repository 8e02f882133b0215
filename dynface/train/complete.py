"""`train complete`: the full method on top of a pack that has only a prior and an RM (e.g. `difface`).

The base pack's prior and RM stay frozen and untouched; OUT references them by URI and sha256. On top of
them the shared stage chain (dynface.train.chain) trains SDE, SE = TM (initialised from the base's RM) +
SDE, and DGSA through one guided step of the frozen prior, on fresh DifFace-range degradations of the
`--data` faces (dynface.train.fresh_stages: a batch is a pure function of (seed, step), so a resume or
another worker count changes nothing). The DSST table is built from the same faces at the base's
resolution. OUT gets the trained networks, the table, a model card and training.json, every file pinned.

Stages checkpoint to `<checkpoints>/<stage>/last.pt` (any fsspec URI) every `checkpoint_every` steps and
at exit; with `workers`/`ray_address` every stage trains data-parallel under Ray Train, and this process
then reads the finished stages back from the checkpoints and writes the pack.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynface.core.dsst import DSSTTable
from dynface.core.dsst_files import pack_dsst_table, write_file
from dynface.models.se import StdEstimator, build_sde
from dynface.packs.loading import load_pack
from dynface.packs.manifest import PackManifest, resolve_pack
from dynface.packs.writer import explicit_uri, write_pack
from dynface.train.chain import Chain, ChainStages, run_chain, transfer_model
from dynface.train.common import GradSync, load_checkpoint, state_exists
from dynface.train.complete_plan import (
    STAGES,
    CompleteOptions,
    CompletePlan,
    FaceListing,
    default_checkpoints,
    list_training_faces,
)
from dynface.train.data import resize_bicubic
from dynface.train.dgsa import FrozenNets, dists_loss
from dynface.train.fresh_pairs import face_array_file
from dynface.train.fresh_stages import (
    Shard,
    StageRun,
    StageStopped,
    dgsa_batch_size,
    train_dgsa_fresh,
    train_sde_fresh,
    train_se_fresh,
)

RUN_FILE = "run.json"  # beside the stage checkpoints: what they were trained for (checked on resume)
TRAINING_FILE = "training.json"
CARD_FILE = "MODEL_CARD.md"
DSST_FACES = 2000  # the mean power spectrum settles long before FFHQ's 70,000 faces


@dataclass(frozen=True, eq=False)
class CompleteJob:
    """Everything a (possibly remote) worker needs to train the stages: plain, picklable values."""

    base: PackManifest  # resolved: concrete URIs and sha256s of the base's files
    plan: CompletePlan
    listing: FaceListing
    seed: int
    checkpoints: str
    work_dir: str
    dsst_json: str
    checkpoint_every: int = 200
    stop: tuple[str, int] | None = None
    vgg16: str | None = None
    dists_head: str | None = None
    progress: bool = True


@dataclass(frozen=True)
class CompleteReport:
    manifest_uri: str | None  # None while unfinished
    finished: bool
    stopped: str | None  # "<stage> at step N" when a stage stopped early
    stages: dict[str, dict[str, Any]]
    checkpoints: str
    wall_s: float


def train_stages(
    job: CompleteJob, *, device: str = "cpu", shard: Shard | None = None, grad_sync: GradSync | None = None
) -> Chain:
    """SDE → SE → DSST → DGSA on the frozen base networks (the shared chain); finished stages in the
    checkpoints are read back, unfinished ones train or resume. Raises StageStopped at `job.stop`."""
    base = load_pack(job.base)
    plan = job.plan
    faces = face_array_file(job.listing.root, job.listing.faces, plan.degrade_resolution)
    run = StageRun(
        faces_file=faces,
        resolution=plan.resolution,
        seed=job.seed,
        checkpoints=job.checkpoints,
        work=Path(job.work_dir),
        device=device,
        shard=shard or Shard(),
        grad_sync=grad_sync,
        ckpt_every=job.checkpoint_every,
        progress=job.progress,
        stop=job.stop,
    )
    perceptual = dists_loss(job.vgg16, job.dists_head) if job.vgg16 else None
    dsst = DSSTTable.from_json(job.dsst_json)
    stages = ChainStages(
        sde=lambda: train_sde_fresh(run, plan.sde),
        se=lambda rm, sde, tm: train_se_fresh(run, plan.se, rm=rm, sde=sde, tm=tm),
        dsst=lambda: dsst,
        dgsa=lambda nets: train_dgsa_fresh(
            run, plan.dgsa, nets=nets, memory=plan.memory, perceptual=perceptual
        ),
    )
    return run_chain(
        prior=base.prior.to(device),
        rm=base.rm.to(device),
        rm_config=job.base.components["rm"].config,
        stages=stages,
        std_range=plan.std_range,
        resolution=plan.resolution,
        rm_flip_ensemble=plan.rm_flip_ensemble,
    )


def build_dsst_from_faces(listing: FaceListing, plan: CompletePlan, *, limit: int = DSST_FACES) -> DSSTTable:
    """The DSST table from the mean power spectrum of (up to `limit` of) the training faces at the
    pack's resolution, tol calibrated so that the largest std starts at the top of the range."""
    faces = np.load(face_array_file(listing.root, listing.faces, plan.degrade_resolution), mmap_mode="r")
    n = min(limit, faces.shape[0])
    images = (resize_bicubic(faces[i].astype(np.float32) / 255.0, plan.resolution) for i in range(n))
    source = f"{n} training faces of {listing.root} ({listing.note})"
    return pack_dsst_table(images, resolution=plan.resolution, std_range=plan.std_range, source=source)


def auto_dgsa_batch(manifest: PackManifest, plan: CompletePlan, dsst: DSSTTable, device: str) -> int:
    """The per-worker DGSA batch from free memory (fresh_stages.dgsa_batch_size), measured with the base's
    networks and an untrained SE of the plan's configs (memory does not depend on the weights)."""
    base = load_pack(manifest)
    se = StdEstimator(build_sde(plan.sde.sde), transfer_model(base.rm, manifest.components["rm"].config))
    nets = FrozenNets(
        prior=base.prior,
        rm=base.rm,
        se=se,
        dsst=dsst,
        std_range=plan.std_range,
        resolution=plan.resolution,
        rm_flip_ensemble=plan.rm_flip_ensemble,
    )
    return dgsa_batch_size(nets, plan.dgsa, memory=plan.memory, device=device)


def _run_record(job: CompleteJob) -> dict[str, Any]:
    return {
        "base_files": {k: v for k, v in job.base.sha256s().items() if k in ("prior", "rm")},
        "data": job.listing.root,
        "faces": len(job.listing.faces),
        "faces_key": job.listing.key,
        "seed": job.seed,
        "configs": job.plan.configs(),
    }


def _check_or_write_run(job: CompleteJob, resume: bool) -> None:
    uri = f"{job.checkpoints.rstrip('/')}/{RUN_FILE}"
    record = json.loads(json.dumps(_run_record(job)))
    if state_exists(uri):
        from dynface.checkpoints import read_bytes

        stored = json.loads(read_bytes(uri).decode())
        if not resume:
            raise FileExistsError(
                f"checkpoints of an earlier run are at {job.checkpoints}: pass --resume to continue it, or"
                " another --checkpoint-uri to start afresh"
            )
        if stored != record:
            changed = sorted(k for k in record if stored.get(k) != record[k])
            raise ValueError(
                f"--resume: the checkpoints at {job.checkpoints} were trained with other {changed}"
            )
        return
    write_file(uri, (json.dumps(record, indent=1) + "\n").encode())


def _finished(job: CompleteJob) -> tuple[bool, str | None]:
    """Whether every stage's checkpoint reached its step count (after a data-parallel run)."""
    for name in STAGES:
        uri = f"{job.checkpoints.rstrip('/')}/{name}/last.pt"
        steps = getattr(job.plan, name).steps
        done = int(load_checkpoint(uri)["step"]) if state_exists(uri) else 0
        if done < steps:
            return False, f"{name} at step {done}"
    return True, None


def complete(
    base: str,
    out: str,
    data: str,
    options: CompleteOptions | None = None,
    *,
    data_parallel: Callable[[CompleteJob], None] | None = None,
    stop: tuple[str, int] | None = None,
) -> CompleteReport:
    """Complete `base` (a pack name, manifest or folder with a prior and an RM) into the pack `out`,
    training on the HQ aligned faces of `data` (a folder or fsspec URI); the knobs: CompleteOptions.

    `data_parallel`: a runner that trains the job's stages on `options.workers` workers (the
    application's Ray Train runner, app.train_parallel.ray_data_parallel); the library itself knows no
    engine. `stop=(stage, n)`: end after n new steps of that stage (tests; the report says it is unfinished).
    """
    started = time.perf_counter()
    o = options if options is not None else CompleteOptions()
    manifest = resolve_pack(base, weights_dir=o.weights_dir)
    plan = o.plan(manifest)
    listing = list_training_faces(data, limit=o.limit)
    checkpoints = (o.checkpoint_uri or default_checkpoints(out)).rstrip("/")
    work = Path(checkpoints if "://" not in checkpoints else default_checkpoints(checkpoints)) / "work"
    dsst = build_dsst_from_faces(listing, plan)
    if plan.dgsa.batch_size == 0:  # batch 0: the largest that fits this device, times the workers
        per_worker = auto_dgsa_batch(manifest, plan, dsst, o.device)
        plan = replace(plan, dgsa=replace(plan.dgsa, batch_size=per_worker * max(o.workers, 1)))
    job = CompleteJob(
        base=manifest,
        plan=plan,
        listing=listing,
        seed=o.seed,
        checkpoints=checkpoints,
        work_dir=str(work),
        dsst_json=dsst.to_json(),
        checkpoint_every=o.checkpoint_every,
        stop=stop,
        vgg16=o.vgg16,
        dists_head=o.dists_head,
        progress=o.progress,
    )
    _check_or_write_run(job, o.resume)
    if o.workers > 1 and data_parallel is None:
        raise ValueError(
            f"{o.workers} workers need a data_parallel runner (app.train_parallel.ray_data_parallel)"
        )
    if data_parallel is not None:
        data_parallel(job)
        done, where = _finished(job)
        if not done:
            return CompleteReport(None, False, where, {}, checkpoints, time.perf_counter() - started)
    try:
        chain = train_stages(job, device=o.device)
    except StageStopped as stopped:
        where = f"{stopped.stage} at step {stopped.step}"
        return CompleteReport(None, False, where, {}, checkpoints, time.perf_counter() - started)
    stages = {name: (chain.se.loop if name == "se" else getattr(chain, name)).summary() for name in STAGES}
    uri = write_completed_pack(out, job, chain, stages, workers=o.workers, device=o.device)
    return CompleteReport(uri, True, None, stages, checkpoints, time.perf_counter() - started)


def write_completed_pack(
    out: str, job: CompleteJob, chain: Chain, stages: dict[str, dict[str, Any]], *, workers: int, device: str
) -> str:
    """OUT: the trained networks and the table written, the base's prior and RM referenced by URI and
    sha256, the card and training.json pinned as documents."""
    base, plan = job.base, job.plan
    external = {}
    for name in ("prior", "rm"):
        spec = base.components[name]
        entry: dict[str, Any] = {"file": explicit_uri(base.component_uri(name)), "sha256": spec.sha256}
        entry["config"] = spec.config
        if spec.published:
            entry["published"] = spec.published
        external[name] = entry
    configs = {"tm": base.components["rm"].config, "sde": plan.sde.sde, "dgsa": plan.dgsa.dgsa}
    sampler = {k: v for k, v in base.sampler.items() if k != "fixed_std"}  # SE gives std* now
    training = {
        "base": {"manifest": base.uri, "files": {k: base.files()[k] for k in ("prior", "rm")}},
        "data": {
            "uri": job.listing.root,
            "faces": len(job.listing.faces),
            "chosen": job.listing.note,
            "faces_key": job.listing.key,
            "degrade_resolution": plan.degrade_resolution,
            "degradations": "DifFace ranges (spec §6.1), a fresh draw per sample, a function of"
            " (seed, step, row)",
        },
        "seed": job.seed,
        "workers": max(workers, 1),
        "device": device,
        "quick": plan.quick,
        "stages": stages,
        "se": {"tau": chain.se.tau, "label_quantiles_10_50_90": list(chain.se.label_quantiles)},
        "dists": bool(job.vgg16),
        "configs": plan.configs(),
        "dsst": {"n_images": chain.dsst.n_images, "tol": chain.dsst.tol, "source": chain.dsst.source},
        "host": f"{platform.machine()}, torch {torch.__version__}",
    }
    card = render_complete_card(base, training)
    return write_pack(
        out,
        name=f"{base.name}-complete",
        resolution=plan.resolution,
        std_range=plan.std_range,
        networks=chain.networks(configs),
        dsst=chain.dsst,
        sampler=sampler,
        card=f"{base.name} completed with SE, DGSA and a DSST table trained on {len(job.listing.faces)}"
        " faces; see MODEL_CARD.md (research use only).",
        external=external,
        documents={
            TRAINING_FILE: (json.dumps(training, indent=1) + "\n").encode(),
            CARD_FILE: card.encode(),
        },
        extra={"completed_from": training["base"]},
    )


def render_complete_card(base: PackManifest, training: dict[str, Any]) -> str:
    """The model card: what the pack is made of and exactly what trained it. No quality figure: none
    has been measured for a completed pack until someone evaluates it (dynface evaluate)."""
    data, stages = training["data"], training["stages"]
    lines = [
        f"# {base.name}-complete",
        "",
        f"The `{base.name}` pack's prior and RM (frozen, referenced by sha256, never modified) completed with"
        " the components DynFaceRestore adds: SE (TM initialised from the RM, plus SDE), DGSA and a DSST"
        " table, so restoring with this pack runs the full method (per-face std*, DSST start, DGSA map).",
        "",
        "## Quality",
        "",
        "Not measured. No number is claimed for this pack until it is evaluated (`dynface evaluate`).",
        "",
        "## Training",
        "",
        f"- Data: {data['faces']} faces from `{data['uri']}` ({data['chosen']}); degradations: "
        f"{data['degradations']}, made at {data['degrade_resolution']} px.",
        f"- Seed {training['seed']}, {training['workers']} worker(s) on {training['device']}"
        + (" (quick mode: tiny networks, a few steps; not a model)" if training["quick"] else "")
        + ".",
    ]
    for name in STAGES:
        cfg = training["configs"][name]
        s = stages[name]
        lines.append(
            f"- {name.upper()}: {s['steps']} steps, global batch {cfg['batch_size']}, lr {cfg['lr']},"
            f" {s['elapsed_s']} s; final losses {s['final']}."
        )
    lines += [
        f"- SE label τ = {training['se']['tau']} dB (std* quantiles 10/50/90 %:"
        f" {training['se']['label_quantiles_10_50_90']}); DGSA loss SWT"
        + (" + DISTS" if training["dists"] else "")
        + ".",
        f"- DSST: {training['dsst']['source']}, tol {training['dsst']['tol']:.4g}.",
        f"- Base files: {json.dumps(training['base']['files'])}.",
        "",
    ]
    return "\n".join(lines)


def report_json(report: CompleteReport) -> dict[str, Any]:
    return asdict(report)
