"""The errors of a run's TFF workers: gone (`WorkerUnavailableError`), past
a deadline (`RoundTimeoutError`), never there at a run's start
(`WorkerUnreachableError`), or a computation that failed inside one
(`WorkerComputationError`, with TensorFlow's one telling line)."""

from __future__ import annotations

from typing import Optional

import grpc

from perfed_tff import checks


class WorkerUnavailableError(ConnectionError):
  """A TFF worker stopped answering and did not come back in time.

  `worker_failure`: (the worker, what happened to it), e.g.
  ('local TFF worker at localhost:1234 (pid 5)', 'exited with status -9'),
  when the error names no phase of a run yet (`supervision.Supervisor`
  names it); None otherwise."""

  worker_failure = None
  unready_address = None  # A worker that never became ready (at start).
  ready_timeout = None


class RoundTimeoutError(WorkerUnavailableError):
  """A round (or evaluation, or checkpoint write) ran past its deadline."""


class WorkerUnreachableError(checks.ArgumentError, WorkerUnavailableError):
  """A `workers` address where no TFF worker answers when a run that has no
  checkpoint yet starts: there is nothing to resume; the worker or the
  address must be fixed. A `checks.ArgumentError` naming `workers` (the
  binaries exit 2) and a `WorkerUnavailableError`."""


class WorkerComputationError(ValueError, grpc.RpcError):
  """A computation failed inside a TFF worker, typically on bad input data
  (e.g. a label outside the model's range). Its message is the worker's
  telling line (TensorFlow's error message, e.g. `Received a label value of
  12 which is outside the valid range of [0, 10).`); `details` is the
  worker's whole (multi-line) message, `status` the gRPC status code name
  and `address` the worker's. A `grpc.RpcError` too, as the raw error was."""

  def __init__(self, message: str, *, details: str = '', status: str = '',
               address: str = ''):
    super().__init__(message)
    self.details = details
    self.status = status
    self.address = address


# The worker's prefix of a failed computation's message.
_FAILED_COMPUTATION_PREFIX = 'Failed to run computation:'


def telling_line(details: str) -> str:
  """The one line of a worker's (multi-line gRPC/TensorFlow) error message
  that says what went wrong: its first line, without the worker's
  `Failed to run computation:` prefix (at most 300 characters)."""
  lines = [l.strip() for l in str(details).splitlines() if l.strip()]
  line = lines[0] if lines else 'the computation failed on the worker'
  if line.startswith(_FAILED_COMPUTATION_PREFIX):
    line = line[len(_FAILED_COMPUTATION_PREFIX):].strip() or line
  return line[:300]


def computation_error(error, address: str) -> Optional[WorkerComputationError]:
  """The typed error of a worker's failed computation (None: `error` is no
  such failure, e.g. a cancelled or timed-out call)."""
  code = getattr(error, 'code', None)
  details = getattr(error, 'details', None)
  try:
    code, details = code(), details()
  except Exception:  # pylint: disable=broad-except
    return None
  # (TFF retries UNAVAILABLE and FAILED_PRECONDITION: never seen here.)
  if code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.INVALID_ARGUMENT,
                  grpc.StatusCode.UNKNOWN,
                  grpc.StatusCode.OUT_OF_RANGE) or not details:
    return None
  return WorkerComputationError(telling_line(details), details=details,
                                status=code.name, address=address)
