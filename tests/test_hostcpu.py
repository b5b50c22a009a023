"""Tests of tfmochi.hostcpu: /proc/cpuinfo read for its flags and bfloat16 units."""

import pytest

from tfmochi import hostcpu

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse avx2 fma{extra}

processor\t: 1
flags\t\t: a later block, not read
"""
ARM = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd sve{extra}
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize("text, units", [
    (X86.format(extra=""), False),  # AVX2 only (AMD Zen 3)
    (X86.format(extra=" avx512f avx512_bf16"), True),  # AMD Zen 4
    (X86.format(extra=" avx512f amx_tile amx_bf16"), True),  # Intel Sapphire Rapids
    (X86.format(extra=" avx512f avx512_vnni"), False),  # AVX-512 without BF16 (Ice Lake)
    (ARM.format(extra=""), False),
    (ARM.format(extra=" bf16 i8mm"), True),  # Graviton 3, Neoverse V1
    ("processor\t: 0\nmodel name\t: no flags line\n", None),
])
def test_bfloat16_units_from_the_first_processors_flags(tmp_path, text, units):
  path = tmp_path / "cpuinfo"
  path.write_text(text)
  assert hostcpu.has_bfloat16_units(str(path)) is units


def test_a_missing_cpuinfo_is_unknown(tmp_path):
  missing = str(tmp_path / "missing")
  assert hostcpu.cpuinfo(missing) == {}
  assert hostcpu.has_bfloat16_units(missing) is None


def test_flags_and_fields_of_the_first_block(tmp_path):
  path = tmp_path / "cpuinfo"
  path.write_text(X86.format(extra=" avx512f"))
  info = hostcpu.cpuinfo(str(path))
  assert info["model name"] == "AMD EPYC"
  assert hostcpu.cpu_flags(info) == {"fpu", "sse", "avx2", "fma", "avx512f"}
  assert hostcpu.cpu_flags({"Features": "fp asimd"}) == {"fp", "asimd"}
