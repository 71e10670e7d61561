"""The training program's traced computations, kept across runs.

Tracing the Per-FedAvg process and its evaluation took 2.6-3 s of the
20-round README command on the digits MLP (TensorFlow's tracing and
AutoGraph, docs/performance.md), and a run of the same command, or its
resume, traces the very same computations again. Here they are written
once (`perfed_tff.accelerator.computation_store`: protos with their Python
containers) and read on the next run, under a key that hashes everything
that shapes them:

* the settings a checkpoint records (`TrainingConfig.resume_metadata`:
  algorithm, dataset and its options, seed, step sizes, steps, batch size,
  optimizers, ...), and for the evaluation its own settings;
* where the task's data come from (`cache_dir`) and what the task declares
  (its batch spec, shuffle buffer, ignored label);
* the source of every module of `perfed_tff` and the TensorFlow and TFF
  versions.

Only a task that `perfed_tff.program.round_data.load_task` made for this
config (`round_data.loaded_for`) is looked up (a task built by a caller may
hold any model): a run given its own `task` or `process` traces as before. The folder is this user's private
cache (`perfed_tff.runtime.user_cache.computations_dir`);
`PERFED_TFF_COMPUTATION_CACHE=off` turns it off. A damaged entry is traced
again and replaced.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Callable, Optional

from absl import logging
import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff import personalization_eval
from perfed_tff.accelerator import computation_store
from perfed_tff.program import round_data
from perfed_tff.runtime import user_cache

_PROCESS_PARTS = ('initialize', 'next', 'get_model_weights',
                  'set_model_weights', 'get_hparams', 'set_hparams')
@functools.cache
def _source_digest() -> str:
  """sha256 of every module of the `perfed_tff` package and the versions."""
  import perfed_tff  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.abspath(perfed_tff.__file__))
  digest = hashlib.sha256()
  for folder, dirs, names in os.walk(root):
    dirs.sort()
    for name in sorted(names):
      if name.endswith(('.py', '.c')):
        path = os.path.join(folder, name)
        digest.update(os.path.relpath(path, root).encode() + b'\0')
        with open(path, 'rb') as f:
          digest.update(f.read())
  digest.update(f'{tf.__version__} {tff.__version__}'.encode())
  return digest.hexdigest()


def key(kind: str, config, task, settings: Optional[dict] = None,
        **extra) -> Optional[str]:
  """The cache key of `kind` for a run of `config` on `task`, or None when
  `task` was not made by `config.load_task(config)`. `settings`: the
  config's settings that shape it (default: all that a checkpoint
  records)."""
  if not round_data.loaded_for(task, config):
    return None
  settings = dict(
      kind=kind,
      settings=config.resume_metadata() if settings is None else settings,
      cache_dir=(None if config.cache_dir is None
                 else os.path.abspath(config.cache_dir)),
      element_spec=repr(task.element_spec),
      shuffle_buffer=task.shuffle_buffer, ignore_label=task.ignore_label,
      source=_source_digest(), **extra)
  text = json.dumps(settings, sort_keys=True, default=repr)
  return hashlib.sha256(text.encode()).hexdigest()


def _path(cache_key: str) -> Optional[str]:
  directory = user_cache.computations_dir('traced')
  return None if directory is None else os.path.join(directory,
                                                     cache_key + '.json')


def _load(cache_key: Optional[str]) -> Optional[dict]:
  """{name: computation} stored under `cache_key`, or None."""
  path = None if cache_key is None else _path(cache_key)
  data = None if path is None else user_cache.read_entry(path)
  if data is None:
    return None
  try:
    header, _, rest = data.partition(b'\n')
    out, start = {}, 0
    for name, size in json.loads(header):
      out[name] = computation_store.loads(rest[start:start + size])
      start += size
  except (ValueError, TypeError) as e:  # Damaged: traced again, replaced.
    logging.info('traced computations at %s not used (%s)', path, e)
    return None
  return out


def _save(cache_key: Optional[str], comps: dict) -> None:
  path = None if cache_key is None else _path(cache_key)
  if path is None:
    return
  try:
    blobs = [(name, computation_store.dumps(c)) for name, c in comps.items()]
  except computation_store.StoreError as e:
    logging.info('traced computations not stored (%s)', e)
    return
  header = json.dumps([[name, len(b)] for name, b in blobs]).encode() + b'\n'
  user_cache.write_entry(path, [header] + [b for _, b in blobs],
                         suffix='.json')


def _learning_process(comps: dict, next_name: str = 'next'):
  return tff.learning.templates.LearningProcess(
      comps['initialize'], comps[next_name], comps['get_model_weights'],
      comps['set_model_weights'], get_hparams_fn=comps['get_hparams'],
      set_hparams_fn=comps['set_hparams'])


def training_processes(config, task,
                       build: Callable[[], tuple]) -> tuple:
  """(process, worker-side process) of the run: `build()` (which returns
  them), or the ones a run with the same key stored."""
  cache_key = key('training_process', config, task)
  stored = _load(cache_key)
  if stored is not None and set(stored) == set(_PROCESS_PARTS) | {
      'worker_next'}:
    process = _learning_process(stored)
    return process, _learning_process(stored, 'worker_next')
  process, on_worker = build()
  if on_worker is not process:
    comps = {name: getattr(process, name) for name in _PROCESS_PARTS}
    comps['worker_next'] = on_worker.next
    _save(cache_key, comps)
  return process, on_worker


def evaluation(config, task, build: Callable[[], object], **settings
               ) -> personalization_eval.PersonalizedEvaluation:
  """The run's `PersonalizedEvaluation` (with the worker-side versions
  `build()` made): `build()`'s, or the one stored by a run with the same
  key. `settings`: the evaluation's own settings (part of the key, with its
  model: dataset, its options, seed; alpha is an argument of the
  computation, so one evaluation serves every alpha)."""
  cache_key = key('evaluation', config, task, settings=dict(
      dataset=config.dataset, dataset_options=dict(config.dataset_options),
      seed=config.seed), **settings)
  stored = _load(cache_key)
  steps = tuple(settings.get('eval_steps', config.eval_steps))
  if stored is not None and 'evaluation' in stored:
    evaluation = personalization_eval.PersonalizedEvaluation(
        stored.pop('evaluation'), steps)
    for name, comp in stored.items():
      evaluation.worker_side[tuple(json.loads(name))] = comp
    return evaluation
  evaluation = build()
  comps = {'evaluation': evaluation.computation}
  comps.update((json.dumps(list(k)), c) for k, c in
               evaluation.worker_side.items())
  _save(cache_key, comps)
  return evaluation
