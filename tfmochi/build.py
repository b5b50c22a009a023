"""One build of a run's networks and training state, shared by the trainer and the benchmark.

A `TrainConfig` maps to encoders (`build_run_encoder`: the only place that does), a precision
policy (`set_precision`), and `TrainState`: MoCo (f_q, f_k, the queue of K keys), the SGD optimizer
on f_q's variables, the float16 loss scale and the step counters, created in a strategy's scope
before any `tf.function` traces. `TrainState.replica_step` is the function `strategy.run` calls.
Tools that rebuild a run's query encoder (evaluate, analyze, export) use `random_init_encoder`
and `restore_encoder`, which read the run's config.json and checkpoints through `rundir.RunDir`.
"""

from __future__ import annotations

import dataclasses

import keras
import tensorflow as tf

from tfmochi import models
from tfmochi import moco as moco_lib
from tfmochi import optimizer as optimizer_lib
from tfmochi import rundir

_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


def set_precision(mixed_precision: str, tf32: bool) -> None:
  """Sets Keras' global precision policy (--mixed_precision) and TF32 (--tf32).

  TF32 (Ampere and later GPUs) rounds float32 matmul/conv inputs to a 10-bit mantissa, the
  objective's q·Qᵀ and MoCHi's top-N included; TensorFlow turns it on by default, PyTorch's
  matmuls do not (README "Design notes"). A no-op without such a GPU.
  """
  tf.config.experimental.enable_tensor_float_32_execution(tf32)
  keras.mixed_precision.set_global_policy(_POLICIES[mixed_precision])


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
      config.arch, embedding_dim=config.embedding_dim, mlp=config.mlp_head,
      small_stem=config.small_stem, bn_mode=encoder_bn_mode(config.bn_mode),
      bn_splits=config.bn_splits, head_bn=config.head_bn, name=name, fast_grad=fast_grad)


def weight_init_seed(config) -> int:
  """The global seed set before a run's networks are built.

  Offset from --seed: a global TF seed of 0 makes tf.data's shuffle compare a tensor op-seed to 0
  inside a graph (OperatorNotAllowedInGraphError).
  """
  return config.seed + 1


def random_init_encoder(model_dir: str):
  """A run's query encoder as the trainer initialises it, before its first step.

  The baseline a pretrained checkpoint must beat (`evaluate --random_init`). Sets the global
  random seeds (keras.utils.set_random_seed), as the trainer does before building its networks.

  Returns:
    (encoder, train_config).

  Raises:
    rundir.CheckpointError: no config.json (not a run directory).
  """
  config = rundir.RunDir(model_dir).read_config()
  keras.utils.set_random_seed(weight_init_seed(config))
  return build_run_encoder(config, "query_encoder"), config


def restore_run_encoder(model_dir: str, checkpoint_path: str | None = None):
  """Rebuilds a run's query encoder and loads a checkpoint into it.

  Args:
    model_dir: the run directory.
    checkpoint_path: a specific checkpoint prefix (default: the newest readable one, falling back
      to older ones).

  Returns:
    (encoder, train_config, step, checkpoint prefix).

  Raises:
    rundir.CheckpointError: no config, no checkpoint, or a checkpoint that does not fit.
  """
  run_dir = rundir.RunDir(model_dir)
  config = run_dir.read_config()
  encoder = build_run_encoder(config, "query_encoder")
  step = tf.Variable(0, dtype=tf.int64)
  path = run_dir.restore(tf.train.Checkpoint(step=step, query_encoder=encoder), partial=True,
                         paths=None if checkpoint_path is None else [checkpoint_path])
  if path is None:
    raise rundir.CheckpointError(
        f"{model_dir} has no checkpoint yet (looked in {run_dir.checkpoint_dir}). Train first, "
        "or wait for the first checkpoint of a running job.")
  return encoder, config, int(step.numpy()), path


def restore_encoder(model_dir: str, checkpoint_path: str | None = None):
  """(encoder, train_config, step) of `restore_run_encoder`."""
  return restore_run_encoder(model_dir, checkpoint_path)[:3]


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
    moco_config: the method's settings (`TrainConfig.moco_config`).
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
