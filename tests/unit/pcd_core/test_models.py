"""Tests for pcd_core.models, parametrized over every registered architecture (timm's idea):
a newly registered backbone or head is tested for forward, backward, taps and export without
anyone writing a test. Inputs are tiny (64x64) so the whole file runs in well under a minute
on two CPU cores.
"""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pcd_core.models import (
    SegmentationModel,
    WeightsError,
    build_model,
    build_model_from_spec,
    list_models,
    load_weights,
    save_weights,
)
from pcd_core.models.catalog import model_names
from pcd_core.models.layers import adaptive_avg_pool
from pcd_core.models.registry import HeadWidths, register_backbone, register_head
from pcd_core.spec import ModelSpec

ALL = list_models()
SMALL = [a for a in ALL if a.endswith(("resnet18", "mobilenet_v2"))]
TV_KEYS = json.loads((Path(__file__).parent / "data" / "torchvision_keys.json").read_text())
K = 5  # classes in the tiny models
SIZE = 64


def _image(batch: int = 1, h: int = SIZE, w: int = SIZE) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=ALL)
def os8_model(request: pytest.FixtureRequest) -> SegmentationModel:
    """One aux-enabled OS8 model per arch, shared by the tests that take it (pytest groups
    them, so one lives at a time): building ResNet-101s would dominate otherwise. Tests set
    train/eval mode and clear grads themselves."""
    return build_model(request.param, K, aux=True)


def _shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


# --- registry -------------------------------------------------------------------------------


def test_registry_matches_torch_free_catalogue() -> None:
    assert list_models() == model_names()


def test_registry_refuses_duplicate_names() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("resnet18")(lambda output_stride: torch.nn.Identity())
    with pytest.raises(ValueError, match="already registered"):
        register_head("fcn", widths=HeadWidths(1, 1))(lambda *a, **k: torch.nn.Identity())


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [("unet_resnet18", {}), ("fcn_resnet18", {"output_stride": 4}), ("fcn_vgg16", {})],
)
def test_build_refuses_bad_arguments(arch: str, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        build_model(arch, K, **kwargs)


def test_models_package_import_stays_torch_free() -> None:
    """The API imports pcd_core.spec (hence pcd_core.models.catalog) and must not load torch."""
    code = "import sys, pcd_core.spec; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- forward, taps, backward ----------------------------------------------------------------


def _check_forward(model: SegmentationModel, arch: str, output_stride: int) -> None:
    model.eval()
    with torch.no_grad():
        out = model(_image())
    h = SIZE // output_stride
    assert set(out) == {"out", "feat", "feat_preact", "backbone", "aux"}
    assert out["out"].shape == (1, K, SIZE, SIZE)
    assert out["aux"].shape == (1, K, SIZE, SIZE)
    assert out["feat"].shape == (1, model.feat_channels, h, h)
    # The pre-activation tap is what the tap's ReLU activates, intact (signed, not clipped).
    assert torch.equal(out["feat"], torch.relu(out["feat_preact"]))
    assert (out["feat_preact"] < 0).any()
    assert out["backbone"].shape == (1, model.backbone_channels, h, h)
    assert (model.arch, model.num_classes, model.output_stride) == (arch, K, output_stride)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_forward_shapes_os8(os8_model: SegmentationModel) -> None:
    _check_forward(os8_model, os8_model.arch, 8)


@pytest.mark.parametrize("arch", ALL)
def test_forward_shapes_os16(arch: str) -> None:
    _check_forward(build_model(arch, K, output_stride=16, aux=True), arch, 16)


def test_backward_reaches_every_parameter(os8_model: SegmentationModel) -> None:
    model = os8_model.train()
    model.zero_grad(set_to_none=True)
    out = model(_image(batch=2))  # batch 2: BatchNorm after global pooling needs > 1 value
    target = torch.randint(0, K, (2, SIZE, SIZE))
    loss = F.cross_entropy(out["out"], target) + 0.4 * F.cross_entropy(out["aux"], target)
    (loss + out["feat"].mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    model.zero_grad(set_to_none=True)  # free the gradients: the fixture outlives this test
    assert not missing, missing[:5]


def test_a_tap_whose_activation_is_in_place_is_refused() -> None:
    """An in-place ReLU at the tap would overwrite the pre-activation the tap hands on."""
    from pcd_core.models.heads import TappedSequential

    with pytest.raises(ValueError, match="not in place"):
        TappedSequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                         nn.Conv2d(4, K, 1), tap=2, channels=4)


def test_no_aux_key_without_aux_head_and_odd_input_size() -> None:
    model = build_model("deeplabv3_resnet18", K).eval()
    with torch.no_grad():
        out = model(_image(h=50, w=70))
    assert set(out) == {"out", "feat", "feat_preact", "backbone"}
    assert out["out"].shape == (1, K, 50, 70)


@pytest.mark.parametrize(
    ("arch", "feat", "backbone"),
    [
        ("deeplabv3_resnet18", 128, 512),
        ("deeplabv3_resnet34", 128, 512),
        ("deeplabv3_mobilenet_v2", 128, 320),
        ("deeplabv3_resnet50", 256, 2048),
        ("deeplabv3_resnet101", 256, 2048),
        ("pspnet_resnet18", 128, 512),
        ("pspnet_resnet50", 512, 2048),
        ("fcn_mobilenet_v2", 128, 320),
        ("fcn_resnet101", 512, 2048),
    ],
)
def test_default_widths(arch: str, feat: int, backbone: int) -> None:
    model = build_model(arch, K)
    assert (model.feat_channels, model.backbone_channels) == (feat, backbone)


@pytest.mark.parametrize("arch", ["deeplabv3_resnet18", "pspnet_mobilenet_v2", "fcn_resnet34"])
def test_head_channels_and_output_stride_32(arch: str) -> None:
    model = build_model(arch, K, head_channels=48, output_stride=32).eval()
    with torch.no_grad():
        out = model(_image())
    assert out["feat"].shape == (1, 48, 2, 2)
    assert model.feat_channels == 48


def test_build_from_spec() -> None:
    spec = ModelSpec(arch="pspnet_resnet18", output_stride=16, head_channels=64, aux=True)
    model = build_model_from_spec(spec, K)
    assert (model.arch, model.output_stride, model.feat_channels) == ("pspnet_resnet18", 16, 64)
    assert model.aux_classifier is not None


@pytest.mark.parametrize("size", [(8, 8), (6, 5), (13, 7), (3, 2)])
def test_export_safe_adaptive_pool_equals_torch(size: tuple[int, int]) -> None:
    x = torch.randn(2, 4, *size)
    for bins in (1, 2, 3, 6):
        torch.testing.assert_close(adaptive_avg_pool(x, bins), F.adaptive_avg_pool2d(x, bins))


# --- torchvision compatibility --------------------------------------------------------------


@pytest.mark.parametrize("aux", [False, True])
@pytest.mark.parametrize(
    "arch", ["deeplabv3_resnet50", "deeplabv3_resnet101", "fcn_resnet50", "fcn_resnet101"]
)
def test_state_dict_equals_torchvision(arch: str, aux: bool) -> None:
    expected = dict(TV_KEYS[arch])
    if aux:
        expected.update(TV_KEYS["aux:" + arch])
    got = _shapes(build_model(arch, 21, aux=aux))
    assert list(got) == list(expected)  # same keys in the same order
    assert got == expected


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34", "mobilenet_v2"])
def test_backbone_keys_equal_torchvision(backbone: str) -> None:
    got = _shapes(build_model("fcn_" + backbone, K).backbone)
    assert {"backbone." + k: v for k, v in got.items()} == TV_KEYS["backbone:" + backbone]


# --- export ---------------------------------------------------------------------------------


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        # Random-init logits reach tens; float32 reordering differs by ~1e-4 there.
        scale = float(a[key].abs().max()) + 1.0
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize(
    "arch", [a if a in SMALL else pytest.param(a, marks=pytest.mark.slow) for a in ALL]
)
def test_torchscript(arch: str) -> None:
    model = build_model(arch, K, aux=True).eval()
    scripted = torch.jit.script(model)
    with torch.no_grad():
        _assert_same(model(_image()), scripted(_image()))


@pytest.mark.filterwarnings("ignore")  # the legacy exporter's deprecation notices
@pytest.mark.parametrize(
    "arch", ["deeplabv3_resnet18", "pspnet_resnet18", "fcn_resnet18", "deeplabv3_mobilenet_v2"]
)
def test_onnx_export_parity_with_dynamic_size(arch: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = build_model(arch, K, aux=True, output_stride=16).eval()
    buf = io.BytesIO()
    names = ["out", "feat", "feat_preact", "backbone", "aux"]
    axes = {"image": {0: "batch", 2: "height", 3: "width"}}
    # The TorchScript-based exporter: opset 17 without the dynamo exporter's version converter.
    torch.onnx.export(
        model, (_image(),), buf, opset_version=17, dynamo=False,
        input_names=["image"], output_names=names, dynamic_axes=axes,
    )  # fmt: skip
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x = _image(batch=2, h=96, w=80)  # another size: PSP's 3x3/6x6 bins no longer divide it
    got = dict(zip(names, session.run(None, {"image": x.numpy()}), strict=True))
    with torch.no_grad():
        _assert_same(model(x), {k: torch.from_numpy(v) for k, v in got.items()})


# --- weights --------------------------------------------------------------------------------


class _NotATensor:
    """A class the weights-only unpickler must refuse; its __reduce__ would leave a trace."""

    def __init__(self, trace: str) -> None:
        self.trace = trace

    def __reduce__(self) -> tuple:
        return (Path(self.trace).touch, ())


@pytest.fixture(scope="module")
def small_model() -> torch.nn.Module:
    return build_model("fcn_mobilenet_v2", K)


def _fresh() -> torch.nn.Module:
    return build_model("fcn_mobilenet_v2", K)


def test_safetensors_round_trip(small_model: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(small_model, path)
    other = _fresh()
    load_weights(other, path)
    for key, value in small_model.state_dict().items():
        assert torch.equal(other.state_dict()[key], value), key
    load_weights(_fresh(), path.read_bytes())  # bytes work too


def test_torch_checkpoint_nested_with_ddp_prefix(small_model: torch.nn.Module) -> None:
    state = {"module." + k: v for k, v in small_model.state_dict().items()}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    buf = io.BytesIO()
    torch.save({"model_state": state, "iteration": 7, "optimizer": {"lr": 0.1}}, buf)
    other = _fresh()
    load_weights(other, buf.getvalue())
    key = "classifier.4.weight"
    assert torch.equal(other.state_dict()[key], small_model.state_dict()[key])


def test_refuses_missing_and_unexpected_keys(small_model: torch.nn.Module) -> None:
    state = dict(small_model.state_dict())
    del state["classifier.4.bias"]
    state["head.extra.weight"] = torch.zeros(1)
    buf = io.BytesIO()
    torch.save(state, buf)
    with pytest.raises(WeightsError, match=r"1 missing: classifier\.4\.bias") as info:
        load_weights(_fresh(), buf.getvalue())
    assert "1 unexpected: head.extra.weight" in str(info.value)
    assert info.value.reason == "mismatch"


def test_refuses_wrong_shapes(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_weights(build_model("fcn_mobilenet_v2", K + 1), path)
    with pytest.raises(WeightsError, match=r"2 shape-mismatched: classifier\.4\.weight") as info:
        load_weights(_fresh(), path)
    assert "(checkpoint (6, 128, 1, 1), model (5, 128, 1, 1))" in str(info.value)


def test_refuses_pickled_code(small_model: torch.nn.Module, tmp_path: Path) -> None:
    trace = tmp_path / "code-ran"
    buf = io.BytesIO()
    torch.save({"model": small_model.state_dict(), "extra": _NotATensor(str(trace))}, buf)
    with pytest.raises(WeightsError, match="weights-only") as info:
        load_weights(_fresh(), buf.getvalue())
    assert info.value.reason == "unreadable"
    with pytest.raises(WeightsError):  # a plain (non-zip) pickle is refused the same way
        load_weights(_fresh(), pickle.dumps({"model": _NotATensor(str(trace))}, protocol=2))
    assert not trace.exists()


@pytest.mark.parametrize("data", [b"", b"not a checkpoint at all", b"\x08" + b"\0" * 7 + b"{x"])
def test_refuses_garbage(data: bytes) -> None:
    with pytest.raises(WeightsError) as info:
        load_weights(_fresh(), data)
    assert info.value.reason == "unreadable"


def test_refuses_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="cannot read"):
        load_weights(_fresh(), tmp_path / "absent.safetensors")
