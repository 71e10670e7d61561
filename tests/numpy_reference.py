"""Independent numpy implementation of Per-FedAvg for softmax regression.

Closed forms for logits z = x W + b and mean cross-entropy over a batch:
  p = softmax(z),  E = p - onehot(y)
  grad_W = x^T E / n,  grad_b = mean_i E_i
  Hessian-vector product along (V, v): dz = x V + v,
  J_i = diag(p_i) dz_i - p_i (p_i . dz_i),  Hv_W = x^T J / n,  Hv_b = mean_i J_i
"""

import numpy as np


def softmax(z):
  z = z - z.max(axis=1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=1, keepdims=True)


def loss(w, batch):
  W, b = w
  x, y = batch
  p = softmax(x @ W + b)
  return float(-np.mean(np.log(p[np.arange(len(y)), y])))


def grad(w, batch):
  W, b = w
  x, y = batch
  p = softmax(x @ W + b)
  e = p.copy()
  e[np.arange(len(y)), y] -= 1.0
  return (x.T @ e / len(y), e.mean(axis=0))


def hvp(w, batch, v):
  W, b = w
  x, _ = batch
  p = softmax(x @ W + b)
  dz = x @ v[0] + v[1]
  j = p * dz - p * np.sum(p * dz, axis=1, keepdims=True)
  return (x.T @ j / len(x), j.mean(axis=0))


def _add(a, s, b):
  return tuple(ai + s * bi for ai, bi in zip(a, b))


def local_step(w, batches, variant, alpha, beta, delta):
  g_d = grad(w, batches[0])
  w_tilde = _add(w, -alpha, g_d)
  g = grad(w_tilde, batches[1])
  if variant == 'fo':
    direction = g
  else:
    if variant == 'hf':
      gp = grad(_add(w, delta, g), batches[2])
      gm = grad(_add(w, -delta, g), batches[2])
      h = tuple((a - c) / (2 * delta) for a, c in zip(gp, gm))
    elif variant == 'maml':
      h = hvp(w, batches[2], g)
    else:
      raise ValueError(variant)
    direction = _add(g, -alpha, h)
  return _add(w, -beta, direction)


def client_update(w, batches, variant, alpha, beta, delta, local_steps):
  """Runs up to tau steps on `batches` in order; returns (w, steps, examples)."""
  k = 2 if variant == 'fo' else 3
  steps = examples = 0
  for t in range(local_steps):
    chunk = batches[t * k:(t + 1) * k]
    if len(chunk) < k:
      break
    w = local_step(w, chunk, variant, alpha, beta, delta)
    steps += 1
    examples += sum(len(c[1]) for c in chunk)
  return w, steps, examples


def batches_of(x, y, batch_size):
  return [(x[i:i + batch_size], y[i:i + batch_size])
          for i in range(0, len(y), batch_size)]
