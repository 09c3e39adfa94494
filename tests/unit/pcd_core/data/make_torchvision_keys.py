"""Regenerate ``torchvision_keys.json``: state-dict keys and shapes of torchvision's models.

Not a test and not run by tests. Needs torchvision (not a project dependency):

    python tests/unit/pcd_core/data/make_torchvision_keys.py [--check]

``--check`` compares against the stored file instead of writing it. The CPU dev box has a
torchvision wheel whose C extension does not load; ``_import_models`` sidesteps the package
``__init__`` (only the pure-Python model definitions are needed).
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

OUT = Path(__file__).with_name("torchvision_keys.json")
NUM_CLASSES = 21  # torchvision's default (VOC); tests build with the same count


def _import_models() -> types.ModuleType:
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError):
        spec = importlib.util.find_spec("torchvision")
        if spec is None or spec.submodule_search_locations is None:
            raise SystemExit("torchvision is not installed") from None
        sys.modules.pop("torchvision", None)
        pkg = types.ModuleType("torchvision")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["torchvision"] = pkg
    return importlib.import_module("torchvision.models")


def _shapes(state: dict, rename=lambda k: k) -> dict[str, list[int]]:
    return {rename(k): list(v.shape) for k, v in state.items()}


def collect() -> dict[str, dict[str, list[int]]]:
    tvm = _import_models()
    seg = tvm.segmentation
    data: dict[str, dict[str, list[int]]] = {}
    for name in ("deeplabv3_resnet50", "deeplabv3_resnet101", "fcn_resnet50", "fcn_resnet101"):
        model = getattr(seg, name)(
            weights=None, weights_backbone=None, num_classes=NUM_CLASSES, aux_loss=True
        )
        state = _shapes(model.state_dict())
        # Stored apart: a model built without aux has exactly the keys of ``name``.
        data[name] = {k: v for k, v in state.items() if not k.startswith("aux_classifier.")}
        data["aux:" + name] = {k: v for k, v in state.items() if k.startswith("aux_classifier.")}
    # Backbones without a torchvision segmentation model: ImageNet classifiers as
    # torchvision's segmentation code would wrap them (no fc; mobilenet_v2 features[:18]).
    for name in ("resnet18", "resnet34"):
        state = getattr(tvm, name)().state_dict()
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        data["backbone:" + name] = _shapes(state, lambda k: "backbone." + k)
    state = tvm.mobilenet_v2().state_dict()
    state = {
        k: v for k, v in state.items() if k.startswith("features.") and k.split(".")[1] != "18"
    }
    data["backbone:mobilenet_v2"] = _shapes(state, lambda k: "backbone." + k[len("features.") :])
    return data


def _dumps(data: dict[str, dict[str, list[int]]]) -> str:
    """JSON with one ``"key": [shape]`` per line, so diffs stay readable."""
    groups = []
    for name, keys in data.items():
        rows = ",\n".join(f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in keys.items())
        groups.append(f"  {json.dumps(name)}: {{\n{rows}\n  }}")
    return "{\n" + ",\n".join(groups) + "\n}\n"


if __name__ == "__main__":
    fresh = collect()
    if "--check" in sys.argv:
        stored = json.loads(OUT.read_text())
        sys.exit(0 if stored == fresh else f"{OUT.name} differs from installed torchvision")
    OUT.write_text(_dumps(fresh))
    print(f"wrote {OUT} ({sum(len(v) for v in fresh.values())} keys)")
