import subprocess
import sys
from pathlib import Path

import visattn
from visattn import cli, tables

ROOT = Path(__file__).resolve().parents[1]


def test_list_shows_every_block(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in visattn.list_attns():
        assert f"\n{name} " in out
    assert "Criss-Cross" in out and "O(N·(H+W)·D)" in out


def test_info_prints_fields_and_defaults(capsys):
    assert cli.main(["info", "ccnet"]) == 0
    out = capsys.readouterr().out
    assert "1811.11721" in out and "recurrence = 1" in out and "reduction = 8" in out


def test_info_unknown_name_fails_cleanly(capsys):
    assert cli.main(["info", "ccnt"]) == 2
    assert "did you mean 'ccnet'" in capsys.readouterr().err


def test_console_entry_point_runs():
    res = subprocess.run(
        [sys.executable, "-m", "visattn.cli", "list", "axial"], capture_output=True, text=True
    )
    assert res.returncode == 0 and "axial" in res.stdout


def test_docs_blocks_md_is_up_to_date():
    committed = (ROOT / "docs" / "blocks.md").read_text()
    assert committed == tables.markdown_blocks(), "docs/blocks.md is stale: run `visattn docs`"
