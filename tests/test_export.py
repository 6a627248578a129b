"""Checkpoint -> portable bundle: segments, ONNX export, parity gate, manifest, CLI."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from export.parity import ParityError
from export.portable import export_checkpoint, load_parity_images, normalize
from export.segments import segment_plan
from runtime.bundle import Bundle
from runtime.executor import SegmentExecutor
from train.checkpoint import model_from_checkpoint, save_checkpoint
from train.data import load_dataset
from train.models import create_model, macs_per_exit, piece_macs

PARITY_SAMPLES = 12

# model family -> (model, synthetic dataset spec: channels and image size)
FAMILIES = {
    "resnet_cifar": ("resnet20_adn", "synthetic:chans=1,size=28"),
    "resnet": ("resnet18_adn", "synthetic:chans=3,size=32,classes=5"),
    "vit": ("vit_tiny_adn", "synthetic:chans=1,size=28"),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Single-threaded torch: deterministic and immune to oversubscription on shared 2-core boxes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Make every norm (and its skip-aware twin) distinct and non-trivial, like a trained model.

    A freshly initialised model has twin norms equal to the main ones and zero-initialised
    residual branches, which would let a mix-up of skip variants pass unnoticed.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            if m.weight is not None:
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


def make_checkpoint(path: Path, model_name: str, data_spec: str, seed: int = 0) -> Path:
    """A checkpoint laid out like Trainer._state (fresh weights, perturbed norms, eval None)."""
    data = load_dataset(data_spec)
    torch.manual_seed(seed)
    model = create_model(model_name, num_classes=data.num_classes, in_chans=data.in_chans,
                         img_size=data.img_size)
    perturb(model, seed)
    state = {"model_name": model_name, "model_config": model.model_config(), "model": model.state_dict(),
             "ema": None, "dataset": data.info(), "eval": None, "config": {"data": data_spec}}
    return save_checkpoint(state, path)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (checkpoint, bundle dir); exported once per module (lazily per family)."""
    root = tmp_path_factory.mktemp("export")
    cache: dict[str, tuple[Path, Path]] = {}

    def get(family: str) -> tuple[Path, Path]:
        if family not in cache:
            name, spec = FAMILIES[family]
            ckpt = make_checkpoint(root / f"{name}.pt", name, spec)
            out = export_checkpoint(ckpt, root / f"{name}-bundle", parity_samples=PARITY_SAMPLES,
                                    progress=None)
            cache[family] = (ckpt, out)
        return cache[family]

    return get


def real_inputs(ckpt: Path, n: int) -> tuple[torch.nn.Module, torch.Tensor]:
    model, state = model_from_checkpoint(ckpt)
    images, _ = load_parity_images(state, n)
    return model, normalize(images, state["dataset"]["mean"], state["dataset"]["std"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_exports_with_parity_and_runs_every_config(exported, family):
    ckpt, out = exported(family)
    bundle = Bundle.open(out)
    m = bundle.manifest
    model, x = real_inputs(ckpt, 5)
    S = model.num_stages
    assert m.stages == S and len(m.skip_configs) == 2 ** S and len(m.pieces) == 2 * S
    assert m.device is None and m.stopping.rule is None and m.latency == []
    parity = m.annotations["export"]["parity"]
    assert parity["max_logits_diff_chained"] <= 1e-4
    for piece_id, diffs in parity["max_diff_per_piece"].items():
        assert diffs["logits"] <= 1e-4, piece_id
    # every skip config from the bundle alone, at batch 1 and 5, against the torch model
    ex = SegmentExecutor(bundle, "onnx", options={"intra_op_threads": 1})
    with torch.no_grad():
        for cfg in m.skip_configs:
            ref = [t.numpy() for t in model(x, cfg)]
            got5 = ex.run_exits(x.numpy(), cfg)
            got1 = ex.run_exits(x[:1].numpy(), cfg)
            for k in range(S):
                assert got5[k].shape == (5, model.num_classes)
                assert np.abs(got5[k] - ref[k]).max() <= 1e-4, (cfg, k)
                assert np.abs(got1[k] - ref[k][:1]).max() <= 1e-4, (cfg, k)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_onnx_files_checked_opset_and_dynamic_batch(exported, family):
    import onnx

    _, out = exported(family)
    bundle = Bundle.open(out)
    for piece in bundle.manifest.pieces:
        path = bundle.artifact_path(piece.id, "onnx", "portable")
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
        assert not any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
        for vi in list(model.graph.input) + list(model.graph.output):
            dims = vi.type.tensor_type.shape.dim
            assert dims[0].dim_param == "N", (piece.id, vi.name)
            assert all(d.dim_value > 0 for d in list(dims)[1:]), (piece.id, vi.name)
        assert [t.name for t in piece.inputs] == [i.name for i in model.graph.input]
        assert [t.name for t in piece.outputs] == [o.name for o in model.graph.output]
        assert piece.inputs[0].shape[0] == "N"


def test_manifest_describes_model_and_source(exported):
    ckpt, out = exported("resnet_cifar")
    m = Bundle.open(out).manifest
    model, state = model_from_checkpoint(ckpt)
    import hashlib
    assert m.source.checkpoint_sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert m.source.metrics["evaluated"] is False
    assert m.model.name == "resnet20_adn" and m.model.family == "resnet_cifar"
    assert m.model.params == sum(p.numel() for p in model.parameters())
    assert m.input.shape == [1, 28, 28] and m.input.name == "x"
    assert m.input.mean == pytest.approx(state["dataset"]["mean"])
    assert m.class_names == state["dataset"]["class_names"]
    ids = {p.id for p in m.pieces}
    assert ids == {f"stage{k}.{v}" for k in range(3) for v in ("full", "skip")}
    assert m.execution["FTF"] == [["stage0.full"], ["stage1.skip"], ["stage2.full"]]
    # MACs per piece from train.models.macs: cumulative = macs_per_exit + the earlier heads
    pm = piece_macs(model)
    for cfg in ("FFF", "TTT", "FTF"):
        per_exit = macs_per_exit(model, cfg, pieces=pm)
        for k in range(3):
            assert m.cumulative_macs(cfg, k) == per_exit[k] + sum(pm["head"][:k])
    full, skip = m.piece("stage1.full"), m.piece("stage1.skip")
    assert 0 < skip.params < full.params and 0 < skip.macs < full.macs
    assert all(a.backend == "onnx" and a.target == "portable" for p in m.pieces for a in p.artifacts)


def test_split_granularity_runs_every_config(tmp_path):
    name, spec = FAMILIES["resnet_cifar"]
    ckpt = make_checkpoint(tmp_path / "c.pt", name, spec, seed=1)
    out = export_checkpoint(ckpt, tmp_path / "split", parity_samples=6, granularity="split", progress=None)
    bundle = Bundle.open(out)
    assert len(bundle.manifest.pieces) == 4 * 3
    assert bundle.manifest.execution["FT" + "F"][1] == ["stage1.mandatory_skipnorm", "head1"]
    model, x = real_inputs(ckpt, 3)
    m = bundle.manifest
    # params per piece agree with train.models.macs.params_per_exit along a path
    from train.models import params_per_exit
    for cfg in ("FFF", "TTT", "TFT"):
        path = sum(m.piece(f"stage{k}.mandatory_skipnorm").params if c == "T" else
                   m.piece(f"stage{k}.mandatory").params + m.piece(f"stage{k}.skippable").params
                   for k, c in enumerate(cfg))
        assert path + m.piece("head2").params == params_per_exit(model, cfg)[-1], cfg
    pm = piece_macs(model)
    assert m.cumulative_macs("TTT", 2) == macs_per_exit(model, "TTT", pieces=pm)[2] + sum(pm["head"][:2])
    ex = SegmentExecutor(bundle, "onnx", options={"intra_op_threads": 1})
    with torch.no_grad():
        for cfg in bundle.manifest.skip_configs:
            for got, ref in zip(ex.run_exits(x.numpy(), cfg), model(x, cfg)):
                assert np.abs(got - ref.numpy()).max() <= 1e-4


def test_segments_come_from_the_base_class_methods():
    """A new model family needs only the AdaptiveDepthNet methods: a toy 2-stage MLP-ish net."""
    from train.models.base import AdaptiveDepthNet

    class Toy(AdaptiveDepthNet):
        def __init__(self):
            super().__init__()
            self.num_stages, self.num_classes, self.in_chans, self.img_size = 2, 3, 1, 4
            self.stem = nn.Conv2d(1, 4, 3, padding=1)
            self.mand = nn.ModuleList(nn.Conv2d(4, 4, 3, padding=1) for _ in range(2))
            self.twin = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(2))
            self.main = nn.ModuleList(nn.BatchNorm2d(4) for _ in range(2))
            self.skip = nn.ModuleList(nn.Conv2d(4, 4, 1) for _ in range(2))
            self.heads = nn.ModuleList(nn.Linear(4, 3) for _ in range(2))

        def forward_stem(self, x):
            return self.stem(x)

        def forward_mandatory(self, k, h, skipping):
            return torch.relu((self.twin if skipping else self.main)[k](self.mand[k](h)))

        def forward_skippable(self, k, h):
            return h + self.skip[k](h)

        def forward_head(self, k, h):
            return self.heads[k](h.mean((2, 3)))

    model = perturb(Toy()).eval()
    x = torch.randn(3, 1, 4, 4)
    for granularity in ("stage", "split"):
        plan = segment_plan(2, granularity)
        from export.segments import run_plan_torch
        for cfg in plan.execution:
            got, _ = run_plan_torch(model, plan, x, cfg)
            ref = model(x, cfg)
            assert all(torch.equal(a, b) for a, b in zip(got, ref)), (granularity, cfg)


def test_forced_piece_parity_failure_fails_loudly(tmp_path, monkeypatch):
    import export.parity as parity

    name, spec = FAMILIES["resnet_cifar"]
    ckpt = make_checkpoint(tmp_path / "c.pt", name, spec)
    real = parity.torch_piece_outputs

    def wrong(model, plan, piece_id, h):
        outs = real(model, plan, piece_id, h)
        if piece_id == "stage1.skip":
            outs[-1] = outs[-1] + 1e-3
        return outs

    monkeypatch.setattr(parity, "torch_piece_outputs", wrong)
    with pytest.raises(ParityError, match=r"stage1\.skip.*logits.*1e-03|stage1\.skip.*logits") as err:
        export_checkpoint(ckpt, tmp_path / "out", parity_samples=4, progress=None)
    assert err.value.piece == "stage1.skip" and err.value.diff > 1e-4
    assert not (tmp_path / "out").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]  # temp dir cleaned up


def test_forced_chained_parity_failure_names_config_and_exit(tmp_path, monkeypatch):
    import export.parity as parity

    name, spec = FAMILIES["resnet_cifar"]
    ckpt = make_checkpoint(tmp_path / "c.pt", name, spec)
    real = parity.reference_exits

    def wrong(model, x, cfg):
        outs = real(model, x, cfg)
        if cfg == "FTF":
            outs[2] = outs[2] * 1.01 + 0.01
        return outs

    monkeypatch.setattr(parity, "reference_exits", wrong)
    with pytest.raises(ParityError, match=r"skip config FTF exit 2") as err:
        export_checkpoint(ckpt, tmp_path / "out", parity_samples=4, progress=None)
    assert (err.value.config, err.value.exit) == ("FTF", 2)
    assert not (tmp_path / "out").exists()


def test_export_argument_errors(tmp_path, exported):
    ckpt, out = exported("resnet_cifar")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        export_checkpoint(tmp_path / "missing.pt", tmp_path / "o", progress=None)
    with pytest.raises(ValueError, match="opset"):
        export_checkpoint(ckpt, tmp_path / "o", opset=16, progress=None)
    with pytest.raises(ValueError, match="already exists"):
        export_checkpoint(ckpt, out, progress=None)
    with pytest.raises(ValueError, match="granularity"):
        export_checkpoint(ckpt, tmp_path / "o", granularity="block", progress=None)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        export_checkpoint(tmp_path / "junk.pt", tmp_path / "o", progress=None)


def test_cli_export_end_to_end_and_bad_inputs(tmp_path, exported):
    from pipeline.cli import cli

    ckpt, _ = exported("resnet_cifar")
    runner = CliRunner()
    out = tmp_path / "cli-bundle"
    result = runner.invoke(cli, ["export", "--checkpoint", str(ckpt), "--out", str(out), "--opset", "17",
                                 "--parity-samples", "4", "--archive"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "parity" in result.output and "stage2.skip" in result.output
    assert Bundle.open(out).manifest.model.name == "resnet20_adn"
    assert (tmp_path / "cli-bundle.tar.gz").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["device"] is None and len(manifest["execution"]) == 8

    for args, needle in [
        (["export", "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x")], "nope.pt"),
        (["export", "--checkpoint", str(ckpt), "--out", str(out)], "already exists"),
        (["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "y"), "--opset", "13"], "opset"),
    ]:
        result = runner.invoke(cli, args)
        assert result.exit_code != 0, args
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
        assert needle in result.output, (args, result.output)
        assert lines[-1].startswith("Error:") or "Error:" in lines[-1], result.output
