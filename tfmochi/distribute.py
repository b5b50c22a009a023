"""tf.distribute helpers: strategy construction, logical CPU replicas, cross-replica gathers."""

from __future__ import annotations

import tensorflow as tf


def configure_cpu_replicas(n: int) -> list[str]:
  """Splits the (first) physical CPU into `n` logical devices and returns their names.

  Must run before TensorFlow initialises its runtime (before the first op). Calling it again
  with the same `n` once the runtime is up is a no-op; with a different `n` it raises.

  Args:
    n: number of logical CPU devices, >= 1.

  Returns:
    The device names, e.g. ["/cpu:0", "/cpu:1"].
  """
  if n < 1:
    raise ValueError(f"cpu_replicas must be >= 1, got {n}.")
  cpus = tf.config.list_physical_devices("CPU")
  try:
    if n > 1:
      tf.config.set_logical_device_configuration(
          cpus[0], [tf.config.LogicalDeviceConfiguration()] * n)
  except RuntimeError:
    # The runtime is already initialised: accept it if it already has enough devices.
    have = len(tf.config.list_logical_devices("CPU"))
    if have < n:
      raise RuntimeError(
          f"Cannot split the CPU into {n} logical devices: TensorFlow is already initialised "
          f"with {have}. Call configure_cpu_replicas() before any TensorFlow op runs.") from None
  return [f"/cpu:{i}" for i in range(n)]


def replica_context_info() -> tuple[int, tf.Tensor | int]:
  """(number of replicas in sync, this replica's id) in the current context.

  Outside any replica context (cross-replica context) this is (1, 0).
  """
  ctx = tf.distribute.get_replica_context()
  if ctx is None:
    return 1, 0
  return ctx.num_replicas_in_sync, ctx.replica_id_in_sync_group


def all_gather(x: tf.Tensor, axis: int = 0) -> tf.Tensor:
  """Concatenates `x` from every replica along `axis`, in replica order.

  Identical on every replica. With one replica (or outside a replica context) it returns `x`
  unchanged, so library code can call it unconditionally. On TPU every replica must pass the same
  shape (true for our fixed per-replica batches).

  uint8 tensors (images) cross the replicas as uint8 bytes, four to an int32 word
  (`_all_gather_bytes`). 64-bit integers are refused across replicas: a TPU emulates them, and
  XLA cannot rewrite a 64-bit collective into 32-bit ones; gather ids as int32
  (`queue.device_ids`).

  Args:
    x: [b, ...] this replica's tensor.
    axis: the axis to concatenate along.

  Returns:
    [R·b, ...] the global tensor.
  """
  ctx = tf.distribute.get_replica_context()
  if ctx is None or ctx.num_replicas_in_sync == 1:
    return x
  x = tf.convert_to_tensor(x)
  if x.dtype in (tf.int64, tf.uint64):
    raise TypeError(f"all_gather of {x.dtype.name} would be a 64-bit collective, which a TPU "
                    "cannot compile; gather it as int32.")
  if x.dtype == tf.uint8:
    return _all_gather_bytes(ctx, x, axis)
  return ctx.all_gather(_placed(x), axis=axis)


def _all_gather_bytes(ctx: tf.distribute.ReplicaContext, x: tf.Tensor, axis: int) -> tf.Tensor:
  """`all_gather` of uint8 [b, ...] as int32 words: every 4 bytes of a row travel as one int32.

  The collectives have no uint8 kind: MirroredStrategy's gather takes floats and 32/64-bit
  integers only, and TPUStrategy gathers the dtypes its cross-replica sum lacks (uint8 among them)
  with all-to-alls reordered by a 64-bit argmax. An int32 gather is TPUStrategy's one-hot
  cross-replica sum, exact for integers (one non-zero term per element), of the uint8 bytes: a
  quarter of the bytes of the same images as float32. A row whose size is not a multiple of 4 is
  padded with zeros for the trip.
  """
  if axis != 0 or not x.shape[1:].is_fully_defined():
    return tf.cast(ctx.all_gather(_placed(tf.cast(x, tf.int32)), axis=axis), tf.uint8)
  inner = x.shape[1:].as_list()
  row = x.shape[1:].num_elements()  # bytes per row (1 for a [b] tensor)
  pad = -row % 4
  flat = tf.reshape(x, [-1, row])
  if pad:
    flat = tf.pad(flat, [[0, 0], [0, pad]])
  words = tf.bitcast(tf.reshape(flat, [-1, (row + pad) // 4, 4]), tf.int32)  # [b, ⌈row/4⌉]
  gathered = ctx.all_gather(_placed(words), axis=0)  # [R·b, ⌈row/4⌉]
  flat = tf.reshape(tf.bitcast(gathered, tf.uint8), [-1, row + pad])[:, :row]
  return tf.reshape(flat, [-1] + inner)


def _placed(x: tf.Tensor) -> tf.Tensor:
  """`x` with an explicit device when this worker has a single one.

  MultiWorkerMirroredStrategy's gather validates that the tensor names a device ("destinations
  can not be empty"), and ops built in a tf.function on a one-device worker carry none.
  """
  if getattr(x, "device", "x"):
    return x
  devices = tf.distribute.get_strategy().extended.worker_devices
  if len(devices) != 1:
    return x
  with tf.device(devices[0]):
    return tf.identity(x)


# Every MirroredStrategy numbers its collective ops from the same key (group 1, instance 100), so
# a second strategy in one process reuses the keys of the first one's all-gathers and all-reduces,
# and the runtime aborts with "Collective instance 100 expected type 2 and data_type 3 but got type
# 0 ..." (a notebook that trains then evaluates, or a test suite). TensorFlow's own test
# combinations move each new strategy to a fresh key range; so does `mirrored_strategy`.
_COLLECTIVE_KEY_STRIDE = 100_000


def mirrored_strategy(devices: list[str] | None = None) -> tf.distribute.MirroredStrategy:
  """A `tf.distribute.MirroredStrategy` over `devices` (None: every local GPU, else the CPU)
  whose collective keys do not collide with those of strategies built earlier in the process.

  Args:
    devices: device names such as ["/cpu:0", "/cpu:1"] (see `configure_cpu_replicas`).

  Returns:
    The strategy.
  """
  cls = tf.distribute.MirroredStrategy
  cls._collective_key_base += _COLLECTIVE_KEY_STRIDE  # pylint: disable=protected-access
  return cls(devices)


def make_strategy(name: str = "default", *, tpu: str | None = None,
                  cpu_replicas: int = 1) -> tf.distribute.Strategy:
  """Builds the tf.distribute strategy a run asks for.

  Args:
    name: "default" (one device), "mirrored" (all local GPUs, or `cpu_replicas` logical CPUs
      when there is no GPU), "multi_worker" (MultiWorkerMirroredStrategy; the cluster comes from
      the TF_CONFIG environment variable) or "tpu".
    tpu: for "tpu": the TPU name, "local" on a TPU VM, or a grpc:// address.
    cpu_replicas: for "mirrored" without GPUs: split the CPU into this many logical devices.

  Returns:
    The strategy.

  Raises:
    ValueError: an unknown name, or a multi-worker run without TF_CONFIG.
  """
  import json
  import os

  if name == "default":
    return tf.distribute.get_strategy()
  if name == "mirrored":
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
      return mirrored_strategy()
    return mirrored_strategy(configure_cpu_replicas(cpu_replicas))
  if name == "multi_worker":
    tf_config = os.environ.get("TF_CONFIG")
    if not tf_config:
      raise ValueError("--strategy=multi_worker needs the TF_CONFIG environment variable "
                       '(e.g. {"cluster": {"worker": ["host0:port", "host1:port"]}, '
                       '"task": {"type": "worker", "index": 0}}) on every worker.')
    try:
      json.loads(tf_config)
    except json.JSONDecodeError as e:
      raise ValueError(f"TF_CONFIG is not valid JSON: {e}") from None
    return tf.distribute.MultiWorkerMirroredStrategy()
  if name == "tpu":
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)
  raise ValueError(f"strategy must be one of default, mirrored, multi_worker, tpu; got {name!r}.")


def accelerator_visible() -> bool:
  """True when TensorFlow sees a GPU or a TPU (a TPU VM's TPUs once the TPU system is initialised,
  i.e. after `make_strategy("tpu")`)."""
  return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


def resolve_jit_compile(setting: str | bool, strategy: tf.distribute.Strategy) -> bool:
  """--jit_compile=auto|true|false as a bool: auto is on under TPUStrategy only.

  Under TPUStrategy the step is compiled by XLA whatever the setting (the whole replicated loop is
  one XLA program); on CPUs and GPUs "auto" leaves it to TensorFlow's kernels.

  Raises:
    ValueError: true with several replicas on CPU devices. XLA compiles a function for one device
      and cannot read the mirrored variables of the other logical CPUs ("Trying to access resource
      ... located in device CPU:1 from device CPU:0").
  """
  tpu = isinstance(strategy, tf.distribute.TPUStrategy)
  if isinstance(setting, bool):
    on = setting
  elif setting in ("auto", "true", "false"):
    on = tpu if setting == "auto" else setting == "true"
  else:
    raise ValueError(f"jit_compile must be auto, true or false; got {setting!r}.")
  if on and not tpu and strategy.num_replicas_in_sync > 1:
    devices = strategy.extended.worker_devices
    if all(tf.DeviceSpec.from_string(d).device_type == "CPU" for d in devices):
      raise ValueError(
          f"--jit_compile=true cannot compile a step over {strategy.num_replicas_in_sync} CPU "
          "replicas: XLA compiles for one device and cannot reach the variables of the other "
          "CPU replicas. Use one device (--strategy=default) with --jit_compile=true, or "
          "--jit_compile=false (or auto) with several replicas.")
  return on


def replica_step_function(fn, jit_compile: bool, strategy: tf.distribute.Strategy):
  """The per-replica step `strategy.run` should call: `fn` itself, or `fn` compiled by XLA.

  With `jit_compile`, `fn` (forward, backward, optimizer update and queue write: whatever the
  replica step does) becomes a `tf.function(jit_compile=True)`, which raises when an op cannot be
  compiled instead of running it outside XLA. Under TPUStrategy `fn` is returned unchanged: the
  TPU compiles the whole loop, this step included.

  AutoGraph does not rewrite the step: it is written with explicit `tf.cond`/`tf.where` (a
  Python `if` on a tensor fails at trace time instead of being converted), and converting the
  functions it calls would lengthen every run's start-up (docs/BENCHMARKS.md).
  """
  if jit_compile and not isinstance(strategy, tf.distribute.TPUStrategy):
    return tf.function(fn, jit_compile=True, autograph=False)
  return tf.autograph.experimental.do_not_convert(fn)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
  """True on the worker that writes summaries, exports and summary.json (worker 0)."""
  resolver = getattr(strategy, "cluster_resolver", None)
  if resolver is None or not getattr(resolver, "task_type", None):
    return True
  return resolver.task_type in ("chief", None) or (
      resolver.task_type == "worker" and resolver.task_id == 0)
