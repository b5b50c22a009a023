"""`python -m tfmochi.evaluate --model_dir=RUN --mode=knn|linear [--sidecar]`.

TensorFlow's C++ start-up logs are hidden; TF_CPP_MIN_LOG_LEVEL=0 shows them.
"""

from tfmochi.evaluate import cli

if __name__ == "__main__":
  cli.run()
