"""Tests for tfmochi.export: every format round-trips in a fresh process; atomic, clear errors.

One resnet18 backbone (ImageNet stem, SplitBatchNorm, randomised BN) is exported once in every
format. A single fresh Python process then reloads all five exports the way a downstream user
would (SavedModel signature, hub.KerasLayer under tf_keras incl. one fine-tuning step, TFSMLayer
under Keras 3, keras.saving.load_model, the keras-hub preset, numpy weights into a fresh tfmochi
backbone) and writes the outputs to a .npz, which is compared with the in-memory backbone for two
(batch, height, width) cases. Two CLI subprocesses run concurrently with it (on 2 cores most of
their time is the TensorFlow import). ~85 CPU-seconds in all; 50-85 s on 2 cores.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import importlib.util
import io
import json
import os
import pickle
import shutil
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import cli_harness as harness  # tests/cli_harness.py (tests/ is on sys.path under pytest)
import testdata  # tests/testdata.py
from tfmochi import checkpoints
from tfmochi import config as config_lib
from tfmochi import distribute
from tfmochi import export
from tfmochi import models
from tfmochi import rundir
from tfmochi import runfiles
from tfmochi import weightmaps

_CASES = ((1, 32, 32), (3, 48, 40))  # (batch, height, width)
_IMAGE_SIZE = 32
_ATOL = 1e-4


# -------------------------------------------------------------------------------------------------
# Shared, cached set-up


def _workdir() -> str:
  return harness.workdir("tfmochi-test-export-")


def _randomise(backbone: keras.Model, seed: int) -> None:
  """Non-trivial BN weights and statistics, so a mis-mapped BN cannot go unnoticed."""
  rng = np.random.default_rng(seed)
  state = weightmaps.torchvision_state_dict(backbone)
  for key, value in state.items():
    if key.endswith(".weight") and value.ndim == 1 or key.endswith(".running_var"):
      state[key] = rng.uniform(0.5, 1.5, value.shape)
    elif key.endswith((".bias", ".running_mean")):
      state[key] = rng.normal(0.0, 0.1, value.shape)
  weightmaps.load_torchvision_state_dict(backbone, state)


@functools.lru_cache(maxsize=None)
def _backbone() -> keras.Model:
  # SplitBatchNorm: the export must turn it into standard BN (same inference outputs).
  backbone = models.build_backbone("resnet18", bn_mode="split", bn_splits=2)
  _randomise(backbone, 0)
  return backbone


def _images(batch, height, width, seed=0) -> np.ndarray:
  rng = np.random.default_rng(seed + 7 * batch + height)
  return rng.integers(0, 256, size=(batch, height, width, 3), dtype=np.uint8)


def _reference(images_uint8, resize: int | None = None) -> dict:
  """In-memory backbone outputs for uint8 images, as the exports define the preprocessing."""
  x = tf.cast(images_uint8, tf.float32)
  if resize:
    x = tf.image.resize(x, [resize, resize], method="bilinear", antialias=True)
  x = tf.clip_by_value(x / 255.0, 0.0, 1.0)
  x = (x - tf.constant(export.IMAGENET_MEAN)) / tf.constant(export.IMAGENET_STD)
  return {k: v.numpy() for k, v in _backbone()(x, training=False).items()}


@functools.lru_cache(maxsize=None)
def _exports() -> dict:
  """{format: export dir} of the shared backbone, plus the input images file."""
  root = os.path.join(_workdir(), "exports")
  dirs = {}
  for fmt in export.FORMATS:
    dirs[fmt] = os.path.join(root, fmt)
    export.export_backbone(_backbone(), dirs[fmt], fmt, image_size=_IMAGE_SIZE, step=7)
  inputs = {f"{b}x{h}x{w}": _images(b, h, w) for b, h, w in _CASES}
  dirs["inputs"] = os.path.join(_workdir(), "inputs.npz")
  np.savez(dirs["inputs"], **inputs)
  return dirs


# The fresh process: reloads every export with only what a downstream user has, records outputs
# (or the error of a format) in one .npz; keras / hub loads run before tfmochi is imported.
_RELOAD = textwrap.dedent("""
    import json, os, sys, traceback
    import numpy as np
    import tensorflow as tf
    import keras
    dirs, out_path = json.loads(sys.argv[1]), sys.argv[2]
    images = dict(np.load(dirs["inputs"]))
    out, errors = {}, {}
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)
    unit = {k: v.astype(np.float32) / 255.0 for k, v in images.items()}
    normed = {k: (v - mean) / std for k, v in unit.items()}

    def attempt(name, fn):
      try:
        fn()
      except Exception:
        errors[name] = traceback.format_exc()

    def saved_model():
      obj = tf.saved_model.load(dirs["saved_model"])
      out["saved_model/signatures"] = np.array(sorted(obj.signatures))
      for k, x in images.items():
        for key, v in obj.signatures["serving_default"](images=tf.constant(x)).items():
          out[f"saved_model/{k}/{key}"] = v.numpy()
        for key, v in obj.signatures["serving_resized"](images=tf.constant(x)).items():
          out[f"saved_model_resized/{k}/{key}"] = v.numpy()

    def hub_load():
      obj = tf.saved_model.load(dirs["hub"])
      out["hub/counts"] = np.array([len(obj.variables), len(obj.trainable_variables),
                                    len(obj.regularization_losses)])
      for k, x in unit.items():
        out[f"hub/{k}/call"] = obj(tf.constant(x)).numpy()
        out[f"hub/{k}/serving"] = obj.signatures["serving_default"](
            images=tf.constant(x))["C4"].numpy()
      # Last: training=True updates the BN moving statistics of `obj`.
      for k, x in unit.items():
        out[f"hub/{k}/call_training_shape"] = np.array(obj(tf.constant(x), training=True).shape)

    def tfsm():
      layer = keras.layers.TFSMLayer(dirs["hub"], call_endpoint="serving_default")
      inputs = keras.Input((None, None, 3))
      model = keras.Model(inputs, layer(inputs))
      for k, x in unit.items():
        out[f"tfsm/{k}"] = model(x)["embedding"].numpy()
      # Trainable under Keras 3 too (inference graph: BN frozen).
      head = keras.Model(inputs, keras.layers.Dense(4)(model(inputs)["embedding"]))
      head.compile(keras.optimizers.SGD(0.1),
                   keras.losses.SparseCategoricalCrossentropy(from_logits=True))
      before = [w.numpy().copy() for w in layer.trainable_weights]
      head.train_on_batch(unit["1x32x32"], np.array([1]))
      out["tfsm/changed"] = np.array(
          sum(not np.array_equal(b, w.numpy()) for b, w in zip(before, layer.trainable_weights)))

    def keras_file():
      assert "tfmochi" not in sys.modules
      model = keras.saving.load_model(os.path.join(dirs["keras"], "backbone.keras"))
      for k, x in normed.items():
        for key, v in model(x).items():
          out[f"keras/{k}/{key}"] = np.asarray(v)

    def keras_hub_preset():
      import keras_hub
      preset = os.path.join(dirs["keras"], "keras_hub")
      backbone = keras_hub.models.ResNetBackbone.from_preset(preset)
      pyramid = keras.Model(backbone.inputs, backbone.pyramid_outputs)
      for k, x in normed.items():
        for key, v in pyramid(x).items():
          out[f"keras_hub/{k}/{key}"] = np.asarray(v)
      converter = keras_hub.layers.ResNetImageConverter.from_preset(preset)
      x = images["1x32x32"].astype(np.float32)
      out["keras_hub/converted"] = np.asarray(converter(x))

    def hub_finetune():
      import tensorflow_hub as hub
      import tf_keras
      layer = hub.KerasLayer(dirs["hub"], trainable=True)
      model = tf_keras.Sequential([tf_keras.Input((32, 32, 3)), layer, tf_keras.layers.Dense(4)])
      out["hub_keras_layer/1x32x32"] = layer(unit["1x32x32"]).numpy()
      before = [v.numpy().copy() for v in layer.trainable_weights]
      model.compile(tf_keras.optimizers.SGD(0.1),
                    tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True))
      rng = np.random.default_rng(0)
      model.train_on_batch(rng.uniform(size=(4, 32, 32, 3)).astype(np.float32),
                           np.array([0, 1, 2, 3]))
      changed = sum(not np.array_equal(b, v.numpy())
                    for b, v in zip(before, layer.trainable_weights))
      out["hub_keras_layer/changed"] = np.array([changed, len(before)])

    def weights():
      sys.path.insert(0, dirs["repo"])
      from tfmochi import export, models, weightmaps
      files = {"torchvision_npz": os.path.join(dirs["torchvision"], "backbone.npz"),
               "torchvision_safetensors": os.path.join(dirs["torchvision"],
                                                       "backbone.safetensors"),
               "detectron2": os.path.join(dirs["detectron2"], "backbone.pkl")}
      for name, path in files.items():
        if not os.path.exists(path):  # .safetensors without the safetensors package
          continue
        backbone = models.build_backbone("resnet18")
        weightmaps.load_torchvision_state_dict(backbone, export.read_torchvision_weights(path))
        for k, x in normed.items():
          for key, v in backbone(x, training=False).items():
            out[f"{name}/{k}/{key}"] = v.numpy()

    for name, fn in [("saved_model", saved_model), ("hub", hub_load), ("tfsm", tfsm),
                     ("keras", keras_file), ("keras_hub", keras_hub_preset),
                     ("hub_keras_layer", hub_finetune), ("weights", weights)]:
      attempt(name, fn)
    out["errors"] = np.array(json.dumps(errors))
    np.savez(out_path, **out)
""")


def _python(*args: str):
  return harness.python(*args, cwd=_workdir())


# -------------------------------------------------------------------------------------------------
# Run directories (without the trainer) and the CLI subprocesses


def _make_run(model_dir: str, arch: str, config_arch: str | None = None,
              checkpoint: bool = True) -> str:
  """A run dir with config.json (saying `config_arch`) and a checkpoint of an `arch` encoder."""
  tf.io.gfile.makedirs(model_dir)
  if checkpoint:
    encoder = models.build_encoder(arch, small_stem=True, name="query_encoder")
    ckpt = tf.train.Checkpoint(step=tf.Variable(5, dtype=tf.int64), query_encoder=encoder)
    tf.train.CheckpointManager(ckpt, rundir.RunDir(model_dir).checkpoint_dir, max_to_keep=3).save(
        checkpoint_number=5)
  config = config_lib.TrainConfig(arch=config_arch or arch, small_stem=True, image_size=32,
                                  model_dir=model_dir, bn_mode="none", head_bn=False)
  rundir.write_json(os.path.join(model_dir, runfiles.CONFIG_FILE),
                             dataclasses.asdict(config))
  return model_dir


@functools.lru_cache(maxsize=None)
def _runs() -> dict:
  root = os.path.join(_workdir(), "runs")
  good = _make_run(os.path.join(root, "good"), "resnet18")
  existing = os.path.join(root, "existing_export")
  os.makedirs(existing)
  with open(os.path.join(existing, "keep.txt"), "w") as f:
    f.write("old export")
  replaced = os.path.join(root, "replaced_export")
  shutil.copytree(existing, replaced)
  return {"good": good, "existing": existing, "replaced": replaced,
          "wrong_arch": _make_run(os.path.join(root, "wrong_arch"), "resnet18", "resnet34"),
          "no_checkpoint": _make_run(os.path.join(root, "empty"), "resnet18", checkpoint=False)}


@functools.lru_cache(maxsize=None)
def _subprocesses() -> dict:
  """Starts the fresh-process reload and the CLI cases at once; returns their Popen handles."""
  runs = _runs()
  cli = ["-m", "tfmochi.export"]
  # The CLI cases first: they need no exports, so they overlap with the exports below.
  processes = {
      "refused": _python(*cli, f"--model_dir={runs['good']}", f"--export_dir={runs['existing']}",
                         "--format=torchvision"),
      "overwrite": _python(*cli, f"--model_dir={runs['good']}",
                           f"--export_dir={runs['replaced']}", "--format=keras", "--overwrite"),
  }
  reload_out = os.path.join(_workdir(), "reloaded.npz")
  processes["reload"] = (
      _python("-c", _RELOAD, json.dumps({**_exports(), "repo": harness.REPO}), reload_out), reload_out)
  return processes


@functools.lru_cache(maxsize=None)
def _cli(name: str) -> tuple[int, str, str]:
  return harness.finished(_subprocesses()[name])


@functools.lru_cache(maxsize=None)
def _reloaded() -> dict:
  process, path = _subprocesses()["reload"]
  code, _, stderr = harness.finished(process)
  assert code == 0 and os.path.exists(path), stderr[-3000:]
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


# -------------------------------------------------------------------------------------------------
# Round trips


class RoundTripTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    _subprocesses()  # start the fresh processes as early as possible

  def _reloaded_ok(self, name: str) -> dict:
    reloaded = _reloaded()
    errors = json.loads(str(reloaded["errors"]))
    self.assertNotIn(name, errors, msg=errors.get(name))
    return reloaded

  def test_export_info(self):
    for fmt in export.FORMATS:
      directory = _exports()[fmt]
      with open(os.path.join(directory, export.INFO_FILE)) as f:
        info = json.load(f)
      self.assertEqual((info["format"], info["arch"], info["small_stem"]),
                       (fmt, "resnet18", False))
      self.assertEqual(info["strides"], {"C2": 4, "C3": 8, "C4": 16, "C5": 32})
      self.assertEqual(info["step"], 7)
      for name in info["files"]:
        self.assertTrue(os.path.exists(os.path.join(directory, name)), name)
      if fmt == "detectron2":
        self.assertEqual(info["detectron2"]["MODEL.RESNETS.DEPTH"], 18)
        self.assertEqual(info["detectron2"]["MODEL.RESNETS.RES2_OUT_CHANNELS"], 64)
    self.assertEmpty([n for n in os.listdir(os.path.dirname(_exports()["hub"]))
                      if n.startswith(".")])

  def test_saved_model(self):
    reloaded = self._reloaded_ok("saved_model")
    self.assertEqual(list(reloaded["saved_model/signatures"]),
                     ["serving_default", "serving_resized"])
    for b, h, w in _CASES:
      key, images = f"{b}x{h}x{w}", _images(b, h, w)
      expected = _reference(images)
      self.assertAllClose(reloaded[f"saved_model/{key}/embedding"], expected["pooled"],
                          atol=_ATOL)
      for i, name in enumerate(export.FEATURE_NAMES):
        stride = 4 * 2**i
        got = reloaded[f"saved_model/{key}/{name}"]
        self.assertEqual(got.shape[1:3], (-(-h // stride), -(-w // stride)))
        self.assertAllClose(got, expected[name], atol=_ATOL)
      resized = _reference(images, resize=_IMAGE_SIZE)
      self.assertAllClose(reloaded[f"saved_model_resized/{key}/C3"], resized["C3"], atol=_ATOL)
      self.assertAllClose(reloaded[f"saved_model_resized/{key}/embedding"], resized["pooled"],
                          atol=_ATOL)

  def test_hub_saved_model_load(self):
    reloaded = self._reloaded_ok("hub")
    backbone = _backbone()
    self.assertAllEqual(reloaded["hub/counts"],
                        [len(backbone.weights), len(backbone.trainable_weights), 0])
    for b, h, w in _CASES:
      key, expected = f"{b}x{h}x{w}", _reference(_images(b, h, w))
      self.assertAllClose(reloaded[f"hub/{key}/call"], expected["pooled"], atol=_ATOL)
      self.assertAllEqual(reloaded[f"hub/{key}/call_training_shape"], [b, 512])
      self.assertAllClose(reloaded[f"hub/{key}/serving"], expected["C4"], atol=_ATOL)

  def test_hub_tfsm_layer_keras3(self):
    reloaded = self._reloaded_ok("tfsm")
    for b, h, w in _CASES:
      self.assertAllClose(reloaded[f"tfsm/{b}x{h}x{w}"], _reference(_images(b, h, w))["pooled"],
                          atol=_ATOL)
    self.assertGreater(reloaded["tfsm/changed"], 0)

  def test_hub_keras_layer_finetunes(self):
    testdata.optional_module("tensorflow_hub", "tensorflow-hub")
    testdata.optional_module("tf_keras", "tf-keras")
    reloaded = self._reloaded_ok("hub_keras_layer")
    self.assertAllClose(reloaded["hub_keras_layer/1x32x32"],
                        _reference(_images(1, 32, 32))["pooled"], atol=_ATOL)
    changed, total = reloaded["hub_keras_layer/changed"]
    self.assertEqual(total, len(_backbone().trainable_weights))
    self.assertGreater(changed, 0)

  def test_keras_file(self):
    reloaded = self._reloaded_ok("keras")
    for b, h, w in _CASES:
      expected = _reference(_images(b, h, w))
      for name in (*export.FEATURE_NAMES, "pooled"):
        self.assertAllClose(reloaded[f"keras/{b}x{h}x{w}/{name}"], expected[name], atol=_ATOL)

  def test_keras_hub_preset(self):
    testdata.optional_module("keras_hub", "keras-hub")
    reloaded = self._reloaded_ok("keras_hub")
    for b, h, w in _CASES:
      expected = _reference(_images(b, h, w))
      for level in (2, 3, 4, 5):
        self.assertAllClose(reloaded[f"keras_hub/{b}x{h}x{w}/P{level}"], expected[f"C{level}"],
                            atol=_ATOL)
    # The saved image converter reproduces our preprocessing from [0, 255] RGB.
    x = _images(1, 32, 32).astype(np.float32)
    normed = (x / 255.0 - np.array(export.IMAGENET_MEAN)) / np.array(export.IMAGENET_STD)
    self.assertAllClose(reloaded["keras_hub/converted"], normed, atol=1e-5)

  def test_numpy_weights(self):
    reloaded = self._reloaded_ok("weights")
    names = ["torchvision_npz", "detectron2"]
    if importlib.util.find_spec("safetensors") is not None:
      names.append("torchvision_safetensors")
    for name in names:
      for b, h, w in _CASES:
        expected = _reference(_images(b, h, w))
        for key in (*export.FEATURE_NAMES, "pooled"):
          self.assertAllClose(reloaded[f"{name}/{b}x{h}x{w}/{key}"], expected[key], atol=_ATOL,
                              msg=f"{name} {key}")


# -------------------------------------------------------------------------------------------------
# Weight files: keys, layouts, portability


class WeightFilesTest(tf.test.TestCase):

  def test_torchvision_keys_and_layout(self):
    directory = _exports()["torchvision"]
    with np.load(os.path.join(directory, export.NPZ_FILE)) as npz:
      state = {k: npz[k] for k in npz.files}
    expected = weightmaps.torchvision_state_dict(_backbone())
    bn_counters = {k for k in state if k.endswith("num_batches_tracked")}
    self.assertEqual(set(state) - bn_counters, set(expected))
    self.assertLen(bn_counters, 20)  # resnet18 has 20 BN layers
    self.assertEqual(state["conv1.weight"].shape, (64, 3, 7, 7))  # OIHW
    self.assertEqual(state["layer2.0.downsample.0.weight"].shape, (128, 64, 1, 1))
    self.assertAllEqual(state["layer3.1.bn2.running_var"], expected["layer3.1.bn2.running_var"])

  def test_detectron2_pickle_is_portable(self):
    with open(os.path.join(_exports()["detectron2"], export.DETECTRON2_FILE), "rb") as f:
      data = f.read()
    # Only globals that exist in NumPy 1.x and 2.x (no numpy._core), so that detectron2
    # environments with NumPy 1.x load it.
    used = set()

    class RecordingUnpickler(pickle.Unpickler):

      def find_class(self, module, name):
        used.add((module, name))
        return super().find_class(module, name)

    RecordingUnpickler(io.BytesIO(data), encoding="latin1").load()
    self.assertEqual(used, {("numpy", "ndarray"), ("builtins", "bytearray")})
    checkpoint = pickle.loads(data, encoding="latin1")
    self.assertEqual(checkpoint["__author__"], "tfmochi")
    self.assertTrue(checkpoint["matching_heuristics"])
    weights = checkpoint["model"]
    for key in ("stem.conv1.weight", "stem.conv1.norm.weight", "stem.conv1.norm.running_var",
                "res2.0.conv1.weight", "res2.0.conv1.norm.bias", "res3.0.shortcut.weight",
                "res3.0.shortcut.norm.running_mean", "res5.1.conv2.norm.weight"):
      self.assertIn(key, weights)
    self.assertEqual(weights["stem.conv1.weight"].shape, (64, 3, 7, 7))
    self.assertTrue(weights["stem.conv1.weight"].flags.writeable)
    self.assertEqual(weights["res2.0.conv1.weight"].dtype, np.float32)

  def test_load_torchvision_script_without_tensorflow(self):
    script = os.path.join(harness.REPO, "export", "load_torchvision.py")
    snippet = ("import runpy, sys; sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__'); "
               "assert 'tensorflow' not in sys.modules, 'imported tensorflow'")
    code, stdout, stderr = harness.finished(_python("-c", snippet, script, _exports()["torchvision"]))
    self.assertEqual(code, 0, msg=stderr)
    with np.load(os.path.join(_exports()["torchvision"], export.NPZ_FILE)) as npz:
      self.assertIn(f"{len(npz.files)} tensors", stdout)
    self.assertNotIn("Traceback", stderr)


# -------------------------------------------------------------------------------------------------
# keras-hub conversion and the detection smoke test


class KerasHubTest(tf.test.TestCase):

  def _assert_same_features(self, backbone, hub_backbone, shapes):
    """Bit-identical features from the plain-layer copy of `backbone` that exports hold (same
    ops, same explicit padding); `backbone`'s own training layers (1x1 convolutions as matmuls)
    up to float rounding."""
    plain = export.standard_backbone(backbone)
    pyramid = keras.Model(hub_backbone.inputs[0], hub_backbone.pyramid_outputs)
    for shape in shapes:
      x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
      ours, theirs = plain(x, training=False), pyramid(x, training=False)
      fast = backbone(x, training=False)
      for level in (2, 3, 4, 5):
        self.assertAllEqual(theirs[f"P{level}"], ours[f"C{level}"])
        scale = np.abs(ours[f"C{level}"]).max()  # rounding grows with depth and magnitude
        self.assertAllClose(fast[f"C{level}"], ours[f"C{level}"], atol=1e-4 * scale, rtol=1e-3)
      self.assertAllEqual(hub_backbone(x, training=False), ours["C5"])

  def test_to_keras_hub_is_exact_resnet18(self):
    testdata.optional_module("keras_hub", "keras-hub")
    hub_backbone = export.to_keras_hub(_backbone())
    self.assertEqual(hub_backbone.block_type, "basic_block")
    self._assert_same_features(_backbone(), hub_backbone, [(1, 32, 32, 3), (2, 65, 77, 3)])

  def test_to_keras_hub_is_exact_resnet50(self):
    testdata.optional_module("keras_hub", "keras-hub")
    backbone = models.build_backbone("resnet50")
    _randomise(backbone, 1)
    hub_backbone = export.to_keras_hub(backbone)
    self.assertEqual(hub_backbone.block_type, "bottleneck_block")
    self.assertEqual(hub_backbone.count_params(), backbone.count_params())
    self._assert_same_features(backbone, hub_backbone, [(1, 33, 31, 3)])

  def test_small_stem_has_no_keras_hub_equivalent(self):
    testdata.optional_module("keras_hub", "keras-hub")
    with self.assertRaisesRegex(ValueError, "small_stem"):
      export.to_keras_hub(models.build_backbone("resnet18", small_stem=True))

  def test_retinanet_trains_one_step_on_exported_backbone(self):
    keras_hub = testdata.optional_module("keras_hub", "keras-hub")
    preset = os.path.join(_exports()["keras"], export.KERAS_HUB_DIR)
    encoder = keras_hub.models.ResNetBackbone.from_preset(preset)
    backbone = keras_hub.models.RetinaNetBackbone(image_encoder=encoder, min_level=3,
                                                  max_level=7, use_p5=False)
    detector = keras_hub.models.RetinaNetObjectDetector(backbone=backbone, num_classes=3,
                                                        bounding_box_format="yxyx")
    detector.compile(optimizer=keras.optimizers.SGD(0.01))
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 64, 64, 3)).astype(np.float32)
    boxes = {"boxes": np.array([[[4, 4, 30, 30], [10, 20, 60, 50]],
                                [[0, 0, 63, 63], [-1, -1, -1, -1]]], np.float32),
             "labels": np.array([[0, 2], [1, -1]], np.float32)}  # -1: padding
    before = [w.numpy().copy() for w in encoder.trainable_weights]
    history = detector.fit(tf.data.Dataset.from_tensor_slices((images, boxes)).batch(2),
                           epochs=1, verbose=0).history
    self.assertTrue(np.isfinite(history["loss"][0]))
    self.assertTrue(any(not np.array_equal(b, w.numpy())
                        for b, w in zip(before, encoder.trainable_weights)))


# -------------------------------------------------------------------------------------------------
# Atomicity and bad input


class SmallArchTest(tf.test.TestCase):
  """resnet10_tiny, the quickstart's network: its saved_model, hub and keras exports load without
  tfmochi and embed an image as the run's encoder does."""

  def test_saved_model_hub_and_keras_embed_an_image(self):
    model_dir = _make_run(os.path.join(self.create_tempdir().full_path, "tiny"), "resnet10_tiny")
    encoder = checkpoints.restore_encoder(model_dir).encoder
    image = _images(1, 28, 28)  # an MNIST-sized uint8 RGB image
    unit = image.astype(np.float32) / 255.0
    normed = (unit - np.float32(export.IMAGENET_MEAN)) / np.float32(export.IMAGENET_STD)
    expected = encoder.backbone(normed, training=False)["pooled"].numpy()
    self.assertEqual(expected.shape, (1, 128))
    dirs = {}
    for fmt in ("saved_model", "hub", "keras"):
      dirs[fmt], info = export.export_run(model_dir, fmt=fmt)
      self.assertEqual((info["arch"], info["feature_dim"]), ("resnet10_tiny", 128))
    served = tf.saved_model.load(dirs["saved_model"]).signatures["serving_default"]
    self.assertAllClose(served(images=tf.constant(image))["embedding"], expected, atol=_ATOL)
    self.assertAllClose(tf.saved_model.load(dirs["hub"])(tf.constant(unit)), expected,
                        atol=_ATOL)
    loaded = keras.saving.load_model(os.path.join(dirs["keras"], export.KERAS_FILE))
    self.assertAllClose(loaded(normed)["pooled"], expected, atol=_ATOL)
    with open(os.path.join(dirs["keras"], export.INFO_FILE)) as f:
      self.assertIn("not written", json.load(f)["keras_hub"])  # no keras-hub ResNet this small

  def test_hub_keras_layer_of_a_tiny_run(self):
    testdata.optional_module("tensorflow_hub", "tensorflow-hub")
    testdata.optional_module("tf_keras", "tf-keras")
    model_dir = _make_run(os.path.join(self.create_tempdir().full_path, "tiny"), "resnet10_tiny")
    hub_dir, _ = export.export_run(model_dir, fmt="hub")
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import tensorflow_hub as hub
        import tf_keras
        layer = hub.KerasLayer(sys.argv[1])
        model = tf_keras.Sequential([tf_keras.Input((28, 28, 3)), layer])
        print(model(np.full([2, 28, 28, 3], 0.5, np.float32)).shape)
    """)
    code, stdout, stderr = harness.finished(harness.python("-c", script, hub_dir,
                                                           cwd=_workdir()))
    self.assertEqual(code, 0, stderr[-3000:])
    self.assertIn("(2, 128)", stdout)


class AtomicityTest(tf.test.TestCase):

  def _stray(self, parent: str) -> list[str]:
    return [n for n in os.listdir(parent) if n.startswith(".")]

  def test_overwrite_replaces_only_when_asked(self):
    out = os.path.join(self.get_temp_dir(), "overwrite", "torchvision")
    export.export_backbone(_backbone(), out, "torchvision")
    with open(os.path.join(out, "marker"), "w") as f:
      f.write("old")
    with self.assertRaisesRegex(export.ExportError, "already exists.*--overwrite"):
      export.export_backbone(_backbone(), out, "torchvision")
    self.assertTrue(os.path.exists(os.path.join(out, "marker")))
    export.export_backbone(_backbone(), out, "torchvision", overwrite=True)
    self.assertFalse(os.path.exists(os.path.join(out, "marker")))
    self.assertTrue(os.path.exists(os.path.join(out, export.NPZ_FILE)))
    self.assertEmpty(self._stray(os.path.dirname(out)))

  def test_crash_leaves_no_export_and_no_temp_dir(self):
    parent = os.path.join(self.get_temp_dir(), "crash")
    out = os.path.join(parent, "torchvision")

    def crashing_writer(backbone, directory, image_size):
      del backbone, image_size
      with open(os.path.join(directory, export.NPZ_FILE), "wb") as f:
        f.write(b"half written")
      raise RuntimeError("disk full")

    with pytest.MonkeyPatch.context() as patch:
      patch.setitem(export._WRITERS, "torchvision", crashing_writer)
      with self.assertRaisesRegex(RuntimeError, "disk full"):
        export.export_backbone(_backbone(), out, "torchvision")
      self.assertFalse(os.path.exists(out))
      self.assertEmpty(os.listdir(parent))
      # A crash while replacing an export keeps the old one.
      os.makedirs(out)
      with open(os.path.join(out, "marker"), "w") as f:
        f.write("old")
      with self.assertRaisesRegex(RuntimeError, "disk full"):
        export.export_backbone(_backbone(), out, "torchvision", overwrite=True)
      self.assertEqual(os.listdir(out), ["marker"])
      self.assertEmpty(self._stray(parent))

  def test_trainer_backbone_mirrored_sync_bn_mixed_precision(self):
    # What the trainer hands over: built in a 2-replica scope, synchronized BN, bfloat16 policy.
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
      with strategy.scope():
        backbone = models.build_backbone("resnet18", small_stem=True, bn_mode="sync")
      _randomise(backbone, 2)
      out = os.path.join(self.get_temp_dir(), "trainer", "torchvision")
      export.export_backbone(backbone, out, "torchvision", image_size=32, overwrite=True,
                             arch="resnet18", small_stem=True)
      self.assertEqual(keras.config.dtype_policy().name, "mixed_bfloat16")  # restored
      clean = export.standard_backbone(backbone)
    finally:
      keras.config.set_dtype_policy("float32")
    state = export.read_torchvision_weights(os.path.join(out, export.NPZ_FILE))
    for key, value in weightmaps.torchvision_state_dict(backbone).items():
      self.assertAllEqual(state[key], value)  # float32 variables, copied exactly
    self.assertEqual(clean.get_layer("layer1.0.bn1").dtype_policy.name, "float32")
    self.assertFalse(clean.get_layer("layer1.0.bn1").synchronized)

  def test_unknown_format_lists_choices(self):
    with self.assertRaisesRegex(export.ExportError, "onnx.*saved_model, hub, keras, detectron2, "
                                                    "torchvision"):
      export.export_run(_runs()["good"], fmt="onnx")

  def test_no_checkpoint_and_no_run(self):
    with self.assertRaisesRegex(rundir.CheckpointError, "has no checkpoint yet"):
      export.export_run(_runs()["no_checkpoint"], os.path.join(self.get_temp_dir(), "x"))
    with self.assertRaisesRegex(rundir.CheckpointError, "does not exist"):
      export.export_run(os.path.join(self.get_temp_dir(), "missing"))

  def test_smoke_arch_weight_files_are_refused_before_any_restore(self):
    model_dir = self.create_tempdir().full_path  # config.json only: no checkpoint to restore
    rundir.write_json(
        os.path.join(model_dir, runfiles.CONFIG_FILE),
        dataclasses.asdict(config_lib.TrainConfig(arch="resnet10_tiny", model_dir=model_dir)))
    for fmt in export.TORCHVISION_FORMATS:
      with self.assertRaisesRegex(export.ExportError, "resnet10_tiny.*no torchvision counterpart"
                                  f".*no {fmt} weight file.*saved_model, hub or keras"):
        export.export_run(model_dir, fmt=fmt)

  def test_backbone_of_another_architecture(self):
    with self.assertRaisesRegex(ValueError, "not the resnet34"):
      export.standard_backbone(_backbone(), arch="resnet34")
    with self.assertRaisesRegex(ValueError, "small_stem=False"):
      export.standard_backbone(_backbone(), small_stem=True)

  def test_cli_refuses_existing_export(self):
    code, stdout, stderr = _cli("refused")
    self.assertEqual(code, 2, msg=stdout + stderr)
    self.assertIn("already exists", stderr)
    self.assertIn("--overwrite", stderr)
    self.assertNotIn("Traceback", stderr)
    self.assertEqual(os.listdir(_runs()["existing"]), ["keep.txt"])

  def test_cli_overwrite_replaces_and_prints_files(self):
    code, stdout, stderr = _cli("overwrite")
    self.assertEqual(code, 0, msg=stderr[-3000:])
    replaced = _runs()["replaced"]
    self.assertIn(f"as keras to {replaced}", stdout)
    self.assertIn(os.path.join(replaced, export.KERAS_FILE), stdout)
    self.assertIn("keras-hub preset not written", stdout)  # small stem
    self.assertFalse(os.path.exists(os.path.join(replaced, "keep.txt")))
    with open(os.path.join(replaced, export.INFO_FILE)) as f:
      info = json.load(f)
    self.assertEqual((info["arch"], info["small_stem"], info["step"]), ("resnet18", True, 5))
    self.assertEqual(info["strides"], {"C2": 1, "C3": 2, "C4": 4, "C5": 8})

  def test_checkpoint_of_another_architecture(self):
    # The CLI turns this CheckpointError into the same one-line message + exit 2 as above.
    model_dir = _runs()["wrong_arch"]  # config.json: resnet34, checkpoint: resnet18
    logger, level = tf.get_logger(), tf.get_logger().level
    logger.setLevel("ERROR")  # the failed restore's objects log a warning per value when freed
    try:
      with self.assertRaisesRegex(rundir.CheckpointError,
                                  "could be read into this model.*config.json"):
        export.export_run(model_dir, fmt="hub")
      gc.collect()
    finally:
      logger.setLevel(level)
    self.assertFalse(os.path.exists(os.path.join(model_dir, "export")))
