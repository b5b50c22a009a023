"""`python -m tfmochi.analyze --model_dir=RUN --output_dir=OUT`."""

from tfmochi.analyze import cli

if __name__ == "__main__":
  cli.run()
