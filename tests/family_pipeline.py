"""Shared by the model-family tests: export -> ONNX Runtime bundle -> runtime, for one small model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

PARITY_SAMPLES = 4


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Distinct, non-trivial norms and twins (a fresh model has twins equal to the main norms)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


def export_compile_run(root: Path, name: str, data_spec: str, **model_kwargs) -> dict:
    """Checkpoint (perturbed fresh weights) -> parity-gated export -> x86-host ONNX Runtime bundle ->
    ``AdaptiveModel`` prediction forced into every skip config, compared with torch.

    Returns ``{"parity": export parity record, "max_diff": max |logits torch - runtime| over configs}``.
    """
    from export.compile import compile_bundle
    from export.portable import export_checkpoint
    from runtime.bundle import Bundle
    from runtime.executor import SegmentExecutor
    from runtime.model import AdaptiveModel
    from train.checkpoint import save_checkpoint
    from train.data import load_dataset
    from train.models import create_model

    data = load_dataset(data_spec)
    torch.manual_seed(0)
    model = create_model(name, num_classes=data.num_classes, in_chans=data.in_chans, img_size=data.img_size,
                         **model_kwargs)
    perturb(model).eval()
    state = {"model_name": name, "model_config": model.model_config(), "model": model.state_dict(), "ema": None,
             "dataset": data.info(), "eval": None, "config": {"data": data_spec}}
    ckpt = save_checkpoint(state, root / f"{name}.pt")
    portable = export_checkpoint(ckpt, root / f"{name}-portable", parity_samples=PARITY_SAMPLES, progress=None)
    host = compile_bundle(portable, "x86-host", backends=["onnxruntime"], out_dir=root / f"{name}-host",
                          progress=None)
    parity = Bundle.open(portable).manifest.annotations["export"]["parity"]

    rt = AdaptiveModel.load(host, runner_options={"intra_op_threads": 1})
    ex = SegmentExecutor(Bundle.open(host), "onnx", options={"intra_op_threads": 1})
    x = torch.randn(3, data.in_chans, data.img_size, data.img_size)
    max_diff = 0.0
    with torch.no_grad():
        for cfg in Bundle.open(host).manifest.skip_configs:
            ref = [t.numpy() for t in model(x, cfg)]
            got = ex.run_exits(x.numpy(), cfg)
            max_diff = max(max_diff, max(float(np.abs(a - b).max()) for a, b in zip(got, ref)))
            preds = rt.predict(x.numpy(), skip_config=cfg, rule="full")
            probs = torch.softmax(torch.from_numpy(ref[-1]), dim=1).numpy()
            for p, ref_p in zip(preds, probs):
                assert p.exit_index == model.num_stages - 1
                np.testing.assert_allclose(p.probabilities, ref_p, atol=1e-4)
    return {"parity": parity, "max_diff": max_diff, "portable": portable, "host": host, "model": model}


def calibrate_and_profile(host: Path) -> None:
    """``pipeline calibrate`` and ``pipeline profile --quick`` on a compiled bundle; both write the manifest."""
    from click.testing import CliRunner

    from pipeline.cli import cli
    from runtime.bundle import Bundle

    r = CliRunner().invoke(cli, ["calibrate", "--bundle", str(host), "--max-drop", "5", "--rule", "max_prob",
                                 "--threads", "1", "--profile-runs", "3"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["profile", "--bundle", str(host), "--quick", "--batch", "1"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    m = Bundle.open(host, verify=True).manifest
    assert m.stopping.rule == "max_prob" and len(m.stopping.params["thresholds"]) == m.stages - 1
    assert {e.skip_config for e in m.latency if e.skip_config} == set(m.skip_configs)  # every config profiled


def tvm_matches_onnxruntime(exported: dict, out: Path) -> float:
    """Compile the first piece of ``export_compile_run``'s portable bundle with TVM for this CPU
    (untuned) and return the max |output difference| against ONNX Runtime on random inputs."""
    import onnxruntime as ort

    from export.tvm import compile_onnx
    from runtime.backends.tvm_runner import TVMPieceRunner
    from runtime.bundle import Bundle

    b = Bundle.open(exported["portable"])
    piece_id = b.manifest.execution["F" * exported["model"].num_stages][0][0]
    piece = b.manifest.piece(piece_id)
    onnx_path = b.artifact_path(piece_id, "onnx")
    art = compile_onnx(onnx_path, {"kind": "llvm"}, out / f"{piece_id}.so")
    runner = TVMPieceRunner(art.path, input_names=[t.name for t in piece.inputs],
                            output_names=[t.name for t in piece.outputs])
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {t.name: rng.standard_normal([2 if d in ("N", -1) else d for d in t.shape])
             .astype(np.float32) for t in piece.inputs}
    want = session.run([t.name for t in piece.outputs], feeds)
    got = runner.run(feeds)
    return max(float(np.abs(a - g).max()) for a, g in zip(want, got))
