"""Your own model: ``module:factory`` specs, entry-point plugins, ``compose_adn``, and a model
defined outside the package going through train -> export -> compile -> predict -> build."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn

from runtime.errors import UsageError
from train.checkpoint import CheckpointError, model_from_checkpoint, save_checkpoint
from train.models import all_skip_configs, create_model, list_models, skip_to_str
from train.models.compose import ComposedADN, compose_adn, copy_twins
from train.models.layers import SkipAwareBatchNorm2d, copy_norms_to_twins, skip_aware_norms
from train.models.macs import macs_per_exit, params_per_exit, piece_macs
from train.models.plugins import ENTRY_POINT_GROUP, parse_spec

# A model of one's own, as a user would write it: plain torch blocks wrapped with compose_adn.
USER_MODULE = textwrap.dedent('''
    """A tiny conv net defined outside the package."""
    from torch import nn

    from train.models.compose import compose_adn

    IMPORTED = True


    def conv_bn(cin, cout, stride=1):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


    class Residual(nn.Module):
        def __init__(self, chs):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(chs, chs, 3, 1, 1, bias=False), nn.BatchNorm2d(chs))

        def forward(self, x):
            return (x + self.body(x)).relu()


    def factory(num_classes=10, in_chans=3, img_size=None, width=8):
        """Tiny two-stage conv net."""
        return compose_adn(conv_bn(in_chans, width),
                           stages=[(conv_bn(width, width), Residual(width)),
                                   (conv_bn(width, 2 * width, stride=2), Residual(2 * width))],
                           num_classes=num_classes, in_chans=in_chans, img_size=img_size or 8)


    def not_a_model(num_classes=10, in_chans=3, img_size=None):
        return nn.Linear(3, 3)
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """``tinyusernet`` written into tmp and importable (sys.path), removed from sys.modules after."""
    folder = tmp_path / "usermods"
    folder.mkdir()
    (folder / "tinyusernet.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop("tinyusernet", None)


# ------------------------------------------------------------------------------------------ specs

@pytest.mark.parametrize("spec", ["tinyusernet", "a..b:c", "a:b:c", "1a:b", "a:", ":f", "a.b:c()",
                                  "os; rm -rf /:x", "import:f", "a/b:c", "a:b.c", " a:b"])
def test_bad_specs_are_refused_before_any_import(spec):
    if ":" not in spec:
        with pytest.raises(UsageError, match="unknown model"):
            create_model(spec)
        return
    with pytest.raises(UsageError, match="is not 'package.module:factory'"):
        parse_spec(spec)
    with pytest.raises(UsageError, match="is not 'package.module:factory'"):
        create_model(spec)


def test_spec_builds_the_users_model_and_records_kwargs(user_module):
    model = create_model("tinyusernet:factory", num_classes=7, in_chans=1, img_size=8, width=4)
    assert isinstance(model, ComposedADN) and model.num_stages == 2
    assert model.model_name == "tinyusernet:factory" and model.model_kwargs == {"width": 4}
    assert [t.shape for t in model(torch.randn(2, 1, 8, 8))] == [(2, 7), (2, 7)]
    with pytest.raises(UsageError, match="not an AdaptiveDepthNet"):
        create_model("tinyusernet:not_a_model")
    with pytest.raises(UsageError, match="has no callable 'nope'"):
        create_model("tinyusernet:nope")
    with pytest.raises(UsageError, match="no module named 'no_such_user_module'"):
        create_model("no_such_user_module:factory")


def test_checkpoint_with_a_bad_spec_is_refused_without_importing(tmp_path, user_module):
    model = create_model("tinyusernet:factory", in_chans=1)
    sys.modules.pop("tinyusernet", None)
    ckpt = save_checkpoint({"model_name": "tinyusernet:factory; x", "model_config": model.model_config(),
                            "model": model.state_dict()}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="bad.pt: cannot rebuild its model: model spec"):
        model_from_checkpoint(ckpt)
    assert "tinyusernet" not in sys.modules
    ckpt = save_checkpoint({"model_name": "tinyusernet:factory", "model_config": model.model_config(),
                            "model": model.state_dict()}, tmp_path / "good.pt")
    rebuilt, _ = model_from_checkpoint(ckpt)  # a valid spec imports the module it names
    assert sys.modules["tinyusernet"].IMPORTED and isinstance(rebuilt, ComposedADN)


def test_entry_point_plugin_is_listed_and_built(tmp_path, monkeypatch, user_module):
    dist = tmp_path / "site" / "tinyplugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tinyplugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\ntiny_plugin_net = tinyusernet:factory\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    infos = {m.name: m for m in list_models()}
    assert infos["tiny_plugin_net"].num_stages == 2
    assert infos["tiny_plugin_net"].family == "plugin:tinyusernet"
    assert infos["tiny_plugin_net"].description == "Tiny two-stage conv net."
    assert "resnet20_adn" in infos
    model = create_model("tiny_plugin_net", in_chans=1)
    assert isinstance(model, ComposedADN) and model.model_name == "tiny_plugin_net"


# ------------------------------------------------------------------------------------ compose_adn

def _conv_bn(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class _Res(nn.Module):
    def __init__(self, chs):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(chs, chs, 3, 1, 1, bias=False), nn.BatchNorm2d(chs))

    def forward(self, x):
        return (x + self.body(x)).relu()


def _composed(**kw) -> ComposedADN:
    torch.manual_seed(0)
    return compose_adn(_conv_bn(1, 8), [(_conv_bn(8, 8), _Res(8)), (_conv_bn(8, 16, 2), _Res(16))],
                       num_classes=10, in_chans=1, img_size=16, **kw)


def test_composed_model_has_twin_norms_in_mandatory_modules_only():
    model = _composed()
    names = [n for n, _ in skip_aware_norms(model)]
    assert names == ["mandatory.0.1", "mandatory.1.1"] == model.twin_norms
    assert isinstance(model.mandatory[0][1], SkipAwareBatchNorm2d)
    keys = model.state_dict().keys()
    assert "mandatory.0.1.weight" in keys and "mandatory.0.1.twin.running_mean" in keys
    assert not any(k.startswith(("stem.", "skippable.")) and ".twin." in k for k in keys)
    # Default heads: a strided conv head on the intermediate exit, pooling + Linear on the last.
    assert isinstance(model.exits[0].conv, nn.Sequential) and isinstance(model.exits[1].conv, nn.Identity)
    assert not [n for n, _ in skip_aware_norms(_composed(skip_aware_norms=False))]


def test_composed_twins_are_used_only_when_skipping():
    model = _composed().eval()
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        ref = {skip_to_str(s): model(x, s) for s in all_skip_configs(2)}
        model.mandatory[0][1].twin.weight.mul_(3)
        for s in all_skip_configs(2):
            out = model(x, s)
            changed = (out[0] - ref[skip_to_str(s)][0]).abs().max() > 1e-6
            assert bool(changed) == s[0], s
        copy_twins(model)  # back to the norm's own values: every skip config as before
        assert all(torch.allclose(model(x, s)[1], ref[skip_to_str(s)][1], atol=1e-6)
                   for s in all_skip_configs(2))
    assert len(copy_norms_to_twins(model)) == 2  # the package's helper finds them too


def test_composed_skip_flag_is_per_thread():
    import threading

    model = _composed().eval()
    with torch.no_grad():
        model.mandatory[0][1].twin.weight.mul_(3)
        x = torch.randn(2, 1, 16, 16)
        ref = {s: model(x, s)[0] for s in ("TF", "FF")}
        bad = []

        def run(s):
            for _ in range(30):
                if not torch.equal(model(x, s)[0], ref[s]):
                    bad.append(s)

        threads = [threading.Thread(target=run, args=(s,)) for s in ("TF", "FF")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not bad


def test_composed_norm_statistics_follow_the_skip_flag():
    model = _composed().train()
    norm = model.mandatory[0][1]
    main, twin = norm.running_mean.clone(), norm.twin.running_mean.clone()
    model(torch.randn(4, 1, 16, 16), "TF")
    assert torch.equal(norm.running_mean, main) and not torch.equal(norm.twin.running_mean, twin)
    twin = norm.twin.running_mean.clone()
    model(torch.randn(4, 1, 16, 16), "FF")
    assert not torch.equal(norm.running_mean, main) and torch.equal(norm.twin.running_mean, twin)


def test_composed_model_counts_macs_and_params():
    model = _composed()
    pieces = piece_macs(model)
    assert pieces["input_size"] == [16, 16] and all(m > 0 for m in pieces["skippable"])
    full, base = macs_per_exit(model, "FF", pieces=pieces), macs_per_exit(model, "TT", pieces=pieces)
    assert base[-1] < full[-1] and full[0] < full[1]
    assert params_per_exit(model)[-1] < sum(p.numel() for p in model.parameters())


def test_compose_checks_its_arguments():
    with pytest.raises(ValueError, match="at least one"):
        compose_adn(nn.Identity(), [], num_classes=2)
    with pytest.raises(TypeError, match="pair"):
        compose_adn(nn.Identity(), [nn.Identity()], num_classes=2)
    with pytest.raises(ValueError, match="1 exit heads for 2 stages"):
        compose_adn(nn.Identity(), [(nn.Identity(), nn.Identity())] * 2, [nn.Identity()], num_classes=2)


def test_composed_backbone_weights_load_by_their_own_names():
    model = _composed()
    backbone = {k: v for k, v in model.state_dict().items() if ".twin." not in k and not k.startswith("exits.")}
    other = _composed()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1)
    result = other.load_state_dict(backbone, strict=False)
    assert not result.unexpected_keys
    copy_twins(other)
    assert torch.equal(other.mandatory[1][1].twin.weight, model.mandatory[1][1].weight)


# ----------------------------------------------------------------------------------- end to end

def _run(python, args, env, cwd, timeout=600):
    proc = subprocess.run([python, "-m", "pipeline", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_users_model_goes_end_to_end_in_fresh_processes(tmp_path, user_module, pipeline_env, python):
    """train --model tinyusernet:factory -> export -> compile --device host -> predict -> build
    --checkpoint, each in a fresh process that finds the user's module through PYTHONPATH only."""
    env = dict(pipeline_env)
    env["PYTHONPATH"] = env["PYTHONPATH"] + os.pathsep + str(user_module)
    work = tmp_path / "work"  # not the module's folder: only PYTHONPATH makes it importable
    work.mkdir()
    t0 = time.perf_counter()
    _run(python, ["train", "--model", "tinyusernet:factory", "--model-kwargs", '{"width": 6}',
                  "--data", "digits", "--epochs", "2", "--batch-size", "64", "--threads", "1",
                  "--no-bf16", "--out", "run"], env, work)
    ckpt = work / "run" / "model.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["model_name"] == "tinyusernet:factory"
    assert state["model_config"] == {"width": 6, "num_classes": 10, "in_chans": 1, "img_size": 8}
    export = _run(python, ["export", "--checkpoint", "run/model.pt", "--out", "bundle"], env, work)
    assert "parity" in export.stdout
    _run(python, ["compile", "--bundle", "bundle", "--device", "host", "--backend", "onnxruntime",
                  "--out", "bundle-host"], env, work)
    np.save(work / "digit.npy", np.zeros((8, 8), np.uint8))
    pred = _run(python, ["predict", "--bundle", "bundle-host", "digit.npy", "--json"], env, work)
    result = json.loads(pred.stdout)
    assert len(result) == 1 and 0 <= result[0]["class_id"] < 10 and len(result[0]["probabilities"]) == 10
    _run(python, ["build", "--device", "host", "--checkpoint", "run/model.pt", "--out", "build",
                  "--backends", "onnxruntime"], env, work)
    report = json.loads((work / "build" / "x86-host" / "report.json").read_text())
    assert report["model"]["name"] == "tinyusernet:factory" and report["model"]["stages"] == 2
    assert not any(":" in p.name for p in (work / "build" / "x86-host").iterdir())
    print(f"end to end: {time.perf_counter() - t0:.1f} s")

    # Exits-only training of the same model from its checkpoint, through the CLI.
    _run(python, ["train", "--model", "tinyusernet:factory", "--model-kwargs", '{"width": 6}',
                  "--data", "digits", "--epochs", "1", "--batch-size", "64", "--threads", "1",
                  "--no-bf16", "--init-weights", "run/model.pt", "--trainable", "exits",
                  "--max-steps", "3", "--out", "exits"], env, work)
    frozen = torch.load(work / "exits" / "model.pt", weights_only=True)
    assert frozen["config"]["trainable"] == "exits"
    for key, value in state["model"].items():
        same = torch.equal(value, frozen["model"][key])
        assert same != key.startswith("exits.") or key.endswith("num_batches_tracked"), key

    # Without the module on the path the checkpoint cannot be rebuilt: one Error line naming it.
    env_without = dict(pipeline_env)
    proc = subprocess.run([python, "-m", "pipeline", "export", "--checkpoint", "run/model.pt",
                           "--out", "again"], env=env_without, cwd=work, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "no module named 'tinyusernet'" in proc.stderr and "Traceback" not in proc.stderr
