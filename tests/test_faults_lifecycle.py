"""How a run ends when it is interrupted: Ctrl-C (once, twice), kill -9, a retried finalize, a sampling
actor that dies. The CLI runs as a user runs it: its own process session, Ctrl-C sent to the whole
process group as a terminal does, and no Prefect server configured (it starts its own)."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from make_bad_inputs import write_aligned_faces

from app.cli import OFFLINE_ENV
from app.guardian import OWNER_ENV, marked_processes
from catalogs import Catalog
from dynface.packs.writer import write_random_pack

pytestmark = pytest.mark.slow

NO_TRAFFIC = {
    **OFFLINE_ENV,
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "240",
}
N_FACES = 12


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("archive")
    src = write_aligned_faces(root / "src", N_FACES, step=2, name="f{k:02d}.png")
    return src, write_random_pack(str(root / "pack"), resolution=32)


def _children(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc ppid links)."""
    parent_of = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        parent_of[int(stat.parent.name)] = int(text[text.rindex(")") + 2 :].split()[1])
    found, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        kids = [p for p, parent in parent_of.items() if parent == current]
        found += kids
        frontier += kids
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _ray_marks(pids: list[int]) -> set[str]:
    marks = set()
    for pid in pids:
        try:
            for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                if item.startswith(f"{OWNER_ENV}=".encode()):
                    marks.add(item.split(b"=", 1)[1].decode())
        except OSError:
            continue
    return marks


class CliRun:
    """`dynface restore` in its own session; records its server and Ray processes while it runs."""

    def __init__(
        self,
        src: Path,
        pack: str,
        dest: Path,
        tmp: Path,
        *,
        extra: tuple[str, ...] = (),
        log: str = "cli.log",
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "RAY_ADDRESS"))}
        env.update(NO_TRAFFIC, DYNFACE_RAY_HOME=str(tmp / "ray-home"), HOME=str(tmp / "home"))
        (tmp / "home").mkdir(exist_ok=True)
        self.dest = dest
        args = [str(Path(sys.executable).parent / "dynface"), "restore", str(src), str(dest), "--aligned"]
        args += [
            "--pack",
            pack,
            "--option",
            "respacing=ddim100",
            "--option",
            "batch_size=2",
            "--shard-size",
            "4",
            *extra,
        ]
        self.log_path = tmp / log
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(
            args, env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.servers: set[int] = set()
        self.marks: set[str] = set()

    def watch_until_sampled(self, timeout: float = 400) -> None:
        """Wait until a first face has been restored by a sampling actor (the run is mid-way)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            kids = _children(self.process.pid)
            self.servers |= {p for p in kids if "uvicorn" in _cmdline(p)}
            self.marks |= _ray_marks(kids)
            if list(self.dest.glob(".work/*/restored/*.png")):
                return
            assert self.process.poll() is None, self.log_path.read_text()
            time.sleep(0.5)
        raise AssertionError("no face was restored in time")

    def interrupt(self) -> None:
        os.killpg(self.process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does

    def wait(self) -> int:
        rc = self.process.wait(timeout=600)
        self.log.close()
        return rc

    def assert_nothing_left(self) -> None:
        deadline = time.monotonic() + 30  # the watchdog polls once a second
        while time.monotonic() < deadline:
            alive = [p for p in self.servers if Path(f"/proc/{p}").exists() and "uvicorn" in _cmdline(p)]
            marked = [p for mark in self.marks for p in marked_processes(mark)]
            if not alive and not marked:
                return
            time.sleep(1)
        raise AssertionError(f"left behind: server {alive}, Ray processes {marked}")


def _runs(dest: Path):
    return Catalog(str(dest / "catalog")).read("runs")


def test_ctrl_c_commits_what_is_restored_and_closes_the_run_as_cancelled(archive, tmp_path):
    src, pack = archive
    run = CliRun(src, pack, tmp_path / "out", tmp_path)
    run.watch_until_sampled()
    assert run.servers and run.marks  # it ran its own server and its own Ray
    run.interrupt()
    assert run.wait() == 130
    text = (tmp_path / "cli.log").read_text()
    assert "stopping: no new work" in text
    runs = _runs(run.dest)
    assert sorted(runs["status"]) == ["cancelled", "running"]  # exactly one closing row
    images = Catalog(str(run.dest / "catalog")).read("images")
    assert (images["status"] == "ok").sum() >= 1
    for _, row in images[images["status"] == "ok"].iterrows():
        assert Path(row["output_uri"]).is_file()
    unfinished = images[images["status"] != "ok"]
    assert unfinished["error"].str.contains("cancelled: the run was stopped").all()
    run.assert_nothing_left()
    assert not (run.dest / ".work").exists() or not any((run.dest / ".work").iterdir())


def test_a_second_ctrl_c_stops_at_once(archive, tmp_path):
    src, pack = archive
    run = CliRun(src, pack, tmp_path / "out", tmp_path)
    run.watch_until_sampled()
    run.interrupt()
    time.sleep(1.0)
    run.interrupt()
    assert run.wait() == 130
    runs = _runs(run.dest)
    closing = runs[runs["status"] != "running"]
    assert list(closing["status"]) == ["cancelled"], runs
    assert "stopped at once" in closing.iloc[0]["error"]
    run.assert_nothing_left()


def test_kill_9_leaves_no_process_behind(archive, tmp_path):
    src, pack = archive
    run = CliRun(src, pack, tmp_path / "out", tmp_path)
    run.watch_until_sampled()
    os.kill(run.process.pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    run.assert_nothing_left()
    runs = _runs(run.dest)
    assert list(runs["status"]) == ["running"]  # no closing row: the next run marks it
    killed = runs["run_id"].iloc[0]
    assert (run.dest / ".work" / killed).is_dir()

    # The next run finds the lease held by a process that is gone: it takes it at once, closes the killed
    # run as abandoned, removes its work folder and restores only what was not committed.
    resumed = CliRun(src, pack, run.dest, tmp_path, log="resume.log")
    assert resumed.wait() == 0, resumed.log_path.read_text()
    runs = _runs(run.dest)
    assert sorted(runs.loc[runs["run_id"] == killed, "status"]) == ["abandoned", "running"]
    assert "stopped without closing" in runs.loc[runs["status"] == "abandoned", "error"].iloc[0]
    assert not (run.dest / ".work" / killed).exists()
    images = Catalog(str(run.dest / "catalog")).read("images")
    assert sorted(images.loc[images["status"] == "ok", "source_uri"].map(lambda u: Path(u).name)) == sorted(
        p.name for p in src.iterdir()
    )  # one ok row per image


def test_a_second_run_on_a_busy_catalog_refuses_or_waits(archive, tmp_path):
    src, pack = archive
    first = CliRun(src, pack, tmp_path / "out", tmp_path)
    first.watch_until_sampled()
    running = _runs(first.dest)["run_id"].iloc[0]

    refused = CliRun(src, pack, first.dest, tmp_path, log="refused.log")
    assert refused.wait() == 75
    assert f"in use by run {running}" in refused.log_path.read_text()

    waiting = CliRun(src, pack, first.dest, tmp_path, extra=("--wait",), log="waiting.log")
    assert first.wait() == 0, first.log_path.read_text()
    assert waiting.wait() == 0, waiting.log_path.read_text()
    images = Catalog(str(first.dest / "catalog")).read("images")
    assert (images["status"] == "ok").sum() == N_FACES  # not twice: the waiting run found them committed
    runs = _runs(first.dest)
    assert sorted(runs["status"]) == ["completed", "completed", "running", "running"]


def test_finalize_and_a_failure_after_it_write_one_closing_row(tmp_path):
    from tasks.discover import prepare_run
    from tasks.runs import close_run, closing_row, write_run_row

    src = tmp_path / "src"
    src.mkdir()
    pack = write_random_pack(str(tmp_path / "pack"), resolution=32)
    ctx = prepare_run(
        source=str(src), dest=str(tmp_path / "out"), catalog=None, pack=pack, aligned=True, device="cpu",
        compare=False, method="full", guidance=None, options=None,
    )  # fmt: skip
    started = dt.datetime.now(dt.UTC)
    write_run_row(ctx, started_at=started, status="running")
    assert closing_row(ctx.catalog, ctx.run_id) is None
    assert close_run(ctx, started_at=started, status="completed")
    assert not close_run(ctx, started_at=started, status="completed")  # a retried finalize
    assert not close_run(ctx, started_at=started, status="failed", error="late error")
    runs = Catalog(ctx.catalog).read("runs")
    assert sorted(runs["status"]) == ["completed", "running"]
    with pytest.raises(ValueError):
        close_run(ctx, started_at=started, status="running")
