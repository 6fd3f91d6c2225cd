#!/usr/bin/env bash
# An MLflow tracking server with users and passwords (MLflow's basic-auth app) for one machine or a Ray head node
# (Kubernetes: infra/kuberay/mlflow.yaml).
#
#   MLFLOW_BACKEND_STORE_URI='postgresql+psycopg2://USER:PASSWORD@HOST:5432/mlflow' \
#   MLFLOW_AUTH_ADMIN_PASSWORD='at least 12 characters' \
#   infra/mlflow/serve.sh [--dir DIR] [--host HOST] [--port PORT] [--workers N] [-- EXTRA mlflow server OPTIONS]
#
# Run store: the PostgreSQL database MLFLOW_BACKEND_STORE_URI names (`mlflow server` reads it from the environment:
# the password is on no command line). Without it, a sqlite file DIR/mlflow.db served by one worker (sqlite takes
# one writer at a time; --workers above 1 is refused).
# Users: MLflow's basic-auth app. The first start creates the user `admin` with MLFLOW_AUTH_ADMIN_PASSWORD; add users
# through its REST API or UI. Its tables live in the same database, as DIR/basic_auth.ini (mode 600, written here
# unless MLFLOW_AUTH_CONFIG_PATH names your own) says. DIR/flask_secret_key (mode 600) keeps the workers' CSRF key.
# Artifacts: DIR/artifacts, uploaded and downloaded through the server, so clients need no shared filesystem.
# Clients authenticate with MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD in their environment (oodlab forwards
# them to Ray workers and jobs); point configs at the server with mlflow.tracking_uri or MLFLOW_TRACKING_URI.
# Defaults, also settable from the environment:
#   OODLAB_MLFLOW_DIR   $HOME/oodlab-mlflow   (outside the repo: `make clean` and git never touch it)
#   OODLAB_MLFLOW_HOST  127.0.0.1             (this machine only; read it elsewhere through `ssh -L` / port-forward)
#   OODLAB_MLFLOW_PORT  5000
#   --workers           4 with PostgreSQL, 1 with sqlite
# Binding another address (e.g. a head node's private IP, so that Ray workers on other nodes can log) exposes the
# server to that network: firewall it to the cluster. MLflow also checks the Host header (default: localhost and
# private IPs); clients using a name such as http://mlflow:5000 need
#   MLFLOW_SERVER_ALLOWED_HOSTS='mlflow:5000,localhost:*,127.0.0.1:*'
# Stop it with Ctrl-C or SIGTERM.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

dir=${OODLAB_MLFLOW_DIR:-$HOME/oodlab-mlflow}
host=${OODLAB_MLFLOW_HOST:-127.0.0.1}
port=${OODLAB_MLFLOW_PORT:-5000}
workers=""
while [ $# -gt 0 ]; do
  case $1 in
    --dir)     dir=${2:?--dir needs a directory}; shift 2 ;;
    --host)    host=${2:?--host needs an address}; shift 2 ;;
    --port)    port=${2:?--port needs a number}; shift 2 ;;
    --workers) workers=${2:?--workers needs a number}; shift 2 ;;
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
umask 077
if [ -n "${MLFLOW_BACKEND_STORE_URI:-}" ]; then
  store=database
  auth_db=$MLFLOW_BACKEND_STORE_URI
  workers=${workers:-4}
else
  store="sqlite $dir/mlflow.db"
  export MLFLOW_BACKEND_STORE_URI="sqlite:///$dir/mlflow.db"
  auth_db="sqlite:///$dir/basic_auth.db"
  workers=${workers:-1}
  if [ "$workers" != 1 ]; then
    echo "serve.sh: a sqlite store takes one worker; set MLFLOW_BACKEND_STORE_URI to a PostgreSQL database for more" >&2
    exit 2
  fi
fi
if [ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]; then
  export MLFLOW_AUTH_CONFIG_PATH="$dir/basic_auth.ini"
  printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = %s\nadmin_username = admin\n' "$auth_db" > "$MLFLOW_AUTH_CONFIG_PATH"
fi
[ -s "$dir/flask_secret_key" ] || od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$dir/flask_secret_key"
MLFLOW_FLASK_SERVER_SECRET_KEY=$(cat "$dir/flask_secret_key")
export MLFLOW_FLASK_SERVER_SECRET_KEY MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true
echo "serve.sh: MLflow at http://$host:$port  (runs: $store; artifacts: $dir/artifacts; $workers worker(s); basic auth)" >&2
exec "$mlflow_bin" server --app-name basic-auth \
  --artifacts-destination "$dir/artifacts" \
  --host "$host" --port "$port" --workers "$workers" "$@"
