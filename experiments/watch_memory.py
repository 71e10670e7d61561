r"""Runs a training command and records the memory of its processes.

  python -m experiments.watch_memory --output=/tmp/mem.json -- \
      python -m experiments.train --dataset=emnist --cache_dir=DIR ...

Samples, every --interval seconds, the resident memory (RSS) of the command's
process (the trainer) and of its `worker_binary` descendants (the TFF
worker), and writes JSON: the wall time, the peak RSS of each, the trainer's
RSS at every sample (to see whether it grows with rounds), the time when
`<run_dir>/metrics/train.csv` first held a round (--run_dir: the end of
the first round, so start-up is about that minus the first round's time) and the
per-round times from that CSV. Exit status: the command's.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time


def _rss(process) -> int:
  try:
    return process.memory_info().rss
  except Exception:  # pylint: disable=broad-except  # Gone meanwhile.
    return 0


def _round_seconds(train_csv: str) -> list[float]:
  if not os.path.exists(train_csv):
    return []
  with open(train_csv, newline='') as f:
    return [float(r['training_time_in_seconds']) for r in csv.DictReader(f)
            if r.get('training_time_in_seconds')]


def watch(command: list[str], interval: float, run_dir: str = None) -> dict:
  """Runs `command` to its end; returns the measurements."""
  import psutil  # pylint: disable=g-import-not-at-top
  start = time.monotonic()
  child = subprocess.Popen(command)
  trainer = psutil.Process(child.pid)
  samples, worker_peak, first_round_at = [], 0, None
  train_csv = run_dir and os.path.join(run_dir, 'metrics', 'train.csv')
  while child.poll() is None:
    workers = [p for p in trainer.children(recursive=True)
               if 'worker_binary' in ' '.join(_cmdline(p))]
    rss = _rss(trainer)
    if rss:
      samples.append([round(time.monotonic() - start, 1), rss])
    worker_peak = max([worker_peak] + [_rss(w) for w in workers])
    if first_round_at is None and train_csv and _round_seconds(train_csv):
      first_round_at = time.monotonic() - start
    time.sleep(interval)
  rounds = _round_seconds(train_csv) if train_csv else []
  return dict(
      command=command, returncode=child.returncode,
      wall_seconds=round(time.monotonic() - start, 1),
      trainer_peak_rss_mib=round(max((s[1] for s in samples), default=0)
                                 / 2**20, 1),
      worker_peak_rss_mib=round(worker_peak / 2**20, 1),
      trainer_rss_mib=[[t, round(r / 2**20, 1)] for t, r in samples],
      first_round_seen_at_seconds=first_round_at,
      rounds=len(rounds),
      round_seconds_median=(statistics.median(rounds[1:]) if len(rounds) > 1
                            else None),
      first_round_seconds=rounds[0] if rounds else None)


def _cmdline(process) -> list[str]:
  try:
    return process.cmdline()
  except Exception:  # pylint: disable=broad-except
    return []


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--output', required=True, help='JSON file to write.')
  parser.add_argument('--interval', type=float, default=1.0)
  parser.add_argument('--run_dir', default=None,
                      help='The run folder, for the round times.')
  parser.add_argument('command', nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ['--'] else args.command
  if not command or args.interval <= 0:
    parser.error('give a command after -- and an --interval > 0')
  result = watch(command, args.interval, args.run_dir)
  with open(args.output, 'w') as f:
    json.dump(result, f, indent=1)
  print(json.dumps({k: v for k, v in result.items()
                    if k != 'trainer_rss_mib'}), file=sys.stderr)
  return result['returncode']


if __name__ == '__main__':
  sys.exit(main())
