#!/usr/bin/env bash
# Submit an rlhf_ray run to a Ray cluster with `ray job submit`, then print how to follow it.
#
#   launchers/submit.sh [options] CONFIG [SUBCOMMAND] [--section.key VALUE ...]
#
#   CONFIG       a launcher YAML (path inside this repository: the repository is the job's working_dir)
#   SUBCOMMAND   the `rlhf-ray` sub-command the job runs (default: pipeline, i.e. SFT -> RM -> PPO)
#   options      --address URL   the cluster's job API (default: $RAY_ADDRESS, else http://127.0.0.1:8265 --
#                                a `kubectl port-forward`, `ray dashboard cluster.yaml` or `ssh -L` tunnel)
#                --python PATH   interpreter on the cluster nodes (default: python)
#                --wait          stream the logs until the job ends (exit status = the job's)
#                --skip-plan     do not run `rlhf-ray plan` locally first
#                --dry-run       print the ray command and the runtime_env, submit nothing
#                --resume        the job continues from the run's latest complete checkpoint (after the driver
#                                died or the job was stopped: submit the same CONFIG and overrides again with it)
#
# The job API is reached over the tunnel only, with Ray token authentication on: the token comes from
# RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (the cluster's own, see cluster/).
# runtime_env: working_dir = this repository (minus .venv, runs, .git), env_vars = NCCL and offline cache
# settings below plus any NCCL_* / HF_* / TRANSFORMERS_* / VLLM_* variables set in the calling shell.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ADDRESS="${RAY_ADDRESS:-http://127.0.0.1:8265}"
PYTHON=python
WAIT=0
PLAN=1
DRY_RUN=0
RESUME=()

usage() { sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --address) ADDRESS="$2"; shift 2 ;;
    --python) PYTHON="$2"; shift 2 ;;
    --wait) WAIT=1; shift ;;
    --skip-plan) PLAN=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    --resume) RESUME=(--resume); shift ;;
    --help|-h) usage 0 ;;
    *) echo "submit.sh: unknown option $1" >&2; usage 2 ;;
  esac
done
[[ $# -ge 1 ]] || usage 2
CONFIG="$1"; shift
SUBCOMMAND=pipeline
if [[ $# -gt 0 && "$1" != --* ]]; then SUBCOMMAND="$1"; shift; fi
OVERRIDES=("$@")

# The config must sit inside the repository: the job sees it relative to the uploaded working_dir.
CONFIG_ABS="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"
[[ -f "$CONFIG_ABS" ]] || { echo "submit.sh: config not found: $CONFIG" >&2; exit 2; }
case "$CONFIG_ABS" in
  "$REPO"/*) CONFIG_REL="${CONFIG_ABS#"$REPO"/}" ;;
  *) echo "submit.sh: $CONFIG is outside $REPO; put it under launchers/ so the job can read it" >&2; exit 2 ;;
esac

# Check on paper that the run fits the configured cluster before occupying it.
if [[ $PLAN == 1 && $DRY_RUN == 0 ]]; then
  PLANNER="$(command -v rlhf-ray || true)"
  if [[ -n "$PLANNER" ]]; then
    "$PLANNER" plan "$CONFIG_ABS" "${OVERRIDES[@]}" || {
      echo "submit.sh: 'rlhf-ray plan' says the run does not fit (see above); --skip-plan to submit anyway" >&2
      exit 1; }
  else
    echo "submit.sh: rlhf-ray is not installed here; skipping the plan check" >&2
  fi
fi

# runtime_env as JSON (python does the quoting).
RUNTIME_ENV="$(REPO="$REPO" python3 - <<'EOF'
import json, os, re
env = {
    "NCCL_DEBUG": "WARN",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a hung collective fails the job instead of stalling it
    "HF_HUB_OFFLINE": "1",  # models and data come from the pre-filled cache on the nodes, never downloaded
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
env.update({k: v for k, v in os.environ.items() if re.match(r"(NCCL_|HF_|TRANSFORMERS_|VLLM_)", k)})
print(json.dumps({"working_dir": os.environ["REPO"], "excludes": [".venv", "runs", ".git", "*.gguf", "__pycache__"],
                  "env_vars": env}))
EOF
)"

SUBMISSION_ID="rlhf-$(basename "${CONFIG_REL%.*}")-$(date +%Y%m%d-%H%M%S)-$RANDOM"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
CMD=(ray job submit --address "$ADDRESS" --submission-id "$SUBMISSION_ID" --runtime-env-json "$RUNTIME_ENV")
[[ $WAIT == 1 ]] || CMD+=(--no-wait)
CMD+=(-- "$PYTHON" -m rlhf_ray.cli "$SUBCOMMAND" "$CONFIG_REL" "${OVERRIDES[@]}" "${RESUME[@]}")

if [[ $DRY_RUN == 1 ]]; then
  printf '%q ' "${CMD[@]}"; echo
  echo "runtime_env: $RUNTIME_ENV"
  exit 0
fi

follow() {
  cat <<EOF

Submitted $SUBMISSION_ID to $ADDRESS.
  follow the logs:  RAY_AUTH_MODE=token ray job logs --address $ADDRESS --follow $SUBMISSION_ID
  status:           RAY_AUTH_MODE=token ray job status --address $ADDRESS $SUBMISSION_ID
  stop:             RAY_AUTH_MODE=token ray job stop --address $ADDRESS $SUBMISSION_ID
  dashboard:        ${ADDRESS%/} (through the same tunnel; outputs land in run.output_dir on the cluster)
EOF
}
# A cluster that has just started may not have its head node's job agent up yet: Ray then answers "No available
# agent to submit job, please try again later" before anything is submitted, so retrying is safe.
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT
for attempt in 1 2 3 4 5; do
  set +e
  "${CMD[@]}" 2>&1 | tee "$LOG"
  status=${PIPESTATUS[0]}
  set -e
  grep -q "No available agent to submit job" "$LOG" || break
  echo "submit.sh: the cluster's job agent is not up yet (attempt $attempt of 5); retrying in 10 s" >&2
  sleep 10
done
if [[ $status == 0 || $WAIT == 1 ]] && ! grep -q "No available agent to submit job" "$LOG"; then
  follow
fi
exit "$status"
