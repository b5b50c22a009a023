"""Exports a run's query-encoder backbone (no projection head) for downstream use.

`python -m tfmochi.export --model_dir=RUN --format=FORMAT [--export_dir=OUT] [--overwrite]`
restores the newest readable checkpoint of a run and writes one of these directories
(export/README.md shows how to load each of them):

* `saved_model`: a TF SavedModel for serving. Signature `serving_default` takes uint8 RGB images
  `images` `[B, H, W, 3]` of any H, W, keeps their size, scales them to [0, 1] and
  ImageNet-normalises them inside, and returns float32 `embedding` `[B, F]` (the pooled C5)
  and the feature maps `C2`..`C5` (strides 4, 8, 16, 32; 1, 2, 4, 8 with the small stem).
  `serving_resized` (only when the training image size is known) first resizes every image to
  `image_size x image_size` (bilinear with anti-aliasing, aspect ratio not kept, no crop).
* `hub`: a TF2 reusable SavedModel (TF Hub image feature-vector convention): `__call__(images,
  training=False)` maps float32 RGB `[B, H, W, 3]` in [0, 1] to `[B, F]`, both `training` values
  traced; `variables`, `trainable_variables`, `regularization_losses` (empty: MoCo's weight decay
  belongs to the optimizer); `serving_default` takes the same float images and returns the
  `serving_default` outputs of `saved_model`. Loads with `tf.saved_model.load`,
  `hub.KerasLayer(path, trainable=True)` (tf_keras) and `keras.layers.TFSMLayer` (Keras 3).
* `keras`: `backbone.keras`, the backbone as a Keras 3 model (input: ImageNet-normalised float
  images, output dict `C2`..`C5`, `pooled`), with standard BN layers only so that
  `keras.saving.load_model` needs no tfmochi import; plus, when keras-hub is importable and the
  backbone has the ImageNet stem, `keras_hub/`: a keras-hub preset of the same weights as a
  `keras_hub.models.ResNetBackbone` with a `ResNetImageConverter` (see `to_keras_hub`; not for
  resnet10_tiny, whose widths keras-hub's ResNets do not have).
* `detectron2`: `backbone.pkl`, MoCo's converter layout `{"model": {detectron2 key: array},
  "__author__": "tfmochi", "matching_heuristics": True}`.
* `torchvision`: `backbone.npz` (and `backbone.safetensors` when `safetensors` is importable),
  torchvision ResNet state-dict keys and layouts (OIHW conv kernels), including
  `num_batches_tracked`, so `resnet.load_state_dict(state, strict=False)` misses only `fc.*`.

`saved_model`, `hub` and `keras` hold any tfmochi backbone, `resnet10_tiny` (the quickstart's)
included; `detectron2` and `torchvision` need an architecture torchvision has (resnet18/34/50).

Every export also has `export_info.json` (architecture, stem, strides, input convention, step,
files), written last: an export is complete when it exists (`load_export_info`). On a local disk
exports are atomic: everything is written into a temporary sibling directory (`.<name>.tmp-<id>`)
that is renamed into place at the end, so a crash never leaves a half-written export; an existing
export is only replaced (with `overwrite=True`) after the new one is complete. A hard kill
(SIGKILL) can leave a stale `.<name>.tmp-*` sibling, never a partial `<name>`. Object stores
(gs://; ram:// in the tests) have no atomic rename (tfmochi.rundir): the export is built in a local scratch
directory and uploaded file by file into `<name>`, export_info.json last; replacing an export
deletes the old export_info.json first, so a crash leaves a `<name>` without it (incomplete, and
refused by `load_export_info`), never one that looks complete.

Whatever BN flavour the run trained with (standard, synchronized, SplitBatchNorm) and whatever
its dtype policy, the export is a float32 copy with standard BN: the layers are identical in
inference, and the exported artifacts then need no custom objects.
"""

from __future__ import annotations

import contextlib
import copyreg
import datetime
import io
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable

from tfmochi import cli

cli.quiet_tensorflow_startup()  # before TensorFlow's first import

from absl import logging  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfmochi import checkpoints  # noqa: E402
from tfmochi import models  # noqa: E402
from tfmochi import rundir  # noqa: E402
from tfmochi import weightmaps  # noqa: E402

FORMATS = ("saved_model", "hub", "keras", "detectron2", "torchvision")

# torchvision's ImageNet statistics on [0, 1] RGB. The training pipeline normalises with the same
# values; detectron2's PIXEL_MEAN / PIXEL_STD are these times 255.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INFO_FILE = "export_info.json"
KERAS_FILE = "backbone.keras"
KERAS_HUB_DIR = "keras_hub"
DETECTRON2_FILE = "backbone.pkl"
NPZ_FILE = "backbone.npz"
SAFETENSORS_FILE = "backbone.safetensors"

FEATURE_NAMES = ("C2", "C3", "C4", "C5")
_STRIDES = {False: (4, 8, 16, 32), True: (1, 2, 4, 8)}  # by small_stem

# (block type, blocks per stage, width of the first stage) -> arch: the layouts of
# models.build_backbone.
_ARCH_BY_LAYOUT = {
    ("basic", (2, 2, 2, 2), 64): "resnet18",
    ("basic", (3, 4, 6, 3), 64): "resnet34",
    ("bottleneck", (3, 4, 6, 3), 64): "resnet50",
    ("basic", (1, 1, 1, 1), 16): "resnet10_tiny",
}
# The formats that are torchvision weight files (or renamed ones): they need an architecture
# torchvision has, so models.SMOKE_ARCHS cannot be written in them.
TORCHVISION_FORMATS = ("detectron2", "torchvision")

_UINT8_IMAGES = tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")
_FLOAT_IMAGES = tf.TensorSpec([None, None, None, 3], tf.float32, name="images")


class ExportError(ValueError):
  """An export request that cannot be carried out (unknown format, existing export). Clear text."""


# -------------------------------------------------------------------------------------------------
# The backbone to export


def infer_architecture(backbone: keras.Model) -> tuple[str, bool]:
  """(arch, small_stem) of a `models.build_backbone` model, read from its layers.

  Raises:
    ValueError: the model is not one of the ResNets of `models.ARCHS` / `models.SMOKE_ARCHS`.
  """
  names = [layer.name for layer in backbone.layers]
  blocks = {stage: set() for stage in (1, 2, 3, 4)}  # stage -> block indices
  bottleneck = False
  for name in names:
    match = re.fullmatch(r"layer(\d)\.(\d+)\.conv(\d)", name)
    if match and int(match.group(1)) in blocks:
      blocks[int(match.group(1))].add(int(match.group(2)))
      bottleneck |= match.group(3) == "3"  # only bottlenecks have a third conv
  depths = tuple(len(blocks[stage]) for stage in (1, 2, 3, 4))
  block_type = "bottleneck" if bottleneck else "basic"
  width = (int(backbone.get_layer("layer1.0.conv1").kernel.shape[-1])
           if "layer1.0.conv1" in names else None)
  arch = _ARCH_BY_LAYOUT.get((block_type, depths, width))
  if arch is None or "conv1" not in names:
    raise ValueError(f"{backbone.name!r} is not a tfmochi ResNet backbone ({block_type} blocks "
                     f"{depths}, width {width}); export supports "
                     f"{list(models.ARCHS + models.SMOKE_ARCHS)} from models.build_backbone.")
  small_stem = backbone.get_layer("conv1").kernel.shape[0] == 3
  return arch, bool(small_stem)


@contextlib.contextmanager
def _float32_policy():
  """Builds layers in float32 even when the run used a mixed-precision global policy."""
  previous = keras.config.dtype_policy()
  keras.config.set_dtype_policy("float32")
  try:
    yield
  finally:
    keras.config.set_dtype_policy(previous)


def standard_backbone(backbone: keras.Model, *, arch: str | None = None,
                      small_stem: bool | None = None) -> keras.Model:
  """A float32 standard-BN copy of `backbone` (same weights, identical inference outputs).

  Args:
    backbone: a `models.build_backbone` model (any bn_mode, dtype policy or strategy).
    arch, small_stem: the expected architecture; checked against the model when given.

  Raises:
    ValueError: the model is not a tfmochi backbone, or not the given arch / stem.
  """
  found_arch, found_small = infer_architecture(backbone)
  if arch is not None and arch != found_arch:
    raise ValueError(f"The backbone is a {found_arch}, not the {arch} the caller expects.")
  if small_stem is not None and bool(small_stem) != found_small:
    raise ValueError(f"The backbone has small_stem={found_small}, the caller expects "
                     f"small_stem={bool(small_stem)}.")
  state = weightmaps.torchvision_state_dict(backbone)
  with _float32_policy():
    clean = models.build_backbone(found_arch, small_stem=found_small, bn_mode="standard",
                                  name="backbone", fast_grad=False)
  weightmaps.load_torchvision_state_dict(clean, state)
  return clean


def _normalize(images):
  """float32 RGB in [0, 1] `[B, H, W, 3]` -> ImageNet-normalised `[B, H, W, 3]`."""
  return (images - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


def _feature_dict(backbone: keras.Model, images01, training=False) -> dict:
  """{"embedding": [B, F], "C2".."C5": [B, h, w, c]} float32 for [0, 1] images."""
  outputs = backbone(_normalize(images01), training=training)
  result = {"embedding": tf.cast(outputs["pooled"], tf.float32)}
  for name in FEATURE_NAMES:
    result[name] = tf.cast(outputs[name], tf.float32)
  return result


# -------------------------------------------------------------------------------------------------
# SavedModel wrappers. tf.train.Checkpoint, not tf.Module: the reusable-SavedModel attributes
# `variables` / `trainable_variables` are read-only properties on tf.Module, so a tf.Module could
# not carry them.


class ServingModule(tf.train.Checkpoint):
  """`saved_model` format: uint8 images in, embedding + feature maps out."""

  def __init__(self, backbone: keras.Model, image_size: int | None = None):
    super().__init__()
    self.backbone = backbone
    # The underlying tf.Variables, so a plain tf.saved_model.load sees them.
    self.variables = [w.value for w in backbone.weights]
    self._image_size = image_size
    if image_size:
      self.serve_resized = tf.function(self._serve_resized, input_signature=[_UINT8_IMAGES])

  @tf.function(input_signature=[_UINT8_IMAGES])
  def serve(self, images):
    """uint8 `[B, H, W, 3]` at its own size -> outputs of `_feature_dict`."""
    return _feature_dict(self.backbone, tf.cast(images, tf.float32) / 255.0)

  def _serve_resized(self, images):
    """uint8 `[B, H, W, 3]` resized to `[B, S, S, 3]` first (S = training image size)."""
    size = [self._image_size, self._image_size]
    resized = tf.image.resize(tf.cast(images, tf.float32), size, method="bilinear",
                              antialias=True)
    return _feature_dict(self.backbone, tf.clip_by_value(resized / 255.0, 0.0, 1.0))

  def signature_functions(self) -> dict:
    """{signature name: concrete function} for tf.saved_model.save."""
    signatures = {"serving_default": self.serve.get_concrete_function()}
    if self._image_size:
      signatures["serving_resized"] = self.serve_resized.get_concrete_function()
    return signatures


class ReusableBackbone(tf.train.Checkpoint):
  """`hub` format: a TF2 reusable SavedModel (tensorflow/hub docs/reusable_saved_models.md)."""

  def __init__(self, backbone: keras.Model):
    super().__init__()
    self.backbone = backbone
    self.variables = [w.value for w in backbone.weights]
    self.trainable_variables = [w.value for w in backbone.trainable_weights]
    self.regularization_losses = []
    # Both values of the Python bool `training` must be traced before saving.
    for training in (False, True):
      self.__call__.get_concrete_function(_FLOAT_IMAGES, training=training)

  @tf.function
  def __call__(self, images, training=False):
    """float32 RGB `[B, H, W, 3]` in [0, 1] -> pooled features `[B, F]` float32."""
    return _feature_dict(self.backbone, images, training=training)["embedding"]

  @tf.function(input_signature=[_FLOAT_IMAGES])
  def serve(self, images):
    """float32 RGB in [0, 1] -> {"embedding", "C2".."C5"} (inference mode)."""
    return _feature_dict(self.backbone, images)


# -------------------------------------------------------------------------------------------------
# torchvision / detectron2 weights


def torchvision_weights(backbone: keras.Model) -> dict[str, np.ndarray]:
  """torchvision ResNet state dict of a backbone, with `num_batches_tracked` (int64 0) added.

  The counters only matter for BN with momentum=None; they are written so that
  `torchvision.models.resnetXX().load_state_dict(state, strict=False)` misses exactly `fc.*`.
  """
  state = {}
  for key, value in weightmaps.torchvision_state_dict(backbone).items():
    state[key] = value
    if key.endswith(".running_var"):
      state[key[:-len("running_var")] + "num_batches_tracked"] = np.zeros((), np.int64)
  return state


def detectron2_weights(backbone: keras.Model) -> dict[str, np.ndarray]:
  """{detectron2 key: float32 array} as MoCo's convert-pretrain-to-detectron2.py writes it."""
  return {weightmaps.torchvision_to_detectron2_key(key): value
          for key, value in weightmaps.torchvision_state_dict(backbone).items()}


def _portable_array(array: np.ndarray):
  # NumPy 2 pickles arrays through `numpy._core.multiarray._reconstruct`, which NumPy 1.x
  # (common next to detectron2) cannot import (numpy/numpy#28340). `numpy.ndarray(shape, dtype,
  # buffer)` exists in every version; a bytearray buffer keeps the loaded array writable.
  array = np.ascontiguousarray(array)
  return np.ndarray, (array.shape, array.dtype.str, bytearray(array.tobytes()))


def dumps_detectron2(weights: dict[str, np.ndarray]) -> bytes:
  """The `.pkl` bytes: a plain pickle of str keys and numpy arrays (no TF, no tfmochi)."""
  buffer = io.BytesIO()
  pickler = pickle.Pickler(buffer, protocol=4)
  pickler.dispatch_table = copyreg.dispatch_table.copy()
  pickler.dispatch_table[np.ndarray] = _portable_array
  pickler.dump({"model": weights, "__author__": "tfmochi", "matching_heuristics": True})
  return buffer.getvalue()


def read_torchvision_weights(path: str) -> dict[str, np.ndarray]:
  """Reads an exported `.npz`, `.safetensors` or detectron2 `.pkl` as a torchvision state dict.

  The result loads into a tfmochi backbone with `weightmaps.load_torchvision_state_dict` (MoCo's
  own converted detectron2 `.pkl` files work too). A `.pkl` is unpickled: only read files you
  trust.
  """
  with tf.io.gfile.GFile(path, "rb") as f:
    data = f.read()
  if path.endswith(".npz"):
    with np.load(io.BytesIO(data)) as npz:
      return {key: npz[key] for key in npz.files}
  if path.endswith(".safetensors"):
    from safetensors.numpy import load  # optional dependency
    return dict(load(data))
  if path.endswith(".pkl"):
    state = pickle.loads(data, encoding="latin1")
    return {weightmaps.detectron2_to_torchvision_key(k): np.asarray(v)
            for k, v in state["model"].items()}
  raise ValueError(f"Unknown weights file {path!r}: expected .npz, .safetensors or .pkl.")


# -------------------------------------------------------------------------------------------------
# keras-hub


def _import_keras_hub():
  try:
    import keras_hub  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("keras-hub is not installed: pip install keras-hub (or tfmochi[kerashub])."
                      ) from e
  return keras_hub


def to_keras_hub(backbone: keras.Model):
  """The backbone as a `keras_hub.models.ResNetBackbone` with the same weights, one to one.

  keras-hub's ResNet (use_pre_activation=False) is the torchvision v1.5 layout: 7x7/2 stem conv
  and 3x3/2 max-pool, stride on the 3x3 conv of bottlenecks, bias-free convs, BN epsilon 1e-5,
  and explicit symmetric zero padding before every strided 3x3/7x7 conv and before the max-pool,
  exactly as `models.build_backbone` pads; its strided 1x1 shortcut uses "valid" padding, which
  is what our "same" gives for a 1x1 kernel. Outputs therefore agree with the tfmochi backbone:
  `pyramid_outputs` P2..P5 == C2..C5 and the model output == C5 (there is no pooled output), bit
  for bit with the plain Keras layers exports hold (`fast_grad=False`), up to float rounding with
  the training layers (which run 1x1 convolutions as matmuls).
  Inputs are ImageNet-normalised images, as for the tfmochi backbone.

  Raises:
    ImportError: keras-hub is not installed.
    ValueError: a small_stem backbone (keras-hub's ResNet always has the 7x7/2 stem + max-pool).
  """
  arch, small_stem = infer_architecture(backbone)
  if small_stem:
    raise ValueError("keras-hub's ResNetBackbone always has the ImageNet stem (7x7/2 conv + "
                     "max-pool); a small_stem (CIFAR) backbone has no keras-hub equivalent.")
  if arch in models.SMOKE_ARCHS:
    raise ValueError(f"{arch} is not one of keras-hub's ResNets (its widths are 16-128).")
  keras_hub = _import_keras_hub()
  block_type, depths, _ = next(k for k, v in _ARCH_BY_LAYOUT.items() if v == arch)
  with _float32_policy():
    hub_backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 128, 256, 512], stackwise_num_blocks=list(depths),
        stackwise_num_strides=[1, 2, 2, 2], block_type=f"{block_type}_block",
        use_pre_activation=False, image_shape=(None, None, 3), data_format="channels_last",
        dtype="float32")
  assigned = set()
  for key, value in weightmaps.torchvision_state_dict(backbone).items():
    torch_layer, attr = key.rsplit(".", 1)
    layer = hub_backbone.get_layer(weightmaps.keras_hub_layer_name(torch_layer))
    if isinstance(layer, keras.layers.Conv2D):
      variable, value = layer.kernel, value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    else:
      variable = getattr(layer, dict(weightmaps.BN_KEYS)[attr])
    if tuple(variable.shape) != value.shape:
      raise ValueError(f"to_keras_hub: {key} {value.shape} does not fit {variable.path} "
                       f"{tuple(variable.shape)}.")
    variable.assign(value)
    assigned.add(variable.path)
  missing = [w.path for w in hub_backbone.weights if w.path not in assigned]
  if missing or len(assigned) != len(hub_backbone.weights):
    raise ValueError(f"to_keras_hub: keras-hub weights without a tfmochi counterpart: {missing}.")
  return hub_backbone


def _keras_hub_image_converter(keras_hub, image_size: int | None):
  """A ResNetImageConverter mapping [0, 255] RGB to our ImageNet-normalised input."""
  std = np.asarray(IMAGENET_STD)
  return keras_hub.layers.ResNetImageConverter(
      image_size=(image_size, image_size) if image_size else None,
      scale=[float(s) for s in 1.0 / (255.0 * std)],
      offset=[float(o) for o in -np.asarray(IMAGENET_MEAN) / std])


# -------------------------------------------------------------------------------------------------
# Writers: each writes one format into a local directory and returns extra export_info
# entries. `backbone` is the float32 standard-BN copy.


def _write_saved_model(backbone, directory, image_size):
  module = ServingModule(backbone, image_size)
  signatures = module.signature_functions()
  tf.saved_model.save(module, directory, signatures=signatures)
  return {"signatures": sorted(signatures),
          "input": "uint8 RGB [batch, H, W, 3], any H and W; scaled to [0, 1] and "
                   "ImageNet-normalised inside" + (
                       f"; serving_resized resizes to {image_size}x{image_size} first"
                       if image_size else ""),
          "outputs": ["embedding", *FEATURE_NAMES]}


def _write_hub(backbone, directory, image_size):
  del image_size  # the reusable SavedModel keeps the caller's image size.
  module = ReusableBackbone(backbone)
  tf.saved_model.save(module, directory,
                      signatures={"serving_default": module.serve.get_concrete_function()})
  return {"signatures": ["serving_default"],
          "input": "float32 RGB [batch, H, W, 3] in [0, 1]; ImageNet-normalised inside",
          "outputs": "__call__: [batch, F]; serving_default: embedding, C2..C5"}


def _write_keras(backbone, directory, image_size):
  backbone.save(os.path.join(directory, KERAS_FILE))
  info = {"input": "float32 ImageNet-normalised RGB [batch, H, W, 3]",
          "outputs": [*FEATURE_NAMES, "pooled"]}
  try:
    hub_backbone = to_keras_hub(backbone)
    keras_hub = _import_keras_hub()
  except (ImportError, ValueError) as e:
    logging.warning("No keras-hub preset in the keras export: %s", e)
    info["keras_hub"] = f"not written: {e}"
    return info
  preset = os.path.join(directory, KERAS_HUB_DIR)
  hub_backbone.save_to_preset(preset)
  _keras_hub_image_converter(keras_hub, image_size).save_to_preset(preset)
  info["keras_hub"] = (f"{KERAS_HUB_DIR}/: keras_hub.models.ResNetBackbone preset (pyramid "
                       "outputs P2..P5 = C2..C5) + ResNetImageConverter for [0, 255] RGB")
  return info


def _write_detectron2(backbone, directory, image_size):
  del image_size
  with open(os.path.join(directory, DETECTRON2_FILE), "wb") as f:
    f.write(dumps_detectron2(detectron2_weights(backbone)))
  depth = int(infer_architecture(backbone)[0][len("resnet"):])
  settings = {"MODEL.WEIGHTS": DETECTRON2_FILE, "INPUT.FORMAT": "RGB",
              "MODEL.PIXEL_MEAN": [123.675, 116.280, 103.530],
              "MODEL.PIXEL_STD": [58.395, 57.120, 57.375],
              "MODEL.RESNETS.DEPTH": depth, "MODEL.RESNETS.STRIDE_IN_1X1": False,
              "MODEL.RESNETS.NORM": "SyncBN"}
  if depth < 50:  # detectron2's basic-block ResNets need a 64-wide res2
    settings["MODEL.RESNETS.RES2_OUT_CHANNELS"] = 64
  return {"detectron2": settings}


def _write_torchvision(backbone, directory, image_size):
  del image_size
  state = torchvision_weights(backbone)
  np.savez(os.path.join(directory, NPZ_FILE), **state)
  try:
    from safetensors.numpy import save_file  # optional dependency
  except ImportError:
    logging.info("safetensors is not installed; writing only %s.", NPZ_FILE)
    return {"safetensors": "not written: safetensors is not installed"}
  save_file(state, os.path.join(directory, SAFETENSORS_FILE),
            metadata={"format": "pt", "producer": "tfmochi"})
  return {}


# One writer per format: writer(backbone, directory, image_size) writes the format's files into
# `directory` and returns extra export_info.json entries (or None).
_WRITERS = {
    "saved_model": _write_saved_model,
    "hub": _write_hub,
    "keras": _write_keras,
    "detectron2": _write_detectron2,
    "torchvision": _write_torchvision,
}


# -------------------------------------------------------------------------------------------------
# Atomic directory replacement (a directory is complete once its marker exists: rundir.is_complete)


def _is_remote(path: str) -> bool:
  return "://" in path


def _publish(stage: str, out_dir: str, overwrite: bool) -> None:
  """Object stores (no atomic rename): local `stage` -> `out_dir`, export_info.json last.

  An existing export first loses its export_info.json (it is incomplete from then on), then its
  files; the new files are uploaded and export_info.json, written last in one upload, makes the
  new export complete. A failure on the way removes the partial upload; a crash leaves a
  directory without export_info.json, which `load_export_info` refuses and an export with
  `overwrite=True` replaces.
  """
  if tf.io.gfile.exists(out_dir):
    _refuse_existing(out_dir, overwrite)  # created by someone else meanwhile
    rundir.begin_directory(out_dir, INFO_FILE)
    rundir.remove(out_dir)
  try:
    rundir.copy_tree(stage, out_dir, skip=(INFO_FILE,))
    with open(os.path.join(stage, INFO_FILE), "rb") as f:
      rundir.write_bytes(os.path.join(out_dir, INFO_FILE), f.read())
  except BaseException:
    rundir.remove(out_dir)  # incomplete (no export_info.json): do not leave it behind
    raise


def load_export_info(export_dir: str) -> dict:
  """The export_info.json of a complete export.

  Raises:
    ExportError: no export there, or an incomplete one (interrupted before export_info.json,
      which is written last, see rundir.is_complete).
  """
  if not rundir.is_complete(export_dir, INFO_FILE):
    what = "an incomplete export" if tf.io.gfile.exists(export_dir) else "no export"
    raise ExportError(f"{export_dir} holds {what} (no {INFO_FILE}, which is written last). "
                      "Export again (python -m tfmochi.export ... --overwrite).")
  return rundir.read_json(os.path.join(export_dir, INFO_FILE))


def check_arch_format(arch: str, fmt: str) -> None:
  """Raises ExportError when `fmt` cannot hold `arch`: the torchvision weight files need an
  architecture torchvision has; saved_model, hub and keras hold any tfmochi backbone."""
  if arch in models.SMOKE_ARCHS and fmt in TORCHVISION_FORMATS:
    raise ExportError(f"--arch={arch} is a small network with no torchvision counterpart, so it "
                      f"has no {fmt} weight file; export it as saved_model, hub or keras.")


def _check_format(fmt: str) -> str:
  if fmt not in FORMATS:
    raise ExportError(f"Unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
  return fmt


def _refuse_existing(out_dir: str, overwrite: bool) -> None:
  try:
    exists = rundir.check_readable(out_dir, "The export directory")
  except rundir.RunDirError as e:
    raise ExportError(str(e)) from None
  if not overwrite and exists:
    raise ExportError(f"The export directory {out_dir} already exists; pass --overwrite "
                      "(overwrite=True) to replace it, or choose another --export_dir.")


def export_backbone(backbone: keras.Model, out_dir: str, fmt: str = "saved_model", *,
                    image_size: int | None = None, overwrite: bool = False,
                    arch: str | None = None, small_stem: bool | None = None,
                    step: int | None = None, source: str | None = None) -> dict:
  """Exports a backbone atomically (see the module docstring for the formats).

  Args:
    backbone: a `models.build_backbone` model (e.g. `encoder.backbone`), any BN mode / policy.
    out_dir: the export directory to create (local or gs://).
    fmt: one of FORMATS.
    image_size: the training image size (recorded; `saved_model` adds `serving_resized` and the
      keras-hub image converter resizes to it).
    overwrite: replace an existing `out_dir` (only once the new export is complete).
    arch, small_stem: expected architecture, checked against the model (inferred if None).
    step, source: training step and run directory, recorded in export_info.json.

  Returns:
    The export_info.json content (includes "files", paths relative to out_dir).

  Raises:
    ExportError: unknown format, a format that cannot hold the architecture
      (`check_arch_format`), or out_dir exists and overwrite is False.
    ValueError: the model is not a tfmochi backbone or not the given arch / stem.
  """
  writer = _WRITERS[_check_format(fmt)]
  out_dir = out_dir.rstrip("/")
  _refuse_existing(out_dir, overwrite)
  clean = standard_backbone(backbone, arch=arch, small_stem=small_stem)
  arch, small_stem = infer_architecture(clean)
  check_arch_format(arch, fmt)

  def write(stage: str) -> dict:
    extra = writer(clean, stage, image_size) or {}
    info = {
        "format": fmt, "arch": arch, "small_stem": small_stem,
        "feature_dim": models.feature_dim(arch),
        "strides": dict(zip(FEATURE_NAMES, _STRIDES[small_stem])),
        "image_size": image_size, "step": step, "source": source,
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                          "applied_to": "RGB in [0, 1]"},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
    info["files"] = sorted(rundir.list_files(stage) + [INFO_FILE])
    with open(os.path.join(stage, INFO_FILE), "w") as f:
      json.dump(info, f, indent=2, sort_keys=True)
      f.write("\n")
    return info

  return _write_atomically(out_dir, overwrite, write)


def _write_atomically(out_dir: str, overwrite: bool, write: Callable[[str], dict]) -> dict:
  """`write(stage)` fills a local staging directory, which then becomes `out_dir` at once.

  Local disks: the stage is a hidden sibling of out_dir, renamed into place (`_commit`). Object
  stores (no atomic rename): the writers need local files, so the stage is a local scratch
  directory, published file by file with export_info.json last (`_publish`). Either way a crash
  leaves no partial export behind and an old export is replaced only by a complete one.
  Returns what `write` returns.
  """
  parent, name = os.path.split(out_dir)
  parent = parent or "."
  tf.io.gfile.makedirs(parent)
  token = uuid.uuid4().hex[:8]
  tmp_dir = os.path.join(parent, f".{name}.tmp-{token}")
  remote = _is_remote(out_dir)
  stage = tempfile.mkdtemp(prefix="tfmochi-export-") if remote else tmp_dir
  try:
    os.makedirs(stage, exist_ok=True)
    result = write(stage)
    if remote:
      _publish(stage, out_dir, overwrite)
    else:
      _commit(tmp_dir, out_dir, overwrite, token)
  except BaseException:
    if not remote:
      rundir.remove(tmp_dir)
    raise
  finally:
    if remote:
      shutil.rmtree(stage, ignore_errors=True)
  return result


def _commit(tmp_dir: str, out_dir: str, overwrite: bool, token: str) -> None:
  """Renames the finished tmp_dir to out_dir; an old out_dir is removed only afterwards."""
  if not tf.io.gfile.exists(out_dir):
    tf.io.gfile.rename(tmp_dir, out_dir)
    return
  _refuse_existing(out_dir, overwrite)  # created by someone else meanwhile
  parent, name = os.path.split(out_dir)
  old = os.path.join(parent or ".", f".{name}.old-{token}")
  tf.io.gfile.rename(out_dir, old)
  try:
    tf.io.gfile.rename(tmp_dir, out_dir)
  except BaseException:
    tf.io.gfile.rename(old, out_dir)  # put the previous export back
    raise
  rundir.remove(old)


def default_export_dir(model_dir: str, fmt: str) -> str:
  """Where the trainer and the CLI put an export by default: <model_dir>/export/<fmt>."""
  return os.path.join(model_dir, "export", fmt)


def export_run(model_dir: str, export_dir: str | None = None, fmt: str = "saved_model", *,
               overwrite: bool = False, checkpoint_path: str | None = None) -> tuple[str, dict]:
  """Exports the query-encoder backbone of a run's newest readable checkpoint.

  Returns:
    (export_dir, export info).

  Raises:
    ExportError: unknown format, export_dir exists and overwrite is False, or a format that
      cannot hold the run's architecture (`check_arch_format`).
    rundir.CheckpointError: no run, no checkpoint, or one of another architecture.
  """
  _check_format(fmt)
  export_dir = export_dir or default_export_dir(model_dir, fmt)
  arch = rundir.RunDir(model_dir).read_config().arch
  _refuse_existing(export_dir, overwrite)  # before the (slow) restore
  check_arch_format(arch, fmt)
  encoder, config, step, _ = checkpoints.restore_encoder(model_dir, checkpoint_path)
  info = export_backbone(encoder.backbone, export_dir, fmt, image_size=config.image_size,
                         overwrite=overwrite, arch=config.arch, small_stem=config.small_stem,
                         step=step, source=model_dir)
  return export_dir, info


# -------------------------------------------------------------------------------------------------
# Command line


def main(argv):
  from absl import flags  # pylint: disable=g-import-not-at-top

  flag_values = flags.FLAGS
  if not flag_values["verbosity"].present:
    # TF's INFO lines about SavedModel internals are noise next to the list of written files.
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    print(f"tfmochi.export: error: unexpected arguments {' '.join(argv[1:])} (flags start with "
          "--).", file=sys.stderr)
    return 2
  if not flag_values.model_dir:
    print("tfmochi.export: error: --model_dir is required (the training run to export).",
          file=sys.stderr)
    return 2
  try:
    export_dir, info = export_run(flag_values.model_dir, flag_values.export_dir,
                                  flag_values.format, overwrite=flag_values.overwrite,
                                  checkpoint_path=flag_values.checkpoint)
  except (ExportError, rundir.CheckpointError) as e:
    logging.flush()
    print(f"tfmochi.export: error: {e}", file=sys.stderr, flush=True)
    # A failed restore leaves checkpoint objects whose deletion at exit logs one warning per
    # unread value (hundreds of lines) that would bury the one message above.
    tf.get_logger().setLevel("ERROR")
    return 2
  stem = "small (CIFAR) stem" if info["small_stem"] else "ImageNet stem"
  print(f"Exported the {info['arch']} backbone ({stem}, step {info['step']}) of "
        f"{flag_values.model_dir} as {info['format']} to {export_dir}:")
  for name in info["files"]:
    if not name.startswith("variables/") or name.endswith(".index"):
      print(f"  {os.path.join(export_dir, name)}")
  if isinstance(info.get("keras_hub"), str) and info["keras_hub"].startswith("not written"):
    print(f"  (keras-hub preset {info['keras_hub']})")
  return 0


def run():
  """Entry point of `python -m tfmochi.export`: defines the flags, then runs `main`."""
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.DEFINE_string("model_dir", None, "The training run (holds config.json, checkpoints/).")
  flags.DEFINE_string("export_dir", None, "Where to write (default: <model_dir>/export/<format>).")
  flags.DEFINE_string("format", "saved_model", f"One of {', '.join(FORMATS)}.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing export (after the new one is done).")
  flags.DEFINE_string("checkpoint", None, "A checkpoint prefix (default: the newest readable).")
  app.run(main)


if __name__ == "__main__":
  run()
