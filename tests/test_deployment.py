"""The nightly deployment on a real Prefect server + process worker: `make serve`, `prefect deployment
run restore-archive/nightly --watch`, `make stop`.

Everything runs as separate processes, as a user would run them, with state in a temp folder
(`DYNFACE_RUN_DIR`) so a developer's `.run/` and port 4200 are left alone. ~60-90 s on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from make_bad_inputs import synthetic_face, write_aligned_faces
from official_fixtures import *  # noqa: F403 - the session fixture official_weights
from official_fixtures import OPTIONS, check_official_run
from PIL import Image

from catalogs import Catalog
from dynface.packs.writer import write_random_pack
from dynface.paths import REPO_ROOT

pytestmark = pytest.mark.slow

N_FACES = 3
NO_TRAFFIC = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "AWS_EC2_METADATA_DISABLED": "true",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def live_group_members(pgid: int) -> list[int]:
    """Pids of non-zombie processes in process group `pgid` (from /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # the process ended while we looked
            continue
        fields = text[text.rindex(")") + 2 :].split()  # state, ppid, pgrp, ...
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


@dataclass(frozen=True)
class Service:
    port: int
    run_dir: Path
    env: dict[str, str]
    pids: tuple[int, ...]

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"


def service_env(tmp: Path) -> dict[str, str]:
    """This environment without Prefect/Ray/AWS settings that could point elsewhere, plus the
    no-traffic variables; the service's state lives under `tmp`."""
    drop = ("PREFECT_", "RAY_", "AWS_", "DYNFACE_DIFFACE_DIR")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(NO_TRAFFIC)
    env.update(
        DYNFACE_RUN_DIR=str(tmp / "run"),
        DYNFACE_BIN=str(Path(sys.executable).parent),
        DYNFACE_RAY_HOME=str(tmp / "ray-home"),  # the flow run starts Ray with this HOME (no probe)
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_HOME=str(tmp / "run" / "prefect"),
    )
    return env


def make(target: str, env: dict[str, str], *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    # -o: never (re)build the virtual environment from a test, whatever the stamp's age.
    cmd = ["make", "-C", str(REPO_ROOT), "-o", ".venv/.installed", target, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("service")
    env = service_env(tmp)
    port = free_port()
    try:
        started = make("serve", env, f"PREFECT_PORT={port}", timeout=240)
        assert started.returncode == 0, started.stdout + started.stderr
        run_dir = tmp / "run"
        pids = tuple(int((run_dir / f"{name}.pid").read_text()) for name in ("server", "worker"))
        assert (run_dir / "api_url").read_text().strip() == f"http://127.0.0.1:{port}/api"
        yield Service(port=port, run_dir=run_dir, env=env, pids=pids)
    finally:
        stopped = make("stop", env, timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """(folder of N_FACES aligned 48-px crops, random 32-px pack manifest)."""
    root = tmp_path_factory.mktemp("archive")
    src = write_aligned_faces(root / "crops", N_FACES)
    return src, write_random_pack(str(root / "pack"), resolution=32)


def prefect(service: Service, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**service.env, "PREFECT_API_URL": service.api_url}
    cmd = [str(Path(sys.executable).parent / "prefect"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)


def run_deployment(
    service: Service, name: str, params: dict[str, object], *, watch_s: int
) -> subprocess.CompletedProcess[str]:
    """`prefect deployment run NAME --param K=V ... --watch`, as a user types it."""
    flags = [arg for key, value in params.items() for arg in ("--param", f"{key}={value}")]
    watch = ["--watch", "--watch-timeout", str(watch_s)]
    return prefect(service, "deployment", "run", name, *flags, *watch, timeout=watch_s + 60)


def run_nightly(
    service: Service, params: dict[str, object], *, watch_s: int
) -> subprocess.CompletedProcess[str]:
    return run_deployment(service, "restore-archive/nightly", params, watch_s=watch_s)


def test_service_binds_loopback_and_registers_the_nightly_deployment(service: Service):
    assert port_open(service.port)
    listening = Path("/proc/net/tcp").read_text().splitlines()[1:]
    # local_address is HEX_IP:HEX_PORT; state 0A = LISTEN; 0100007F = 127.0.0.1.
    ours = [line.split()[1] for line in listening if line.split()[3] == "0A"]
    assert f"0100007F:{service.port:04X}" in ours
    assert f"00000000:{service.port:04X}" not in ours  # not on every interface
    shown = prefect(service, "deployment", "inspect", "restore-archive/nightly", timeout=60)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    text = shown.stdout
    for expected in ("'source': 'samples/archive'", "'aligned': True", "'pack': 'starter'", "0 2 * * *"):
        assert expected in text, f"{expected!r} not in the deployment:\n{text}"


def test_deployment_run_restores_and_catalogs(service: Service, archive: tuple[Path, str], tmp_path: Path):
    src, pack = archive
    dest = tmp_path / "out"
    params = {"source": src, "dest": dest, "pack": pack, "aligned": "true"}
    run = run_nightly(service, {**params, "options": json.dumps({"respacing": "ddim10"})}, watch_s=240)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Completed" in run.stdout
    images = Catalog(str(dest / "catalog")).read("images")
    expected_ids = {hashlib.sha256((src / f"face{k}.png").read_bytes()).hexdigest() for k in range(N_FACES)}
    assert set(images["image_id"]) == expected_ids
    assert list(images["status"]) == ["ok"] * N_FACES
    for _, row in images.iterrows():
        assert row["output_uri"] == str(dest / "restored" / row["relative_path"])
        with Image.open(row["output_uri"]) as im:
            assert im.size == (48, 48)
        assert (dest / "faces" / f"{row['image_id']}_00.png").is_file()
    runs = Catalog(str(dest / "catalog")).read("runs")
    done = runs[runs["status"] == "completed"]
    assert len(done) == 1 and json.loads(done.iloc[0]["config_json"])["restore"]["respacing"] == "ddim10"
    # The flow run inherited the worker's environment: Ray started with HOME at our bootstrap folder.
    assert (Path(service.env["DYNFACE_RAY_HOME"]) / "ray_bootstrap_config.yaml").is_file()


def test_deployment_run_with_weights_dir_uses_the_official_files(
    service: Service, official_weights: Path, tmp_path: Path
):
    """The README's official path through the deployment: `pack=difface` and `weights_dir` as flow
    parameters; neither the worker nor the flow run has DYNFACE_DIFFACE_DIR."""
    assert "DYNFACE_DIFFACE_DIR" not in service.env
    src = tmp_path / "crops"
    src.mkdir()
    Image.fromarray(synthetic_face(96)).save(src / "face.png")
    dest = tmp_path / "out"
    params = {"source": src, "dest": dest, "pack": "difface", "weights_dir": official_weights}
    params |= {"aligned": "true", "guidance": "closed_form", "options": json.dumps(OPTIONS)}
    run = run_nightly(service, params, watch_s=400)
    assert run.returncode == 0, run.stdout + run.stderr
    check_official_run(dest, official_weights, n_images=1)


def test_bad_parameters_fail_the_flow_run_before_anything_is_written(service: Service, archive, tmp_path):
    src, _ = archive
    dest = tmp_path / "out"
    for params, message in (
        ({"pack": "nowhere"}, "not a built-in pack"),
        ({"options": json.dumps({"respacing": "nonsense"})}, "bad respacing 'nonsense'"),
    ):
        run = run_nightly(service, {"source": src, "dest": dest, **params}, watch_s=240)
        assert run.returncode == 1, run.stdout + run.stderr
        logs = prefect(service, "flow-run", "logs", _flow_run_id(run.stdout), timeout=60)
        assert message in logs.stdout, logs.stdout
    assert not dest.exists()


def test_train_complete_deployment_completes_a_pack(service: Service, archive, tmp_path: Path):
    """`prefect deployment run train-complete/on-demand` with the options object as JSON, run by the
    worker: the completed pack verifies and has the trained components."""
    from dynface.packs.manifest import verify_pack

    src, pack = archive
    out = tmp_path / "completed"
    options = {"quick": True, "steps": {"sde": 1, "se": 1, "dgsa": 1}, "degrade_resolution": 64}
    options["checkpoint_uri"] = str(tmp_path / "checkpoints")
    params = {"base": pack, "out": out, "data": src, "options": json.dumps(options)}
    run = run_deployment(service, "train-complete/on-demand", params, watch_s=240)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Completed" in run.stdout
    manifest = verify_pack(str(out))
    assert {"tm", "sde", "dgsa", "dsst"} <= set(manifest.components)  # SE = TM + SDE
    training = json.loads((out / "training.json").read_text())
    assert {k: v["steps"] for k, v in training["stages"].items()} == {"sde": 1, "se": 1, "dgsa": 1}


def _flow_run_id(output: str) -> str:
    import re

    found = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert found, output
    return found.group(1)


def test_stop_ends_every_process(service: Service, archive):
    """Last in the module: stop explicitly (the fixture's finalizer then finds nothing to stop)."""
    stopped = make("stop", service.env, timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    for pid in service.pids:
        assert live_group_members(pid) == [], f"processes of group {pid} survived `make stop`"
    assert not port_open(service.port)
    assert not (service.run_dir / "server.pid").exists() and not (service.run_dir / "worker.pid").exists()
