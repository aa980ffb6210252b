#!/usr/bin/env bash
# Prepares a Debian/Ubuntu machine for trackstream: the servers the tests and the demo
# start (redis-server, redis-cli, PostgreSQL binaries), Chromium for the browser test,
# a virtualenv in .venv with the project and its dev tools. Safe to run again.
#   usage: ops/bootstrap.sh [--no-system] [demo|test]
#     --no-system  skip apt-get
#     demo         then run the demo pipeline (what `make demo` does)
#     test         then run lint, type check and the whole suite (what `make test` and CI do)
set -euo pipefail
cd "$(dirname "$0")/.."

system=1
action=""
for arg in "$@"; do
  case "$arg" in
    --no-system) system=0 ;;
    demo|test) action=$arg ;;
    *) echo "usage: ops/bootstrap.sh [--no-system] [demo|test]" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

need_packages=()
have() { command -v "$1" >/dev/null 2>&1; }
pg_bin() { ls -d /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || have initdb; }

if ((system)); then
  have redis-server || need_packages+=(redis-server)
  have redis-cli || need_packages+=(redis-tools)
  pg_bin || need_packages+=(postgresql)
  have chromium || need_packages+=(chromium)
  have make || need_packages+=(make)
  "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || need_packages+=(python3-venv)
  if ((${#need_packages[@]})); then
    echo "bootstrap: installing ${need_packages[*]}"
    SUDO=""
    if [[ $(id -u) -ne 0 ]]; then
      have sudo || { echo "bootstrap: need root or sudo to install ${need_packages[*]}" >&2; exit 1; }
      SUDO=sudo
    fi
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${need_packages[@]}" >/dev/null
  fi
fi

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 11):
    sys.exit(f"bootstrap: Python 3.11+ is needed, this is {sys.version.split()[0]}")
PY

stamp="$VENV/.trackstream-installed"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  echo "bootstrap: installing the project into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e '.[dev]'
  touch "$stamp"
fi

case "$action" in
  demo) exec make demo ;;
  test) exec make test ;;
esac
