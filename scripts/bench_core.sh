#!/usr/bin/env bash
# Checkpoint and restore figures for issue #2 (stop-the-world writer, copy-based restore):
# image size vs resident memory, checkpoint pause and total time, time to resume after restore.
# Usage: scripts/bench_core.sh [SIZE_MIB...]   (default: 256 1024), RUNS=5 by default.
# Prints the median of RUNS runs per size. Images go to a temporary directory on the same disk
# as the repository's target/ (set BENCH_DIR to choose).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
sizes=("$@")
[[ $# -eq 0 ]] && sizes=(256 1024)
runs=${RUNS:-5}
cargo build --release --workspace -q
mkdir -p target/bench
cc -O2 -o target/bench/bench_app scripts/bench_app.c
bin=$PWD/target/release
work=$(mktemp -d "${BENCH_DIR:-$PWD/target/bench}/run.XXXXXX")
trap 'rm -rf "$work"' EXIT

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

printf '%-8s %-6s %12s %12s %10s %12s %12s %14s\n' size kind resident_MiB image_MiB image/rss pause_ms total_ms resume_ms
for mib in "${sizes[@]}"; do
  for kind in dense sparse; do
    : >"$work/pause"; : >"$work/total"; : >"$work/img"; : >"$work/rss"; : >"$work/resume"
    for ((r = 1; r <= runs; r++)); do
      rm -rf "$work/img.d"
      exec 3< <(SNAPSHIM_DIR="$work/img.d" SNAPSHIM_NAME=b LD_PRELOAD="$bin/libsnapshim.so" \
        target/bench/bench_app "$mib" "$kind" 2>&1 >/dev/null & echo "PID $!"; wait)
      read -r _ pid <&3
      read -r ready <&3   # READY
      awk '/VmRSS/ {print int($2/1024)}' "/proc/$pid/status" >>"$work/rss"
      reply=$("$bin/snapshim" checkpoint "$pid")
      kill -9 "$pid"; exec 3<&-
      line=$(echo "$reply" | sed -n 2p)
      # "  image 1.0 GiB (process resident 1.0 GiB), pause 812.3 ms, total 1402.1 ms"
      echo "$line" | sed -E 's/.*pause ([0-9.]+) ms.*/\1/' >>"$work/pause"
      echo "$line" | sed -E 's/.*total ([0-9.]+) ms.*/\1/' >>"$work/total"
      img=$(readlink -f "$work/img.d/b/latest")
      echo $(( $(stat -c %s "$img") / 1048576 )) >>"$work/img"
      # Restore with a cold start of the restorer but a warm page cache (the image was just written).
      exec 4< <("$bin/snapshim-restore" --stats "$img" 2>&1 >/dev/null & echo "PID $!"; wait)
      read -r _ rpid <&4
      stats=""
      while read -r l <&4; do [[ $l == *"resuming after"* ]] && { stats=$l; break; }; done
      kill -9 "$rpid" 2>/dev/null || true; exec 4<&-
      echo "$stats" | sed -E 's/.*resuming after ([0-9]+) us.*/\1/' | awk '{print $1/1000}' >>"$work/resume"
    done
    rss=$(median <"$work/rss"); img=$(median <"$work/img")
    printf '%-8s %-6s %12s %12s %10s %12s %12s %14s\n' "${mib}MiB" "$kind" "$rss" "$img" \
      "$(awk -v a="$img" -v b="$rss" 'BEGIN {printf "%.2f", a / b}')" \
      "$(median <"$work/pause")" "$(median <"$work/total")" "$(median <"$work/resume")"
  done
done
echo "(median of $runs runs each; pause = all threads stopped; total = signal to image committed;"
echo " resume = snapshim-restore start to the program running again, page cache warm)"
