#!/usr/bin/env bash
# run-tests.sh: run every guest test of the test bed, one VM boot each, and summarise.
#
#   testbed/run-tests.sh [NAME...]        NAME: a test in testbed/tests (e.g. kernel-iscsitd);
#                                         default: all of tests/*.sh except lib.sh
#
# Steps: setup-host.sh (installs qemu etc. when missing; root), build-image.sh (cached),
# then for each test a VM that gets a share dir with bin/iscsitd and bin/iscsi (our release
# binaries from ${IRONSTAR_BIN_DIR:-${CARGO_TARGET_DIR:-target}/release}: build them first with
# `cargo build --release --bins --all-features`, iSER included), tests/ and results/<test>/. Per-test console logs, daemon
# logs and fio figures stay in ${TESTBED_RUNS:-target/testbed}/results/. Ends with the fio
# figures and a line "N passed, N failed"; exits non-zero when any test failed.
# Knobs: FIO_RUNTIME (s per fio benchmark job, default 5), TESTBED_TIMEOUT (s per VM, 600).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BIN=${IRONSTAR_BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
RUNS=${TESTBED_RUNS:-$ROOT/target/testbed}
FIO_RUNTIME=${FIO_RUNTIME:-5}
TIMEOUT=${TESTBED_TIMEOUT:-600}

if [ $# -gt 0 ]; then
    TESTS=("$@")
else
    TESTS=()
    for f in "$HERE"/tests/*.sh; do
        n=$(basename "$f" .sh)
        [ "$n" = lib ] || TESTS+=("$n")
    done
fi

for b in iscsitd iscsi; do
    [ -x "$BIN/$b" ] || { echo "run-tests: $BIN/$b missing: cargo build --release --bins --all-features" >&2; exit 1; }
done
# iSER: the verbs-backend check (crates/iser/examples/iser_verbs.rs) for tests/iser-verbs.sh;
# built here when cargo is at hand and the binaries are this tree's (an incremental build).
if [ -z "${IRONSTAR_BIN_DIR:-}" ] && command -v cargo >/dev/null; then
    (cd "$ROOT" && cargo build -q --release -p iser --features rdma --example iser_verbs) ||
        echo "run-tests: building the iser_verbs example failed; iser-verbs will fail" >&2
fi
bash "$HERE/setup-host.sh"
IMAGE=$(bash "$HERE/build-image.sh")

rm -rf "$RUNS"
mkdir -p "$RUNS/bin" "$RUNS/results"
cp "$BIN/iscsitd" "$BIN/iscsi" "$RUNS/bin/"
[ ! -x "$BIN/examples/iser_verbs" ] || cp "$BIN/examples/iser_verbs" "$RUNS/bin/"
[ ! -x "$BIN/itadm" ] || cp "$BIN/itadm" "$RUNS/bin/"   # iser-cli-iscsitd: itadm inspect
cp -r "$HERE/tests" "$RUNS/tests"
echo "run-tests: image $IMAGE ($(cat "$IMAGE/kernel.version"))"
echo "run-tests: iscsitd and iscsi from $BIN, built $(date -r "$BIN/iscsitd" "+%F %T")"
echo "run-tests: results in $RUNS/results"

passed=0 failed=0
lines=()
for t in "${TESTS[@]}"; do
    [ -f "$RUNS/tests/$t.sh" ] || { echo "run-tests: no test $t" >&2; failed=$((failed + 1)); lines+=("FAILED  $t (no such test)"); continue; }
    mkdir -p "$RUNS/results/$t"
    echo
    echo "######## $t"
    start=$(date +%s)
    rc=0
    bash "$HERE/run-vm.sh" --image "$IMAGE" --share "$RUNS" --timeout "$TIMEOUT" \
        --log "$RUNS/results/$t/console.log" \
        --env "TESTBED_RESULTS=results/$t" --env "FIO_RUNTIME=$FIO_RUNTIME" \
        "$RUNS/tests/$t.sh" || rc=$?
    secs=$(( $(date +%s) - start ))
    checks=$(sed -n 's/.*done: \([0-9]*\) checks passed.*/\1/p' "$RUNS/results/$t/console.log" | tail -n1)
    if [ "$rc" -eq 0 ]; then
        passed=$((passed + 1))
        lines+=("$(printf 'ok      %-22s %4ss  %s checks' "$t" "$secs" "${checks:-?}")")
    else
        failed=$((failed + 1))
        lines+=("$(printf 'FAILED  %-22s %4ss  exit %s: %s' "$t" "$secs" "$rc" \
            "$(grep -m1 '^FAIL' "$RUNS/results/$t/console.log" || echo 'see console.log')")")
    fi
done

echo
echo "======================== VM test bed summary ========================"
printf '  %s\n' "${lines[@]}"
fio_files=$(ls "$RUNS"/results/*/fio.txt 2>/dev/null || true)
if [ -n "$fio_files" ]; then
    echo
    echo "fio through the kernel initiator (TCG, ${FIO_RUNTIME}s per job, relative figures only):"
    # shellcheck disable=SC2086
    cat $fio_files | sed 's/^/  /'
fi
table_files=$(ls "$RUNS"/results/*/fio-table.txt 2>/dev/null || true)
if [ -n "$table_files" ]; then
    echo
    echo "iSER vs TCP, kernel initiator (target transport job MiB/s IOPS; TCG, ${FIO_RUNTIME}s per job):"
    # shellcheck disable=SC2086
    cat $table_files | sed 's/^/  /'
fi
rt_files=$(ls "$RUNS"/results/*/roundtrip.txt 2>/dev/null || true)
if [ -n "$rt_files" ]; then
    echo
    echo "our iscsi CLI, 64 MiB round trips (TCG):"
    # shellcheck disable=SC2086
    cat $rt_files | sed 's/^/  /'
fi
echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
