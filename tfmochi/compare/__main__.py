"""`python -m tfmochi.compare`."""

from tfmochi.compare import cli

if __name__ == "__main__":
  cli.run()
