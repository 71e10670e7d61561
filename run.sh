#!/usr/bin/env bash
# One entry point for a new user. Creates (or reuses) .venv, then:
#   ./run.sh demo   - short Per-FedAvg vs FedAvg run on offline data
#   ./run.sh test   - the whole test suite (what CI runs)
#   ./run.sh setup  - only create/refresh the environment
# Extra arguments go to the demo binary or to pytest.
set -euo pipefail
cd "$(dirname "$0")"

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

setup_env() {
  local stamp=.venv/.perfed_tff_stamp
  local want
  want=$(cat requirements/lock.txt requirements/peer.txt setup.py | sha256sum | cut -c1-16)
  if [ -x .venv/bin/python ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    return 0
  fi
  local py; py=$(find_python)
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip 'setuptools<81' wheel
  # TFF's dependency closure, with jax/jaxlib 0.4.13 instead of 0.4.14
  # (see BUILD_NOTES.md), then TFF itself without its (unsatisfiable) pins.
  .venv/bin/python -m pip install -q -r requirements/lock.txt
  .venv/bin/python -m pip install -q --no-deps tensorflow-federated==0.87.0
  # The benchmark's PyTorch peer (optional for users; the tests run it).
  .venv/bin/python -m pip install -q -r requirements/peer.txt
  .venv/bin/python -m pip install -q --no-deps -e ".[experiments,test,peer]"
  echo "$want" > "$stamp"
}

cmd=${1:-demo}; shift || true
case "$cmd" in
  setup) setup_env ;;
  demo)
    setup_env
    # Per-FedAvg (HF) and TFF's FedAvg on label-skewed digits (50 users with
    # 2 classes each, 10 unseen users), then personalized evaluation.
    exec .venv/bin/python -m experiments.train --algorithm=per_fedavg_hf \
      --compare_fedavg --dataset=digits \
      --dataset_options=num_users=50,classes_per_user=2,num_unseen_users=10 \
      --rounds=20 --clients_per_round=10 --alpha=0.02 --beta=0.1 \
      --local_steps=5 --batch_size=10 --eval_every=10 \
      --root_output_dir=/tmp/perfed_tff_demo "$@" ;;
  test)
    setup_env
    exec .venv/bin/python -m pytest -q tests "$@" ;;
  *) echo "usage: ./run.sh {demo|test|setup} [args...]" >&2; exit 2 ;;
esac
