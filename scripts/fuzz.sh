#!/usr/bin/env bash
# fuzz.sh: runs Ironstar's cargo-fuzz (libFuzzer) targets in fuzz/.
#
#   scripts/fuzz.sh --short                 every target for a fixed number of runs (CI; test.sh)
#   scripts/fuzz.sh --long SECONDS          every target for SECONDS each (the longer run, e.g. 600)
#   scripts/fuzz.sh --short|--long S TARGET...   only these targets
#
# Environment: FUZZ_RUNS (runs per target for --short, default 20000). One target at a
# time, one process, so it fits the 2-core machines.
#
# cargo-fuzz needs nightly compiler flags; the machines have stable Rust only, which accepts
# them with RUSTC_BOOTSTRAP=1 (set here for the fuzz build only). cargo-fuzz is installed
# from crates.io when missing. Each target starts from its committed seeds (fuzz/corpus/T,
# read only) plus a working corpus under the target dir that libFuzzer grows; crashes land in
# fuzz/artifacts/T/ (ignored by git) and the script exits non-zero. Reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run T fuzz/artifacts/T/crash-...
# and see fuzz/README.md for turning it into a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_TARGETS=(pdu_decoder text_negotiation scsi_cdb config rpc_request isns_decoder)
mode=
seconds=
case "${1:-}" in
    --short) mode=short; shift ;;
    --long)
        mode=long
        seconds=${2:?--long needs SECONDS}
        case "$seconds" in ''|*[!0-9]*) echo "fuzz.sh: --long SECONDS, got '$seconds'" >&2; exit 2 ;; esac
        shift 2
        ;;
    *)
        sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || targets=("${ALL_TARGETS[@]}")
runs=${FUZZ_RUNS:-20000}

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz from crates.io"
    cargo install --locked cargo-fuzz
fi

work=$CARGO_TARGET_DIR/fuzz-work
logs=$CARGO_TARGET_DIR/fuzz-logs
mkdir -p "$work" "$logs"

echo "fuzz.sh: building ${targets[*]} ($(cargo fuzz --version))"
for t in "${targets[@]}"; do
    cargo fuzz build --fuzz-dir fuzz "$t"
done

failed=0
summary=()
for t in "${targets[@]}"; do
    mkdir -p "$work/$t" "fuzz/corpus/$t"
    if [ "$mode" = short ]; then
        limit=(-runs="$runs")
    else
        limit=(-max_total_time="$seconds")
    fi
    log=$logs/$t.log
    echo "==> fuzz $t (${limit[*]}), log $log"
    set +e
    # -timeout: no input may take 10 s; -rss_limit_mb: leaks or runaway
    # allocations fail the run; -print_final_stats for the summary below.
    cargo fuzz run --fuzz-dir fuzz "$t" "$work/$t" "fuzz/corpus/$t" -- \
        "${limit[@]}" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -1)
    cov=$(echo "$done_line" | sed -n 's/.*cov: \([0-9]*\).*/\1/p')
    ft=$(echo "$done_line" | sed -n 's/.*ft: \([0-9]*\).*/\1/p')
    rate=$(echo "$done_line" | sed -n 's/.*exec\/s: \([0-9]*\).*/\1/p')
    if [ "$rc" -eq 0 ]; then
        line=$(printf '%-17s ok      %9s runs %5ss %7s exec/s  cov %5s  ft %6s' \
            "$t" "${execs:-?}" "${secs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}")
    else
        failed=$((failed + 1))
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -1)
        line=$(printf '%-17s FAILED (exit %s) %s' "$t" "$rc" "${artifact:-see $log}")
        echo "---- last lines of $log"
        grep -v '^#[0-9]' "$log" | tail -40
    fi
    echo "$line"
    summary+=("$line")
done

echo
echo "fuzz summary ($mode):"
printf '  %s\n' "${summary[@]}"
[ "$failed" -eq 0 ]
