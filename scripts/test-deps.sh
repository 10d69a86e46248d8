#!/usr/bin/env bash
# Installs the system packages the test suite needs when they are missing (PostgreSQL server).
# Idempotent; does nothing on a machine that already has them.
set -euo pipefail
if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "installing the PostgreSQL server for the tests"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
fi

# Published Singer packages for the interoperability tests, each in its own venv (never floe's):
# .venv-singer/<name>/bin/<command>. Pinned versions; created once, reused afterwards.
cd "$(dirname "$0")/.."
singer_venv() {  # name, pip requirement, command
  local dir=".venv-singer/$1"
  if [ ! -x "$dir/bin/$3" ]; then
    echo "installing $2 into $dir (Singer interop tests)"
    rm -rf "$dir"
    python3 -m venv "$dir"
    "$dir/bin/pip" install -q --disable-pip-version-check "$2"
  fi
}
singer_venv target-jsonl "target-jsonl==0.1.4" target-jsonl
singer_venv tap-jsonl "tap-jsonl==0.3.1" tap-jsonl
singer_venv target-csv "meltanolabs-target-csv==0.5.0" target-csv
