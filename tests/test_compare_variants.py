"""Tests of tfmochi.compare.variants: registry and parametric names, variants files, bad names."""

import os

from absl.testing import absltest

from tfmochi.compare import variants as variants_lib


class VariantsTest(absltest.TestCase):

  def test_registry_and_parametric_names(self):
    variants = variants_lib.resolve(variants_lib.split_names(
        "moco_v2, mochi(256,512,0), mochi_128_1024_512, drop_hardest(1), keep_hardest_5, hard"))
    self.assertEqual([v.name for v in variants],
                     ["moco_v2", "mochi_256_512_0", "mochi_128_1024_512", "drop_hardest_1",
                      "keep_hardest_5", "hard"])
    self.assertEqual(variants[1].flags, ("--mochi_num_hard=256", "--mochi_num_mix=512",
                                         "--mochi_num_query_mix=0"))
    self.assertIn("--drop_hardest=1", variants[3].flags)
    self.assertIn("--mochi_num_hard=0", variants[4].flags)  # Cai et al. on MoCo v2
    for name in ("debiased", "oracle", "supcon", "mochi_s_only", "mochi_sprime_only"):
      self.assertEqual(variants_lib.resolve([name])[0].name, name)

  def test_variants_file(self):
    defined, listed = variants_lib.parse_variants_file(
        "# comment\nmine: --loss=hard --tau_plus=0.05  # my hard\nmoco_v2\nmine\n")
    self.assertEqual(listed, ["mine", "moco_v2"])
    self.assertEqual(defined["mine"].flags, ("--loss=hard", "--tau_plus=0.05"))
    self.assertEqual(defined["mine"].about, "my hard")
    self.assertEqual([v.name for v in variants_lib.resolve(["mine", "moco_v2"], defined)],
                     ["mine", "moco_v2"])

  def test_the_shipped_variants_files_resolve(self):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    defined, listed = variants_lib.read_variants_file(
        os.path.join(root, "configs", "compare_digits.variants"))
    variants = {v.name: v for v in variants_lib.resolve(listed, defined)}
    self.assertLen(variants, 15)
    # The papers' shares of K = 256: N = 1.6%, s + s' = 2.3%; Cai et al.'s 0.1% by class share.
    self.assertEqual(variants["mochi_4_4_2"].flags, ("--mochi_num_hard=4", "--mochi_num_mix=4",
                                                     "--mochi_num_query_mix=2"))
    self.assertIn("--drop_hardest=10", variants["drop_hardest_10"].flags)
    self.assertIn("--keep_hardest=10", variants["keep_hardest_10"].flags)
    defined, listed = variants_lib.read_variants_file(
        os.path.join(root, "configs", "compare_in100.variants"))
    self.assertEqual(variants_lib.resolve(listed, defined)[0].name, "moco_v2")

  def test_bad_names(self):
    with self.assertRaisesRegex(variants_lib.VariantError, "Unknown variant 'mocoo'.*Known"):
      variants_lib.resolve(["mocoo"])
    with self.assertRaisesRegex(variants_lib.VariantError, "listed twice"):
      variants_lib.resolve(["hard", "hard"])
    with self.assertRaisesRegex(variants_lib.VariantError, "is not a flag"):
      variants_lib.parse_variants_file("x: loss=hard")


if __name__ == "__main__":
  absltest.main()
