"""visattn export of segmentors with real weights (issue 18): zoo names, configs with --checkpoint and
checkpoints in any form, dynamic H, W checked at a second size, parity never on an identity graph."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn as nn
import yaml

import visattn
from visattn import cli, export
from visattn.engine.checkpoint import save_checkpoint
from visattn.models.segmentor import build_segmentor

ort = pytest.importorskip("onnxruntime")

# Small enough to export in seconds on a shared 2-core CPU; the ccnet head holds an identity-at-init block.
TINY = {
    "backbone": "resnet10t",
    "head": "ccnet",
    "num_classes": 3,
    "aux": False,
    "head_kwargs": {"channels": 8},
}


def _trained_like(cfg=TINY):
    """A tiny segmentor whose weights are off their initialisation, as after training (gamma != 0)."""
    torch.manual_seed(0)
    return export.perturbed(build_segmentor(cfg), seed=3)


def _work_dir(tmp_path):
    """A visattn run folder: config.yaml (the train config) beside iter_5.safetensors / .state.pt."""
    model = _trained_like()
    work = tmp_path / "run"
    work.mkdir()
    (work / "config.yaml").write_text(yaml.safe_dump({"model": TINY}))
    save_checkpoint(work, model, {"iteration": 5}, "iter_5")
    return work, model


def test_checkpoint_exports_with_dynamic_hw_and_its_weights(tmp_path, capsys):
    """A checkpoint prefix exports (the old exporter failed: dynamic_shapes key x vs argument images); the
    ONNX graph takes any H, W >= 9 and equals the checkpoint's model at a size it was not traced at."""
    work, model = _work_dir(tmp_path)
    out = tmp_path / "seg.onnx"
    assert cli.main(["export", str(work / "iter_5"), "-o", str(out), "--size", "40x48", "--batch", "1"]) == 0
    text = capsys.readouterr().out
    assert f"weights: checkpoint {work / 'iter_5.safetensors'}" in text
    assert "dynamic H, W (>= 9" in text and "on the exported weights" in text
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    dims = session.get_inputs()[0].shape
    assert isinstance(dims[2], str) and isinstance(dims[3], str)  # symbolic H, W
    x = torch.randn(1, 3, 33, 57, generator=torch.Generator().manual_seed(5))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        ref = model.eval()(x)
    assert ref.abs().max() > 1e-2  # a real output, not zeros
    torch.testing.assert_close(torch.from_numpy(got), ref, atol=1e-4, rtol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "seg.onnx"]  # no temporary file left


def test_zoo_name_exports_its_pretrained_checkpoint(tmp_path, monkeypatch, capsys):
    """A zoo name exports the zoo checkpoint (here already in the cache, as after a download) and says so."""
    model = _trained_like()
    blob = tmp_path / "blob.pth"
    torch.save(model.state_dict(), blob)
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()[:8]
    file_name = f"tiny_seg-{digest}.pth"
    (tmp_path / "home" / "checkpoints").mkdir(parents=True)
    blob.rename(tmp_path / "home" / "checkpoints" / file_name)
    zoo = {"models": [{"name": "tiny_seg", "config": TINY, "url": f"https://example.invalid/{file_name}"}]}
    (tmp_path / "zoo.yaml").write_text(yaml.safe_dump(zoo))
    monkeypatch.setenv("VISATTN_ZOO", str(tmp_path / "zoo.yaml"))
    monkeypatch.setenv("VISATTN_HOME", str(tmp_path / "home"))
    out = tmp_path / "seg.pt2"
    argv = ["export", "tiny_seg", "-o", str(out), "--format", "export", "--size", "40x48", "--batch", "1"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    text = captured.out
    assert "pretrained zoo checkpoint" in text and file_name in text and "on the exported weights" in text
    # torch.export.save cannot serialise this program's symbolic math.ceil: a fixed size, said so.
    assert "note: fixed size 40x48: the dynamic export failed" in captured.err
    assert "(torch.export program, fixed size 40x48)" in text
    program = torch.export.load(str(out))
    x = torch.randn(1, 3, 40, 48, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model.eval()(x), atol=1e-5, rtol=1e-5)


def test_a_model_without_weights_is_refused_unless_asked(tmp_path, capsys):
    """No weights and no --random-weights: one error naming both options, nothing written."""
    cfg = tmp_path / "seg.yaml"
    cfg.write_text(yaml.safe_dump({"model": TINY}))
    out = tmp_path / "seg.onnx"
    for name in (str(cfg), "resnet10t"):
        assert cli.main(["export", name, "-o", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--checkpoint PATH" in err and "--random-weights" in err, err
    # A dynamic export below the smallest size the strides allow is refused before any work.
    assert cli.main(["export", str(cfg), "-o", str(out), "--random-weights", "--size", "8x40"]) == 2
    assert "needs H, W >= 9" in capsys.readouterr().err
    assert not out.exists()


class _SneakyIdentity(nn.Module):
    """Identity at initialisation (gamma = 0), but its exported graph flips the sign of the attention
    branch: eager and exported agree only while gamma is 0, as an export bug hidden by identity init."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(4, 4, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        y = self.proj(x)
        if torch.compiler.is_exporting():
            y = -y
        return x + self.gamma * y


@pytest.mark.parametrize("fmt", ["onnx", "export"])
def test_parity_is_checked_off_the_identity(tmp_path, fmt):
    """The old check compared the identity-at-init module with itself (x with x) and passed; checking a
    perturbed copy catches the wrong graph, and nothing is written."""
    module = _SneakyIdentity().eval()
    x = torch.randn(2, 4, 6, 5)
    with torch.no_grad():
        assert torch.equal(module(x), x)
    out = tmp_path / f"sneaky.{'onnx' if fmt == 'onnx' else 'pt2'}"
    exp = export.Exportable(module, "block", None, 4)
    with pytest.raises(export.ExportMismatchError, match="nothing was written"):
        export.export_to_file(exp, out, size=(6, 5), fmt=fmt)
    assert list(tmp_path.iterdir()) == []
    assert float(module.gamma) == 0.0  # the module itself was not perturbed


def test_perturbed_moves_an_identity_block_and_leaves_the_original():
    block = visattn.create_attn("ccnet", 8).eval()
    before = {k: v.clone() for k, v in block.state_dict().items()}
    x = torch.randn(1, 8, 5, 6)
    copy = export.perturbed(block)
    with torch.no_grad():
        assert torch.equal(block(x), x)
        assert (copy(x) - x).abs().max() > 1e-3
    assert all(torch.equal(before[k], v) for k, v in block.state_dict().items())
