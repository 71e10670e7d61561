"""Export: the global model as Keras / SavedModel gives the evaluation's
global-model accuracy; a user's personalized model (k steps at alpha) gives
that user's k-step accuracy."""

import numpy as np
import tensorflow as tf

from perfed_tff import algorithms
from perfed_tff import export
from perfed_tff import personalization_eval as evaluation
from perfed_tff.data import synthetic
from perfed_tff.data import task as task_lib
from perfed_tff.program import population_eval

ALPHA, STEPS, BATCH = 0.1, (1, 3), 8


def test_exported_models_reproduce_the_evaluation(tmp_path):
  task = synthetic.load_synthetic(num_users=5, seed=1)
  process = algorithms.build_algorithm(
      'per_fedavg_fo', task.model_fn, alpha=ALPHA, beta=0.1, local_steps=2)
  state = process.initialize()
  for r in (1, 2):
    _, data = task_lib.round_client_data(
        task, clients_per_round=3, num_batches=4, batch_size=BATCH, seed=0,
        round_num=r)
    state = process.next(state, data).state
  weights = process.get_model_weights(state)

  computation = evaluation.build_personalized_evaluation(
      task.model_fn, adaptation_steps=STEPS)
  result = population_eval.evaluate_population(
      computation, weights, task.train, task.test, alpha=ALPHA,
      adapt_batch_size=BATCH, seed=0)

  # (a) The global model as Keras, and as a SavedModel on disk.
  model = export.keras_model(weights, task.keras_model_fn)
  per_client = [export.accuracy(model, task.test.create_tf_dataset_for_client(c))
                for c in result.client_ids]
  np.testing.assert_allclose(per_client, result.accuracy[0], atol=1e-6)
  np.testing.assert_allclose(np.mean(per_client),
                             result.summary()['step_0']['accuracy_mean'],
                             atol=1e-6)
  path = str(tmp_path / 'global_model')
  export.save_keras_model(weights, task.keras_model_fn, path)
  loaded = tf.keras.models.load_model(path, compile=False)
  x = next(iter(task.test.create_tf_dataset_for_client(
      result.client_ids[0]).batch(100)))['x']
  np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-6)

  # (b) A user's personalized model after k steps at alpha.
  gains = np.abs(result.accuracy[3] - result.accuracy[0])
  i = int(np.argmax(gains))
  assert gains[i] > 0.0, 'adaptation changed no accuracy: not a test'
  cid = result.client_ids[i]
  for k in STEPS:
    personal = export.personalized_model_for_client(
        task, weights, cid, alpha=ALPHA, num_steps=k, batch_size=BATCH,
        seed=0)
    np.testing.assert_allclose(
        export.accuracy(personal, task.test.create_tf_dataset_for_client(cid)),
        result.accuracy[k][i], atol=1e-6)
  # The global model was not changed by personalizing a copy.
  np.testing.assert_allclose(
      export.accuracy(model, task.test.create_tf_dataset_for_client(cid)),
      result.accuracy[0][i], atol=1e-6)
