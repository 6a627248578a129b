"""Norm statistics per skip path (train/path_norms.py) and the pieces that carry them: the
statistics are each path's own, the export cuts one piece per path and its chained exits equal
the path's own forward pass, the manifest refuses a plan that runs a piece off its path, and
the runtime (segments, spans, merged pieces, the router) runs the path it was asked for."""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

from train.data import load_dataset
from train.data.augment import normalize_batch
from train.models import create_model
from train.path_norms import (attach_path_models, has_batch_norms, load_path_stats,
                              model_for_path, path_norm_stats)

DATA = "synthetic:chans=1,size=28"
CONFIGS = ["FFF", "FFT", "FTF", "FTT", "TFF", "TFT", "TTF", "TTT"]


@pytest.fixture(scope="module")
def data():
    return load_dataset(DATA)


def perturbed_model(data):
    torch.manual_seed(0)
    model = create_model("resnet20_adn", num_classes=data.num_classes, in_chans=1, img_size=28)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-like norms, so the paths' features differ
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def stats(data):
    model = perturbed_model(data)
    return model, path_norm_stats(model, data.train.images[:96], data.mean, data.std,
                                  batch_size=32)


def test_statistics_are_each_paths_own(data, stats):
    model, per_path = stats
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert sorted(per_path) == CONFIGS
    # by hand: the input of stage 2's first norm along FTF and along TTF (same stage-2 variant,
    # different paths before it), every norm normalising with its batch's statistics as in
    # training; the running figures average the three batches of 32
    work = copy.deepcopy(model)
    for m in work.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
    first_bn = next(m for m in work.stage(2).modules() if isinstance(m, nn.BatchNorm2d))
    name = next(n for n, m in work.named_modules() if m is first_bn)
    seen = []
    hook = first_bn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    for cfg in ("FTF", "TTF"):
        seen.clear()
        with torch.no_grad():
            for j in range(0, 96, 32):
                work(normalize_batch(data.train.images[j:j + 32], data.mean, data.std), skip=cfg)
        mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in seen]).mean(0)
        var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in seen]).mean(0)
        assert torch.allclose(per_path[cfg][f"{name}.running_mean"], mean, atol=1e-4), cfg
        assert torch.allclose(per_path[cfg][f"{name}.running_var"], var, rtol=1e-3,
                              atol=1e-4), cfg
    hook.remove()
    assert not torch.allclose(per_path["FTF"][f"{name}.running_mean"],
                              per_path["TTF"][f"{name}.running_mean"])
    # stage 0's statistics depend on stage 0's letter only
    stem_and_0 = [k for k in per_path["FFF"] if k.startswith(("bn1.", "layer1."))]
    assert stem_and_0
    for k in stem_and_0:
        assert torch.equal(per_path["FFF"][k], per_path["FTT"][k]), k
    # the model itself is unchanged
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_model_for_path_runs_the_path_with_its_statistics(data, stats):
    model, per_path = stats
    m = attach_path_models(perturbed_model(data), per_path)
    x = normalize_batch(data.val.images[:16], data.mean, data.std)
    for cfg in ("FTF", "TFT"):
        want = load_path_stats(perturbed_model(data), per_path[cfg])
        with torch.no_grad():
            for a, b in zip(model_for_path(m, cfg)(x, skip=cfg), want(x, skip=cfg)):
                assert torch.equal(a, b)
    # a prefix picks a configuration that starts with it; None and plain models give the model
    assert model_for_path(m, "TF") is m.path_models["TFF"]
    assert model_for_path(m, None) is m and model_for_path(model, "FT") is model
    with pytest.raises(KeyError, match="no skip configuration starts with path 'FX'"):
        model_for_path(m, "FX")
    with pytest.raises(ValueError, match="every skip configuration"):
        attach_path_models(perturbed_model(data), {"FFF": per_path["FFF"]})
    with pytest.raises(KeyError, match="lack"):
        load_path_stats(perturbed_model(data), {})


def test_a_model_without_batch_norms_is_refused(data):
    vit = create_model("vit_tiny_adn", num_classes=10, in_chans=1, img_size=28) \
        if "vit_tiny_adn" in _model_names() else None
    if vit is None:
        pytest.skip("no ViT in the registry")
    assert not has_batch_norms(vit)
    with pytest.raises(ValueError, match="no BatchNorm"):
        path_norm_stats(vit, data.train.images[:8], data.mean, data.std)


def _model_names() -> set[str]:
    from train.models import list_models
    return {m.name for m in list_models()}


@pytest.fixture(scope="module")
def per_path_bundle(data, stats, tmp_path_factory):
    """A portable bundle exported from a checkpoint with per-path statistics."""
    from export.portable import export_checkpoint
    from train.checkpoint import save_checkpoint

    model, per_path = stats
    tmp = tmp_path_factory.mktemp("per-path")
    state = {"model_name": "resnet20_adn", "model_config": model.model_config(),
             "model": model.state_dict(), "ema": None, "dataset": data.info(), "eval": None,
             "config": {"data": DATA}, "path_norms": {"stats": per_path, "images": 96}}
    ckpt = save_checkpoint(state, tmp / "model.pt")
    return export_checkpoint(ckpt, tmp / "bundle", parity_samples=4, progress=None)


def test_export_cuts_one_piece_per_path(per_path_bundle, data, stats):
    from runtime.bundle import Bundle
    from runtime.model import AdaptiveModel

    m = Bundle.open(per_path_bundle, verify=True).manifest
    assert m.per_path and m.schema_version == 3
    assert len(m.pieces) == 2 + 4 + 8
    assert m.execution["FTF"] == [["stage0.full"], ["stage1.skip.F"], ["stage2.full.FT"]]
    assert m.piece("stage2.full.FT").prefix == "FT" and m.piece("stage0.full").prefix is None
    assert m.annotations["export"]["pieces_per_path"] is True
    # the bundle's exits equal each path's own forward pass (the parity gate checked it too)
    model, per_path = stats
    rt = AdaptiveModel.load(per_path_bundle, warn=False)
    x = normalize_batch(data.val.images[:8], data.mean, data.std).numpy()
    for cfg in ("FTF", "TTT"):
        want = load_path_stats(perturbed_model(data), per_path[cfg])
        with torch.no_grad():
            ref = [t.numpy() for t in want(torch.from_numpy(x), skip=cfg)]
        got = rt.executor.run_exits(x, cfg)
        for a, b in zip(got, ref):
            assert np.abs(a - b).max() < 1e-4
    # two pieces of one stage variant on different paths compute different things
    ex = rt.executor
    env = {ex.input_name: x}
    ex.run_segment("FFF", 0, env)
    a = ex.runner("stage1.full.F").run({"features0": env["features0"]})[1]
    b = ex.runner("stage1.full.T").run({"features0": env["features0"]})[1]
    assert np.abs(a - b).max() > 1e-3


def _piece_index(d: dict, piece_id: str) -> int:
    return next(i for i, q in enumerate(d["pieces"]) if q["id"] == piece_id)


def _set_prefix(piece_id: str, prefix: str):
    def edit(d: dict) -> None:
        d["pieces"][_piece_index(d, piece_id)]["prefix"] = prefix
    return edit


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["execution"].__setitem__("TTF", [["stage0.skip"], ["stage1.skip.T"],
                                                  ["stage2.full.FT"]]),
     r"execution\.TTF\[2\]\[0\]: piece 'stage2.full.FT' is specific to the path 'FT' before "
     r"stage 2; config 'TTF' reaches stage 2 through 'TT'"),
    (_set_prefix("stage2.full.FT", "F"), r"pieces\[\d+\]\.prefix: expected a string of 2 chars"),
    (_set_prefix("stage0.full", ""), r"pieces\[\d+\]\.prefix: a piece that starts at stage 0"),
    (lambda d: d.__setitem__("schema_version", 2),
     r"pieces\[\d+\]\.prefix: schema_version 2 has no piece prefix"),
])
def test_the_manifest_refuses_a_piece_off_its_path(per_path_bundle, tmp_path, edit, match):
    from runtime.manifest import MANIFEST_NAME, ManifestError, load_manifest

    d = json.loads((per_path_bundle / MANIFEST_NAME).read_text())
    edit(d)
    p = tmp_path / MANIFEST_NAME
    p.write_text(json.dumps(d))
    with pytest.raises(ManifestError, match=match):
        load_manifest(p)


def test_spans_and_merged_pieces_follow_the_path(per_path_bundle, tmp_path, data):
    import shutil

    from export.merge import add_merged_pieces, span_prefixes
    from runtime.model import AdaptiveModel

    work = tmp_path / "bundle"
    shutil.copytree(per_path_bundle, work)
    rt = AdaptiveModel.load(work, warn=False)
    ex = rt.executor
    x = normalize_batch(data.val.images[:4], data.mean, data.std).numpy()

    def span(first, last, variant, prefix):
        env = {ex.input_name: x}
        if first:
            for k in range(first):
                ex.run_segment(prefix + "F" * (3 - first), k, env)
        return ex.run_span(first, last, variant, env, prefix)

    chain_tf = span(1, 2, "FF", "T")
    ref = ex.run_exits(x, "TFF")[-1]
    assert np.abs(chain_tf - ref).max() < 1e-5
    assert np.abs(span(1, 2, "FF", "F") - ex.run_exits(x, "FFF")[-1]).max() < 1e-5
    with pytest.raises(ValueError, match="prefix 'FF'"):
        ex.span_steps(1, 2, "FF", "FF")
    m = rt.manifest
    assert span_prefixes(m, 1, 2, "TF") == ["F", "T"] and span_prefixes(m, 0, 2, "FFF") == [None]
    new = add_merged_pieces(work, [(1, 2, "TF"), (0, 2, "FFF")], progress=None)
    assert new == ["stages1-2.TF.F", "stages1-2.TF.T", "stages0-2.FFF"]
    rt2 = AdaptiveModel.load(work, warn=False)
    ex2 = rt2.executor
    assert ex2.has_merged(1, 2, "TF", "T") and ex2.has_merged(1, 2, "TF", "F")
    assert rt2.manifest.merged_piece(1, 2, "TF", "T").id == "stages1-2.TF.T"
    for prefix in "FT":
        env = {ex2.input_name: x}
        ex2.run_segment(prefix + "TF", 0, env)
        got = ex2.run_span(1, 2, "TF", env, prefix)
        assert np.abs(got - ex.run_exits(x, prefix + "TF")[-1]).max() < 1e-4, prefix
