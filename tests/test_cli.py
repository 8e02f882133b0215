"""The `dynface` command line: restore (real flow), catalog sql, pack random, exit codes."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

import pytest
from make_bad_inputs import synthetic_face, write_aligned_faces
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
    pack = next(a for a in sub.choices["pack"]._actions if isinstance(a, argparse._SubParsersAction))
    assert list(pack.choices) == ["random", "pin", "hash"]
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


def test_pack_pin_writes_a_pinned_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    weights = tmp_path / "w"
    weights.mkdir()
    for name in ("iddpm_ffhq512_ema500000.pth", "swinir_restoration512_L1.pth"):
        (weights / name).write_bytes(name.encode())
    out = tmp_path / "pinned"
    assert main(["pack", "pin", "difface", "--weights-dir", str(weights), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "manifest.yaml")
    text = (out / "manifest.yaml").read_text()
    assert hashlib.sha256(b"iddpm_ffhq512_ema500000.pth").hexdigest() in text
    assert (out / "dsst.json").is_file()
    assert main(["pack", "pin", "difface", "--weights-dir", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "MissingWeightsError" in capsys.readouterr().err


def test_catalog_sql_reports_errors_with_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["catalog", "sql", str(tmp_path / "cat"), "SELECT COUNT(*) AS n FROM images"]) == 0
    assert re.search(r"^\s*n\s*$\n^\s*0\s*$", capsys.readouterr().out, re.M)
    assert main(["catalog", "sql", str(tmp_path / "cat"), "SELEC nonsense"]) == 1
    assert "error" in capsys.readouterr().err


def test_restore_then_catalog_sql(
    prefect_api, local_ray, offline_env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    src = write_aligned_faces(tmp_path / "crops", 3, size=40)
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


def test_restore_refuses_bad_settings_before_anything_starts(offline_env, tmp_path: Path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(synthetic_face(40)).save(src / "face.png")
    dest = tmp_path / "out"
    tampered = Path(write_random_pack(str(tmp_path / "pack"), resolution=32)).parent
    (tampered / "dgsa.safetensors").write_bytes(b"replaced after the pack was written")
    cases = [
        ([str(src), str(src)], "dest must differ from source"),
        ([str(tmp_path / "missing"), str(dest)], "does not exist"),
        ([str(src), str(dest), "--pack", "nowhere"], "not a built-in pack"),
        ([str(src), str(dest), "--option", "respacing=nonsense"], "bad respacing 'nonsense'"),
        ([str(src), str(dest), "--option", "no_such_knob=1"], "unknown restore options"),
        ([str(src), str(dest), "--pack", "difface", "--weights-dir", str(tmp_path)], "not found; looked at"),
        ([str(src), str(dest), "--pack", str(tampered)], "the manifest pins"),
    ]
    for argv, message in cases:
        assert main(["restore", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err  # one line, no traceback
    assert not dest.exists()


def test_restore_with_the_starter_pack_says_what_it_is(tmp_path: Path) -> None:
    """The starter manifest's notice is the first line `dynface restore` prints (stderr, before the run);
    a pack without a notice prints none."""
    from app.cli import build_parser, preflight

    src = write_aligned_faces(tmp_path / "crops", 1, size=40)
    args = build_parser().parse_args(["restore", str(src), str(tmp_path / "out"), "--aligned"])
    note = preflight(args)
    first = note.splitlines()[0]
    assert first.startswith("dynface restore: note: the starter pack is a 64-px demonstration model")
    assert "does not improve real photographs" in first and "difface" in first
    random_pack = write_random_pack(str(tmp_path / "pack"), resolution=32)
    args = build_parser().parse_args(["restore", str(src), str(tmp_path / "out"), "--pack", random_pack])
    assert "note:" not in (preflight(args) or "")


def test_pack_hash_prints_every_file_and_its_pin(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    pack = write_random_pack(str(tmp_path / "p"), resolution=32)
    assert main(["pack", "hash", pack]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    manifest = json.loads(Path(pack).read_text())
    assert len(lines) == len(manifest["components"])
    for line in lines:
        name, digest, *_ = line.split()
        assert digest == manifest["components"][name]["sha256"] and "pinned, matches" in line
    (tmp_path / "p" / "rm.safetensors").write_bytes(b"not the pinned bytes")
    assert main(["pack", "hash", pack]) == 1
    assert "DIFFERS" in capsys.readouterr().out
    weights = tmp_path / "w"
    weights.mkdir()
    for name in ("iddpm_ffhq512_ema500000.pth", "swinir_restoration512_L1.pth"):
        (weights / name).write_bytes(name.encode())
    assert main(["pack", "hash", "difface", "--weights-dir", str(weights)]) == 0
    out, err = capsys.readouterr()
    assert hashlib.sha256(b"swinir_restoration512_L1.pth").hexdigest() in out and "not pinned" in out
    assert "dynface pack pin difface --out DIR" in err
