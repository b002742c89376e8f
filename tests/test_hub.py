"""The model zoo index and checkpoint downloads (a local HTTP server on 127.0.0.1; no network)."""

from __future__ import annotations

import hashlib
import http.server
import re
import socket
import threading
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from test_convert_mmseg import small
from test_segmentor import randomize_

from visattn import hub
from visattn.models import create_segmentor, to_mmseg

ZOO_MD = Path(__file__).parent / "data" / "mmseg_zoo.md"  # copy of shared/reference
NAME_RE = re.compile(
    r"^(ccnet|emanet|gcnet|isanet|nonlocal|dnl|danet|fcn)_(r50|r101)-d8(-amp)?_(cityscapes-512x1024|ade20k-512x512)$"
)


# -- the index --------------------------------------------------------------------------------
def test_zoo_has_every_row_with_its_facts():
    zoo = hub.load_zoo()
    assert len(zoo) == 31
    methods = [NAME_RE.match(n).group(1) for n in zoo]
    assert sum(m != "fcn" for m in methods) == 26 and methods.count("fcn") == 5
    for name, entry in zoo.items():
        method, depth, _, dataset = NAME_RE.match(name).groups()
        assert entry["config"]["head"] == method
        assert entry["config"]["backbone"] == {"r50": "resnet50c", "r101": "resnet101c"}[depth]
        assert entry["config"]["output_stride"] == 8
        assert entry["config"]["num_classes"] == (19 if dataset.startswith("cityscapes") else 150)
        assert entry["dataset"] == dataset.split("-")[0]
        assert entry["source"] == "mmsegmentation" and entry["license"] == "Apache-2.0"
        assert entry["url"].startswith("https://download.openmmlab.com/mmsegmentation/v0.5/")
        assert entry["url"].endswith(f"-{entry['hash']}.pth") and re.fullmatch(r"[0-9a-f]{8}", entry["hash"])
        assert hub.hash_prefix_of(Path(entry["url"]).name) == entry["hash"]
        assert isinstance(entry["miou"], float) and 30 < entry["miou"] < 90


@pytest.mark.skipif(not ZOO_MD.is_file(), reason="reference zoo table not available")
def test_zoo_matches_the_published_table():
    by_config = {e["mmseg_config"]: e for e in hub.load_zoo().values()}
    rows = [
        line.strip().strip("|").split("|")
        for line in ZOO_MD.read_text().splitlines()
        if line.startswith("| ") and "download.openmmlab.com" in line
    ]
    assert len(rows) == len(by_config) == 31
    for cfg, _dataset, ss, ms, _mem, url in ([c.strip() for c in r] for r in rows):
        entry = by_config[cfg]
        assert entry["url"] == url
        assert entry["miou"] == float(ss)
        assert entry["miou_ms_flip"] == (None if ms == "-" else float(ms))


def test_list_and_entries():
    assert hub.list_pretrained("ccnet_*") == [
        "ccnet_r101-d8_ade20k-512x512",
        "ccnet_r101-d8_cityscapes-512x1024",
        "ccnet_r50-d8_ade20k-512x512",
        "ccnet_r50-d8_cityscapes-512x1024",
    ]
    with pytest.raises(ValueError, match="did you mean|Did you mean"):
        hub.zoo_entry("ccnet_r50-d8_cityscapes")
    cfg = hub.zoo_config("emanet_r101-d8_cityscapes-512x1024")
    assert cfg["name"] == "emanet_r101-d8_cityscapes-512x1024" and cfg["data"]["test_scale"] == [2048, 1024]


# -- downloads --------------------------------------------------------------------------------
@pytest.fixture
def server(tmp_path):
    """Serve ``tmp_path / 'www'`` on 127.0.0.1 from a thread; yields (www_dir, base_url)."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(www)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "home"
    monkeypatch.setenv("VISATTN_HOME", str(path))
    return path / "checkpoints"


def _publish(www: Path, model, stem: str = "tiny_mmseg") -> tuple[str, str, str]:
    """Write an mmseg-layout checkpoint; return (good name, bad name, sha256)."""
    tmp = www / "tmp.pth"
    torch.save({"meta": {"CLASSES": ("a",)}, "state_dict": to_mmseg(model.state_dict())}, tmp)
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    good, bad = f"{stem}-{digest[:8]}.pth", f"{stem}-{'0' if digest[0] != '0' else '1'}{digest[1:8]}.pth"
    (www / good).write_bytes(tmp.read_bytes())
    (www / bad).write_bytes(tmp.read_bytes())
    tmp.unlink()
    return good, bad, digest


def test_download_success_hash_error_and_nothing_half_written(server, home):
    www, base = server
    model = small("fcn")
    good, bad, digest = _publish(www, model)
    path = hub.download_checkpoint(f"{base}/{good}", progress=False)
    assert path == home / good and hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert hub.download_checkpoint(f"{base}/{good}", progress=False) == path  # cached
    with pytest.raises(hub.CheckpointError) as err:
        hub.download_checkpoint(f"{base}/{bad}", progress=False)
    msg = str(err.value)
    assert f"{base}/{bad}" in msg and str(home / bad) in msg and "hash" in msg and "checkpoint_path" in msg
    assert sorted(p.name for p in home.iterdir()) == [good]  # no partial or corrupt file left behind


def test_offline_error_names_url_and_local_path(home):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/ccnet_r50-d8-869a3423.pth"
    with pytest.raises(hub.CheckpointError) as err:
        hub.download_checkpoint(url, progress=False)
    msg = str(err.value)
    assert url in msg and str(home / "ccnet_r50-d8-869a3423.pth") in msg and "VISATTN_HOME" in msg
    assert not home.exists() or not any(home.iterdir())


def test_corrupt_file_in_cache_is_reported(server, home):
    www, base = server
    good, _, _ = _publish(www, small("fcn"))
    home.mkdir(parents=True)
    (home / good).write_bytes(b"not a checkpoint")
    with pytest.raises(hub.CheckpointError, match="does not start with"):
        hub.download_checkpoint(f"{base}/{good}", progress=False)


def test_pretrained_zoo_entry_end_to_end(server, home, tmp_path, monkeypatch):
    """A zoo index pointing at the local server: create_segmentor(name, pretrained=True) downloads,
    checks the hash, converts mmseg's keys and computes what the source model computes."""
    www, base = server
    torch.manual_seed(0)
    source = randomize_(small("ccnet"), seed=7).eval()
    good, bad, _ = _publish(www, source, stem="ccnet_tiny")
    config = {
        "backbone": "resnet10t",
        "output_stride": 8,
        "head": "ccnet",
        "num_classes": 5,
        "head_kwargs": {"channels": 16},
        "aux_kwargs": {"channels": 8},
    }
    entries = [
        {
            "name": "tiny_ccnet",
            "config": config,
            "dataset": "cityscapes",
            "url": f"{base}/{good}",
            "hash": good[-12:-4],
        },
        {
            "name": "tiny_bad",
            "config": config,
            "dataset": "cityscapes",
            "url": f"{base}/{bad}",
            "hash": bad[-12:-4],
        },
    ]
    index = tmp_path / "zoo.yaml"
    index.write_text(yaml.safe_dump({"models": entries}))
    monkeypatch.setenv("VISATTN_ZOO", str(index))
    assert hub.list_pretrained() == ["tiny_bad", "tiny_ccnet"]
    model = create_segmentor("tiny_ccnet", pretrained=True, progress=False).eval()
    x = torch.randn(1, 3, 24, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), atol=0, rtol=0)
    with pytest.raises(hub.CheckpointError, match="hash"):
        create_segmentor("tiny_bad", pretrained=True, progress=False)
    # checkpoint_path= loads a local file instead of downloading.
    local = www / good
    other = create_segmentor("tiny_bad", checkpoint_path=str(local)).eval()
    with torch.no_grad():
        torch.testing.assert_close(other(x), source(x), atol=0, rtol=0)
    with pytest.raises(hub.CheckpointError, match="does not exist"):
        create_segmentor("tiny_ccnet", checkpoint_path=str(tmp_path / "missing.pth"))
