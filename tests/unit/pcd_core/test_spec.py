"""The run spec: per-method defaults of the loss weight and temperature; hash stability."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from pcd_core.spec import METHOD_DEFAULTS, MethodSpec, RunSpec, load_spec


@pytest.mark.parametrize("name", ["kd", "cwd", "pcd"])
def test_left_out_weight_and_tau_take_the_methods_recipe(name: str):
    m = MethodSpec.model_validate({"name": name})
    assert (m.weight, m.tau) == (METHOD_DEFAULTS[name]["weight"], METHOD_DEFAULTS[name]["tau"])


def test_pcd_adds_pixel_kd_at_the_kd_baselines_recipe_and_explicit_values_win():
    pcd = MethodSpec()  # pcd, the default method
    kd = MethodSpec.model_validate({"name": "kd"})
    assert (pcd.logit_kd_weight, pcd.logit_kd_tau) == (kd.weight, kd.tau) == (1.0, 1.0)
    assert (pcd.weight, pcd.tau) == (1.0, 4.0)
    for name in ("kd", "cwd", "none"):
        other = MethodSpec.model_validate({"name": name})
        assert (other.logit_kd_weight, other.logit_kd_tau) == (0.0, None)


def test_the_previous_default_spelled_out_resolves_to_what_it_resolved_to_before():
    """Weight 3 decaying, no KD: the PCD every job ran from 2026-11-25 to 2026-12-01. Equal
    resolved fields mean an equal spec hash, so its finished runs and checkpoints still match."""
    before = {"name": "pcd", "weight": 3.0, "tau": 4.0, "weight_schedule": "linear_decay",
              "logit_kd_weight": 0.0, "logit_kd_tau": None, "logit_kd_schedule": None}
    spelled = MethodSpec.model_validate(
        {"name": "pcd", "weight": 3.0, "weight_schedule": "linear_decay", "logit_kd_weight": 0})
    dumped = spelled.model_dump()
    assert {k: dumped[k] for k in before} == before
    # a temperature the spec does give is kept, even with the term off
    assert MethodSpec.model_validate({"logit_kd_weight": 0, "logit_kd_tau": 2}).logit_kd_tau == 2


def test_every_method_keeps_a_constant_weight_unless_told_otherwise():
    for name in ("pcd", "kd", "cwd", "none"):
        assert MethodSpec.model_validate({"name": name}).weight_schedule == "constant"


def test_a_pcd_spec_written_before_the_later_fields_keeps_its_hash():
    explicit = _run_spec(**OLD_PCD)
    assert explicit.spec_hash() == _hash_before_later_fields(explicit) != _run_spec().spec_hash()


def test_kd_defaults_differ_from_pcd_and_explicit_values_win():
    kd = MethodSpec.model_validate({"name": "kd"})
    assert (kd.weight, kd.tau) == (1.0, 1.0)  # CIRKD's pixel-wise KD recipe
    assert (MethodSpec().weight, MethodSpec().tau) == (1.0, 4.0)  # pcd, the default method
    mixed = MethodSpec.model_validate({"name": "kd", "tau": 2.5})
    assert (mixed.weight, mixed.tau) == (1.0, 2.5)


def test_resolved_defaults_survive_a_dump_and_reload():
    kd = MethodSpec.model_validate({"name": "kd"})
    again = MethodSpec.model_validate(kd.model_dump())
    assert again == kd


# A PCD method as specs spelled it before the later fields existed: no logit KD, and (since
# 2026-12-01 the default differs) weight 3 written out.
OLD_PCD: dict[str, object] = {"weight": 3.0, "logit_kd_weight": 0.0}


def _run_spec(**method: object) -> RunSpec:
    return RunSpec.model_validate({
        "dataset": {"uri": "/data", "num_classes": 3},
        "student": {"arch": "deeplabv3_resnet18"},
        "teacher": {"arch": "deeplabv3_resnet50", "checkpoint": "/t.safetensors"},
        "method": {"name": "pcd", **method},
    })


def _hash_before_later_fields(spec: RunSpec) -> str:
    """The hash of ``spec`` as computed before prune/adapter/weight_schedule/logit_kd_tau/
    logit_kd_schedule/feature_loss (method) and class_weights (train)."""
    data = spec.model_dump(mode="json")
    for later in ("prune", "adapter", "weight_schedule", "logit_kd_tau", "logit_kd_schedule",
                  "feature_loss"):
        del data["method"][later]
    del data["train"]["class_weights"]
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def test_a_later_field_at_its_default_leaves_the_hash_as_before_it_existed():
    spec = _run_spec(**OLD_PCD)
    before = _hash_before_later_fields(spec)
    assert spec.spec_hash() == before
    changed = [_run_spec(**{**OLD_PCD, "prune": "class_balanced"}),
               _run_spec(**{**OLD_PCD, "adapter": True}),
               _run_spec(**{**OLD_PCD, "weight_schedule": "linear_decay"}),
               _run_spec(**{**OLD_PCD, "logit_kd_weight": 1.0, "logit_kd_tau": 1.0}),
               _run_spec(**{**OLD_PCD, "logit_kd_weight": 1.0, "logit_kd_tau": None}),
               _run_spec(**{**OLD_PCD, "logit_kd_weight": 1.0, "logit_kd_schedule": "constant"}),
               _run_spec(**{**OLD_PCD, "feature_loss": "pearson"}),
               _run_spec(**{**OLD_PCD, "feature_loss": "class_profile"})]
    weighted = _run_spec(**OLD_PCD).model_dump()
    weighted["train"]["class_weights"] = "median_frequency"
    changed.append(RunSpec.model_validate(weighted))
    assert len({before, *(c.spec_hash() for c in changed)}) == 10


def test_feature_loss_is_refused_outside_pcd():
    with pytest.raises(ValidationError, match="feature_loss applies to method 'pcd' only"):
        MethodSpec(name="cwd", feature_loss="pearson")


def test_adapter_is_refused_outside_pcd():
    with pytest.raises(ValidationError, match="adapter applies to method 'pcd' only"):
        _run_spec(name="cwd", adapter=True)


EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_spec_validates_and_survives_a_dump_and_reload(path: Path):
    spec = load_spec(path.read_text())
    assert RunSpec.model_validate(spec.model_dump()).spec_hash() == spec.spec_hash()


def test_the_camvid_pcd_example_spells_out_the_default_method():
    spec = load_spec((EXAMPLES / "camvid_pcd_r18.yaml").read_text())
    assert spec.method == MethodSpec()
