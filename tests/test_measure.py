"""The machine line names the CPU and its bf16 units, read from /proc/cpuinfo's first processor."""

from __future__ import annotations

import pytest

from cvg import hardware, measure

CPUINFO = """processor\t: 0
model name\t: Example CPU 9000
flags\t\t: fpu sse avx2 {flags}

processor\t: 1
model name\t: Example CPU 9000
flags\t\t: fpu sse avx2 {flags}
"""


@pytest.mark.parametrize(
    ("flags", "units"),
    [
        ("avx512f avx512_bf16 amx_tile amx_bf16", "amx_bf16+avx512_bf16"),
        ("avx512f avx512_bf16", "avx512_bf16"),
        ("avx512f", "no bf16 units"),
    ],
)
def test_machine_line_names_model_and_bf16_units(monkeypatch, flags, units):
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: CPUINFO.format(flags=flags))
    line = measure.machine_line()
    assert line.startswith("CPU (Example CPU 9000, ")
    assert f", {units}, torch " in line


def test_machine_line_without_cpuinfo(monkeypatch):
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: "")
    assert ", no bf16 units, torch " in measure.machine_line()


@pytest.mark.parametrize(
    ("flags", "precision"),
    [("avx512f avx512_bf16 amx_tile amx_bf16", "bfloat16"), ("avx512f avx512_bf16", "bfloat16"), ("", "float32")],
)
def test_auto_precision_is_bf16_only_where_the_cpu_has_bf16_units(monkeypatch, flags, precision):
    monkeypatch.setattr(hardware, "_cpuinfo", lambda: CPUINFO.format(flags=flags))
    assert hardware.fast_precision() == precision
    assert hardware.fast_precision("cuda") == "bfloat16"
