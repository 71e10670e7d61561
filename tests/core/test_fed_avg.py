"""`perfed_tff.fed_avg.build_fed_avg` is TFF's `build_weighted_fed_avg`
(DATASET_ITERATOR loop), with the library's argument rules."""

import numpy as np
import pytest
import tensorflow_federated as tff

from perfed_tff import algorithms
from perfed_tff import fed_avg
from tests import tff_helpers as h


def _clients(seed):
  return [h.dataset(*h.random_client(seed + i, n), 4)
          for i, n in enumerate((10, 7))]


def test_it_is_tffs_weighted_fed_avg_bit_for_bit():
  mine = fed_avg.build_fed_avg(h.MODEL_FN, beta=0.3,
                               client_weighting='num_examples')
  tffs = tff.learning.algorithms.build_weighted_fed_avg(
      h.MODEL_FN,
      client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.3),
      server_optimizer_fn=tff.learning.optimizers.build_sgdm(1.0),
      client_weighting=tff.learning.ClientWeighting.NUM_EXAMPLES,
      loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR)
  assert str(mine.next.type_signature) == str(tffs.next.type_signature)
  states = [mine.initialize(), tffs.initialize()]
  for r in range(2):
    outputs = [p.next(s, _clients(10 * r)) for p, s in zip((mine, tffs),
                                                           states)]
    states = [o.state for o in outputs]
    for a, b in zip(h.trainable(mine, states[0]), h.trainable(tffs, states[1])):
      np.testing.assert_array_equal(a, b)
    assert (outputs[0].metrics['client_work']['train']['loss']
            == outputs[1].metrics['client_work']['train']['loss'])
  assert mine.get_hparams(states[0])['client_work']['learning_rate'] == (
      np.float32(0.3))


def test_its_arguments_follow_the_one_rule():
  with pytest.raises(ValueError, match='beta'):
    fed_avg.build_fed_avg(h.MODEL_FN)
  with pytest.raises(ValueError, match='beta'):
    fed_avg.build_fed_avg(
        h.MODEL_FN, beta=0.1,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(0.1))
  with pytest.raises(TypeError, match='sums the client updates'):
    fed_avg.build_fed_avg(h.MODEL_FN, beta=0.1,
                          model_aggregator=tff.aggregators.SumFactory())
  with pytest.raises(TypeError, match='model_distributor'):
    fed_avg.build_fed_avg(h.MODEL_FN, beta=0.1, model_distributor=object())


def test_build_algorithm_builds_it_for_fedavg():
  process = algorithms.build_algorithm('fedavg', h.MODEL_FN, alpha=0.1,
                                       beta=0.3, local_steps=2)
  assert str(process.next.type_signature) == str(
      fed_avg.build_fed_avg(h.MODEL_FN, beta=0.3).next.type_signature)
  with pytest.raises(ValueError, match='alpha'):
    algorithms.build_algorithm('fedavg', h.MODEL_FN, alpha=0.0, beta=0.3,
                               local_steps=2)
