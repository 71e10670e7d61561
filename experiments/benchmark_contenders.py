"""The benchmark's contenders: their names, configuration, construction and
the data each consumes in a round.

Contenders:
* `fedavg`: the project's baseline, TFF's weighted FedAvg with client SGD at
  beta for tau steps (TFF's DATASET_ITERATOR client loop), built as the
  training program builds it under the accelerator
  (`perfed_tff.accelerator.fed_avg`: on the FunctionalModel; the
  VariableModel for a convolutional model).
* `fedavg_reduce`: TFF's `tff.learning.algorithms.build_weighted_fed_avg`
  on the task's VariableModel with TFF's default DATASET_REDUCE client loop
  (slower on CPU; reported for reference). Against `fedavg` it differs in
  the loop only for a convolutional model; otherwise in the model kind too.
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
* `floor_{fedavg,fo,hf,maml}`: the pure-TF floor
  (`experiments.benchmark_floor.PureTFFloor`).

Every contender runs one algorithm of `perfed_tff.algorithms`
(`algorithm_of`), whose rules give its batches per round: FedAvg consumes the
first tau batches of a client's stream, Per-FedAvg FO the first 2 tau, HF and
MAML 3 tau.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import tensorflow as tf
import tensorflow_federated as tff

from experiments import benchmark_floor
from experiments import benchmark_tasks
from experiments import torch_peer
from perfed_tff import algorithms as algorithms_lib
from perfed_tff.accelerator import context as context_lib
from perfed_tff.accelerator import fed_avg as fast_fed_avg
from perfed_tff.accelerator import fused_round
from perfed_tff.accelerator import multi_round
from perfed_tff.data import worker_datasets
from perfed_tff.models import specs

FLOORS = ('floor_fedavg', 'floor_fo', 'floor_hf', 'floor_maml')
# The PyTorch peer (`experiments.torch_peer`; skipped without torch).
PEERS = ('torch_fedavg', 'torch_fo', 'torch_hf', 'torch_maml')
# `fedavg` is the project's baseline (`algorithms.build_algorithm`: TFF's
# weighted FedAvg with the DATASET_ITERATOR client loop);
# `fedavg_reduce` is TFF's build_weighted_fed_avg on the VariableModel with
# TFF's default DATASET_REDUCE loop.
CONTENDERS = algorithms_lib.ALGORITHMS + ('fedavg_reduce',) + FLOORS + PEERS
# The floor and the PyTorch peer of each TFF contender.
FLOOR_OF = {'fedavg': 'floor_fedavg', 'fedavg_reduce': 'floor_fedavg',
            'per_fedavg_fo': 'floor_fo',
            'per_fedavg_hf': 'floor_hf', 'per_fedavg_maml': 'floor_maml'}
PEER_OF = {'fedavg': 'torch_fedavg', 'per_fedavg_fo': 'torch_fo',
           'per_fedavg_hf': 'torch_hf', 'per_fedavg_maml': 'torch_maml'}
# The algorithm each contender outside `algorithms.ALGORITHMS` runs.
_ALGORITHM_OF = {'fedavg_reduce': 'fedavg',
                 **{floor: alg for alg, floor in FLOOR_OF.items()
                    if alg in algorithms_lib.ALGORITHMS},
                 **{peer: alg for alg, peer in PEER_OF.items()}}


def split_blocks(contender: str) -> tuple[str, Optional[int]]:
  """(contender, K) of a TFF contender named `<name>@K`: the same contender
  run with K rounds per invocation whatever the benchmark's setting (e.g.
  `per_fedavg_fo@1` beside `per_fedavg_fo`, to time the blocks side by
  side); (contender, None) for a plain name."""
  name, at, k = contender.partition('@')
  if not at:
    return contender, None
  if (name not in algorithms_lib.ALGORITHMS or not k.isdigit()
      or int(k) < 1):
    raise ValueError(f'unknown contender {contender!r}: <name>@K takes a '
                     f'TFF contender of {algorithms_lib.ALGORITHMS} and K >= 1')
  return name, int(k)


def algorithm_of(contender: str) -> str:
  """The `perfed_tff.algorithms` name a contender runs (e.g. 'floor_hf' ->
  'per_fedavg_hf', 'fedavg_reduce' -> 'fedavg', 'per_fedavg_fo@1' ->
  'per_fedavg_fo')."""
  contender, _ = split_blocks(contender)
  if contender in algorithms_lib.ALGORITHMS:
    return contender
  if contender not in _ALGORITHM_OF:
    raise ValueError(f'unknown contender {contender!r}; one of {CONTENDERS}')
  return _ALGORITHM_OF[contender]


def _batches_per_round(contender: str, local_steps: int) -> int:
  """Batches a client of `contender` consumes in one round
  (`algorithms.batches_per_round` of its algorithm)."""
  return algorithms_lib.batches_per_round(algorithm_of(contender), local_steps)


@dataclasses.dataclass
class BenchmarkConfig:
  """What the benchmark runs: task, cohort, rounds, contenders, hyperparameters
  and how the contenders run."""
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
  # `perfed_tff.accelerator.compilation`; each TFF contender's is in its results).
  graph_optimization: str = 'auto'
  # How TFF contenders get their clients' data: 'worker' (the training
  # program's path: examples and seeds in, batches built on the worker by
  # `worker_datasets`) or 'datasets' (one serialized tf.data.Dataset per
  # client per round, TFF's plain interface).
  tff_client_data: str = 'worker'
  # TFF contenders (worker-side client data) run this many rounds per
  # invocation, as the training program does between checkpoints
  # (`perfed_tff.accelerator.round_blocks`); each measured "round" of theirs is
  # then a block of K rounds, reported per round.
  rounds_per_invocation: int = 1
  empty_rounds: int = 0        # rounds with empty client data (fixed cost)
  memory_rounds: int = 0       # extra rounds of `memory_contender` for RSS
  memory_contender: str = 'per_fedavg_hf'


def build_contender(contender: str, task: benchmark_tasks.BenchmarkTask,
                    config: BenchmarkConfig):
  """A runner of `contender` on `task`: a `TFFRunner`, a
  `benchmark_floor.PureTFFloor` or a `torch_peer.TorchPeer`, each with
  `run_round(data)` (data from `round_data`)."""
  contender, blocks = split_blocks(contender)
  if blocks is not None:
    config = dataclasses.replace(config, rounds_per_invocation=blocks)
  variant = algorithms_lib.variant_of(algorithm_of(contender))
  if contender in PEERS:
    # The model's initial weights (the benchmark then sets every contender
    # to the TFF process's).
    return torch_peer.TorchPeer.from_task(
        task, variant=variant, alpha=config.alpha, beta=config.beta,
        delta=config.delta, local_steps=config.local_steps,
        initial_weights=[v.numpy()
                         for v in task.model_fn().trainable_variables])
  if contender.startswith('floor_'):
    return benchmark_floor.PureTFFloor(
        task.model_fn, variant=variant, alpha=config.alpha, beta=config.beta,
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
  elif contender == 'fedavg':  # As the training program's accelerator does.
    process = fast_fed_avg.build_fed_avg(task, beta=config.beta,
                                         client_weighting='uniform')
  else:
    model = task.model_fn   # as the training program does:
    if task.functional_model is not None:
      model = task.functional_model()
    process = algorithms_lib.build_algorithm(
        contender, model, alpha=config.alpha, beta=config.beta,
        delta=config.delta, local_steps=config.local_steps,
        client_weighting='uniform')
  worker_side = config.tff_client_data == 'worker'
  return TFFRunner(
      process, worker_side=worker_side,
      element_spec=specs.unbatched_spec(task.element_spec),
      batch_size=config.batch_size,
      num_batches=_batches_per_round(contender, config.local_steps),
      rounds_per_invocation=(config.rounds_per_invocation if worker_side
                             and contender != 'fedavg_reduce' else 1),
      clients_per_round=config.clients_per_round)


class TFFRunner:
  """A `LearningProcess` driven round by round: with `worker_side`, composed
  with the worker-side batch pipeline (`worker_datasets.compose`, what the
  training program runs; it takes `round_inputs`), else it takes datasets.
  With `rounds_per_invocation` K > 1 (worker-side only), each `run_round`
  runs K rounds in one invocation (`perfed_tff.accelerator.multi_round`, the
  training program's blocks) on a list of K rounds' inputs, each round one
  TensorFlow computation where it can be (`perfed_tff.accelerator.fused_round`,
  as the training program does)."""

  def __init__(self, process, *, worker_side: bool = False,
               element_spec=None, batch_size: int = 0, num_batches: int = 0,
               rounds_per_invocation: int = 1, clients_per_round: int = 0):
    self.worker_side = worker_side
    if worker_side:
      process = worker_datasets.compose(
          process, element_spec, batch_size=batch_size,
          num_batches=num_batches)
    self.process = process
    self.state = process.initialize()
    self.rounds_per_call = rounds_per_invocation
    self._block = None
    if rounds_per_invocation > 1:
      if not worker_side:
        raise ValueError('rounds_per_invocation > 1 needs worker-side data')
      context = context_lib.current()
      round_fn = process.next
      if clients_per_round:
        round_fn = fused_round.build_fused_next(
            context, process.next, clients_per_round) or process.next
      self._block = multi_round.build_multi_round_next(
          context, round_fn, rounds_per_invocation)

  def run_round(self, datasets) -> None:
    if self._block is not None:
      self.state, _ = self._block(self.state, list(datasets))
    else:
      self.state = self.process.next(self.state, list(datasets)).state

  def weights(self):
    return self.process.get_model_weights(self.state)


def round_datasets(task: benchmark_tasks.BenchmarkTask,
                   config: BenchmarkConfig, contender: str,
                   round_num: int) -> list[tf.data.Dataset]:
  """The batch streams `contender` consumes in round `round_num`: the
  round's cohort (a pure function of (seed, round)), the batches per round
  of its algorithm per client."""
  return benchmark_tasks.client_datasets(
      task, benchmark_tasks.cohort(task, config, round_num),
      num_batches=_batches_per_round(contender, config.local_steps),
      batch_size=config.batch_size, seed=config.seed, round_num=round_num)


def round_data(runner, task: benchmark_tasks.BenchmarkTask,
               config: BenchmarkConfig, contender: str, round_num: int, *,
               empty: bool = False):
  """What `runner` consumes in round `round_num`, always the same batches:
  round inputs for a worker-side TFF process, the batches as numpy arrays
  for the PyTorch peer (made before its round is timed, like every
  contender's input), batch streams otherwise."""
  if isinstance(runner, TFFRunner) and runner.worker_side:
    k = runner.rounds_per_call
    if k > 1:  # Rounds k*r+1 .. k*r+k, a block.
      return [benchmark_tasks.round_inputs(task, config, k * round_num + i + 1,
                                           empty=empty) for i in range(k)]
    return benchmark_tasks.round_inputs(task, config, round_num, empty=empty)
  datasets = round_datasets(task, config, contender, round_num)
  if empty:
    datasets = [d.take(0) for d in datasets]
  if contender in PEERS:
    return [list(d.as_numpy_iterator()) for d in datasets]
  return datasets
