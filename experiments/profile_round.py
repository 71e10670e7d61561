r"""Where a TFF round's fixed cost goes: parts timed side by side, both processes.

  python -m experiments.profile_round --task=digits_mlp --algorithm=per_fedavg_fo \
      --clients_per_round=10 --local_steps=5 --batch_size=10 --rounds=40 \
      --perf_seconds=8 --output_json=/tmp/profile_digits_fo.json

Every round, on the same cohort and inputs as the benchmark
(`experiments.benchmark_tasks.round_inputs`), it runs these computations in
the owned `perfed_tff.runtime.ExecutionContext`, interleaved:

* `invoke`: a federated computation taking the server weights and the
  clients' round inputs and returning the weights: one invocation (compile
  cache lookup, serializing the computation and the arguments, the gRPC
  calls, returning the result);
* `datasets`: the same plus each client's batch stream built on the worker
  (`perfed_tff.data.worker_datasets`) and counted;
* `broadcast_mean`: the weights broadcast to the clients, passed through a
  client computation and averaged (`federated_mean`): weight transfer and one
  aggregation;
* `no_data_round`: the algorithm's real round (the composed process the
  training program runs) with every client's examples empty: its whole
  fixed cost;
* `round`: the real round.

For each it reports the median wall time and the mean CPU time of this
process and of the TFF worker per round. It also times the run's phases up
to the first round: interpreter start-up and imports, the task, the worker
start (not waited for: it starts while the process is traced), building and
initializing the process, and the first round (compilation). With `--perf_seconds` (Linux
`perf` on PATH), it also records the worker with `perf` during that many
seconds of no-data rounds and prints the share of its CPU samples per
component (TF kernels, tf.data graph import, TFF's computation protos, ...).
"""

import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from absl import app
from absl import flags
import numpy as np
import psutil
import tensorflow as tf
import tensorflow_federated as tff

from experiments import benchmark_contenders
from experiments import benchmark_report
from experiments import benchmark_tasks
from perfed_tff import algorithms
from perfed_tff.data import task as task_lib
from perfed_tff.models import specs
from perfed_tff.data import worker_datasets
from perfed_tff.accelerator.context import AcceleratedContext

_TASK = flags.DEFINE_enum('task', 'digits_mlp', list(benchmark_tasks.TASKS),
                          'Benchmark task (experiments.benchmark_tasks).')
_ALGORITHM = flags.DEFINE_enum(
    'algorithm', 'per_fedavg_fo',
    ['fedavg', 'per_fedavg_fo', 'per_fedavg_hf', 'per_fedavg_maml'],
    'Algorithm of the real round.')
_CLIENTS = flags.DEFINE_integer('clients_per_round', 10, 'Clients per round.')
_NUM_CLIENTS = flags.DEFINE_integer('num_clients', 50, 'Population.')
_TAU = flags.DEFINE_integer('local_steps', 5, 'tau.')
_BATCH = flags.DEFINE_integer('batch_size', 10, 'Batch size.')
_ROUNDS = flags.DEFINE_integer('rounds', 40, 'Measured rounds (after 3 '
                               'warm-up rounds).')
_PERF_SECONDS = flags.DEFINE_float(
    'perf_seconds', 0.0, 'Seconds of `perf record` on the worker during '
    'no-data rounds (0: no perf profile).')
_OUTPUT_JSON = flags.DEFINE_string('output_json', None, 'Write results here.')

# Worker components: (name, regex on perf's symbol names); a sample counts
# for every component on its stack (so shares can overlap).
WORKER_COMPONENTS = (
    ('TF kernels (compute)', r'ThreadPoolDevice::Compute\b'),
    ('TF graph execution (scheduling + kernels)',
     r'ExecutorState<.*>::Process\b'),
    ('tf.data: dataset graph import / export',
     r'DatasetFromGraphOp::Compute|DatasetToGraphOp::Compute'),
    ('TF session runs', r'DirectSession::Run\b'),
    ('TF graph import', r'ImportGraphDef'),
    ('TFF computation protos (parse, copy, free)',
     r'tensorflow_federated::v0::(Computation|Value)::'
     r'(_InternalParse|MergeImpl|~Computation|~Value)'),
    ('TFF executors (reference resolving, federating)',
     r'ReferenceResolvingExecutor::|FederatingExecutor::'),
    ('gRPC request handling', r'grpc::Server::SyncRequestThreadManager::DoWork'),
    ('thread creation', r'\bclone3\b'),
    ('malloc / free', r'^(_int_malloc|_int_free|malloc|cfree.*|malloc_consolidate)$'),
)


def _worker_processes():
  return [p for p in psutil.Process().children(recursive=True)
          if 'worker_binary' in ' '.join(p.cmdline() or [])]


def _worker_cpu() -> float:
  total = 0.0
  for p in _worker_processes():
    try:
      t = p.cpu_times()
      total += t.user + t.system
    except psutil.Error:
      pass
  return total


def build_parts(weights_type, input_type, batches):
  """The `invoke`, `datasets` and `broadcast_mean` computations."""
  server = tff.FederatedType(weights_type, tff.SERVER)
  clients = tff.FederatedType(input_type, tff.CLIENTS)

  @tff.federated_computation(server, clients)
  def invoke(weights, client_inputs):
    del client_inputs
    return weights

  @tff.tensorflow.computation(input_type)
  def count_batches(client_input):
    return batches(client_input).reduce(tf.constant(0, tf.int64),
                                        lambda n, _: n + 1)

  @tff.federated_computation(server, clients)
  def datasets(weights, client_inputs):
    return weights, tff.federated_sum(
        tff.federated_map(count_batches, client_inputs))

  @tff.tensorflow.computation(weights_type, input_type)
  def pass_through(weights, client_input):
    del client_input
    return weights

  @tff.federated_computation(server, clients)
  def broadcast_mean(weights, client_inputs):
    return tff.federated_mean(tff.federated_map(
        pass_through, (tff.federated_broadcast(weights), client_inputs)))

  return collections.OrderedDict(invoke=invoke, datasets=datasets,
                                 broadcast_mean=broadcast_mean)


def perf_profile(seconds: float) -> dict:
  """Shares of the worker's CPU samples per WORKER_COMPONENTS entry over
  `seconds` of `perf record` (the caller keeps rounds running)."""
  perf = shutil.which('perf')
  workers = _worker_processes()
  if not perf or not workers:
    return {'error': 'perf not found' if not perf else 'no local worker'}
  out = os.path.join(tempfile.mkdtemp(), 'worker.perf')
  record = subprocess.run(
      [perf, 'record', '-F', '999', '-g', '-p', str(workers[0].pid), '-o', out,
       '--', 'sleep', str(seconds)], capture_output=True, text=True)
  if record.returncode:
    return {'error': record.stderr.strip()[-300:]}
  report = subprocess.run(
      [perf, 'report', '-i', out, '--children', '--sort', 'symbol', '-g',
       'none', '--stdio'], capture_output=True, text=True)
  shares = collections.OrderedDict((name, 0.0) for name, _ in
                                   WORKER_COMPONENTS)
  line_re = re.compile(r'^\s*([\d.]+)%\s+[\d.]+%\s+\[[.k]\]\s+(.*?)\s*$')
  for line in report.stdout.splitlines():
    m = line_re.match(line)
    if not m:
      continue
    # Without a terminal perf appends more columns after two spaces.
    share, symbol = float(m.group(1)), m.group(2).split('  ')[0].strip()
    for name, pattern in WORKER_COMPONENTS:
      if re.search(pattern, symbol):
        # Inclusive share of the outermost matching symbol.
        shares[name] = max(shares[name], share)
  return collections.OrderedDict(seconds=seconds, shares_percent=shares)


def main(argv):
  del argv
  phases = collections.OrderedDict()
  # From the interpreter's start: imports (TensorFlow, TFF) and flag parsing.
  phases['start-up (imports)'] = time.time() - psutil.Process().create_time()
  mark = time.perf_counter()

  def phase(name):
    nonlocal mark
    now = time.perf_counter()
    phases[name] = now - mark
    mark = now

  config = benchmark_contenders.BenchmarkConfig(
      task=_TASK.value, clients_per_round=_CLIENTS.value,
      num_clients=max(_NUM_CLIENTS.value, _CLIENTS.value),
      local_steps=_TAU.value, batch_size=_BATCH.value, rounds=_ROUNDS.value,
      contenders=(_ALGORITHM.value,))
  task = benchmark_tasks.make_task(config.task,
                                   num_clients=config.num_clients,
                                   seed=config.seed)
  phase('task')
  with AcceleratedContext():
    phase('worker start (not waited for)')
    runner = benchmark_contenders.build_contender(_ALGORITHM.value, task,
                                                  config)
    phase('build the process + initialize')
    runner.run_round(benchmark_tasks.round_inputs(task, config, 0))
    phase('first round (compilation)')
    weights = runner.weights()
    weights_type = runner.process.get_model_weights.type_signature.result
    spec = specs.unbatched_spec(task.element_spec)
    batches = worker_datasets.build_batches_computation(
        spec, batch_size=config.batch_size,
        num_batches=algorithms.batches_per_round(_ALGORITHM.value,
                                                 config.local_steps))
    parts = build_parts(weights_type, worker_datasets.input_type(spec),
                        batches)
    cases = list(parts) + ['no_data_round', 'round']

    def run_case(name, r):
      inputs = benchmark_tasks.round_inputs(task, config, r,
                                         empty=name == 'no_data_round')
      t0, p0, w0 = time.perf_counter(), time.process_time(), _worker_cpu()
      if name in parts:
        parts[name](weights, inputs)
      else:
        runner.run_round(inputs)
      return (time.perf_counter() - t0, time.process_time() - p0,
              _worker_cpu() - w0)

    samples = collections.defaultdict(list)
    for r in range(3 + config.rounds):
      for i in range(len(cases)):
        name = cases[(r + i) % len(cases)]   # rotate the order
        sample = run_case(name, r)
        if r >= 3:
          samples[name].append(sample)
    results = collections.OrderedDict()
    for name in cases:
      a = np.array(samples[name])
      results[name] = collections.OrderedDict(
          wall_s=float(np.median(a[:, 0])), python_cpu_s=float(a[:, 1].mean()),
          worker_cpu_s=float(a[:, 2].mean()))
    profile = None
    if _PERF_SECONDS.value > 0:
      stop = threading.Event()
      holder = {}

      def record():
        holder['profile'] = perf_profile(_PERF_SECONDS.value)
        stop.set()

      thread = threading.Thread(target=record)
      thread.start()
      r = 1000
      while not stop.is_set():
        run_case('no_data_round', r)
        r += 1
      thread.join()
      profile = holder['profile']

  print(f'{config.task}, {_ALGORITHM.value}, {config.clients_per_round} '
        f'clients, tau={config.local_steps}, batch {config.batch_size}; '
        f'median wall / mean CPU per round over {config.rounds} rounds (ms)')
  print('Run phases (s): ' + ', '.join(f'{k} {v:.2f}'
                                      for k, v in phases.items()))
  print('| part | wall | this process CPU | worker CPU |')
  print('|---|---:|---:|---:|')
  for name, r in results.items():
    print(f"| {name} | {1e3 * r['wall_s']:.1f} | "
          f"{1e3 * r['python_cpu_s']:.1f} | {1e3 * r['worker_cpu_s']:.1f} |")
  if profile:
    print()
    if 'error' in profile:
      print(f"perf profile skipped: {profile['error']}")
    else:
      print(f"Worker CPU samples during {profile['seconds']:g} s of no-data "
            'rounds (inclusive shares; nested components overlap):')
      for name, share in profile['shares_percent'].items():
        print(f'  {share:5.1f}%  {name}')
  if _OUTPUT_JSON.value:
    report = collections.OrderedDict(
        command=' '.join(['python'] + sys.argv), task=config.task,
        algorithm=_ALGORITHM.value,
        config=dict(clients_per_round=config.clients_per_round,
                    local_steps=config.local_steps,
                    batch_size=config.batch_size, rounds=config.rounds),
        phases_s=phases, parts=results, worker_perf=profile,
        environment=benchmark_report.environment_info())
    benchmark_report.write_json(report, _OUTPUT_JSON.value)


if __name__ == '__main__':
  app.run(main)
