"""Tests of tfmochi.benchmark.peer, the PyTorch MoCo v2 step (tiny sizes; never about speed)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch peer needs the bench extra: "
                            "pip install -e \".[bench]\" (a CPU build of torch)")

import tensorflow as tf  # noqa: E402

from tfmochi import config as config_lib  # noqa: E402
from tfmochi import losses  # noqa: E402
from tfmochi import models  # noqa: E402
from tfmochi.benchmark import cli  # noqa: E402
from tfmochi.benchmark import peer  # noqa: E402

TINY_MOMENTUM = 0.9
# The MoCo v2 step the peer transcribes, at sizes a test can afford.
PEER_FLAGS = dict(arch="resnet50", small_stem=False, image_size=32, batch_size=4, queue_size=64,
                  embedding_dim=16, mlp_head=True, head_bn=False, bn_mode="shuffle",
                  mask_duplicates=False, mochi_num_hard=0, mochi_num_mix=0,
                  mochi_num_query_mix=0, moco_momentum=0.999, weight_decay=1e-4)


def tiny_moco(queue_size=64, dim=8):
  torch.manual_seed(0)
  return peer.MoCoPeer(lambda: peer.ResNet(dim, blocks=(1, 1, 1, 1), width=8, mlp=True), dim,
                       queue_size, TINY_MOMENTUM, 0.2)


def _params(module):
  return [p.detach().clone() for p in module.parameters()]


def test_resnet50_has_torchvisions_parameter_count_and_tfmochis_backbone():
  assert sum(p.numel() for p in peer.ResNet(1000).parameters()) == 25_557_032
  trunk = peer.ResNet(1000)
  trunk_params = sum(p.numel() for p in trunk.parameters()) - 2048 * 1000 - 1000
  backbone = models.build_backbone("resnet50", small_stem=False)
  # Keras also counts BN's moving statistics, PyTorch keeps them as buffers: trainable only.
  backbone_params = sum(int(np.prod(w.shape)) for w in backbone.trainable_weights)
  assert trunk_params == backbone_params == 23_508_032


def test_two_steps_update_queue_pointer_keys_and_key_encoder():
  model = tiny_moco()
  step = peer.make_train_step(model)
  images = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i))
            for i in range(2)]
  queue0 = model.queue.clone()
  query0 = _params(model.encoder_q)
  loss = step(*images)
  assert torch.isfinite(loss)
  assert int(model.queue_ptr) == 4
  # The batch's keys replaced the oldest 4 columns, unit vectors; the others are untouched.
  assert not torch.allclose(model.queue[:, :4], queue0[:, :4])
  torch.testing.assert_close(model.queue[:, :4].norm(dim=0), torch.ones(4))
  torch.testing.assert_close(model.queue[:, 4:], queue0[:, 4:])
  # First step: the key encoder was a copy of the query encoder, so the update kept it there.
  for p_k, p_q in zip(model.encoder_k.parameters(), query0):
    torch.testing.assert_close(p_k, p_q)
  key1, query1 = _params(model.encoder_k), _params(model.encoder_q)
  assert any(not torch.equal(a, b) for a, b in zip(query0, query1))  # SGD moved the query
  loss = step(*images)
  assert torch.isfinite(loss)
  assert int(model.queue_ptr) == 8
  for p_k, k1, q1 in zip(model.encoder_k.parameters(), key1, query1):
    torch.testing.assert_close(p_k, TINY_MOMENTUM * k1 + (1 - TINY_MOMENTUM) * q1)


def test_queue_pointer_wraps_around():
  model = tiny_moco(queue_size=8)
  keys = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
  for _ in range(3):
    model.enqueue(keys)
  assert int(model.queue_ptr) == 4
  torch.testing.assert_close(model.queue[:, :4], keys.T)


def test_info_nce_matches_tfmochi_and_numpy():
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  q, k = unit(rng.normal(size=(6, 16))), unit(rng.normal(size=(6, 16)))
  queue = unit(rng.normal(size=(64, 16))).T  # [D, K], columns normalised
  got = peer.info_nce(*(torch.tensor(a, dtype=torch.float64) for a in (q, k, queue)), 0.2)
  l_pos, l_neg = (q * k).sum(1), q @ queue
  logits = np.concatenate([l_pos[:, None], l_neg], 1) / 0.2
  reference = np.mean(np.log(np.exp(logits).sum(1)) - logits[:, 0])
  tfmochi = tf.reduce_mean(losses.info_nce(tf.constant(l_pos, tf.float32),
                                           tf.constant(l_neg, tf.float32), 0.2))
  np.testing.assert_allclose(got.item(), reference, rtol=1e-10)
  np.testing.assert_allclose(tfmochi.numpy(), reference, rtol=1e-5)


def test_check_config_names_the_flags_to_change():
  with pytest.raises(ValueError, match="--nohead_bn.*MoCHi off"):
    peer.check_config(config_lib.TrainConfig(**dict(PEER_FLAGS, head_bn=True, mochi_num_hard=4,
                                                    mochi_num_mix=4, mochi_num_query_mix=2)))
  peer.check_config(config_lib.TrainConfig(**PEER_FLAGS))


def test_peer_benchmark_reports_its_machine():
  result = cli.run("peer", config_lib.TrainConfig(**PEER_FLAGS), warmup=1, timed=5)
  assert result["what"] == "peer" and list(result["variants"]) == ["peer"]
  assert len(result["variants"]["peer"]["seconds_per_step"]) == 5
  assert result["variants"]["peer"]["images_per_sec"] > 0
  machine = result["machine"]
  assert machine["library"] == "torch" and machine["torch"] == torch.__version__
  assert machine["intra_op_threads"] == torch.get_num_threads()
  assert machine["gemm_f32_peak_gflops"] > 0
