"""tfmochi: MoCo v2 + MoCHi contrastive self-supervised pretraining for TensorFlow 2 / Keras 3.

The package root only carries the version; import the sub-modules you need
(`tfmochi.losses`, `tfmochi.mixing`, `tfmochi.queue`, ...). Nothing is imported eagerly so that
`import tfmochi` is cheap and has no TensorFlow side effects.
"""

__version__ = "0.1.0"
