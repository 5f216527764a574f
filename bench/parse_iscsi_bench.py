#!/usr/bin/env python3
"""Pull IOPS or "p50/p99" latency (µs) out of `iscsi bench` output on stdin (used by bench/run.sh)."""
import re
import sys

text = sys.stdin.read()
what = sys.argv[1] if len(sys.argv) > 1 else "iops"
if what == "iops":
    m = re.search(r"IOPS:\s*([0-9.]+)", text)
    print(int(float(m.group(1))) if m else 0)
else:
    m = re.search(r"p50\s+([0-9.]+)\s+p99\s+([0-9.]+)", text)
    print(f"{m.group(1)}/{m.group(2)}" if m else "-")
