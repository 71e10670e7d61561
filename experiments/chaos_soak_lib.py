"""The run loop of a chaos soak: lives of a training command, faults between.

`Soak.run` runs the training command on `<root>/chaos` to its end and, at
random intervals (drawn from its seed), injects one fault of those that apply
at that moment (`chaos_faults`); after each it waits for the trainer to exit
or go on, judges the exit (a documented status, one error line, no
traceback, no leftover worker, how a damaged checkpoint was resumed past)
and reruns the command. `run_reference` runs (or reuses) the uninterrupted
run the chaos run is compared with (`chaos_report`). The flags, their checks
and the program are `experiments/chaos_soak.py`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time

import psutil

from experiments import chaos_faults
from experiments import chaos_report

# Documented exit statuses: 0, 2 bad input, 1 failed run, 128 + signal.
DOCUMENTED = (0, 1, 2, 129, 130, 143)
EXPECTED = {  # Fault -> exit statuses that are as documented.
    'kill_trainer': (-signal.SIGKILL,),
    'damage_checkpoint': (-signal.SIGKILL,),
    'term_trainer': (143,),
    'kill_worker': (1,),
    'stop_worker': (1,),
    'full_disk': (1,),
}
SETTLE_SECONDS = 15.0  # How long a fault that need not end the run is watched.


class Interrupted(Exception):
  """SIGINT/SIGTERM/SIGHUP of this script."""

  def __init__(self, signum):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


@dataclasses.dataclass(frozen=True)
class Settings:
  """The soak's settings (`experiments/chaos_soak.py`'s flags of the same
  names, checked there) that the run loop and the report read."""
  rounds: int
  seed: int
  min_interval: float
  max_interval: float
  exit_timeout: float
  max_stop_seconds: float
  full_disk_seconds: float
  tmpfs_mb: int
  max_faults: int
  stalled_faults: int
  timeout: float


# ------------------------------------------------------------------ soak

class Soak:
  """The chaos run: lives of the training command, faults between them."""

  def __init__(self, root: str, command_for, kinds: list, rng,
               settings: Settings):
    self.root = root
    self.chaos_root = os.path.join(root, 'chaos')
    self.log_dir = os.path.join(root, 'logs')
    self.command = command_for(self.chaos_root)
    self.kinds = kinds
    self.rng = rng
    self.settings = settings
    self.lives: list[dict] = []
    self.faults: list[dict] = []
    self.findings: list[str] = []
    self.notes: list[str] = []
    self.mounted = self.used_tmpfs = False
    self.finished, self.wall_seconds, self.started = None, 0.0, None
    self.rounds_redone = 0
    self.manual_set_asides: list[str] = []
    self._pending_damage = None
    self._exit_round = None  # The last round in train.csv at the last exit.
    self._life = None
    self._last_fault_in_life = None  # (life, kind, time) of a survived one.
    self.hangs = 0
    self.deferred = 0  # Faults held back until a new checkpoint.
    self.deferred_seconds = 0.0

  def _checkpoint_round(self) -> int:
    newest = chaos_faults.newest_checkpoint(self.chaos_root)
    return newest[0] if newest else -1

  # --- the tmpfs
  def mount(self) -> None:
    os.makedirs(self.chaos_root, exist_ok=True)
    if 'full_disk' not in self.kinds:
      return
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o',
                        f'size={self.settings.tmpfs_mb}m', 'tmpfs',
                        self.chaos_root],
                       capture_output=True, text=True)
    if r.returncode == 0:
      self.mounted = self.used_tmpfs = True
      return
    why = chaos_faults.last_line(r.stderr) or f'exit {r.returncode}'
    note = (f'full_disk skipped: cannot mount a tmpfs on {self.chaos_root} '
            f'({why})')
    print(note, flush=True)
    self.notes.append(note)
    self.kinds = [k for k in self.kinds if k != 'full_disk']

  def unmount(self) -> None:
    if not self.mounted:
      return
    result = os.path.join(self.root, 'chaos_result')
    shutil.rmtree(result, ignore_errors=True)
    shutil.copytree(self.chaos_root, result, symlinks=True)
    if subprocess.run(['umount', self.chaos_root]).returncode != 0:
      subprocess.run(['umount', '-l', self.chaos_root])
    self.mounted = False

  # --- lives
  def _start(self) -> chaos_faults.Life:
    life = chaos_faults.Life(len(self.lives), self.command, self.log_dir,
                             os.path.join(self.root, 'tmp'))
    self._life = life
    return life

  def _finish(self, life: chaos_faults.Life, fault=None) -> dict:
    """Records the end of `life` (already exited): status, line, leftovers."""
    life.close()
    text = life.stderr()
    rc = life.proc.returncode
    errors = [l for l in text.splitlines() if l.startswith('train.py: error')]
    last = chaos_faults.last_line(text)
    record = dict(index=life.index, seconds=round(time.monotonic()
                                                  - life.started, 1),
                  returncode=rc, last_line=last[:400],
                  fault=fault['kind'] if fault else None,
                  stderr=os.path.relpath(life.stderr_path, self.root))
    resumed = re.findall(r'resuming from round (\d+)', text)
    record['resumed_from'] = int(resumed[0]) if resumed else None
    if resumed and self._exit_round is not None:
      # Rounds after the checkpoint it resumed from are trained again (a
      # life killed before it logged its resume cut nothing).
      self.rounds_redone += max(0, self._exit_round - int(resumed[0]))
    heal = [l for l in text.splitlines()
            if re.search(r'set aside|aside|corrupt|damaged', l, re.I)]
    if heal:
      record['checkpoint_lines'] = [l[:400] for l in heal[:3]]
    where = f'life {life.index}'
    if 'Traceback' in text:
      self.findings.append(f'{where}: a traceback on stderr '
                           f'({record["stderr"]})')
      record['traceback'] = True
    expected = EXPECTED.get(record['fault'], ())
    if rc not in DOCUMENTED and rc not in expected:
      self.findings.append(f'{where}: exit status {rc} is not documented '
                           f'(after {record["fault"] or "no fault"}); last '
                           f'line: {last[:300]}')
    elif fault and rc != 0 and rc not in expected and not (
        fault['kind'] == 'damage_checkpoint'):
      self.findings.append(f'{where}: exit status {rc} after '
                           f'{fault["kind"]} (expected {expected}); last '
                           f'line: {last[:300]}')
    if rc not in (0, -signal.SIGKILL):
      if len(errors) != 1 or errors[0] != last:
        self.findings.append(
            f'{where}: exit {rc} with {len(errors)} error lines (one, last, '
            f'expected); last line: {last[:300]}')
      record['error_line'] = errors[-1][:400] if errors else None
    leftovers = [p for p in life.workers.values() if chaos_faults.is_alive(p)]
    leftovers = chaos_faults.wait_gone(leftovers, 10)
    group = [p for p in chaos_faults.group_members(life.proc.pid)]
    if leftovers or group:
      pids = sorted({p.pid for p in leftovers + group})
      states = []
      for p in leftovers + group:
        try:
          states.append(f'{p.pid} {p.name()} {p.status()}')
        except psutil.Error:
          pass
      self.findings.append(
          f'{where}: {len(pids)} process(es) of its tree outlived the trainer '
          f'(exit {rc}, after {record["fault"] or "no fault"}): '
          f'{"; ".join(states)}; killed')
      for p in leftovers + group:
        chaos_faults.kill(p)
      chaos_faults.wait_gone(leftovers + group, 10)
      record['leftovers'] = pids
    self._exit_round = chaos_faults.progress(self.chaos_root)
    record['round_at_exit'] = self._exit_round
    self._judge_damage(record)
    self.lives.append(record)
    self._life = None
    cause = f' ({record["fault"]})' if record['fault'] else ''
    resumed = ('' if record['resumed_from'] is None
               else f', resumed from {record["resumed_from"]}')
    line = f': {last[:160]}' if rc not in (0, -9) else ''
    print(f'  life {life.index}: exit {rc} after {record["seconds"]}s{cause}, '
          f'round {self._exit_round}{resumed}{line}', flush=True)
    return record

  def _judge_damage(self, record: dict) -> None:
    """The next life after a damaged checkpoint: how it resumed."""
    pending = self._pending_damage
    if pending is None:
      return
    resumed = record['resumed_from']
    if resumed is not None:
      pending['next_life'] = record['index']
      pending['resumed_from'] = resumed
      if resumed >= pending['round']:
        pending['outcome'] = 'resumed from the damaged checkpoint'
        self.findings.append(
            f'life {record["index"]}: resumed from round {resumed} although '
            f'checkpoint round {pending["round"]} was damaged '
            f'({pending["damage"]})')
      else:
        pending['outcome'] = f'resumed from round {resumed} (set aside)'
      self._pending_damage = None
    elif record['returncode'] == 2:
      record['refused_damaged_checkpoint'] = True
      pending['outcome'] = 'resume refused (exit 2)'
      pending['next_life'] = record['index']
      self.findings.append(
          f'life {record["index"]}: the damaged checkpoint '
          f'{os.path.relpath(pending["path"], self.root)} '
          f'({pending["damage"]["file"]} {pending["damage"]["how"]}) was not '
          f'set aside: {record["last_line"][:300]}')
      if os.path.isdir(pending['path']):
        dest = os.path.join(self.root, 'set_aside',
                            f'{os.path.basename(pending["path"])}_life'
                            f'{record["index"]}')
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.move(pending['path'], dest)
        self.manual_set_asides.append(os.path.relpath(dest, self.root))
        pending['moved_by_soak'] = os.path.relpath(dest, self.root)
      self._pending_damage = None
    elif record['returncode'] == 0:
      pending['outcome'] = 'finished without logging a resume'
      self._pending_damage = None

  # --- faults
  def _applicable(self, life: chaos_faults.Life) -> list:
    out = []
    for kind in self.kinds:
      if kind in ('stop_worker', 'kill_worker') and life.worker() is None:
        continue
      if kind == 'damage_checkpoint' and not chaos_faults.damageable_checkpoint(
          self.chaos_root):
        continue
      if kind == 'full_disk' and not self.mounted:
        continue
      out.append(kind)
    return out

  def _record_exit(self, life: chaos_faults.Life, fault: dict) -> None:
    record = self._finish(life, fault)
    fault['returncode'] = record['returncode']
    fault['error_line'] = record.get('error_line')

  def _await_end(self, life: chaos_faults.Life, fault: dict) -> bool:
    """After a fault that may leave the trainer running: True when it
    exited within SETTLE_SECONDS; False when it went on (two new rounds
    after the fault ended: a round in flight may still be recorded by a run
    that is stopping) or is still running (e.g. in start-up; a later exit
    is reported as one without a fault, naming this one, and a run with no
    output for --exit_timeout seconds as a hang)."""
    base = chaos_faults.progress(self.chaos_root)
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
      if not life.running():
        return True
      if chaos_faults.progress(self.chaos_root) >= base + 2:
        fault['outcome'] = 'the run went on'
        return False
      time.sleep(0.2)
    fault['outcome'] = f'still running {SETTLE_SECONDS:g}s later'
    return False

  def _hang(self, life: chaos_faults.Life, fault: dict) -> None:
    self.hangs += 1
    fault['outcome'] = 'hang'
    self.findings.append(
        f'life {life.index}: neither exited nor trained a round within '
        f'{self.settings.exit_timeout:g}s after {fault["kind"]}; its tree was '
        'killed')
    life.kill_tree()

  def inject(self, kind: str, life: chaos_faults.Life) -> bool:
    """Injects `kind` into `life`; returns whether the trainer exited."""
    t0 = time.monotonic()
    fault = dict(kind=kind, life=life.index,
                 round=chaos_faults.progress(self.chaos_root),
                 checkpoint=self._checkpoint_round(),
                 at_seconds=round(t0 - self.started, 1))
    self.faults.append(fault)
    before = fault['round']
    print(f'fault {len(self.faults)} at {fault["at_seconds"]}s: {kind} '
          f'(life {life.index}, round {before})', flush=True)
    exited = True
    if kind in ('kill_trainer', 'damage_checkpoint'):
      life.refresh_workers()
      life.process.send_signal(signal.SIGKILL)
      if not life.wait(self.settings.exit_timeout):
        self._hang(life, fault)
      if kind == 'damage_checkpoint':
        # The life ends before the damage (it judges an earlier one).
        fault['reaction_seconds'] = round(time.monotonic() - t0, 1)
        self._record_exit(life, fault)
        if self._pending_damage is not None:
          self._pending_damage['outcome'] = (
              f'not judged: damaged again (fault {len(self.faults)}) before '
              'a life resumed')
          self._pending_damage = None
        newest = chaos_faults.damageable_checkpoint(self.chaos_root)
        if newest:
          info = chaos_faults.damage(newest[1], self.rng)
          fault['damage'] = dict(round=newest[0], **info)
          self._pending_damage = dict(round=newest[0], path=newest[1],
                                      damage=info, fault=len(self.faults))
          fault['judged'] = self._pending_damage
        what = fault.get('damage', {})
        print(f'  damaged checkpoint round {what.get("round")}: '
              f'{what.get("file")} {what.get("how")}', flush=True)
        return True
    elif kind == 'term_trainer':
      life.refresh_workers()
      life.process.send_signal(signal.SIGTERM)
      if not life.wait(self.settings.exit_timeout):
        self._hang(life, fault)
    elif kind == 'kill_worker':
      worker = life.worker()
      fault['worker'] = worker.pid
      chaos_faults.kill(worker)
      if not life.wait(self.settings.exit_timeout):
        self._hang(life, fault)
    elif kind == 'stop_worker':
      worker = life.worker()
      seconds = round(self.rng.uniform(1, self.settings.max_stop_seconds), 1)
      fault.update(worker=worker.pid, stop_seconds=seconds)
      try:
        worker.suspend()
      except psutil.NoSuchProcess:
        fault['outcome'] = 'the worker was gone already'
      life.wait(seconds)
      try:
        worker.resume()
      except psutil.NoSuchProcess:
        pass
      exited = self._await_end(life, fault)
    elif kind == 'full_disk':
      seconds = round(self.rng.uniform(1, self.settings.full_disk_seconds), 1)
      fault['full_seconds'] = seconds
      filler = os.path.join(self.chaos_root, '.chaos_filler')
      try:
        fault['filled_bytes'] = chaos_faults.fill(filler)
        life.wait(seconds)
      finally:
        os.remove(filler)
      exited = self._await_end(life, fault)
    fault['reaction_seconds'] = round(time.monotonic() - t0, 1)
    if exited:
      self._record_exit(life, fault)
    else:
      self._last_fault_in_life = (life.index, kind, time.monotonic())
      print(f'  life {life.index}: {fault["outcome"]} after {kind}',
            flush=True)
    return exited

  def run(self) -> str:
    """Runs the command to its end under faults; returns how it ended."""
    os.makedirs(self.log_dir, exist_ok=True)
    self.mount()
    self.started = time.monotonic()
    deadline = self.started + self.settings.timeout
    next_fault = self.started + self.rng.uniform(self.settings.min_interval,
                                                 self.settings.max_interval)
    life = self._start()
    failures_without_fault = 0
    stalled, mark, held_since = 0, -1, None
    finished = None
    while finished is None:
      if life is None:
        life = self._start()
      life.refresh_workers()
      if not life.running():
        record = self._finish(life)
        life = None
        if record['returncode'] == 0:
          finished = 'finished'
          break
        failures_without_fault += 1
        if not record.get('refused_damaged_checkpoint'):  # Reported.
          last = self._last_fault_in_life
          context = (f' ({time.monotonic() - last[2]:.1f}s after {last[1]}, '
                     'which it had seemed to survive)'
                     if last and last[0] == record['index'] else '')
          self.findings.append(
              f'life {record["index"]}: exit {record["returncode"]} without '
              f'a fault{context}: {record["last_line"][:300]}')
        if failures_without_fault >= 3:
          finished = 'stopped: 3 failures in a row without a fault'
        continue
      now = time.monotonic()
      if life.idle_seconds(self.chaos_root) > self.settings.exit_timeout:
        fault = self.faults[-1] if self.faults and self.faults[-1][
            'life'] == life.index else None
        self.findings.append(
            f'life {life.index}: no output and no round for '
            f'{self.settings.exit_timeout:g}s (hang'
            f'{", after " + fault["kind"] if fault else ""}); its tree was '
            'killed')
        if fault:
          fault['outcome'] = 'hang'
        self.hangs += 1
        life.kill_tree()
        self._finish(life, fault)
        life = None
        failures_without_fault += 1
        if failures_without_fault >= 3:
          finished = 'stopped: 3 failures in a row without a fault'
        continue
      if now > deadline:
        life.kill_tree()
        self._finish(life)
        finished = f'stopped: --timeout={self.settings.timeout:g}s passed'
        break
      due = now >= next_fault and (
          not self.settings.max_faults
          or len(self.faults) < self.settings.max_faults)
      if due and stalled >= self.settings.stalled_faults:
        # Livelock guard: hold the fault until the run checkpoints anew.
        if self._checkpoint_round() <= mark:
          if held_since is None:
            held_since = now
            self.deferred += 1
            print(f'  {stalled} faults without a new checkpoint: the next '
                  'waits for one', flush=True)
          due = False
        elif held_since is not None:
          self.deferred_seconds += now - held_since
          held_since = None
      if due:
        kinds = self._applicable(life)
        if kinds:
          checkpoint = self._checkpoint_round()
          stalled = stalled + 1 if checkpoint <= mark else 1
          mark = checkpoint
          kind = self.rng.choice(kinds)
          failures_without_fault = 0
          if self.inject(kind, life):
            record = self.lives[-1]
            life = None
            if record['returncode'] == 0:
              finished = 'finished'
          next_fault = time.monotonic() + self.rng.uniform(
              self.settings.min_interval, self.settings.max_interval)
          continue
      time.sleep(0.25)
    self.finished = finished
    self.wall_seconds = round(time.monotonic() - self.started, 1)
    return finished

  def inspect_leftovers(self) -> dict:
    """What the finished chaos run left: checkpoints it set aside, partial
    saves, its lock file, worker logs in its temp folder."""
    out = dict(set_aside_by_run=[], partial_saves=[], lock_left=False,
               worker_logs_left=0, autograph_files_left=0)
    for dirpath, dirnames, _ in os.walk(self.chaos_root):
      if os.path.basename(dirpath) != 'checkpoints':
        continue
      for name in dirnames:
        if re.match(r'program_state_\d+_temp', name):
          out['partial_saves'].append(name)
        elif not chaos_faults.CHECKPOINT.match(name):
          out['set_aside_by_run'].append(name)
    if self.finished == 'finished':
      lock = os.path.join(self.chaos_root, '.perfed_tff.lock')
      out['lock_left'] = os.path.exists(lock)
      if out['lock_left']:
        self.findings.append(f'the finished run left its lock file {lock}')
      if out['partial_saves']:
        self.findings.append(f'the finished run left partial checkpoint '
                             f'saves: {out["partial_saves"]}')
    tmp = os.path.join(self.root, 'tmp')
    names = os.listdir(tmp)
    out['worker_logs_left'] = len([n for n in names
                                   if n.startswith('tff_worker_')])
    out['autograph_files_left'] = len([
        n for n in names if n.startswith('__autograph_generated_file')])
    return out

  def abort(self) -> None:
    """Kills the live trainer's tree (an interrupt of this script)."""
    if self._life is not None:
      life = self._life
      life.kill_tree()
      life.close()
      self.lives.append(dict(index=life.index, returncode=life.proc.returncode,
                             fault=None, aborted=True,
                             seconds=round(time.monotonic() - life.started, 1)))
      self._life = None


# ------------------------------------------------------------- reference

def run_reference(root: str, command: list) -> dict:
  """Runs (or reuses) the uninterrupted run; returns its record."""
  ref_root = os.path.join(root, 'reference')
  record_path = os.path.join(root, 'reference.json')
  try:
    with open(record_path) as f:
      old = json.load(f)
    if (old.get('command') == command and old.get('returncode') == 0
        and chaos_report.result_files(ref_root)):
      print(f'reference: reusing {ref_root} ({old["wall_seconds"]}s)',
            flush=True)
      return dict(old, reused=True)
  except (OSError, ValueError):
    pass
  shutil.rmtree(ref_root, ignore_errors=True)
  os.makedirs(os.path.join(root, 'logs'), exist_ok=True)
  print('reference: ' + ' '.join(shlex.quote(c) for c in command),
        flush=True)
  os.makedirs(os.path.join(root, 'tmp_reference'), exist_ok=True)
  life = chaos_faults.Life('reference', command, os.path.join(root, 'logs'),
                           os.path.join(root, 'tmp_reference'))
  try:
    life.proc.wait()
  except Interrupted:
    life.kill_tree()
    raise
  finally:
    life.close()
  wall = round(time.monotonic() - life.started, 1)
  text = life.stderr()
  record = dict(command=command, returncode=life.proc.returncode,
                wall_seconds=wall,
                last_line=chaos_faults.last_line(text)[:400],
                traceback='Traceback' in text)
  with open(record_path, 'w') as f:
    json.dump(record, f, indent=1)
  print(f'reference: exit {record["returncode"]} in {wall}s', flush=True)
  return record


def prepare_root(root: str) -> None:
  """Creates `root` (marked as a soak's) and clears the last chaos run."""
  os.makedirs(root, exist_ok=True)
  open(os.path.join(root, '.chaos_soak'), 'a').close()
  chaos = os.path.join(root, 'chaos')
  if os.path.ismount(chaos):
    subprocess.run(['umount', '-l', chaos])
  for name in ('chaos', 'logs', 'set_aside', 'chaos_result', 'tmp'):
    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
  os.makedirs(os.path.join(root, 'tmp'))
