"""MoCo v1/v2 image augmentations: per-image, stateless-seeded, tf.image / tf.nn only.

Every function takes one image `[H, W, C]` (uint8 in [0, 255] or float in [0, 1], C = 3 or 1;
grayscale is tiled to RGB) and returns float32, except the input pipeline's `two_views_uint8`
(uint8 views before normalisation, optionally decoding encoded bytes with the crop fused into the
JPEG decode) and `to_model_input`, which normalises such views at the start of the step. Randomness is *stateless*: every draw comes from
`tf.random.stateless_*` with a seed derived from the caller's `seed` (an int tensor of shape
[2]), so a given (image, seed) always yields the same view, eagerly, in `tf.function` and inside
`tf.data.Dataset.map`. That is what makes a training run resumable and reproducible: the data
pipeline derives the seed from (run seed, epoch, sample id).

The recipes follow facebookresearch/moco (main_moco.py's pretraining transforms, main_lincls.py's
linear-evaluation transforms; docs/ALGORITHMS.md §9) with torchvision semantics:

  mocov2: RandomResizedCrop(scale 0.2-1) -> ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8
          -> RandomGrayscale p=0.2 -> GaussianBlur(sigma ~ U[0.1, 2]) p=0.5 -> flip -> normalize
  mocov1: RandomResizedCrop(scale 0.2-1) -> RandomGrayscale p=0.2
          -> ColorJitter(0.4, 0.4, 0.4, 0.4) always -> flip -> normalize

Known differences from torchvision/PIL (all small):
  * Resizing is TF bilinear with `antialias=True` (PIL's bilinear filter also widens its support
    when downsampling), so pixels differ by interpolation round-off, not by method.
  * PIL works on uint8 between ops; here everything stays float32 in [0, 1] and the pipeline's
    views are rounded to uint8 once, at the end (`two_views_uint8`).
  * PIL's GaussianBlur approximates the Gaussian with three box blurs; here it is an exact
    (truncated at the fixed radius ceil(3 * sigma_max)) Gaussian kernel, edges replicated as PIL.
  * Hue is shifted in float HSV (`tf.image.adjust_hue`); PIL rounds H to uint8 (1/256 steps).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import tensorflow as tf

# ImageNet statistics of [0, 1] RGB (torchvision / MoCo `Normalize`).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
# MoCo's blur range; the kernel is built once for the largest sigma so its size stays static.
_MAX_BLUR_SIGMA = 2.0

SeedLike = tf.Tensor | Sequence[int]


# ----------------------------------------------------------------------------------------------
# helpers


def _as_seed(seed: SeedLike) -> tf.Tensor:
  """Returns `seed` as an int64 tensor of shape [2] (the stateless RNG key)."""
  seed = tf.convert_to_tensor(seed)
  if seed.dtype not in (tf.int32, tf.int64):
    raise TypeError(f"seed must be an int32/int64 tensor of shape [2], got {seed.dtype}.")
  seed = tf.cast(seed, tf.int64)
  seed.shape.assert_is_compatible_with([2])
  return tf.reshape(seed, [2])


def _split(seed: SeedLike, n: int) -> list[tf.Tensor]:
  """Splits a seed into `n` independent sub-seeds, each [2] int64."""
  return tf.unstack(tf.random.experimental.stateless_split(_as_seed(seed), n), num=n)


def _uniform(seed: tf.Tensor, low: float = 0.0, high: float = 1.0) -> tf.Tensor:
  """One stateless U[low, high) float32 scalar."""
  return tf.random.stateless_uniform([], seed, minval=low, maxval=high, dtype=tf.float32)


def to_rgb(image: tf.Tensor) -> tf.Tensor:
  """Tiles a 1-channel image to 3 channels; leaves 3-channel images alone. Keeps the dtype."""
  image = tf.convert_to_tensor(image)
  image.shape.assert_has_rank(3)
  channels = image.shape[-1]
  if channels == 3:
    return image
  if channels == 1:
    return tf.tile(image, [1, 1, 3])
  if channels is None:  # e.g. from tf.io.decode_image without `channels`: decide at run time
    image = tf.cond(tf.equal(tf.shape(image)[-1], 1), lambda: tf.tile(image, [1, 1, 3]),
                    lambda: image)
    image.set_shape([None, None, 3])
    return image
  raise ValueError(f"Expected an image with 1 or 3 channels, got shape {image.shape}.")


def to_float(image: tf.Tensor) -> tf.Tensor:
  """Converts an image to float32 RGB in [0, 1].

  Args:
    image: [H, W, 3 or 1], uint8 in [0, 255] or float in [0, 1].

  Returns:
    float32 [H, W, 3] in [0, 1].
  """
  image = to_rgb(image)
  if image.dtype == tf.uint8:
    return tf.image.convert_image_dtype(image, tf.float32)  # / 255, exact
  if not image.dtype.is_floating:
    raise TypeError(f"Images must be uint8 or float, got {image.dtype}.")
  return tf.cast(image, tf.float32)


def _grayscale(image: tf.Tensor) -> tf.Tensor:
  """float [H, W, 3] -> float [H, W, 1] luma (PIL "L" weights)."""
  return tf.reduce_sum(image * tf.constant(_LUMA, image.dtype), axis=-1, keepdims=True)


def _resize(image: tf.Tensor, height, width) -> tf.Tensor:
  """Bilinear, antialiased (PIL-like) resize of float [h, w, 3] to [height, width, 3]."""
  return tf.image.resize(image, tf.stack([height, width]), method="bilinear", antialias=True)


# ----------------------------------------------------------------------------------------------
# geometric ops


def _rrc_window(height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor,
                scale: tuple[float, float], ratio: tuple[float, float],
                attempts: int = 10) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
  """torchvision RandomResizedCrop.get_params, vectorised over the attempts.

  All `attempts` candidates are drawn at once and the first one that fits is taken, which is the
  same distribution as torchvision's sequential loop (a candidate's draw does not depend on the
  earlier ones). Falls back to the centre crop clamped to the ratio range, like torchvision.

  Returns:
    (top, left, crop_height, crop_width), int32 scalars.
  """
  s_area, s_ratio, s_top, s_left = _split(seed, 4)
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  area = h * w
  target_area = area * tf.random.stateless_uniform([attempts], s_area, scale[0], scale[1])
  log_ratio = tf.random.stateless_uniform([attempts], s_ratio, math.log(ratio[0]),
                                          math.log(ratio[1]))
  aspect = tf.exp(log_ratio)
  # tf.round is round-half-to-even like Python's round() in torchvision.
  cw = tf.round(tf.sqrt(target_area * aspect))  # [attempts]
  ch = tf.round(tf.sqrt(target_area / aspect))
  fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  cw_ok, ch_ok = cw[first], ch[first]
  top_ok = tf.floor(_uniform(s_top) * (h - ch_ok + 1.0))
  left_ok = tf.floor(_uniform(s_left) * (w - cw_ok + 1.0))

  # Fallback: whole image, clamped to the ratio range, centred.
  in_ratio = w / h
  fb_w = tf.where(in_ratio < ratio[0], w,
                  tf.where(in_ratio > ratio[1], tf.round(h * ratio[1]), w))
  fb_h = tf.where(in_ratio < ratio[0], tf.round(w / ratio[0]), h)
  fb_top = tf.floor((h - fb_h) / 2.0)
  fb_left = tf.floor((w - fb_w) / 2.0)

  ok = tf.reduce_any(fits)
  pick = lambda a, b: tf.cast(tf.where(ok, a, b), tf.int32)  # noqa: E731
  return pick(top_ok, fb_top), pick(left_ok, fb_left), pick(ch_ok, fb_h), pick(cw_ok, fb_w)


def random_resized_crop(image: tf.Tensor, size: int, seed: SeedLike,
                        scale: tuple[float, float] = (0.2, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tf.Tensor:
  """torchvision RandomResizedCrop: random area fraction + log-uniform aspect, then resize.

  Args:
    image: [H, W, 3|1] uint8 or float in [0, 1].
    size: output side S.
    seed: [2] int seed.
    scale: range of the crop area as a fraction of the image area.
    ratio: range of the crop aspect ratio w/h (sampled log-uniformly).

  Returns:
    float32 [S, S, 3] in [0, 1].
  """
  return _resize_crop(_random_crop(to_rgb(image), _as_seed(seed), scale, ratio), size)


def _random_crop(image: tf.Tensor, seed: tf.Tensor, scale, ratio) -> tf.Tensor:
  """The random resized crop's window of a decoded [H, W, 3] image, not resized."""
  shape = tf.shape(image)
  top, left, ch, cw = _rrc_window(shape[0], shape[1], seed, scale, ratio)
  return tf.slice(image, tf.stack([top, left, 0]), tf.stack([ch, cw, 3]))


def _resize_crop(crop: tf.Tensor, size: int) -> tf.Tensor:
  """[h, w, 3] crop -> float32 [S, S, 3] in [0, 1]."""
  out = tf.clip_by_value(_resize(to_float(crop), size, size), 0.0, 1.0)
  out.set_shape([size, size, 3])
  return out


def decode_image(encoded: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG/PNG/BMP/GIF bytes -> uint8 [H, W, 3] (first frame of a GIF; gray tiled)."""
  image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def decode_random_resized_crop(encoded: tf.Tensor, size: int, seed: SeedLike,
                               scale: tuple[float, float] = (0.2, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tf.Tensor:
  """`random_resized_crop(decode_image(encoded), ...)` with JPEG decoding fused into the crop.

  For a JPEG the window is drawn from the size in its header (`extract_jpeg_shape`) with the
  same stateless draws as `random_resized_crop`, and only that window is decoded
  (`decode_and_crop_jpeg`, as TPU ResNet input pipelines do): a 0.2-area crop skips most of the
  entropy decoding and colour conversion of the image. Other formats are decoded whole and
  cropped. The window is identical; the pixels of a fused crop may differ from the decoded-then-
  cropped ones by JPEG round-off where the window cuts through 8x8/16x16 blocks (chroma
  upsampling at the crop's edge) - a few grey levels at most, measured in tests/test_augment.py.

  Args:
    encoded: scalar string, the encoded image file.
    size: output side S.
    seed: [2] int seed (the same seed as for `random_resized_crop` gives the same window).
    scale, ratio: as `random_resized_crop`.

  Returns:
    float32 [S, S, 3] in [0, 1]. Raises InvalidArgumentError if `encoded` cannot be decoded.
  """
  seed = _as_seed(seed)

  def fused():
    shape = tf.image.extract_jpeg_shape(encoded)
    top, left, ch, cw = _rrc_window(shape[0], shape[1], seed, scale, ratio)
    return tf.image.decode_and_crop_jpeg(encoded, tf.stack([top, left, ch, cw]), channels=3)

  crop = tf.cond(tf.io.is_jpeg(encoded), fused,
                 lambda: _random_crop(decode_image(encoded), seed, scale, ratio))
  crop.set_shape([None, None, 3])
  return _resize_crop(crop, size)


def random_flip(image: tf.Tensor, seed: SeedLike, p: float = 0.5) -> tf.Tensor:
  """Horizontal flip with probability p. Returns float32 [H, W, 3]."""
  image = to_float(image)
  return tf.cond(_uniform(_as_seed(seed)) < p, lambda: tf.reverse(image, axis=[1]),
                 lambda: image)


# Ranges of `random_affine` in the "affine" recipe: the small rotations, shears, zooms and shifts
# under which a handwritten digit keeps its class (the usual MNIST augmentation); a flip or a
# quarter turn would not (a mirrored 2 is a 5, a turned 6 a 9).
AFFINE_DEGREES = 15.0
AFFINE_TRANSLATE = 0.1
AFFINE_SCALE = (0.9, 1.1)
AFFINE_SHEAR_DEGREES = 10.0


def random_affine(image: tf.Tensor, seed: SeedLike, degrees: float = AFFINE_DEGREES,
                  translate: float = AFFINE_TRANSLATE,
                  scale: tuple[float, float] = AFFINE_SCALE,
                  shear: float = AFFINE_SHEAR_DEGREES) -> tf.Tensor:
  """torchvision RandomAffine about the image centre, bilinear, outside filled with black.

  The forward map is out = c + R(angle) Sh(shear) z (in - c) + t, with angle ~ U[-degrees,
  degrees], shear angle (along x) ~ U[-shear, shear], zoom z ~ U[scale], shift t ~ U[-translate,
  translate] * (W, H) per axis; the image is resampled through the inverse map. Black is the
  background of the digits (and of most small-image data sets), so shifted-in borders add no edge.

  Args:
    image: [H, W, 3|1] uint8 or float in [0, 1].
    seed: [2] int seed.
    degrees, translate, scale, shear: the ranges above (static Python numbers).

  Returns:
    float32 [H, W, 3] in [0, 1].
  """
  image = to_float(image)
  s_rot, s_shear, s_zoom, s_tx, s_ty = _split(seed, 5)
  angle = _uniform(s_rot, -degrees, degrees) * (math.pi / 180.0)
  shear_angle = _uniform(s_shear, -shear, shear) * (math.pi / 180.0)
  zoom = _uniform(s_zoom, scale[0], scale[1])
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  shift = tf.stack([_uniform(s_tx, -translate, translate) * hw[1],
                    _uniform(s_ty, -translate, translate) * hw[0]])  # (x, y)
  cos, sin = tf.cos(angle), tf.sin(angle)
  forward = zoom * tf.reshape(tf.stack([cos, cos * tf.tan(shear_angle) - sin,
                                        sin, sin * tf.tan(shear_angle) + cos]), [2, 2])
  inverse = tf.linalg.inv(forward)
  centre = (tf.reverse(hw, [0]) - 1.0) / 2.0  # (x, y) of the centre pixel
  # in = c + A^-1 (out - c - t) = A^-1 out + (c - A^-1 (c + t)).
  offset = centre - tf.linalg.matvec(inverse, centre + shift)
  transform = tf.concat([inverse[0], offset[:1], inverse[1], offset[1:], tf.zeros([2])], 0)
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[tf.newaxis], transforms=transform[tf.newaxis],
      output_shape=tf.shape(image)[:2], fill_value=0.0, interpolation="BILINEAR",
      fill_mode="CONSTANT")[0]
  return tf.clip_by_value(tf.ensure_shape(out, image.shape), 0.0, 1.0)


def center_view(image: tf.Tensor, size: int) -> tf.Tensor:
  """MoCo lincls val transform scaled to `size`: Resize(round(size*256/224)), CenterCrop(size).

  Args:
    image: [H, W, 3|1] uint8 or float in [0, 1].
    size: output side S (224 gives torchvision's Resize(256) + CenterCrop(224)).

  Returns:
    float32 [S, S, 3], ImageNet-normalised.
  """
  image = to_float(image)
  resize_to = int(round(size * 256 / 224))
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  h, w = shape[0], shape[1]
  short = tf.minimum(h, w)
  # torchvision: the short side becomes `resize_to`, the long side int(resize_to * long / short).
  new_h = tf.where(h <= w, float(resize_to), tf.floor(resize_to * h / short))
  new_w = tf.where(h <= w, tf.floor(resize_to * w / short), float(resize_to))
  new_h = tf.cast(new_h, tf.int32)
  new_w = tf.cast(new_w, tf.int32)
  image = tf.clip_by_value(_resize(image, new_h, new_w), 0.0, 1.0)
  top = tf.cast(tf.round(tf.cast(new_h - size, tf.float32) / 2.0), tf.int32)
  left = tf.cast(tf.round(tf.cast(new_w - size, tf.float32) / 2.0), tf.int32)
  image = tf.slice(image, tf.stack([top, left, 0]), [size, size, 3])
  image.set_shape([size, size, 3])
  return normalize(image)


# ----------------------------------------------------------------------------------------------
# photometric ops


def _blend(a: tf.Tensor, b: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
  """torchvision `_blend`: factor * a + (1 - factor) * b, clipped to [0, 1]."""
  return tf.clip_by_value(factor * a + (1.0 - factor) * b, 0.0, 1.0)


def _factor_range(x: float, name: str) -> tuple[float, float]:
  if x < 0:
    raise ValueError(f"color_jitter {name} must be >= 0, got {x}.")
  return max(0.0, 1.0 - x), 1.0 + x


def color_jitter(image: tf.Tensor, brightness: float, contrast: float, saturation: float,
                 hue: float, seed: SeedLike) -> tf.Tensor:
  """torchvision ColorJitter: the four ops, in a random order per image.

  brightness/contrast/saturation factors ~ U[max(0, 1 - x), 1 + x] are multiplicative blends
  (with black, the mean of the grayscale image, and the grayscale image); hue shifts by
  U[-hue, hue] of the colour wheel. An op whose strength is 0 is skipped, as in torchvision, so
  `color_jitter(x, 0, 0, 0, 0, seed)` is the identity (up to the float conversion).

  Args:
    image: [H, W, 3|1] uint8 or float in [0, 1].
    brightness, contrast, saturation: jitter strengths >= 0 (static Python floats).
    hue: hue jitter strength in [0, 0.5].
    seed: [2] int seed.

  Returns:
    float32 [H, W, 3] in [0, 1].
  """
  if not 0.0 <= hue <= 0.5:
    raise ValueError(f"color_jitter hue must be in [0, 0.5], got {hue}.")
  image = to_float(image)
  s_order, s_b, s_c, s_s, s_h = _split(seed, 5)
  ops: list[Callable[[tf.Tensor], tf.Tensor]] = []
  if brightness > 0:
    b = _uniform(s_b, *_factor_range(brightness, "brightness"))
    ops.append(lambda x: _blend(x, tf.zeros_like(x), b))
  if contrast > 0:
    c = _uniform(s_c, *_factor_range(contrast, "contrast"))
    ops.append(lambda x: _blend(x, tf.reduce_mean(_grayscale(x)), c))
  if saturation > 0:
    s = _uniform(s_s, *_factor_range(saturation, "saturation"))
    ops.append(lambda x: _blend(x, _grayscale(x), s))
  if hue > 0:
    delta = _uniform(s_h, -hue, hue)
    ops.append(lambda x: tf.clip_by_value(tf.image.adjust_hue(x, delta), 0.0, 1.0))
  if not ops:
    return image
  # A random permutation of the active ops (torchvision: torch.randperm(4)), applied by a loop
  # around one switch: the graph holds each op once instead of once per position.
  order = tf.argsort(tf.random.stateless_uniform([len(ops)], s_order))

  def body(k, x):
    x = tf.switch_case(order[k], [lambda f=f: f(x) for f in ops])
    return k + 1, tf.ensure_shape(x, [None, None, 3])

  _, image = tf.while_loop(lambda k, _: k < len(ops), body, (tf.constant(0), image),
                           maximum_iterations=len(ops))
  return image


def random_color_jitter(image: tf.Tensor, p: float, brightness: float, contrast: float,
                        saturation: float, hue: float, seed: SeedLike) -> tf.Tensor:
  """`color_jitter` applied with probability p (torchvision RandomApply). float32 [H, W, 3]."""
  image = to_float(image)
  s_apply, s_jitter = _split(seed, 2)
  return tf.cond(
      _uniform(s_apply) < p,
      lambda: color_jitter(image, brightness, contrast, saturation, hue, s_jitter),
      lambda: image)


def grayscale(image: tf.Tensor) -> tf.Tensor:
  """PIL-style luma replicated to 3 channels. float32 [H, W, 3]."""
  return tf.tile(_grayscale(to_float(image)), [1, 1, 3])


def random_grayscale(image: tf.Tensor, p: float, seed: SeedLike) -> tf.Tensor:
  """torchvision RandomGrayscale(p): all 3 channels set to the luma with probability p."""
  image = to_float(image)
  return tf.cond(_uniform(_as_seed(seed)) < p, lambda: grayscale(image), lambda: image)


def _edge_pad(x: tf.Tensor, r: int, axis: int) -> tf.Tensor:
  """Replicates the border `r` times along `axis` (PIL's blur extends edges this way)."""
  n = tf.shape(x)[axis]
  first = tf.gather(x, [0], axis=axis)
  last = tf.gather(x, tf.reshape(n - 1, [1]), axis=axis)
  return tf.concat([tf.repeat(first, r, axis=axis), x, tf.repeat(last, r, axis=axis)], axis)


def gaussian_blur(image: tf.Tensor, sigma, max_sigma: float = _MAX_BLUR_SIGMA) -> tf.Tensor:
  """PIL GaussianBlur(radius=sigma): separable Gaussian of standard deviation `sigma`.

  The kernel has the static radius ceil(3 * max_sigma) (13 taps for MoCo's sigma <= 2) for
  every sigma, so the op traces once; a small sigma just makes the outer taps vanish (sigma=0.1
  puts exp(-50) on the neighbours: numerically a delta). Borders replicate the edge pixel, so a
  constant image stays constant.

  Args:
    image: [H, W, 3|1] uint8 or float in [0, 1].
    sigma: float scalar (tensor ok), 0 < sigma <= max_sigma.
    max_sigma: sets the kernel radius.

  Returns:
    float32 [H, W, 3].
  """
  image = to_float(image)
  radius = int(math.ceil(3.0 * max_sigma))
  sigma = tf.cast(sigma, tf.float32)
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-tf.square(x) / (2.0 * tf.square(sigma)))
  kernel = kernel / tf.reduce_sum(kernel)  # [2r+1]
  k_rows = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, 3, 1])  # [2r+1, 1, 3, 1]
  k_cols = tf.tile(tf.reshape(kernel, [1, -1, 1, 1]), [1, 1, 3, 1])  # [1, 2r+1, 3, 1]
  x = _edge_pad(_edge_pad(image, radius, 0), radius, 1)[tf.newaxis]  # [1, H+2r, W+2r, 3]
  x = tf.nn.depthwise_conv2d(x, k_rows, strides=[1, 1, 1, 1], padding="VALID")
  x = tf.nn.depthwise_conv2d(x, k_cols, strides=[1, 1, 1, 1], padding="VALID")
  return x[0]


def random_blur(image: tf.Tensor, p: float, seed: SeedLike,
                sigma_range: tuple[float, float] = (0.1, _MAX_BLUR_SIGMA)) -> tf.Tensor:
  """MoCo v2 GaussianBlur: with probability p, blur with sigma ~ U[sigma_range]."""
  image = to_float(image)
  s_apply, s_sigma = _split(seed, 2)
  sigma = _uniform(s_sigma, sigma_range[0], sigma_range[1])
  return tf.cond(_uniform(s_apply) < p,
                 lambda: gaussian_blur(image, sigma, max(sigma_range[1], _MAX_BLUR_SIGMA)),
                 lambda: image)


def normalize(image: tf.Tensor) -> tf.Tensor:
  """(x - ImageNet mean) / std on [0, 1] RGB. float32 [H, W, 3]."""
  image = to_float(image)
  return (image - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)


# ----------------------------------------------------------------------------------------------
# recipes


# A recipe's photometric part runs on the crop: `crop(sub_seed)` gives the random resized crop
# (float32 [S, S, 3] in [0, 1]) and the recipe returns its view in [0, 1], before `normalize`.
# Passing the crop as a function lets the input pipeline fuse it with JPEG decoding
# (`decode_random_resized_crop`) while every other draw stays the same.
Crop = Callable[[tf.Tensor], tf.Tensor]


def _moco_v2(crop: Crop, seed: SeedLike, hflip: bool, photometric: bool = True) -> tf.Tensor:
  s_crop, s_jitter, s_gray, s_blur, s_flip = _split(seed, 5)
  x = crop(s_crop)
  if photometric:
    x = random_color_jitter(x, 0.8, 0.4, 0.4, 0.4, 0.1, s_jitter)
    x = random_grayscale(x, 0.2, s_gray)
    x = random_blur(x, 0.5, s_blur)
  return random_flip(x, s_flip) if hflip else x


def _moco_v1(crop: Crop, seed: SeedLike, hflip: bool, photometric: bool = True) -> tf.Tensor:
  s_crop, s_gray, s_jitter, s_flip = _split(seed, 4)
  x = crop(s_crop)
  if photometric:
    x = random_grayscale(x, 0.2, s_gray)
    x = color_jitter(x, 0.4, 0.4, 0.4, 0.4, s_jitter)
  return random_flip(x, s_flip) if hflip else x


def _small_image(crop: Crop, seed: SeedLike, hflip: bool, photometric: bool = True) -> tf.Tensor:
  s_crop, s_jitter, s_gray, s_flip = _split(seed, 4)
  x = crop(s_crop)
  if photometric:
    x = random_color_jitter(x, 0.8, 0.4, 0.4, 0.4, 0.1, s_jitter)
    x = random_grayscale(x, 0.2, s_gray)
  return random_flip(x, s_flip) if hflip else x


def _affine(crop: Crop, seed: SeedLike, hflip: bool, photometric: bool = True) -> tf.Tensor:
  # Digits and other gray shapes: geometry carries the invariances, colour has none to teach
  # (saturation, hue and grayscale do nothing to a gray image), so only brightness and contrast.
  s_crop, s_affine, s_jitter, s_flip = _split(seed, 4)
  x = random_affine(crop(s_crop), s_affine)
  if photometric:
    x = random_color_jitter(x, 0.8, 0.4, 0.4, 0.0, 0.0, s_jitter)
  return random_flip(x, s_flip) if hflip else x


_RECIPES = {"mocov2": _moco_v2, "mocov1": _moco_v1, "small": _small_image, "affine": _affine}


def _normalized_view(recipe: str):
  def view(image: tf.Tensor, size: int, seed: SeedLike,
           crop_scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True) -> tf.Tensor:
    x = _RECIPES[recipe](lambda s: random_resized_crop(image, size, s, scale=crop_scale), seed,
                         hflip)
    x = normalize(x)
    x.set_shape([size, size, 3])
    return x
  return view


def moco_v2_view(image: tf.Tensor, size: int, seed: SeedLike,
                 crop_scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True) -> tf.Tensor:
  """One MoCo v2 (`--aug-plus`) view. Returns float32 [S, S, 3], normalised."""
  return _normalized_view("mocov2")(image, size, seed, crop_scale, hflip)


def moco_v1_view(image: tf.Tensor, size: int, seed: SeedLike,
                 crop_scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True) -> tf.Tensor:
  """One MoCo v1 (InstDisc-style) view. Returns float32 [S, S, 3], normalised."""
  return _normalized_view("mocov1")(image, size, seed, crop_scale, hflip)


def small_image_view(image: tf.Tensor, size: int, seed: SeedLike,
                     crop_scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True) -> tf.Tensor:
  """MoCo v2 for small images (the MoCo CIFAR demo, SimCLR's CIFAR recipe): no Gaussian blur.

  A blur of σ up to 2 px destroys a 16–32 px image, so the small-image recipes drop it; the rest is
  MoCo v2. Returns float32 [S, S, 3], normalised.
  """
  return _normalized_view("small")(image, size, seed, crop_scale, hflip)


def affine_view(image: tf.Tensor, size: int, seed: SeedLike,
                crop_scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True) -> tf.Tensor:
  """For small gray shapes such as digits: crop, `random_affine`, brightness/contrast jitter.

  The crop's scale range still applies (a range of (1, 1) leaves the affine map as the only
  geometric change). Returns float32 [S, S, 3], normalised.
  """
  return _normalized_view("affine")(image, size, seed, crop_scale, hflip)


AUGMENTATIONS: dict[str, Callable[[tf.Tensor, int, SeedLike], tf.Tensor]] = {
    "mocov2": moco_v2_view,
    "mocov1": moco_v1_view,
    "small": small_image_view,
    "affine": affine_view,
}


def _recipe(recipe: str):
  try:
    return _RECIPES[recipe]
  except KeyError:
    raise ValueError(f"Unknown augmentation recipe {recipe!r}; choose one of "
                     f"{sorted(AUGMENTATIONS)}.") from None


def two_views(image: tf.Tensor, size: int, seed: SeedLike, recipe: str = "mocov2",
              crop_scale: tuple[float, float] = (0.2, 1.0),
              hflip: bool = True) -> tuple[tf.Tensor, tf.Tensor]:
  """MoCo's TwoCropsTransform: two independent draws of the same recipe.

  Args:
    image: [H, W, 3|1] uint8 or float in [0, 1].
    size: output side S.
    seed: [2] int seed; the views use two different sub-seeds of it.
    recipe: a key of AUGMENTATIONS.
    crop_scale: the random resized crop's area range (MoCo: (0.2, 1)).
    hflip: random horizontal flips (p=0.5). Turn them off for data whose classes are not
      mirror-symmetric, such as digits (a mirrored 2 looks like a 5, a 3 like an E).

  Returns:
    (view_q, view_k), each float32 [S, S, 3].
  """
  _recipe(recipe)
  view = AUGMENTATIONS[recipe]
  s_q, s_k = _split(seed, 2)
  return (view(image, size, s_q, crop_scale, hflip),
          view(image, size, s_k, crop_scale, hflip))


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """float [..., 3] in [0, 1] -> uint8, rounded to the nearest level (as PIL stores pixels)."""
  return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.uint8)


def two_views_uint8(image: tf.Tensor, size: int, seed: SeedLike, recipe: str = "mocov2",
                    crop_scale: tuple[float, float] = (0.2, 1.0), hflip: bool = True, *,
                    encoded: bool = False,
                    photometric: bool = True) -> tuple[tf.Tensor, tf.Tensor]:
  """`two_views` as uint8 before `normalize`: what the input pipeline sends to the device.

  The same draws as `two_views`; `to_model_input` of a view equals the `two_views` view up to
  the rounding to 1/255 (a quarter of the JPEG noise; torchvision's PIL pipeline also rounds to
  uint8 after every op). A quarter of the bytes of float32 on the host-to-device link and in the
  prefetch buffers, and the normalisation runs on the accelerator.

  Args:
    image: uint8 or float [H, W, 3|1], or with encoded=True a scalar string of encoded image
      bytes, decoded here with the crop fused into JPEG decoding (`decode_random_resized_crop`).
    size, seed, recipe, crop_scale, hflip: as `two_views`.
    encoded: `image` is an encoded file.
    photometric: False leaves out the recipe's photometric ops (colour jitter, grayscale, blur):
      the views are the crop (+ affine map, + flip), finished on the device by `DeviceAugment`
      (--device_augment). The geometric draws are the same either way.

  Returns:
    (view_q, view_k), each uint8 [S, S, 3].
  """
  fn = _recipe(recipe)
  if encoded:
    crop = lambda s: decode_random_resized_crop(image, size, s, scale=crop_scale)  # noqa: E731
  else:
    image = to_rgb(image)
    crop = lambda s: random_resized_crop(image, size, s, scale=crop_scale)  # noqa: E731
  views = []
  for s in _split(seed, 2):
    view = to_uint8(fn(crop, s, hflip, photometric))
    view.set_shape([size, size, 3])
    views.append(view)
  return views[0], views[1]


def to_model_input(images: tf.Tensor) -> tf.Tensor:
  """Images as the encoders take them: uint8 views are normalised here, floats pass unchanged.

  The pretraining pipeline sends uint8 views (`two_views_uint8`); this runs at the start of the
  step, on the device. Float inputs are taken to be normalised already (`two_views`,
  `eval_dataset`, tests), so either convention reaches the encoders as ImageNet-normalised
  float32.

  Args:
    images: [..., 3] uint8 in [0, 255], or an already normalised float tensor.

  Returns:
    float32 (or the input float dtype) [..., 3].
  """
  if images.dtype != tf.uint8:
    return images
  return (tf.cast(images, tf.float32) * (1.0 / 255.0) - tf.constant(IMAGENET_MEAN)) / tf.constant(
      IMAGENET_STD)


def normalize_views(batch: dict) -> dict:
  """`to_model_input` of a MoCo batch's "view1" and "view2"; the other entries unchanged."""
  return dict(batch, view1=to_model_input(batch["view1"]), view2=to_model_input(batch["view2"]))


def linear_train_view(image: tf.Tensor, size: int, seed: SeedLike, *,
                      crop_min_scale: float = 0.08, hflip: bool = True) -> tf.Tensor:
  """MoCo lincls train transform: RandomResizedCrop (scale 0.08-1), flip, normalize.

  Args:
    image: uint8 or float [H, W, 3].
    size: side S.
    seed: stateless seed.
    crop_min_scale: smallest crop area (0.08 in MoCo; larger for tiny images, where a 0.08 crop
      of an 8x8 digit is a 2x2 blob that no longer shows the class).
    hflip: random horizontal flips (off where mirroring changes the class, e.g. digits).

  Returns:
    float32 [S, S, 3].
  """
  s_crop, s_flip = _split(seed, 2)
  x = random_resized_crop(image, size, s_crop, scale=(crop_min_scale, 1.0))
  if hflip:
    x = random_flip(x, s_flip)
  x = normalize(x)
  x.set_shape([size, size, 3])
  return x


# ----------------------------------------------------------------------------------------------
# the photometric ops on the device (--device_augment)


@dataclasses.dataclass(frozen=True)
class Photometric:
  """A recipe's photometric ops, with the host recipe's order, strengths and probabilities.

  Attributes:
    jitter_p: probability of the colour jitter (torchvision RandomApply; 1 = always).
    brightness, contrast, saturation, hue: the jitter's strengths (0 leaves an op out).
    gray_p: probability of grayscale.
    blur_p: probability of the Gaussian blur, with sigma ~ U[blur_sigma].
    blur_sigma: the blur's sigma range.
    gray_first: grayscale before the jitter (MoCo v1) instead of after it.
  """
  jitter_p: float
  brightness: float
  contrast: float
  saturation: float
  hue: float
  gray_p: float = 0.0
  blur_p: float = 0.0
  blur_sigma: tuple[float, float] = (0.1, _MAX_BLUR_SIGMA)
  gray_first: bool = False


# The photometric part of each recipe (`_moco_v2` ... `_affine` above), as the device runs it.
PHOTOMETRIC = {
    "mocov2": Photometric(0.8, 0.4, 0.4, 0.4, 0.1, gray_p=0.2, blur_p=0.5),
    "mocov1": Photometric(1.0, 0.4, 0.4, 0.4, 0.4, gray_p=0.2, gray_first=True),
    "small": Photometric(0.8, 0.4, 0.4, 0.4, 0.1, gray_p=0.2),
    "affine": Photometric(0.8, 0.4, 0.4, 0.0, 0.0),
}

# Columns of the per-image random integers of `draw_photometric`.
_COL_JITTER, _COL_FACTORS, _COL_ORDER, _COL_GRAY, _COL_BLUR, _COL_SIGMA = 0, 1, 5, 9, 10, 11
_NUM_COLS = 12
_DEVICE_STREAM = 0xD7  # sub-stream of (seed, step) for the device's draws (arbitrary constant)


def resolve_device_augment(setting: str | bool) -> bool:
  """--device_augment=auto|true|false as a bool: auto is on when a GPU or TPU is visible.

  On a CPU-only machine the "device" is the same cores as the input pipeline, so moving the ops
  there gains nothing and costs the step's time.
  """
  if isinstance(setting, bool):
    return setting
  if setting not in ("auto", "true", "false"):
    raise ValueError(f"device_augment must be auto, true or false; got {setting!r}.")
  from tfmochi import distribute  # pylint: disable=g-import-not-at-top

  return distribute.accelerator_visible() if setting == "auto" else setting == "true"


def photometric_key(seed, step, stream: int) -> tf.Tensor:
  """The [2] int64 key of one step's device draws; `stream` 0 for the query views, 1 for keys."""
  pair = tf.stack([tf.cast(seed, tf.int64), tf.cast(step, tf.int64)])
  return tf.random.experimental.stateless_fold_in(pair, _DEVICE_STREAM + stream, alg="philox")


def _unit(bits: tf.Tensor) -> tf.Tensor:
  """int32 random bits -> float32 in [0, 1) on a 2^-24 grid.

  Made from the integers here because TF's kernels and XLA turn random bits into floats
  differently while drawing the same integers: the compiled and the plain step then agree.
  """
  return tf.cast(tf.bitwise.bitwise_and(bits, 0xFFFFFF), tf.float32) * (1.0 / (1 << 24))


def draw_photometric(spec: Photometric, key: tf.Tensor, rows: tf.Tensor,
                     num_rows: int) -> dict:
  """The per-image parameters of `apply_photometric` for global batch rows `rows`.

  One stateless draw of [num_rows, 12] random int32 from `key` (Philox); the image at global row
  g takes row g, so its parameters depend on (key, g) only, not on the replica that encodes it
  nor on its position there. 32-bit integers because a TPU emulates 64-bit ones and XLA cannot
  rewrite a 64-bit sort.

  Args:
    spec: the recipe's `Photometric`.
    key: [2] int64, from `photometric_key`.
    rows: [n] int global batch rows of the images.
    num_rows: the global batch size (static).

  Returns:
    {"jitter": [n] float32 1/0 (the jitter applies), "factors": [n, 4] float32 (brightness,
    contrast and saturation factors, then the hue shift; 1, 1, 1, 0 for an op left out),
    "order": [n, 4] int32 (a permutation of the ops 0..3 = B, C, S, H), "gray": [n],
    "blur": [n] float32 1/0, "sigma": [n] float32}.
  """
  bits = tf.random.stateless_uniform([num_rows, _NUM_COLS], key, minval=None, maxval=None,
                                     dtype=tf.int32, alg="philox")
  bits = tf.gather(bits, tf.cast(rows, tf.int32))
  u = _unit(bits)
  ranges = [_factor_range(spec.brightness, "brightness"), _factor_range(spec.contrast, "contrast"),
            _factor_range(spec.saturation, "saturation"), (-spec.hue, spec.hue)]
  low = tf.constant([r[0] for r in ranges], tf.float32)
  high = tf.constant([r[1] for r in ranges], tf.float32)
  flag = lambda col, p: tf.cast(u[:, col] < p, tf.float32)  # noqa: E731
  low_sigma, high_sigma = spec.blur_sigma
  return {
      "jitter": flag(_COL_JITTER, spec.jitter_p),
      "factors": low + (high - low) * u[:, _COL_FACTORS:_COL_FACTORS + 4],
      # A uniform permutation (torch.randperm); a tie (probability ~6 / 2^32 per image) keeps the
      # ops' order, alike in TF's kernels and XLA as the sort is stable.
      "order": tf.argsort(bits[:, _COL_ORDER:_COL_ORDER + 4], axis=-1, stable=True),
      "gray": flag(_COL_GRAY, spec.gray_p),
      "blur": flag(_COL_BLUR, spec.blur_p),
      "sigma": low_sigma + (high_sigma - low_sigma) * u[:, _COL_SIGMA],
  }


def _per_image(v: tf.Tensor) -> tf.Tensor:
  """[n] -> [n, 1, 1, 1], to scale a batch of images image by image."""
  return tf.reshape(v, [-1, 1, 1, 1])


def _linear_jitter(x: tf.Tensor, a: tf.Tensor, op: tf.Tensor) -> tf.Tensor:
  """Brightness, contrast or saturation per image, as one blend: clip(a x + (1 - a) t).

  t is black (op 0), the image's mean luma (op 1) or its luma (op 2); a = 1 is exactly x, which
  is how an image skips a slot. x [n, H, W, 3]; a [n]; op [n] int.
  """
  luma = _grayscale(x)  # [n, H, W, 1]
  mean = tf.reduce_mean(luma, axis=[1, 2, 3], keepdims=True)
  w_contrast = _per_image(tf.cast(tf.equal(op, 1), x.dtype))
  w_saturation = _per_image(tf.cast(tf.equal(op, 2), x.dtype))
  a = _per_image(a)
  return _blend(x, w_contrast * mean + w_saturation * luma, a)


def _hue_shift(x: tf.Tensor, delta: tf.Tensor) -> tf.Tensor:
  """`tf.image.adjust_hue` with a shift per image: x [n, H, W, 3], delta [n] (turns)."""
  hsv = tf.image.rgb_to_hsv(x)
  hue = hsv[..., :1] + _per_image(delta)
  hue = hue - tf.floor(hue)
  return tf.clip_by_value(tf.image.hsv_to_rgb(tf.concat([hue, hsv[..., 1:]], -1)), 0.0, 1.0)


def _jitter_batch(x: tf.Tensor, params: dict, spec: Photometric) -> tf.Tensor:
  """`color_jitter` per image in its own random op order, with static shapes.

  The hue shift (an HSV round trip, the dearest op) runs once: the three blends of an image are
  applied in its order, those before its hue slot first (the later ones with factor 1, exactly
  the identity), then the hue shift, then the blends after the slot.
  """
  on = params["jitter"][:, tf.newaxis]
  factors = on * params["factors"] + (1.0 - on) * tf.constant([1.0, 1.0, 1.0, 0.0])
  order = params["order"]
  hue_slot = tf.argmax(tf.cast(tf.equal(order, 3), tf.int32), axis=-1, output_type=tf.int32)
  slots = tf.range(3)[tf.newaxis]  # the blends' positions in the order without the hue
  blend_ops = tf.gather(order, slots + tf.cast(slots >= hue_slot[:, tf.newaxis], tf.int32),
                        batch_dims=1)  # [n, 3] in 0..2
  blend_factors = tf.gather(factors, blend_ops, batch_dims=1)  # [n, 3]
  for before_hue in (True, False):
    for i in range(3):
      now = tf.cast((i < hue_slot) if before_hue else (i >= hue_slot), x.dtype)
      x = _linear_jitter(x, now * blend_factors[:, i] + (1.0 - now), blend_ops[:, i])
    if before_hue and spec.hue > 0:
      # Weights 1/0 rather than a shift of 0 where the jitter is off: the HSV round trip is the
      # identity only up to round-off, the 1/0 blend exactly.
      w = _per_image(on[:, 0])
      x = w * _hue_shift(x, factors[:, 3]) + (1.0 - w) * x
  return x


def _gray_batch(x: tf.Tensor, gray: tf.Tensor) -> tf.Tensor:
  """Grayscale the images whose `gray` [n] is 1: an exact blend with weights 1/0."""
  g = _per_image(gray)
  return g * tf.tile(_grayscale(x), [1, 1, 1, 3]) + (1.0 - g) * x


def _blur_batch(x: tf.Tensor, blur: tf.Tensor, sigma: tf.Tensor, max_sigma: float) -> tf.Tensor:
  """`gaussian_blur` with a sigma per image; images whose `blur` [n] is 0 get the delta kernel.

  Separable, edge-replicated, radius ceil(3 * max_sigma) as on the host, written as weighted
  sums of shifted slices so that every image can have its own kernel.
  """
  radius = int(math.ceil(3.0 * max(max_sigma, _MAX_BLUR_SIGMA)))
  taps = tf.range(-radius, radius + 1, dtype=tf.float32)
  kernel = tf.exp(-tf.square(taps) / (2.0 * tf.square(sigma[:, tf.newaxis])))
  kernel = kernel / tf.reduce_sum(kernel, axis=-1, keepdims=True)  # [n, 2r + 1]
  delta = tf.one_hot(radius, 2 * radius + 1)
  kernel = blur[:, tf.newaxis] * kernel + (1.0 - blur[:, tf.newaxis]) * delta
  height, width = x.shape[1], x.shape[2]
  for axis, size in ((1, height), (2, width)):
    first = tf.gather(x, [0], axis=axis)
    last = tf.gather(x, [size - 1], axis=axis)
    padded = tf.concat([tf.repeat(first, radius, axis)] + [x] + [tf.repeat(last, radius, axis)],
                       axis)
    begin = [0, 0, 0, 0]
    out = 0.0
    for j in range(2 * radius + 1):
      begin[axis] = j
      shape = [-1, -1, -1, -1]
      shape[axis] = size
      out += _per_image(kernel[:, j]) * tf.slice(padded, begin, shape)
    x = out
  return x


def apply_photometric(images: tf.Tensor, params: dict, spec: Photometric) -> tf.Tensor:
  """A recipe's photometric ops on a batch, each image with its own parameters.

  Per image the same ops as the host recipe (`random_color_jitter` in a random op order,
  `random_grayscale`, `random_blur`), written with static shapes, 1/0 blends instead of
  branches and no data-dependent Python control flow, so they compile under XLA.

  Args:
    images: float32 [n, H, W, 3] in [0, 1], H and W static.
    params: from `draw_photometric`.
    spec: the recipe's `Photometric`.

  Returns:
    float32 [n, H, W, 3] in [0, 1].
  """
  x = tf.convert_to_tensor(images, tf.float32)
  if spec.gray_first and spec.gray_p > 0:
    x = _gray_batch(x, params["gray"])
  x = _jitter_batch(x, params, spec)
  if not spec.gray_first and spec.gray_p > 0:
    x = _gray_batch(x, params["gray"])
  if spec.blur_p > 0:
    x = _blur_batch(x, params["blur"], params["sigma"], spec.blur_sigma[1])
  return x


def device_view_input(images: tf.Tensor, rows: tf.Tensor, *, recipe: str, seed, step,
                      stream: int, num_rows: int) -> tf.Tensor:
  """Finishes uint8 views on the device: the recipe's photometric ops, then `to_model_input`.

  The host sent the crops (`two_views_uint8(..., photometric=False)`); the flip it kept there
  commutes with every photometric op (per pixel, or a symmetric kernel with mirrored edges).

  Args:
    images: uint8 [n, H, W, 3] views.
    rows: [n] int, the views' rows in the global batch (for the keys of shuffle BN: the rows this
      replica encodes), which key the draws.
    recipe: a key of PHOTOMETRIC.
    seed: the run seed. step: the global step (scalar tensor).
    stream: 0 for the query views, 1 for the key views.
    num_rows: the global batch size (static).

  Returns:
    float32 [n, H, W, 3], ImageNet-normalised.
  """
  if images.dtype != tf.uint8:
    raise TypeError(f"--device_augment needs the uint8 views of the input pipeline, got "
                    f"{images.dtype}.")
  spec = PHOTOMETRIC[recipe]
  params = draw_photometric(spec, photometric_key(seed, step, stream), rows, num_rows)
  x = apply_photometric(tf.cast(images, tf.float32) * (1.0 / 255.0), params, spec)
  return (x - tf.constant(IMAGENET_MEAN)) / tf.constant(IMAGENET_STD)
