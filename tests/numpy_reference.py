"""Independent numpy implementation of Per-FedAvg for softmax regression.

Closed forms for logits z = x W + b and mean cross-entropy over a batch:
  p = softmax(z),  E = p - onehot(y)
  grad_W = x^T E / n,  grad_b = mean_i E_i
  Hessian-vector product along (V, v): dz = x V + v,
  J_i = diag(p_i) dz_i - p_i (p_i . dz_i),  Hv_W = x^T J / n,  Hv_b = mean_i J_i

Multi-step adaptation (nu inner steps; arXiv 2504.21327): w_0 = w,
w_{j+1} = w_j - alpha g_{D_j}(w_j); direction = prod_j (I - alpha H_j) g_D'(w_nu)
applied right to left, H_j on D''_j at w_j (HF: central differences).
Optimizers: SGD with momentum and Adam as TFF's `build_sgdm`/`build_adam`.
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


# ---- multi-step adaptation and optimizers ----

def batches_per_step(variant, inner_steps=1):
  return inner_steps + 1 if variant == 'fo' else 2 * inner_steps + 1


def meta_direction(w, batches, variant, alpha, delta, inner_steps=1):
  """grad F(w) for F(w) = f(w_nu; D'); batches D_0..D_{nu-1}, D', D''_0.."""
  nu = inner_steps
  path = [w]
  for j in range(nu):
    path.append(_add(path[-1], -alpha, grad(path[-1], batches[j])))
  v = grad(path[nu], batches[nu])
  if variant == 'fo':
    return v
  for j in reversed(range(nu)):
    batch = batches[nu + 1 + j]
    if variant == 'hf':
      gp = grad(_add(path[j], delta, v), batch)
      gm = grad(_add(path[j], -delta, v), batch)
      h = tuple((a - c) / (2 * delta) for a, c in zip(gp, gm))
    elif variant == 'maml':
      h = hvp(path[j], batch, v)
    else:
      raise ValueError(variant)
    v = _add(v, -alpha, h)
  return v


class SGDM:
  """w <- w - lr * a, a <- momentum * a + g (TFF's build_sgdm)."""

  def __init__(self, learning_rate, momentum=0.0):
    self.lr, self.momentum, self.acc = learning_rate, momentum, None

  def step(self, w, g):
    if self.acc is None:
      self.acc = tuple(np.zeros_like(x) for x in w)
    self.acc = tuple(self.momentum * a + gi for a, gi in zip(self.acc, g))
    return tuple(x - self.lr * a for x, a in zip(w, self.acc))


class Adam:
  """TFF's build_adam: bias correction folded into the learning rate."""

  def __init__(self, learning_rate, beta_1=0.9, beta_2=0.999, epsilon=1e-7):
    self.lr, self.b1, self.b2, self.eps = learning_rate, beta_1, beta_2, epsilon
    self.t, self.m, self.v = 0, None, None

  def step(self, w, g):
    if self.m is None:
      self.m = tuple(np.zeros_like(x) for x in w)
      self.v = tuple(np.zeros_like(x) for x in w)
    self.t += 1
    lr = self.lr * np.sqrt(1 - self.b2 ** self.t) / (1 - self.b1 ** self.t)
    self.m = tuple(m + (gi - m) * (1 - self.b1) for m, gi in zip(self.m, g))
    self.v = tuple(v + (gi * gi - v) * (1 - self.b2) for v, gi in zip(self.v, g))
    return tuple(x - lr * m / (np.sqrt(v) + self.eps)
                 for x, m, v in zip(w, self.m, self.v))


def client_update_general(w, batches, variant, alpha, delta, local_steps,
                          inner_steps=1, optimizer=None, beta=None):
  """`client_update` with nu inner steps and an optional client optimizer
  (fresh for this client; default SGD at beta)."""
  optimizer = optimizer or SGDM(beta)
  k = batches_per_step(variant, inner_steps)
  steps = examples = 0
  for t in range(local_steps):
    chunk = batches[t * k:(t + 1) * k]
    if len(chunk) < k:
      break
    direction = meta_direction(w, chunk, variant, alpha, delta, inner_steps)
    w = optimizer.step(w, direction)
    steps += 1
    examples += sum(len(c[1]) for c in chunk)
  return w, steps, examples
