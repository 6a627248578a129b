"""Model zoo: shapes under every skip config, skip-aware norms, MACs, torchvision weights, registry."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from train.models import (AdaptiveDepthNet, all_skip_configs, create_model, list_models, load_torchvision_state_dict,
                          macs_per_exit, model_summary, piece_macs)
from train.models.layers import SKIP_AWARE_NORMS, split_stage
from train.models.macs import count_macs

torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a shared 2-core box, 2 OpenMP threads stall each other badly."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Every registered model goes through the generic checks below (a new family cannot escape them).
REGISTERED = sorted(i.name for i in list_models())
# (img_size, in_chans) small enough for a fast CPU test; models not listed run at 32 px RGB
SMALL_OVERRIDES = {"resnet20_adn": (28, 1), "vit_tiny_adn": (28, 1), "mobilenetv2_adn_cifar": (28, 1),
                   "swin_t_adn_cifar": (28, 1)}
SMALL = {name: SMALL_OVERRIDES.get(name, (32, 3)) for name in REGISTERED}
# a narrow ViT-Tiny for tests of mechanisms, not of sizes
NARROW_VIT = {"embed_dim": 48, "num_heads": 3}
EXPECTED_STAGES = {"resnet20_adn": 3, "resnet32_adn": 3, "resnet56_adn": 3, "resnet18_adn": 4,
                   "resnet34_adn": 4, "resnet50_adn": 4, "vit_tiny_adn": 4, "vit_b16_adn": 4,
                   "mobilenetv2_adn": 5, "mobilenetv2_adn_cifar": 5, "swin_t_adn": 4, "swin_t_adn_cifar": 4}


def _small(name: str, num_classes: int = 7) -> AdaptiveDepthNet:
    size, chans = SMALL[name]
    return create_model(name, num_classes=num_classes, in_chans=chans, img_size=size)


def _randomize_norms(model: nn.Module) -> None:
    """Non-trivial norm parameters and statistics so that norm swaps are visible in the outputs."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)


# --------------------------------------------------------------------------------------- registry

def test_registry_lists_every_model():
    infos = {i.name: i for i in list_models()}
    assert set(EXPECTED_STAGES) <= set(infos)
    for name, stages in EXPECTED_STAGES.items():
        assert infos[name].num_stages == stages and infos[name].description
    assert infos["resnet20_adn"].default_img_size == 32 and infos["resnet50_adn"].default_img_size == 224
    assert infos["vit_b16_adn"].family == "vit"


def test_unknown_model_name_lists_known_names():
    with pytest.raises(ValueError, match="resnet50_adn"):
        create_model("resnet51_adn")


def test_bad_skip_config_length():
    model = create_model("resnet20_adn").eval()
    with pytest.raises(ValueError, match="3 stages"):
        model(torch.zeros(1, 3, 32, 32), skip="TF")
    with pytest.raises(ValueError, match="'T' and 'F'"):
        model(torch.zeros(1, 3, 32, 32), skip="TXF")


def test_split_rule():
    assert [split_stage(n) for n in (2, 3, 4, 5, 6, 9)] == [(1, 1), (2, 1), (2, 2), (3, 2), (3, 3), (5, 4)]
    with pytest.raises(ValueError):
        split_stage(1)
    with torch.device("meta"):  # architecture only, no weight init
        assert create_model("resnet50_adn").splits == [(2, 1), (2, 2), (3, 3), (2, 1)]
        assert create_model("resnet56_adn").splits == [(5, 4)] * 3
        assert create_model("vit_b16_adn").splits == [(2, 1)] * 4


# ----------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("name", REGISTERED)
def test_shapes_every_skip_config(name):
    size, chans = SMALL[name]
    model = _small(name).eval()
    assert isinstance(model, AdaptiveDepthNet)
    assert (model.num_classes, model.in_chans, model.img_size) == (7, chans, size)
    assert model.num_stages == EXPECTED_STAGES.get(name, model.num_stages)
    assert model.num_stages == {i.name: i for i in list_models()}[name].num_stages
    n = 2 if model.num_stages == 3 else 1
    x = torch.randn(n, chans, size, size)
    with torch.no_grad():
        for skip in all_skip_configs(model.num_stages):
            logits = model(x, skip)
            assert len(logits) == model.num_stages
            assert all(t.shape == (n, 7) for t in logits)
        if name.startswith("resnet"):  # channels_last input gives the same logits
            ref = model(x, "T" * model.num_stages)[-1]
            cl = model(x.contiguous(memory_format=torch.channels_last), "T" * model.num_stages)[-1]
            torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,kwargs", [("resnet20_adn", {"exit_conv": False}),
                                         ("resnet20_adn", {"exit_norm_twins": True}),
                                         ("resnet20_adn", {"exit_head": "conv"}),
                                         ("vit_tiny_adn", {"global_pool": "token", "patch_size": 7, **NARROW_VIT})])
def test_model_config_rebuilds(name, kwargs):
    model = create_model(name, num_classes=5, in_chans=1, img_size=28, **kwargs)
    cfg = model.model_config()
    assert json.loads(json.dumps(cfg)) == cfg
    rebuilt = create_model(model.model_name, **cfg)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert rebuilt.model_config() == cfg


def test_pyramid_exit_heads_follow_the_later_stages():
    """exit k gets one strided conv per later stage with that stage's channels (the CIFAR
    family's default); the one-conv head keeps its state-dict keys."""
    def conv_shapes(model):
        return [[tuple(m.weight.shape[:2]) for m in head.modules() if isinstance(m, nn.Conv2d)]
                for head in model.exits]

    plain = create_model("resnet20_adn", in_chans=1, img_size=28, exit_head="conv")
    pyramid = create_model("resnet20_adn", in_chans=1, img_size=28)
    assert conv_shapes(plain) == [[(16, 16)], [(32, 32)]]
    assert conv_shapes(pyramid) == [[(32, 16), (64, 32)], [(64, 32)]]
    assert (plain.model_config()["exit_head"], pyramid.model_config()["exit_head"]) == ("conv", "pyramid")
    assert set(plain.state_dict()) < set(pyramid.state_dict())  # the first conv keeps its name
    with torch.no_grad():
        logits = pyramid.eval()(torch.randn(3, 1, 28, 28), "TFT")
    assert [tuple(t.shape) for t in logits] == [(3, 10)] * 3
    head_macs = piece_macs(pyramid, 28)["head"]
    assert head_macs[0] > head_macs[1] > piece_macs(plain, 28)["head"][0]
    assert create_model("resnet18_adn").exit_head == "conv"  # ImageNet ResNets: no exit conv
    assert create_model("resnet20_adn", exit_conv=False).exit_head == "conv"
    with pytest.raises(ValueError, match="exit_head must be one of conv, pyramid"):
        create_model("resnet20_adn", exit_head="deep")
    with pytest.raises(ValueError, match="needs exit_conv=True"):
        create_model("resnet20_adn", exit_head="pyramid", exit_conv=False)


def test_a_checkpoint_from_before_the_pyramid_default_loads_with_its_own_heads(tmp_path):
    from train.checkpoint import model_from_checkpoint, save_checkpoint

    old = create_model("resnet20_adn", in_chans=1, img_size=28, exit_head="conv").eval()
    config = {k: v for k, v in old.model_config().items() if k != "exit_head"}  # as written then
    path = save_checkpoint({"model_name": "resnet20_adn", "model_config": config,
                            "model": old.state_dict(), "ema": None}, tmp_path / "model.pt")
    loaded, _state = model_from_checkpoint(path)
    assert loaded.exit_head == "conv"
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        for a, b in zip(old(x, "FTF"), loaded(x, "FTF")):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["resnet20_adn", "mobilenetv2_adn_cifar", "vit_tiny_adn"])
def test_forward_configs_matches_forward_and_runs_shared_prefixes_once(name):
    kwargs = NARROW_VIT if name.startswith("vit") else {}
    model = create_model(name, in_chans=1, img_size=28, **kwargs).eval()
    _randomize_norms(model)
    x = torch.randn(2, 1, 28, 28)
    S = model.num_stages
    configs = [(True,) * S, (True,) + (False,) * (S - 1), (False,) + (True,) * (S - 1)]
    calls = []
    model.forward_stage = lambda k, h, skip, _f=model.forward_stage: calls.append((k, skip)) or _f(k, h, skip)
    with torch.no_grad():
        together = model.forward_configs(x, configs)
        assert len(calls) == 1 + 2 * (S - 1) + S  # stage 0's skip variant ran once for the first two
        for config, logits in zip(configs, together):
            alone = model(x, config)
            assert len(logits) == S and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(logits, alone))


def test_return_increments():
    model = create_model("vit_tiny_adn", in_chans=1, img_size=28, **NARROW_VIT).eval()
    logits, inc = model(torch.randn(2, 1, 28, 28), "FTFT", return_increments=True)
    assert len(logits) == 4 and inc[1] is None and inc[3] is None and inc[0].shape == (2,)


# ------------------------------------------------------------------------------- skip-aware norms

def _stage_norms(model: nn.Module, k: int):
    """Skip-aware norms of stage k's mandatory blocks."""
    if hasattr(model, "blocks"):
        start, mid, _ = model.stage_ranges[k]
        mods = [model.blocks[i] for i in range(start, mid)]
    else:
        mods = list(model.stage(k))[:model.splits[k][0]]
    return [m for mod in mods for m in mod.modules() if isinstance(m, SKIP_AWARE_NORMS)]


@pytest.mark.parametrize("name", ["resnet20_adn", "vit_tiny_adn"])
def test_twins_used_only_when_skipping(name):
    model = create_model(name, in_chans=1, img_size=28, **(NARROW_VIT if name.startswith("vit") else {})).eval()
    _randomize_norms(model)
    x = torch.randn(2, 1, 28, 28)
    k = 1
    norms = _stage_norms(model, k)
    assert norms and not any(isinstance(n.twin, SKIP_AWARE_NORMS) for n in norms)
    with torch.no_grad():
        before = {s: model(x, s) for s in all_skip_configs(model.num_stages)}
        for norm in norms:  # perturb the twins: only configs that skip stage k see it
            for p in norm.twin.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        for s, ref in before.items():
            out = model(x, s)
            assert torch.equal(out[-1], ref[-1]) != s[k], s
            assert all(torch.equal(a, b) for a, b in zip(out[:k], ref[:k]))
        before = {s: model(x, s) for s in all_skip_configs(model.num_stages)}
        for norm in norms:  # perturb the main norms: configs that skip stage k do not see it
            norm.weight.add_(torch.randn_like(norm.weight) * 0.3)
            norm.bias.add_(torch.randn_like(norm.bias) * 0.3)
        for s, ref in before.items():
            assert torch.equal(model(x, s)[-1], ref[-1]) == s[k], s


def test_twin_running_stats_update_only_when_skipping():
    model = create_model("resnet20_adn", in_chans=1, img_size=28).train()
    norm = _stage_norms(model, 0)[0]
    x = torch.randn(4, 1, 28, 28)
    model(x, "FFF")
    assert norm.twin.num_batches_tracked.item() == 0 and norm.num_batches_tracked.item() == 1
    model(x, "TFF")
    assert norm.twin.num_batches_tracked.item() == 1 and norm.num_batches_tracked.item() == 1


def test_mandatory_blocks_carry_twins_including_downsample():
    with torch.device("meta"):
        keys = create_model("resnet50_adn").state_dict().keys()
    assert "layer1.0.bn1.twin.weight" in keys and "layer1.0.downsample.1.twin.running_var" in keys
    assert "layer3.2.bn3.twin.weight" in keys and "layer3.3.bn3.twin.weight" not in keys
    assert "layer4.1.bn1.twin.weight" in keys and "layer4.2.bn1.twin.weight" not in keys


# ------------------------------------------------------------------------------------------- MACs

def test_resnet50_macs_match_paper():
    model = create_model("resnet50_adn", num_classes=1000)
    pieces = piece_macs(model, 224)
    assert pieces["mandatory"] == pieces["mandatory_skipping"]
    paper = {"FFFF": 4.11, "TFFF": 3.90, "TTFF": 3.46, "TTTF": 2.80, "TTTT": 2.58}
    for skip, gmacs in paper.items():
        measured = macs_per_exit(model, skip, pieces=pieces)[-1] / 1e9
        assert abs(measured - gmacs) / gmacs < 0.02, (skip, measured, gmacs)


def test_pieces_add_up_to_full_forward():
    model = create_model("resnet20_adn").eval()
    pieces = piece_macs(model)
    with torch.no_grad():
        total = count_macs(lambda: model(torch.zeros(1, 3, 32, 32), "FTF"))
    assert total == macs_per_exit(model, "FTF", pieces=pieces)[-1] + sum(pieces["head"][:-1])


@pytest.mark.parametrize("name", ["resnet20_adn", "vit_tiny_adn"])
def test_model_summary(name):
    summary = model_summary(name, input_size=28, in_chans=1, num_classes=10)
    assert json.loads(json.dumps(summary)) == summary
    assert {"name", "params", "stages", "skip_configs"} <= set(summary)
    s = summary["stages"]
    assert summary["name"] == name and isinstance(summary["params"], int) and summary["params"] > 0
    configs = summary["skip_configs"]
    assert [tuple(c["skip"]) for c in configs] == all_skip_configs(s)
    by_skip = {tuple(c["skip"]): c["macs_per_exit"] for c in configs}
    for skip, macs in by_skip.items():
        assert len(macs) == s and all(isinstance(m, int) for m in macs)
        assert all(a < b for a, b in zip(macs, macs[1:])), (skip, macs)  # grows with exit index
        for k in range(s):  # skipping one more stage saves MACs at and after that stage's exit
            if not skip[k]:
                more = by_skip[skip[:k] + (True,) + skip[k + 1:]]
                assert more[:k] == macs[:k] and all(m < n for m, n in zip(more[k:], macs[k:]))


# ------------------------------------------------------------------------------ torchvision weights

class _TVBasic(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None if stride == 1 and cin == planes else nn.Sequential(
            nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class _TVBottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), nn.BatchNorm2d(planes * 4)
        self.downsample = None if stride == 1 and cin == planes * 4 else nn.Sequential(
            nn.Conv2d(cin, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(torch.relu(self.bn2(self.conv2(out)))))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class _TVResNet(nn.Module):
    """Plain torchvision-layout ResNet (same module names as torchvision.models.resnet)."""

    def __init__(self, block, layers, widths, num_classes, cifar=False, in_chans=3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3 if cifar else 7, 1 if cifar else 2, 1 if cifar else 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.Identity() if cifar else nn.MaxPool2d(3, 2, 1)
        cin = widths[0]
        for k, (n, w) in enumerate(zip(layers, widths)):
            blocks = []
            for i in range(n):
                blocks.append(block(cin, w, (1 if k == 0 else 2) if i == 0 else 1))
                cin = w * block.expansion
            setattr(self, f"layer{k + 1}", nn.Sequential(*blocks))
        self.num_layers = len(layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for k in range(self.num_layers):
            x = getattr(self, f"layer{k + 1}")(x)
        return self.fc(torch.flatten(x.mean((2, 3), keepdim=True), 1))


TV_REFS = {"resnet20_adn": (_TVBasic, (3, 3, 3), (16, 32, 64), True, 32),
           "resnet18_adn": (_TVBasic, (2, 2, 2, 2), (64, 128, 256, 512), False, 32),
           "resnet50_adn": (_TVBottleneck, (3, 4, 6, 3), (64, 128, 256, 512), False, 32)}


@pytest.mark.parametrize("name", sorted(TV_REFS))
def test_torchvision_state_dict_loads_and_reproduces_reference(name, tmp_path):
    block, layers, widths, cifar, size = TV_REFS[name]
    ref = _TVResNet(block, layers, widths, num_classes=10, cifar=cifar).eval()
    _randomize_norms(ref)
    model = create_model(name, num_classes=10, img_size=size).eval()
    path = tmp_path / "tv.pth"
    torch.save(ref.state_dict(), path)
    report = load_torchvision_state_dict(model, path)
    assert not report.missing and not report.unexpected and not report.skipped
    assert len(report.loaded) == len(ref.state_dict())
    assert report.fresh and all(k.startswith("exits.") for k in report.fresh)
    for norm_name in report.twins:  # every twin equals its source norm
        norm = model.get_submodule(norm_name)
        for key, value in norm.twin.state_dict().items():
            assert torch.equal(value, getattr(norm, key)), (norm_name, key)
    assert "layer1.0.bn1" in report.twins and "layer2.0.downsample.1" in report.twins
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[-1], ref(x), rtol=1e-4, atol=1e-4)
        # twins equal the source norms, so skipping == the reference with those blocks removed
        skip = (True,) + (False,) * (model.num_stages - 1)
        n_mand = model.splits[0][0]
        ref.layer1 = nn.Sequential(*list(ref.layer1)[:n_mand])
        torch.testing.assert_close(model(x, skip)[-1], ref(x), rtol=1e-4, atol=1e-4)


def test_torchvision_load_errors_and_head_skip():
    ref = _TVResNet(_TVBasic, (3, 3, 3), (16, 32, 64), num_classes=1000, cifar=True).state_dict()
    model = create_model("resnet20_adn", num_classes=10)
    report = load_torchvision_state_dict(model, ref)
    assert sorted(report.skipped) == ["fc.bias", "fc.weight"]
    bad = dict(ref, **{"layer2.1.conv1.weight": torch.zeros(32, 16, 3, 3)})
    with pytest.raises(ValueError, match=r"layer2\.1\.conv1\.weight"):
        load_torchvision_state_dict(model, bad)
    missing = {k: v for k, v in ref.items() if k != "layer3.0.bn2.running_var"}
    with pytest.raises(ValueError, match=r"layer3\.0\.bn2\.running_var"):
        load_torchvision_state_dict(model, missing)
    report = load_torchvision_state_dict(model, dict(ref, extra=torch.zeros(1)), strict=False)
    assert report.unexpected == ["extra"]


def test_torchvision_vit_keys_are_mapped():
    model = create_model("vit_tiny_adn", global_pool="token", img_size=32, **NARROW_VIT)
    ours = {k: torch.randn_like(v) for k, v in model.state_dict().items() if ".twin." not in k and "exits." not in k}
    rename = [("cls_token", "class_token"), ("patch_embed.proj.", "conv_proj."), ("pos_embed", "encoder.pos_embedding"),
              (".norm1.", ".ln_1."), (".norm2.", ".ln_2."), (".attn.qkv.weight", ".self_attention.in_proj_weight"),
              (".attn.qkv.bias", ".self_attention.in_proj_bias"), (".attn.proj.", ".self_attention.out_proj."),
              (".mlp.fc1.", ".mlp.0."), (".mlp.fc2.", ".mlp.3."), ("head.", "heads.head.")]
    tv = {}
    for key, value in ours.items():
        new = "encoder.ln." + key[5:] if key.startswith("norm.") else key
        for a, b in rename:
            new = new.replace(a, b)
        if new.startswith("blocks."):
            new = "encoder.layers.encoder_layer_" + new[len("blocks."):]
        tv[new] = value
    report = load_torchvision_state_dict(model, tv)
    assert not report.missing and not report.unexpected
    sd = model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in ours.items())
    assert torch.equal(sd["blocks.0.norm1.twin.weight"], ours["blocks.0.norm1.weight"])


# ------------------------------------------------------------- generic checks of every registered model

def _stage_inputs(model: AdaptiveDepthNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Features entering every stage along the full-depth path."""
    hs, h = [], model.forward_stem(x)
    for k in range(model.num_stages):
        hs.append(h)
        h = model.forward_stage(k, h, False)
    return hs


@pytest.mark.parametrize("name", REGISTERED)
def test_generic_twins_switch_with_their_stage(name):
    """Per stage: the skipping mandatory path uses twins (and only then); every twin belongs to one stage;
    perturbing stage 1's twins changes exactly the configs that skip stage 1."""
    from train.models.layers import skip_aware_norms
    from train.models.macs import used_params

    model = _small(name).eval()
    _randomize_norms(model)
    size, chans = SMALL[name]
    x = torch.randn(1, chans, size, size)
    names = {id(p): n for n, p in model.named_parameters()}
    twins_seen: list[str] = []
    with torch.no_grad():
        hs = _stage_inputs(model, x)
        for k, h in enumerate(hs):
            plain, _ = used_params(lambda: model.forward_mandatory(k, h, False))
            skipping, _ = used_params(lambda: model.forward_mandatory(k, h, True))
            skippable, mid = used_params(lambda: model.forward_skippable(k, model.forward_mandatory(k, h, False)))
            head, _ = used_params(lambda: model.forward_head(k, mid))
            tw = [names[i] for i in skipping if ".twin." in names[i]]
            assert tw, f"stage {k} has no twin norms"
            assert not any(".twin." in names[i] for i in (*plain, *skippable, *head)), k
            twins_seen += tw
    all_twins = [f"{n}.twin.{p}" for n, m in skip_aware_norms(model) for p, _ in m.twin.named_parameters()]
    assert sorted(twins_seen) == sorted(all_twins)  # each twin used by exactly one stage

    k = 1
    stage_twins = [p for n, p in model.named_parameters() if n in set(twins_seen)
                   and id(p) in used_params(lambda: model.forward_mandatory(k, hs[k], True))[0]]
    with torch.no_grad():
        S = model.num_stages
        configs = [(False,) * S, (True,) * S, tuple(i == k for i in range(S)), tuple(i != k for i in range(S))]
        before = {c: model(x, c)[-1] for c in configs}
        for p in stage_twins:
            p.add_(torch.randn_like(p) * 0.3)
        for c, ref in before.items():
            assert torch.equal(model(x, c)[-1], ref) != c[k], c


@pytest.mark.parametrize("name", REGISTERED)
def test_generic_macs_monotone(name):
    model = _small(name)
    pieces = piece_macs(model)
    assert all(v > 0 for v in pieces["skippable"]) and all(v > 0 for v in pieces["head"])
    full = {c: macs_per_exit(model, c, pieces=pieces) for c in all_skip_configs(model.num_stages)}
    for c, per_exit in full.items():
        path = [m - h for m, h in zip(per_exit, pieces["head"])]  # MACs of the trunk up to stage k
        assert all(b > a for a, b in zip(path, path[1:])), c
        for k in range(model.num_stages):
            if not c[k]:  # skipping one more stage always saves
                fewer = tuple(True if i == k else s for i, s in enumerate(c))
                assert full[fewer][-1] < per_exit[-1], (c, k)
    summary = model_summary(name, input_size=SMALL[name][0], in_chans=SMALL[name][1], num_classes=7)
    assert [s["macs_per_exit"] for s in summary["skip_configs"]] == list(full.values())


@pytest.mark.parametrize("name", REGISTERED)
def test_generic_export_cut_points_reproduce_forward(name):
    from train.models.base import skip_to_str
    from export.segments import run_plan_torch, segment_plan

    model = _small(name).eval()
    _randomize_norms(model)
    size, chans = SMALL[name]
    x = torch.randn(2, chans, size, size)
    for granularity in ("stage", "split"):
        plan = segment_plan(model.num_stages, granularity)
        for c in all_skip_configs(model.num_stages):
            exits, _ = run_plan_torch(model, plan, x, skip_to_str(c))
            with torch.no_grad():
                ref = model(x, c)
            for a, b in zip(exits, ref):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", REGISTERED)
def test_generic_config_rebuilds_and_increments(name):
    model = _small(name)
    cfg = model.model_config()
    assert json.loads(json.dumps(cfg)) == cfg
    with torch.device("meta"):
        rebuilt = create_model(model.model_name, **cfg)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert rebuilt.model_config() == cfg
    size, chans = SMALL[name]
    skip = "FT" * model.num_stages
    logits, inc = model.eval()(torch.randn(2, chans, size, size), skip[:model.num_stages], return_increments=True)
    assert len(logits) == len(inc) == model.num_stages
    assert inc[1] is None and inc[0].shape == (2,) and torch.isfinite(inc[0]).all()


@pytest.mark.parametrize("compare, arms", [("exit_head", ("conv", "pyramid")),
                                            ("mixed_subnets", ("mixed=0", "mixed=1"))])
def test_train_step_cost_bench_times_both_arms_on_the_same_batches(compare, arms):
    """bench/train_step_cost.py trains both arms for real and prints each step time and the ratio."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "bench/train_step_cost.py", "--compare", compare,
                        "--steps", "4", "--warmup", "1"],
                       cwd=repo, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    steps = dict(re.findall(r"^(\S+) +median step +([0-9.]+) ms", r.stdout, re.M))
    assert set(steps) == set(arms) and all(float(v) > 0 for v in steps.values())
    ratio = float(re.search(rf"^{re.escape(arms[1])} / {re.escape(arms[0])} step time: ([0-9.]+)$",
                            r.stdout, re.M).group(1))
    assert ratio == pytest.approx(float(steps[arms[1]]) / float(steps[arms[0]]), rel=0.01)
