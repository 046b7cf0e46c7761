#!/usr/bin/env bash
# snapshim demo: checkpoint a running program, kill it with SIGKILL, restore it, and check that
# it finishes with exactly the output of an uninterrupted run.
#
#   1. build the workspace and scripts/demo_app.c (counts the primes below 2^35 in 30 steps,
#      about one progress line per second; the right answer is known: 1480206279)
#   2. start an uninterrupted reference run, and the same program under `snapshim run`
#   3. after a few steps, `snapshim checkpoint PID`; let it run on a little, then kill -9 it
#   4. `snapshim inspect` / `verify` / `ls` the image
#   5. `snapshim restore` the image directory: the program continues from the checkpoint,
#      its output file cut back to its checkpoint-time length
#   6. the output must be byte-identical to the reference and end with the known answer
#
# Exits non-zero if any step fails. Work files go to a temporary directory, removed on success.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

EXPECTED="answer: 1480206279" # pi(2^35), OEIS A007053
STEPS=30
CHECKPOINT_AT=5 # take the checkpoint once this step is printed

if [[ -t 1 ]]; then
    BOLD=$'\e[1m' GREEN=$'\e[32m' RED=$'\e[31m' RESET=$'\e[0m'
else
    BOLD="" GREEN="" RED="" RESET=""
fi
banner() { printf '\n%s== %s%s\n' "$BOLD" "$*" "$RESET"; }
say() { printf '   %s\n' "$*"; }
fail() {
    printf '\n%sdemo: FAILED: %s%s\n' "$RED" "$*" "$RESET" >&2
    exit 1
}

SNAPSHIM=target/release/snapshim
APP=target/demo/demo_app
WORK=$(mktemp -d "${TMPDIR:-/tmp}/snapshim-demo.XXXXXX")
IMAGES=$WORK/images
OUT=$WORK/out.txt
REF=$WORK/reference.txt

# Processes this script started, killed on exit if still running.
REF_PID="" APP_PID="" RESTORE_PID=""
passed=0
cleanup() {
    for p in $REF_PID $APP_PID $RESTORE_PID; do
        kill -9 "$p" 2>/dev/null || true
    done
    if ((passed)); then
        rm -rf "$WORK"
    else
        echo "demo: work files kept in $WORK" >&2
    fi
}
trap cleanup EXIT

# Prints what $OUT gained since the last call, indented (and says so if it shrank).
shown=0
show_output() {
    local size
    size=$(stat -c %s "$OUT" 2>/dev/null || echo 0)
    if ((size < shown)); then
        say "(output file cut back to $size bytes, its length at the checkpoint)"
        shown=$size
    fi
    if ((size > shown)); then
        dd if="$OUT" iflag=skip_bytes,count_bytes skip="$shown" count=$((size - shown)) \
            status=none | sed 's/^/   | /'
        shown=$size
    fi
}

alive() { kill -0 "$1" 2>/dev/null; }

banner "1. Build"
cargo build --release --workspace
mkdir -p target/demo
cc -O2 -Wall -Wextra -o "$APP" scripts/demo_app.c
say "built $SNAPSHIM, target/release/libsnapshim.so, target/release/snapshim-restore, $APP"

banner "2. Start the program under snapshim (and an uninterrupted reference run beside it)"
"$APP" >"$REF" 2>"$WORK/reference.err" </dev/null &
REF_PID=$!
"$SNAPSHIM" run --dir "$IMAGES" -- "$APP" >"$OUT" 2>"$WORK/app.err" </dev/null &
APP_PID=$! # `snapshim run` execs the program: same PID
say "\$ $SNAPSHIM run --dir $IMAGES -- $APP > $OUT &"
deadline=$((SECONDS + 90))
while ! grep -q "^step $CHECKPOINT_AT/$STEPS:" "$OUT"; do
    show_output
    alive "$APP_PID" || fail "the program exited early; its stderr: $(cat "$WORK/app.err")"
    ((SECONDS < deadline)) || fail "no step $CHECKPOINT_AT after 90 s"
    sleep 0.2
done
show_output
sed 's/^/   /' "$WORK/app.err"

banner "3. Checkpoint PID $APP_PID, let it run on, then kill it with SIGKILL"
say "\$ snapshim checkpoint $APP_PID"
"$SNAPSHIM" checkpoint "$APP_PID" | sed 's/^/   /' || fail "snapshim checkpoint failed"
at_checkpoint=$(grep -c '^step ' "$OUT" || true)
deadline=$((SECONDS + 30))
while (($(grep -c '^step ' "$OUT" || true) < at_checkpoint + 2)); do
    alive "$APP_PID" || fail "the program exited after the checkpoint"
    ((SECONDS < deadline)) || fail "the program made no progress after the checkpoint"
    sleep 0.2
done
show_output
kill -9 "$APP_PID"
wait "$APP_PID" 2>/dev/null || true
alive "$APP_PID" && fail "PID $APP_PID is still alive after SIGKILL"
say "PID $APP_PID killed with SIGKILL; it got to step $(grep -c '^step ' "$OUT") of $STEPS"
APP_PID=""

banner "4. Inspect the image"
"$SNAPSHIM" ls "$IMAGES" | sed 's/^/   /'
"$SNAPSHIM" verify "$IMAGES/demo_app" | sed 's/^/   /' || fail "snapshim verify failed"
"$SNAPSHIM" inspect "$IMAGES/demo_app" >"$WORK/inspect.txt" || fail "snapshim inspect failed"
sed -n '1,11p' "$WORK/inspect.txt" | sed 's/^/   /'
say "... (full report: snapshim inspect $IMAGES/demo_app)"

banner "5. Restore: the program continues from the checkpoint"
say "\$ snapshim restore $IMAGES/demo_app"
# The restored program gets its stdout back from the image (the same file, cut back to its
# length at the checkpoint); the restorer's own stdout is appended to it, should it print.
"$SNAPSHIM" restore "$IMAGES/demo_app" >>"$OUT" 2>"$WORK/restore.err" </dev/null &
RESTORE_PID=$!
# A hang is a minute without a new step; a busy machine only makes the steps slower.
deadline=$((SECONDS + 60))
while alive "$RESTORE_PID"; do
    before=$shown
    show_output
    ((shown == before)) || deadline=$((SECONDS + 60))
    ((SECONDS < deadline)) || fail "the restored program printed nothing for 60 s"
    sleep 0.2
done
status=0
wait "$RESTORE_PID" || status=$?
RESTORE_PID=""
show_output
if ((status != 0)); then
    sed 's/^/   restore: /' "$WORK/restore.err" >&2
    fail "the restored program exited with status $status"
fi

banner "6. Check the output"
wait "$REF_PID" || fail "the reference run failed"
REF_PID=""
grep -qx "$EXPECTED" "$REF" || fail "the reference run did not print '$EXPECTED'"
grep -qx "$EXPECTED" "$OUT" || fail "the restored run did not print '$EXPECTED'"
for i in $(seq 1 "$STEPS"); do
    n=$(grep -c "^step $i/$STEPS:" "$OUT" || true)
    ((n == 1)) || fail "step $i appears $n times in the output (expected once)"
done
if ! cmp -s "$REF" "$OUT"; then
    diff -u "$REF" "$OUT" | head -n 20 >&2 || true
    fail "the output differs from the uninterrupted run"
fi
say "$EXPECTED (the known value of pi(2^35))"
say "every step printed exactly once; output byte-identical to the uninterrupted run"
passed=1
printf '\n%sdemo: PASS%s\n' "$GREEN" "$RESET"
