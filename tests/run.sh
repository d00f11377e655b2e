#!/usr/bin/env bash
# The test suite, as README.md gives it and CI runs it: `bash tests/run.sh [cargo test args]`.
#
# It installs what the tests need besides Rust (tests/deps.sh: openssl, tinyproxy, Node.js and
# npm), then runs every test file: one that fails does not stop the others (`--no-fail-fast`).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash tests/deps.sh
npm ci --prefix tests/oauth-server --no-audit --no-fund --silent

exec cargo test --locked --no-fail-fast "$@"
