"""Loads a tfmochi `torchvision` export into a torchvision ResNet, without TensorFlow.

  python export/load_torchvision.py runs/x/export/torchvision [--save resnet.pth]

PATH is the export directory (uses backbone.safetensors if the `safetensors` package is
installed, else backbone.npz) or one of those files. The architecture and stem are read from
export_info.json next to it (or --arch / --small_stem). Needs only numpy; with torch and
torchvision installed it builds `torchvision.models.<arch>()`, loads the weights (only `fc.*`
may be missing) and can `torch.save` the state dict; without torch it checks and lists the
tensors and prints how to install torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

NPZ_FILE = "backbone.npz"
SAFETENSORS_FILE = "backbone.safetensors"


def read_state(path: str) -> tuple[dict[str, np.ndarray], str]:
  """{torchvision key: numpy array} from an export dir or file, and the file it read."""
  if os.path.isdir(path):
    candidates = [os.path.join(path, SAFETENSORS_FILE), os.path.join(path, NPZ_FILE)]
    try:
      import safetensors.numpy  # noqa: F401  # pylint: disable=g-import-not-at-top
    except ImportError:
      candidates = candidates[1:]
    existing = [p for p in candidates if os.path.exists(p)]
    if not existing:
      raise FileNotFoundError(f"{path} has no {NPZ_FILE}; is it a tfmochi torchvision export?")
    path = existing[0]
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return dict(load_file(path)), path
  with np.load(path) as npz:
    return {key: npz[key] for key in npz.files}, path


def read_info(path: str) -> dict:
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  info_path = os.path.join(directory, "export_info.json")
  if not os.path.exists(info_path):
    return {}
  with open(info_path) as f:
    return json.load(f)


def torchvision_model(state: dict[str, np.ndarray], arch: str, small_stem: bool):
  """A torchvision ResNet with the exported weights (`fc` keeps its random init)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top

  model = getattr(torchvision.models, arch)()
  if small_stem:
    # The CIFAR stem of the MoCo CIFAR demo: 3x3 stride-1 conv1, no max-pool.
    model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = torch.nn.Identity()
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in state.items()}
  missing, unexpected = model.load_state_dict(tensors, strict=False)
  if unexpected or any(not k.startswith("fc.") for k in missing):
    raise ValueError(f"Weights do not fit torchvision {arch}: missing {missing}, "
                     f"unexpected {unexpected}.")
  return model


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("path", help="the torchvision export directory, or its .npz/.safetensors")
  parser.add_argument("--arch", help="resnet18/34/50 (default: from export_info.json)")
  parser.add_argument("--small_stem", action="store_true", default=None,
                      help="CIFAR stem (default: from export_info.json)")
  parser.add_argument("--save", help="write the torch state dict to this .pth file")
  args = parser.parse_args(argv)

  state, source = read_state(args.path)
  info = read_info(source)
  arch = args.arch or info.get("arch")
  small_stem = bool(args.small_stem if args.small_stem is not None else info.get("small_stem"))
  if arch is None:
    print("error: unknown architecture; pass --arch (no export_info.json found).",
          file=sys.stderr)
    return 2
  print(f"Read {len(state)} tensors ({arch}, small_stem={small_stem}) from {source}")
  try:
    import torch  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
    import torchvision  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    print("torch/torchvision are not installed: `pip install torch torchvision` to load the "
          "weights into torchvision.models." + arch + "(); the numpy arrays above are ready.")
    return 0
  model = torchvision_model(state, arch, small_stem)
  print(f"Loaded them into torchvision.models.{arch}() (fc.* keeps its initialisation).")
  if args.save:
    torch.save(model.state_dict(), args.save)
    print(f"Wrote {args.save}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
