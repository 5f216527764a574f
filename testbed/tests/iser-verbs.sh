#!/bin/bash
# The rdma-core verbs backend of crates/iser on Soft-RoCE, against the verbs contract:
# CM connect/accept with the iSER CM header both ways, SEND/RECV, 1 MiB RDMA READ and WRITE
# verified, WRITE-then-SEND ordering, a wrong rkey refused, every outstanding receive flushed
# once the QP errs, posting refused after it, and a reject carrying private data. Completions
# come from the completion channel's fd on tokio. Needs bin/iser_verbs (run-tests.sh builds
# crates/iser/examples/iser_verbs.rs).
. "$(dirname "$0")/lib.sh"
[ -x "$SHARE/bin/iser_verbs" ] || die "bin/iser_verbs missing (cargo build --release -p iser --example iser_verbs)"
rxe_up
step "iser_verbs pair $RDMA_IP:4420"
out=$(timeout 120 iser_verbs pair "$RDMA_IP:4420" 2>&1) || { echo "$out"; die "iser_verbs"; }
echo "$out"
n=$(grep -c '^ok:' <<<"$out")
CHECKS=$((CHECKS + n))
expect_match "all verbs checks passed" "$out" "^iser_verbs: all checks passed$"
finish
