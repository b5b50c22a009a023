"""`--what=peer`: MoCo v2's training step in PyTorch, the reference tfmochi is timed against.

A transcription of the algorithm (not of any other code base) in plain `torch.nn`, so that the
peer needs nothing beyond `torch` (the `bench` extra; a CPU build of it):

  encoders   query and key ResNet-50 in torchvision's v1.5 layout (7x7/2 stem and 3x3/2 max pool,
             bottlenecks 1x1 -> 3x3 -> 1x1 with the stride on the 3x3, BN after every convolution,
             1x1 projection shortcuts with BN), global average pool, MLP head 2048-2048-D
             (Linear, ReLU, Linear); 25,557,032 parameters with a 1000-way linear head, as
             torchvision's resnet50 and tfmochi's backbone plus a 1000-way Linear.
  momentum   key ← m·key + (1 − m)·query on the parameters (not the BN buffers), before the keys.
  shuffle BN on one process: the key batch permuted at random before the key encoder and put back
             in order after (BN statistics of a single batch do not depend on the order, but the
             gathers are part of the step's cost).
  queue      a [D, K] buffer of normalised keys and a pointer; the batch's keys replace the oldest
             B columns after the loss is formed.
  loss       InfoNCE: cross-entropy of [l_pos, l_neg] / T with target 0, l_pos = q·k [B, 1],
             l_neg = q · queue [B, K].
  optimizer  torch.optim.SGD(lr, momentum, weight_decay): coupled L2 on the query encoder.

Images are NCHW float32 (PyTorch's default layout), random normal, made once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 (PyTorch's usual name)
from torch import nn

from tfmochi.benchmark import machine
from tfmochi.benchmark import timing

RESNET50_BLOCKS = (3, 4, 6, 3)


class Bottleneck(nn.Module):
  """ResNet v1.5 bottleneck: [N, C_in, H, W] -> [N, 4·width, H/stride, W/stride]."""

  def __init__(self, in_channels: int, width: int, stride: int):
    super().__init__()
    out = 4 * width
    self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(width)
    self.conv3 = nn.Conv2d(width, out, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(out)
    self.shortcut = None
    if stride != 1 or in_channels != out:
      self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out, 1, stride=stride, bias=False),
                                    nn.BatchNorm2d(out))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
  """Bottleneck ResNet with a head: [N, 3, S, S] -> [N, outputs].

  Args:
    outputs: the head's output width (D, or 1000 classes).
    blocks: bottlenecks per stage (ResNet-50: 3, 4, 6, 3).
    width: the first stage's bottleneck width (64); stages double it, the stem has this many.
    mlp: the head is Linear(F, F), ReLU, Linear(F, outputs) (MoCo v2) instead of one Linear,
      with F = 32·width the pooled feature width.
  """

  def __init__(self, outputs: int, blocks=RESNET50_BLOCKS, width: int = 64, mlp: bool = False):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False),
                              nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                              nn.MaxPool2d(3, stride=2, padding=1))
    layers, channels = [], width
    for stage, count in enumerate(blocks):
      for i in range(count):
        stride = 2 if stage > 0 and i == 0 else 1
        layers.append(Bottleneck(channels, width * 2 ** stage, stride))
        channels = 4 * width * 2 ** stage
    self.stages = nn.Sequential(*layers)
    self.fc = (nn.Sequential(nn.Linear(channels, channels), nn.ReLU(inplace=True),
                             nn.Linear(channels, outputs)) if mlp else nn.Linear(channels, outputs))
    for module in self.modules():
      if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.stages(self.stem(x))
    return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor,
             temperature: float) -> torch.Tensor:
  """MoCo's loss, mean over the batch: q, k [B, D] normalised, queue [D, K] -> scalar."""
  l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # [B, 1]
  l_neg = torch.einsum("nc,ck->nk", q, queue)  # [B, K]
  logits = torch.cat([l_pos, l_neg], dim=1) / temperature
  labels = torch.zeros(logits.shape[0], dtype=torch.long)  # the positive is column 0
  return F.cross_entropy(logits, labels)


class MoCoPeer(nn.Module):
  """MoCo v2 on one process: `forward(im_q, im_k)` [B, 3, S, S] twice -> the scalar loss.

  `make_encoder()` builds one encoder ([N, 3, S, S] -> [N, D]); the key encoder starts as a copy of
  the query encoder and is never trained by the optimizer.
  """

  def __init__(self, make_encoder, dim: int, queue_size: int, momentum: float,
               temperature: float):
    super().__init__()
    self.encoder_q, self.encoder_k = make_encoder(), make_encoder()
    for p_q, p_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
      p_k.data.copy_(p_q.data)
      p_k.requires_grad = False
    self.momentum, self.temperature = momentum, temperature
    self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))
    self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

  @torch.no_grad()
  def momentum_update(self) -> None:
    for p_q, p_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
      p_k.mul_(self.momentum).add_(p_q.detach(), alpha=1.0 - self.momentum)

  @torch.no_grad()
  def enqueue(self, keys: torch.Tensor) -> None:
    """keys [B, D] replace the queue's oldest B columns (K is a multiple of B)."""
    batch, ptr = keys.shape[0], int(self.queue_ptr)
    self.queue[:, ptr:ptr + batch] = keys.T
    self.queue_ptr[0] = (ptr + batch) % self.queue.shape[1]

  @torch.no_grad()
  def keys(self, im_k: torch.Tensor) -> torch.Tensor:
    """Shuffle BN on one process: [B, 3, S, S] -> [B, D] normalised keys in the batch's order."""
    shuffle = torch.randperm(im_k.shape[0])
    k = F.normalize(self.encoder_k(im_k[shuffle]), dim=1)
    return k[torch.argsort(shuffle)]

  def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> torch.Tensor:
    q = F.normalize(self.encoder_q(im_q), dim=1)
    self.momentum_update()
    k = self.keys(im_k)
    loss = info_nce(q, k, self.queue.clone().detach(), self.temperature)
    self.enqueue(k)
    return loss


def make_train_step(model: MoCoPeer, learning_rate: float = 0.03, momentum: float = 0.9,
                    weight_decay: float = 1e-4):
  """SGD on `model`'s trainable parameters: returns step(im_q, im_k) -> the detached loss."""
  optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], learning_rate,
                              momentum=momentum, weight_decay=weight_decay)

  def step(im_q: torch.Tensor, im_k: torch.Tensor) -> torch.Tensor:
    loss = model(im_q, im_k)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()

  return step


def check_config(config) -> None:
  """Raises ValueError unless the TrainConfig is the MoCo v2 step the peer transcribes."""
  wrong = {
      "--arch=resnet50": config.arch != "resnet50",
      "--nosmall_stem": config.small_stem,
      "--mlp_head": not config.mlp_head,
      "--nohead_bn (MoCo v2's head has no BN)": config.head_bn,
      "--bn_mode=shuffle": config.bn_mode != "shuffle",
      "--loss=infonce": config.loss != "infonce",
      "--nomask_duplicates": config.mask_duplicates,
      "MoCHi off (--mochi_num_hard=0 --mochi_num_mix=0 --mochi_num_query_mix=0)":
          config.moco.objective.mochi.enabled,
      "--mixed_precision=float32": config.mixed_precision != "float32",
      "--queue_size a multiple of --batch_size": config.queue_size % config.batch_size != 0,
  }
  needed = [flag for flag, bad in wrong.items() if bad]
  if needed:
    raise ValueError("the PyTorch peer is MoCo v2's step; it needs " + ", ".join(needed) + ".")


def set_threads(intra_op: int, inter_op: int = 0) -> None:
  """PyTorch's thread pools sized as TensorFlow's (0: TensorFlow's default, the usable CPUs)."""
  torch.set_num_threads(intra_op or machine.schedulable_cpus())
  try:
    torch.set_num_interop_threads(inter_op or machine.schedulable_cpus())
  except RuntimeError:  # only possible before the first parallel work; keep PyTorch's
    pass


def bench_peer(config, *, warmup: int = 3, timed: int = 5, steps_per_call: int = 1) -> dict:
  """Times the peer's training step with `config`'s sizes (see `check_config`).

  The learning rate is 0.03 (constant), as tfmochi's step benchmark; the momentum m, T, K, D and
  the weight decay come from `config`. Returns the JSON-able result ("peer" variant).
  """
  check_config(config)
  torch.manual_seed(config.seed)
  model = MoCoPeer(lambda: ResNet(config.embedding_dim, mlp=True), config.embedding_dim,
                   config.queue_size, config.moco_momentum, config.temperature)
  model.train()
  step = make_train_step(model, 0.03, 0.9, config.weight_decay)
  shape = (config.batch_size, 3, config.image_size, config.image_size)
  im_q, im_k = torch.randn(shape), torch.randn(shape)

  def call():
    for _ in range(steps_per_call):
      loss = step(im_q, im_k)
    return loss

  results = timing.run_interleaved({"peer": call}, warmup=warmup, timed=timed,
                                   steps_per_call=steps_per_call, finish=lambda loss: loss.item(),
                                   tensorflow_memory=False)
  out = {"what": "peer", **timing.summarize(results, config.batch_size)}
  out["config"] = {k: getattr(config, k) for k in (
      "arch", "image_size", "batch_size", "queue_size", "embedding_dim", "moco_momentum",
      "temperature", "weight_decay", "bn_mode", "mixed_precision")}
  out["config"].update(steps_per_call=steps_per_call, learning_rate=0.03, sgd_momentum=0.9)
  out["parameters"] = sum(p.numel() for p in model.encoder_q.parameters())
  return out
