"""One Per-FedAvg local step: the meta-gradient and the update.

One local step at weights w on the client's next batches D, D' (, D''):
  inner (personalization) step:  w~ = w - alpha * g_D(w)
  outer gradient at w~ on D':     g  = g_D'(w~)
  FO:    direction = g
  HF:    direction = g - alpha * h,
         h = [g_D''(w + delta*g) - g_D''(w - delta*g)] / (2*delta)
  MAML:  direction = g - alpha * H_D''(w) g   (Hessian-vector product by
         nested tapes; the Hessian is never formed)
  outer (meta) step: w <- w - beta * direction, or, with a client optimizer
         (`tff.learning.optimizers.Optimizer`), its step on the "gradient"
         `direction` (the optimizer state lives for the client's tau steps).

g_B(v) is the gradient of the mean loss on batch B at weights v, from the
model's oracle (`perfed_tff.model_oracles`, either kind of model). A step
consumes its batches strictly in order (D, D' for FO; D, D', D'' for HF and
MAML).

Multi-step adaptation (`inner_steps` nu >= 1; generalised Per-FedAvg, Jamali,
Saber & Bae 2025, https://arxiv.org/abs/2504.21327): the meta-objective is the
loss after nu SGD steps at alpha,

  F(w) = f(w_nu; D'),  w_0 = w,  w_{j+1} = w_j - alpha * g_{D_j}(w_j),
  grad F(w) = (I - alpha H_0)(I - alpha H_1) ... (I - alpha H_{nu-1}) g_D'(w_nu),

applied right to left: v = g_D'(w_nu); for j = nu-1 down to 0:
v <- v - alpha * H_j v, with H_j the Hessian at w_j on its own batch D''_j
(FO drops the H terms, HF replaces H_j v by the central difference
[g_{D''_j}(w_j + delta v) - g_{D''_j}(w_j - delta v)] / (2 delta), MAML takes
the exact Hessian-vector product). A step consumes, in this order,
D_0..D_{nu-1}, D', D''_0..D''_{nu-1}: nu + 1 batches (FO) or 2 nu + 1 (HF,
MAML). nu = 1 is the paper's step above, computed by the very same
operations.

The curvature term (h, or H g) is evaluated in inference mode
(`training=False`), so that the two finite-difference gradients of HF see the
same function even for models with dropout; for models without stochastic
layers this is the plain training loss.
"""

from __future__ import annotations

import enum

from perfed_tff import model_oracles

# Keys of the unfinalized model metrics inside the client metrics.
MODEL_METRICS = 'model'
PERSONALIZED_MODEL_METRICS = 'personalized_model'
PERSONALIZED_PREFIX = 'personalized_'


class Variant(enum.Enum):
  """Which meta-gradient a local step uses."""
  FO = 'fo'      # first order: drops the Hessian term
  HF = 'hf'      # Hessian-free: finite-difference Hessian-vector product
  MAML = 'maml'  # exact Hessian-vector product


def batches_per_step(variant: Variant, inner_steps: int = 1) -> int:
  """Batches one local step consumes: nu + 1 for FO, 2 nu + 1 otherwise
  (nu = `inner_steps`; 2 and 3 for the paper's nu = 1)."""
  if Variant(variant) is Variant.FO:
    return inner_steps + 1
  return 2 * inner_steps + 1


def gradient_evaluations_per_step(variant: Variant,
                                  inner_steps: int = 1) -> int:
  """Batch gradient evaluations per local step: FO nu + 1, HF 3 nu + 1,
  MAML 2 nu + 1 (an HVP costs about one extra gradient); 2, 4, 3 for nu = 1."""
  return {Variant.FO: inner_steps + 1, Variant.HF: 3 * inner_steps + 1,
          Variant.MAML: 2 * inner_steps + 1}[Variant(variant)]


def meta_direction(oracle, w, batches, *, variant: Variant, alpha, delta,
                   inner_steps: int = 1, metrics_state=None):
  """The Per-FedAvg meta-gradient at `w`: grad F(w) (see the module doc).

  Args:
    oracle: a `model_oracles` oracle.
    w: trainable weights, a tuple of tensors.
    batches: the step's `batches_per_step(variant, inner_steps)` batches,
      D_0..D_{nu-1}, D', D''_0..D''_{nu-1}.
    variant: FO, HF or MAML.
    alpha: inner step size (float or scalar tensor).
    delta: HF's finite-difference radius (float or scalar tensor).
    inner_steps: nu >= 1.
    metrics_state: `oracle.initial_metrics_state()`-like state to update at w
      on D_0 and at w_nu on D', or None.

  Returns:
    (direction, f(w; D_0), f(w_nu; D'), examples used, metrics_state).
  """
  nu = inner_steps
  inner, outer, curvature = batches[:nu], batches[nu], batches[nu + 1:]
  if metrics_state is None:
    loss_d, grad_d, n_d = oracle.loss_and_gradient(w, inner[0])
  else:
    loss_d, grad_d, n_d, metrics_state = oracle.tracked_loss_and_gradient(
        w, inner[0], metrics_state, MODEL_METRICS)
  path = [w]                       # w_0 .. w_nu
  w_j = model_oracles.axpy(-alpha, grad_d, w)
  examples = n_d
  for j in range(1, nu):
    path.append(w_j)
    w_j, n_j = model_oracles.sgd_step(oracle, w_j, inner[j], alpha)
    examples += n_j
  w_tilde = w_j
  if metrics_state is None:
    loss_dp, g, n_dp = oracle.loss_and_gradient(w_tilde, outer)
  else:
    loss_dp, g, n_dp, metrics_state = oracle.tracked_loss_and_gradient(
        w_tilde, outer, metrics_state, PERSONALIZED_MODEL_METRICS)
  examples = examples + n_dp
  if variant is Variant.FO:
    return g, loss_d, loss_dp, examples, metrics_state
  v = g
  for j in reversed(range(nu)):   # v <- (I - alpha H_j) v, right to left
    batch_dpp = curvature[j]
    if variant is Variant.HF:
      _, g_plus, n_dpp = oracle.loss_and_gradient(
          model_oracles.axpy(delta, v, path[j]), batch_dpp, training=False)
      _, g_minus, _ = oracle.loss_and_gradient(
          model_oracles.axpy(-delta, v, path[j]), batch_dpp, training=False)
      h = tuple((p - m) / (2.0 * delta) for p, m in zip(g_plus, g_minus))
    else:
      h = oracle.hessian_vector_product(path[j], batch_dpp, v)
      x, _ = model_oracles.split_batch(batch_dpp)
      n_dpp = model_oracles.num_rows(x)
    v = model_oracles.axpy(-alpha, h, v)
    examples += n_dpp
  return v, loss_d, loss_dp, examples, metrics_state


def per_fedavg_local_step(oracle, w, batches, *, variant: Variant, alpha,
                          beta=None, delta, inner_steps: int = 1,
                          optimizer=None, optimizer_state=None,
                          metrics_state=None):
  """One Per-FedAvg local step at trainable weights `w` (tuple of tensors).

  The meta-gradient `meta_direction(...)` is applied as w - beta * direction
  (`optimizer=None`) or by `optimizer.next(optimizer_state, w, direction)`.

  Returns:
    (new_w, f(w; D), f(w~; D'), examples used, optimizer_state,
    metrics_state).
  """
  direction, loss_d, loss_dp, examples, metrics_state = meta_direction(
      oracle, w, batches, variant=variant, alpha=alpha, delta=delta,
      inner_steps=inner_steps, metrics_state=metrics_state)
  if optimizer is None:
    new_w = model_oracles.axpy(-beta, direction, w)
  else:
    optimizer_state, new_w = optimizer.next(optimizer_state, w, direction)
    new_w = tuple(new_w)
  return new_w, loss_d, loss_dp, examples, optimizer_state, metrics_state
