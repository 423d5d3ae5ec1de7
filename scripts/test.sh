#!/usr/bin/env bash
# The whole test suite on a fresh machine: host set-up (idempotent), lint, types, then pytest against real
# libvirt/QEMU guests. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup-host.sh
VENV="${FREEZEFRAME_VENV:-$ROOT/.venv}"
echo "[test] ruff"
"$VENV/bin/ruff" check src tests bench
echo "[test] mypy"
"$VENV/bin/mypy"
echo "[test] pytest"
exec "$VENV/bin/pytest" "$@"
