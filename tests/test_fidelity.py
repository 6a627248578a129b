"""bench/fidelity.py: per-block relative residual increments ||F(h)|| / ||h|| (docs/fidelity.md)."""
from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch

from conftest import ROOT
from train.models import create_model


def _load_fidelity():
    spec = importlib.util.spec_from_file_location("bench_fidelity", ROOT / "bench" / "fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fidelity = _load_fidelity()
N_IMAGES, SIZE = 6, 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # zero_init_residual=False: with the default every last BN gamma is 0, so F(h) = 0 exactly.
    return create_model("resnet20_adn", num_classes=10, in_chans=1, img_size=SIZE,
                        zero_init_residual=False).eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(N_IMAGES, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def result(model, images):
    return fidelity.measure_increments(model, images, batch_size=4)  # two batches, the last partial


def test_every_block_of_every_stage_with_its_role(model, result):
    blocks = result["blocks"]
    assert len(result["stages"]) == model.num_stages
    for k in range(model.num_stages):
        n_mand, n_skip = model.splits[k]
        mine = [b for b in blocks if b["stage"] == k]
        assert [b["block"] for b in mine] == list(range(len(model.stage(k))))
        assert [b["role"] for b in mine] == ["mandatory"] * n_mand + ["skippable"] * n_skip
        assert [b["downsample"] for b in mine] == [model.stage(k)[i].downsample is not None
                                                   for i in range(len(mine))]
        s = result["stages"][k]
        assert (s["n_mandatory"], s["n_skippable"]) == (n_mand, n_skip)
        assert s["skippable_over_mandatory"] == pytest.approx(s["skippable_mean"] / s["mandatory_mean"])
        assert s["mandatory_mean"] == pytest.approx(np.mean([b["mean"] for b in mine if b["role"] == "mandatory"]))


def test_ratios_are_per_image_finite_and_positive(result):
    for b in result["blocks"]:
        for key in ("ratios", "ratios_out"):
            r = b[key]
            assert r.shape == (N_IMAGES,)
            assert np.isfinite(r).all() and (r > 0).all()
        assert b["mean"] == pytest.approx(b["ratios"].mean())
        assert b["std"] == pytest.approx(b["ratios"].std())


def _by_hand(model, x, stage, index):
    """||F(h)|| / ||h|| of one block, recomputed from the block's own layers."""
    with torch.no_grad():
        h = model.forward_stem(x)
        for k in range(stage):
            h = model.forward_stage(k, h, False)
        layer = model.stage(stage)
        for i in range(index):
            h = layer[i](h)
        blk = layer[index]
        branch = blk.bn2(blk.conv2(torch.relu(blk.bn1(blk.conv1(h)))))
        identity = h if blk.downsample is None else blk.downsample(h)
        return (branch.flatten(1).norm(dim=1) / identity.flatten(1).norm(dim=1)).numpy()


@pytest.mark.parametrize("stage,index", [(0, 2), (1, 0), (2, 1)])
def test_matches_a_hand_computation(model, images, result, stage, index):
    got = next(b for b in result["blocks"] if (b["stage"], b["block"]) == (stage, index))
    np.testing.assert_allclose(got["ratios"], _by_hand(model, images, stage, index), rtol=1e-4)


def test_skippable_block_agrees_with_the_models_return_increments(model, images, result):
    with torch.no_grad():
        _, increments = model(images, return_increments=True)
    for k, inc in enumerate(increments):
        (skip_block,) = [b for b in result["blocks"] if b["stage"] == k and b["role"] == "skippable"]
        np.testing.assert_allclose(result["subpath_increments"][k], inc.numpy(), rtol=1e-5)
        np.testing.assert_allclose(skip_block["ratios_out"], inc.numpy(), rtol=1e-4)


def test_zero_init_residual_gives_exactly_zero(images):
    torch.manual_seed(0)
    m = create_model("resnet20_adn", num_classes=10, in_chans=1, img_size=SIZE).eval()
    res = fidelity.measure_increments(m, images)
    assert all((b["ratios"] == 0).all() for b in res["blocks"])
    assert all(math.isnan(s["skippable_over_mandatory"]) for s in res["stages"])


def test_measurement_leaves_the_model_as_it_was(model, images):
    model.train()
    try:
        fidelity.measure_increments(model, images[:2])
        assert model.training
        assert not any(m._forward_hooks for m in model.modules())
    finally:
        model.eval()


def test_script_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "f.json", tmp_path / "f.png"
    rc = fidelity.main(["--init", "--data", "synthetic:classes=3,chans=1,size=16,test=10,train=30",
                        "--images", "8", "--batch-size", "5", "--json", str(out), "--plot", str(png)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["images"] == 8 and doc["skip"] == "FFF"
    init = doc["models"]["init"]
    assert len(init["blocks"]) == 9 and len(init["stages"]) == 3
    assert png.stat().st_size > 0
    printed = capsys.readouterr().out
    assert "init stage 2: mandatory" in printed
