#!/usr/bin/env bash
# The whole test suite. Used by the README and by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace --release "$@"
