#!/usr/bin/env bash
# Restore figures for issue #4 (map, don't copy): for dense images of 256 MiB, 1 GiB and 4 GiB,
# with a warm and a cold page cache, each restore mode's
#   resume   = snapshim-restore start -> the program runs again (the restorer's --stats), and
#   resident = snapshim-restore start -> the program has read a word of every page of its
#              memory (and found it intact: scripts/bench_restore.c checks a sum),
# as medians of RUNS runs and as ratios to --copy (every page read into memory, the old way).
# Modes: copy; map with --prefetch=none, background, eager (all with --no-verify); and
# "verify" = the defaults (checksums checked, map, prefetch background); "standby" = the
# defaults with --standby: the restorer checks the image ahead and waits, then is activated
# with SIGUSR1 (`snapshim activate` uses the same path), and both times count from the
# activation instead of the restorer's start.
# Cold = the image dropped from the page cache (posix_fadvise DONTNEED through dd) before the
# restore; warm = the image read once just before.
#
# Usage: scripts/bench_restore.sh [SIZE_MIB...]   (default: 256 1024 4096; a size is skipped
# when the disk or the memory is too short for it). RUNS=3 by default; MODES="verify standby"
# (say) for fewer modes (copy is the reference of the ratios and always runs), CACHES=warm for
# one cache state. Images go to a temporary directory under target/bench (BENCH_DIR to choose).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
sizes=("$@")
[[ $# -eq 0 ]] && sizes=(256 1024 4096)
runs=${RUNS:-3}
modes=(copy)
for m in ${MODES:-none background eager verify standby}; do
  [[ $m == copy ]] || modes+=("$m")
done
read -r -a caches <<<"${CACHES:-warm cold}"
cargo build --release --workspace -q
mkdir -p target/bench
cc -O2 -Wall -o target/bench/bench_restore scripts/bench_restore.c
bin=$PWD/target/release
work=$(mktemp -d "${BENCH_DIR:-$PWD/target/bench}/restore.XXXXXX")
trap 'rm -rf "$work"' EXIT

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf (b > 0 ? "%.3f" : "-"), a / b}'; }

# Checkpoints a bench_restore program of $1 MiB; prints the image path.
make_image() {
  local mib=$1 pid ready
  rm -rf "$work/img.d"
  exec 3< <(SNAPSHIM_DIR="$work/img.d" SNAPSHIM_NAME=b LD_PRELOAD="$bin/libsnapshim.so" \
    target/bench/bench_restore "$mib" 2>&1 >/dev/null & echo "PID $!"; wait)
  read -r _ pid <&3
  read -r ready <&3
  [[ $ready == READY ]] || { echo "bench_restore did not start: $ready" >&2; exit 1; }
  "$bin/snapshim" checkpoint --quiet "$pid" >/dev/null
  kill -9 "$pid"
  exec 3<&-
  readlink -f "$work/img.d/b/latest"
}

# snapshim-restore --standby on image $1, activated by SIGUSR1 once it says it is waiting;
# its stderr (with the resume report, counted from the activation) in $work/err.
standby_once() {
  local sb
  : >"$work/err"
  "$bin/snapshim-restore" --standby "$1" >/dev/null 2>"$work/err" &
  sb=$!
  until grep -q 'waiting for activation$' "$work/err"; do
    kill -0 "$sb" 2>/dev/null || break
    sleep 0.05
  done
  kill -USR1 "$sb" 2>/dev/null || true
  wait "$sb" || true
}

# One restore of image $1 in mode $2 with cache $3; prints "resume_ms resident_ms".
restore_once() {
  local img=$1 mode=$2 cache=$3 args=()
  case $mode in
    copy) args=(--no-verify --copy) ;;
    verify | standby) args=() ;;
    *) args=(--no-verify "--prefetch=$mode") ;;
  esac
  if [[ $cache == cold ]]; then
    dd if="$img" iflag=nocache count=0 status=none
  else
    cat "$img" >/dev/null
  fi
  if [[ $mode == standby ]]; then
    standby_once "$img"
  else
    "$bin/snapshim-restore" --stats "${args[@]}" "$img" >/dev/null 2>"$work/err" || true
  fi
  if ! grep -q 'resident_us=[0-9]* ok' "$work/err"; then
    echo "restore ($mode, $cache) failed:" >&2
    cat "$work/err" >&2
    exit 1
  fi
  local resume start resident
  resume=$(sed -nE 's/.*resuming after ([0-9]+) us.*/\1/p' "$work/err")
  start=$(sed -nE 's/.*started at ([0-9]+) us.*/\1/p' "$work/err")
  resident=$(sed -nE 's/.*resident_us=([0-9]+) ok.*/\1/p' "$work/err")
  awk -v a="$resume" -v b="$((resident - start))" 'BEGIN {printf "%.2f %.2f\n", a / 1000, b / 1000}'
}

printf '%-8s %-5s %-10s %11s %13s %13s %15s\n' size cache mode resume_ms resident_ms \
  resume/copy resident/copy
for mib in "${sizes[@]}"; do
  avail_disk=$(df -Pm "$work" | awk 'NR == 2 {print $4}')
  avail_mem=$(awk '/MemAvailable/ {print int($2 / 1024)}' /proc/meminfo)
  if ((avail_disk < 2 * mib || avail_mem < 3 * mib)); then
    echo "${mib}MiB: skipped (free: ${avail_disk} MiB disk, ${avail_mem} MiB memory)"
    continue
  fi
  img=$(make_image "$mib")
  for cache in "${caches[@]}"; do
    declare -A resume=() resident=()
    for mode in "${modes[@]}"; do
      : >"$work/resume"; : >"$work/resident"
      for ((r = 1; r <= runs; r++)); do
        read -r a b < <(restore_once "$img" "$mode" "$cache")
        echo "$a" >>"$work/resume"; echo "$b" >>"$work/resident"
      done
      resume[$mode]=$(median <"$work/resume")
      resident[$mode]=$(median <"$work/resident")
    done
    for mode in "${modes[@]}"; do
      printf '%-8s %-5s %-10s %11s %13s %13s %15s\n' "${mib}MiB" "$cache" "$mode" \
        "${resume[$mode]}" "${resident[$mode]}" \
        "$(ratio "${resume[$mode]}" "${resume[copy]}")" \
        "$(ratio "${resident[$mode]}" "${resident[copy]}")"
    done
  done
  rm -f "$img"
done
echo "(median of $runs runs each; resume = snapshim-restore start to the program running again;"
echo " resident = start to the program having touched every page; copy = --copy, the others map"
echo " the image with that --prefetch; verify = default options, page checksums checked;"
echo " standby = default options with --standby, both times counted from the activation)"
