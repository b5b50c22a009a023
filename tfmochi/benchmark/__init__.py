"""`python -m tfmochi.benchmark --what=step|head|encoder|input|peer|versus`: speed and memory of tfmochi.

Each run prints ONE JSON line on stdout (and appends it to `--output` if given):

  --what=head   the contrastive head alone: queue logits, top-N, synthesis, loss and the gradient
                w.r.t. q (a `tf.function` with a GradientTape over q; the queue is a tensor), for
                MoCo (no MoCHi) and MoCHi(N, s, s') in the same process, interleaved. With
                `--compare_topn`, also the MoCHi head compiled whole by XLA with the exact and
                the approximate top-N (`--mochi_topn`).
  --what=step   a full MoCo v2 training step (synthetic random images, no input pipeline): the
                `MoCo` object, an SGD optimizer built before tracing and a `tf.function` running
                `moco.train_step` through `strategy.run` for `--steps_per_call` steps, as the
                trainer does. With MoCHi on and `--compare_moco`, the same step without MoCHi is
                timed in the same process, interleaved; `--compare_jit` adds the step compiled
                by XLA (`--jit_compile=true`).
  --what=encoder  one encoder of the flags' architecture on random images, training-mode BN: its
                forward and its forward + backward, interleaved (where a step's time goes);
                `--compare_keras_conv` adds both with plain Keras layers.
  --what=input  the MoCo v2 augmentation pipeline (`data.pretrain_dataset`) on an in-memory source
                of random `--source_size`² uint8 images, on `--source_images` real 500x375 JPEG
                photos in TFRecords (`--input_source=jpeg`: decoding included, fused with the
                crops), or on the `--dataset` itself (`--input_source=dataset`), in images/s at
                `--image_size` (two views per image), and per thread with `--input_threads`.
  --what=peer   MoCo v2's training step transcribed in PyTorch (the `bench` extra: a CPU build of
                torch), timed like --what=step with PyTorch's threads set to TensorFlow's.
  --what=versus tfmochi's MoCo v2 step (float32 and `--mixed_precision=bfloat16`) and the peer,
                each in its own child process with the same flags, alternating for `--rounds`.

The model, data and objective come from the training flags (`tfmochi.config.define_flags`:
`--arch --image_size --batch_size --queue_size --embedding_dim --mochi_num_hard --mochi_num_mix
--mochi_num_query_mix --temperature --loss --bn_mode --mixed_precision ...`), so a benchmark and a
training run use the same settings. Timing: `--warmup_steps` untimed calls per variant (tracing, XLA
compilation, allocator warm-up), then `--timed_steps` (>= 5) timed calls per variant, variants
interleaved call by call so that a noisy machine slows all of them alike; the median is reported.
Memory: the peak resident set size of each timed call, from the kernel's high-water mark (reset
before each call through /proc/self/clear_refs) and from a background thread sampling
/proc/self/status, and its increase over the RSS at the start of that call (freed heap memory is
returned to the OS before each call so the start is a fair baseline); and, because TensorFlow's
CPU allocator pools memory (so a repeated computation barely moves the RSS), the peak of that
allocator during the call and its increase (`tf_peak_mb`, `tf_increase_mb`).

Every JSON line carries `machine`: the CPU, its ISA flags, the framework versions, the threads and
the float32 GEMM rate (2048², the framework's own matmul) measured before and after the timing.

Every function below takes explicit arguments; FLAGS are read only in `main`.

Modules, one job each:

  peak            `PeakMemory`: the peak RSS and TensorFlow allocator use of a block of code
  timing          `run_interleaved`: variants timed call by call, medians
  machine         `machine_info`: CPU model, ISA flags, versions, threads, the float32 GEMM peak
  head            `bench_head` (--what=head)
  step            `bench_step` (--what=step)
  input_pipeline  `bench_input` (--what=input) and its sources
  peer            `bench_peer` (--what=peer): MoCo v2 in plain torch.nn; imported only for it
  versus          `bench_versus` (--what=versus): one child process per variant, alternating
  cli             the flags, `run` (one benchmark, its JSON-able result) and `main`
"""

from tfmochi import cli as _cli

_cli.quiet_tensorflow_startup()  # before TensorFlow's first import: `python -m` loads this first
