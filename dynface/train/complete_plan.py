"""What `train complete` trains on top of a base pack: the stage configs at the base's resolution, and
the faces of `--data` (a local folder or any fsspec URI) as one uint8 array file for fresh pairs."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import fsspec

from dynface.packs.manifest import PackManifest
from dynface.train.data import IMAGE_EXTS, FaceFile, list_faces, split_faces
from dynface.train.dgsa import DGSATrainConfig
from dynface.train.fresh_stages import DGSAMemory
from dynface.train.plan import parse_stage_values
from dynface.train.sde import SDETrainConfig
from dynface.train.se import SETrainConfig

STAGES = ("sde", "se", "dgsa")
DEGRADE_RESOLUTION = 512  # the spec's DifFace ranges are in pixels at 512 (spec §6.1)


@dataclass(frozen=True)
class CompletePlan:
    """Stage configs (global batch sizes) for a base pack of `resolution` px and its std range."""

    resolution: int
    std_range: tuple[float, float]
    sde: SDETrainConfig
    se: SETrainConfig
    dgsa: DGSATrainConfig
    rm_flip_ensemble: bool
    degrade_resolution: int = DEGRADE_RESOLUTION
    memory: DGSAMemory = DGSAMemory()
    quick: bool = False

    def configs(self) -> dict[str, dict[str, Any]]:
        """Every trained stage's config as recorded in training.json (loops left out)."""
        out: dict[str, dict[str, Any]] = {}
        for name in STAGES:
            cfg = asdict(getattr(self, name))
            cfg.pop("loop", None)
            out[name] = cfg
        out["memory"] = asdict(self.memory)
        out["degrade_resolution"] = {"px": self.degrade_resolution}
        return out


def complete_plan(
    base: PackManifest,
    *,
    quick: bool = False,
    steps: Mapping[str, int] | None = None,
    batch_sizes: Mapping[str, int] | None = None,
    memory: DGSAMemory | None = None,
    degrade_resolution: int = DEGRADE_RESOLUTION,
) -> CompletePlan:
    """The recipe for `base` (its resolution, std range and sampler: DGSA trains the deployed step, i.e.
    the base's respacing, guidance mode and ζ). `quick`: tiny networks and a few steps (tests, demos)."""
    res = base.resolution
    lo, hi = base.std_range
    sampler = base.sampler
    if quick:
        sde_net = {"width": 8, "num_stages": 2, "input_size": min(res, 64), "std_min": lo, "std_max": hi}
        plan = CompletePlan(
            resolution=res,
            std_range=(lo, hi),
            sde=SDETrainConfig(sde=sde_net, steps=3, batch_size=2, warmup=1),
            se=SETrainConfig(std_range=(lo, hi), steps=3, batch_size=2, warmup=1, grid_size=5, calib_pairs=4),
            dgsa=_dgsa_config(sampler, hidden=8, steps=3, batch_size=2, lr=1e-3, warmup=1),
            rm_flip_ensemble=bool(sampler.get("rm_flip_ensemble", False)),
            degrade_resolution=degrade_resolution,
            memory=memory or DGSAMemory(),
            quick=True,
        )
    else:
        # Spec §3.9: a ResNet-style SDE on a 256-px downsample; §3.13–3.14: a 64-channel DGSA, lr ~1e-4.
        sde_net = {"width": 32, "num_stages": 4, "input_size": min(res, 256), "std_min": lo, "std_max": hi}
        plan = CompletePlan(
            resolution=res,
            std_range=(lo, hi),
            sde=SDETrainConfig(sde=sde_net, steps=20000, batch_size=32, lr=1e-3, warmup=500),
            se=SETrainConfig(std_range=(lo, hi), steps=20000, batch_size=8, lr=1e-4, warmup=500),
            dgsa=_dgsa_config(sampler, hidden=64, steps=10000, batch_size=4, lr=1e-4, warmup=200),
            rm_flip_ensemble=bool(sampler.get("rm_flip_ensemble", False)),
            degrade_resolution=degrade_resolution,
            memory=memory or DGSAMemory(),
        )
    for name, value in (steps or {}).items():
        plan = replace(plan, **{_stage(name): replace(getattr(plan, name), steps=int(value))})
    for name, value in (batch_sizes or {}).items():
        plan = replace(plan, **{_stage(name): replace(getattr(plan, name), batch_size=int(value))})
    return plan


@dataclass(frozen=True)
class CompleteOptions:
    """Every knob of one `train complete` run, as one value (the library call, the `train-complete` flow
    parameter and the command line build it once).

    `steps`/`batch_sizes`: per stage ({"sde": N, ...}; batch sizes are global, split over the workers; a
    DGSA batch of 0: the largest that fits the device). `checkpoint_uri`: where the stage checkpoints go
    (None: a temp folder named after OUT); `resume` continues them — without it existing checkpoints are an
    error. `workers` > 1 trains data-parallel (needs the application's runner). `precision` and
    `checkpointing`: the DGSA step's memory options (memory_for). `limit`: the first N faces of the data.
    `vgg16` (+ `dists_head`): adds DISTS to DGSA's loss.
    """

    steps: dict[str, int] = field(default_factory=dict)
    batch_sizes: dict[str, int] = field(default_factory=dict)
    seed: int = 0
    resume: bool = False
    quick: bool = False
    checkpoint_every: int = 200
    checkpoint_uri: str | None = None
    workers: int = 0
    device: str = "cpu"
    weights_dir: str | None = None
    precision: str | None = None
    checkpointing: bool = True
    degrade_resolution: int = DEGRADE_RESOLUTION
    limit: int | None = None
    vgg16: str | None = None
    dists_head: str | None = None
    progress: bool = True

    def plan(self, base: PackManifest) -> CompletePlan:
        return complete_plan(
            base,
            quick=self.quick,
            steps=self.steps,
            batch_sizes=self.batch_sizes,
            memory=memory_for(self.device, self.precision, checkpointing=self.checkpointing),
            degrade_resolution=self.degrade_resolution,
        )


def _dgsa_config(sampler: Mapping[str, Any], *, hidden: int, **train: Any) -> DGSATrainConfig:
    """DGSA trains the step the pack deploys: the base's respacing, guidance mode and ζ."""
    return DGSATrainConfig(
        dgsa={"hidden": hidden},
        respacing=str(sampler.get("respacing", "ddim250")),
        mode=str(sampler.get("mode", "dps")),
        guidance_scale=float(sampler.get("guidance_scale", 1.0)),
        **train,
    )


def _stage(name: str) -> str:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return name


def parse_steps(items: list[str]) -> dict[str, int]:
    """`--steps` values: `N` (every stage) or `STAGE=N` (one stage), later items winning."""
    out: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            out.update({stage: int(item) for stage in STAGES})
        else:
            out[_stage(name)] = int(value)
    if any(v < 1 for v in out.values()):
        raise ValueError("every stage needs at least one step")
    return out


def parse_batches(items: list[str]) -> dict[str, int]:
    """`--batch STAGE=N` values (global batch sizes; 0 for DGSA: the largest that fits)."""
    return {_stage(name): value for name, value in parse_stage_values(items, int).items()}


def memory_for(device: str, precision: str | None = None, *, checkpointing: bool = True) -> DGSAMemory:
    """The DGSA step's memory options: bf16 autocast on CUDA unless `precision` says otherwise (fp32 on a
    CPU, where bf16 convolutions are slow), gradient checkpointing of the frozen UNet on request."""
    chosen = precision or ("bf16" if device.startswith("cuda") else "fp32")
    return DGSAMemory(precision=chosen, checkpointing=checkpointing)


@dataclass(frozen=True)
class FaceListing:
    """The training faces of `--data`: their folder or URI prefix, the files relative to it, and a key
    that changes whenever the set of files (or their content, as far as the listing can tell) does."""

    root: str
    faces: list[FaceFile]
    key: str
    note: str  # how the files were chosen, for the card


def list_training_faces(data: str, *, limit: int | None = None) -> FaceListing:
    """A local folder: with MANIFEST.csv (the project's shared data) its `hq_aligned` rows of the
    training split (held-out faces and tightly framed sources stay out, dynface.train.data), otherwise
    every image under it (content sha256s). Any other fsspec URI: every image under the prefix, keyed by
    path, size and the store's etag or mtime (the bytes are read once, when the array file is made).
    `limit`: the first N files by name."""
    root = data.rstrip("/")
    local = "://" not in root or root.startswith("file://")
    if local:
        folder = Path(root.removeprefix("file://"))
        if (folder / "MANIFEST.csv").is_file():
            faces, note = split_faces(list_faces(folder))[0], "training split of the hq_aligned rows"
        else:
            faces, note = list_faces(folder, exclude=()), "every image in the folder"
        root = str(folder)
    else:
        fs, prefix = fsspec.core.url_to_fs(root)
        faces = []
        for path, info in sorted(fs.find(prefix, detail=True).items()):
            if not path.lower().endswith(IMAGE_EXTS):
                continue
            rel = path[len(prefix) :].lstrip("/")
            stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
            ident = hashlib.sha256(f"{rel}|{info.get('size')}|{stamp}".encode()).hexdigest()
            faces.append(FaceFile(rel, ident, rel.split("/")[0] if "/" in rel else ""))
        note = "every image under the prefix"
    if limit is not None:
        faces = faces[:limit]
    if not faces:
        raise ValueError(f"no training faces under {data}")
    key = hashlib.sha256("|".join(f"{f.file}:{f.sha256}" for f in faces).encode()).hexdigest()[:24]
    return FaceListing(root=root, faces=faces, key=key, note=note)


def default_checkpoints(out: str) -> str:
    """Where a run's checkpoints go unless given: a temp folder named after OUT (stable across runs, so
    `--resume` finds them; never inside the pack)."""
    ident = hashlib.sha256(out.rstrip("/").encode()).hexdigest()[:16]
    return str(Path(tempfile.gettempdir()) / "dynface_complete" / ident)
