"""`python -m tfmochi.evaluate --model_dir=RUN --mode=knn|linear [--sidecar]`."""

from tfmochi.evaluate import cli

if __name__ == "__main__":
  cli.run()
