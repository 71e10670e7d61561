r"""Round-time benchmark: TFF FedAvg, Per-FedAvg FO/HF/MAML and a pure-TF floor.

  timeout 3000 .venv/bin/python -m experiments.benchmark \
      --task=emnist_cnn --clients_per_round=10 --local_steps=5 --batch_size=32 \
      --rounds=10 --output_json=/tmp/bench_emnist_cnn.json
  # digits MLP, plus resident memory over 100 rounds of HF:
  ... --task=digits_mlp --rounds=15 --memory_rounds=100

Tasks: emnist_cnn / emnist_mlp use random data in EMNIST's shape (not real
EMNIST; timing does not depend on pixel values), digits_mlp the real
scikit-learn digits, synthetic FedProx Synthetic(1, 1).

Prints a Markdown table and writes JSON with the per-contender timings and the
ratios Per-FedAvg / FedAvg and TFF / pure-TF floor (see
`experiments.benchmark_lib`; the contenders are in
`experiments.benchmark_contenders`). All TFF computations run in an owned
`perfed_tff.accelerator.AcceleratedContext`, whose worker is stopped on exit.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
import tensorflow as tf

from experiments import benchmark_contenders
from experiments import benchmark_report
from experiments import benchmark_tasks
from experiments import benchmark_lib
from perfed_tff.accelerator.context import AcceleratedContext

_TASK = flags.DEFINE_enum('task', 'emnist_cnn', list(benchmark_tasks.TASKS),
                          'Dataset/model.')
_CLIENTS = flags.DEFINE_integer('clients_per_round', 10, 'Clients per round.')
_NUM_CLIENTS = flags.DEFINE_integer('num_clients', 20,
                                    'Population the cohort is sampled from.')
_EXAMPLES = flags.DEFINE_integer(
    'examples_per_client', 200,
    'Examples per client for the synthetic EMNIST-shaped data.')
_TAU = flags.DEFINE_integer('local_steps', 5, 'tau, local steps per round.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Batch size.')
_ROUNDS = flags.DEFINE_integer('rounds', 6, 'Measured rounds.')
_WARMUP = flags.DEFINE_integer('warmup_rounds', 1, 'Warm-up rounds.')
_CONTENDERS = flags.DEFINE_list(
    'contenders',
    'fedavg,fedavg_reduce,per_fedavg_fo,per_fedavg_hf,per_fedavg_maml,'
    'floor_fedavg,'
    'floor_fo,floor_hf,floor_maml,'
    'torch_fedavg,torch_fo,torch_hf,torch_maml',
    'What to time (the torch_* PyTorch peer is skipped, with a message, when '
    'torch is not installed). A TFF contender named NAME@K runs K rounds per '
    'invocation whatever --rounds_per_invocation says (e.g. '
    'per_fedavg_fo@1 beside per_fedavg_fo: blocks against single rounds, '
    'side by side).')
_ALPHA = flags.DEFINE_float('alpha', 0.01, 'Per-FedAvg inner step.')
_BETA = flags.DEFINE_float('beta', 0.05, 'Outer step (FedAvg client lr).')
_DELTA = flags.DEFINE_float('delta', 1e-3, 'HF finite-difference radius.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed.')
_CONCURRENCY = flags.DEFINE_integer(
    'max_concurrent_computation_calls', 2,
    'TFF worker: clients computed in parallel (<= 0: unlimited); 2 was the '
    'fastest on the 2-core benchmark machine (see docs).')
_INTRA = flags.DEFINE_integer(
    'intra_op_threads', 0,
    'TF intra-op threads, this process and the TFF worker (0: TF default).')
_INTER = flags.DEFINE_integer(
    'inter_op_threads', 0,
    'TF inter-op threads, this process and the TFF worker (0: TF default).')
_GRAPH_OPTIMIZATION = flags.DEFINE_enum(
    'graph_optimization', 'auto', ['auto', 'runtime', 'tff'],
    'Where Grappler optimizes the TFF graphs (perfed_tff.accelerator.compilation): in '
    'the worker at run time, TFF\'s static pass, or auto.')
_COMPILATION_AB = flags.DEFINE_bool(
    'compilation_ab', False,
    'Instead of the benchmark: run the TFF contenders under '
    '--graph_optimization=runtime and =tff side by side (two workers, '
    'alternating rounds) and print runtime / tff per contender.')
_TFF_CLIENT_DATA = flags.DEFINE_enum(
    'tff_client_data', 'worker', ['worker', 'datasets'],
    'How the TFF contenders get client data: "worker" (what the training '
    'program does: each client\'s examples and seed, batches built on the '
    'worker) or "datasets" (a serialized tf.data.Dataset per client).')
_ROUNDS_PER_INVOCATION = flags.DEFINE_integer(
    'rounds_per_invocation', 10,
    'TFF contenders (worker-side data) run this many rounds per invocation, '
    'as the training program does between checkpoints (10: its default '
    'with --checkpoint_every=10); 1: one `next` call per round.',
    lower_bound=1)
_EMPTY_ROUNDS = flags.DEFINE_integer(
    'empty_rounds', 5,
    'Rounds per contender with empty client data: the fixed cost of a round, '
    'subtracted for the compute-only TFF / floor ratio (0: skip).')
_MEMORY_ROUNDS = flags.DEFINE_integer(
    'memory_rounds', 0, 'Extra rounds of --memory_contender to track RSS.')
_MEMORY_CONTENDER = flags.DEFINE_string('memory_contender', 'per_fedavg_hf',
                                        'Contender of the memory check.')
_OUTPUT_JSON = flags.DEFINE_string('output_json', None, 'Write results here.')
_OUTPUT_MD = flags.DEFINE_string('output_markdown', None,
                                 'Write the Markdown table here.')


def main(argv):
  del argv
  # Thread settings reach the C++ worker (a child process, started below)
  # via TF's own environment variables, read when its runtime starts; this
  # process's runtime is not initialized yet (TF imported, no op run).
  if _INTRA.value > 0:
    os.environ['TF_NUM_INTRAOP_THREADS'] = str(_INTRA.value)
  if _INTER.value > 0:
    os.environ['TF_NUM_INTEROP_THREADS'] = str(_INTER.value)
  if _INTRA.value > 0:
    tf.config.threading.set_intra_op_parallelism_threads(_INTRA.value)
  if _INTER.value > 0:
    tf.config.threading.set_inter_op_parallelism_threads(_INTER.value)

  config = benchmark_contenders.BenchmarkConfig(
      task=_TASK.value, clients_per_round=_CLIENTS.value,
      num_clients=max(_NUM_CLIENTS.value, _CLIENTS.value),
      examples_per_client=_EXAMPLES.value, local_steps=_TAU.value,
      batch_size=_BATCH.value, rounds=_ROUNDS.value,
      warmup_rounds=_WARMUP.value, contenders=tuple(_CONTENDERS.value),
      alpha=_ALPHA.value, beta=_BETA.value, delta=_DELTA.value,
      seed=_SEED.value,
      max_concurrent_computation_calls=_CONCURRENCY.value,
      tff_client_data=_TFF_CLIENT_DATA.value,
      rounds_per_invocation=_ROUNDS_PER_INVOCATION.value,
      empty_rounds=_EMPTY_ROUNDS.value,
      memory_rounds=_MEMORY_ROUNDS.value,
      memory_contender=_MEMORY_CONTENDER.value)
  if _COMPILATION_AB.value:
    with AcceleratedContext(
        max_concurrent_computation_calls=_CONCURRENCY.value,
        graph_optimization='runtime') as runtime, AcceleratedContext(
            max_concurrent_computation_calls=_CONCURRENCY.value,
            graph_optimization='tff') as static:
      report = benchmark_lib.run_compilation_ab(
          config, {'runtime': runtime, 'tff': static}, log=logging.info)
    report['command'] = ' '.join(['python'] + sys.argv)
    print('| contender | runtime (s) | tff (s) | runtime / tff |')
    print('|---|---:|---:|---:|')
    for c, r in report['compilation_ab'].items():
      print(f"| {c} | {r['runtime_median_round_s']:.3f} | "
            f"{r['tff_median_round_s']:.3f} | {r['runtime/tff']:.3f} |")
    if _OUTPUT_JSON.value:
      benchmark_report.write_json(report, _OUTPUT_JSON.value)
    return
  with AcceleratedContext(
      max_concurrent_computation_calls=_CONCURRENCY.value,
      graph_optimization=_GRAPH_OPTIMIZATION.value) as context:
    config.graph_optimization = context.graph_optimization
    report = benchmark_lib.run_benchmark(config, log=logging.info)
  report['command'] = ' '.join(['python'] + sys.argv)
  table = benchmark_report.markdown_table(report)
  print(table)
  print()
  for name, value in report['ratios'].items():
    print(f'{name}: {value:.3f}')
  if _OUTPUT_JSON.value:
    benchmark_report.write_json(report, _OUTPUT_JSON.value)
  if _OUTPUT_MD.value:
    with open(_OUTPUT_MD.value, 'w') as f:
      f.write(table + '\n')


if __name__ == '__main__':
  app.run(main)
