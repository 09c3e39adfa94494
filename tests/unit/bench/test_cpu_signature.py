"""bench/_prodfacts.cpu_signature: the CPU kind behind a vague model name."""

from __future__ import annotations

from bench._prodfacts import cpu_signature

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1

processor\t: 1
cpu family\t: 99
model\t\t: 98
stepping\t: 97
"""


def test_the_first_processor_names_the_kind() -> None:
    assert cpu_signature(CPUINFO) == "family 25 model 17 stepping 1"


def test_without_the_fields_there_is_no_signature() -> None:
    assert cpu_signature("processor\t: 0\nmodel name\t: Apple M2\n") is None
    assert cpu_signature("") is None
