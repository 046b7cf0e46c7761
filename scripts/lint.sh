#!/usr/bin/env bash
# The code's shape, from any directory: formatting, clippy on every crate and target with
# warnings as errors (the workspace lints include clippy::undocumented_unsafe_blocks and
# missing_safety_doc at warn level, so -D warnings makes them errors), and clippy on the
# restorer's freestanding blob, which restorer/build.rs compiles with rustc directly, out of
# cargo's sight. Stops at the first failure. Installs rustfmt and clippy through rustup if one is
# missing and rustup is there.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() {
    echo
    echo "==> lint: $*"
}

missing=()
cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt)
{ cargo clippy --version && command -v clippy-driver; } >/dev/null 2>&1 || missing+=(clippy)
if ((${#missing[@]})); then
    if command -v rustup >/dev/null; then
        step "installing ${missing[*]} (rustup component add)"
        rustup component add "${missing[@]}"
    else
        echo "lint.sh: missing ${missing[*]} and no rustup to install them with" >&2
        exit 1
    fi
fi

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --release --workspace --all-targets -- -D warnings"
cargo clippy --release --workspace --all-targets -- -D warnings

# The same flags as restorer/build.rs where they matter to the checks (edition, crate type and
# name, panic=abort); --emit=metadata: checked, not linked.
step "clippy on the restorer blob (restorer/blob/main.rs, built by restorer/build.rs)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
clippy-driver --edition 2021 --crate-type bin --crate-name snapshim_blob -C panic=abort \
    --emit=metadata -o "$tmp/blob.rmeta" \
    -W clippy::undocumented_unsafe_blocks -W clippy::missing_safety_doc -D warnings \
    restorer/blob/main.rs

echo
echo "lint: all clean"
