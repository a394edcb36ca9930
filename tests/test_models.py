"""Model zoo: registry and configs, flags that really change the networks, parameter counts.

Inputs are real ImageNette images at 32-64 px so every model runs on 2 CPU cores in seconds.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torchvision
import torchvision.transforms.v2.functional as TF
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch.overrides import TorchFunctionMode

from imagenette_lab.models import (
    ACTIVATIONS,
    MODEL_NAMES,
    BlurPool,
    HybridBlock,
    count_macs,
    count_params,
    create_model,
)
from imagenette_lab.models.registry import common_flags

CONF = Path(__file__).resolve().parents[1] / "conf"
NUM_CLASSES = 10
SMALL = 32  # px, smallest input every model must take (5 stride-2 reductions leave 1x1)

# Name of the torch function each activation ends up calling (ReLU6 is a hardtanh in PyTorch)
ACT_FUNCTION = {"relu": "relu", "relu6": "hardtanh", "mish": "mish", "silu": "silu", "gelu": "gelu"}
DEFAULT_ACT = {
    "resnet18": "relu",
    "resnet34": "relu",
    "resnet50": "relu",
    "resnet50d": "relu",
    "googlenet": "relu",
    "mobilenetv2": "relu6",
    "hybrid": "mish",
}
# Blocks that must hold the report's "dropout in all bottlenecks": ResNet-34/50 have 3+4+6+3 blocks (ResNet-18 2+2+2+2),
# MobileNetV2 and hybrid 1+2+3+4+3+3+1 (the hybrid has one in each of its 2 passes), GoogLeNet 9 Inceptions
BLOCK_DROPOUTS = {
    "resnet18": 8,
    "resnet34": 16,
    "resnet50": 16,
    "resnet50d": 16,
    "mobilenetv2": 17,
    "googlenet": 9,
    "hybrid": 34,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on 32-64 px inputs, syncing threads on 2 shared cores costs far more than it
    saves (measured 10-20x slower CPU time with 2 threads under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(mini_root: Path) -> torch.Tensor:
    """Four real validation images (two classes), 64 px, ImageNet-normalized."""
    classes = sorted(p for p in (mini_root / "val").iterdir() if p.is_dir())[:2]
    files = [f for c in classes for f in sorted(c.glob("*.JPEG"))[:2]]
    batch = torch.stack(
        [
            TF.resize(torchvision.io.decode_image(str(f), mode=torchvision.io.ImageReadMode.RGB), [64, 64])
            for f in files
        ]
    )
    return TF.normalize(batch.float() / 255, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])


def small(images: torch.Tensor, n: int = 2, size: int = SMALL) -> torch.Tensor:
    return TF.resize(images[:n], [size, size], antialias=True)


class CallRecorder(TorchFunctionMode):
    """Records the name of every torch function called, functional ones (``F.relu``) included."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls[getattr(func, "__name__", str(func)).rstrip("_")] += 1
        return func(*args, **(kwargs or {}))


def activation_calls(model: nn.Module, x: torch.Tensor) -> Counter[str]:
    with torch.no_grad(), CallRecorder() as rec:
        model(x)
    return Counter({name: n for name, n in rec.calls.items() if name in ACT_FUNCTION.values()})


# --- registry and configs ----------------------------------------------------------------------------


def test_registry_names_equal_config_stems():
    assert tuple(sorted(MODEL_NAMES)) == MODEL_NAMES
    assert set(MODEL_NAMES) == {p.stem for p in (CONF / "model").glob("*.yaml") if not p.stem.startswith("_")}
    assert set(ACTIVATIONS) == {p.stem for p in (CONF / "act").glob("*.yaml")}
    assert set(MODEL_NAMES) == {"resnet18", "resnet34", "resnet50", "resnet50d", "mobilenetv2", "googlenet", "hybrid"}


def test_base_config_holds_exactly_the_flags_create_model_takes():
    """conf/model/_base.yaml and create_model's keyword-only parameters are the same list of common flags."""
    base = OmegaConf.load(CONF / "model" / "_base.yaml")
    assert set(base) - {"_target_", "name", "num_classes"} == set(common_flags())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_model_config_instantiates_the_registry_model(name: str):
    # composed by Hydra: each model file starts from conf/model/_base.yaml (the common flags, once)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=[f"+model={name}", f"+data.num_classes={NUM_CLASSES}"])
    assert cfg.model.name == name
    base = OmegaConf.load(CONF / "model" / "_base.yaml")
    assert set(base) <= set(cfg.model) and "defaults" not in cfg.model
    model = instantiate(cfg.model)
    reference = create_model(name, NUM_CLASSES)
    assert type(model) is type(reference)
    assert count_params(model) == count_params(reference)
    with torch.no_grad():
        assert model.eval()(torch.zeros(1, 3, SMALL, SMALL)).shape == (1, NUM_CLASSES)


def test_act_group_sets_model_act_and_struct_mode_rejects_typos():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=["+model=resnet50", "+act=mish", f"+data.num_classes={NUM_CLASSES}"])
        assert cfg.model.act == "mish"
        model = instantiate(cfg.model)
        assert any(isinstance(m, nn.Mish) for m in model.modules())
        assert not any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in model.modules())
        assert compose(overrides=["+model=hybrid", f"+data.num_classes={NUM_CLASSES}"]).model.act == "mish"
        with pytest.raises(ConfigCompositionException, match="widht"):
            compose(overrides=["+model=hybrid", "model.widht=0.5", f"+data.num_classes={NUM_CLASSES}"])


# --- every model x act x blurpool: forward, backward, shapes --------------------------------------------


@pytest.mark.parametrize("blurpool", [False, True], ids=["plain", "blurpool"])
@pytest.mark.parametrize("act", ["relu6", "mish"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_backward(name: str, act: str, blurpool: bool, images: torch.Tensor):
    torch.manual_seed(0)
    model = create_model(name, NUM_CLASSES, act=act, blurpool=blurpool).train()
    logits = model(small(images))
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    nn.functional.cross_entropy(logits, torch.tensor([0, 1])).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: {pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_non_square_and_tiny_inputs(name: str, images: torch.Tensor):
    """The official images are not square; 32 px runs leave 1x1 maps in the last stage."""
    model = create_model(name, NUM_CLASSES, blurpool=True).eval()
    with torch.no_grad():
        assert model(TF.resize(images[:1], [40, 56])).shape == (1, NUM_CLASSES)
        assert model(small(images, 1)).shape == (1, NUM_CLASSES)


def test_googlenet_aux_heads_in_training_only(images: torch.Tensor):
    model = create_model("googlenet", NUM_CLASSES, aux_logits=True, act="mish")
    out = model.train()(small(images, 2, 64))
    assert type(out) is tuple and len(out) == 3
    assert all(t.shape == (2, NUM_CLASSES) for t in out)
    assert not torch.equal(out[1], out[2])  # two distinct heads
    sum(o.sum() for o in out).backward()
    assert model.aux1.fc1.weight.grad is not None and model.aux2.fc2.weight.grad is not None
    assert isinstance(model.eval()(small(images, 2, 64)), torch.Tensor)
    # the aux heads' hidden activation follows `act` too (torchvision hard-codes F.relu there)
    assert isinstance(model.aux1.act, nn.Mish)
    plain = create_model("googlenet", NUM_CLASSES).train()
    assert isinstance(plain(small(images)), torch.Tensor) and plain.aux1 is None


# --- flags really change the network ---------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_act_replaces_every_activation(name: str, images: torch.Tensor):
    x = small(images)
    default_calls = activation_calls(create_model(name, NUM_CLASSES).eval(), x)
    assert set(default_calls) == {ACT_FUNCTION[DEFAULT_ACT[name]]}
    n_acts = default_calls[ACT_FUNCTION[DEFAULT_ACT[name]]]
    assert n_acts > 10
    for act in ("mish", "gelu"):
        model = create_model(name, NUM_CLASSES, act=act).eval()
        # the same number of activations, all of the chosen kind: none left behind, none dropped
        assert activation_calls(model, x) == Counter({ACT_FUNCTION[act]: n_acts}), act
        assert not any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in model.modules())


def _halving_layers(model: nn.Module, x: torch.Tensor) -> tuple[list[nn.Module], tuple[int, int]]:
    """Leaf modules that shrink a feature map to about half its size, and the last map's size."""
    found: list[nn.Module] = []
    last: list[tuple[int, int]] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if isinstance(module, nn.AdaptiveAvgPool2d) or out.dim() != 4:  # the global pool and the head
            return
        h_in, w_in = inputs[0].shape[-2:]
        h_out, w_out = out.shape[-2:]
        if h_out <= (h_in + 1) // 2 and w_out <= (w_in + 1) // 2 and (h_out, w_out) != (h_in, w_in):
            found.append(module)
        last.append((h_out, w_out))

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    with torch.no_grad():
        model.eval()(x)
    for handle in handles:
        handle.remove()
    return found, min(last)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_blurpool_blurs_every_stride_2_reduction(name: str, images: torch.Tensor):
    x = small(images, 1, 64)
    plain_layers, plain_size = _halving_layers(create_model(name, NUM_CLASSES), x)
    assert plain_layers and not any(isinstance(m, BlurPool) for m in plain_layers)
    model = create_model(name, NUM_CLASSES, blurpool=True)
    blur_layers, blur_size = _halving_layers(model, x)
    assert blur_layers and all(isinstance(m, BlurPool) for m in blur_layers), [type(m) for m in blur_layers]
    assert blur_size == plain_size == (2, 2)  # the same overall downsampling (64 px / 32)
    for m in model.modules():  # and nothing strided is left to subsample without a blur
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)) and not isinstance(m, BlurPool):
            assert max(torch.nn.modules.utils._pair(m.stride)) == 1, f"{name}: strided {m}"
    # anti-aliasing changes no parameter count (the blur filter is a fixed buffer)
    assert count_params(model) == count_params(create_model(name, NUM_CLASSES))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_block_drop_rate_puts_dropout_in_every_block(name: str, images: torch.Tensor):
    x = small(images)
    model = create_model(name, NUM_CLASSES, block_drop_rate=0.3)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout) and m.p == 0.3]
    assert len(drops) == BLOCK_DROPOUTS[name]
    # each dropout sits in a slot named for what it is: none poses as a squeeze-excite module
    assert not any(isinstance(getattr(m, "se", None), nn.Dropout) for m in model.modules())
    # timm zero-inits each ResNet branch's last BN scale, which would hide anything inside the branch at
    # init; unit scales stand in for a trained network
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
    with torch.no_grad():
        model.train()
        assert not torch.allclose(model(x), model(x))
        model.eval()
        assert torch.equal(model(x), model(x))
    # control: without the flag, train-mode outputs are deterministic (BN uses the same batch statistics)
    plain = create_model(name, NUM_CLASSES).train()
    with torch.no_grad():
        assert torch.equal(plain(x), plain(x))


class DropoutRecorder(TorchFunctionMode):
    """Records ``(p, input shape)`` of every active dropout call (``nn.Dropout`` and ``F.dropout`` alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[float, tuple[int, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is nn.functional.dropout:
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            if training and p > 0:
                self.calls.append((float(p), tuple(args[0].shape)))
        return func(*args, **kwargs)


def dropout_calls(model: nn.Module, x: torch.Tensor) -> list[tuple[float, tuple[int, ...]]]:
    with torch.no_grad(), DropoutRecorder() as rec:
        model(x)
    return rec.calls


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_drop_rate_is_dropout_before_the_classifier(name: str, images: torch.Tensor):
    x = small(images)
    model = create_model(name, NUM_CLASSES, drop_rate=0.5)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]  # the classifier
    # In training: exactly one dropout, of p = drop_rate, on the classifier's (batch, features) input.
    assert dropout_calls(model.train(), x) == [(0.5, (x.shape[0], head.in_features))]
    assert dropout_calls(model.eval(), x) == []
    assert dropout_calls(create_model(name, NUM_CLASSES).train(), x) == []  # default drop_rate = 0: none
    with torch.no_grad():
        assert not torch.allclose(model.train()(x), model(x))
        assert torch.equal(model.eval()(x), model(x))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_norm_none_removes_every_batchnorm(name: str, images: torch.Tensor):
    batch = create_model(name, NUM_CLASSES)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in batch.modules())
    assert n_bn > 10
    model = create_model(name, NUM_CLASSES, norm="none").train()
    assert not any(isinstance(m, nn.modules.batchnorm._NormBase) for m in model.modules())
    assert count_params(model) < count_params(batch)
    logits = model(small(images))
    assert torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # activations are kept when the norm they were fused with goes
    assert sum(activation_calls(model, small(images)).values()) == sum(
        activation_calls(batch, small(images)).values()
    )


# Residual branches per model: ResNet-34/50/50-D 3+4+6+3 blocks; MobileNetV2's blocks with a skip
# (stride 1, same width) 0+1+2+3+2+2+0; the hybrid's 17 blocks have two passes each.
RESIDUAL_BRANCHES = {"resnet18": 8, "resnet34": 16, "resnet50": 16, "resnet50d": 16, "mobilenetv2": 10, "hybrid": 34}


def zero_convs(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Conv2d) and not m.weight.any() for m in model.modules())


@pytest.mark.parametrize("name", sorted(RESIDUAL_BRANCHES))
def test_zero_init_last_is_a_flag_off_by_default(name: str, images: torch.Tensor):
    """The report had no zero-init fix: without BN the default keeps every branch's last conv random; the
    flag zeroes exactly one conv per residual branch, so each block starts as its shortcut and the logits
    stay O(1) however deep the network."""
    torch.manual_seed(0)
    plain = create_model(name, NUM_CLASSES, norm="none")
    torch.manual_seed(0)
    fixed = create_model(name, NUM_CLASSES, norm="none", zero_init_last=True)
    assert zero_convs(plain) == 0
    assert zero_convs(fixed) == RESIDUAL_BRANCHES[name]
    x = small(images)
    with torch.no_grad():
        out_plain, out_fixed = plain.eval()(x), fixed.eval()(x)
    assert torch.isfinite(out_plain).all() and out_fixed.abs().max() < 10
    assert out_fixed.abs().max() < out_plain.abs().max()  # the branches' sums no longer grow with depth
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(overrides=[f"+model={name}", f"+data.num_classes={NUM_CLASSES}"])
    assert cfg.model.zero_init_last is False  # the config default is the report's setting
    with pytest.raises(ValueError, match=r"zero_init_last=True only applies with norm='none'"):
        create_model(name, NUM_CLASSES, zero_init_last=True)  # BatchNorm: nothing to fix


# --- parameter counts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "flags", "reference"),
    [
        ("resnet18", {}, lambda: timm.create_model("resnet18", num_classes=NUM_CLASSES)),
        (
            "resnet18",
            {"width": 0.5},
            lambda: timm.create_model("resnet18", num_classes=NUM_CLASSES, channels=(32, 64, 128, 256), stem_width=32),
        ),
        ("resnet34", {}, lambda: timm.create_model("resnet34", num_classes=NUM_CLASSES)),
        ("resnet50", {}, lambda: timm.create_model("resnet50", num_classes=NUM_CLASSES)),
        ("resnet50d", {}, lambda: timm.create_model("resnet50d", num_classes=NUM_CLASSES)),
        ("mobilenetv2", {}, lambda: timm.create_model("mobilenetv2_100", num_classes=NUM_CLASSES)),
        (
            "mobilenetv2",
            {"width": 0.5},
            lambda: timm.create_model("mobilenetv2_050", num_classes=NUM_CLASSES),
        ),
        (
            "mobilenetv2",
            {"width": 1.4},
            lambda: timm.create_model("mobilenetv2_140", num_classes=NUM_CLASSES),
        ),
        (
            "googlenet",
            {},
            lambda: torchvision.models.googlenet(
                num_classes=NUM_CLASSES, aux_logits=False, init_weights=True
            ),
        ),
        (
            "googlenet",
            {"aux_logits": True},
            lambda: torchvision.models.googlenet(num_classes=NUM_CLASSES, aux_logits=True, init_weights=True),
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_library_parameter_parity(name: str, flags: dict, reference):
    assert count_params(create_model(name, NUM_CLASSES, **flags)) == count_params(reference())


def test_default_activations_match_the_libraries():
    mobilenet = timm.create_model("mobilenetv2_100")  # MobileNetV2's own ReLU6, as timm builds it
    assert any(isinstance(m, nn.ReLU6) for m in mobilenet.modules())
    assert any(isinstance(m, nn.ReLU6) for m in create_model("mobilenetv2").modules())


def test_hybrid_pinned_size_and_cost():
    model = create_model("hybrid", NUM_CLASSES)
    assert count_params(model) == 44_672_474
    assert count_params(model) > count_params(create_model("resnet50", NUM_CLASSES))  # the literal reading
    assert 5.80e9 < count_macs(model, 224) < 5.82e9
    blocks = [m for m in model.modules() if isinstance(m, HybridBlock)]
    assert len(blocks) == 17
    # branch widths: the RB's intermediate width equals the IR's (t * c_in) in every block
    assert all(b.rb.conv.conv.in_channels == b.ir.dw.conv.in_channels for b in blocks)
    assert sum(isinstance(b.shortcut, nn.Identity) for b in blocks) == 17 - 7  # one projection per stage


def _rb_3x3_weights(
    stages=(
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ),
) -> int:
    """Weights of all RB 3x3 convs at width 1 from the MobileNetV2 table: sum of 9 h^2, h = t * c_in."""
    total, c_in = 0, 32
    for t, c, n, _ in stages:
        for _ in range(n):
            total += 9 * (t * c_in) ** 2
            c_in = c
    return total


def test_hybrid_rb_groups_and_width():
    full = count_params(create_model("hybrid", NUM_CLASSES))
    grouped = create_model("hybrid", NUM_CLASSES, rb_groups=8)
    assert full - count_params(grouped) == _rb_3x3_weights() * 7 // 8
    narrow = create_model("hybrid", NUM_CLASSES, width=0.5)
    convs = [m for m in narrow.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.out_channels % 8 == 0 for m in convs)
    assert narrow.stem.conv.out_channels == 16 and narrow.num_features == 1280  # head kept, as MobileNetV2
    assert count_params(narrow) < full / 3
    with pytest.raises(ValueError, match="rb_groups=5"):
        create_model("hybrid", NUM_CLASSES, rb_groups=5)


def test_count_macs_on_a_known_layer():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False).train()
    assert count_macs(conv, 32) == 8 * 3 * 9 * 32 * 32
    assert conv.training  # mode restored


# --- bad input gets a clear error -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs", "error", "message"),
    [
        ("resnet101", {}, ValueError, "resnet50d"),  # unknown name lists the valid ones
        ("resnet50", {"widht": 0.5}, TypeError, "valid flags: .*width"),
        (
            "resnet50",
            {"width": 0.5},
            ValueError,
            r"'width' is not supported by 'resnet50'.*\['hybrid', 'mobilenetv2', 'resnet18'\]",
        ),
        (
            "googlenet",
            {"rb_groups": 2},
            ValueError,
            r"'rb_groups' is not supported by 'googlenet'.*\['hybrid'\]",
        ),
        (
            "hybrid",
            {"aux_logits": True},
            ValueError,
            r"'aux_logits' is not supported by 'hybrid'.*\['googlenet'\]",
        ),
        ("resnet50", {"act": "swish"}, ValueError, "act='swish'.*mish"),
        ("resnet50", {"norm": "layer"}, ValueError, "norm='layer'.*none"),
        ("resnet50", {"drop_rate": 1.0}, ValueError, r"drop_rate=1.0 .*\[0, 1\)"),
        ("hybrid", {"block_drop_rate": -0.1}, ValueError, "block_drop_rate"),
        ("hybrid", {"width": 0}, ValueError, "width=0"),
        ("hybrid", {"rb_groups": 0}, ValueError, "rb_groups=0"),
        ("googlenet", {"blurpool": "yes"}, ValueError, "blurpool"),
        ("hybrid", {"norm": "none", "zero_init_last": 1}, ValueError, "zero_init_last=1 must be true or false"),
        ("googlenet", {"norm": "none", "zero_init_last": True}, ValueError, "no residual branches"),
    ],
)
def test_bad_flags_fail_before_building(name: str, kwargs: dict, error: type, message: str):
    with pytest.raises(error, match=message):
        create_model(name, NUM_CLASSES, **kwargs)


def test_width_one_is_accepted_everywhere():
    # Hydra sweeps may pass width=1.0 to any model: it means "no multiplier"
    assert count_params(create_model("resnet34", NUM_CLASSES, width=1.0)) == 21_289_802
