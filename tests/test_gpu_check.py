"""benchmarks/gpu_check.sh --cpu-smoke from a bare copy of the repository (no ../shared beside it, no
virtual environment in it): the prepared GPU script's plumbing, proven on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dynface.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

STEPS = ("env", "golden", "syncs", "loops", "full", "train", "options", "compile")


def bare_copy(dest: Path) -> Path:
    """What the device tool sends: tracked files and untracked ones git does not ignore."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        source = REPO_ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_from_a_bare_copy(tmp_path: Path) -> None:
    repo = bare_copy(tmp_path / "repo")
    assert not (repo / ".venv").exists() and not (tmp_path / "shared").exists()
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "DYNFACE_SHARED": str(tmp_path / "none")}
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--cpu-smoke"], cwd=repo, env=env, capture_output=True, text=True,
        timeout=900,
    )  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, log
    summary = (out / "summary.txt").read_text()
    assert summary.index("plan (step: time limit)") < summary.index("== env")  # the plan comes first
    for step in STEPS:
        assert f"  {step:<8} ok" in summary, log
    assert f"dynface from {repo}" in summary  # the copy's code, not the checkout's
    assert "beyond the lent machine's image: none" in summary
    results = {
        line["step"]: line for line in map(json.loads, (out / "results.jsonl").read_text().splitlines())
    }
    assert set(results) == set(STEPS)
    assert all(case["passed"] for case in results["golden"].values() if isinstance(case, dict))
    assert results["syncs"]["full (kernel update)"]["HostReadCounter"] <= 1
    assert results["syncs"]["no kernel update"]["HostReadCounter"] == 0
    assert {"reference (plain, fp32)", "ours fp32", "ours bf16"} <= set(results["loops"])
    assert results["full"]["dps bf16"]["gflop_per_face_step"] > 0
    train = results["train"]["stages"]
    assert set(train) == {"sde", "se", "dgsa"}
    for stage in train.values():  # step seconds and peak bytes at batch 1, 2 and the largest (4 here)
        largest = stage.get("time_limited_batch", stage["largest_batch"])  # time-limited: a loaded CPU
        assert set(stage["points"]) == {"1", "2", str(largest)} or "largest_skipped" in stage, stage
        assert all(p["step_s"] > 0 and p["peak_bytes"] > 0 for p in stage["points"].values()), stage
    assert results["train"]["plan_hours"]["dgsa"] > 0
    assert "== train" in (out / "full.txt").read_text()  # train shares full's file
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) <= 8  # what the device tool brings back from $OUT


def test_compile_takes_eager_from_this_runs_options_step(tmp_path: Path) -> None:
    """The compile step spends its limit on compiling: eager s/step is the options step's row with the
    same defaults and precision, on the same device, read from this run's results."""
    from gpu_check import _eager_measured
    from gpu_check_setup import Check

    results = tmp_path / "results.jsonl"
    check = Check(torch.device("cpu"), True, 60.0, results, 0.0)
    assert _eager_measured(check) is None  # no results yet: the compile step measures eager itself
    other = Check(torch.device("meta"), True, 60.0, results, 0.0)
    other.record("options", {"fp32, TF32 off (default)": {"s_per_step": 9.0}})
    check.record("env", {"torch": torch.__version__})
    assert _eager_measured(check) is None  # another device's options step does not count
    check.record(
        "options",
        {"bf16 eager (defaults)": {"s_per_step": 0.5}, "fp32, TF32 off (default)": {"s_per_step": 0.25}},
    )
    assert _eager_measured(check) == 0.25  # on a CPU the compile step runs fp32
    cuda = Check(torch.device("cuda"), False, 60.0, results, 0.0)
    cuda.record("options", {"bf16 eager (defaults)": {"s_per_step": 0.125}})
    assert _eager_measured(cuda) == 0.125
