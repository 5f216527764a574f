#!/usr/bin/env python3
"""Group `perf script -F comm,tid,ip,sym,dso` samples (with call chains) of iscsitd by area.

    python3 profile_summary.py CPU_US_PER_IO < perf.script

Prints markdown: the share of samples and the CPU µs per I/O of each area (the leaf frame decides:
a kernel leaf goes to the syscall it runs under, a user leaf to its crate or library), the nearest
Ironstar function on each sample's stack (inclusive of the libc, std and kernel work it calls into),
and the top leaf symbols. Used by bench/profile.sh.
"""
import collections
import re
import sys

OURS = ("iscsi_target", "iscsi_proto", "scsi_target", "idm", "iscsitd", "iser")
SYSCALL = re.compile(r"__(?:x64|se|do)_sys_(\w+)")
CRATE = re.compile(r"^<?(?:&(?:mut )?)?(?:dyn )?([A-Za-z_][A-Za-z0-9_]*)::")
HASH = re.compile(r"::h[0-9a-f]{16}$")

SYSCALL_GROUPS = {
    "sendmsg": "send", "sendto": "send", "writev": "send", "write": "send", "sendmmsg": "send",
    "recvfrom": "receive", "recvmsg": "receive", "read": "receive", "readv": "receive",
    "epoll_wait": "epoll_wait", "epoll_pwait": "epoll_wait", "epoll_pwait2": "epoll_wait",
    "futex": "futex (thread park/wake)", "syscall": "futex (thread park/wake)",
    "recv": "receive", "send": "send",
}


def parse(stream):
    """Yields each sample's frames, leaf first, as (symbol, dso)."""
    frames = []
    for line in stream:
        if not line.strip():
            if frames:
                yield frames
            frames = []
            continue
        if not line[0].isspace():
            continue  # the "comm tid" header of a sample
        body = line.strip()
        ip_sym, _, dso = body.rpartition(" (")
        parts = ip_sym.split(" ", 1)
        sym = parts[1] if len(parts) > 1 else "[unknown]"
        frames.append((HASH.sub("", sym), dso.rstrip(")")))
    if frames:
        yield frames


def kernel_area(frames):
    in_syscall = False
    for sym, dso in frames:
        if dso != "[kernel.kallsyms]":
            # The kernel often inlines its __x64_sys_* entry; then the libc wrapper that made
            # the call (__GI___writev, __libc_recv, epoll_wait, ...) names the syscall.
            if in_syscall:
                name = re.sub(r"^(__GI_|__libc_|_+)+", "", sym)
                return "kernel: %s syscalls" % SYSCALL_GROUPS.get(name, name)
            break
        m = SYSCALL.search(sym)
        if m:
            name = m.group(1)
            return "kernel: %s syscalls" % SYSCALL_GROUPS.get(name, name)
        if "page_fault" in sym:
            return "kernel: page faults"
        if sym.startswith("entry_SYSCALL"):
            in_syscall = True
    return "kernel: interrupts, softirq, scheduler (no syscall on stack)"


def crate_of(sym):
    m = CRATE.match(sym)
    return m.group(1) if m else None


def user_area(sym, dso):
    if re.search(r"mem(cpy|move|set)|__memcpy|__memmove|__memset", sym):
        return "memcpy/memmove/memset"
    if re.search(r"malloc|_int_free|\bfree\b|cfree|realloc|tcache|__libc_calloc", sym):
        return "allocator (malloc/free)"
    m = CRATE.match(sym)
    crate = m.group(1) if m else None
    if crate == "tokio":
        return "tokio runtime"
    if crate == "iscsi_proto":
        return "PDU codec (iscsi_proto)"
    if crate == "scsi_target":
        return "SCSI emulation + LU backends (scsi_target)"
    if crate == "iscsi_target":
        return "connection/session/task handling (iscsi_target)"
    if crate in OURS:
        return "other Ironstar crates (%s)" % crate
    if "crc32" in sym.lower():
        return "CRC32C"
    if crate in ("core", "std", "alloc"):
        return "Rust core/std/alloc"
    if crate:
        return "crate %s" % crate
    if dso == "[vdso]":
        return "clock_gettime (vdso)"
    if "libc.so" in dso:
        return "libc other (syscall wrappers, locks)"
    return "other (%s)" % dso.rsplit("/", 1)[-1]


def strip_generics(text):
    out, depth = [], 0
    for ch in text:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def short(sym):
    """A function name without generic arguments; "<T as Trait>::f" becomes "T::f"."""
    if sym.startswith("<"):
        depth = 0
        for i, ch in enumerate(sym):
            depth += (ch == "<") - (ch == ">")
            if depth == 0:
                inner = sym[1:i]
                # " as " at the inner's own level separates the type from the trait.
                level, cut = 0, len(inner)
                for j, c in enumerate(inner):
                    level += (c == "<") - (c == ">")
                    if level == 0 and inner.startswith(" as ", j):
                        cut = j
                        break
                return strip_generics(inner[:cut]) + strip_generics(sym[i + 1:])
    return strip_generics(sym) or sym


def main():
    cpu_us = float(sys.argv[1]) if len(sys.argv) > 1 else 0.0
    areas, ours, leaves = collections.Counter(), collections.Counter(), collections.Counter()
    total = 0
    for frames in parse(sys.stdin):
        total += 1
        sym, dso = frames[0]
        areas[kernel_area(frames) if dso == "[kernel.kallsyms]" else user_area(sym, dso)] += 1
        leaves[sym if len(sym) < 90 else sym[:87] + "..."] += 1
        nearest = next((s for s, _ in frames if crate_of(s) in OURS), None)
        ours[short(nearest) if nearest else "(no Ironstar frame: runtime threads, unwound short)"] += 1
    if not total:
        print("no samples")
        return

    def table(title, counter, limit):
        print("| %s | share | µs per I/O |" % title)
        print("|---|---|---|")
        for key, n in counter.most_common(limit):
            print("| %s | %.1f %% | %.2f |" % (key.replace("|", "\\|"), 100 * n / total, cpu_us * n / total))
        print()

    print("%d samples.\n" % total)
    table("area (leaf frame)", areas, 20)
    table("nearest Ironstar function on the stack (inclusive)", ours, 15)
    table("leaf symbol", leaves, 15)


if __name__ == "__main__":
    main()
