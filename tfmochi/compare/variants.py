"""The named variants a comparison sweep trains: each one is a set of training flags over a base.

A variant is `Variant(name, flags, about)`: `flags` are `python -m tfmochi.train` flags applied
after the base flag file (later flags win), so every variant shares every other setting of the
base, including its schedule: nothing is tuned per variant.

Names come from the built-in registry (`REGISTRY`), from parametric names, or from a variants file:

  moco_v2                 MoCo v2: no synthetic negatives (N = s = s' = 0)
  mochi                   MoCHi with the base flag file's own (N, s, s')
  mochi_N_s_s'            MoCHi(N, s, s'), e.g. mochi_256_512_0; also written mochi(256,512,0)
  mochi_s_only            the base's MoCHi without query mixing (s' = 0)
  mochi_sprime_only       the base's MoCHi without hard-negative pairs (s = 0)
  debiased                Chuang et al.'s debiased InfoNCE (tau+ = 0.1), MoCo v2 otherwise
  hard                    Robinson et al.'s hard-negative reweighting (tau+ = 0.1, beta = 1)
  drop_hardest_P          Cai et al.: remove each query's hardest P% of the queue (drop_hardest(1))
  keep_hardest_P          Cai et al.: keep only each query's hardest P% (keep_hardest(5))
  oracle                  remove same-class queue negatives (labels)
  supcon                  same-class queue entries are positives (SupCon, labels)

Every variant but the MoCHi ones is MoCo v2 plus one change, as in the papers that proposed them.

A variants file defines or overrides names, one per line, `#` comments allowed:

  name: --flag=value --flag=value   # what it is
  name                              # a registry name, to list it in the sweep

The names a file defines or lists, in order, are the sweep's variants when `--variants` is not
given.
"""

from __future__ import annotations

import dataclasses
import re
import os
import shlex


class VariantError(ValueError):
  """A variant name or variants file is invalid. The message names it and the fix."""


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  flags: tuple[str, ...]
  about: str = ""


NO_MOCHI = ("--mochi_num_hard=0", "--mochi_num_mix=0", "--mochi_num_query_mix=0")

REGISTRY = {
    "moco_v2": Variant("moco_v2", NO_MOCHI, "MoCo v2 (no synthetic negatives)"),
    "mochi": Variant("mochi", (), "MoCHi, the base flag file's (N, s, s')"),
    "mochi_s_only": Variant("mochi_s_only", ("--mochi_num_query_mix=0",),
                            "MoCHi, hard-negative pairs only (s' = 0)"),
    "mochi_sprime_only": Variant("mochi_sprime_only", ("--mochi_num_mix=0",),
                                 "MoCHi, query mixing only (s = 0)"),
    "debiased": Variant("debiased", NO_MOCHI + ("--loss=debiased", "--tau_plus=0.1"),
                        "debiased InfoNCE (Chuang et al.), tau+ = 0.1"),
    "hard": Variant("hard", NO_MOCHI + ("--loss=hard", "--tau_plus=0.1", "--hard_beta=1.0"),
                    "hard-negative reweighting (Robinson et al.), tau+ = 0.1, beta = 1"),
    "oracle": Variant("oracle", NO_MOCHI + ("--label_mode=oracle",),
                      "class oracle: same-class negatives removed"),
    "supcon": Variant("supcon", NO_MOCHI + ("--label_mode=supcon",),
                      "SupCon: same-class queue entries are positives"),
}

_NUMBER = r"(\d+(?:\.\d+)?)"
_PARAMETRIC = (
    (re.compile(r"mochi[_(](\d+)[_,](\d+)[_,](\d+)\)?"), "mochi"),
    (re.compile(rf"drop_hardest[_(]{_NUMBER}\)?"), "drop_hardest"),
    (re.compile(rf"keep_hardest[_(]{_NUMBER}\)?"), "keep_hardest"),
)
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")


def _parametric(name: str) -> Variant | None:
  """mochi_N_s_s' / mochi(N,s,s'), drop_hardest_P / drop_hardest(P), keep_hardest_P."""
  compact = name.replace(" ", "")
  for pattern, kind in _PARAMETRIC:
    match = pattern.fullmatch(compact)
    if match is None:
      continue
    if kind == "mochi":
      n, s, s_prime = (int(x) for x in match.groups())
      return Variant(f"mochi_{n}_{s}_{s_prime}",
                     (f"--mochi_num_hard={n}", f"--mochi_num_mix={s}",
                      f"--mochi_num_query_mix={s_prime}"), f"MoCHi({n}, {s}, {s_prime})")
    percent = match.group(1)
    what = "remove the hardest" if kind == "drop_hardest" else "keep only the hardest"
    return Variant(f"{kind}_{percent}", NO_MOCHI + (f"--{kind}={percent}",),
                   f"Cai et al.: {what} {percent}% of the queue negatives")
  return None


def parse_variants_file(text: str, path: str = "<variants>") -> tuple[dict[str, Variant],
                                                                       list[str]]:
  """({name: Variant} defined by the file, [names listed, in order]) of a variants file."""
  defined, listed = {}, []
  for number, raw in enumerate(text.splitlines(), 1):
    line, _, comment = raw.partition("#")
    line = line.strip()
    if not line:
      continue
    name, colon, rest = line.partition(":")
    name = name.strip()
    if not _NAME.fullmatch(name):
      raise VariantError(f"{path}:{number}: variant name {name!r} may hold only letters, digits, "
                         "'_', '-' and '.' (it names a directory).")
    if colon:
      flags = tuple(shlex.split(rest))
      bad = [f for f in flags if not f.startswith("--")]
      if bad:
        raise VariantError(f"{path}:{number}: {bad[0]!r} is not a flag; write "
                           "'name: --flag=value --flag=value'.")
      defined[name] = Variant(name, flags, comment.strip())
    if name not in listed:
      listed.append(name)
  return defined, listed


def read_variants_file(path: str) -> tuple[dict[str, Variant], list[str]]:
  """`parse_variants_file` of a local file (the sweep driver does not import TensorFlow)."""
  if not os.path.isfile(path):
    raise VariantError(f"--variants_file {path} does not exist (a local file).")
  with open(path, encoding="utf-8") as f:
    return parse_variants_file(f.read(), path)


def resolve(names: list[str], defined: dict[str, Variant] | None = None) -> list[Variant]:
  """The Variants of `names`: a variants file's definitions first, then the registry.

  Raises:
    VariantError: an unknown name (listing the known ones) or a name given twice.
  """
  defined = defined or {}
  variants, seen = [], set()
  for raw in names:
    name = raw.strip()
    variant = defined.get(name) or REGISTRY.get(name) or _parametric(name)
    if variant is None:
      known = ", ".join(sorted(set(defined) | set(REGISTRY)))
      raise VariantError(
          f"Unknown variant {name!r}. Known: {known}, and the parametric mochi_N_s_s' (or "
          "mochi(N,s,s')), drop_hardest_P, keep_hardest_P; or define it in --variants_file as "
          f"'{name}: --flag=value ...'.")
    if variant.name in seen:
      raise VariantError(f"Variant {variant.name!r} is listed twice.")
    seen.add(variant.name)
    variants.append(variant)
  if not variants:
    raise VariantError("No variants: give --variants=moco_v2,mochi,... or a --variants_file "
                       "that lists some.")
  return variants


def split_names(text: str) -> list[str]:
  """'moco_v2,mochi(256,512,0),hard' -> ['moco_v2', 'mochi(256,512,0)', 'hard'] (commas inside
  parentheses belong to the name)."""
  names, depth, current = [], 0, ""
  for char in text:
    if char == "," and depth == 0:
      names.append(current)
      current = ""
      continue
    depth += (char == "(") - (char == ")")
    current += char
  names.append(current)
  return [n.strip() for n in names if n.strip()]
