"""The `dynface` command line: restore (real flow), catalog sql, pack random, exit codes."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
from make_bad_inputs import synthetic_face
from PIL import Image
from pipeline_fixtures import *  # noqa: F403 - the shared fixtures prefect_api and local_ray

from app.cli import OFFLINE_ENV, SUBCOMMANDS, build_parser, main, parse_option
from dynface.packs.writer import write_random_pack


@pytest.fixture
def offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """`dynface restore` sets these defaults in its process; keep them from leaking past a test."""
    for key, value in OFFLINE_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "WARNING")


def test_parse_option_reads_json_values_else_strings():
    assert parse_option("respacing=ddim10") == ("respacing", "ddim10")
    assert parse_option("eta=0.5") == ("eta", 0.5)
    assert parse_option("use_dgsa=false") == ("use_dgsa", False)
    assert parse_option("offsets=[0, 1.5]") == ("offsets", [0, 1.5])
    assert parse_option(" seed = 7") == ("seed", 7)
    with pytest.raises(argparse.ArgumentTypeError):
        parse_option("no-equals-sign")


def test_subcommands_are_registered_explicitly():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == ["restore", "catalog", "pack", "evaluate", "train", "review", "publish"]
    assert len(SUBCOMMANDS) == 7
    with pytest.raises(SystemExit):
        main(["no-such-command"])


def test_pack_random_prints_its_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["pack", "random", str(tmp_path / "p"), "--resolution", "64"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == str(tmp_path / "p" / "manifest.json")
    manifest = json.loads(Path(printed).read_text())
    assert manifest["resolution"] == 64
    assert {"prior", "rm", "dsst"} <= set(manifest["components"])


def test_catalog_sql_reports_errors_with_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["catalog", "sql", str(tmp_path / "cat"), "SELECT COUNT(*) AS n FROM images"]) == 0
    assert re.search(r"^\s*n\s*$\n^\s*0\s*$", capsys.readouterr().out, re.M)
    assert main(["catalog", "sql", str(tmp_path / "cat"), "SELEC nonsense"]) == 1
    assert "error" in capsys.readouterr().err


def test_restore_then_catalog_sql(
    prefect_api, local_ray, offline_env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    src = tmp_path / "crops"
    src.mkdir()
    for k in range(3):
        Image.fromarray(np.roll(synthetic_face(40), 3 * k, axis=1)).save(src / f"face{k}.png")
    pack = write_random_pack(str(tmp_path / "pack"), resolution=32)
    dest = tmp_path / "out"
    rc = main(
        ["restore", str(src), str(dest), "--pack", pack, "--aligned", "--shard-size", "2", "--compare"]
        + ["--option", "respacing=ddim5", "--guidance", "closed_form"]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "3 images (ok 3, no_face 0, failed 0, skipped 0)" in out
    assert f"catalog:  {dest / 'catalog'}" in out and f"compare:  {dest / 'compare'}/" in out
    assert "restoring faces" in err and "3/3" in err  # the tqdm bar on stderr
    assert sorted(p.name for p in (dest / "restored").iterdir()) == ["face0.png", "face1.png", "face2.png"]
    assert len(list((dest / "compare").iterdir())) == 3

    query = "SELECT status, COUNT(*) AS n, CAST(SUM(n_faces) AS INTEGER) AS faces FROM images GROUP BY status"
    assert main(["catalog", "sql", str(dest / "catalog"), query]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^\s*ok\s+3\s+3\s*$", table, re.M), table
    assert "(1 row)" in table


def test_restore_crash_gives_nonzero_exit(prefect_api, offline_env, tmp_path: Path, capsys):
    src = tmp_path / "same"
    src.mkdir()
    assert main(["restore", str(src), str(src), "--pack", "nowhere"]) == 1
    assert "dest must differ from source" in capsys.readouterr().err
