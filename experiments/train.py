r"""Trains Per-FedAvg (or FedAvg) with checkpoints, exact resume and metrics.

  python -m experiments.train --algorithm=per_fedavg_hf --compare_fedavg \
      --dataset=synthetic --rounds=30 --clients_per_round=10 \
      --root_output_dir=/tmp/perfed_tff_demo

Rerunning the same command resumes from the latest checkpoint under
--root_output_dir/<algorithm>/ (--root_output_dir/<experiment_name>/
<algorithm>/ with --experiment_name), where the run also writes its
settings (config.json, and hparams.csv: one row of every setting, flat).
The optimizers, as in TFF's research binaries:

  python -m experiments.train --client_optimizer=adam \
      --client_learning_rate=0.001 --server_optimizer=sgd \
      --server_learning_rate=1.0 --server_sgd_momentum=0.9

(--client_optimizer / --server_optimizer: sgd, adam, adamw, adagrad, yogi,
rmsprop from `tff.learning.optimizers`, each with its hyperparameters as
--client_<optimizer>_<name> / --server_<optimizer>_<name> flags; by default
SGD at --beta on the clients and SGD at 1.0 on the server). A changed
optimizer setting is a different run: resuming one is refused.

With --workers=host:port,... each round's clients run on TFF workers
started by `python -m perfed_tff.runtime.worker --port=N`. All logic lives in
`perfed_tff.program`; exit status 2 means a bad flag (or an unusable
checkpoint, or a --root_output_dir in use by another run), 1 a failed run,
130 an interrupted one (143 SIGTERM, 129 SIGHUP).
"""

import math


if __name__ == '__main__':  # Not when imported (tests, notebooks).
  from experiments import startup  # pylint: disable=g-import-not-at-top
  startup.begin()

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging

from experiments import cli

cli.define_training_flags()
flags.DEFINE_bool('compare_fedavg', False, 'Also train FedAvg with the same '
                  'settings and print a side-by-side summary.')
FLAGS = flags.FLAGS


def format_summary(result) -> str:
  """One summary line, then the written paths."""
  parts = [f'{result.algorithm}: {result.rounds} rounds in '
           f'{result.seconds:.1f}s', f'train loss {result.train_loss:.4f}']
  if result.personalized_loss is not None:
    parts.append(f'train personalized loss {result.personalized_loss:.4f}')
  acc = (result.eval_metrics or {}).get('seen/step_1/accuracy_mean')
  if acc is not None:
    parts.append(f'personalized accuracy {acc:.4f}')
  if result.resumed_from is not None:
    parts.append(f'resumed from round {result.resumed_from}')
  lines = [', '.join(parts)]
  lines += [f'  {name}: {path}' for name, path in result.paths.items()]
  return '\n'.join(lines)


def format_comparison(results) -> str:
  """Side-by-side final train loss and (with the evaluation) personalized loss
  and accuracy after one step at alpha on each client's train data, measured
  on its test data; without it, the personalized loss is Per-FedAvg's
  training f(w~; D') (n/a for FedAvg)."""
  def num(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
      return 'n/a'
    return f'{v:.4f}'
  have_eval = all(r.eval_metrics for r in results)
  rows = [('algorithm', 'train loss', 'personalized loss',
           'personalized accuracy', 'global accuracy')]
  for r in results:
    ev = r.eval_metrics or {}
    pl = ev.get('seen/step_1/loss_mean') if have_eval else r.personalized_loss
    rows.append((r.algorithm, num(r.train_loss), num(pl),
                 num(ev.get('seen/step_1/accuracy_mean')),
                 num(ev.get('seen/step_0/accuracy_mean'))))
  widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
  return '\n'.join('  '.join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                   for row in rows)


def main(argv):
  del argv
  # Our own lines go through cli.log; TF/TFF's INFO chatter is hidden.
  logging.set_verbosity(logging.WARNING)
  from perfed_tff.program import training_loop  # pylint: disable=g-import-not-at-top
  from perfed_tff.program import interrupts  # pylint: disable=g-import-not-at-top
  # SIGINT/SIGTERM/SIGHUP now stop the run: it keeps its last checkpoint,
  # its workers stop and `cli.guard` prints one line.
  interrupts.start()

  def work():
    config = cli.training_config()
    return training_loop.run(
        config, write=cli.log,
        also_train=('fedavg',) if FLAGS.compare_fedavg else ())

  results = cli.guard(work, 'Rerun the same command to resume from the last '
                      'checkpoint.', traceback_dir=FLAGS.root_output_dir)
  for result in results:
    print(format_summary(result), flush=True)
  if len(results) > 1:
    print(format_comparison(results), flush=True)
  cli.exit_now(0)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
