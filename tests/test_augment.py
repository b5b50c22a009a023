"""Tests for tfmochi.augment: every op eagerly, in tf.function and in tf.data.map; semantics."""

from __future__ import annotations

import math

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from tfmochi import augment

SEED = (3, 7)


def _image(height=20, width=28, channels=3, seed=0) -> tf.Tensor:
  rng = np.random.default_rng(seed)
  return tf.constant(rng.integers(0, 256, (height, width, channels)), tf.uint8)


def _seeds(n: int, offset: int = 0) -> tf.Tensor:
  """[n, 2] int64 distinct seeds."""
  return tf.stack([tf.range(offset, offset + n, dtype=tf.int64),
                   tf.fill([n], tf.constant(11, tf.int64))], axis=1)


def _map_over_seeds(fn, image: tf.Tensor, n: int, offset: int = 0) -> np.ndarray:
  """Runs fn(image, seed) for n seeds inside tf.data.map (graph mode), stacks the results."""
  ds = tf.data.Dataset.from_tensor_slices(_seeds(n, offset)).map(lambda s: fn(image, s))
  return np.stack([x.numpy() for x in ds])


# name -> fn(image, seed); each must be deterministic given the seed.
OPS = {
    "random_resized_crop": lambda x, s: augment.random_resized_crop(x, 12, s),
    "color_jitter": lambda x, s: augment.color_jitter(x, 0.4, 0.4, 0.4, 0.1, s),
    "random_color_jitter": lambda x, s: augment.random_color_jitter(x, 0.8, 0.4, 0.4, 0.4, 0.1, s),
    "random_grayscale": lambda x, s: augment.random_grayscale(x, 0.5, s),
    "gaussian_blur": lambda x, s: augment.gaussian_blur(x, 1.3),
    "random_blur": lambda x, s: augment.random_blur(x, 0.5, s),
    "random_flip": lambda x, s: augment.random_flip(x, s),
    "random_affine": lambda x, s: augment.random_affine(x, s),
    "affine_view": lambda x, s: augment.affine_view(x, 12, s),
    "normalize": lambda x, s: augment.normalize(x),
    "moco_v2_view": lambda x, s: augment.moco_v2_view(x, 12, s),
    "moco_v1_view": lambda x, s: augment.moco_v1_view(x, 12, s),
    "linear_train_view": lambda x, s: augment.linear_train_view(x, 12, s),
    "center_view": lambda x, s: augment.center_view(x, 12),
    "two_views": lambda x, s: tf.stack(augment.two_views(x, 12, s)),
}


class AugmentTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(*[(name, name) for name in OPS])
  def test_eager_function_and_dataset_agree(self, name):
    fn = OPS[name]
    image = _image()
    seed = tf.constant(SEED, tf.int64)
    eager = fn(image, seed)
    graph = tf.function(fn)(image, seed)
    in_map = next(iter(tf.data.Dataset.from_tensors((image, seed)).map(fn)))
    self.assertEqual(eager.dtype, tf.float32)
    self.assertAllClose(eager, graph, atol=1e-5)
    self.assertAllClose(eager, in_map, atol=1e-5)
    # int32 seeds and Python tuples are accepted and mean the same key.
    self.assertAllClose(eager, fn(image, tf.constant(SEED, tf.int32)), atol=1e-5)

  @parameterized.parameters("mocov2", "mocov1", "affine")
  def test_views_shape_range_and_seeds(self, recipe):
    image = _image()
    view_fn = augment.AUGMENTATIONS[recipe]
    a = view_fn(image, 16, SEED)
    self.assertEqual(a.shape, (16, 16, 3))
    self.assertEqual(a.dtype, tf.float32)
    low = (0.0 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD)
    high = (1.0 - np.array(augment.IMAGENET_MEAN)) / np.array(augment.IMAGENET_STD)
    self.assertTrue(np.all(a.numpy() >= low - 1e-5) and np.all(a.numpy() <= high + 1e-5))
    self.assertAllEqual(a, view_fn(image, 16, SEED))  # same seed -> same view
    self.assertGreater(np.abs(a - view_fn(image, 16, (4, 7))).mean(), 1e-3)
    q, k = augment.two_views(image, 16, SEED, recipe=recipe)
    self.assertGreater(np.abs(q - k).mean(), 1e-3)  # the two views are independent draws
    self.assertAllEqual(q, augment.two_views(image, 16, SEED, recipe=recipe)[0])

  def test_unknown_recipe(self):
    with self.assertRaisesRegex(ValueError, "mocov2"):
      augment.two_views(_image(), 8, SEED, recipe="simclr")

  def test_float_and_grayscale_inputs(self):
    image = _image()
    as_float = tf.cast(image, tf.float32) / 255.0
    self.assertAllClose(augment.moco_v2_view(image, 8, SEED),
                        augment.moco_v2_view(as_float, 8, SEED), atol=1e-5)
    gray = _image(channels=1)
    view = augment.moco_v1_view(gray, 8, SEED)
    self.assertEqual(view.shape, (8, 8, 3))
    self.assertAllClose(augment.to_float(gray), tf.tile(tf.cast(gray, tf.float32) / 255.0,
                                                        [1, 1, 3]))
    # Channel count only known at run time (tf.io.decode_image without `channels`).
    fn = tf.function(lambda x: augment.normalize(x),
                     input_signature=[tf.TensorSpec([None, None, None], tf.uint8)])
    self.assertEqual(fn(gray).shape, (20, 28, 3))

  def test_flip_is_exact_and_half_the_time(self):
    image = _image()
    out = _map_over_seeds(augment.random_flip, image, 200)
    x = augment.to_float(image).numpy()
    flipped = np.array([np.array_equal(o, x[:, ::-1]) for o in out])
    kept = np.array([np.array_equal(o, x) for o in out])
    self.assertTrue(np.all(flipped ^ kept))
    self.assertBetween(flipped.mean(), 0.38, 0.62)

  @parameterized.parameters("mocov2", "mocov1", "small", "affine")
  def test_hflip_off_removes_exactly_the_flip(self, recipe):
    # Every other draw uses its own sub-seed, so with hflip=False each view is the hflip=True
    # view or its mirror image, and the mirror happens about half the time.
    image = _image()
    mirrored = []
    for i in range(24):
      seed = (i, 3)
      with_flip = augment.two_views(image, 12, seed, recipe=recipe)[0].numpy()
      without = augment.two_views(image, 12, seed, recipe=recipe, hflip=False)[0].numpy()
      same = np.allclose(with_flip, without, atol=1e-6)
      mirror = np.allclose(with_flip[:, ::-1], without, atol=1e-6)
      self.assertTrue(same or mirror, f"seed {seed}")
      mirrored.append(mirror and not same)
    self.assertBetween(np.mean(mirrored), 0.2, 0.8)

  def test_grayscale(self):
    image = _image()
    out = augment.grayscale(image).numpy()
    self.assertAllEqual(out[..., 0], out[..., 1])
    self.assertAllEqual(out[..., 0], out[..., 2])
    x = image.numpy() / 255.0
    self.assertAllClose(out[..., 0], x @ np.array([0.299, 0.587, 0.114]), atol=1e-5)

  def test_grayscale_probability(self):
    out = _map_over_seeds(lambda x, s: augment.random_grayscale(x, 0.2, s), _image(), 500)
    gray = np.all(out[..., 0:1] == out, axis=(1, 2, 3))
    self.assertBetween(gray.mean(), 0.2 - 0.065, 0.2 + 0.065)

  def test_color_jitter_probability(self):
    image = _image()
    out = _map_over_seeds(lambda x, s: augment.random_color_jitter(x, 0.8, 0.4, 0.4, 0.4, 0.1, s),
                          image, 300)
    changed = np.abs(out - augment.to_float(image).numpy()).max(axis=(1, 2, 3)) > 1e-4
    self.assertBetween(changed.mean(), 0.8 - 0.08, 0.8 + 0.08)

  def test_blur_probability(self):
    image = _image()
    # sigma >= 1 always changes a random image, so "changed" == "blur applied".
    out = _map_over_seeds(lambda x, s: augment.random_blur(x, 0.5, s, sigma_range=(1.0, 2.0)),
                          image, 300)
    changed = np.abs(out - augment.to_float(image).numpy()).max(axis=(1, 2, 3)) > 1e-3
    self.assertBetween(changed.mean(), 0.5 - 0.09, 0.5 + 0.09)

  def test_blur_semantics(self):
    image = _image()
    x = augment.to_float(image).numpy()
    self.assertAllClose(augment.gaussian_blur(image, 0.1), x, atol=1e-6)  # ~ delta kernel
    constant = tf.fill([9, 7, 3], 0.3)
    self.assertAllClose(augment.gaussian_blur(constant, 2.0), constant, atol=1e-6)
    # NumPy reference: separable Gaussian, edge-replicated borders, radius ceil(3 * 2).
    sigma, r = 1.3, 6
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma**2))
    k /= k.sum()
    padded = np.pad(x, ((r, r), (r, r), (0, 0)), mode="edge")
    rows = sum(k[i] * padded[i:i + x.shape[0]] for i in range(2 * r + 1))
    ref = sum(k[j] * rows[:, j:j + x.shape[1]] for j in range(2 * r + 1))
    blurred = augment.gaussian_blur(image, sigma)
    self.assertAllClose(blurred, ref, atol=1e-5)
    self.assertAllClose(np.mean(blurred), np.mean(x), atol=0.02)
    self.assertLess(np.std(blurred), np.std(x))

  def test_color_jitter_semantics(self):
    image = _image()
    x = augment.to_float(image).numpy()
    self.assertAllClose(augment.color_jitter(image, 0, 0, 0, 0, SEED), x)
    # Brightness alone: a single multiplicative factor in [0.5, 1.5], then clipping.
    out = augment.color_jitter(image, 0.5, 0, 0, 0, SEED).numpy()
    inside = (x > 0.05) & (out < 0.999)
    factor = np.median(out[inside] / x[inside])
    self.assertBetween(factor, 0.5, 1.5)
    self.assertAllClose(out, np.clip(x * factor, 0, 1), atol=1e-5)
    # Contrast alone keeps the mean luma (no clipping for a mid-range image).
    mid = tf.constant(np.random.default_rng(1).uniform(0.4, 0.6, (10, 12, 3)), tf.float32)
    out = augment.color_jitter(mid, 0, 0.4, 0, 0, SEED)
    luma = lambda t: np.mean(np.asarray(t) @ np.array([0.299, 0.587, 0.114]))  # noqa: E731
    self.assertAllClose(luma(out), luma(mid), atol=1e-5)
    # Saturation alone leaves a gray image unchanged; hue alone too (gray has no hue).
    gray = augment.grayscale(image)
    self.assertAllClose(augment.color_jitter(gray, 0, 0, 0.4, 0, SEED), gray, atol=1e-6)
    self.assertAllClose(augment.color_jitter(gray, 0, 0, 0, 0.5, SEED), gray, atol=1e-5)
    full = augment.color_jitter(image, 0.4, 0.4, 0.4, 0.1, SEED).numpy()
    self.assertTrue(np.all(full >= 0) and np.all(full <= 1))
    with self.assertRaises(ValueError):
      augment.color_jitter(image, 0, 0, 0, 0.6, SEED)

  def test_color_jitter_order_is_random(self):
    # Each op's factor comes from its own sub-seed, so brightness-only / contrast-only calls with
    # the same seed reproduce the factors: the full jitter must equal one of the two orders, and
    # both orders must occur over seeds.
    image = _image()
    jitter = lambda x, b, c, s: augment.color_jitter(x, b, c, 0, 0, s)  # noqa: E731
    orders = []
    for i in range(24):
      seed = (i, 5)
      full = jitter(image, 0.9, 0.9, seed).numpy()
      b_then_c = jitter(jitter(image, 0.9, 0, seed), 0, 0.9, seed).numpy()
      c_then_b = jitter(jitter(image, 0, 0.9, seed), 0.9, 0, seed).numpy()
      if np.abs(b_then_c - c_then_b).max() < 1e-4:
        continue  # no clipping: the orders agree
      is_bc = np.abs(full - b_then_c).max() < 1e-5
      is_cb = np.abs(full - c_then_b).max() < 1e-5
      self.assertTrue(is_bc or is_cb)
      orders.append(is_bc)
    self.assertIn(True, orders)
    self.assertIn(False, orders)

  def test_affine_identity_and_zoom(self):
    blob = np.zeros([16, 16, 3], np.float32)
    blob[6:10, 6:10] = 1.0  # 4x4 square centred on the image centre (7.5, 7.5)
    still = augment.random_affine(blob, SEED, degrees=0, translate=0, scale=(1, 1), shear=0)
    self.assertAllClose(still, blob)
    zoomed = augment.random_affine(blob, SEED, degrees=0, translate=0, scale=(2, 2), shear=0)
    self.assertAllClose(zoomed[..., 0].numpy().sum(), 4 * 16.0, atol=1.0)  # area x4
    self.assertAllClose(zoomed[4:12, 4:12], np.ones([8, 8, 3]), atol=0.5)  # about the centre

  def test_affine_shift_and_rotation_ranges(self):
    blob = np.zeros([16, 16, 3], np.float32)
    blob[6:10, 6:10] = 1.0
    ys, xs = np.mgrid[:16, :16]
    for i in range(20):
      seed = (i, 3)
      shifted = augment.random_affine(blob, seed, degrees=0, translate=0.25, scale=(1, 1),
                                      shear=0)[..., 0].numpy()
      self.assertAllClose(shifted.sum(), 16.0, atol=1e-3)  # stays inside: only moved
      dx = (shifted * xs).sum() / 16.0 - 7.5
      dy = (shifted * ys).sum() / 16.0 - 7.5
      self.assertLessEqual(max(abs(dx), abs(dy)), 0.25 * 16 + 1e-3)
      turned = augment.random_affine(blob, seed, degrees=90, translate=0, scale=(1, 1),
                                     shear=0)[..., 0].numpy()
      # A rotation about the centre keeps the blob's centroid where it was.
      self.assertAllClose([(turned * xs).sum() / turned.sum(), (turned * ys).sum() / turned.sum()],
                          [7.5, 7.5], atol=1e-3)
    # Shifted-in pixels are black, the background of digits.
    white = augment.random_affine(np.ones([16, 16, 3], np.float32), (1, 1), degrees=0,
                                  translate=0.25, scale=(1, 1), shear=0).numpy()
    self.assertLess(white.min(), 1e-6)

  def test_affine_recipe_has_no_colour(self):
    gray = tf.tile(_image(channels=1), [1, 1, 3])
    for i in range(8):
      view = augment.to_float(augment.two_views_uint8(gray, 12, (i, 5), "affine", (1.0, 1.0),
                                                      False)[0]).numpy()
      self.assertAllClose(view[..., 0], view[..., 1])  # gray stays gray
      self.assertAllClose(view[..., 0], view[..., 2])

  def test_normalize_matches_numpy(self):
    image = _image()
    expected = (image.numpy() / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array(
        [0.229, 0.224, 0.225])
    self.assertAllClose(augment.normalize(image), expected, atol=1e-5)

  def test_random_resized_crop_statistics(self):
    height, width = 60, 80
    windows = tf.data.Dataset.from_tensor_slices(_seeds(300)).map(
        lambda s: tf.stack(augment._rrc_window(height, width, s, (0.2, 1.0), (3 / 4, 4 / 3))))
    w = np.stack([x.numpy() for x in windows])  # [300, 4] top, left, h, w
    top, left, ch, cw = w.T
    self.assertTrue(np.all(top >= 0) and np.all(left >= 0))
    self.assertTrue(np.all(top + ch <= height) and np.all(left + cw <= width))
    area = ch * cw / (height * width)
    # Rounding of the side lengths moves the area a little past the nominal range.
    self.assertTrue(np.all(area >= 0.2 * 0.9) and np.all(area <= 1.0))
    aspect = cw / ch
    self.assertTrue(np.all(aspect >= 0.75 * 0.9) and np.all(aspect <= 4 / 3 * 1.1))
    self.assertBetween(area.mean(), 0.45, 0.7)
    self.assertGreater(area.std(), 0.15)  # spread over the range, not stuck at one value
    self.assertGreater(len(np.unique(top)), 5)

  def test_random_resized_crop_fallback_and_output(self):
    # A 200 x 10 strip cannot hold any crop of >= 90% area within the ratio range: torchvision
    # falls back to the centre crop clamped to ratio 3/4 (w = 10, h = round(10 / 0.75) = 13).
    window = augment._rrc_window(200, 10, tf.constant(SEED, tf.int64), (0.9, 1.0), (3 / 4, 4 / 3))
    self.assertEqual([int(v) for v in window], [93, 0, 13, 10])
    out = augment.random_resized_crop(_image(), 12, SEED)
    self.assertEqual(out.shape, (12, 12, 3))
    self.assertTrue(np.all(out.numpy() >= 0) and np.all(out.numpy() <= 1))
    # Scale (1, 1) and ratio of the image itself: the whole image, just resized.
    square = _image(16, 16)
    whole = augment.random_resized_crop(square, 16, SEED, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    self.assertAllClose(whole, augment.to_float(square), atol=1e-5)

  def test_center_view(self):
    image = _image(40, 30)
    out = augment.center_view(image, 16)
    self.assertEqual(out.shape, (16, 16, 3))
    # Shorter side 30 -> round(16 * 256 / 224) = 18, longer 40 -> int(18 * 40 / 30) = 24;
    # centre crop 16 from [24, 18]: top 4, left 1.
    resized = tf.image.resize(augment.to_float(image), [24, 18], antialias=True)
    expected = augment.normalize(tf.clip_by_value(resized, 0, 1)[4:20, 1:17])
    self.assertAllClose(out, expected, atol=1e-5)
    self.assertEqual(int(round(224 * 256 / 224)), 256)  # the ImageNet case is Resize(256)

  def test_linear_train_view_uses_wider_scale(self):
    windows = tf.data.Dataset.from_tensor_slices(_seeds(200)).map(
        lambda s: tf.stack(augment._rrc_window(64, 64, s, (0.08, 1.0), (3 / 4, 4 / 3))))
    area = np.array([int(x[2]) * int(x[3]) / 64**2 for x in windows])
    self.assertLess(area.min(), 0.2)
    self.assertGreaterEqual(area.min(), 0.08 * 0.8)
    view = augment.linear_train_view(_image(), 10, SEED)
    self.assertEqual(view.shape, (10, 10, 3))

  def test_linear_train_view_options(self):
    # hflip=False: each view is the flipping view or its mirror image (the crop draw is its own
    # sub-seed), mirrored about half the time.
    image = _image()
    mirrored = []
    for i in range(24):
      with_flip = augment.linear_train_view(image, 12, (i, 5)).numpy()
      without = augment.linear_train_view(image, 12, (i, 5), hflip=False).numpy()
      same = np.allclose(with_flip, without, atol=1e-6)
      self.assertTrue(same or np.allclose(with_flip[:, ::-1], without, atol=1e-6), i)
      mirrored.append(not same)
    self.assertBetween(np.mean(mirrored), 0.2, 0.8)
    # crop_min_scale bounds the crop area: the views differ from MoCo's 0.08 ones, and a
    # minimum of 1 (whole image, aspect 1 of a square image) is the plain resize.
    square = _image(24, 24)
    whole = augment.linear_train_view(square, 12, SEED, crop_min_scale=1.0, hflip=False)
    resized = augment.normalize(tf.clip_by_value(
        augment._resize(augment.to_float(square), 12, 12), 0.0, 1.0))
    self.assertAllClose(whole, resized, atol=1e-6)
    self.assertNotAllClose(augment.linear_train_view(square, 12, SEED, hflip=False), resized)

  def test_fused_jpeg_crop_matches_decode_then_crop(self):
    # Real photos (scikit-learn's samples, 427 x 640). The fused crop decodes the same window;
    # its pixels equal decode-then-crop except in the window's outer 2 pixels, where JPEG's
    # chroma upsampling sees different neighbours (measured: <= 11 grey levels, ~0.3% of pixels).
    from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
    for photo in load_sample_images().images:
      encoded = tf.io.encode_jpeg(photo, quality=90)
      decoded = tf.io.decode_jpeg(encoded, channels=3)
      for i in range(8):
        seed = tf.constant([i, 3], tf.int64)
        top, left, h, w = augment._rrc_window(427, 640, seed, (0.2, 1.0), (3 / 4, 4 / 3))
        fused = tf.image.decode_and_crop_jpeg(encoded, [top, left, h, w], channels=3).numpy()
        reference = decoded[top:top + h, left:left + w].numpy()
        self.assertEqual(fused.shape, reference.shape)
        diff = np.abs(fused.astype(int) - reference.astype(int))
        self.assertEqual(diff[2:-2, 2:-2].max(), 0)
        self.assertLessEqual(diff.max(), 16)
        self.assertLess((diff > 0).mean(), 0.01)
        view = augment.decode_random_resized_crop(encoded, 24, seed)
        self.assertAllClose(view, augment.random_resized_crop(decoded, 24, seed), atol=16 / 255)
    # Not a JPEG: decoded whole, then the same crop exactly.
    png = tf.io.encode_png(_image())
    self.assertAllEqual(augment.decode_random_resized_crop(png, 12, SEED),
                        augment.random_resized_crop(_image(), 12, SEED))

  @parameterized.parameters("mocov2", "mocov1", "small", "affine")
  def test_uint8_views_normalised_on_the_device(self, recipe):
    image = _image()
    views = augment.two_views(image, 12, SEED, recipe)
    small = augment.two_views_uint8(image, 12, SEED, recipe)
    from_png = augment.two_views_uint8(tf.io.encode_png(image), 12, SEED, recipe, encoded=True)
    for v, u, p in zip(views, small, from_png):
      self.assertEqual(u.dtype, tf.uint8)
      self.assertAllEqual(u, p)
      # Rounding to 1/255 is the only difference: half a level over the std.
      self.assertAllClose(augment.to_model_input(u), v, atol=0.5 / 255 / 0.224 + 1e-6)
    self.assertIs(augment.to_model_input(views[0]), views[0])  # floats are already normalised
    batch = augment.normalize_views({"view1": tf.stack(small), "view2": tf.stack(small), "id": 1})
    self.assertAllClose(batch["view1"][0], augment.to_model_input(small[0]))
    self.assertEqual(batch["id"], 1)

  def test_seed_validation(self):
    with self.assertRaises(TypeError):
      augment.random_flip(_image(), tf.constant([1.0, 2.0]))
    self.assertTrue(math.isfinite(float(tf.reduce_sum(augment.random_flip(_image(), [1, 2])))))



# ----------------------------------------------------------------------------------------------
# The photometric ops on the device (--device_augment).


def _host_params(seed, recipe: str = "mocov2") -> tuple[dict, dict]:
  """The host recipe's own draws for one view seed, as `apply_photometric` parameters [1, ...].

  Returns (params, the host recipe's sub-seeds by op name), following `augment._moco_v2` and
  `augment._moco_v1`'s seed splits.
  """
  if recipe == "mocov2":
    _, s_jitter, s_gray, s_blur, _ = augment._split(seed, 5)
    s_apply, s_inner = augment._split(s_jitter, 2)
    jitter_on = float(augment._uniform(s_apply) < 0.8)
    hue = 0.1
  else:  # mocov1: grayscale first, the jitter always
    _, s_gray, s_jitter, _ = augment._split(seed, 4)
    s_inner, s_blur, jitter_on, hue = s_jitter, None, 1.0, 0.4
  s_order, s_b, s_c, s_s, s_h = augment._split(s_inner, 5)
  params = {"jitter": [jitter_on],
            "factors": [[float(augment._uniform(s, 0.6, 1.4)) for s in (s_b, s_c, s_s)]
                        + [float(augment._uniform(s_h, -hue, hue))]],
            "order": [tf.argsort(tf.random.stateless_uniform([4], s_order)).numpy()],
            "gray": [float(augment._uniform(augment._as_seed(s_gray)) < 0.2)],
            "blur": [0.0], "sigma": [1.0]}
  if s_blur is not None:
    s_apply, s_sigma = augment._split(s_blur, 2)
    params["blur"] = [float(augment._uniform(s_apply) < 0.5)]
    params["sigma"] = [float(augment._uniform(s_sigma, 0.1, 2.0))]
  params = {k: tf.constant(v, tf.int32 if k == "order" else tf.float32) for k, v in params.items()}
  return params, {"jitter": s_jitter, "gray": s_gray, "blur": s_blur}


def _host_photometric(x, recipe: str, seeds: dict) -> tf.Tensor:
  """The host recipe's photometric ops on a float crop, with its sub-seeds."""
  if recipe == "mocov2":
    x = augment.random_color_jitter(x, 0.8, 0.4, 0.4, 0.4, 0.1, seeds["jitter"])
    return augment.random_blur(augment.random_grayscale(x, 0.2, seeds["gray"]), 0.5,
                               seeds["blur"])
  x = augment.random_grayscale(x, 0.2, seeds["gray"])
  return augment.color_jitter(x, 0.4, 0.4, 0.4, 0.4, seeds["jitter"])


class DeviceAugmentTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.parameters("mocov2", "mocov1")
  def test_device_ops_equal_the_host_functions_for_the_same_draws(self, recipe):
    # The host recipe's draws for a view seed, handed to the batched device ops, give the host's
    # image: the same ops, order, probabilities' outcomes and blur kernel.
    x = tf.constant(np.random.default_rng(2).uniform(size=(20, 28, 3)), tf.float32)
    seen = {"jitter": set(), "gray": set(), "blur": set(), "hue_slot": set()}
    for i in range(40):
      params, seeds = _host_params(tf.constant([i, 9], tf.int64), recipe)
      device = augment.apply_photometric(x[tf.newaxis], params, augment.PHOTOMETRIC[recipe])[0]
      self.assertAllClose(device, _host_photometric(x, recipe, seeds), atol=1e-5, msg=str(i))
      for k in ("jitter", "gray", "blur"):
        seen[k].add(float(params[k][0]))
      seen["hue_slot"].add(int(np.argmax(params["order"][0].numpy() == 3)))
    self.assertEqual(seen["gray"], {0.0, 1.0})
    self.assertEqual(seen["hue_slot"], {0, 1, 2, 3})
    if recipe == "mocov2":
      self.assertEqual(seen["jitter"], {0.0, 1.0})
      self.assertEqual(seen["blur"], {0.0, 1.0})

  def test_device_draws_have_the_host_distributions(self):
    n = 4800
    key = augment.photometric_key(3, tf.constant(7, tf.int64), 0)
    p = {k: v.numpy() for k, v in augment.draw_photometric(
        augment.PHOTOMETRIC["mocov2"], key, tf.range(n), n).items()}
    # Probabilities 0.8 / 0.2 / 0.5 (4 standard deviations).
    for name, prob in (("jitter", 0.8), ("gray", 0.2), ("blur", 0.5)):
      self.assertSetEqual(set(np.unique(p[name])), {0.0, 1.0})
      self.assertBetween(p[name].mean(), prob - 4 * math.sqrt(prob * (1 - prob) / n),
                         prob + 4 * math.sqrt(prob * (1 - prob) / n))
    # Factors U[0.6, 1.4] and the hue shift U[-0.1, 0.1]: range, mean and spread of a uniform.
    for col, (low, high) in enumerate([(0.6, 1.4)] * 3 + [(-0.1, 0.1)]):
      f = p["factors"][:, col]
      self.assertTrue(np.all(f >= low) and np.all(f < high), col)
      self.assertAllClose([f.mean(), f.std()], [(low + high) / 2, (high - low) / math.sqrt(12)],
                          atol=0.05 * (high - low))
      self.assertLess(f.min(), low + 0.01 * (high - low))
      self.assertGreater(f.max(), high - 0.01 * (high - low))
    sigma = p["sigma"]
    self.assertTrue(np.all(sigma >= 0.1) and np.all(sigma < 2.0))
    self.assertAllClose([sigma.mean(), sigma.std()], [1.05, 1.9 / math.sqrt(12)], atol=0.05)
    # The op order: every one of the 24 permutations, each about n / 24 times.
    perms, counts = np.unique(p["order"], axis=0, return_counts=True)
    self.assertLen(perms, 24)
    self.assertTrue(np.all(np.sort(perms, axis=1) == np.arange(4)))
    expected = n / 24
    self.assertLess(np.abs(counts - expected).max(), 4.5 * math.sqrt(expected))
    # A recipe without saturation and hue ("affine") leaves them at the identity.
    affine = augment.draw_photometric(augment.PHOTOMETRIC["affine"], key, tf.range(8), 8)
    self.assertAllEqual(affine["factors"][:, 2:], np.tile([[1.0, 0.0]], [8, 1]))

  def test_device_draws_are_keyed_by_global_row(self):
    # An image's draws depend on (seed, step, stream, its global row) only: any subset of rows,
    # in any order (a replica's slice, shuffle BN's permuted rows) gets the same parameters.
    images = tf.constant(np.random.default_rng(0).integers(0, 256, (8, 12, 12, 3)), tf.uint8)
    view = lambda x, rows, step=5, stream=1: augment.device_view_input(  # noqa: E731
        x, rows, recipe="mocov2", seed=3, step=tf.constant(step, tf.int64), stream=stream,
        num_rows=8)
    whole = view(images, tf.range(8)).numpy()
    rows = tf.constant([6, 1, 3, 0])
    self.assertAllClose(view(tf.gather(images, rows), rows), whole[rows.numpy()], atol=1e-6)
    for other in (view(images, tf.range(8), step=6), view(images, tf.range(8), stream=0)):
      self.assertGreater(np.abs(other.numpy() - whole).mean(), 1e-3)
    with self.assertRaisesRegex(TypeError, "uint8"):
      view(tf.cast(images, tf.float32), tf.range(8))

  def test_device_view_compiles_under_xla(self):
    images = tf.constant(np.random.default_rng(1).integers(0, 256, (4, 16, 16, 3)), tf.uint8)

    def view(x, step):
      return augment.device_view_input(x, tf.range(4) + 4, recipe="mocov2", seed=3, step=step,
                                       stream=0, num_rows=8)

    compiled = tf.function(view, jit_compile=True)
    step = tf.constant(2, tf.int64)
    self.assertAllClose(compiled(images, step), view(images, step), atol=2e-5)
    hlo = compiled.experimental_get_compiler_ir(images, step)(stage="hlo")
    self.assertNotRegex(hlo, r"\[[^\]]*<=")  # no bounded-dynamic dimension

  def test_crop_then_uint8_then_device_vs_host(self):
    # The host path rounds to uint8 once, after the photometric ops; the device path rounds the
    # crop to uint8 and runs the ops on it (the result is not rounded again). The same draws then
    # differ by the crop's rounding carried through the ops (a contrast/brightness factor up to
    # 1.4 amplifies it) and by the host's final rounding; the flip commutes with the ops.
    from sklearn.datasets import load_sample_images  # pylint: disable=g-import-not-at-top
    photo = tf.constant(load_sample_images().images[0])
    diffs = []
    for i in range(16):
      seed = tf.constant([i, 4], tf.int64)
      host = augment.two_views_uint8(photo, 64, seed)[0]
      crop = augment.two_views_uint8(photo, 64, seed, photometric=False)[0]
      view_seed = augment._split(seed, 2)[0]
      params, _ = _host_params(view_seed)
      device = augment.apply_photometric(augment.to_float(crop)[tf.newaxis], params,
                                         augment.PHOTOMETRIC["mocov2"])[0]
      diffs.append(np.abs(device.numpy() * 255 - host.numpy().astype(np.float64)))
    diffs = np.stack(diffs)
    self.assertLess(diffs.mean(), 0.4)
    self.assertLess(diffs.max(), 3.0)

  def test_geometric_only_views_skip_exactly_the_photometric_ops(self):
    # photometric=False keeps the crop and flip draws: with the jitter, grayscale and blur taken
    # out of the host recipe the views are the same.
    image = _image(40, 40)
    for recipe in ("mocov2", "mocov1", "small", "affine"):
      changed = [np.any(augment.two_views_uint8(image, 12, (i, 2), recipe, photometric=False)[0]
                        != augment.two_views_uint8(image, 12, (i, 2), recipe)[0])
                 for i in range(4)]
      self.assertTrue(any(changed), recipe)
    seed_q = augment._split(SEED, 2)[0]
    s_crop, _, _, _, s_flip = augment._split(seed_q, 5)
    expected = augment.random_flip(augment.random_resized_crop(image, 12, s_crop), s_flip)
    crop = augment.two_views_uint8(image, 12, SEED, "mocov2", photometric=False)[0]
    self.assertAllEqual(crop, augment.to_uint8(expected))

  def test_resolve_device_augment(self):
    self.assertFalse(augment.resolve_device_augment("auto"))  # CPU-only test machine
    self.assertTrue(augment.resolve_device_augment("true"))
    self.assertFalse(augment.resolve_device_augment("false"))
    self.assertTrue(augment.resolve_device_augment(True))
    with self.assertRaisesRegex(ValueError, "auto, true or false"):
      augment.resolve_device_augment("yes")
    # The flag: auto by default, checked, and "false" for runs written before it existed.
    from tfmochi import config  # pylint: disable=g-import-not-at-top
    self.assertEqual(config.TrainConfig().device_augment, "auto")
    with self.assertRaisesRegex(config.ConfigError, "--device_augment"):
      config.TrainConfig(device_augment="yes").validate()
    self.assertEqual(config.TrainConfig.from_dict({}).device_augment, "false")
    moco_config = config.TrainConfig(augmentation="mocov2").moco_for_run(1, 1, device_augment=True)
    self.assertEqual(moco_config.device_augment, "mocov2")
    self.assertIsNone(config.TrainConfig().moco_for_run(1, 1).device_augment)



def _step_model(bn_mode: str = "shuffle", device_augment: str | None = "mocov2",
                global_batch: int = 4):
  """A MoCo of two small dense encoders on 8x8 views (the step's cost is the augmentation's)."""
  import keras  # pylint: disable=g-import-not-at-top
  from tfmochi import mixing, moco, objective  # pylint: disable=g-import-not-at-top

  def encoder(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                             keras.layers.Dense(16, activation="relu"), keras.layers.Dense(8)])

  config = moco.MoCoConfig(
      queue_size=16, embedding_dim=8, momentum=0.9, bn_mode=bn_mode, weight_decay=1e-2, seed=3,
      device_augment=device_augment, objective=objective.ObjectiveConfig(
          temperature=0.2, mochi=mixing.MochiConfig(0, 0, 0)))
  return moco.MoCo(encoder(1), encoder(2), config, global_batch)


def _uint8_batches(n: int, global_batch: int = 4) -> list[dict]:
  rng = np.random.default_rng(0)
  return [{"view1": rng.integers(0, 256, (global_batch, 8, 8, 3), dtype=np.uint8),
           "view2": rng.integers(0, 256, (global_batch, 8, 8, 3), dtype=np.uint8),
           "id": np.arange(global_batch, dtype=np.int32) + global_batch * i,
           "label": np.arange(global_batch, dtype=np.int32) % 2} for i in range(n)]


def _train(strategy, batches, **model_kw):
  """Steps of `MoCo.train_step` over `strategy`, each replica fed its slice of the global batch;
  returns (model, losses)."""
  from tfmochi import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  with strategy.scope():
    model = _step_model(**model_kw)
    sgd = optimizer_lib.SGD(model.query_encoder.trainable_variables, 0.5, momentum=0.9)
    step = tf.Variable(0, dtype=tf.int64, trainable=False)

  @tf.function
  def train(batch):
    metrics = strategy.run(model.train_step, args=(batch, sgd, step))
    step.assign_add(1)
    return strategy.reduce("SUM", metrics["loss"], axis=None)

  losses = []
  per = len(batches[0]["id"]) // strategy.num_replicas_in_sync
  for batch in batches:
    dist = strategy.experimental_distribute_values_from_function(
        lambda ctx: {k: v[ctx.replica_id_in_sync_group * per:
                          (ctx.replica_id_in_sync_group + 1) * per] for k, v in batch.items()})
    losses.append(float(train(dist)))
  return model, losses


class DeviceAugmentStepTest(tf.test.TestCase):
  """`MoCo.train_step` with the photometric ops on the device (MoCoConfig.device_augment)."""

  def test_two_replicas_equal_one_device(self):
    # Shuffle BN moves each key view to another replica; its draws follow its global row, so
    # the same global batch trains alike on 1 and 2 replicas.
    from tfmochi import distribute  # pylint: disable=g-import-not-at-top
    batches = _uint8_batches(4)
    one, losses1 = _train(tf.distribute.get_strategy(), batches)
    two, losses2 = _train(distribute.mirrored_strategy(["/cpu:0", "/cpu:1"]), batches)
    self.assertAllClose(losses1, losses2, atol=1e-5)
    self.assertAllClose(one.queue.keys, two.queue.keys.values[0], atol=1e-5)
    for a, b in zip(one.query_encoder.weights + one.key_encoder.weights,
                    two.query_encoder.weights + two.key_encoder.weights):
      copies = getattr(b, "_value", b).values  # a keras.Variable wraps the mirrored tf.Variable
      self.assertLen(copies, 2)
      self.assertAllClose(a, copies[1], atol=1e-5)
    # ...and the ops do run: the same uint8 views without them train otherwise.
    _, plain = _train(tf.distribute.get_strategy(), batches, device_augment=None)
    self.assertGreater(np.abs(np.array(plain) - losses1).max(), 1e-3)

  def test_compiled_step_equals_the_plain_step(self):
    from tfmochi import distribute  # pylint: disable=g-import-not-at-top
    from tfmochi import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
    results = []
    for jit in (False, True):
      model = _step_model(bn_mode="split")  # split BN on one device: the keys are permuted
      sgd = optimizer_lib.SGD(model.query_encoder.trainable_variables, 0.5, momentum=0.9)
      step = tf.Variable(0, dtype=tf.int64, trainable=False)
      fn = distribute.replica_step_function(lambda b: model.train_step(b, sgd, step), jit,
                                            tf.distribute.get_strategy())
      losses = []
      for batch in _uint8_batches(3):
        losses.append(float(fn({k: tf.constant(v) for k, v in batch.items()})["loss"]))
        step.assign_add(1)
      results.append((losses, model.queue.keys.numpy(),
                      [w.numpy() for w in model.query_encoder.weights]))
      if jit:
        self.assertEqual(fn.experimental_get_tracing_count(), 1)
    (plain_losses, plain_keys, plain_w), (jit_losses, jit_keys, jit_w) = results
    self.assertAllClose(plain_losses, jit_losses, atol=1e-4)
    self.assertAllClose(plain_keys, jit_keys, atol=1e-4)
    for a, b in zip(plain_w, jit_w):
      self.assertAllClose(a, b, atol=1e-4)


if __name__ == "__main__":
  tf.test.main()
