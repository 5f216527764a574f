#!/usr/bin/env python3
"""Summarise one fio JSON report (stdin) for bench/run.sh as one line: "IOPS IOS LAT".

IOPS and IOS (I/Os completed) add reads and writes over all jobs. LAT is fio's completion
latency (clat) "p50/p99" in µs of the direction that did the most I/Os (reads for the 70/30 mix),
or "-" when fio gives none. A report with a job error, or none at all, prints "0 0 -".
fio may print notes before its JSON, so parsing starts at the first "{".
"""
import json
import sys


def summarise(text):
    start = text.find("{")
    if start < 0:
        return "0 0 -"
    try:
        report = json.loads(text[start:])
    except json.JSONDecodeError:
        return "0 0 -"
    jobs = report.get("jobs", [])
    if not jobs or any(job.get("error", 0) for job in jobs):
        return "0 0 -"
    iops = sum(job[d]["iops"] for job in jobs for d in ("read", "write"))
    ios = sum(job[d]["total_ios"] for job in jobs for d in ("read", "write"))
    # With group_reporting fio merges every job into one entry; take the first's percentiles.
    first = jobs[0]
    main = "read" if first["read"]["total_ios"] >= first["write"]["total_ios"] else "write"
    pct = first[main].get("clat_ns", {}).get("percentile", {})
    p50, p99 = pct.get("50.000000"), pct.get("99.000000")
    lat = f"{p50 / 1000:.0f}/{p99 / 1000:.0f}" if p50 and p99 else "-"
    return f"{iops:.0f} {ios} {lat}"


if __name__ == "__main__":
    print(summarise(sys.stdin.read()))
