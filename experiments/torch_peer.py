"""A plain-PyTorch peer of the round-time benchmark: FedAvg and Per-FedAvg.

One federated round in eager PyTorch (CPU, one intra-op thread), written from
the equations of Fallah, Mokhtari & Ozdaglar (2020), for the models of the
benchmark tasks (`experiments.benchmark_tasks.make_task`). It is the "PyTorch
peer" contender: what the same round costs in another framework, with no TFF
and no TF graph.

One local step at weights w on the client's next batches, consumed strictly in
order (D, D' for FO; D, D', D'' for HF and MAML):

  inner (personalization) step:  w~ = w - alpha * g_D(w)
  outer gradient at w~ on D':     g  = g_D'(w~)
  FO:    w <- w - beta * g
  HF:    w <- w - beta * (g - alpha * h),
         h = [g_D''(w + delta*g) - g_D''(w - delta*g)] / (2*delta)
  MAML:  w <- w - beta * (g - alpha * H_D''(w) g)   (Hessian-vector product
         by double backward; the Hessian is never formed)
  FedAvg (variant None): w <- w - beta * g_D(w), one batch per step.

g_B(v) is the gradient of the mean sparse softmax cross-entropy (from logits)
on batch B at weights v. The curvature term (h, or H g) is evaluated with
dropout off (inference mode), every other gradient in training mode. A client
runs `local_steps` (tau) steps, or stops early when fewer batches than a full
step needs remain.

Server: update_i = w - w_i; a client with no step or a non-finite update gets
weight 0, the others weight 1; w <- w - sum_i weight_i update_i / sum_i
weight_i (the uniform mean; w is unchanged when every weight is 0). Clients
run one after another.

Weights come in and go out in the Keras layout and order of the project's
models (`perfed_tff.models.mlp`, `.emnist`, `.linear`): Dense kernels
[in, out] (torch: [out, in]), Conv2D kernels [kh, kw, in, out] (torch:
[out, in, kh, kw]); inputs arrive NHWC and are viewed as NCHW; the CNN's first
Dense after Flatten has its input rows reordered from Keras's (h, w, c)
flatten order to torch's (c, h, w), so both compute the same function.

Importing this module imports neither torch nor TensorFlow; torch is imported
when a `TorchPeer` is built (`unavailable_reason()` says whether it can be).
"""

from __future__ import annotations

import itertools
from typing import (TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional,
                    Sequence)

import numpy as np

if TYPE_CHECKING:
  import torch  # pylint: disable=g-bad-import-order

# Benchmark task name -> model kind.
ARCHITECTURE_OF_TASK = {'digits_mlp': 'mlp', 'emnist_mlp': 'mlp',
                        'emnist_cnn': 'cnn', 'synthetic': 'linear'}
ARCHITECTURES = ('mlp', 'cnn', 'linear')
VARIANTS = (None, 'fo', 'hf', 'maml')
MLP_HIDDEN_UNITS = (80, 60)          # perfed_tff.models.mlp.PAPER_HIDDEN_UNITS
CNN_FILTERS = (32, 64)               # perfed_tff.models.emnist
CNN_DENSE_UNITS = 128
CNN_DROPOUT = (0.25, 0.5)
_BATCHES_PER_STEP = {None: 1, 'fo': 2, 'hf': 3, 'maml': 3}

Batch = Any   # (x, y) numpy arrays, or a mapping with keys 'x' and 'y'


def unavailable_reason() -> Optional[str]:
  """None when torch can be imported, else a one-line reason."""
  try:
    import torch  # pylint: disable=g-import-not-at-top,redefined-outer-name,unused-import
  except ImportError:
    return ('PyTorch contenders skipped: torch is not installed '
            '(pip install -r requirements/peer.txt, or ./run.sh test, which '
            'installs it)')
  except Exception as e:  # pylint: disable=broad-except
    # A broken install (missing shared library, ABI mismatch) raises others.
    return (f'PyTorch contenders skipped: importing torch failed '
            f'({type(e).__name__}: {e})'.replace('\n', ' '))
  return None


def architecture_of(name: str) -> str:
  """'mlp' | 'cnn' | 'linear' for a benchmark task name or a model kind."""
  if name in ARCHITECTURES:
    return name
  try:
    return ARCHITECTURE_OF_TASK[name]
  except KeyError:
    raise ValueError(
        f'no PyTorch peer for {name!r}; one of the tasks '
        f'{tuple(ARCHITECTURE_OF_TASK)} or the models {ARCHITECTURES}'
    ) from None


# ----------------------------------------------------------------------------
# Layouts. Each weight has a kind: 'bias' (same in both), 'dense' (Keras
# [in, out] <-> torch [out, in]), 'conv' (Keras [kh, kw, in, out] <-> torch
# [out, in, kh, kw]) or ('flat_dense', (h, w, c)): the Dense after a Flatten of
# an [h, w, c] feature map, whose input rows Keras orders (h, w, c) and torch
# (c, h, w).


def _keras_to_torch_layout(kind, a: np.ndarray) -> np.ndarray:
  if kind == 'bias':
    return a
  if kind == 'dense':
    return a.T
  if kind == 'conv':
    return a.transpose(3, 2, 0, 1)
  h, w, c = kind[1]
  out = a.shape[1]
  return a.reshape(h, w, c, out).transpose(2, 0, 1, 3).reshape(c * h * w,
                                                                out).T


def _torch_to_keras_layout(kind, a: np.ndarray) -> np.ndarray:
  if kind == 'bias':
    return a
  if kind == 'dense':
    return a.T
  if kind == 'conv':
    return a.transpose(2, 3, 1, 0)
  h, w, c = kind[1]
  out = a.shape[0]
  return a.T.reshape(c, h, w, out).transpose(1, 2, 0, 3).reshape(h * w * c,
                                                                  out)


def _layout(architecture: str, input_shape: tuple[int, ...],
            num_classes: int) -> list[tuple[Any, tuple[int, ...]]]:
  """(kind, Keras shape) of every trainable weight, in Keras order."""
  if architecture == 'linear':
    if len(input_shape) != 1:
      raise ValueError(f'the linear model takes [dim] inputs, got '
                       f'{input_shape}')
    return [('dense', (input_shape[0], num_classes)),
            ('bias', (num_classes,))]
  if architecture == 'mlp':
    sizes = (int(np.prod(input_shape)),) + MLP_HIDDEN_UNITS + (num_classes,)
    out = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
      out += [('dense', (n_in, n_out)), ('bias', (n_out,))]
    return out
  if len(input_shape) != 3 or min(input_shape[:2]) < 6:
    raise ValueError(f'the CNN takes [h >= 6, w >= 6, c] inputs, got '
                     f'{input_shape}')
  h, w, c = input_shape
  f1, f2 = CNN_FILTERS
  pooled = ((h - 4) // 2, (w - 4) // 2, f2)   # two valid 3x3 convs, pool 2
  return [('conv', (3, 3, c, f1)), ('bias', (f1,)),
          ('conv', (3, 3, f1, f2)), ('bias', (f2,)),
          (('flat_dense', pooled), (int(np.prod(pooled)), CNN_DENSE_UNITS)),
          ('bias', (CNN_DENSE_UNITS,)),
          ('dense', (CNN_DENSE_UNITS, num_classes)), ('bias', (num_classes,))]


# ----------------------------------------------------------------------------
# Forward passes: logits(params, x, training) on torch tensors, x in the
# benchmark's layout ([n, *input_shape], NHWC for images).


def _forward_fn(architecture: str) -> Callable[..., 'torch.Tensor']:
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top,invalid-name

  def linear(p, x, training):
    del training
    return F.linear(x, p[0], p[1])

  def mlp(p, x, training):
    del training
    h = x.reshape(x.shape[0], -1)    # Keras's Flatten order for NHWC inputs
    h = F.elu(F.linear(h, p[0], p[1]))
    h = F.elu(F.linear(h, p[2], p[3]))
    return F.linear(h, p[4], p[5])

  def cnn(p, x, training):
    h = x.permute(0, 3, 1, 2)        # NHWC -> NCHW (a view)
    h = F.relu(F.conv2d(h, p[0], p[1]))
    h = F.relu(F.conv2d(h, p[2], p[3]))
    h = F.max_pool2d(h, 2)
    h = F.dropout(h, CNN_DROPOUT[0], training)
    h = F.relu(F.linear(h.flatten(1), p[4], p[5]))
    h = F.dropout(h, CNN_DROPOUT[1], training)
    return F.linear(h, p[6], p[7])

  return {'linear': linear, 'mlp': mlp, 'cnn': cnn}[architecture]


def _split(batch: Batch):
  if isinstance(batch, Mapping):
    return batch['x'], batch['y']
  return batch[0], batch[1]


class TorchPeer:
  """FedAvg / Per-FedAvg rounds in eager PyTorch (CPU, one thread).

  Attributes:
    architecture: 'mlp', 'cnn' or 'linear'.
    variant: None (FedAvg), 'fo', 'hf' or 'maml'.
    batches_per_step: batches one local step consumes (1, 2, 3, 3).
  """

  def __init__(self, architecture: str, *, input_shape: Sequence[int],
               num_classes: int, variant: Optional[Any], alpha: float,
               beta: float, delta: float, local_steps: int,
               initial_weights: Sequence[np.ndarray]):
    """Builds the peer.

    Args:
      architecture: a benchmark task name ('digits_mlp', 'emnist_mlp',
        'emnist_cnn', 'synthetic') or a model kind ('mlp', 'cnn', 'linear').
      input_shape: shape of one example (e.g. (28, 28, 1) or (64,)).
      num_classes: number of logits.
      variant: None for FedAvg, or 'fo' | 'hf' | 'maml' (a
        `perfed_tff.per_fedavg_step.Variant` works too).
      alpha: inner step size (Per-FedAvg).
      beta: outer (Per-FedAvg) or local SGD (FedAvg) step size.
      delta: HF's finite-difference radius.
      local_steps: tau >= 1.
      initial_weights: the Keras model's trainable weights (Keras layout and
        order), as numpy arrays.

    Raises:
      ImportError: torch cannot be imported (see `unavailable_reason`).
      ValueError: unknown architecture or variant, or weights of the wrong
        shapes.
    """
    reason = unavailable_reason()
    if reason is not None:
      raise ImportError(reason)
    import torch  # pylint: disable=g-import-not-at-top,redefined-outer-name
    torch.set_num_threads(1)   # process-wide: one intra-op thread
    self.architecture = architecture_of(architecture)
    variant = getattr(variant, 'value', variant)   # a Variant enum
    if variant not in VARIANTS:
      raise ValueError(f'unknown variant {variant!r}; one of {VARIANTS}')
    if int(local_steps) < 1:
      raise ValueError(f'`local_steps` must be >= 1, got {local_steps!r}')
    self.variant = variant
    self.batches_per_step = _BATCHES_PER_STEP[variant]
    self.alpha, self.beta, self.delta = float(alpha), float(beta), float(delta)
    self.local_steps = int(local_steps)
    self.input_shape = tuple(int(d) for d in input_shape)
    self.num_classes = int(num_classes)
    self._layout = _layout(self.architecture, self.input_shape,
                           self.num_classes)
    self._forward = _forward_fn(self.architecture)
    self._params: list[torch.Tensor] = []
    self.set_weights(initial_weights)

  @classmethod
  def from_task(cls, task, **kwargs) -> 'TorchPeer':
    """The peer of an `experiments.benchmark_tasks.BenchmarkTask`: architecture
    from `task.name`, input shape from `task.element_spec['x']`, number of
    classes from the last bias of `initial_weights`; `kwargs` as for the
    constructor (variant, alpha, beta, delta, local_steps, initial_weights)."""
    shape = tuple(int(d) for d in task.element_spec['x'].shape[1:])
    num_classes = int(np.shape(kwargs['initial_weights'][-1])[0])
    return cls(task.name, input_shape=shape, num_classes=num_classes,
               **kwargs)

  # -- weights ---------------------------------------------------------------

  def set_weights(self, weights: Sequence[np.ndarray]) -> None:
    """Sets the global model from Keras-layout arrays (copied)."""
    import torch  # pylint: disable=g-import-not-at-top,redefined-outer-name
    weights = list(weights)
    if len(weights) != len(self._layout):
      raise ValueError(f'expected {len(self._layout)} weight arrays for the '
                       f'{self.architecture}, got {len(weights)}')
    params = []
    for (kind, shape), w in zip(self._layout, weights):
      w = np.asarray(w, np.float32)
      if w.shape != shape:
        raise ValueError(f'weight of shape {w.shape} where {shape} is '
                         f'expected ({self.architecture})')
      params.append(torch.from_numpy(np.array(
          _keras_to_torch_layout(kind, w), np.float32, order='C', copy=True)))
    self._params = params

  def weights(self) -> list[np.ndarray]:
    """The global model's weights in Keras layout and order (copies)."""
    return [np.array(_torch_to_keras_layout(kind, p.numpy()), np.float32,
                     order='C', copy=True)
            for (kind, _), p in zip(self._layout, self._params)]

  def logits(self, x: np.ndarray) -> np.ndarray:
    """The global model's logits on `x` (benchmark layout), dropout off."""
    import torch  # pylint: disable=g-import-not-at-top,redefined-outer-name
    with torch.no_grad():
      return self._forward(self._params, self._tensor_x(x), False).numpy()

  # -- a round ---------------------------------------------------------------

  def run_round(self, client_batches: Sequence[Iterable[Batch]]) -> list[int]:
    """Runs one round on the clients' batch streams and keeps the new model.

    Args:
      client_batches: one iterable of batches per client, each batch (x, y)
        numpy arrays (x float32 in the benchmark's layout, y integer labels)
        or a mapping with keys 'x' and 'y'. A client's batches are read
        lazily and in order; at most tau * batches_per_step are read.

    Returns:
      The number of local steps each client completed.
    """
    import torch  # pylint: disable=g-import-not-at-top,redefined-outer-name
    finals, steps = [], []
    for batches in client_batches:
      final, n = self._client_update(batches)
      finals.append(final)
      steps.append(n)
    with torch.no_grad():
      total, accepted = None, 0
      for final, n in zip(finals, steps):
        if n == 0:
          continue
        update = [w.sub(w_i) for w, w_i in zip(self._params, final)]
        if not all(bool(torch.isfinite(u).all()) for u in update):
          continue
        if total is None:
          total = update
        else:
          for t, u in zip(total, update):
            t.add_(u)
        accepted += 1
      if accepted:
        self._params = [w.sub(t.div_(accepted))
                        for w, t in zip(self._params, total)]
    return steps

  def _tensor_x(self, x) -> 'torch.Tensor':
    import torch  # pylint: disable=g-import-not-at-top,redefined-outer-name
    x = np.asarray(x, np.float32)
    if not x.flags.writeable:   # torch warns on read-only buffers
      x = x.copy()
    return torch.from_numpy(x)

  def _tensors(self, batch: Batch):
    import torch  # pylint: disable=g-import-not-at-top,redefined-outer-name
    x, y = _split(batch)
    y = np.asarray(y)
    if not y.flags.writeable:
      y = y.copy()
    return self._tensor_x(x), torch.from_numpy(y).long()

  def _grad(self, w, batch, training: bool) -> tuple['torch.Tensor', ...]:
    """g_B(w) at leaf tensors `w` (requires_grad)."""
    import torch  # pylint: disable=g-import-not-at-top,redefined-outer-name
    import torch.nn.functional as F  # pylint: disable=g-import-not-at-top,invalid-name
    x, y = batch
    loss = F.cross_entropy(self._forward(w, x, training), y)
    return torch.autograd.grad(loss, w)

  def _hvp(self, w, batch, v) -> list['torch.Tensor']:
    """H_B(w) v by double backward (dropout off)."""
    import torch  # pylint: disable=g-import-not-at-top,redefined-outer-name
    import torch.nn.functional as F  # pylint: disable=g-import-not-at-top,invalid-name
    x, y = batch
    loss = F.cross_entropy(self._forward(w, x, False), y)
    grads = torch.autograd.grad(loss, w, create_graph=True)
    grad_dot_v = sum((g * vi).sum() for g, vi in zip(grads, v))
    hv = torch.autograd.grad(grad_dot_v, w, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h for p, h in zip(w, hv)]

  @staticmethod
  def _leaves(tensors) -> list['torch.Tensor']:
    return [t.requires_grad_(True) for t in tensors]

  def _client_update(self, batches: Iterable[Batch]
                     ) -> tuple[list['torch.Tensor'], int]:
    """tau local steps from the global model; (final weights, steps)."""
    import torch  # pylint: disable=g-import-not-at-top,redefined-outer-name
    alpha, beta, delta = self.alpha, self.beta, self.delta
    k = self.batches_per_step
    w = self._leaves(p.clone() for p in self._params)
    stream = iter(batches)
    steps = 0
    for _ in range(self.local_steps):
      chunk = list(itertools.islice(stream, k))
      if len(chunk) < k:
        break
      chunk = [self._tensors(b) for b in chunk]
      if self.variant is None:
        direction = self._grad(w, chunk[0], True)
      else:
        g_d = self._grad(w, chunk[0], True)
        with torch.no_grad():
          w_tilde = self._leaves(
              torch.add(p, gi, alpha=-alpha) for p, gi in zip(w, g_d))
        g = self._grad(w_tilde, chunk[1], True)
        if self.variant == 'fo':
          direction = g
        else:
          if self.variant == 'hf':
            with torch.no_grad():
              w_plus = self._leaves(
                  torch.add(p, gi, alpha=delta) for p, gi in zip(w, g))
              w_minus = self._leaves(
                  torch.add(p, gi, alpha=-delta) for p, gi in zip(w, g))
            g_plus = self._grad(w_plus, chunk[2], False)
            g_minus = self._grad(w_minus, chunk[2], False)
            with torch.no_grad():
              h = [gp.sub_(gm).div_(2.0 * delta)
                   for gp, gm in zip(g_plus, g_minus)]
          else:
            h = self._hvp(w, chunk[2], g)
          with torch.no_grad():
            direction = [gi.add_(hi, alpha=-alpha) for gi, hi in zip(g, h)]
      with torch.no_grad():
        for p, d in zip(w, direction):
          p.add_(d, alpha=-beta)
      steps += 1
    return w, steps
