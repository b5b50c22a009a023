"""One build of a run's networks and training state, shared by the trainer and the benchmark.

A `TrainConfig` maps to encoders (`build_run_encoder`: the only place that does), a precision
policy (`set_precision`), and `TrainState`: MoCo (f_q, f_k, the queue of K keys), the SGD optimizer
on f_q's variables, the float16 loss scale and the step counters, created in a strategy's scope
before any `tf.function` traces. `TrainState.replica_step` is the function `strategy.run` calls.
Tools that rebuild a run's query encoder (evaluate, analyze, export) do it through
`tfmochi.checkpoints`, which reads the run's config.json and checkpoints.
"""

from __future__ import annotations

import dataclasses

from absl import logging
import keras
import tensorflow as tf

from tfmochi import hostcpu
from tfmochi import models
from tfmochi import moco as moco_lib
from tfmochi import optimizer as optimizer_lib

_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def set_precision(mixed_precision: str, tf32: bool) -> None:
  """Sets Keras' global precision policy (--mixed_precision) and --tf32.

  --tf32 is TensorFlow's one switch for the float32 products of matmuls and convolutions, read
  when a function is traced: on Ampere and later GPUs it allows TF32 (inputs rounded to a 10-bit
  mantissa), and on a TPU it is the XLA precision of every float32 dot and convolution: off,
  PrecisionConfig HIGHEST (full float32 products, several bfloat16 passes each); on, DEFAULT (one
  bfloat16 pass, 7-bit mantissa inputs, float32 accumulation). TensorFlow's default is on; off
  keeps the objective's q·Qᵀ and MoCHi's top-N in float32, as PyTorch's matmuls (docs/DESIGN.md;
  docs/TPU.md, "Precision"). What it means on the run's devices: `float32_matmuls`.
  """
  tf.config.experimental.enable_tensor_float_32_execution(tf32)
  keras.mixed_precision.set_global_policy(_POLICIES[mixed_precision])


def float32_matmuls(tf32: bool, mixed_precision: str, device: str,
                    compute_capability: tuple[int, int] | None = None) -> str:
  """What float32 matmuls and convolutions compute with on `device` (config.json's resolved).

  Under --mixed_precision=bfloat16/float16 these are the projection head, the objective's logits
  and their gradients (the encoders' convolutions take 16-bit inputs, which no setting rounds);
  under float32 they are the whole network. A float32 run on a TPU with --tf32 off computes every
  convolution with full float32 products, several bfloat16 passes each: that is warned about.

  Args:
    tf32: --tf32.
    mixed_precision: --mixed_precision.
    device: "TPU", "GPU" or "CPU": where the replicas run (`training_device`).
    compute_capability: (major, minor) of the GPU; TF32 needs 8.0 (Ampere) or later.

  Returns:
    "float32" (full float32 products), "tf32" (Ampere+ GPU, --tf32) or "bfloat16" (TPU, --tf32:
    one bfloat16 pass with float32 accumulation).
  """
  if device == "TPU" and not tf32 and mixed_precision == "float32":
    logging.warning(
        "--mixed_precision=float32 with --tf32=false on a TPU: every convolution and matmul is "
        "compiled at XLA's HIGHEST precision (full float32 products, several bfloat16 passes "
        "each): expect a much slower step. --mixed_precision=bfloat16 (configs/tpu.flags) "
        "keeps full float32 for the head and the logits only; --tf32 takes one bfloat16 pass.")
  if not tf32:
    return "float32"
  if device == "TPU":
    return "bfloat16"
  if device == "GPU" and compute_capability and tuple(compute_capability) >= (8, 0):
    return "tf32"
  return "float32"


def warn_emulated_bfloat16(mixed_precision: str, device: str,
                           bfloat16_units: bool | None) -> bool:
  """Warns when --mixed_precision=bfloat16 trains on a CPU without bfloat16 units; True if it did.

  Such a CPU (no AVX512-BF16, AMX or Arm BF16: `hostcpu.has_bfloat16_units`) has no hardware for
  bfloat16 products, so TensorFlow emulates them and the step slows down instead of speeding up:
  a ResNet-50 MoCo v2 step at 96 px ran at 0.49x the float32 step's images/s on an AVX2-only AMD
  EPYC (Zen 3, docs/BENCHMARKS.md). Still allowed (to check bfloat16 numerics before a TPU run);
  GPUs, TPUs and CPUs of unknown kind (`bfloat16_units` None) are not warned about.
  """
  if mixed_precision != "bfloat16" or device != "CPU" or bfloat16_units is not False:
    return False
  logging.warning(
      "--mixed_precision=bfloat16 on a CPU without bfloat16 units (none of "
      f"{', '.join(hostcpu.BFLOAT16_FLAGS)} in /proc/cpuinfo): its bfloat16 arithmetic is "
      "emulated, and a ResNet-50 step ran at "
      "half the float32 speed on such a CPU. Use --mixed_precision=float32 here; bfloat16 pays "
      "on TPUs and on CPUs with AVX512-BF16 or AMX.")
  return True


def training_device(strategy: tf.distribute.Strategy) -> tuple[str, tuple[int, int] | None]:
  """("TPU" | "GPU" | "CPU", the first GPU's compute capability or None) of a run's replicas."""
  if isinstance(strategy, tf.distribute.TPUStrategy):
    return "TPU", None
  gpus = tf.config.list_physical_devices("GPU")
  if not gpus:
    return "CPU", None
  return "GPU", tf.config.experimental.get_device_details(gpus[0]).get("compute_capability")


def encoder_bn_mode(moco_bn_mode: str) -> str:
  """The models.build_backbone BN layer for a MoCo bn_mode (shuffle/none use plain BN)."""
  return {"split": "split", "sync": "sync"}.get(moco_bn_mode, "standard")


def build_run_encoder(config, name: str, fast_grad: bool | None = None) -> keras.Model:
  """The encoder a run with TrainConfig `config` trains (query or key: same architecture).

  `fast_grad` None resolves the run's --fast_grad here (the weights are the same either way).
  """
  if fast_grad is None:
    fast_grad = models.resolve_fast_grad(getattr(config, "fast_grad", "auto"))
  return models.build_encoder(
      config.arch, embedding_dim=config.moco.embedding_dim, mlp=config.mlp_head,
      small_stem=config.small_stem, bn_mode=encoder_bn_mode(config.moco.bn_mode),
      bn_splits=config.bn_splits, head_bn=config.head_bn, name=name, fast_grad=fast_grad)


def weight_init_seed(config) -> int:
  """The global seed set before a run's networks are built.

  Offset from --seed: a global TF seed of 0 makes tf.data's shuffle compare a tensor op-seed to 0
  inside a graph (OperatorNotAllowedInGraphError).
  """
  return config.seed + 1


def _counter(name: str) -> tf.Variable:
  """A step counter every replica reads alike; the first replica's update is the one kept."""
  return tf.Variable(0, dtype=tf.int64, trainable=False, name=name,
                     aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


@dataclasses.dataclass
class TrainState:
  """Everything a training step reads and writes (and a checkpoint holds).

  Attributes:
    moco: f_q, f_k and the queue.
    optimizer: PyTorch's SGD with momentum (MoCo's) on f_q's trainable variables; coupled weight
      decay is added by `MoCo.train_step` (MoCoConfig.weight_decay).
    loss_scale: float16's dynamic loss scale; checkpointed in every precision (so a run may change
      --mixed_precision on resume), used only when `float16`.
    step: the one step counter: lr, momentum schedule, MoCHi warm-up, random draws, data
      position. Skipped steps advance it too (their batch is consumed).
    skipped: steps skipped for a non-finite loss or gradient (--nonfinite=skip).
    scale_skipped: float16 steps skipped for a loss-scale overflow.
    float16: --mixed_precision=float16.
    skip_nonfinite: --nonfinite=skip.
  """
  moco: moco_lib.MoCo
  optimizer: optimizer_lib.SGD
  loss_scale: optimizer_lib.DynamicLossScale
  step: tf.Variable
  skipped: tf.Variable
  scale_skipped: tf.Variable
  float16: bool
  skip_nonfinite: bool

  def replica_step(self, batch: dict) -> dict:
    """One MoCo/MoCHi step of this replica's batch (`MoCo.train_step`); per-replica metrics."""
    return self.moco.train_step(batch, self.optimizer, self.step,
                                skip_nonfinite=self.skip_nonfinite,
                                loss_scale=self.loss_scale if self.float16 else None)

  def checkpoint(self) -> tf.train.Checkpoint:
    """The checkpoint layout of a run (its node names are what old runs resume from)."""
    return tf.train.Checkpoint(
        step=self.step, skipped=self.skipped, scale_skipped=self.scale_skipped,
        query_encoder=self.moco.query_encoder, key_encoder=self.moco.key_encoder,
        queue=self.moco.queue, optimizer=self.optimizer, loss_scale=self.loss_scale)


def build_train_state(config, strategy: tf.distribute.Strategy, moco_config: moco_lib.MoCoConfig,
                      learning_rate, fast_grad: bool | None = None) -> TrainState:
  """Builds MoCo, its optimizer, loss scale and counters in `strategy`'s scope.

  Args:
    config: the run's TrainConfig (encoders, batch_size, initial_loss_scale, mixed_precision,
      nonfinite).
    strategy: where the variables live.
    moco_config: the method's settings (`TrainConfig.moco_for_run`).
    learning_rate: a float or a schedule of the step (read at each step).
    fast_grad: see `build_run_encoder`.
  """
  with strategy.scope():
    moco = moco_lib.MoCo(build_run_encoder(config, "query_encoder", fast_grad),
                         build_run_encoder(config, "key_encoder", fast_grad), moco_config,
                         config.batch_size)
    return TrainState(
        moco=moco,
        optimizer=optimizer_lib.SGD(moco.query_encoder.trainable_variables, learning_rate,
                                    momentum=0.9),
        loss_scale=optimizer_lib.DynamicLossScale(config.initial_loss_scale),
        step=_counter("global_step"), skipped=_counter("skipped_steps"),
        scale_skipped=_counter("loss_scale_skipped_steps"),
        float16=config.mixed_precision == "float16",
        skip_nonfinite=config.nonfinite == "skip")
