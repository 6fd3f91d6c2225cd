#!/usr/bin/env bash
# A standalone MLflow tracking server for one machine or a Ray head node (Kubernetes: infra/kuberay/mlflow.yaml).
#
#   infra/mlflow/serve.sh [--dir DIR] [--host HOST] [--port PORT] [-- EXTRA mlflow server OPTIONS]
#
# DIR holds mlflow.db (the sqlite run store) and artifacts/ (served through the server, so clients need no
# shared filesystem). Defaults, also settable from the environment:
#   OODLAB_MLFLOW_DIR   $HOME/oodlab-mlflow   (outside the repo: `make clean` and git never touch it)
#   OODLAB_MLFLOW_HOST  127.0.0.1             (this machine only; read it elsewhere through `ssh -L` / port-forward)
#   OODLAB_MLFLOW_PORT  5000
# Binding another address (e.g. a head node's private IP, so that Ray workers on other nodes can log) exposes an
# unauthenticated API to that network: firewall it to the cluster. MLflow also checks the Host header (default:
# localhost and private IPs); clients using a name such as http://mlflow:5000 need
#   MLFLOW_SERVER_ALLOWED_HOSTS='mlflow:5000,localhost:*,127.0.0.1:*'
# Point configs at it with mlflow.tracking_uri=http://HOST:PORT. Stop it with Ctrl-C or SIGTERM.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

dir=${OODLAB_MLFLOW_DIR:-$HOME/oodlab-mlflow}
host=${OODLAB_MLFLOW_HOST:-127.0.0.1}
port=${OODLAB_MLFLOW_PORT:-5000}
while [ $# -gt 0 ]; do
  case $1 in
    --dir)  dir=${2:?--dir needs a directory}; shift 2 ;;
    --host) host=${2:?--host needs an address}; shift 2 ;;
    --port) port=${2:?--port needs a number}; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "serve.sh: unknown argument '$1' (mlflow server options go after --; see --help)" >&2; exit 2 ;;
  esac
done

# The repo's venv (`make setup`) when mlflow is not on PATH.
mlflow_bin=$(command -v mlflow || true)
repo_venv="$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/mlflow"
[ -n "$mlflow_bin" ] || { [ -x "$repo_venv" ] && mlflow_bin=$repo_venv; } || {
  echo "serve.sh: mlflow not found; run 'make setup' (creates .venv) or activate an environment with mlflow" >&2
  exit 1
}

mkdir -p "$dir/artifacts"
dir=$(cd "$dir" && pwd)
export MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
echo "serve.sh: MLflow at http://$host:$port  (store: $dir)" >&2
exec "$mlflow_bin" server \
  --backend-store-uri "sqlite:///$dir/mlflow.db" \
  --artifacts-destination "$dir/artifacts" \
  --host "$host" --port "$port" "$@"
