"""Export writes every deployable form, checks it against eager, and loads back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import pcd_core.export as export_mod
from pcd_core.export import ExportParityError, export_student, load_student
from pcd_core.models import build_model

HW = (32, 48)


def _kwargs(model: torch.nn.Module) -> dict:
    return {"spec_hash": "abc", "arch": "deeplabv3_resnet18", "num_classes": 3,
            "class_names": ["a", "b", "c"], "mean": (0.5, 0.5, 0.5), "std": (0.2, 0.2, 0.2),
            "output_stride": 16, "head_channels": 16, "ignore_index": 255, "input_hw": HW}


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    # aux=True: the exported student must drop the aux head
    return build_model("deeplabv3_resnet18", 3, output_stride=16, head_channels=16, aux=True)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:DeprecationWarning")
def test_export_all_formats_with_parity_and_round_trip(model: torch.nn.Module, tmp_path: Path):
    torch.set_num_threads(1)
    report = export_student(model, tmp_path, **_kwargs(model))
    for name in ("student.safetensors", "model.json", "student.torchscript.pt", "student.onnx"):
        assert (tmp_path / name).is_file(), name
    assert set(report.max_abs_diff) == {"torchscript", "onnx"}
    assert all(v <= 1e-3 for v in report.max_abs_diff.values())
    meta = json.loads((tmp_path / "model.json").read_text())
    for key in ("arch", "num_classes", "class_names", "mean", "std", "output_stride",
                "head_channels", "spec_hash", "input_hw", "torch_version", "created_at",
                "parity_max_abs_diff"):
        assert key in meta, key
    weights = load_file(str(tmp_path / "student.safetensors"))
    assert not any(k.startswith("aux_classifier.") for k in weights)

    loaded, meta2 = load_student(tmp_path)
    x = torch.randn(1, 3, 40, 56)  # another size: dynamic H/W
    with torch.no_grad():
        ref = model.eval()(x)["out"]
        assert torch.equal(loaded(x)["out"], ref)
        ts = torch.jit.load(str(tmp_path / "student.torchscript.pt"))
        assert torch.allclose(ts(x), ref, atol=1e-4)
    onnx_out = export_mod.run_onnx(tmp_path / "student.onnx", x)
    assert torch.allclose(onnx_out, ref, atol=1e-3)
    assert meta2["class_names"] == ["a", "b", "c"]


def test_parity_failure_raises(model: torch.nn.Module, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch):
    real = export_mod.export_torchscript

    def corrupting(wrapper: torch.nn.Module, path: Path) -> None:
        with torch.no_grad():  # an exported graph that is subtly wrong
            wrapper.model.classifier[-1].bias.add_(0.5)
        real(wrapper, path)

    monkeypatch.setattr(export_mod, "export_torchscript", corrupting)
    with pytest.raises(ExportParityError, match="torchscript"):
        export_student(model, tmp_path, formats=("safetensors", "torchscript"), **_kwargs(model))


def test_unknown_format_is_refused(model: torch.nn.Module, tmp_path: Path):
    with pytest.raises(ValueError, match="unknown export formats"):
        export_student(model, tmp_path, formats=("pickle",), **_kwargs(model))


@pytest.mark.slow
def test_parity_tolerance_is_relative_to_logit_scale(model: torch.nn.Module, tmp_path: Path):
    """Logits of ~1e6 (a barely trained net on random input) differ in float32 by units
    between onnxruntime and eager: that is rounding, not a wrong graph, and must pass."""
    with torch.no_grad():
        model.classifier[-1].weight.mul_(1e6)
    report = export_student(model, tmp_path, formats=("safetensors", "onnx"), **_kwargs(model))
    assert report.logit_scale > 1e5
    assert report.max_abs_diff["onnx"] <= 1e-3 * report.logit_scale
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["parity_logit_scale"] == report.logit_scale
