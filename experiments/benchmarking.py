"""Round-time benchmark: TFF FedAvg vs Per-FedAvg (FO, HF, MAML) vs a pure-TF floor.

Every round, one cohort of clients is sampled and each contender runs one round
on *the same batches* of those clients (each client's batch stream is a pure
function of (seed, round, client); FedAvg consumes the first tau batches of it,
Per-FedAvg FO the first 2 tau, HF and MAML 3 tau). Contenders are interleaved
round by round (their order rotates), so machine noise hits all of them alike,
and the median over the rounds after warm-up is reported.

Contenders:
* `fedavg`: the project's baseline, TFF's
  `tff.learning.algorithms.build_weighted_fed_avg` with client SGD at beta for
  tau steps (`perfed_tff.algorithms`; TFF's DATASET_ITERATOR client loop).
* `fedavg_reduce`: the same with TFF's default DATASET_REDUCE client loop
  (slower on CPU; reported for reference).
* `per_fedavg_{fo,hf,maml}`: `perfed_tff.build_per_fedavg`, same tau, batch,
  on the task's model as a FunctionalModel (as the training program runs it).
* TFF contenders get their clients' data the way the training program
  does (`tff_client_data='worker'`, the default): each client's examples and
  seed, with the batch stream built on the worker
  (`perfed_tff.data.worker_datasets`); 'datasets' sends one serialized
  `tf.data.Dataset` per client instead (TFF's plain interface).
* `torch_{fedavg,fo,hf,maml}`: the PyTorch peer (`experiments.torch_peer`):
  the same round in plain eager PyTorch (CPU, one thread), from the same
  initial weights on the same batches (handed over as numpy arrays made
  before its round is timed); skipped with a message without torch.
* `floor_{fo,hf,maml}`: a plain `tf.function` with no TFF at all that runs
  `perfed_tff.per_fedavg_client_work.build_client_update` -- the very client loop of the
  TFF process, on the same `VariableModel` -- for each client of the cohort,
  at most `max_concurrent_computation_calls` clients at a time (as the TFF
  worker is configured), then averages the client models exactly like the
  process (uniform mean of the updates w - w_i, applied at learning rate 1).
  `floor_fedavg` is the same for plain local SGD (tau steps at beta).

Reported per contender: `build_s` (Python tracing and TFF computation
construction), `first_round_s` (includes TFF compilation and the C++ worker's
graph set-up; for a floor, its `tf.function` tracing), `compile_s` (first
round minus the median), `median_round_s` over the measured rounds, and the
ratios Per-FedAvg / FedAvg, TFF / pure-TF floor and TFF (and floor) /
PyTorch peer, each the median over rounds of the per-round ratio (both
measured in the same round). With
`empty_rounds`, also `empty_round_s`: the median round when every client's
data are empty (the fixed cost of a round: broadcast, per-client set-up,
transfers, aggregation, server update), and `compute_ratios`: TFF / floor
with that fixed cost subtracted on both sides (the client computation alone).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import statistics
import time
from typing import Callable, Optional, Sequence

import numpy as np
import psutil
import tensorflow as tf
import tensorflow_federated as tff

from perfed_tff import algorithms as algorithms_lib
from perfed_tff import per_fedavg_client_work as client_work_lib
from perfed_tff.runtime import compilation as compilation_lib
from perfed_tff.data import task as task_lib
from perfed_tff.data import worker_datasets

from experiments import torch_peer

TASKS = ('emnist_cnn', 'emnist_mlp', 'digits_mlp', 'synthetic',
         'shakespeare_lstm')
FLOORS = ('floor_fedavg', 'floor_fo', 'floor_hf', 'floor_maml')
# The PyTorch peer (`experiments.torch_peer`; skipped without torch).
PEERS = ('torch_fedavg', 'torch_fo', 'torch_hf', 'torch_maml')
# `fedavg` is the project's baseline (`algorithms.build_algorithm`: TFF's
# build_weighted_fed_avg with the DATASET_ITERATOR client loop);
# `fedavg_reduce` is the same with TFF's default DATASET_REDUCE loop.
CONTENDERS = algorithms_lib.ALGORITHMS + ('fedavg_reduce',) + FLOORS + PEERS
# The floor and the PyTorch peer of each TFF contender.
FLOOR_OF = {'fedavg': 'floor_fedavg', 'fedavg_reduce': 'floor_fedavg',
            'per_fedavg_fo': 'floor_fo',
            'per_fedavg_hf': 'floor_hf', 'per_fedavg_maml': 'floor_maml'}
PEER_OF = {'fedavg': 'torch_fedavg', 'per_fedavg_fo': 'torch_fo',
           'per_fedavg_hf': 'torch_hf', 'per_fedavg_maml': 'torch_maml'}


# ----------------------------------------------------------------------------
# Tasks: client arrays + model.


@dataclasses.dataclass
class BenchmarkTask:
  """Clients' unbatched arrays and the model to train on them."""
  name: str
  data_note: str
  clients: 'collections.OrderedDict[str, tuple[np.ndarray, np.ndarray]]'
  model_fn: Callable[[], tff.learning.models.VariableModel]
  element_spec: collections.OrderedDict   # spec of one batch
  # The same model as a FunctionalModel (Per-FedAvg's, as in the program).
  functional_model: Optional[
      Callable[[], tff.learning.models.FunctionalModel]] = None


def _synthetic_emnist_clients(num_clients, examples_per_client, seed):
  rng = np.random.default_rng(seed)
  clients = collections.OrderedDict()
  for k in range(num_clients):
    x = rng.random((examples_per_client, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 62, examples_per_client).astype(np.int32)
    clients[f'client_{k:04d}'] = (x, y)
  return clients


def _client_arrays(client_data, client_ids):
  """Unbatched examples of each client as numpy arrays."""
  out = collections.OrderedDict()
  for cid in client_ids:
    ds = client_data.create_tf_dataset_for_client(cid)
    batch = next(iter(ds.batch(1_000_000)))
    out[cid] = (batch['x'].numpy(), batch['y'].numpy().astype(np.int32))
  return out


def make_task(name: str, *, num_clients: int = 20,
              examples_per_client: int = 200, seed: int = 0) -> BenchmarkTask:
  """Benchmark task `name` (one of TASKS) with `num_clients` clients.

  emnist_cnn / emnist_mlp: the project's EMNIST CNN (62 classes) or the
  paper's 80-60 MLP on random data of EMNIST's shape (no download; timing does
  not depend on pixel values). digits_mlp: the real scikit-learn digits
  split (`registry.load_task('digits')`) with its paper MLP. synthetic:
  Synthetic(1, 1) with softmax regression.
  """
  from perfed_tff.models import emnist as emnist_models  # pylint: disable=g-import-not-at-top
  from perfed_tff.models import mlp  # pylint: disable=g-import-not-at-top
  if name in ('emnist_cnn', 'emnist_mlp'):
    if name == 'emnist_cnn':
      model_fn = emnist_models.emnist_cnn_model_fn(num_classes=62, seed=seed)
      keras_model_fn = lambda: emnist_models.create_emnist_cnn(62, seed)
    else:
      model_fn = mlp.mlp_model_fn(emnist_models.IMAGE_SHAPE, 62, seed=seed)
      keras_model_fn = lambda: mlp.create_mlp(emnist_models.IMAGE_SHAPE, 62,
                                              seed=seed)
    return BenchmarkTask(
        name=name,
        data_note=('random data in EMNIST\'s shape (28x28x1 float pixels, '
                   f'62 classes, {examples_per_client} examples per client), '
                   'not real EMNIST; timing does not depend on pixel values'),
        clients=_synthetic_emnist_clients(num_clients, examples_per_client,
                                          seed),
        model_fn=model_fn,
        element_spec=emnist_models.element_spec(),
        functional_model=lambda: task_lib.functional_model(
            keras_model_fn, emnist_models.loss_fn,
            emnist_models.element_spec(), task_lib.accuracy_metrics))
  if name in ('digits_mlp', 'synthetic'):
    from perfed_tff.data import registry  # pylint: disable=g-import-not-at-top
    if name == 'digits_mlp':
      task = registry.load_task('digits', seed=seed, num_users=num_clients)
      note = ('real scikit-learn 8x8 digits (1,797 images), 2 classes per '
              'client, 80-60 ELU MLP')
    else:
      task = registry.load_task('synthetic', seed=seed, num_users=num_clients)
      note = 'FedProx Synthetic(1, 1), softmax regression'
    return BenchmarkTask(
        name=name, data_note=note,
        clients=_client_arrays(task.train, task.train.client_ids[:num_clients]),
        model_fn=task.model_fn, element_spec=task.element_spec,
        functional_model=task.functional_model)
  if name == 'shakespeare_lstm':
    from perfed_tff.data import shakespeare as shakespeare_data  # pylint: disable=g-import-not-at-top
    from perfed_tff.models import shakespeare as shakespeare_models  # pylint: disable=g-import-not-at-top
    length = shakespeare_data.DEFAULT_SEQUENCE_LENGTH
    rng = np.random.default_rng(seed)
    clients = collections.OrderedDict()
    n = max(1, examples_per_client // 4)   # snippets are long: fewer of them
    for k in range(num_clients):
      x = rng.integers(1, shakespeare_data.VOCAB_SIZE, (n, length),
                       dtype=np.int32)
      clients[f'client_{k:04d}'] = (x, np.roll(x, -1, axis=1))
    return BenchmarkTask(
        name=name,
        data_note=(f'random characters in Shakespeare\'s shape ({n} '
                   f'sequences of {length} per client), the project\'s char '
                   'LSTM; not real Shakespeare'),
        clients=clients,
        model_fn=shakespeare_models.char_lstm_model_fn(
            shakespeare_data.VOCAB_SIZE, length, seed=seed),
        element_spec=shakespeare_models.element_spec(length),
        functional_model=lambda: task_lib.functional_model(
            lambda: shakespeare_models.create_char_lstm(
                shakespeare_data.VOCAB_SIZE, length, seed=seed),
            lambda: shakespeare_models.loss_fn(shakespeare_models.PAD_ID),
            shakespeare_models.element_spec(length),
            lambda: [shakespeare_models.MaskedSparseCategoricalAccuracy(
                shakespeare_models.PAD_ID),
                     shakespeare_models.NumTokens(shakespeare_models.PAD_ID)]))
  raise ValueError(f'unknown task {name!r}; one of {TASKS}')


def client_datasets(task: BenchmarkTask, client_ids: Sequence[str], *,
                    num_batches: int, batch_size: int, seed: int,
                    round_num: int) -> list[tf.data.Dataset]:
  """The batch streams of `client_ids` in round `round_num` (a pure function
  of (seed, round, client), so every contender sees the same batches), made
  by the project's `data.task.client_batches` (tf.data autotuning and graph
  rewrites off, as for every client stream of the project: with autotuning
  on, the floor's rounds once stalled to exactly 2.56 s or 5.12 s on the
  2-core machine, tf.data's autotuning period doubling from 10 ms).
  """
  out = []
  for cid in client_ids:
    x, y = task.clients[cid]
    ds = tf.data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y))
    out.append(task_lib.client_batches(
        ds, batch_size=batch_size, num_batches=num_batches,
        seed=task_lib.derive_seed(seed, round_num, cid)))
  return out


def round_datasets(task: BenchmarkTask, config: 'BenchmarkConfig',
                   contender: str, round_num: int) -> list[tf.data.Dataset]:
  """The batch streams `contender` consumes in round `round_num`: the
  round's cohort (a pure function of (seed, round)), `batches_per_round`
  batches per client."""
  cohort = task_lib.sample_clients(list(task.clients),
                                   config.clients_per_round, config.seed,
                                   round_num)
  return client_datasets(
      task, cohort,
      num_batches=batches_per_round(contender, config.local_steps),
      batch_size=config.batch_size, seed=config.seed, round_num=round_num)


def round_inputs(task: BenchmarkTask, config: 'BenchmarkConfig',
                 round_num: int, *, empty: bool = False) -> list:
  """The round's cohort as inputs of a worker-side TFF process
  (`perfed_tff.data.worker_datasets`): each client's examples and its seed
  `derive_seed(seed, round, client)`, from which the worker builds exactly
  the batches of `round_datasets` (`empty`: no examples)."""
  cohort = task_lib.sample_clients(list(task.clients),
                                   config.clients_per_round, config.seed,
                                   round_num)
  out = []
  for cid in cohort:
    x, y = task.clients[cid]
    if empty:
      x, y = x[:0], y[:0]
    out.append(worker_datasets.client_input(
        collections.OrderedDict(x=x, y=y),
        task_lib.derive_seed(config.seed, round_num, cid)))
  return out


def round_data(runner, task: BenchmarkTask, config: 'BenchmarkConfig',
               contender: str, round_num: int, *, empty: bool = False):
  """What `runner` consumes in round `round_num`, always the same batches:
  round inputs for a worker-side TFF process, the batches as numpy arrays
  for the PyTorch peer (made before its round is timed, like every
  contender's input), batch streams otherwise."""
  if isinstance(runner, TFFRunner) and runner.worker_side:
    return round_inputs(task, config, round_num, empty=empty)
  datasets = round_datasets(task, config, contender, round_num)
  if empty:
    datasets = [d.take(0) for d in datasets]
  if contender in PEERS:
    return [list(d.as_numpy_iterator()) for d in datasets]
  return datasets


def _timed_round(runner, datasets) -> float:
  """Seconds one round of `runner` takes on `datasets`."""
  t0 = time.perf_counter()
  runner.run_round(datasets)
  return time.perf_counter() - t0


# ----------------------------------------------------------------------------
# The pure-TF floor.


class PureTFFloor:
  """Per-FedAvg rounds in plain TensorFlow: the same client loop
  (`client_work.build_client_update` on the same VariableModel) and the same
  server average as `build_per_fedavg` with uniform weighting, with no TFF.

  A round is one `tf.function` call: the clients of the cohort are
  independent subgraphs (one model copy per cohort slot), at most
  `parallel_clients` of them running at a time (client i starts when client
  i - parallel_clients has finished), like TFF's worker with
  `max_concurrent_computation_calls`; `parallel_clients <= 0` lets all run
  at once. `variant=None` gives the FedAvg floor: tau plain SGD steps at beta
  per client.
  """

  def __init__(self, model_fn, *, variant: Optional[client_work_lib.Variant],
               alpha: float, beta: float, delta: float, local_steps: int,
               clients_per_round: int, parallel_clients: int = 2):
    self.variant = variant
    self.clients_per_round = clients_per_round
    self.parallel_clients = (parallel_clients if parallel_clients > 0
                             else clients_per_round)
    self._models = [model_fn() for _ in range(clients_per_round)]
    self.client_updates = []
    for model in self._models:
      if variant is None:
        fn = _build_sgd_client_update(model, beta=beta,
                                      local_steps=local_steps)
      else:
        oracle = client_work_lib._VariableOracle(model)  # pylint: disable=protected-access
        fn = client_work_lib.build_client_update(
            oracle, variant=variant, alpha=alpha, beta=beta, delta=delta,
            local_steps=local_steps)
      self.client_updates.append(fn)
    self.weights = tuple(
        tf.identity(v) for v in self._models[0].trainable_variables)

    @tf.function
    def run_round(initial, datasets):
      finals, counts = [], []
      for i, (fn, ds) in enumerate(zip(self.client_updates, datasets)):
        start = initial
        if i >= self.parallel_clients:
          with tf.control_dependencies(
              tf.nest.flatten(finals[i - self.parallel_clients])):
            start = tuple(tf.identity(w) for w in initial)
        final, metrics = fn(start, ds)
        finals.append(tuple(final))
        counts.append(metrics['num_steps'])
      # Mirrors the process: update_i = w - w_i, zeroed with weight 0 when
      # non-finite or when the client made no step; uniform mean of the
      # updates; w <- w - 1.0 * mean.
      updates, weights = [], []
      for final, steps in zip(finals, counts):
        update = tuple(a - b for a, b in zip(initial, final))
        finite = tf.reduce_all(
            [tf.reduce_all(tf.math.is_finite(u)) for u in update])
        ok = tf.logical_and(finite, steps > 0)
        update = tuple(tf.where(ok, u, tf.zeros_like(u)) for u in update)
        updates.append(update)
        weights.append(tf.where(ok, 1.0, 0.0))
      total = tf.add_n(weights)
      mean = tuple(
          tf.math.divide_no_nan(
              tf.add_n([w * u[i] for w, u in zip(weights, updates)]), total)
          for i in range(len(initial)))
      return tuple(a - m for a, m in zip(initial, mean))

    self._run_round = run_round

  def set_weights(self, trainable) -> None:
    self.weights = tuple(tf.convert_to_tensor(w) for w in trainable)

  def run_round(self, datasets: Sequence[tf.data.Dataset]) -> None:
    if len(datasets) != self.clients_per_round:
      raise ValueError(f'expected {self.clients_per_round} client datasets, '
                       f'got {len(datasets)}')
    new = self._run_round(self.weights, tuple(datasets))
    # Like the TFF process, a round hands the model back to Python.
    self.weights = tuple(tf.convert_to_tensor(w.numpy()) for w in new)

  def tracing_count(self) -> int:
    """Traces of the round function (1 after the first round if nothing
    retraces)."""
    return self._run_round.experimental_get_tracing_count()


def _build_sgd_client_update(model, *, beta, local_steps):
  """FedAvg's client loop (tau SGD steps at beta) on a VariableModel, in the
  same iterator style as `client_work.build_client_update`."""
  variables = tuple(model.trainable_variables)

  @tf.function
  def client_update(initial_trainable, dataset):
    for v, t in zip(variables, initial_trainable):
      v.assign(t)
    iterator = iter(dataset)
    steps = tf.constant(0, tf.int64)
    for _ in tf.range(local_steps):
      optional = iterator.get_next_as_optional()
      if not optional.has_value():
        break
      with tf.GradientTape() as tape:
        out = model.forward_pass(optional.get_value(), training=True)
      grads = tape.gradient(out.loss, variables)
      for v, g in zip(variables, grads):
        v.assign_sub(beta * g)
      steps += 1
    return (tuple(tf.identity(v) for v in variables),
            collections.OrderedDict(num_steps=steps))

  return client_update


# ----------------------------------------------------------------------------
# TFF contenders.


class TFFRunner:
  """A `LearningProcess` driven round by round: with `worker_side`, composed
  with the worker-side batch pipeline (`worker_datasets.compose`, what the
  training program runs; it takes `round_inputs`), else it takes datasets."""

  def __init__(self, process, *, worker_side: bool = False,
               element_spec=None, batch_size: int = 0, num_batches: int = 0):
    self.worker_side = worker_side
    if worker_side:
      process = worker_datasets.compose(
          process, element_spec, batch_size=batch_size,
          num_batches=num_batches)
    self.process = process
    self.state = process.initialize()

  def run_round(self, datasets) -> None:
    self.state = self.process.next(self.state, list(datasets)).state

  def weights(self):
    return self.process.get_model_weights(self.state)


# ----------------------------------------------------------------------------
# The benchmark.


@dataclasses.dataclass
class BenchmarkConfig:
  task: str = 'emnist_cnn'
  clients_per_round: int = 10
  num_clients: int = 20
  examples_per_client: int = 200
  local_steps: int = 5
  batch_size: int = 32
  rounds: int = 6              # measured rounds (after warm-up)
  warmup_rounds: int = 1
  contenders: Sequence[str] = CONTENDERS
  alpha: float = 0.01
  beta: float = 0.05
  delta: float = 1e-3
  seed: int = 0
  # Clients run at once: by the floor; the TFF worker's own setting is the
  # caller's ExecutionContext's (experiments/benchmark.py passes the same).
  max_concurrent_computation_calls: int = 2
  # Recorded with the results; like the concurrency, the caller's
  # ExecutionContext applies it ('auto', 'runtime' or 'tff' as resolved by
  # `perfed_tff.runtime.compilation`; each TFF contender's is in its results).
  graph_optimization: str = 'auto'
  # How TFF contenders get their clients' data: 'worker' (the training
  # program's path: examples and seeds in, batches built on the worker by
  # `worker_datasets`) or 'datasets' (one serialized tf.data.Dataset per
  # client per round, TFF's plain interface).
  tff_client_data: str = 'worker'
  empty_rounds: int = 0        # rounds with empty client data (fixed cost)
  memory_rounds: int = 0       # extra rounds of `memory_contender` for RSS
  memory_contender: str = 'per_fedavg_hf'


def _variant(contender: str):
  if contender == 'fedavg_reduce':
    return None
  for prefix in ('floor_', 'torch_'):
    if contender.startswith(prefix):
      name = contender[len(prefix):]
      return None if name == 'fedavg' else client_work_lib.Variant(name)
  return algorithms_lib.variant_of(contender)


def batches_per_round(contender: str, local_steps: int) -> int:
  variant = _variant(contender)
  per_step = 1 if variant is None else client_work_lib.batches_per_step(variant)
  return per_step * local_steps


def build_contender(contender: str, task: BenchmarkTask, config):
  if contender in PEERS:
    # The model's initial weights (the benchmark then sets every contender
    # to the TFF process's).
    return torch_peer.TorchPeer.from_task(
        task, variant=_variant(contender), alpha=config.alpha,
        beta=config.beta, delta=config.delta, local_steps=config.local_steps,
        initial_weights=[v.numpy()
                         for v in task.model_fn().trainable_variables])
  if contender.startswith('floor_'):
    return PureTFFloor(task.model_fn, variant=_variant(contender),
                       alpha=config.alpha, beta=config.beta,
                       delta=config.delta, local_steps=config.local_steps,
                       clients_per_round=config.clients_per_round,
                       parallel_clients=config.max_concurrent_computation_calls)
  if contender == 'fedavg_reduce':
    process = tff.learning.algorithms.build_weighted_fed_avg(
        task.model_fn,
        client_optimizer_fn=tff.learning.optimizers.build_sgdm(
            learning_rate=config.beta),
        server_optimizer_fn=tff.learning.optimizers.build_sgdm(
            learning_rate=1.0),
        client_weighting=tff.learning.ClientWeighting.UNIFORM,
        loop_implementation=tff.learning.LoopImplementation.DATASET_REDUCE)
  else:
    model = task.model_fn
    if contender != 'fedavg' and task.functional_model is not None:
      model = task.functional_model()   # as the training program does
    process = algorithms_lib.build_algorithm(
        contender, model, alpha=config.alpha, beta=config.beta,
        delta=config.delta, local_steps=config.local_steps,
        client_weighting='uniform')
  return TFFRunner(
      process, worker_side=config.tff_client_data == 'worker',
      element_spec=task_lib.unbatched_spec(task.element_spec),
      batch_size=config.batch_size,
      num_batches=batches_per_round(contender, config.local_steps))


def rss_bytes() -> dict:
  """Resident memory of this process and of its worker_binary children."""
  me = psutil.Process()
  workers = 0
  for child in me.children(recursive=True):
    try:
      if 'worker_binary' in ' '.join(child.cmdline() or []):
        workers += child.memory_info().rss
    except psutil.Error:
      pass
  return {'python': me.memory_info().rss, 'worker': workers}


def run_benchmark(config: BenchmarkConfig, log: Callable[[str], None] = print
                  ) -> dict:
  """Runs the benchmark in the current TFF context; returns the results."""
  contenders = list(config.contenders)
  for c in contenders:
    if c not in CONTENDERS:
      raise ValueError(f'unknown contender {c!r}; one of {CONTENDERS}')
  skipped = collections.OrderedDict()
  reason = torch_peer.unavailable_reason()
  if reason is not None and any(c in PEERS for c in contenders):
    log(reason)
    skipped.update((c, reason) for c in contenders if c in PEERS)
    contenders = [c for c in contenders if c not in PEERS]
  task = make_task(config.task, num_clients=config.num_clients,
                   examples_per_client=config.examples_per_client,
                   seed=config.seed)
  runners, build_s, compiled_with = {}, {}, {}
  for c in contenders:
    t0 = time.perf_counter()
    runners[c] = build_contender(c, task, config)
    build_s[c] = time.perf_counter() - t0
    log(f'built {c} in {build_s[c]:.1f}s')
    if isinstance(runners[c], TFFRunner):
      compiled_with[c] = config.graph_optimization
      if compiled_with[c] == 'auto':
        compiled_with[c] = ('runtime' if compilation_lib.has_convolutions(
            runners[c].process.next) else 'tff')

  # All contenders start from the same model (the TFF initial weights).
  init = None
  for c in contenders:
    if isinstance(runners[c], TFFRunner):
      init = tuple(runners[c].weights().trainable)
      break
  if init is not None:
    for c in contenders:
      if isinstance(runners[c], (PureTFFloor, torch_peer.TorchPeer)):
        runners[c].set_weights([np.asarray(w) for w in init])

  times = collections.defaultdict(list)
  total = config.warmup_rounds + config.rounds
  for r in range(total):
    order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
    for c in order:
      times[c].append(
          _timed_round(runners[c], round_data(runners[c], task, config, c, r)))
    log(f'round {r}: ' + ', '.join(f'{c}={times[c][-1]:.3f}s'
                                   for c in contenders))

  results = collections.OrderedDict()
  for c in contenders:
    measured = times[c][config.warmup_rounds:]
    median = statistics.median(measured) if measured else float('nan')
    results[c] = collections.OrderedDict(
        build_s=build_s[c],
        first_round_s=times[c][0],
        compile_s=times[c][0] - median,
        median_round_s=median,
        round_s=measured,
        gradient_evaluations_per_round=gradient_evaluations_per_round(
            c, config.local_steps) * config.clients_per_round,
        graph_optimization=compiled_with.get(c))

  def ratio(a, b):
    if a in results and b in results:
      return results[a]['median_round_s'] / results[b]['median_round_s']
    return None

  # Per-round ratios, each from one round where both ran side by side, and
  # their median (robust to a noisy round).
  def round_ratio(a, b):
    if a not in results or b not in results:
      return None
    return statistics.median(
        x / y for x, y in zip(results[a]['round_s'], results[b]['round_s']))

  ratios = collections.OrderedDict()
  for base in ('fedavg', 'fedavg_reduce'):
    for alg in ('per_fedavg_fo', 'per_fedavg_hf', 'per_fedavg_maml'):
      r = round_ratio(alg, base)
      if r is not None:
        ratios[f'{alg}/{base}'] = r
  for alg, floor in FLOOR_OF.items():
    r = round_ratio(alg, floor)
    if r is not None:
      ratios[f'{alg}/{floor}'] = r
  for alg, peer in PEER_OF.items():
    for contender in (alg, FLOOR_OF[alg]):
      r = round_ratio(contender, peer)
      if r is not None:
        ratios[f'{contender}/{peer}'] = r
  # Fixed cost of a round: the same rounds with every client's data empty
  # (no local step: what is left is broadcast, per-client set-up, transfer,
  # aggregation and the server update). Subtracting it from both sides gives
  # the TFF / floor ratio of the client computation alone.
  compute_ratios = collections.OrderedDict()
  if config.empty_rounds:
    for c in contenders:
      empty_times = [
          _timed_round(runners[c],
                       round_data(runners[c], task, config, c, r, empty=True))
          for r in range(config.empty_rounds + 1)]
      results[c]['empty_round_s'] = statistics.median(empty_times[1:])
    for alg, floor in FLOOR_OF.items():
      if alg in results and floor in results:
        compute_ratios[f'{alg}/{floor}'] = (
            (results[alg]['median_round_s'] - results[alg]['empty_round_s']) /
            (results[floor]['median_round_s'] -
             results[floor]['empty_round_s']))
  memory = None
  if config.memory_rounds:
    memory = measure_memory(task, runners, config, log)
  return collections.OrderedDict(
      config=dataclasses.asdict(config) | {'contenders': contenders},
      task_note=task.data_note,
      results=results,
      ratios=ratios,
      ratio_of_medians=collections.OrderedDict(
          (k, ratio(*k.split('/'))) for k in ratios),
      compute_ratios=compute_ratios,
      memory=memory,
      skipped=skipped,
      environment=environment_info())


def run_compilation_ab(config: BenchmarkConfig, contexts: dict,
                       log: Callable[[str], None] = print) -> dict:
  """Same-process A/B of compilations: `contexts` maps a name (e.g.
  'runtime', 'tff') to an open `execution.ExecutionContext`; every TFF
  contender of `config.contenders` is built and run under each, alternating
  which goes first, on the same batches. Returns per contender the median
  round under each and the median of the per-round ratios (first name /
  second name)."""
  from tensorflow_federated.python.core.impl.context_stack import context_stack_impl  # pylint: disable=g-import-not-at-top
  names = list(contexts)
  if len(names) != 2:
    raise ValueError(f'expected two contexts, got {names}')
  contenders = [c for c in config.contenders
                if c not in FLOORS and c not in PEERS]
  task = make_task(config.task, num_clients=config.num_clients,
                   examples_per_client=config.examples_per_client,
                   seed=config.seed)
  previous = context_stack_impl.context_stack.current
  runners = {}
  try:
    for name in names:
      context_stack_impl.context_stack.set_default_context(
          contexts[name].context)
      for c in contenders:
        runners[(name, c)] = build_contender(c, task, config)
    times = collections.defaultdict(list)
    for r in range(config.warmup_rounds + config.rounds):
      for c in contenders:
        for name in (names if r % 2 else names[::-1]):
          context_stack_impl.context_stack.set_default_context(
              contexts[name].context)
          runner = runners[(name, c)]
          times[(name, c)].append(_timed_round(
              runner, round_data(runner, task, config, c, r)))
      log(f'round {r}: ' + ', '.join(
          f'{c}[{n}]={times[(n, c)][-1]:.3f}s' for c in contenders
          for n in names))
  finally:
    context_stack_impl.context_stack.set_default_context(previous)
  out = collections.OrderedDict()
  for c in contenders:
    a = times[(names[0], c)][config.warmup_rounds:]
    b = times[(names[1], c)][config.warmup_rounds:]
    out[c] = collections.OrderedDict(
        [(f'{names[0]}_median_round_s', statistics.median(a)),
         (f'{names[1]}_median_round_s', statistics.median(b)),
         (f'{names[0]}/{names[1]}',
          statistics.median(x / y for x, y in zip(a, b)))])
  return collections.OrderedDict(
      config=dataclasses.asdict(config) | {'contenders': contenders},
      task_note=task.data_note, compilation_ab=out,
      environment=environment_info())


def gradient_evaluations_per_round(contender: str, local_steps: int) -> int:
  variant = _variant(contender)
  per_step = 1 if variant is None else (
      client_work_lib.gradient_evaluations_per_step(variant))
  return per_step * local_steps


def measure_memory(task, runners, config, log) -> dict:
  """RSS (this process and the TFF worker) over `memory_rounds` rounds of
  `memory_contender`; growth is the mean of the last 10% of the rounds
  against the mean of rounds (10%, 20%] (the first 10% warm the allocator)."""
  c = config.memory_contender
  runner = runners.get(c) or build_contender(c, task, config)
  samples = []
  for r in range(config.memory_rounds):
    runner.run_round(round_data(runner, task, config, c, 1000 + r))
    samples.append(rss_bytes())
    if (r + 1) % 10 == 0:
      log(f'memory round {r + 1}: {samples[-1]}')
  # RSS oscillates by tens of MiB from round to round (allocator caches), so
  # compare window means: rounds (10%, 20%] against the last 10%.
  n = len(samples)
  w = max(1, n // 10)
  first = samples[w:2 * w] or samples[:1]
  last = samples[-w:]
  start = {k: float(np.mean([s[k] for s in first])) for k in samples[0]}
  end = {k: float(np.mean([s[k] for s in last])) for k in samples[0]}

  def growth(key):
    return (end[key] - start[key]) / start[key] if start[key] else None

  total_start = start['python'] + start['worker']
  total_end = end['python'] + end['worker']
  return collections.OrderedDict(
      contender=c, rounds=config.memory_rounds,
      rss_start_mb={k: v / 2**20 for k, v in start.items()},
      rss_end_mb={k: v / 2**20 for k, v in end.items()},
      growth_python=growth('python'), growth_worker=growth('worker'),
      growth_total=(total_end - total_start) / total_start,
      rss_mb_per_round=[(s['python'] + s['worker']) / 2**20 for s in samples],
      worker_rss_mb_per_round=[s['worker'] / 2**20 for s in samples])


def environment_info() -> dict:
  torch_version = None
  if torch_peer.unavailable_reason() is None:
    import torch  # pylint: disable=g-import-not-at-top
    torch_version = torch.__version__
  return collections.OrderedDict(
      tensorflow=tf.__version__,
      torch=torch_version,
      tensorflow_federated=tff.__version__,
      cpus=os.cpu_count(),
      gpus=[d.name for d in tf.config.list_physical_devices('GPU')],
      intra_op_threads=tf.config.threading.get_intra_op_parallelism_threads(),
      inter_op_threads=tf.config.threading.get_inter_op_parallelism_threads(),
      worker_env={k: os.environ[k] for k in
                  ('TF_NUM_INTRAOP_THREADS', 'TF_NUM_INTEROP_THREADS',
                   'OMP_NUM_THREADS') if k in os.environ})


def markdown_table(report: dict) -> str:
  """The results as a Markdown table."""
  results = report['results']
  ratios = report['ratios']
  cfg = report['config']
  lines = [
      f"Task `{cfg['task']}` ({report['task_note']}); "
      f"{cfg['clients_per_round']} clients/round, tau={cfg['local_steps']}, "
      f"batch {cfg['batch_size']}; median of {cfg['rounds']} rounds after "
      f"{cfg['warmup_rounds']} warm-up; ratios are medians of per-round "
      f"ratios (contenders interleaved in every round); TFF worker and floor "
      f"run {cfg['max_concurrent_computation_calls']} clients at a time; "
      f"TFF graphs compiled with graph_optimization="
      f"'{cfg.get('graph_optimization', 'tff')}'"
      + (' (' + ', '.join(f"{c}: {r['graph_optimization']}"
                          for c, r in results.items()
                          if r.get('graph_optimization')) + ')'
         if cfg.get('graph_optimization') == 'auto' else '') + '.',
      '',
      '| contender | grad evals / round | median round (s) | vs FedAvg '
      '| vs FedAvg (TFF default loop) | TFF / pure-TF floor '
      '| vs PyTorch peer | no-data round (s) | TFF / floor, compute only '
      '| first round (s) | build (s) |',
      '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|',
  ]
  peer_of = dict(PEER_OF)
  peer_of.update((FLOOR_OF[a], p) for a, p in PEER_OF.items())

  def fmt(key, self_name):
    if key in ratios:
      return f'{ratios[key]:.2f}'
    return '1.00' if key == f'{self_name}/{self_name}' else ''

  for c, r in results.items():
    vs = fmt(f'{c}/fedavg', c) if 'fedavg' in results else ''
    vi = (fmt(f'{c}/fedavg_reduce', c) if 'fedavg_reduce' in results
          else '')
    if c in FLOORS or c in PEERS:
      vs = vi = ''
    floor = FLOOR_OF.get(c)
    vf = (f"{ratios[f'{c}/{floor}']:.2f}" if floor and f'{c}/{floor}' in ratios
          else '')
    compute = report.get('compute_ratios', {})
    vc = (f"{compute[f'{c}/{floor}']:.2f}"
          if floor and f'{c}/{floor}' in compute else '')
    empty = r.get('empty_round_s')
    ve = f'{empty:.3f}' if empty is not None else ''
    peer = peer_of.get(c)
    vp = (f"{ratios[f'{c}/{peer}']:.2f}" if peer and f'{c}/{peer}' in ratios
          else '')
    lines.append(
        f"| {c} | {r['gradient_evaluations_per_round']} | "
        f"{r['median_round_s']:.3f} | {vs} | {vi} | {vf} | {vp} | {ve} | "
        f"{vc} | {r['first_round_s']:.2f} | {r['build_s']:.1f} |")
  for c, reason in report.get('skipped', {}).items():
    lines.append(f'| {c} | skipped: {reason} |')
  mem = report.get('memory')
  if mem:
    lines += ['', f"Resident memory over {mem['rounds']} rounds of "
              f"`{mem['contender']}`: {mem['rss_start_mb']['python']:.0f} -> "
              f"{mem['rss_end_mb']['python']:.0f} MiB (Python), "
              f"{mem['rss_start_mb']['worker']:.0f} -> "
              f"{mem['rss_end_mb']['worker']:.0f} MiB (TFF worker); growth "
              f"{100 * mem['growth_total']:.1f}% in total."]
  return '\n'.join(lines)


def write_json(report: dict, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(report, f, indent=2, default=str)
