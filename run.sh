#!/usr/bin/env bash
# One entry point for a new user. Creates (or reuses) .venv, then:
#   ./run.sh demo          - short Per-FedAvg vs FedAvg run on offline data
#   ./run.sh test          - the whole test suite (what CI runs)
#   ./run.sh setup         - only create/refresh the environment: the runtime
#   ./run.sh setup plots   - the runtime and matplotlib (for the plots)
#   ./run.sh setup test    - everything `./run.sh test` needs
# Extra arguments go to the demo binary or to pytest.
#
# The environment is built in layers, each installed once and skipped while
# its stamp (a hash of its requirement files) matches:
#   runtime  requirements/runtime.txt + TFF (--no-deps) + perfed_tff (-e)
#   plots    requirements/plots.txt (matplotlib)
#   test     requirements/lock.txt (test tools, notebook kernel, matplotlib)
#            + requirements/peer.txt (PyTorch, the benchmark's peer)
# `demo` and `setup` install the runtime only; `test` installs all of them.
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PIP=("$VENV/bin/python" -m pip install -q)

find_python() {
  for py in "${PYTHON:-}" python3.11 python3; do
    [ -n "$py" ] || continue
    if command -v "$py" >/dev/null 2>&1 &&
       "$py" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  echo "run.sh: Python 3.11 is required (tensorflow-federated 0.87.0 supports 3.9-3.11); set PYTHON=/path/to/python3.11" >&2
  return 1
}

# layer_hash FILE...: what a layer's stamp records.
layer_hash() { cat "$@" | sha256sum | cut -c1-16; }

# layer_current NAME HASH: whether layer NAME is installed from these files.
layer_current() {
  [ -x "$VENV/bin/python" ] &&
    [ "$(cat "$VENV/.perfed_tff_$1_stamp" 2>/dev/null)" = "$2" ]
}

setup_runtime() {
  local want; want=$(layer_hash requirements/runtime.txt setup.py)
  layer_current runtime "$want" && return 0
  if [ ! -x "$VENV/bin/python" ]; then
    local py; py=$(find_python)
    "$py" -m venv "$VENV"
    "${PIP[@]}" --upgrade pip 'setuptools<81' wheel
  fi
  # TFF's dependency closure with jax/jaxlib 0.4.13 instead of 0.4.14 (see
  # BUILD_NOTES.md); complete and pinned, so installed without resolving
  # (which keeps out two packages TensorFlow declares but never imports).
  "${PIP[@]}" --no-deps -r requirements/runtime.txt
  # TFF itself without its (unsatisfiable) pins, then perfed_tff.
  "${PIP[@]}" --no-deps tensorflow-federated==0.87.0
  "${PIP[@]}" --no-deps -e .
  echo "$want" > "$VENV/.perfed_tff_runtime_stamp"
}

setup_plots() {
  setup_runtime
  local want; want=$(layer_hash requirements/runtime.txt requirements/plots.txt)
  layer_current plots "$want" && return 0
  "${PIP[@]}" -r requirements/plots.txt
  echo "$want" > "$VENV/.perfed_tff_plots_stamp"
}

setup_test() {
  setup_runtime
  local want
  want=$(layer_hash requirements/runtime.txt requirements/lock.txt \
         requirements/peer.txt)
  layer_current test "$want" && return 0
  # The test tools, the notebook's kernel and matplotlib at the versions the
  # suite ran with (lock.txt is a complete freeze: no resolving, so pip does
  # not re-check TFF's pins), then the benchmark's PyTorch peer (optional for
  # users; resolved, since torch's wheels differ between platforms).
  "${PIP[@]}" --no-deps -r requirements/lock.txt
  "${PIP[@]}" -r requirements/peer.txt
  echo "$want" > "$VENV/.perfed_tff_test_stamp"
}

cmd=${1:-demo}; shift || true
case "$cmd" in
  setup)
    case "${1:-runtime}" in
      runtime) setup_runtime ;;
      plots) setup_plots ;;
      test) setup_test ;;
      *) echo "usage: ./run.sh setup [runtime|plots|test]" >&2; exit 2 ;;
    esac ;;
  demo)
    setup_runtime
    # Per-FedAvg (HF) and TFF's FedAvg on label-skewed digits (50 users with
    # 2 classes each, 10 unseen users), then personalized evaluation.
    exec "$VENV/bin/python" -m experiments.train --algorithm=per_fedavg_hf \
      --compare_fedavg --dataset=digits \
      --dataset_options=num_users=50,classes_per_user=2,num_unseen_users=10 \
      --rounds=20 --clients_per_round=10 --alpha=0.02 --beta=0.1 \
      --local_steps=5 --batch_size=10 --eval_every=10 \
      --root_output_dir=/tmp/perfed_tff_demo "$@" ;;
  test)
    setup_test
    exec "$VENV/bin/python" -m pytest -q tests "$@" ;;
  *) echo "usage: ./run.sh {demo|test|setup [runtime|plots|test]} [args...]" >&2; exit 2 ;;
esac
