"""The package as a user installs it (issue 19): build the sdist and wheel, install the wheel into a fresh
venv with no checkout on its path, and use it from there.

The fresh venv sees the packages of the test environment (torch, timm, ...) through a folder of links to
them that leaves out visattn's own editable install, so the only visattn it can import is the wheel's;
it runs from a temporary working directory with PYTHONPATH unset, and every step checks that
``visattn.__file__`` lies inside the new venv. The smoke steps are ``@pytest.mark.slow`` (about a minute;
.ci/run runs them after the main suite); the checks that the package data is wired to the repository's
one copy are fast.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import visattn
from visattn import hub
from visattn.engine.config import demo_config_path

REPO = Path(__file__).resolve().parents[1]
ZOO_SIZE = 31


# -- fast: the package data is the repository's one copy ------------------------------------------------
def test_package_data_links_to_the_repository_files():
    data = Path(visattn.__file__).parent / "_data"
    assert (data / "model_zoo").is_symlink() and (data / "demo.yaml").is_symlink()
    assert (data / "model_zoo").resolve() == (REPO / "model_zoo").resolve()
    assert (data / "demo.yaml").resolve() == (REPO / "configs" / "demo.yaml").resolve()
    assert hub.zoo_file().resolve() == (REPO / "model_zoo" / "segmentation.yaml").resolve()
    assert demo_config_path().resolve() == (REPO / "configs" / "demo.yaml").resolve()
    assert len(hub.list_pretrained()) == ZOO_SIZE


def test_missing_package_data_names_the_file(monkeypatch, tmp_path):
    import importlib.resources

    monkeypatch.setattr(importlib.resources, "files", lambda package: tmp_path)
    with pytest.raises(FileNotFoundError, match=r"_data/demo\.yaml is missing .*reinstall visattn"):
        demo_config_path()


# -- slow: build, install into a clean venv, use -------------------------------------------------------------
def _run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600) -> str:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {done.returncode}\n"
            f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"
        )
    return done.stdout


def _source_tree(dest: Path) -> Path:
    """The files git would commit (tracked plus untracked, not ignored), symbolic links kept as links."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.fail("the wheel test builds from the git checkout's files; run it in a git checkout")
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO)
    for rel in filter(None, listed.split("\0")):
        src, dst = REPO / rel, dest / rel
        if not src.exists() and not src.is_symlink():
            continue  # deleted in the work tree, not yet in a commit
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            dst.symlink_to(os.readlink(src))
        else:
            shutil.copy2(src, dst)
    return dest


def _visible_site_packages(dest: Path) -> Path:
    """A folder of links to this environment's installed packages, without visattn's own install."""
    site = Path(sysconfig.get_paths()["purelib"])
    dest.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("visattn", "__editable__")) or name.endswith(".pth") or "visattn" in name:
            continue
        (dest / entry.name).symlink_to(entry)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Build sdist + wheel (the wheel from the sdist, as ``python -m build`` does), install the wheel into a
    fresh venv with --no-deps; returns the paths and the environment to run it with."""
    root = tmp_path_factory.mktemp("wheel")
    src = _source_tree(root / "src")
    dist = root / "dist"
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)], cwd=root)
    venv = root / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=root)
    python = venv / "bin" / "python"
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root
    ).strip()
    visible = _visible_site_packages(root / "visible")
    # After the venv's own site-packages: the wheel's visattn comes first, the rest is found here.
    (Path(purelib) / "zz_test_env.pth").write_text(str(visible) + "\n")
    wheel = next(dist.glob("visattn-*.whl"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1")
    env["VISATTN_HOME"] = str(root / "home")  # no checkpoint cache of the machine leaks in
    env.pop("VISATTN_ZOO", None)
    # This environment's pip installs into the venv (which has none of its own: faster, and nothing else).
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        cwd=root,
        env=env,
    )
    work = root / "cwd"
    work.mkdir()
    return {
        "root": root,
        "dist": dist,
        "wheel": wheel,
        "venv": venv,
        "python": python,
        "env": env,
        "cwd": work,
    }


def _py(installed, code: str) -> str:
    preamble = (
        "import visattn, pathlib, sys\n"
        f"assert pathlib.Path(visattn.__file__).resolve().is_relative_to(pathlib.Path({str(installed['venv'])!r}).resolve()), visattn.__file__\n"
        f"assert not any(p and pathlib.Path(p).resolve() == pathlib.Path({str(REPO)!r}) for p in sys.path)\n"
    )
    return _run([str(installed["python"]), "-c", preamble + code], cwd=installed["cwd"], env=installed["env"])


@pytest.mark.slow
def test_wheel_carries_the_run_time_data_and_metadata(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert "visattn/_data/model_zoo/segmentation.yaml" in names and "visattn/_data/demo.yaml" in names
    assert "visattn/viz/explorer.html" in names and "visattn/viz/bench_facts.json" in names
    with zipfile.ZipFile(installed["wheel"]) as whl:
        zoo = whl.read("visattn/_data/model_zoo/segmentation.yaml")
        meta = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert zoo == (REPO / "model_zoo" / "segmentation.yaml").read_bytes()  # a copy of the one source
    sdist = next(installed["dist"].glob("visattn-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        assert any(n.endswith("model_zoo/segmentation.yaml") for n in tar.getnames())
    assert f"Version: {visattn.__version__}" in meta and "License-Expression: Apache-2.0" in meta
    assert "License-File: LICENSE" in meta and any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "Classifier: Programming Language :: Python :: 3" in meta
    for extra in ("bench", "export", "smp", "viz", "dev"):
        assert f"Provides-Extra: {extra}" in meta
    out = _run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, installed["dist"].iterdir())],
        cwd=installed["root"],
    )
    assert out.count("PASSED") == 2


@pytest.mark.slow
def test_installed_wheel_lists_the_zoo_and_builds_zoo_models(installed):
    out = _py(
        installed,
        "from visattn import hub\n"
        "from visattn.engine.config import demo_config_path\n"
        "names = hub.list_pretrained()\n"
        "m = visattn.create_segmentor(names[0], backbone='resnet18')\n"
        "print(len(names), demo_config_path().is_file(), hub.zoo_file().is_relative_to(pathlib.Path(visattn.__file__).parent))\n",
    )
    assert out.split() == [str(ZOO_SIZE), "True", "True"]
    listed = _run(["visattn", "list"], cwd=installed["cwd"], env=installed["env"])
    assert "ccnet" in listed and "performer" in listed


@pytest.mark.slow
def test_installed_wheel_trains_the_demo_predicts_and_shares(installed):
    work = installed["root"] / "run"
    overrides = [
        "train.iters=2",
        "train.batch_size=2",
        "train.log_interval=1",
        "train.ckpt_interval=2",
        "train.eval_interval=2",
        "data.synthetic.train_length=8",
        "data.synthetic.val_length=2",
    ]
    _run(
        ["visattn", "train", "--no-progress", "--work-dir", str(work), "--set", *overrides],
        cwd=installed["cwd"],
        env=installed["env"],
    )
    result = json.loads((work / "eval.json").read_text())
    assert isinstance(result["mIoU"], float)
    image = installed["root"] / "image.png"
    _py(
        installed,
        "import numpy as np\nfrom PIL import Image\n"
        f"Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save({str(image)!r})\n",
    )
    out_png = installed["root"] / "pred.png"
    _run(
        [
            "visattn",
            "predict",
            str(work / "config.yaml"),
            str(image),
            "--checkpoint",
            str(work),
            "-o",
            str(out_png),
        ],
        cwd=installed["cwd"],
        env=installed["env"],
    )
    _py(
        installed,
        "from PIL import Image\n"
        f"assert Image.open({str(out_png)!r}).size == (56, 40)\n"
        # The trained model shared and loaded back from the installed package.
        "import torch, yaml\n"
        "from visattn.engine.checkpoint import load_weights\n"
        f"cfg = yaml.safe_load(open({str(work / 'config.yaml')!r}))['model']\n"
        "m = visattn.create_segmentor(cfg).eval()\n"
        f"load_weights(m, {str(work)!r})\n"
        f"m.save_pretrained({str(installed['root'] / 'shared')!r}, run_dir={str(work)!r})\n"
        f"m2 = visattn.create_segmentor('local-dir:' + {str(installed['root'] / 'shared')!r}).eval()\n"
        "x = torch.rand(1, 3, 40, 56)\n"
        "with torch.no_grad(): assert torch.equal(m(x), m2(x))\n",
    )
    assert "mIoU" in (installed["root"] / "shared" / "README.md").read_text()


@pytest.mark.slow
def test_installed_wheel_visualises_a_block_on_a_photo(installed):
    """Issue 20's acceptance command from the installed package (viz extra: scikit-image's bundled photo)."""
    pytest.importorskip("skimage")
    out_png = installed["root"] / "ccnet.png"
    _run(
        ["visattn", "viz", "ccnet", "--image", "astronaut", "--query", "100,80", "-o", str(out_png)],
        cwd=installed["cwd"],
        env=installed["env"],
    )
    _py(installed, f"from PIL import Image\nassert Image.open({str(out_png)!r}).size[0] > 100\n")
