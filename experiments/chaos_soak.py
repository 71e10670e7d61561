r"""Runs training under random faults and checks it ends as an uninterrupted run.

  nice -n 10 .venv/bin/python -m experiments.chaos_soak --rounds=300 --seed=0 \
      --root_output_dir=/tmp/perfed_tff_chaos   # as root, for the tmpfs

First it runs the training command (`python -m experiments.train` with
--train_flags, --rounds and --root_output_dir=<root>/reference) to its end
without faults (a finished reference with the same command is reused). Then
it runs the same command on <root>/chaos and, every --min_interval to
--max_interval seconds (drawn from --seed), injects one fault, drawn from
--faults among those that apply at that moment:

* `kill_trainer`: SIGKILL of the trainer;
* `term_trainer`: SIGTERM of the trainer (expected: exit 143, one line);
* `stop_worker`: SIGSTOP of the trainer's local `worker_binary` for 1 to
  --max_stop_seconds seconds, then SIGCONT (expected: the watchdog stops the
  run with exit 1, or the run goes on);
* `kill_worker`: SIGKILL of the local worker (expected: exit 1, one line);
* `full_disk`: <root>/chaos is a tmpfs of --tmpfs_mb MiB mounted by this
  script (as root); a file fills it for 1 to --full_disk_seconds seconds,
  then is deleted (expected: exit 1 `the disk is full`, or no effect);
  skipped with a note where mount is not permitted;
* `damage_checkpoint`: SIGKILL of the trainer, then the newest checkpoint is
  damaged (a flipped byte, a truncated or deleted file) before the restart
  (expected: the resume sets it aside and continues from the one before;
  drawn only when there is one before).

After each fault it waits for the trainer to exit (at most --exit_timeout
seconds; longer is a hang and the trainer's tree is killed) or, after a fault
it may survive (a stopped worker, a full disk), to train two more rounds or
still run 15 s later; a trainer with no output and no new round for
--exit_timeout seconds is a hang too. It checks that a failed exit wrote
exactly one `train.py: error:` line, last, with no traceback, and a
documented exit status (1, 2, 129, 130, 143; -9 only after its own SIGKILL),
that no `worker_binary` of the trainer outlives it (a leftover is killed and
reported), and reruns the same command. A run that
ends on its own with a failure is a finding and is rerun too (3 in a row
without a fault in between: the soak stops). After --stalled_faults faults
in a row with no new checkpoint between them (start-up can take longer than
the intervals), the next fault waits for a new checkpoint, so the run always
gets through. A resume refused with exit 2 after a damaged checkpoint is a
finding; the soak moves the checkpoint to <root>/set_aside and reruns.

When the chaos run finishes, its `final_model.npz` files are compared
exactly (numpy) and its `metrics/*.csv` row by row (wall-clock columns
`*_time_in_seconds` excluded) with the reference. The report (stdout table
and --output JSON, also written when the soak is interrupted): faults by
kind and their outcomes (exit statuses, error lines with numbers blanked),
reaction seconds (from the fault to the trainer's exit, or to its second
round after the fault ended), restarts, rounds trained again, time lost
(chaos wall time minus the reference's), identical or not (and where), what
the run left (checkpoints it set aside, worker logs and autograph files in
the lives' TMPDIR, <root>/tmp) and findings (tracebacks, hangs, leftover
processes, undocumented statuses, failures without a fault). Every life's
stdout/stderr is in <root>/logs. Exit status: 0 when the chaos run finished
identical to the reference with no findings, 1 otherwise, 2 for a bad flag.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shlex
import signal
import sys
import time

from absl import app
from absl import flags
import numpy as np

from experiments import chaos_faults
from experiments import chaos_report
from experiments import chaos_soak_lib

PROGRAM = os.path.basename(__file__)

DEFAULT_TRAIN_FLAGS = ('--algorithm=per_fedavg_hf --dataset=digits '
                       '--clients_per_round=10 --local_steps=300 '
                       '--eval_every=5 --checkpoint_every=10 --seed=0')

flags.DEFINE_integer('rounds', 300, 'Rounds of the training run, >= 1.')
flags.DEFINE_integer('seed', 0, 'Seed of the fault schedule (times, kinds, '
                     'durations, damage), >= 0.')
flags.DEFINE_float('min_interval', 10.0, 'Least seconds between faults, > 0.')
flags.DEFINE_float('max_interval', 40.0, 'Most seconds between faults, >= '
                   '--min_interval.')
flags.DEFINE_list('faults', list(chaos_faults.FAULTS), f'Fault kinds to draw '
                  f'from: {", ".join(chaos_faults.FAULTS)}.')
flags.DEFINE_string('root_output_dir', None, 'Directory of the soak: '
                    'reference/, chaos/ (the tmpfs), logs/, set_aside/, '
                    'chaos_result/. New, empty, or an earlier soak\'s (its '
                    'chaos run is redone, a matching reference reused).')
flags.DEFINE_string('output', '', 'JSON report (default: '
                    '<root_output_dir>/chaos_soak.json).')
flags.DEFINE_string('train_flags', DEFAULT_TRAIN_FLAGS, 'Flags of '
                    '`python -m experiments.train` (shell words) besides '
                    '--rounds, --root_output_dir and --noprogress, which '
                    'this script sets.')
flags.DEFINE_float('exit_timeout', 120.0, 'Seconds a trainer may take to '
                   'exit (or go on) after a fault before it counts as hung, '
                   '> 0.')
flags.DEFINE_float('max_stop_seconds', 8.0, 'stop_worker: longest SIGSTOP, '
                   '>= 1 (drawn from 1..this).')
flags.DEFINE_float('full_disk_seconds', 6.0, 'full_disk: longest time the '
                   'disk stays full, >= 1 (drawn from 1..this).')
flags.DEFINE_integer('tmpfs_mb', 64, 'Size of the tmpfs under the chaos run '
                     '(MiB), >= 8.')
flags.DEFINE_integer('max_faults', 0, 'Stop injecting after this many '
                     'faults (0: no limit); the run then finishes.')
flags.DEFINE_integer('stalled_faults', 3, 'After this many faults in a row '
                     'with no new checkpoint between them, the next fault '
                     'waits for a new checkpoint (so the run cannot be '
                     'stalled forever when start-up takes longer than the '
                     'intervals), >= 1.')
flags.DEFINE_float('timeout', 4 * 3600.0, 'Seconds the whole chaos run may '
                   'take before the soak gives up, > 0.')
FLAGS = flags.FLAGS


def fail(message: str, status: int = 2):
  print(f'{PROGRAM}: error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


def parse_flags(argv):
  """absl's flag parser, its errors one line with exit 2."""
  try:
    rest = FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0])
  if len(rest) > 1:
    fail(f'unexpected arguments {rest[1:]}')
  return rest


def check_flags() -> list[str]:
  """Checks every flag before any work (one line, exit 2); returns the
  training flags."""
  if FLAGS.rounds < 1:
    fail(f'--rounds: must be >= 1, got {FLAGS.rounds}')
  if FLAGS.seed < 0:
    fail(f'--seed: must be >= 0, got {FLAGS.seed}')
  for name in ('min_interval', 'exit_timeout', 'timeout'):
    value = FLAGS[name].value
    if not (np.isfinite(value) and value > 0):
      fail(f'--{name}: must be a finite number > 0, got {value}')
  if not (np.isfinite(FLAGS.max_interval)
          and FLAGS.max_interval >= FLAGS.min_interval):
    fail(f'--max_interval: must be >= --min_interval ({FLAGS.min_interval}),'
         f' got {FLAGS.max_interval}')
  for name in ('max_stop_seconds', 'full_disk_seconds'):
    value = FLAGS[name].value
    if not (np.isfinite(value) and value >= 1):
      fail(f'--{name}: must be a finite number >= 1, got {value}')
  if FLAGS.tmpfs_mb < 8:
    fail(f'--tmpfs_mb: must be >= 8, got {FLAGS.tmpfs_mb}')
  if FLAGS.stalled_faults < 1:
    fail(f'--stalled_faults: must be >= 1, got {FLAGS.stalled_faults}')
  if FLAGS.max_faults < 0:
    fail(f'--max_faults: must be >= 0, got {FLAGS.max_faults}')
  unknown = [f for f in FLAGS.faults if f not in chaos_faults.FAULTS]
  if unknown or not FLAGS.faults:
    fail(f'--faults: must be a non-empty list of '
         f'{", ".join(chaos_faults.FAULTS)}, got '
         f'{",".join(FLAGS.faults) or "nothing"}')
  if not FLAGS.root_output_dir:
    fail('--root_output_dir: required (a new or empty directory, or an '
         'earlier soak\'s)')
  root = os.path.abspath(FLAGS.root_output_dir)
  if (os.path.exists(root) and not os.path.isdir(root)):
    fail(f'--root_output_dir: {root} is not a directory')
  if (os.path.isdir(root) and os.listdir(root)
      and not os.path.exists(os.path.join(root, '.chaos_soak'))):
    fail(f'--root_output_dir: {root} is not empty and holds no earlier '
         'chaos soak; choose a new or empty directory')
  try:
    train_flags = shlex.split(FLAGS.train_flags)
  except ValueError as e:
    fail(f'--train_flags: {e}')
  for word in train_flags:
    name = word.lstrip('-').split('=')[0]
    if name in ('rounds', 'root_output_dir', 'progress', 'noprogress'):
      fail(f'--train_flags: must not set --{name} (this script sets it), '
           f'got {word}')
    if name == 'workers':
      fail('--train_flags: must not set --workers (the soak targets the '
           'local worker)')
  if FLAGS.output and os.path.isdir(FLAGS.output):
    fail(f'--output: {FLAGS.output} is a directory')
  return train_flags


def _on_signal(signum, frame):
  del frame
  raise chaos_soak_lib.Interrupted(signum)


def main(argv):
  del argv
  train_flags = check_flags()
  root = os.path.abspath(FLAGS.root_output_dir)
  output = os.path.abspath(FLAGS.output or os.path.join(root,
                                                        'chaos_soak.json'))
  for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(signum, _on_signal)

  def command_for(run_root):
    return [sys.executable, '-m', 'experiments.train', *train_flags,
            f'--rounds={FLAGS.rounds}', f'--root_output_dir={run_root}',
            '--noprogress']

  soak = reference = None
  status = 1
  try:
    chaos_soak_lib.prepare_root(root)
    reference = chaos_soak_lib.run_reference(
        root, command_for(os.path.join(root, 'reference')))
    if reference['returncode'] != 0:
      fail(f'the reference run failed (exit {reference["returncode"]}): '
           f'{reference["last_line"]}', 1)
    settings = chaos_soak_lib.Settings(**{
        f.name: FLAGS[f.name].value
        for f in dataclasses.fields(chaos_soak_lib.Settings)})
    soak = chaos_soak_lib.Soak(root, command_for,
                               list(dict.fromkeys(FLAGS.faults)),
                               random.Random(FLAGS.seed), settings)
    print('chaos: ' + ' '.join(shlex.quote(c) for c in soak.command),
          flush=True)
    end = soak.run()
    leftovers = soak.inspect_leftovers()
    comparison = None
    if end == 'finished':
      comparison = chaos_report.compare_runs(os.path.join(root, 'reference'),
                                             soak.chaos_root)
    soak.unmount()
    report = chaos_report.summarize(soak, reference, comparison)
    report['run_folder_leftovers'] = leftovers
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, 'w') as f:
      json.dump(report, f, indent=1, default=str)
    chaos_report.print_table(report)
    print(f'report: {output}')
    status = 0 if report['identical'] and not report['findings'] else 1
  except chaos_soak_lib.Interrupted as e:
    if soak is not None:
      soak.abort()
      soak.finished = f'interrupted by {e}'
      if soak.started is not None:
        soak.wall_seconds = round(time.monotonic() - soak.started, 1)
      try:
        report = chaos_report.summarize(soak, reference, None)
        report['run_folder_leftovers'] = soak.inspect_leftovers()
        with open(output, 'w') as f:
          json.dump(report, f, indent=1, default=str)
      except Exception:  # pylint: disable=broad-except
        pass
      soak.unmount()
    print(f'{PROGRAM}: error: {e} received; the soak was stopped and its '
          'trainer killed', file=sys.stderr, flush=True)
    status = 128 + e.signum
  finally:
    if soak is not None and soak.mounted:
      soak.abort()
      soak.unmount()
  sys.exit(status)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)