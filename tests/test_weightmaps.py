"""Tests of tfmochi.weightmaps: torchvision keys and their order, the exact round trip, detectron2
and keras-hub names."""

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import test_models  # the backbones cached by tests/test_models.py, torchvision's key list
from tfmochi import models
from tfmochi import weightmaps


class TorchvisionMappingTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters(*models.ARCHS)
  def test_keys_and_order(self, arch):
    state = weightmaps.torchvision_state_dict(test_models._cached_backbone(arch))
    self.assertEqual(list(state), test_models._torchvision_keys(arch))
    self.assertEqual(state["conv1.weight"].shape, (64, 3, 7, 7))
    self.assertTrue(all(v.dtype == np.float32 for v in state.values()))
    if arch == "resnet50":
      self.assertEqual(state["layer4.2.conv3.weight"].shape, (2048, 512, 1, 1))
      self.assertEqual(state["layer1.0.downsample.0.weight"].shape, (256, 64, 1, 1))
      self.assertEqual(state["layer3.0.conv2.weight"].shape, (256, 256, 3, 3))
    else:
      self.assertEqual(state["layer2.0.conv1.weight"].shape, (128, 64, 3, 3))

  def test_exact_round_trip(self):
    src = test_models._cached_backbone("resnet18", True)
    test_models._randomise_bn(src, seed=8)
    state = weightmaps.torchvision_state_dict(src)
    dst = models.build_backbone("resnet18", small_stem=True)
    self.assertEqual(state["conv1.weight"].shape, (64, 3, 3, 3))
    weightmaps.load_torchvision_state_dict(dst, state)
    for key, value in weightmaps.torchvision_state_dict(dst).items():
      self.assertAllEqual(value, state[key], msg=key)
    x = np.random.default_rng(9).normal(size=(2, 10, 10, 3)).astype(np.float32)
    got, want = dst(x), src(x)
    for level in want:
      self.assertAllEqual(got[level], want[level])

  def test_load_errors_name_keys(self):
    backbone = test_models._cached_backbone("resnet18")
    state = weightmaps.torchvision_state_dict(backbone)
    # A full torchvision checkpoint (fc + BN counters) loads with the default ignore list.
    extra = {**state, "fc.weight": np.zeros((1000, 512)), "fc.bias": np.zeros(1000),
             "bn1.num_batches_tracked": np.array(0)}
    weightmaps.load_torchvision_state_dict(backbone, extra)
    missing = {k: v for k, v in state.items() if k != "layer3.1.bn2.running_var"}
    with self.assertRaisesRegex(ValueError, r"missing keys \['layer3.1.bn2.running_var'\]"):
      weightmaps.load_torchvision_state_dict(backbone, missing)
    with self.assertRaisesRegex(ValueError, "unexpected keys.*layer5.0.conv1.weight"):
      weightmaps.load_torchvision_state_dict(backbone, {**state, "layer5.0.conv1.weight": 0})
    bad = {**state, "layer1.0.conv2.weight": np.zeros((64, 64, 1, 1))}
    with self.assertRaisesRegex(ValueError, r"layer1.0.conv2.weight: got \(64, 64, 1, 1\), "
                                r"expected \(64, 64, 3, 3\)"):
      weightmaps.load_torchvision_state_dict(backbone, bad)
    with self.assertRaisesRegex(ValueError, "unexpected keys.*fc.weight"):
      weightmaps.load_torchvision_state_dict(backbone, extra, ignore=["*num_batches_tracked"])

  def test_detectron2_names(self):
    self.assertEqual(weightmaps.torchvision_to_detectron2_key("conv1.weight"), "stem.conv1.weight")
    self.assertEqual(weightmaps.torchvision_to_detectron2_key("bn1.running_var"),
                     "stem.conv1.norm.running_var")
    self.assertEqual(weightmaps.torchvision_to_detectron2_key("layer1.2.bn3.bias"),
                     "res2.2.conv3.norm.bias")
    self.assertEqual(weightmaps.torchvision_to_detectron2_key("layer4.0.downsample.0.weight"),
                     "res5.0.shortcut.weight")
    self.assertEqual(weightmaps.torchvision_to_detectron2_key("layer4.0.downsample.1.weight"),
                     "res5.0.shortcut.norm.weight")

  def test_keras_hub_names(self):
    names = {"conv1": "conv1_conv", "bn1": "conv1_bn", "layer1.0.conv3": "stack0_block0_3_conv",
             "layer4.2.bn1": "stack3_block2_1_bn", "layer2.0.downsample.0": "stack1_block0_0_conv",
             "layer2.0.downsample.1": "stack1_block0_0_bn"}
    for ours, theirs in names.items():
      self.assertEqual(weightmaps.keras_hub_layer_name(ours), theirs)
    with self.assertRaisesRegex(ValueError, "layer1.0.relu"):
      weightmaps.keras_hub_layer_name("layer1.0.relu")

  def test_detectron2_key_inverse(self):
    keys = list(weightmaps.torchvision_state_dict(models.build_backbone("resnet18"))) + [
        "layer1.0.conv3.weight", "layer1.0.bn3.running_var", "layer1.0.downsample.0.weight",
        "layer1.0.downsample.1.bias"]
    for key in keys:
      self.assertEqual(weightmaps.detectron2_to_torchvision_key(
          weightmaps.torchvision_to_detectron2_key(key)), key)


if __name__ == "__main__":
  tf.test.main()
