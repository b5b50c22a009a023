"""Tests for tfmochi.evaluate.features: extraction over 2 replicas (logical CPUs) vs one device."""

from __future__ import annotations

import tensorflow as tf

from tfmochi import data as data_lib
from tfmochi import distribute
from tfmochi import evaluate
from tfmochi.evaluate import features as features_lib
import eval_fixtures as fx  # tests/ is on sys.path under pytest


class DistributedTest(tf.test.TestCase):
  """knn_eval and linear_probe spread over a MirroredStrategy agree with one device."""

  def test_two_replicas_equal_one_device(self):
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    # 39 training images in batches of 8: the last batch (7 rows) is padded to 8 and split 4/4,
    # so one replica holds a padded row, which must count nowhere.
    train, test = fx.sources(num_per_class=13, num_classes=3)
    with strategy.scope():
      backbone = fx.tiny_bn_backbone()
    kwargs = dict(image_size=fx.SIZE, epochs=3, lr=0.3, batch_size=8, seed=4,
                  progress=lambda _: None)
    one = evaluate.linear_probe(backbone, train, test, **kwargs)
    two = evaluate.linear_probe(backbone, train, test, strategy=strategy, **kwargs)
    for key in ("top1", "top5", "best_top1", "train_top1", "num_test", "feature_dim"):
      self.assertEqual(one[key], two[key], msg=key)
    self.assertAllClose(one["train_loss"], two["train_loss"], rtol=1e-5)
    self.assertTrue(two["backbone_unchanged"])

    knn_one = evaluate.knn_eval(backbone, train, test, image_size=fx.SIZE, k=5, batch_size=8)
    knn_two = evaluate.knn_eval(backbone, train, test, image_size=fx.SIZE, k=5, batch_size=8,
                                strategy=strategy)
    self.assertEqual((knn_one["top1"], knn_one["num_train"]),
                     (knn_two["top1"], knn_two["num_train"]))
    feats_one, labels_one = evaluate.extract_pooled(
        backbone, data_lib.eval_dataset(train, batch_size=8, image_size=fx.SIZE), batch_size=8)
    feats_two, labels_two = evaluate.extract_pooled(
        backbone, data_lib.eval_dataset(train, batch_size=8, image_size=fx.SIZE), batch_size=8,
        strategy=strategy)
    self.assertEqual(feats_two.shape, (39, 16))
    self.assertAllEqual(labels_one, labels_two)  # same rows, same order
    self.assertAllClose(feats_one, feats_two, atol=1e-6)
    # knn_eval's train and test passes and the extraction above used one traced step.
    step = features_lib._gathering_step_of(backbone, strategy)
    self.assertEqual(step.experimental_get_tracing_count(), 1)
    with strategy.scope():
      other = fx.tiny_bn_backbone()
    self.assertIsNot(features_lib._gathering_step_of(other, strategy), step)
    self.assertIs(features_lib._gathering_step_of(backbone, strategy), step)

  def test_batch_must_split_over_the_replicas(self):
    strategy = distribute.mirrored_strategy(["/cpu:0", "/cpu:1"])
    with self.assertRaisesRegex(evaluate.EvalError, "divisible by the 2 replicas"):
      evaluate.check_strategy(strategy, 7)
    self.assertIsNone(evaluate.check_strategy(None, 7))
    self.assertIsNone(evaluate.check_strategy(tf.distribute.get_strategy(), 7))


if __name__ == "__main__":
  tf.test.main()
