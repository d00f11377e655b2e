#!/usr/bin/env bash
# What the tests need besides Rust, installed when missing (apt-get, as root or with sudo), so
# that a missing tool never shows up as a failing test: openssl (tests/oauth.rs makes a key
# pair), tinyproxy (a real forward proxy for tests/tls.rs and tests/cli.rs), and Node.js 18 or
# later with npm (the OAuth server of tests/oauth.rs). Run by tests/run.sh and .ci/mutants.
set -euo pipefail

missing=()
command -v openssl > /dev/null || missing+=(openssl)
command -v tinyproxy > /dev/null || missing+=(tinyproxy)
if ! command -v node > /dev/null || ! command -v npm > /dev/null; then missing+=(nodejs npm); fi
if ((${#missing[@]})); then
    echo "==> installing what the tests need: ${missing[*]}"
    if ! command -v apt-get > /dev/null; then
        echo "tests/deps.sh: ${missing[*]} missing, and no apt-get here to install them: install them, then run this again" >&2
        exit 2
    fi
    sudo=()
    if [[ "$(id -u)" != 0 ]]; then sudo=(sudo); fi
    "${sudo[@]}" apt-get update -q
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi

node_major="$(node -p 'process.versions.node.split(".")[0]')"
if ((node_major < 18)); then
    echo "tests/deps.sh: Node.js $(node --version) is too old for tests/oauth-server (oidc-provider 8 needs 18 or later)" >&2
    exit 2
fi
