"""Per-variant exit-head norm statistics re-estimated after training (train/exit_norms.py):
the statistics are what the variants' features really have, old checkpoints still load, and the
exported pieces (both granularities) pass the parity gate with the twin heads."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from train.data import load_dataset
from train.data.augment import normalize_batch
from train.exit_norms import recalibrate_exit_norms, supports_exit_norm_twins
from train.models import create_model

DATA = "synthetic:chans=1,size=28"


@pytest.fixture(scope="module")
def data():
    return load_dataset(DATA)


def perturbed_model(data, **kwargs):
    torch.manual_seed(0)
    model = create_model("resnet20_adn", num_classes=data.num_classes, in_chans=1, img_size=28,
                         **kwargs)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-like norms, so the two variants' features differ
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def test_twin_statistics_are_the_variants_own(data):
    model = perturbed_model(data)
    assert supports_exit_norm_twins(model) and not model.exit_norm_twins
    images = data.train.images[:96]
    new = recalibrate_exit_norms(model, images, data.mean, data.std, batch_size=32)
    assert new.model_config()["exit_norm_twins"] is True and "exit_norm_twins" not in \
        model.model_config()
    # by hand: head 0's conv output over every configuration that runs stage 0 in full (main)
    # or skips it (twin), each prefix equally (for exit 0 only stage 0's letter matters)
    x = normalize_batch(images, data.mean, data.std)
    feats = {v: [] for v in "FT"}
    with torch.no_grad():
        for cfg in ("".join(c) for c in itertools.product("FT", repeat=new.num_stages)):
            h = model.forward_stage(0, model.forward_stem(x), cfg[0] == "T")
            feats[cfg[0]].append(model.exits[0].conv[0](h))
    bn = new.exits[0].conv[1]
    for v, norm in (("F", bn), ("T", bn.twin)):
        f = torch.cat(feats[v])
        assert torch.allclose(norm.running_mean, f.mean(dim=(0, 2, 3)), atol=1e-4)
        assert torch.allclose(norm.running_var, f.var(dim=(0, 2, 3), unbiased=True), rtol=1e-3,
                              atol=1e-4)
    assert not torch.allclose(bn.running_mean, bn.twin.running_mean)
    # parameters are untouched; the variants now see different exit-0 logits than before
    assert torch.equal(bn.weight, model.exits[0].conv[1].weight)
    with torch.no_grad():
        a, b = model(x[:8], skip="TTT"), new(x[:8], skip="TTT")
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[-1], b[-1])


def test_evaluation_by_configuration_uses_the_twin_heads(data):
    from train.evaluate import exit_probabilities_by_config

    model = perturbed_model(data)
    new = recalibrate_exit_norms(model, data.train.images[:64], data.mean, data.std, batch_size=32)
    configs = [tuple(c) for c in itertools.product((False, True), repeat=new.num_stages)]
    probs, _ = exit_probabilities_by_config(new, data.val, data.mean, data.std, configs)
    x = normalize_batch(data.val.images, data.mean, data.std)
    with torch.no_grad():
        for c in configs:  # the prefix tree gives what a forward pass of that configuration gives
            want = torch.stack([z.softmax(dim=1) for z in new(x, skip=c)]).numpy()
            assert abs(probs[c] - want).max() < 1e-5, c


def test_a_checkpoint_from_before_the_twins_loads_into_a_twin_model(data):
    model = perturbed_model(data)
    twin = create_model("resnet20_adn", **{**model.model_config(), "exit_norm_twins": True})
    twin.load_state_dict(model.state_dict())  # strict: the twins come from the main norms
    twin.eval()
    x = normalize_batch(data.val.images[:8], data.mean, data.std)
    with torch.no_grad():
        for cfg in ("FFF", "TFT", "TTT"):
            for a, b in zip(model(x, skip=cfg), twin(x, skip=cfg)):
                assert torch.equal(a, b)


@pytest.mark.parametrize("granularity,exit_head", [("stage", "pyramid"), ("split", "pyramid"),
                                                   ("split", "conv")])
def test_pieces_of_a_twin_model_pass_the_parity_gate(data, tmp_path, granularity, exit_head):
    from export.portable import export_checkpoint
    from runtime.bundle import Bundle
    from train.checkpoint import save_checkpoint

    model = recalibrate_exit_norms(perturbed_model(data, exit_head=exit_head),
                                   data.train.images[:64], data.mean, data.std)
    state = {"model_name": "resnet20_adn", "model_config": model.model_config(),
             "model": model.state_dict(), "ema": None, "dataset": data.info(), "eval": None,
             "config": {"data": DATA}}
    ckpt = save_checkpoint(state, tmp_path / "model.pt")
    out = export_checkpoint(ckpt, tmp_path / granularity, parity_samples=4,
                            granularity=granularity, progress=None)
    m = Bundle.open(out, verify=True).manifest
    if granularity == "split":  # the skipped segments end with the twin head
        assert m.execution["TFF"][0][-1] == "head0.skip"
        assert m.execution["FFF"][0][-1] == "head0"
