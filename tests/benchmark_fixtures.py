"""What the tests of tfmochi.benchmark share: tiny settings and the checks of one JSON result."""

import json
import os

TINY = dict(dataset="quickstart", arch="resnet18", small_stem=True, image_size=16, batch_size=4,
            queue_size=16, embedding_dim=8, bn_mode="split", bn_splits=2, mask_duplicates=False,
            mochi_num_hard=4, mochi_num_mix=3, mochi_num_query_mix=2)


def check_result(test, result, what, variants):
  test.assertEqual(result["what"], what)
  json.loads(json.dumps(result))  # one JSON line: everything serialisable
  test.assertEqual(sorted(result["variants"]), sorted(variants))
  for name in variants:
    v = result["variants"][name]
    test.assertLen(v["seconds_per_step"], result["timed_steps"])
    for key in ("median_seconds_per_step", "images_per_sec", "peak_rss_mb"):
      test.assertGreater(v[key], 0, f"{name}.{key}")
    test.assertGreaterEqual(v["rss_increase_mb"], 0)
  if "moco" in variants and "mochi" in variants:
    test.assertGreater(result["ratio_mochi_over_moco"], 0)
    test.assertIn("rss_increase_mochi_minus_moco_mb", result)
  test.assertEqual(result["machine"]["cpus"], os.cpu_count())
