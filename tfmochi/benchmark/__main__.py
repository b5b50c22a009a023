"""`python -m tfmochi.benchmark --what=step|head|input`."""

from absl import app

from tfmochi.benchmark import cli

if __name__ == "__main__":
  cli.define_flags()
  app.run(cli.main)
