"""`python -m tfmochi.benchmark`: the flags, one benchmark run, one JSON line on stdout."""

from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags

from tfmochi import config as config_lib
from tfmochi.benchmark import convs
from tfmochi.benchmark import encoder
from tfmochi.benchmark import head
from tfmochi.benchmark import input_pipeline
from tfmochi.benchmark import machine
from tfmochi.benchmark import step
from tfmochi.benchmark import versus

WHATS = ("step", "head", "encoder", "convs", "input", "peer", "versus")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The training flags plus the benchmark's own (idempotent)."""
  config_lib.define_flags(flag_values)
  if "what" in flag_values:
    return
  flags.DEFINE_enum("what", "head", WHATS, "What to time: step (full training step), head "
                    "(contrastive head, MoCo vs MoCHi), encoder (one encoder's forward, and "
                    "forward + backward), convs (each distinct convolution of the backbone, "
                    "tfmochi's kernels vs Keras's), input (augmentation pipeline), peer "
                    "(MoCo v2's step in PyTorch; the bench extra) or versus (tfmochi's MoCo v2 "
                    "step and the peer, one process each, alternating --rounds times).",
                    flag_values=flag_values)
  flags.DEFINE_list("versus", ["tfmochi", "peer", "tfmochi_bf16"], "--what=versus: the variants "
                    f"each round runs, in order, among {', '.join(versus.VARIANTS)}.",
                    flag_values=flag_values)
  flags.DEFINE_integer("rounds", 2, "--what=versus: alternating rounds of the variants.",
                       lower_bound=1, flag_values=flag_values)
  flags.DEFINE_integer("warmup_steps", 3, "Untimed calls per variant before timing.",
                       lower_bound=1, flag_values=flag_values)
  flags.DEFINE_integer("timed_steps", 5, "Timed calls per variant (the median is reported).",
                       lower_bound=5, flag_values=flag_values)
  flags.DEFINE_bool("compare_moco", True, "--what=step with MoCHi on: also time the same step "
                    "without MoCHi, interleaved, and report the ratio.", flag_values=flag_values)
  flags.DEFINE_bool("compare_keras_conv", False, "--what=step: also time the first variant with "
                    "plain keras Conv2D and BatchNormalization layers (--fast_grad=false); "
                    "--what=encoder: also the encoder with them.",
                    flag_values=flag_values)
  flags.DEFINE_bool("compare_jit", False, "--what=step: also time the first variant with the "
                    "replica step compiled by XLA (--jit_compile=true), interleaved.",
                    flag_values=flag_values)
  flags.DEFINE_bool("compare_topn", False, "--what=head: also time the MoCHi head compiled by "
                    "XLA with the exact and the approximate top-N (--mochi_topn).",
                    flag_values=flag_values)
  flags.DEFINE_bool("compare_plain", False, "--what=head: also time both heads as plain ops "
                    "with autodiff (objective jit_compile=False).", flag_values=flag_values)
  flags.DEFINE_integer("profile_calls", 0, "--what=encoder: also profile this many calls of the "
                       "forward and of the forward + backward with TensorFlow's profiler and "
                       "report the time per op type (0: off).", lower_bound=0,
                       flag_values=flag_values)
  flags.DEFINE_integer("steps_per_call", 1, "Steps (or input batches) per timed call.",
                       lower_bound=1, flag_values=flag_values)
  _define_input_flags(flag_values)
  flags.DEFINE_integer("intra_op_threads", 0, "TensorFlow intra-op threads (0: its default).",
                       lower_bound=0, flag_values=flag_values)
  flags.DEFINE_integer("inter_op_threads", 0, "TensorFlow inter-op threads (0: its default).",
                       lower_bound=0, flag_values=flag_values)
  flags.DEFINE_string("output", None, "Also append the JSON line to this file.",
                      flag_values=flag_values)


def _define_input_flags(flag_values: flags.FlagValues) -> None:
  """--what=input's own flags."""
  flags.DEFINE_enum("input_source", "synthetic", ("synthetic", "dataset", "jpeg"),
                    "--what=input: random uint8 images in memory, --dataset itself, or "
                    "--source_images real 500x375 JPEG photos in TFRecords (decoded per view "
                    "with the crop fused into the decode, as in training from TFRecords).",
                    flag_values=flag_values)
  flags.DEFINE_string("jpeg_dir", "/tmp/tfmochi_bench_jpeg", "--input_source=jpeg: where the "
                      "generated TFRecords are written (reused when present).",
                      flag_values=flag_values)
  flags.DEFINE_bool("input_fused_decode", True, "--what=input: decode only each view's crop "
                    "window of a JPEG (as training does); false: the whole image once for both "
                    "views.", flag_values=flag_values)
  flags.DEFINE_integer("input_threads", 0, "--what=input: threads of the input pipeline (0: "
                       "tf.data's default); the result also gives images/s per thread.",
                       lower_bound=0, flag_values=flag_values)
  flags.DEFINE_integer("source_size", 256, "--what=input: side of the synthetic source images.",
                       lower_bound=8, flag_values=flag_values)
  flags.DEFINE_integer("source_images", 512, "--what=input: number of synthetic source images.",
                       lower_bound=1, flag_values=flag_values)


def run(what: str, config: config_lib.TrainConfig, *, warmup: int = 3, timed: int = 5,
        steps_per_call: int = 1, compare_moco: bool = True, compare_keras_conv: bool = False,
        source=None, input_threads: int = 0, input_fused_decode: bool = True,
        compare_jit: bool = False, compare_topn: bool = False,
        compare_plain: bool = False, profile_calls: int = 0) -> dict:
  """Runs one benchmark and returns its JSON-able result (with the machine description)."""
  if timed < 5:
    raise ValueError(f"timed must be >= 5 (a median of fewer steps is noise), got {timed}.")
  library = "torch" if what == "peer" else "tensorflow"
  gemm_before = machine.gemm_gflops(library)
  if what == "peer":
    from tfmochi.benchmark import peer  # pylint: disable=g-import-not-at-top (the bench extra)
    out = peer.bench_peer(config, warmup=warmup, timed=timed, steps_per_call=steps_per_call)
  elif what == "head":
    out = head.bench_head(config, warmup=warmup, timed=timed, compare_topn=compare_topn,
                          compare_plain=compare_plain)
  elif what == "encoder":
    out = encoder.bench_encoder(config, warmup=warmup, timed=timed,
                                compare_keras_conv=compare_keras_conv,
                                profile_calls=profile_calls)
  elif what == "convs":
    out = convs.bench_convs(config, warmup=warmup, timed=timed)
  elif what == "step":
    out = step.bench_step(config, warmup=warmup, timed=timed, steps_per_call=steps_per_call,
                     compare_moco=compare_moco, compare_keras_conv=compare_keras_conv,
                     compare_jit=compare_jit)
  elif what == "input":
    out = input_pipeline.bench_input(config, warmup=warmup, timed=timed, source=source,
                      steps_per_call=steps_per_call, threads=input_threads,
                      fused_decode=input_fused_decode)
  else:
    raise ValueError(f"what must be one of {', '.join(WHATS)}; got {what!r}.")
  out["warmup_steps"], out["timed_steps"] = warmup, timed
  gemm = {"before": gemm_before, "after": machine.gemm_gflops(library)}
  out["machine"] = machine.machine_info(library, gemm)
  return out


def _source(flag_values, config):
  """--what=input's source of images (None for the other benchmarks)."""
  if flag_values.what != "input":
    return None
  if flag_values.input_source == "dataset":
    from tfmochi import data  # pylint: disable=g-import-not-at-top
    return data.load(config.dataset, "train", data_dir=config.data_dir, seed=config.seed,
                     tfrecord_label_offset=config.tfrecord_label_offset)
  if flag_values.input_source == "jpeg":
    return input_pipeline.jpeg_photo_source(flag_values.jpeg_dir, flag_values.source_images,
                                            config.seed)
  return input_pipeline.synthetic_source(flag_values.source_images, flag_values.source_size,
                                         config.seed)


def _set_threads(flag_values) -> None:
  """Sizes the thread pools of the framework this process times, before its first op."""
  if flag_values.what == "peer":
    # PyTorch's OpenMP threads spin while they wait for work by default; on cores shared with
    # other jobs the spinning threads take turns with the ones that have work, and a step takes
    # several times as long. Passive waiting (read once, when OpenMP loads with torch) spares the
    # peer that; a policy set in the environment wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from tfmochi.benchmark import peer  # pylint: disable=g-import-not-at-top (the bench extra)
    peer.set_threads(flag_values.intra_op_threads, flag_values.inter_op_threads)
    return
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.get_logger().setLevel("ERROR")
  if flag_values.intra_op_threads:
    tf.config.threading.set_intra_op_parallelism_threads(flag_values.intra_op_threads)
  if flag_values.inter_op_threads:
    tf.config.threading.set_inter_op_parallelism_threads(flag_values.inter_op_threads)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])} (flags start with --).")
  flag_values = flags.FLAGS
  if flag_values.what != "versus":
    _set_threads(flag_values)
  try:
    config = config_lib.from_flags(flag_values)
  except config_lib.ConfigError as e:
    print(f"tfmochi.benchmark: error: {e}", file=sys.stderr, flush=True)
    return 2
  if flag_values.what == "versus":
    result = versus.bench_versus(sys.argv[1:], flag_values.versus, flag_values.rounds,
                                 log=lambda line: print(line, file=sys.stderr, flush=True))
  else:
    result = run(flag_values.what, config, warmup=flag_values.warmup_steps,
                 timed=flag_values.timed_steps, steps_per_call=flag_values.steps_per_call,
                 compare_moco=flag_values.compare_moco,
                 compare_keras_conv=flag_values.compare_keras_conv,
                 source=_source(flag_values, config), input_threads=flag_values.input_threads,
                 input_fused_decode=flag_values.input_fused_decode,
                 compare_jit=flag_values.compare_jit, compare_topn=flag_values.compare_topn,
                 compare_plain=flag_values.compare_plain,
                 profile_calls=flag_values.profile_calls)
  line = json.dumps(result, sort_keys=True)
  print(line, flush=True)
  if flag_values.output:
    with open(flag_values.output, "a") as f:
      f.write(line + "\n")
  return 0
