#!/usr/bin/env bash
# Builds the workspace and runs every test, from any directory. Installs the few Debian packages
# the tests need (a C compiler, python3, setpriv, jemalloc, tcmalloc, mimalloc, redis-server,
# memcached, nginx, node, iproute2, etcd)
# only if one is missing and we are root.
# With CI set, a test whose needs the machine does not meet (root, userfaultfd) fails instead of
# being skipped (testapps/src/needs.rs).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Whether the C compiler links -l$1 (it prints a path only for a library it finds).
has_c_library() {
    command -v cc >/dev/null && [[ $(cc -print-file-name="lib$1.so") == */* ]]
}

missing=()
command -v cc >/dev/null || missing+=(build-essential)
[[ -x /usr/bin/python3 ]] || missing+=(python3)
command -v setpriv >/dev/null || missing+=(util-linux)
# testapps/tests/allocators.rs: the allocators the allocs app is linked with, and redis-server.
has_c_library jemalloc || missing+=(libjemalloc-dev)
has_c_library tcmalloc || missing+=(libgoogle-perftools-dev)
has_c_library mimalloc || missing+=(libmimalloc-dev)
[[ -x /usr/bin/redis-server ]] || missing+=(redis-server)
[[ -x /usr/bin/redis-cli ]] || missing+=(redis-tools)
[[ -x /usr/bin/memcached ]] || missing+=(memcached)
[[ -x /usr/bin/sqlite3 ]] || missing+=(sqlite3)
[[ -x /usr/bin/etcd ]] || missing+=(etcd-server)
# testapps/tests/servers.rs: the servers it starts (redis-server and memcached above).
[[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
[[ -x /usr/bin/node ]] || missing+=(nodejs)
# testapps/tests/timers.rs: ruby's POSIX timer.
[[ -x /usr/bin/ruby ]] || missing+=(ruby)
# testapps/tests/cluster.rs: network namespaces, a bridge and veth pairs, a 3-member etcd.
[[ -x /usr/bin/ip ]] || missing+=(iproute2)
[[ -x /usr/bin/etcdctl ]] || missing+=(etcd-client)
if ((${#missing[@]})); then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
        echo "test.sh: installing ${missing[*]}"
        apt-get update
        # The tests run the servers themselves: keep the packages from starting their services
        # (invoke-rc.d and deb-systemd-invoke obey policy-rc.d; exit 101 = action forbidden).
        if [[ ! -e /usr/sbin/policy-rc.d ]]; then
            printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
            chmod 755 /usr/sbin/policy-rc.d
            trap 'rm -f /usr/sbin/policy-rc.d' EXIT
        fi
        DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
    else
        echo "test.sh: missing: ${missing[*]}; install with: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi
if ! command -v cargo >/dev/null; then
    echo "test.sh: cargo not found; install the Rust toolchain (https://rustup.rs)" >&2
    exit 1
fi

step() {
    echo
    echo "==> test: $*"
}

step "cargo build --release --workspace"
cargo build --release --workspace
step "cargo test --release --workspace"
cargo test --release --workspace
# The end-to-end restore tests once more with each other copy-on-write engine (the default,
# auto, is uffd as root and fork otherwise): every engine must give byte-identical restores.
for engine in fork stop; do
    step "SNAPSHIM_COW=$engine: the restore tests again"
    SNAPSHIM_COW=$engine cargo test --release -p snapshim-testapps --test restore
done
