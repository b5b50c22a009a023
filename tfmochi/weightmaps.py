"""The names of a backbone's weights in torchvision, detectron2 and keras-hub, both ways.

tfmochi's backbones are built in the torchvision layout (`models.build_backbone`): a layer's name
is its torchvision module name, so a weight's torchvision key is `<layer name>.<weight|bias|
running_mean|running_var>`. From there:

  torchvision   `torchvision_state_dict` / `load_torchvision_state_dict` (OIHW kernels <-> Keras'
                HWIO, exact inverses)
  detectron2    `torchvision_to_detectron2_key` / `detectron2_to_torchvision_key`, the renaming
                of MoCo's detectron2 converter (docs/ALGORITHMS.md §8)
  keras-hub     `keras_hub_layer_name`: the layer of keras-hub's `ResNetBackbone` holding a
                torchvision module's weights; `BN_KEYS` names its BN variables

`tfmochi.export` writes these formats; the tests load them back.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Mapping

import keras
import numpy as np

# torchvision BN key -> Keras BatchNormalization attribute.
BN_KEYS = (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
           ("running_var", "moving_variance"))
# Keys of a torchvision checkpoint that have no counterpart in the backbone.
DEFAULT_IGNORE = ("fc.*", "*num_batches_tracked")


_MODULE_RANK = {name: i for i, name in enumerate(
    ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample.0", "downsample.1"))}


def _torch_order(layer_name: str) -> tuple[int, int, int]:
  """Sort key reproducing torchvision's module order (stem, then blocks, then within a block)."""
  match = re.fullmatch(r"layer(\d+)\.(\d+)\.(.+)", layer_name)
  if match is None:
    return (0, 0, _MODULE_RANK.get(layer_name, len(_MODULE_RANK)))
  stage, block, module = match.groups()
  return (int(stage), int(block), _MODULE_RANK.get(module, len(_MODULE_RANK)))


def torch_entries(backbone: keras.Model):
  """Yields (torchvision key, keras variable, is_conv_kernel) in torchvision order."""
  # Functional models list layers in topological order, which puts `downsample.0` before
  # `bn3`; sort so the state dict has torchvision's key order.
  for layer in sorted(backbone.layers, key=lambda l: _torch_order(l.name)):
    if isinstance(layer, keras.layers.Conv2D):
      if layer.use_bias:
        raise ValueError(f"Conv layer {layer.name!r} has a bias; not a torchvision layout.")
      yield f"{layer.name}.weight", layer.kernel, True
    elif isinstance(layer, keras.layers.BatchNormalization):
      for torch_name, attr in BN_KEYS:
        yield f"{layer.name}.{torch_name}", getattr(layer, attr), False


def torchvision_state_dict(backbone: keras.Model) -> dict[str, np.ndarray]:
  """torchvision ResNet state dict (without `fc.*` and `num_batches_tracked`) of a backbone.

  Conv kernels are returned as OIHW (`conv1.weight` is (64, 3, 7, 7)), BN as
  `weight`/`bias`/`running_mean`/`running_var` (1-D). Values are float32 numpy copies.
  """
  state = {}
  for key, var, is_kernel in torch_entries(backbone):
    value = np.asarray(keras.ops.convert_to_numpy(var.value), dtype=np.float32)
    state[key] = np.ascontiguousarray(value.transpose(3, 2, 0, 1)) if is_kernel else value
  return state


def load_torchvision_state_dict(backbone: keras.Model, state: Mapping[str, object], *,
                                ignore: Iterable[str] = DEFAULT_IGNORE) -> None:
  """Loads a torchvision-named state dict (OIHW kernels) into a backbone; exact inverse.

  Args:
    backbone: a model from `build_backbone`.
    state: key -> array-like (numpy arrays; CPU torch tensors also work via np.asarray).
    ignore: fnmatch patterns of keys to skip silently; the default skips the classifier and
      BN counters so a plain torchvision checkpoint loads. Prefixes such as
      `module.encoder_q.` must be stripped by the caller.

  Raises:
    ValueError: naming every missing, unexpected and mis-shaped key (nothing is assigned).
  """
  ignore = tuple(ignore)
  entries = {key: (var, is_kernel) for key, var, is_kernel in torch_entries(backbone)}
  given = {k: v for k, v in state.items()
           if not any(fnmatch.fnmatchcase(k, pattern) for pattern in ignore)}
  missing = [k for k in entries if k not in given]
  unexpected = sorted(k for k in given if k not in entries)
  values, mis_shaped = {}, []
  for key, (var, is_kernel) in entries.items():
    if key not in given:
      continue
    value = np.asarray(given[key], dtype=np.float32)
    if is_kernel and value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    if tuple(value.shape) != tuple(var.shape):
      expected = tuple(var.shape)
      if is_kernel:
        expected = (expected[3], expected[2], expected[0], expected[1])
      mis_shaped.append(f"{key}: got {tuple(np.shape(given[key]))}, expected {expected}")
    values[key] = value
  if missing or unexpected or mis_shaped:
    raise ValueError(
        f"Cannot load the state dict into {backbone.name!r}: "
        f"missing keys {missing}; unexpected keys {unexpected}; mis-shaped {mis_shaped}.")
  for key, (var, _) in entries.items():
    var.assign(values[key])


def torchvision_to_detectron2_key(key: str) -> str:
  """Renames a torchvision ResNet key as MoCo's detectron2 converter does (docs/ALGORITHMS.md §8).

  E.g. `conv1.weight` -> `stem.conv1.weight`, `bn1.running_mean` -> `stem.conv1.norm.running_mean`,
  `layer1.0.bn2.weight` -> `res2.0.conv2.norm.weight`, `layer3.0.downsample.0.weight` ->
  `res4.0.shortcut.weight`, `layer3.0.downsample.1.bias` -> `res4.0.shortcut.norm.bias`.
  """
  if "layer" not in key:
    key = "stem." + key
  key = re.sub(r"layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", key)
  key = re.sub(r"bn(\d)", r"conv\1.norm", key)
  key = key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
  return key


def detectron2_to_torchvision_key(key: str) -> str:
  """Inverse of `torchvision_to_detectron2_key`.

  E.g. `res2.0.conv1.norm.weight` -> `layer1.0.bn1.weight`, `stem.conv1.norm.bias` -> `bn1.bias`,
  `res4.0.shortcut.weight` -> `layer3.0.downsample.0.weight`.
  """
  if key.startswith("stem."):
    key = key[len("stem."):].replace("conv1.norm.", "bn1.")
  key = key.replace("shortcut.norm", "downsample.1").replace("shortcut", "downsample.0")
  key = re.sub(r"conv(\d)\.norm", r"bn\1", key)
  return re.sub(r"^res(\d)", lambda m: f"layer{int(m.group(1)) - 1}", key)


def keras_hub_layer_name(layer_name: str) -> str:
  """Name of the matching layer in keras-hub's `ResNetBackbone` (v1.5, no pre-activation).

  `conv1`/`bn1` -> `conv1_conv`/`conv1_bn`; `layer{s}.{b}.conv{i}`/`bn{i}` ->
  `stack{s-1}_block{b}_{i}_conv`/`_bn`; `downsample.0`/`.1` -> `stack{s-1}_block{b}_0_conv`/`_bn`.
  Weights within each layer are in the same order and shape (checked against keras-hub 0.32,
  where copying by these names gives bit-identical `pyramid_outputs` P2..P5 == C2..C5).
  """
  if layer_name in ("conv1", "bn1"):
    return "conv1_" + layer_name[:-1]  # "conv1_conv" / "conv1_bn".
  match = re.fullmatch(r"layer(\d+)\.(\d+)\.(conv\d|bn\d|downsample\.[01])", layer_name)
  if match is None:
    raise ValueError(f"{layer_name!r} is not a weight layer of the torchvision ResNet layout.")
  stage, block, module = match.groups()
  if module.startswith("downsample"):
    suffix = "0_conv" if module.endswith("0") else "0_bn"
  else:
    suffix = f"{module[-1]}_{module[:-1]}"
  return f"stack{int(stage) - 1}_block{block}_{suffix}"
