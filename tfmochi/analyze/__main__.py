"""`python -m tfmochi.analyze --model_dir=RUN --output_dir=OUT`.

TensorFlow's C++ start-up logs are hidden; TF_CPP_MIN_LOG_LEVEL=0 shows them.
"""

from tfmochi.analyze import cli

if __name__ == "__main__":
  cli.run()
