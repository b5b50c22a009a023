"""Tests of tfmochi.benchmark.opprofile (TensorFlow's profiler per op type; never about speed)."""

import tensorflow as tf

from tfmochi.benchmark import opprofile


def _row(op_type, self_us, name="x"):
  return {"type": op_type, "operation": name, "occurrences": 1.0, "total_self_time": self_us}


class SummarizeRowsTest(tf.test.TestCase):

  def test_per_call_times_shares_of_busy_time_and_the_rest(self):
    rows = [_row("MatMul", 6000.0, "a"), _row("MatMul", 2000.0, "b"), _row("Conv2D", 1000.0),
            _row("Relu", 600.0), _row("AddV2", 400.0), _row("IDLE", 3000.0)]
    got = opprofile.summarize_rows(rows, calls=2, top=2)
    # Per call: MatMul 4 ms, Conv2D 0.5 ms, the rest 0.5 ms; busy 5 ms, idle 1.5 ms.
    self.assertEqual(got["calls"], 2)
    self.assertAllClose([got["busy_thread_ms_per_call"], got["idle_thread_ms_per_call"]],
                        [5.0, 1.5])
    self.assertEqual([t["type"] for t in got["op_types"]], ["MatMul", "Conv2D", "other"])
    self.assertAllClose([t["ms_per_call"] for t in got["op_types"]], [4.0, 0.5, 0.5])
    self.assertAllClose([t["share"] for t in got["op_types"]], [0.8, 0.1, 0.1])


class ProfileOpTypesTest(tf.test.TestCase):

  def test_a_traced_function_s_ops_are_found(self):
    x = tf.random.stateless_normal([64, 64], [1, 2])

    @tf.function
    def fn():
      return tf.nn.relu(tf.matmul(x, x))

    fn()
    try:
      got = opprofile.profile_op_types(fn, calls=2, top=50)
    except opprofile.OpProfileUnavailable as e:
      self.skipTest(str(e))
    types = [t["type"] for t in got["op_types"]]
    self.assertTrue(any("MatMul" in t for t in types), types)  # oneDNN builds say _MklMatMul
    self.assertTrue(any("Relu" in t for t in types), types)
    self.assertAllClose(sum(t["share"] for t in got["op_types"]), 1.0, atol=1e-3)

  def test_calls_must_be_positive(self):
    with self.assertRaisesRegex(ValueError, "calls must be >= 1"):
      opprofile.profile_op_types(lambda: tf.constant(1.0), calls=0)


if __name__ == "__main__":
  tf.test.main()
