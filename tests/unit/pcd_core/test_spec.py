"""The run spec: per-method defaults of the loss weight and temperature; hash stability."""

from __future__ import annotations

import hashlib
import json

import pytest
from pydantic import ValidationError

from pcd_core.spec import METHOD_DEFAULTS, MethodSpec, RunSpec


@pytest.mark.parametrize("name", ["kd", "cwd", "pcd"])
def test_left_out_weight_and_tau_take_the_methods_recipe(name: str):
    m = MethodSpec.model_validate({"name": name})
    assert (m.weight, m.tau) == (METHOD_DEFAULTS[name]["weight"], METHOD_DEFAULTS[name]["tau"])


def test_only_pcd_decays_its_weight_by_default_and_an_explicit_schedule_wins():
    assert MethodSpec().weight_schedule == "linear_decay"  # pcd, the default method
    assert MethodSpec.model_validate({"name": "kd"}).weight_schedule == "constant"
    assert MethodSpec.model_validate({"name": "cwd"}).weight_schedule == "constant"
    assert MethodSpec.model_validate({"name": "none"}).weight_schedule == "constant"
    kept = MethodSpec.model_validate({"name": "pcd", "weight_schedule": "constant"})
    assert kept.weight_schedule == "constant"


def test_a_constant_pcd_spec_keeps_the_hash_it_had_before_the_schedule_existed():
    explicit = _run_spec(weight_schedule="constant")
    assert explicit.spec_hash() == _hash_before_later_fields(explicit) != _run_spec().spec_hash()


def test_kd_defaults_differ_from_pcd_and_explicit_values_win():
    kd = MethodSpec.model_validate({"name": "kd"})
    assert (kd.weight, kd.tau) == (1.0, 1.0)  # CIRKD's pixel-wise KD recipe
    assert (MethodSpec().weight, MethodSpec().tau) == (3.0, 4.0)  # pcd, the default method
    mixed = MethodSpec.model_validate({"name": "kd", "tau": 2.5})
    assert (mixed.weight, mixed.tau) == (1.0, 2.5)


def test_resolved_defaults_survive_a_dump_and_reload():
    kd = MethodSpec.model_validate({"name": "kd"})
    again = MethodSpec.model_validate(kd.model_dump())
    assert again == kd


def _run_spec(**method: object) -> RunSpec:
    return RunSpec.model_validate({
        "dataset": {"uri": "/data", "num_classes": 3},
        "student": {"arch": "deeplabv3_resnet18"},
        "teacher": {"arch": "deeplabv3_resnet50", "checkpoint": "/t.safetensors"},
        "method": {"name": "pcd", **method},
    })


def _hash_before_later_fields(spec: RunSpec) -> str:
    """The hash of ``spec`` as computed before prune/adapter/weight_schedule/logit_kd_tau/
    logit_kd_schedule."""
    data = spec.model_dump(mode="json")
    for later in ("prune", "adapter", "weight_schedule", "logit_kd_tau", "logit_kd_schedule"):
        del data["method"][later]
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def test_a_later_field_at_its_default_leaves_the_hash_as_before_it_existed():
    spec = _run_spec(weight_schedule="constant")
    before = _hash_before_later_fields(spec)
    assert spec.spec_hash() == before
    changed = [_run_spec(prune="class_balanced", weight_schedule="constant"),
               _run_spec(adapter=True, weight_schedule="constant"),
               _run_spec(weight_schedule="linear_decay"),
               _run_spec(logit_kd_weight=1.0, logit_kd_tau=1.0, weight_schedule="constant"),
               _run_spec(logit_kd_weight=1.0, weight_schedule="constant"),
               _run_spec(logit_kd_weight=1.0, logit_kd_schedule="constant")]
    assert len({before, *(c.spec_hash() for c in changed)}) == 7


def test_adapter_is_refused_outside_pcd():
    with pytest.raises(ValidationError, match="adapter applies to method 'pcd' only"):
        _run_spec(name="cwd", adapter=True)
