"""MoCo's queue of negatives: a [K, D] ring buffer of L2-normalised keys as tf.Variables.

Semantics (MoCo, Algorithm 1): at every step the logits are computed against the queue *as it was
before the step* (`snapshot()`), then the keys of the whole global batch (all-gathered from every
replica) are written over the oldest entries, at the pointer, and the pointer advances by the
global batch size modulo K. K must be a multiple of the global batch so a write never wraps.

Distribution. The variables are created in the strategy's scope (MirroredVariables, or TPU
variables) with `aggregation=NONE`. Every replica all-gathers the same global batch of keys and
assigns the *full* new buffer (`dynamic_update_slice`), so every copy receives identical values with
no cross-replica merge — the pattern that works on MirroredStrategy, MultiWorkerMirroredStrategy
and TPUStrategy alike (scatter ops on distributed variables raise on TPU unless aggregation is
NONE; an ONLY_FIRST_REPLICA pointer would add a merge call per step for nothing).

Optional per-entry sample ids and labels (-1 = unknown) travel with the keys: ids let the head
mask a query's own image if it still sits in the queue (K close to the data set size), labels
feed the class-oracle and SupCon modes and the false-negative analysis.

32-bit integers on the device. Ids, labels and the pointer are int32 variables, gathered and
written as int32: a TPU emulates 64-bit integers, and XLA's 64-bit rewriting fails on 64-bit
collectives, sorts and scatters. Sample ids wider than int32 are folded by `device_ids` (its
collision rule is there), which the trainer applies on the host. Checkpoints keep the int64
layout of earlier versions (`queue/ids`, `queue/labels`, `queue/ptr` as int64 tensors): they are
cast on save and restore, so old checkpoints restore into the int32 variables and new ones read
as before.
"""

from __future__ import annotations

import tensorflow as tf

from tfmochi import distribute

# `device_ids` keeps an id v >= 0 as v mod ID_MODULUS: unchanged below it, and always an int32.
ID_MODULUS = 2**31 - 1


def device_ids(values) -> tf.Tensor:
  """Sample ids or labels as the device holds them: [...] int -> [...] int32 (-1 = unknown).

  An id v >= 0 becomes v mod (2^31 − 1); any negative value becomes -1 (unknown: it never
  matches). Ids below 2^31 − 1 are unchanged, which covers every data source of tfmochi (ids
  are indices 0..N−1 of the split, N far below 2^31): there no two samples share a device id.
  int32 input is returned as it is.

  Collision rule. Two different ids a ≠ b >= 0 map to the same device id exactly when
  a ≡ b (mod 2^31 − 1), which needs one of them >= 2^31 − 1. Duplicate masking then removes b's
  queue entry from a's row although it is another image (a negative lost, never a positive
  gained), and the class modes use labels, whose values are far below the modulus. For ids
  spread over 64 bits (e.g. hashes), a (query, entry) pair of different samples collides with
  probability 1/(2^31 − 1) = 4.7e-10: at B = 512 queries and K = 65,536 entries a step has
  B·K/(2^31 − 1) = 0.016 wrongly masked pairs on average (one every 64 steps, one of 33.6 M
  negatives). Contiguous ids collide only at distance 2^31 − 1 exactly.

  Apply it on the host (the trainer maps its input pipeline): an int64 input converted here on a
  TPU costs 64-bit elementwise ops (no sort, scatter or collective).

  Args:
    values: [...] integer ids or labels (int64, int32, ...; a list or array).

  Returns:
    [...] int32.
  """
  values = tf.convert_to_tensor(values)
  if values.dtype == tf.int32:
    return values
  if not values.dtype.is_integer:
    raise TypeError(f"sample ids and labels must be integers, got {values.dtype.name}.")
  wide = tf.cast(values, tf.int64)
  folded = tf.where(wide < 0, tf.constant(-1, tf.int64), tf.math.floormod(wide, ID_MODULUS))
  return tf.cast(folded, tf.int32)


def check_queue_size(queue_size: int, global_batch_size: int,
                     name: str = "queue_size") -> None:
  """Raises ValueError unless K is a positive multiple of the global batch size.

  `name` is how the message calls K (e.g. its flag).
  """
  if not isinstance(queue_size, int) or queue_size <= 0:
    raise ValueError(f"{name} (K) must be a positive integer, got {queue_size!r}.")
  if not isinstance(global_batch_size, int) or global_batch_size <= 0:
    raise ValueError(f"batch_size must be a positive integer, got {global_batch_size!r}.")
  if queue_size % global_batch_size:
    lower = (queue_size // global_batch_size) * global_batch_size
    upper = lower + global_batch_size
    hint = f"{lower} or {upper}" if lower else f"{upper}"
    raise ValueError(f"{name} (K) must be a multiple of the global batch size "
                     f"{global_batch_size}, got {queue_size}; use e.g. {hint}.")


class NegativeQueue(tf.Module):
  """A ring buffer of K keys [K, D] with a pointer, sample ids and labels.

  Create it inside `strategy.scope()` when training under a tf.distribute strategy.

  Attributes:
    keys: [K, D] float32 variable, rows L2-normalised (random unit vectors at start).
    ptr: int32 scalar variable, the next row to write (a multiple of the global batch).
    ids: [K] int32 variable, the sample id of each entry (`device_ids`; -1 = empty / unknown).
    labels: [K] int32 variable, the class label of each entry (-1 = unknown).

  A checkpoint holds ptr, ids and labels as int64 (the layout of earlier tfmochi versions; see
  `_SavedAsInt64`).
  """

  def __init__(self, size: int, dim: int, *, seed: int = 0, name: str = "queue"):
    super().__init__(name=name)
    if not isinstance(size, int) or size <= 0:
      raise ValueError(f"queue_size (K) must be a positive integer, got {size!r}.")
    if not isinstance(dim, int) or dim <= 0:
      raise ValueError(f"embedding_dim (D) must be a positive integer, got {dim!r}.")
    self.size, self.dim = size, dim
    init = tf.math.l2_normalize(
        tf.random.stateless_normal([size, dim], seed=[seed, 0x51EE]), axis=1)
    kw = dict(trainable=False, synchronization=tf.VariableSynchronization.ON_WRITE,
              aggregation=tf.VariableAggregation.NONE)
    with self.name_scope:
      self.keys = tf.Variable(init, name="keys", **kw)
      self.ptr = tf.Variable(tf.constant(0, tf.int32), name="ptr", **kw)
      self.ids = tf.Variable(tf.fill([size], tf.constant(-1, tf.int32)), name="ids", **kw)
      self.labels = tf.Variable(tf.fill([size], tf.constant(-1, tf.int32)), name="labels", **kw)
    self._make_int64_views()

  @tf.__internal__.tracking.no_automatic_dependency_tracking
  def _make_int64_views(self) -> None:
    # Not a tracked attribute: the views replace the variables as checkpoint children, they are
    # not children of their own.
    self._int64_views = {name: _SavedAsInt64(getattr(self, name))
                         for name in ("ptr", "ids", "labels")}

  def _trackable_children(self, save_type="checkpoint", **kwargs):
    """The checkpoint's children: keys as they are, ptr/ids/labels through `_SavedAsInt64`."""
    children = super()._trackable_children(save_type, **kwargs)
    if save_type == "checkpoint":
      children.update(self._int64_views)
    return children

  def _lookup_dependency(self, name, cached_dependencies=None):
    views = getattr(self, "_int64_views", {})  # (also called while __init__ sets attributes)
    if cached_dependencies is None and name in views:
      return views[name]
    return super()._lookup_dependency(name, cached_dependencies)

  def snapshot(self) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The queue as it is now, as tensors: (keys [K, D], ids [K], labels [K]).

    Take the snapshot before `enqueue` in the same step: inside a tf.function the automatic
    control dependencies keep this read ordered before the later write.
    """
    return tf.identity(self.keys), tf.identity(self.ids), tf.identity(self.labels)

  def enqueue(self, keys: tf.Tensor, ids: tf.Tensor | None = None,
              labels: tf.Tensor | None = None,
              enabled: bool | tf.Tensor = True) -> tf.Operation:
    """Writes this step's keys of *every* replica at the pointer and advances it.

    Call in replica context (inside `strategy.run`) with this replica's keys, or outside any
    strategy with the whole batch. The keys are all-gathered, so every replica writes the same
    global batch [R·b, D] and the copies stay identical.

    Args:
      keys: [b, D] this replica's L2-normalised keys (detached).
      ids: [b] int sample ids, or None (-1); int32 as the trainer feeds them, wider ids are
        folded by `device_ids`.
      labels: [b] int labels, or None (-1).
      enabled: scalar bool; False writes nothing (a skipped step), with the same ops and shapes.

    Returns:
      The grouped assign op.
    """
    keys = tf.stop_gradient(tf.cast(keys, tf.float32))
    b = tf.shape(keys)[0]
    if ids is None:
      ids = tf.fill([b], tf.constant(-1, tf.int32))
    if labels is None:
      labels = tf.fill([b], tf.constant(-1, tf.int32))
    all_keys = distribute.all_gather(keys)  # [R·b, D], identical on all replicas
    all_ids = distribute.all_gather(device_ids(ids))  # int32: no 64-bit collective on a TPU
    all_labels = distribute.all_gather(device_ids(labels))
    n = tf.shape(all_keys)[0]
    static_n = all_keys.shape[0]
    if static_n is not None and self.size % static_n:
      # (A runtime assert here would keep grappler from optimising the training while-loop.)
      raise ValueError(f"queue_size (K) = {self.size} must be a multiple of the global batch "
                       f"size {static_n}.")
    ptr = tf.identity(self.ptr)
    rows = (ptr + tf.range(n))[:, None]  # [R·b, 1] int32, never wraps (K % R·b == 0)
    if not isinstance(self.keys, tf.distribute.DistributedValues):
      return self._write_in_place(rows, n, ptr, all_keys, all_ids, all_labels, enabled)
    # Distributed variables: full-tensor assigns (not scatter ops on the variable), valid for
    # NONE-aggregated variables on every strategy, TPU included.
    new_keys = tf.tensor_scatter_nd_update(tf.identity(self.keys), rows, all_keys)
    new_ids = tf.tensor_scatter_nd_update(tf.identity(self.ids), rows, all_ids)
    new_labels = tf.tensor_scatter_nd_update(tf.identity(self.labels), rows, all_labels)
    if enabled is not True:
      enabled = tf.convert_to_tensor(enabled, tf.bool)
      new_keys = tf.where(enabled, new_keys, tf.identity(self.keys))
      new_ids = tf.where(enabled, new_ids, tf.identity(self.ids))
      new_labels = tf.where(enabled, new_labels, tf.identity(self.labels))
      n = tf.where(enabled, n, tf.zeros_like(n))
    return tf.group(
        self.keys.assign(new_keys), self.ids.assign(new_ids), self.labels.assign(new_labels),
        self.ptr.assign(tf.math.floormod(ptr + n, self.size)))

  def _write_in_place(self, rows: tf.Tensor, n: tf.Tensor, ptr: tf.Tensor, keys: tf.Tensor,
                      ids: tf.Tensor, labels: tf.Tensor, enabled: bool | tf.Tensor) -> tf.Operation:
    """`enqueue` for plain (single-device) variables: scatters the R·b new rows in place.

    The full-buffer assign of the distributed path copies the whole [K, D] buffer one to two times
    per step (32 MB for K = 65536, D = 128: 2-3% of a ResNet-50 step on a CPU); this writes R·b rows.
    A `snapshot()` taken earlier keeps its values: TensorFlow copies a variable's buffer before an
    in-place update while a tensor read from it is still alive.
    """
    if enabled is not True:  # a skipped step writes the rows' current values back
      keep = tf.convert_to_tensor(enabled, tf.bool)
      # gather (ResourceGather), not gather_nd: XLA has no kernel for ResourceGatherNd.
      keys = tf.where(keep, keys, tf.gather(self.keys, rows[:, 0]))
      ids = tf.where(keep, ids, tf.gather(self.ids, rows[:, 0]))
      labels = tf.where(keep, labels, tf.gather(self.labels, rows[:, 0]))
      n = tf.where(keep, n, tf.zeros_like(n))
    return tf.group(
        self.keys.scatter_nd_update(rows, keys), self.ids.scatter_nd_update(rows, ids),
        self.labels.scatter_nd_update(rows, labels),
        self.ptr.assign(tf.math.floormod(ptr + n, self.size)))


class _SavedAsInt64(tf.__internal__.tracking.Trackable):
  """Checkpoints an int32 queue variable as the int64 tensor earlier tfmochi versions wrote.

  The checkpoint key is a variable's (`queue/ids/.ATTRIBUTES/VARIABLE_VALUE`), so checkpoints of
  earlier runs restore into the int32 variables (through `device_ids`, which leaves their ids
  unchanged below 2^31 − 1) and new checkpoints read as before, by earlier versions too.
  """

  def __init__(self, variable: tf.Variable):
    self._variable = variable

  def _serialize_to_tensors(self) -> dict:
    return {"VARIABLE_VALUE": tf.cast(self._variable, tf.int64)}

  def _restore_from_tensors(self, restored_tensors: dict) -> tf.Operation:
    return self._variable.assign(device_ids(restored_tensors["VARIABLE_VALUE"]))
