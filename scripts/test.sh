#!/usr/bin/env bash
# test.sh: Ironstar's whole test run, the README's test command and what CI runs.
#
#   1. install the interop peers (scripts/install-test-deps.sh; root, or a no-op when present)
#   2. cargo fmt --check, 3. clippy -D warnings, 4. release build of the binaries
#   5. cargo test --workspace --no-fail-fast: unit, integration and interop tests; the
#      interop tests (package ironstar-interop, tests/) drive target/release/iscsitd from step 4 with
#      libiscsi's tools, qemu-img and iscsi-test-cu. Under CI=true (or
#      IRONSTAR_REQUIRE_PEERS=1) a missing peer fails its test instead of skipping it.
#   6. vm tests: testbed/run-tests.sh boots a QEMU guest (Debian's kernel) where the Linux
#      kernel initiator and LIO meet the release binaries of step 4 (see testbed/README.md).
#      It needs root (setup-host.sh installs qemu-system-x86 and the image tools); without
#      root it is skipped with a message, except under CI=true / IRONSTAR_REQUIRE_PEERS=1.
#      IRONSTAR_SKIP_VM=1 skips it.
#
# Every step runs even after an earlier one failed, so one run shows everything; the exit
# status is non-zero if any step failed. Ends with a summary of steps and test counts.
set -euo pipefail
cd "$(dirname "$0")/.."

LOG_DIR=target/test-logs
mkdir -p "$LOG_DIR"
TEST_LOG=$LOG_DIR/cargo-test.log
CU_SUMMARY=${CARGO_TARGET_DIR:-target}/interop/iscsi-test-cu-summary.txt
rm -f "$TEST_LOG" "$CU_SUMMARY"

names=()
results=()
failed=0

step() {
    local name=$1 start rc
    shift
    echo
    echo "==> $name: $*"
    start=$(date +%s)
    set +e
    "$@"
    rc=$?
    set -e
    local secs=$(( $(date +%s) - start ))
    names+=("$name")
    if [ "$rc" -eq 0 ]; then
        results+=("ok      ${secs}s")
    else
        results+=("FAILED  ${secs}s (exit $rc)")
        failed=$((failed + 1))
    fi
    return 0
}

install_deps() {
    if [ "$(id -u)" -eq 0 ]; then
        bash scripts/install-test-deps.sh
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo -n bash scripts/install-test-deps.sh
    else
        # Still fine if everything is installed: the script exits 0 before needing root.
        bash scripts/install-test-deps.sh
    fi
}

cargo_test() {
    cargo test --workspace --all-features --no-fail-fast 2>&1 | tee "$TEST_LOG"
}

vm_tests() {
    if [ "${IRONSTAR_SKIP_VM:-0}" = 1 ]; then
        echo "vm tests: skipped (IRONSTAR_SKIP_VM=1)"
    elif [ "$(id -u)" -eq 0 ]; then
        bash testbed/run-tests.sh
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        sudo -n bash testbed/run-tests.sh
    elif [ "${CI:-}" = true ] || [ "${IRONSTAR_REQUIRE_PEERS:-0}" = 1 ]; then
        echo "vm tests: need root (debootstrap, qemu-system-x86 from apt)" >&2
        return 1
    else
        echo "vm tests: SKIPPED: need root (sudo bash scripts/test.sh)"
    fi
}

step "install test deps" install_deps
step "rustfmt" cargo fmt --all -- --check
step "clippy" cargo clippy --workspace --all-targets -- -D warnings
# --all-features: the iSER rdma-core backend (off in a plain build, which needs no cmake/clang).
step "clippy (all features)" cargo clippy --workspace --all-targets --all-features -- -D warnings
step "release build" cargo build --release --bins --all-features
step "cargo test" cargo_test
# Fuzz smoke: every cargo-fuzz target for a fixed 20000 runs (fuzz/README.md; the longer
# run is scripts/fuzz.sh --long 600).
step "fuzz smoke" bash scripts/fuzz.sh --short
step "vm tests" vm_tests

# Test counts from every "test result:" line (unit, integration, interop, doc tests).
read -r t_pass t_fail t_ign t_bins < <(awk '/^test result:/ {
        for (i = 1; i <= NF; i++) {
            if ($(i+1) ~ /^passed/) p += $i
            if ($(i+1) ~ /^failed/) f += $i
            if ($(i+1) ~ /^ignored/) g += $i
        }
        n++
    } END {print p+0, f+0, g+0, n+0}' "$TEST_LOG" 2>/dev/null || echo "0 0 0 0")

echo
echo "================================ summary ================================"
for i in "${!names[@]}"; do
    printf '  %-20s %s\n' "${names[$i]}" "${results[$i]}"
done
if [ -s "$CU_SUMMARY" ]; then
    echo
    echo "iscsi-test-cu per suite (from $CU_SUMMARY):"
    sed 's/^/  /' "$CU_SUMMARY"
fi
if [ -s "$TEST_LOG" ] && grep -q '^failures:' "$TEST_LOG"; then
    echo
    echo "failed tests:"
    grep -E '^test .* \.\.\. FAILED$' "$TEST_LOG" | sed 's/^/  /' || true
fi
echo
echo "cargo test: $t_bins test binaries; log in $TEST_LOG"
if [ "$failed" -eq 0 ]; then
    echo "all $(( ${#names[@]} )) steps passed"
else
    echo "$failed of ${#names[@]} steps FAILED"
fi
echo "tests: $t_pass passed, $t_fail failed, $t_ign skipped"
[ "$failed" -eq 0 ]
