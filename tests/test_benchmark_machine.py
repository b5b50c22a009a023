"""Tests of tfmochi.benchmark.machine and of --what=versus's plumbing (no timing)."""

import sys

import pytest

from tfmochi.benchmark import machine
from tfmochi.benchmark import versus

CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni

processor\t: 1
model name\t: another block, not read
"""


def test_cpu_description_reads_the_model_and_isa_flags(tmp_path):
  path = tmp_path / "cpuinfo"
  path.write_text(CPUINFO)
  got = machine.cpu_description(str(path))
  assert got["cpu_model"] == "AMD EPYC 9R14"
  assert (got["cpu_family"], got["cpu_model_number"]) == ("25", "17")
  assert got["isa"] == {"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_tile": False,
                        "amx_bf16": False}
  assert machine.cpu_description(str(tmp_path / "missing"))["cpu_model"] is None


def test_machine_info_has_the_fields_of_every_figure():
  gemm = {"before": machine.gemm_gflops(n=256, repeats=2), "after": 50.0}
  info = machine.machine_info("tensorflow", gemm)
  for key in ("cpu_model", "isa", "tensorflow", "keras", "torch", "intra_op_threads",
              "inter_op_threads", "gemm_f32_gflops", "gemm_f32_peak_gflops", "loadavg"):
    assert key in info, key
  assert set(info["isa"]) >= {"avx2", "avx512f", "avx512_bf16", "amx_tile"}
  assert info["intra_op_threads"] >= 1 and info["library"] == "tensorflow"
  assert info["gemm_f32_peak_gflops"] == round(max(gemm.values()), 1) > 0
  with pytest.raises(ValueError, match="tensorflow or torch"):
    machine.gemm_gflops("jax")


def test_versus_children_inherit_the_training_flags_not_the_orchestrators():
  argv = ["--what=versus", "--arch=resnet50", "--output=/tmp/x.jsonl", "--rounds=3",
          "--versus=tfmochi,peer", "--image_size=96"]
  command = versus.child_command(argv, "tfmochi_bf16")
  assert command[:3] == [sys.executable, "-m", "tfmochi.benchmark"]
  assert command[3:5] == ["--arch=resnet50", "--image_size=96"]
  assert "--what=step" in command and "--mixed_precision=bfloat16" in command
  assert "--mochi_num_hard=0" in command
  assert "--what=peer" in versus.child_command(argv, "peer")
  with pytest.raises(ValueError, match="variants must be among"):
    versus.bench_versus(argv, ["keras"], 1)


def test_versus_summary_takes_medians_over_rounds():
  def run(variant, rate):
    return {"variant": variant, "variants": {"x": {"images_per_sec": rate}},
            "machine": {"gemm_f32_peak_gflops": 80.0}}
  runs = [run("tfmochi", 10.0), run("peer", 5.0), run("tfmochi", 12.0), run("peer", 7.0),
          run("tfmochi", 11.0), run("peer", 6.0)]
  out = versus.summarize(runs, ["tfmochi", "peer"])
  assert out["summary"]["tfmochi"]["images_per_sec"] == [10.0, 12.0, 11.0]
  assert out["ratio_tfmochi_over_peer"] == pytest.approx(11.0 / 6.0)
  assert "ratio_bf16_over_float32" not in out
