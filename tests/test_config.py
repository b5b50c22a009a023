"""Tests of tfmochi.config: defaults, flags round trip, validation messages, the shipped flagfiles."""

import dataclasses
import glob
import json
import os
import subprocess
import sys

from absl import flags
from absl.testing import parameterized
import tensorflow as tf

from tfmochi import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(argv):
  fv = flags.FlagValues()
  config_lib.define_flags(fv)
  fv(["prog"] + argv)
  return config_lib.from_flags(fv)


class ConfigTest(tf.test.TestCase, parameterized.TestCase):

  def test_defaults_are_the_offline_digits_run(self):
    cfg = config_lib.TrainConfig().validate()
    self.assertEqual(cfg.dataset, "quickstart")
    self.assertEqual(_parse([]), cfg)
    # configs/digits.flags says its values are the defaults: keep the two identical.
    self.assertEqual(_parse([f"--flagfile={ROOT}/configs/digits.flags"]), cfg)

  def test_every_issue_flag_exists_with_help(self):
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    for name in ("dataset data_dir model_dir arch image_size batch_size epochs train_steps "
                 "learning_rate weight_decay queue_size moco_momentum temperature embedding_dim "
                 "mlp_head loss tau_plus hard_beta drop_hardest keep_hardest mochi_num_hard "
                 "mochi_num_mix mochi_num_query_mix mochi_beta_max mochi_warmup_epochs bn_mode "
                 "strategy tpu cpu_replicas mixed_precision seed deterministic "
                 "knn_every_epochs knn_k knn_train_per_class knn_test_per_class label_mode "
                 "labeled_fraction jit_compile fast_grad mochi_topn mochi_topn_recall").split():
      self.assertIn(name, fv)
      self.assertTrue(fv[name].help, name)

  def test_flagfiles_parse(self):
    cwd = os.getcwd()
    os.chdir(ROOT)  # nested --flagfile paths are relative to the repository root
    self.addCleanup(os.chdir, cwd)
    files = sorted(glob.glob(os.path.join(ROOT, "configs", "*.flags")))
    self.assertGreaterEqual(len(files), 4)
    for path in files:
      with open(path) as f:
        self.assertTrue(f.readline().startswith("#"), path)  # each starts with its comment
      fv = flags.FlagValues()
      config_lib.define_flags(fv)
      fv(["prog", f"--flagfile={path}"] + (["--tpu=x"] if path.endswith("tpu.flags") else []))
      config_lib.from_flags(fv)
    mochi = _parse([f"--flagfile={ROOT}/configs/mochi.flags"])
    self.assertEqual((mochi.mochi_num_hard, mochi.mochi_num_mix, mochi.mochi_num_query_mix),
                     (1024, 1024, 512))
    self.assertEqual((mochi.batch_size, mochi.queue_size, mochi.mochi_warmup_epochs),
                     (512, 65536, 15))
    in100 = _parse([f"--flagfile={ROOT}/configs/mochi_in100.flags"])
    self.assertEqual((in100.dataset, in100.batch_size, in100.queue_size,
                      in100.mochi_warmup_epochs), ("imagenet100", 128, 16384, 10))
    moco = _parse([f"--flagfile={ROOT}/configs/moco_v2.flags"])
    self.assertEqual(moco.mochi_num_hard, 0)
    # configs/tpu.flags is mochi.flags on a TPU VM: the same recipe, TPU runtime settings on top.
    tpu = _parse([f"--flagfile={ROOT}/configs/tpu.flags"])
    self.assertEqual((tpu.strategy, tpu.tpu, tpu.mixed_precision, tpu.dataset),
                     ("tpu", "local", "bfloat16", "tfrecord"))
    self.assertEqual((tpu.mochi_num_hard, tpu.batch_size, tpu.queue_size, tpu.epochs),
                     (1024, 512, 65536, 200))
    # The ImageNet recipes are MoCo v2's, not the quickstart's (affine views, no flip, head BN).
    for cfg in (mochi, in100, moco, tpu):
      self.assertEqual((cfg.crop_min_scale, cfg.hflip, cfg.head_bn, cfg.learning_rate),
                       (0.2, True, False, 0.03))

  @parameterized.parameters(
      (["--queue_size=100", "--batch_size=64"], r"--queue_size \(K\) must be a multiple"),
      (["--mochi_num_hard=5000", "--queue_size=4096"], r"--mochi_num_hard \(N\) must be in"),
      (["--mochi_beta_max=0.7", "--mochi_num_hard=8", "--mochi_num_mix=2"],
       r"--mochi_beta_max .*\(0, 0.5\]"),
      (["--temperature=0"], r"--temperature \(T\)"),
      (["--tau_plus=1"], r"--tau_plus"),
      (["--drop_hardest=120"], r"--drop_hardest .*\(0, 100\)"),
      (["--arch=vgg"], "--arch must be one of resnet18, resnet34, resnet50"),
      (["--strategy=tpu"], "--strategy=tpu needs --tpu"),
      (["--cpu_replicas=2"], "--cpu_replicas > 1 .* --strategy=mirrored"),
      (["--bn_splits=3"], "divisible by --bn_splits"),
      (["--label_mode=oracle", "--labeled_fraction=0"], "no labels"),
      (["--drop_hardest=5", "--keep_hardest=5"], "exclusive"),
      (["--moco_momentum=1.5"], r"--moco_momentum \(m\)"),
      (["--jit_compile=yes"], "--jit_compile must be one of auto, true, false"),
      (["--fast_grad=on"], "--fast_grad must be one of auto, true, false"),
      (["--strategy=tpu", "--tpu=local", "--jit_compile=false"], "a TPU compiles every step"),
      (["--mochi_topn=fast"], "--mochi_topn must be one of exact, approx"),
      (["--mochi_topn_recall=0", "--mochi_num_hard=8", "--mochi_num_mix=2"],
       r"--mochi_topn_recall must be in \(0, 1\]"),
  )
  def test_invalid_values_name_the_flag(self, argv, pattern):
    with self.assertRaisesRegex(config_lib.ConfigError, pattern):
      _parse(argv)

  def test_every_field_of_the_tree_is_a_flag_with_its_alias(self):
    """Each field of MoCoConfig/ObjectiveConfig/MochiConfig is a flag named by its path, and its
    old flag name is an alias that sets the same value."""
    fv = flags.FlagValues()
    config_lib.define_flags(fv)
    for cls in (config_lib.MoCoConfig, config_lib.ObjectiveConfig, config_lib.MochiConfig):
      for field in dataclasses.fields(cls):
        if field.metadata.get("run") or field.type in ("ObjectiveConfig", "MochiConfig"):
          continue
        self.assertIn(cls.PATH + field.name, fv)
        self.assertTrue(fv[cls.PATH + field.name].help, field.name)
        self.assertIn(field.metadata["aliases"][0], fv, field.name)
    by_alias = _parse(["--mochi_num_hard=8", "--moco_t=0.3", "--nomask_duplicates"])
    by_path = _parse(["--moco.objective.mochi.num_hard=8", "--moco.objective.temperature=0.3",
                      "--nomoco.objective.mask_duplicates"])
    self.assertEqual(by_alias, by_path)
    self.assertEqual((by_path.moco.objective.mochi.num_hard, by_path.mochi_num_hard), (8, 8))

  def test_the_library_takes_the_branches_of_the_tree(self):
    from tfmochi import mixing, moco, objective  # pylint: disable=g-import-not-at-top
    self.assertIs(moco.MoCoConfig, config_lib.MoCoConfig)
    self.assertIs(objective.ObjectiveConfig, config_lib.ObjectiveConfig)
    self.assertIs(mixing.MochiConfig, config_lib.MochiConfig)
    cfg = config_lib.TrainConfig(temperature=0.3, mochi_num_hard=16)
    self.assertEqual(cfg, config_lib.TrainConfig(**{"moco.objective.temperature": 0.3,
                                                    "moco.objective.mochi.num_hard": 16}))
    self.assertEqual(cfg.moco.objective.mochi.num_hard, 16)
    with self.assertRaisesRegex(TypeError, "unknown setting 'tempreature'"):
      config_lib.TrainConfig(tempreature=0.3)

  def test_a_library_config_checks_itself_when_built(self):
    with self.assertRaisesRegex(config_lib.ConfigError, r"^--temperature \(T\) must be"):
      config_lib.ObjectiveConfig(temperature=0.0)
    with self.assertRaisesRegex(ValueError, r"^--mochi_num_hard \(N\) must be in \[0, K\]"):
      config_lib.MoCoConfig(queue_size=24, objective=config_lib.ObjectiveConfig(
          mochi=config_lib.MochiConfig(30, 1, 1)))

  def test_from_flag_to_the_loss(self):
    cfg = _parse(["--temperature=0.3"])
    self.assertEqual(cfg.moco.objective.temperature, 0.3)
    run = cfg.moco_for_run(10, 100)
    self.assertEqual((run.objective.temperature, run.total_steps, run.mochi_warmup_steps,
                      run.seed), (0.3, 100, 20, 0))
    self.assertIs(run.objective, cfg.moco.objective)  # the same object, not a copy

  def test_help_and_flag_errors_load_no_tensorflow(self):
    # --help and a bad flag value answer before TensorFlow loads (it takes seconds).
    code = ("import sys\n"
            "from tfmochi import train\n"
            "try:\n  train.run()\nexcept SystemExit:\n  pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))")
    env = dict(os.environ, PYTHONPATH=ROOT)
    for argv, message in ((["--help"], ""), (["--temperature=0"], "--temperature (T) must be"),
                          (["--queue_size=abc"], "queue_size=abc")):
      out = subprocess.run([sys.executable, "-c", code] + argv, cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120, check=False)
      self.assertEqual(out.stdout.strip().splitlines()[-1], "[]", (argv, out.stderr))
      self.assertIn(message, out.stderr)

  def test_json_round_trip(self):
    cfg = config_lib.TrainConfig(mochi_num_hard=16, mochi_num_mix=8)
    again = config_lib.TrainConfig.from_dict(__import__("json").loads(cfg.to_json()))
    self.assertEqual(cfg, again)

  def test_config_json_in_the_tree_layout_loads_too(self):
    cfg = config_lib.TrainConfig(temperature=0.3, mochi_num_hard=16, mochi_num_mix=8)
    nested = dataclasses.asdict(cfg)  # {"moco": {"objective": {"mochi": {...}}}, ...}
    self.assertEqual(config_lib.TrainConfig.from_dict(json.loads(json.dumps(nested))), cfg)

  def test_config_json_of_older_runs_keeps_their_meaning(self):
    # A run written before --head_bn/--hflip/--tf32 existed had a plain MLP head, flips and
    # TensorFloat-32: it must rebuild that model (its checkpoint has no head BN), not today's
    # quickstart defaults.
    values = __import__("json").loads(config_lib.TrainConfig().to_json())
    del values["head_bn"], values["hflip"], values["tf32"]
    self.assertEqual(values["temperature"], 0.2)  # config.json keeps its flat layout
    old = config_lib.TrainConfig.from_dict(values)
    self.assertEqual((old.head_bn, old.hflip, old.tf32), (False, True, True))
    self.assertEqual((config_lib.TrainConfig().head_bn, config_lib.TrainConfig().hflip),
                     (True, False))

  def test_held_out_split_is_fixed_across_run_seeds(self):
    # New runs: one held-out split for every --seed, so seeds measure training, not the split.
    for seed in (0, 1, 7):
      self.assertEqual(config_lib.TrainConfig(seed=seed).held_out_seed, 0)
    self.assertEqual(config_lib.TrainConfig(seed=3, split_seed=5).held_out_seed, 5)
    self.assertEqual(config_lib.TrainConfig(seed=3, split_seed=-1).held_out_seed, 3)
    # Runs written before --split_seed drew their split with --seed: they keep it.
    values = __import__("json").loads(config_lib.TrainConfig(seed=4).to_json())
    del values["split_seed"]
    self.assertEqual(config_lib.TrainConfig.from_dict(values).held_out_seed, 4)
    with self.assertRaisesRegex(config_lib.ConfigError, "--split_seed must be >= -1"):
      config_lib.TrainConfig(split_seed=-2).validate()


if __name__ == "__main__":
  tf.test.main()
