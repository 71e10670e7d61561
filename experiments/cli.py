"""The flags every experiment binary shares: one per `TrainingConfig` field.

`define_training_flags(exclude=...)` defines them (a binary leaves out the
fields it replaces, e.g. compare.py's --algorithms/--seeds for --algorithm/
--seed; `only=` defines a few, e.g. reproduce_paper.py's `OPTIMIZER_FLAGS`);
`training_config(**overrides)` builds the config; `fail` prints the
one-line error and exits (2 for a usage error); `parse_flags` makes absl's own
flag errors one line with exit 2 too; `guard` runs a binary's work and turns
every failure into one line and an exit status (2 usage, 1 failure, 128 +
signal number for SIGINT/SIGTERM/SIGHUP).
"""

from __future__ import annotations

import errno
import inspect
import os
import re
import signal
import sys
import time
import traceback

from absl import flags

from perfed_tff import algorithms
from perfed_tff import checks
from perfed_tff.data import registry
from perfed_tff.program import settings as settings_lib

FLAGS = flags.FLAGS
_D = settings_lib.TrainingConfig()
_OPTIMIZER_NAMES = ', '.join(f"'{name}'" for name in algorithms.OPTIMIZERS)


def _names(names) -> str:
  return ', '.join(f"'{name}'" for name in names)


def algorithm_help() -> str:
  """Help of --algorithm: every name of the algorithm registry
  (`perfed_tff.algorithms.ALGORITHMS`), read when called."""
  return (f'One of {_names(algorithms.ALGORITHMS)} (perfed_tff.algorithms: '
          "'fedavg' is TFF's weighted FedAvg (perfed_tff.fed_avg), "
          "'per_fedavg_<variant>' "
          "Per-FedAvg's FO, HF or MAML variant).")


def dataset_help() -> str:
  """Help of --dataset: every name of the dataset registry
  (`perfed_tff.data.registry.DATASETS`), read when called."""
  return (f'One of {_names(registry.DATASETS)} (perfed_tff.data.registry); '
          f'{_names(registry.DOWNLOADED)} read their files from --cache_dir, '
          'the others need none.')


def _optimizer_help() -> dict:
  """Help of the optimizer flags (`settings_lib.optimizer_fields`)."""
  out = {
      'client_optimizer': (
          f'Client optimizer, one of {_OPTIMIZER_NAMES} '
          "(tff.learning.optimizers.build_<name>; 'sgd' is build_sgdm). It "
          "applies each local step's direction (Per-FedAvg's meta-gradient, "
          "FedAvg's gradient); its state starts afresh every round. Its "
          'hyperparameters: the --client_<name>_* flags.'),
      'client_learning_rate': (
          'Learning rate of the client optimizer, > 0 (default: --beta; '
          'give only one of the two).'),
      'server_optimizer': (
          f'Server optimizer applying the averaged client update, one of '
          f'{_OPTIMIZER_NAMES}. Its hyperparameters: the --server_<name>_* '
          'flags.'),
      'server_learning_rate': (
          'Learning rate of the server optimizer, > 0 (SGD at 1.0: the new '
          'global model is the average of the client models).'),
  }
  for side in settings_lib.SIDES:
    for name, (builder, hparams) in algorithms.OPTIMIZERS.items():
      for hparam in hparams:
        default = inspect.signature(builder).parameters[hparam].default
        default = ('none (plain SGD)' if default is None else f'{default:g}')
        limits = ('in [0, 1)' if hparam in ('momentum', 'beta_1', 'beta_2',
                                            'decay')
                  else f'in [0, {algorithms.MAX_OPTIMIZER_HPARAM:g}]')
        out[f'{side}_{name}_{hparam}'] = (
            f'{hparam} of the {side} optimizer with --{side}_optimizer='
            f'{name} (tff.learning.optimizers.{builder.__name__}), {limits}; '
            f'default {default}.')
  return out


OPTIMIZER_FLAGS = settings_lib.OPTIMIZER_FIELDS
# Where the binaries' defaults differ from the library's.
BINARY_DEFAULTS = {'runtime': 'accelerated'}

_HELP = {
    'algorithm': algorithm_help(),
    'dataset': dataset_help(),
    'dataset_options': 'Dataset options, key=value,... (e.g. num_users=50,'
                       'classes_per_user=2,num_unseen_users=10).',
    'cache_dir': 'Existing directory with the dataset files '
                 '(emnist_all.sqlite, shakespeare.sqlite).',
    'rounds': 'Total training rounds, >= 1.',
    'clients_per_round': 'Clients sampled per round, 1..population.',
    'alpha': 'Inner (personalization) step, > 0.',
    'beta': "Outer (meta) step, > 0: the default learning rate of the "
            "client optimizer (FedAvg's client learning rate); see "
            '--client_learning_rate.',
    'delta': 'HF finite-difference radius, > 0.',
    'local_steps': 'Local steps per round (tau), >= 1.',
    'inner_steps': 'nu: SGD steps at alpha inside the meta-objective (1: the '
                   'paper); evaluate with --eval_steps=nu to match.',
    'batch_size': 'Client batch size, >= 1.',
    'client_weighting': "'uniform' (the paper) or 'num_examples'.",
    **_optimizer_help(),
    'seed': 'Seed of data split, model, sampling and shuffling, >= 0.',
    'root_output_dir': 'Writable directory for the run folders.',
    'experiment_name': 'Folder name grouping runs: a run writes to '
                       '<root_output_dir>/<experiment_name>/<algorithm>/ '
                       '(empty: <root_output_dir>/<algorithm>/).',
    'checkpoint_every': 'Checkpoint every N rounds (and at the end), >= 1.',
    'keep_checkpoints': 'Latest checkpoints kept, >= 1.',
    'eval_every': 'Personalized evaluation at round 0, every N rounds and at '
                  'the end; 0 disables it.',
    'eval_clients': 'Clients evaluated per population; 0: all.',
    'eval_steps': 'Adaptation steps k the evaluation measures (ints >= 1).',
    'eval_protocols': "Evaluation protocols: 'heldout' (the step on the "
                      "user's train data; default) and/or 'paper' (the step "
                      "on its test data, as the paper is quoted).",
    'adapt_batch_size': 'Batch of each adaptation step (default: '
                        '--batch_size).',
    'runtime': "Where the computations run: 'accelerated' (the binaries' "
               "default: the owned runtime with the accelerator), 'owned' "
               "(perfed_tff.runtime: a worker this program starts, "
               "supervises and stops) or 'tff' (TFF's own context: public "
               'TFF only). The same weights and metrics in all three.',
    'workers': 'host:port,... of TFF workers (python -m '
               'perfed_tff.runtime.worker); empty: one local worker.',
    'worker_timeout': 'Seconds to wait for an unreachable worker, > 0.',
    'graph_optimization': "Where Grappler optimizes the TFF graphs: 'runtime' "
                          "(in the worker), 'tff' (TFF's static pass) or "
                          "'auto'.",
    'progress': 'Progress bar; --noprogress logs one line per round.',
    'round_timeout': 'Seconds a training round or checkpoint write may take '
                     '(evaluations 10x) before the run stops; 0: '
                     'max(60, 20 x the median round), 600 until measured.',
    'rounds_per_invocation': 'Training rounds run in one TFF invocation, at '
                             'most (never past a checkpoint or evaluation '
                             'round); 0: chosen by the program (up to 10); '
                             '1: one per invocation. Same results.',
}


def define_training_flags(exclude=(), only=None) -> None:
  """Defines one flag per `TrainingConfig` field not in `exclude` (and in
  `only`, when given)."""
  for name, help_text in _HELP.items():
    if name in exclude or (only is not None and name not in only):
      continue
    default = BINARY_DEFAULTS.get(name, getattr(_D, name))
    if name == 'dataset_options':
      flags.DEFINE_string(name, '', help_text)
    elif name in ('workers',):
      flags.DEFINE_string(name, '', help_text)
    elif name in ('eval_steps', 'eval_protocols'):
      flags.DEFINE_list(name, [str(k) for k in default], help_text)
    elif name == 'adapt_batch_size':
      flags.DEFINE_integer(name, None, help_text)
    elif name in OPTIMIZER_FLAGS and default is None:
      # client_learning_rate (None: beta) and the hyperparameters (None:
      # the builder's default).
      flags.DEFINE_float(name, None, help_text)
    elif isinstance(default, bool):
      flags.DEFINE_bool(name, default, help_text)
    elif isinstance(default, int):
      flags.DEFINE_integer(name, default, help_text)
    elif isinstance(default, float):
      flags.DEFINE_float(name, default, help_text)
    else:
      flags.DEFINE_string(name, default, help_text)


def training_config(**overrides) -> settings_lib.TrainingConfig:
  """The config of the defined flags (and `overrides`), validated.

  Raises:
    checks.ArgumentError: a bad value.
  """
  values = {}
  for name in _HELP:
    if name in overrides:
      values[name] = overrides[name]
    elif name in FLAGS:
      values[name] = FLAGS[name].value
  if 'eval_steps' in values and not isinstance(values['eval_steps'], tuple):
    values['eval_steps'] = checks.int_list('eval_steps', values['eval_steps'],
                                           1)
  if (values.get('client_learning_rate') is not None and 'beta' in FLAGS
      and 'beta' not in overrides and FLAGS['beta'].present):
    # --beta given at its default value: config.validate cannot see it.
    raise checks.ArgumentError(
        'client_learning_rate', f'and beta={FLAGS.beta!r} both set the '
        'client learning rate (beta is its default); give only one')
  return settings_lib.validate(settings_lib.TrainingConfig(**values))


def program_name() -> str:
  return os.path.basename(sys.argv[0] or 'perfed_tff')


def fail(message: str, status: int = checks.EXIT_USAGE, *,
         hard: bool = False):
  """Prints `<program>: error: <message>` and exits with `status`. `hard`:
  stop any worker this process started and leave with `os._exit`, skipping
  interpreter teardown (where TensorFlow's threads can abort the process)."""
  print(f'{program_name()}: error: {message}', file=sys.stderr, flush=True)
  if not hard:
    sys.exit(status)
  for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(signum, signal.SIG_IGN)  # A second Ctrl-C changes nothing.
  exit_now(status)


def exit_now(status: int = 0):
  """Ends the process with `status` once its work is done: stops the
  workers this process started (the owned runtime's, and TFF's own
  context's: `startup.release_tff_context`), runs the atexit work (TF's
  generated-code files, ...) and flushes the output, then leaves with
  `os._exit`, skipping interpreter teardown: TensorFlow's module and thread
  teardown took 1.6 s of the 20-round README command (docs/performance.md),
  and its threads can abort the process there. Every output file is closed
  before this."""
  from perfed_tff.program import launch  # pylint: disable=g-import-not-at-top
  launch.stop_owned_workers()
  try:
    import atexit  # pylint: disable=g-import-not-at-top
    atexit._run_exitfuncs()  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    pass
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):
      pass
  os._exit(status)  # pylint: disable=protected-access


def _first_line(error: BaseException) -> str:
  """The most telling line of a (possibly multi-line gRPC/TF) message."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  for line in lines:  # TF errors from a worker: "...Error: <what>" lines.
    for marker in ('InvalidArgument', 'Received a label value', 'Error:'):
      if marker in line:
        return line[:300]
  return (lines[0] if lines else type(error).__name__)[:300]


def as_flags(message: str) -> str:
  """A library message with its parameters (`name`, in backticks) named as
  this binary's flags (--name)."""
  return re.sub(r'`(\w+)`', lambda m: (f'--{m[1]}' if m[1] in _HELP
                                        or m[1] in FLAGS else m[0]), message)


def stopped(interrupt: KeyboardInterrupt) -> tuple[str, int]:
  """('interrupted' or 'stopped by SIGTERM', exit status 128 + signum) of an
  interrupt (`perfed_tff.program.interrupts.Interrupted` carries its signal; a plain
  KeyboardInterrupt is SIGINT)."""
  signum = getattr(interrupt, 'signum', signal.SIGINT)
  if signum == signal.SIGINT:
    return 'interrupted', 128 + signum
  return f'stopped by {signal.Signals(signum).name}', 128 + signum


def guard(work, resume_hint: str, traceback_dir=None):
  """Runs `work()` and returns its result; any failure ends the process with
  one line on stderr and its exit status (see the module docstring)."""
  from perfed_tff.program import launch  # pylint: disable=g-import-not-at-top
  from perfed_tff.program import training_loop  # pylint: disable=g-import-not-at-top
  try:
    return work()
  except checks.ArgumentError as e:
    fail(e.flag_message, checks.EXIT_USAGE, hard=True)
  except training_loop.CheckpointError as e:
    fail(as_flags(str(e)), checks.EXIT_USAGE, hard=True)
  except training_loop.NonFiniteLossError as e:
    fail(as_flags(str(e)), 1, hard=True)
  except launch.worker_error_types() as e:
    fail(f'{as_flags(str(e))} {resume_hint}', 1, hard=True)
  except KeyboardInterrupt as e:
    what, status = stopped(e)
    if getattr(e, 'phase', None):
      what += f' during {e.phase}'
    fail(f'{what}; {resume_hint[0].lower()}{resume_hint[1:]}', status,
         hard=True)
  except OSError as e:
    where = f' ({e.filename})' if e.filename else ''
    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
      reason = 'the disk is full'
    fail(f'{reason}{where}; {resume_hint[0].lower()}{resume_hint[1:]}', 1,
         hard=True)
  except Exception as e:  # pylint: disable=broad-except
    saved = ''
    if traceback_dir and os.path.isdir(traceback_dir):
      path = os.path.join(traceback_dir, 'error_traceback.txt')
      try:
        with open(path, 'w') as f:
          traceback.print_exc(file=f)
        saved = f' (traceback in {path})'
      except OSError:
        pass
    fail(f'{type(e).__name__}: {_first_line(e)}{saved}', 1, hard=True)


def parse_flags(argv):
  """absl flags parser whose errors are one line and exit 2."""
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0])
  if len(rest) > 1:
    fail(f'unexpected arguments {rest[1:]}')
  return rest


def log(line: str) -> None:
  print(f'{time.strftime("%H:%M:%S")} {line}', file=sys.stderr, flush=True)
