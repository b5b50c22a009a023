"""PyTorch's SGD with momentum, and float16 dynamic loss scaling, as small tf.Modules.

MoCo, MoCHi and MoCo's linear protocol all train with `torch.optim.SGD(momentum=0.9)`:

  g ← g + wd·θ                    (coupled L2, when weight_decay > 0)
  buf ← m·buf + g                 (buf = g at the first step: the buffer starts at 0)
  θ ← θ − lr·buf                  (Nesterov: θ ← θ − lr·(g + m·buf))

Keras' SGD keeps a velocity with the learning rate folded in (v ← m·v − lr·g; θ ← θ + v). The two
agree only while lr is constant: after a change of lr (cosine schedule, warm-up, the probe's
milestones) Keras keeps moving with the old lr's velocity. `SGD` below is PyTorch's form, used by
both pretraining (`tfmochi.trainer`) and the linear probe (`tfmochi.evaluate`).

It is not a Keras optimizer on purpose: Keras 3's `apply_gradients` all-reduces the gradients
itself (through a merge call) and lets the first replica decide whether float16 gradients are
finite. `MoCo.train_step` all-reduces the gradients once, takes one decision from the global
gradients, and then calls `SGD.apply` on every replica with the same values: each replica updates
its own copy of the (NONE-aggregated) variables identically, as the queue and the momentum encoder
are updated, with no merge call (which also keeps the step compilable by XLA). The learning rate
is an argument, so the step counter that drives it is the caller's (the trainer's global step).

Checkpoints hold one buffer per variable (`momentum_buffers/<i>`). A checkpoint whose optimizer
state is Keras' SGD velocity (v = m·v − lr·g) cannot be resumed: it equals −lr·buf only if lr never
changed, so there is no exact conversion; `check_checkpoint` says so and what to do.
"""

from __future__ import annotations

from typing import Callable, Sequence

import tensorflow as tf

# What a loss-scale-enabled step does by default (Keras' LossScaleOptimizer and PyTorch's
# GradScaler use the same two numbers, 2^15 and 2000 good steps per doubling).
INITIAL_LOSS_SCALE = 2.0 ** 15
LOSS_SCALE_GROWTH_STEPS = 2000
_MAX_LOSS_SCALE = 2.0 ** 127  # the largest power of two below float32's max

_KW = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_WRITE,
           aggregation=tf.VariableAggregation.NONE)


class LegacyCheckpointError(ValueError):
  """A checkpoint holds the state of an optimizer this version of tfmochi cannot continue."""


class SGD(tf.Module):
  """torch.optim.SGD(momentum, dampening=0, weight_decay, nesterov). Build it in the strategy scope.

  Args:
    variables: the variables it will update (one momentum buffer each, same shape, float32).
    learning_rate: a float, or a callable step -> lr (e.g. `schedules.WarmupCosine`).
    momentum: m in [0, 1).
    weight_decay: coupled L2 coefficient wd >= 0 (added to the gradient before the momentum).
    nesterov: Nesterov momentum (PyTorch's form).
  """

  def __init__(self, variables: Sequence[tf.Variable],
               learning_rate: float | Callable[[tf.Tensor], tf.Tensor] = 0.1,
               momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False,
               name: str = "sgd"):
    super().__init__(name=name)
    if not 0.0 <= momentum < 1.0:
      raise ValueError(f"SGD momentum must be in [0, 1), got {momentum!r}.")
    if weight_decay < 0.0:
      raise ValueError(f"SGD weight_decay must be >= 0, got {weight_decay!r}.")
    if nesterov and momentum == 0.0:
      raise ValueError("Nesterov momentum needs momentum > 0.")
    self.momentum = float(momentum)
    self.weight_decay = float(weight_decay)
    self.nesterov = bool(nesterov)
    self._learning_rate = learning_rate
    with self.name_scope:
      self.momentum_buffers = [
          tf.Variable(tf.zeros(tuple(v.shape), tf.float32), name=f"momentum_buffer_{i}", **_KW)
          for i, v in enumerate(variables)]

  def learning_rate_at(self, step: tf.Tensor | int) -> tf.Tensor:
    """lr for `step` (the schedule's value, or the constant): scalar float32."""
    lr = self._learning_rate(step) if callable(self._learning_rate) else self._learning_rate
    return tf.cast(lr, tf.float32)

  def apply(self, grads: Sequence[tf.Tensor], variables: Sequence[tf.Variable],
            learning_rate: float | tf.Tensor, enabled: bool | tf.Tensor = True) -> tf.Tensor:
    """One update of `variables` (the ones given at construction, in the same order).

    Under tf.distribute call it in replica context with gradients that are already all-reduced
    (identical on every replica): each replica assigns its own copy.

    Args:
      grads: one gradient per variable (None = zero).
      variables: the variables.
      learning_rate: lr for this step (scalar).
      enabled: scalar bool; False leaves variables and buffers exactly as they are (a skipped
        step; its gradients, possibly non-finite, are not read).

    Returns:
      Whether the update ran (scalar bool tensor).
    """
    if len(grads) != len(self.momentum_buffers) or len(variables) != len(grads):
      raise ValueError(f"SGD was built for {len(self.momentum_buffers)} variables; got "
                       f"{len(grads)} gradients for {len(variables)} variables.")
    lr = tf.cast(learning_rate, tf.float32)

    def update():
      for g, var, buf in zip(grads, variables, self.momentum_buffers):
        p = tf.convert_to_tensor(var)
        g = tf.zeros_like(p) if g is None else tf.cast(tf.convert_to_tensor(g), p.dtype)
        if self.weight_decay:
          g = g + self.weight_decay * p
        new_buf = self.momentum * tf.convert_to_tensor(buf) + g
        direction = g + self.momentum * new_buf if self.nesterov else new_buf
        buf.assign(new_buf)
        var.assign(p - tf.cast(lr, p.dtype) * direction)
      return tf.constant(True)

    if enabled is True:
      return update()
    # A conditional, not tf.where on every tensor: no extra parameter-sized temporaries, and the
    # (possibly NaN) gradients of a skipped step are never read. XLA compiles it.
    return tf.cond(tf.convert_to_tensor(enabled, tf.bool), update, lambda: tf.constant(False))


class DynamicLossScale(tf.Module):
  """float16 loss scaling with one decision for all replicas (Keras' and PyTorch's dynamic rule).

  The loss is multiplied by `scale` before the backward pass; the caller all-reduces and unscales
  the gradients and calls `update` with whether they are finite: finite -> one more good step,
  and after `growth_steps` good steps in a row the scale doubles; not finite (an overflow) -> the
  step is skipped and the scale halves. The scale never goes below 1: at scale 1 non-finite
  gradients are not an artefact of scaling (`can_overflow` is False), and the caller treats them
  as a non-finite step.

  Args:
    initial_scale: the first scale (>= 1).
    growth_steps: good steps between doublings.
  """

  def __init__(self, initial_scale: float = INITIAL_LOSS_SCALE,
               growth_steps: int = LOSS_SCALE_GROWTH_STEPS, name: str = "loss_scale"):
    super().__init__(name=name)
    if not 1.0 <= initial_scale <= _MAX_LOSS_SCALE:
      raise ValueError(f"the initial loss scale must be in [1, 2^127], got {initial_scale!r}.")
    if growth_steps < 1:
      raise ValueError(f"loss scale growth_steps must be >= 1, got {growth_steps!r}.")
    self.growth_steps = int(growth_steps)
    with self.name_scope:
      self.scale = tf.Variable(float(initial_scale), dtype=tf.float32, name="scale", **_KW)
      self.good_steps = tf.Variable(0, dtype=tf.int64, name="good_steps", **_KW)

  def can_overflow(self) -> tf.Tensor:
    """True while a non-finite gradient can be blamed on the scale (scale > 1)."""
    return self.scale > 1.0

  def update(self, grads_finite: tf.Tensor, enabled: bool | tf.Tensor = True) -> tf.Operation:
    """Grows or halves the scale after a step; `enabled`=False leaves it (e.g. a NaN loss)."""
    good = tf.where(grads_finite, self.good_steps + 1, tf.zeros_like(self.good_steps))
    grow = good >= self.growth_steps
    scale = tf.convert_to_tensor(self.scale)
    new_scale = tf.where(grads_finite,
                         tf.where(grow, tf.minimum(2.0 * scale, _MAX_LOSS_SCALE), scale),
                         tf.maximum(0.5 * scale, 1.0))
    good = tf.where(grow, tf.zeros_like(good), good)
    if enabled is not True:
      keep = tf.convert_to_tensor(enabled, tf.bool)
      new_scale = tf.where(keep, new_scale, scale)
      good = tf.where(keep, good, tf.convert_to_tensor(self.good_steps))
    return tf.group(self.scale.assign(new_scale), self.good_steps.assign(good))


def check_checkpoint(path: str, key: str = "optimizer") -> None:
  """Raises LegacyCheckpointError if checkpoint `path` holds a Keras optimizer under `key`.

  Keras' SGD velocity v (v ← m·v − lr·g) equals −lr·buf only while lr is constant, so the state of
  a run trained with a schedule cannot be turned into PyTorch's buffer exactly.
  """
  names = [name for name, _ in tf.train.list_variables(path)]
  if any(name.startswith(f"{key}/_iterations/") or name.startswith(f"{key}/inner_optimizer/")
         for name in names):
    raise LegacyCheckpointError(
        f"The checkpoint {path} holds Keras' SGD state (velocity v = m*v - lr*g), not the "
        "PyTorch SGD momentum tfmochi's pretraining optimizer keeps (buf = m*buf + g; "
        "w -= lr*buf), as MoCo does; the two states differ once the learning rate has changed, "
        "so this run cannot be resumed exactly. Finish it with the tfmochi "
        "version that started it, or start a new run in a new --model_dir. Its checkpoints "
        "still work with tfmochi.evaluate, tfmochi.export and tfmochi.analyze.")
