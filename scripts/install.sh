#!/usr/bin/env bash
# Builds snapshim and installs it: the three binaries go together into PREFIX/lib/snapshim/
# (`snapshim` finds `libsnapshim.so` and `snapshim-restore` next to itself), and PREFIX/bin gets
# links to the two commands. PREFIX is /usr/local for root, else ~/.local; the first argument
# overrides it.
#
# Usage: scripts/install.sh [PREFIX]        Uninstall: rm -r PREFIX/lib/snapshim PREFIX/bin/snapshim{,-restore}
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $# -gt 0 ]]; then
    prefix=$1
elif [[ $(id -u) == 0 ]]; then
    prefix=/usr/local
else
    prefix=$HOME/.local
fi
if ! command -v cargo >/dev/null; then
    echo "install.sh: cargo not found; install the Rust toolchain (https://rustup.rs)" >&2
    exit 1
fi
cargo build --release --workspace -q
libdir=$prefix/lib/snapshim
mkdir -p "$libdir" "$prefix/bin"
# Copied under a temporary name and renamed, so a running program keeps its old file.
for f in snapshim snapshim-restore libsnapshim.so; do
    install -m 0755 "target/release/$f" "$libdir/.$f.new"
    mv -f "$libdir/.$f.new" "$libdir/$f"
done
ln -sfn "$libdir/snapshim" "$prefix/bin/snapshim"
ln -sfn "$libdir/snapshim-restore" "$prefix/bin/snapshim-restore"
echo "installed: $prefix/bin/snapshim, $prefix/bin/snapshim-restore ($libdir/libsnapshim.so)"
case ":$PATH:" in
    *":$prefix/bin:"*) ;;
    *) echo "note: $prefix/bin is not on your PATH" ;;
esac
"$prefix/bin/snapshim" check >/dev/null || echo "note: \`snapshim check\` reports a missing feature; run it to see which"
