"""Input specs of the models: what one example looks like."""

import tensorflow as tf


def unbatched_spec(batch_spec):
  """The spec of one example: `batch_spec` (a model's batched `input_spec`)
  without its batch dimension (TFF's `_remove_batch_dim`), same containers."""
  return tf.nest.map_structure(
      lambda s: tf.TensorSpec(s.shape[1:], s.dtype), batch_spec)
