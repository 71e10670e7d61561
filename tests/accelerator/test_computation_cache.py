"""Computations kept across runs: `perfed_tff.accelerator.computation_cache`
(traced), `perfed_tff.accelerator.compiled_cache` (compiled) and
`perfed_tff.accelerator.computation_store` (their bytes). A second run with the
same settings traces and compiles nothing and computes the same; other
settings, a caller's own task and damaged entries trace again."""

import collections
import csv
import os

import numpy as np
import pytest
import tensorflow_federated as tff

from perfed_tff import personalization_eval
from perfed_tff.accelerator import compilation
from perfed_tff.accelerator import compiled_cache
from perfed_tff.accelerator import computation_store
from perfed_tff.program import metrics as metrics_lib
from perfed_tff.program import processes
from perfed_tff.program import round_data
from perfed_tff.program import training_loop as tp
from perfed_tff.runtime import user_cache
from tests import tff_helpers as h


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
  path = tmp_path / 'cache'
  monkeypatch.setenv(user_cache.COMPUTATIONS_ENV, str(path))
  return path


@pytest.fixture
def builds(monkeypatch):
  """How often the training process and the evaluation were traced."""
  counts = collections.Counter()
  build_process = processes.build_process
  build_evaluation = personalization_eval.build_personalized_evaluation

  def process_spy(*args, **kwargs):
    counts['process'] += 1
    return build_process(*args, **kwargs)

  def evaluation_spy(*args, **kwargs):
    counts['evaluation'] += 1
    return build_evaluation(*args, **kwargs)

  monkeypatch.setattr(processes, 'build_process', process_spy)
  monkeypatch.setattr(personalization_eval, 'build_personalized_evaluation',
                      evaluation_spy)
  return counts


KW = dict(rounds=3, eval_every=3, eval_clients=3)


def _run(root, **overrides):
  config = h.training_config(root, **dict(KW, **overrides))
  return tp.run_training(config, task=round_data.load_task(config))


def _rows(path):
  with open(path, newline='') as f:
    return [{k: v for k, v in r.items() if 'time' not in k}
            for r in csv.DictReader(f)]


def _same_results(a, b):
  wa = metrics_lib.load_model_weights(a.paths['final_model'])
  wb = metrics_lib.load_model_weights(b.paths['final_model'])
  assert sorted(wa) == sorted(wb)
  for name in wa:
    np.testing.assert_array_equal(wa[name], wb[name])
  for key in ('train_csv', 'eval_csv'):
    assert _rows(a.paths[key]) == _rows(b.paths[key])


def test_a_second_run_traces_nothing_and_computes_the_same(
    tmp_path, cache_dir, builds):
  first = _run(tmp_path / 'a')
  assert builds == {'process': 1, 'evaluation': 1}
  assert len(os.listdir(cache_dir / 'traced')) == 2
  assert os.listdir(cache_dir / 'compiled')
  second = _run(tmp_path / 'b')
  assert builds == {'process': 1, 'evaluation': 1}
  _same_results(first, second)
  # The same with the caches off: traced and compiled again, same results.
  os.environ[user_cache.COMPUTATIONS_ENV] = 'off'
  third = _run(tmp_path / 'c')
  assert builds == {'process': 2, 'evaluation': 2}
  _same_results(first, third)


def test_other_settings_and_a_callers_task_trace_again(
    tmp_path, cache_dir, builds, small_task):
  _run(tmp_path / 'a')
  _run(tmp_path / 'b', beta=0.1)            # Another process, same evaluation.
  assert builds == {'process': 2, 'evaluation': 1}
  _run(tmp_path / 'c', eval_steps=(1, 2))   # Another evaluation.
  assert builds == {'process': 2, 'evaluation': 2}
  # alpha is an argument of the evaluation: one traced evaluation serves it.
  _run(tmp_path / 'f', alpha=0.03)
  assert builds == {'process': 3, 'evaluation': 2}
  # A task the caller made is never looked up, nor stored.
  entries = sorted(os.listdir(cache_dir / 'traced'))
  config = h.training_config(tmp_path / 'd', **KW)
  tp.run_training(config, task=small_task)
  tp.run_training(h.training_config(tmp_path / 'e', **KW), task=small_task)
  assert builds == {'process': 5, 'evaluation': 4}
  assert sorted(os.listdir(cache_dir / 'traced')) == entries
  assert not round_data.loaded_for(small_task, config)


def test_a_damaged_entry_is_traced_again_and_replaced(
    tmp_path, cache_dir, builds):
  first = _run(tmp_path / 'a')
  for name in os.listdir(cache_dir / 'traced'):
    path = cache_dir / 'traced' / name
    path.write_bytes(path.read_bytes()[:1000])
  second = _run(tmp_path / 'b')
  assert builds == {'process': 2, 'evaluation': 2}
  _same_results(first, second)
  third = _run(tmp_path / 'c')
  assert builds == {'process': 2, 'evaluation': 2}
  _same_results(first, third)


def test_stored_computations_keep_their_python_containers(small_task):
  config = h.training_config('/unused')
  process = processes.build_process(config, small_task)
  for comp in (process.initialize, process.next, process.get_model_weights,
               process.set_hparams):
    again = computation_store.loads(computation_store.dumps(comp))
    assert again.type_signature == comp.type_signature
    assert repr(again.type_signature) == repr(comp.type_signature)
  rebuilt = tff.learning.templates.LearningProcess(
      *(computation_store.loads(computation_store.dumps(getattr(process, n)))
        for n in ('initialize', 'next', 'get_model_weights',
                  'set_model_weights')),
      get_hparams_fn=process.get_hparams, set_hparams_fn=process.set_hparams)
  state = rebuilt.initialize()
  assert type(state) is type(process.initialize())
  assert type(rebuilt.get_model_weights(state)) is tff.learning.models.ModelWeights
  with pytest.raises(computation_store.StoreError, match='not a stored'):
    computation_store.loads(b'nothing')
  with pytest.raises(computation_store.StoreError, match='damaged'):
    computation_store.loads(computation_store.dumps(process.next)[:200])


def test_compiled_cache_compiles_once_and_recovers_from_damage(
    cache_dir, small_task):
  process = processes.build_process(h.training_config('/unused'), small_task)
  calls = []

  def compiler(comp):
    calls.append(comp)
    return compilation.compiler_fn('tff', local_worker=True)(comp)

  first = compiled_cache.compile_cached(process.next, compiler, 'tff')
  again = compiled_cache.compile_cached(process.next, compiler, 'tff')
  assert len(calls) == 1
  proto = lambda c: c.to_building_block().proto.SerializeToString(
      deterministic=True)
  assert proto(again) == proto(first)
  # Another compiler setting is another entry.
  compiled_cache.compile_cached(process.next, compiler, 'runtime')
  assert len(calls) == 2
  for name in os.listdir(cache_dir / 'compiled'):
    (cache_dir / 'compiled' / name).write_bytes(b'\x00damaged')
  compiled_cache.compile_cached(process.next, compiler, 'tff')
  assert len(calls) == 3
  compiled_cache.compile_cached(process.next, compiler, 'tff')
  assert len(calls) == 3


def test_a_cache_folder_others_can_write_is_not_used(tmp_path, monkeypatch):
  shared = tmp_path / 'shared'
  (shared / 'compiled').mkdir(parents=True)
  os.chmod(shared / 'compiled', 0o777)
  monkeypatch.setenv(user_cache.COMPUTATIONS_ENV, str(shared))
  assert user_cache.computations_dir('compiled') is None
  monkeypatch.setenv(user_cache.COMPUTATIONS_ENV, 'off')
  assert user_cache.computations_dir('traced') is None
