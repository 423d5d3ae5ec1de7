#!/usr/bin/env bash
# The demo on the embedded defaults: host set-up (idempotent), then `freezeframe demo`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup-host.sh"
exec "${FREEZEFRAME_VENV:-$ROOT/.venv}/bin/freezeframe" demo "$@"
