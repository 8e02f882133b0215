"""Fresh RM training pairs: made like the pools' pairs, a pure function of (seed, step) whatever the
number of worker processes, and an RM trained on them resumes exactly."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import _write_faces

from dynface.images.degrade import DIFFACE_RANGES, degrade_pair, sample_params
from dynface.train.common import LoopConfig
from dynface.train.data import list_faces, resize_bicubic
from dynface.train.fresh_pairs import FreshPairBatches, FreshPairStream, face_array_file
from dynface.train.plan import starter_plan
from dynface.train.restorer_net import RMTrainConfig, swinir_config, train_rm


@pytest.fixture()
def faces_file(tmp_path: Path) -> Path:
    _write_faces(tmp_path / "data" / "src", 4, 40)
    faces = list_faces(tmp_path / "data")
    return face_array_file(tmp_path / "data", faces, 32, cache_dir=tmp_path / "cache")


def test_face_array_file_holds_the_resized_faces_and_is_reused(tmp_path: Path, faces_file: Path) -> None:
    arr = np.load(faces_file)
    assert arr.shape == (4, 32, 32, 3) and arr.dtype == np.uint8
    faces = list_faces(tmp_path / "data")
    with Image.open(tmp_path / "data" / faces[2].file) as im:
        ref = np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC, reducing_gap=None))
    np.testing.assert_array_equal(arr[2], ref)
    stamp = faces_file.stat().st_mtime_ns
    again = face_array_file(tmp_path / "data", faces, 32, cache_dir=tmp_path / "cache")
    assert again == faces_file and again.stat().st_mtime_ns == stamp  # not written twice
    with pytest.raises(ValueError):
        face_array_file(tmp_path / "data", [], 32, cache_dir=tmp_path / "cache")


def test_a_batch_is_the_pools_degradation_drawn_from_seed_and_step(faces_file: Path) -> None:
    batches = FreshPairBatches(faces_file, 16, batch_size=3, steps=10, seed=5)
    lq, gt = batches[4]
    assert lq.shape == gt.shape == (3, 3, 16, 16) and lq.dtype == torch.float32
    # The same recipe by hand: faces drawn with replacement, DifFace ranges without gray, made at the
    # file's 32 px and resized to 16 px (dynface.train.data._degrade_faces does the same for a pool).
    faces = np.load(faces_file).astype(np.float32) / 255
    rng = np.random.default_rng([5, 4])
    no_gray = replace(DIFFACE_RANGES, gray_prob=0.0)
    for b, idx in enumerate(rng.integers(0, 4, size=3)):
        want_lq, want_gt = degrade_pair(faces[idx], sample_params(rng, no_gray), rng=rng)
        np.testing.assert_array_equal(lq[b].permute(1, 2, 0).numpy(), resize_bicubic(want_lq, 16))
        np.testing.assert_array_equal(gt[b].permute(1, 2, 0).numpy(), resize_bicubic(want_gt, 16))
    assert not torch.equal(batches[4][0], batches[5][0])  # every step its own degradations
    assert len(batches) == 10


def test_the_stream_is_the_same_with_worker_processes_and_after_a_jump(faces_file: Path) -> None:
    batches = FreshPairBatches(faces_file, 16, batch_size=2, steps=8, seed=1)
    inline = FreshPairStream(batches, workers=0)
    ahead = FreshPairStream(batches, workers=2)
    for step in (0, 1, 2, 6, 7, 3):  # 6 and 3 are out of order: the stream restarts there
        want = batches[step]
        for stream in (inline, ahead):
            got = stream.batch(step)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    with pytest.raises(ValueError):
        FreshPairStream(batches, workers=-1)


def test_rm_on_fresh_pairs_resumes_exactly(tmp_path: Path, faces_file: Path) -> None:
    torch.set_num_threads(1)
    images = np.zeros((1, 32, 32, 3), np.float32)  # unused: the pairs come from the stream

    def run(folder: str, steps: int, **loop: int) -> object:
        config = RMTrainConfig(
            swinir=swinir_config(32, embed_dim=16, depths=(1,)), steps=steps, batch_size=2, lr=2e-3,
            warmup=1, loop=LoopConfig(steps=0, ckpt_every=2, seed=0, progress=False, **loop),
        )  # fmt: skip
        stream = FreshPairStream(FreshPairBatches(faces_file, 32, 2, steps, seed=0))
        return train_rm(images, tmp_path / folder, config, pairs=stream)

    straight = run("a", 4)
    run("b", 4, stop_after=2)
    resumed = run("b", 4)
    assert resumed.history["loss"] == straight.history["loss"]
    for name, tensor in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[name], tensor, rtol=0, atol=0)


def test_plan_checks_the_pair_source() -> None:
    plan = starter_plan(64)
    assert plan.rm_pairs == "pool" and plan.pair_workers == 0  # the CPU recipe keeps its pool
    assert replace(plan, rm_pairs="fresh", pair_workers=4).rm_pairs == "fresh"
    for bad in ({"rm_pairs": "online"}, {"pair_workers": -1}):
        with pytest.raises(ValueError):
            replace(plan, **bad)
