#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""concur's benchmark runner (python3 stdlib only).

Runs every workload's variants (concur and its peers) alternating A B A B, after a warm-up,
takes median / min / max, and computes the ratio of concur to each peer pair by pair (the ratio
of run i to run i, then the median of those ratios). Writes results/latest.json (schema in
bench/README.md), results/latest.md, results/ratios.svg and results/latency.svg, and prints the table.

    python3 bench/run.py --build                 # configure + build into ./build, then run all
    python3 bench/run.py --quick                 # smoke: every workload briefly (< 2 min)
    python3 bench/run.py --list
    python3 bench/run.py --filter 'spawn|fib' --runs 9
"""

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SCHEMA = "concur-bench/1"

sys.path.insert(0, HERE)
import servers  # noqa: E402  (the server and file workloads: bench/servers.py)


# --------------------------------------------------------------------------------------------
# The workloads. Each variant is a binary from the build dir plus arguments; `n` is the size of
# one counted run (full) and `quick_n` the size in --quick. The first variant is concur's; the
# others are its peers, each with an optional target on the ratio concur / peer.
# --------------------------------------------------------------------------------------------


def V(name, binary, variant, n, quick_n, extra=(), target=None, note=""):
    return {
        "name": name,
        "binary": binary,
        "args": ["--variant", variant] + list(extra),
        "n": n,
        "quick_n": quick_n,
        "target": target,  # ("<=", x): the median ratio concur/peer must be <= x
        "note": note,
    }


def E(name, run, target=None, note=""):
    """A variant driven by bench/servers.py (a server under load, fio) instead of one binary:
    run(build_dir, quick, timeout, is_concur) -> (status, record or reason)."""
    return {"name": name, "binary": None, "run": run, "args": [], "n": None, "quick_n": None,
            "target": target, "note": note}


def spawn_workload(kind, what, concur, bare, pool, omp, uv):
    """spawn/one and spawn/bulk: the same peers, each given (n, quick_n)."""
    pool_note = "target: concur >= 3x faster than the condvar pool"
    return {
        "name": "spawn/" + kind,
        "what": what,
        "variants": [
            V("concur", "bench_spawn", "concur_" + kind, *concur),
            V("bare pooled-stack spawn", "bench_spawn", "bare_" + kind, *bare,
              target=("<=", 2.0)),
            V("mutex+condvar pool", "bench_spawn", "pool_" + kind, *pool, target=("<=", 1 / 3),
              note=pool_note),
            V("OpenMP tasks+taskwait", "bench_omp", "spawn_" + kind, *omp),
            V("libuv uv_queue_work", "bench_uv", "spawn_" + kind, *uv),
        ],
    }


def channel_workload(kind, where, n, quick_n):
    """channel/same_loop and channel/cross_loop: the same peer, a condvar queue between threads."""
    return {
        "name": "channel/" + kind,
        "what": "ping-pong of int64 items through two bounded channels, " + where,
        "variants": [
            V("concur", "bench_channel", kind, n, quick_n),
            V("mutex+condvar queue, 2 threads", "bench_channel", "condvar", 50000, 5000),
        ],
    }


WORKLOADS = [
    {
        "name": "switch",
        "what": "fiber yield ping-pong: 2 tasks on 1 loop calling concur_yield()",
        "variants": [
            V("concur", "bench_switch", "concur", 5_000_000, 100_000),
            V("bare asm switch", "bench_switch", "asm", 50_000_000, 1_000_000, target=("<=", 1.5)),
            V("swapcontext", "bench_switch", "ucontext", 2_000_000, 100_000),
        ],
    },
] + [
    spawn_workload("one", "inside a task (1 loop): spawn a trivial task, wait for its result, "
                   "repeat", (1_000_000, 20_000), (5_000_000, 200_000), (50_000, 2_000),
                   (500_000, 20_000), (50_000, 2_000)),
    spawn_workload("bulk", "one task spawns 10^6 trivial tasks (fire and forget), then "
                   "concur_exec_join", *[(1_000_000, 100_000)] * 5),
    {
        "name": "spawn/foreign",
        "what": "a thread outside the executor spawns 10^6 trivial tasks in a burst, then takes "
                "each result",
        "variants": [
            V("concur", "bench_spawn", "concur_foreign", 1_000_000, 100_000),
            V("mutex+condvar pool", "bench_spawn", "pool_bulk", 1_000_000, 100_000,
              target=("<=", 0.5)),
        ],
    },
] + [
    {
        "name": f"await_nop/{b}",
        "what": f"{b} task(s) on 1 loop, each awaiting IORING_OP_NOP in a loop",
        "variants": [
            V("concur", "bench_nop", "concur", 2_000_000, 100_000, ["-b", str(b)]),
            V(f"raw liburing, batch {b}", "bench_nop", "raw", 2_000_000, 100_000, ["-b", str(b)],
              target=("<=", 1 / 0.9) if b == 128 else None,
              note="target: >= 0.9x raw liburing throughput" if b == 128 else ""),
        ],
    }
    for b in (1, 8, 32, 128)
] + [
    {
        "name": "await_nop/128/future",
        "what": "as await_nop/128, with heap futures: concur_result(concur_nop(ex), -1)",
        "variants": [
            V("concur", "bench_nop", "concur_future", 2_000_000, 100_000, ["-b", "128"]),
            V("raw liburing, batch 128", "bench_nop", "raw", 2_000_000, 100_000, ["-b", "128"]),
        ],
    },
    {
        "name": "await_nop/128/deadline",
        "what": "as await_nop/128, each task inside a deadline scope that never fires "
                "(concur_deadline_push), and with a scope pushed and popped around each NOP",
        "variants": [
            V("concur, one scope per task", "bench_nop", "concur_deadline", 2_000_000, 100_000,
              ["-b", "128"]),
            V("concur, no deadline", "bench_nop", "concur", 2_000_000, 100_000, ["-b", "128"],
              target=("<=", 1.05)),
            V("concur, a scope per NOP", "bench_nop", "concur_op_deadline", 2_000_000, 100_000,
              ["-b", "128"]),
        ],
    },
] + [
    {
        "name": "xwake",
        "what": "foreign thread spawns a task and blocks in concur_result until the loop completes it",
        "variants": [
            V("concur", "bench_xwake", "concur_spawn", 100_000, 2_000),
            V("futex ping-pong", "bench_xwake", "futex", 100_000, 2_000, target=("<=", 1.1)),
        ],
    },
    {
        "name": "xwake/promise",
        "what": "foreign thread and a task ping-pong through promises (set / blocking result)",
        "variants": [
            V("concur", "bench_xwake", "concur_promise", 100_000, 2_000),
            V("futex ping-pong", "bench_xwake", "futex", 100_000, 2_000, target=("<=", 1.1)),
        ],
    },
    {
        "name": "http/plaintext",
        "what": "HTTP/1.1 GET /plaintext under wrk -t2 -c50 (keep-alive); value: server CPU "
                "time per request",
        "variants": [
            E("concur (2 loops)", servers.http_variant("concur_http")),
            E("raw liburing (2 threads)", servers.http_variant("uring_http"),
              target=("<=", 1.0)),
            E("epoll (2 threads)", servers.http_variant("epoll_http")),
            E("nginx (workers = CPUs)", servers.http_variant("nginx"), target=("<=", 0.8)),
        ],
    },
    {
        "name": "http/pipeline16",
        "what": "as http/plaintext with 16 requests pipelined per write (wrk Lua script)",
        "variants": [
            E("concur (2 loops)", servers.http_variant("concur_http", 16)),
            E("raw liburing (2 threads)", servers.http_variant("uring_http", 16),
              target=("<=", 1.0)),
            E("epoll (2 threads)", servers.http_variant("epoll_http", 16)),
            E("nginx (workers = CPUs)", servers.http_variant("nginx", 16), target=("<=", 0.8)),
        ],
    },
    {
        "name": "proxy",
        "what": "TCP reverse proxy in front of concur's HTTP server (1 loop), wrk -t2 -c50 "
                "keep-alive GET /plaintext through it; value: the proxy's CPU time per request",
        "variants": [
            E("concur, idle deadline per op (2 loops)", servers.http_variant("concur_proxy")),
            E("concur, no deadline (--idle-ms 0)", servers.http_variant("concur_proxy_nodl"),
              target=("<=", 1.05), note="target: an idle deadline per operation costs <= 5%"),
            E("nginx stream proxy (2 workers)", servers.http_variant("nginx_stream"),
              target=("<=", 0.8)),
        ],
    },
    {
        "name": "resp",
        "what": "RESP PING/SET/GET under redis-benchmark -c 50, one server thread (as redis); "
                "value: requests/s over the tests",
        "variants": [
            E("concur (1 loop)", servers.resp_variant("concur_resp1")),
            E("redis-server", servers.resp_variant("redis"), target=("<=", 1.0),
              note="target: throughput >= redis-server"),
        ],
    },
    {
        "name": "resp/idle-poll",
        "what": "as resp, concur with --idle-poll-us %d (concur_exec_opts.idle_poll_ns: a loop "
                "watches its ring that long before it sleeps), which trades CPU time for "
                "latency: see its CPU/req" % servers.IDLE_POLL_US,
        "variants": [
            E("concur (1 loop, idle poll %d µs)" % servers.IDLE_POLL_US,
              servers.resp_variant("concur_resp1_poll")),
            E("redis-server", servers.resp_variant("redis")),
            E("concur (1 loop, no idle poll)", servers.resp_variant("concur_resp1")),
        ],
    },
    {
        "name": "resp/2loops",
        "what": "as resp, concur with 2 loops (sharing the 2 CPUs with redis-benchmark)",
        "variants": [
            E("concur (2 loops)", servers.resp_variant("concur_resp")),
            E("redis-server", servers.resp_variant("redis"), target=("<=", 1.0),
              note="target: throughput >= redis-server"),
        ],
    },
] + [
    {
        "name": "fileread/%d" % d,
        "what": "4 KiB random reads from a page-cached %d MiB file, queue depth %d, 1 loop" %
                (servers.FILE_MB, d),
        "prepare": servers.fileread_prepare,
        "variants": [
            V("concur", "bench_fileread", "concur", 2_000_000, 50_000,
              ["-b", str(d), "--file", "{build}/bench/fileread.dat"]),
            E("fio io_uring engine", servers.fio_variant(d), target=("<=", 1 / 0.95),
              note="target: >= 0.95x fio's IOPS"),
            V("raw liburing", "bench_fileread", "raw", 2_000_000, 50_000,
              ["-b", str(d), "--file", "{build}/bench/fileread.dat"]),
            V("raw liburing, registered file", "bench_fileread", "raw_fixed", 2_000_000, 50_000,
              ["-b", str(d), "--file", "{build}/bench/fileread.dat"]),
        ],
    }
    for d in (32, 128)
] + [
    channel_workload("same_loop", "two tasks on one loop", 200000, 20000),
    channel_workload("cross_loop", "the two tasks on different loops (MSG_RING wake-ups)",
                     50000, 5000),
    {
        "name": "cancel",
        "what": "10^4 tasks each blocked in concur_await_recv on its own idle TCP connection "
                "(127.0.0.1); a foreign thread stops them all; value: time from the first stop "
                "request until every future is done (one concur_wait), per task",
        "variants": [
            V("concur_cancel each task", "bench_cancel", "cancel", 10000, 1000),
            V("shutdown(SHUT_RD) each socket", "bench_cancel", "shutdown", 10000, 1000),
            V("a stop promise each task selects on", "bench_cancel", "stop_promise", 10000,
              1000),
        ],
    },
    {
        "name": "gather",
        "what": "10^5 trivial tasks collected with concur_gather (vs one concur_result each)",
        "variants": [
            V("concur_gather", "bench_gather", "gather", 100000, 10000),
            V("concur_result one by one", "bench_gather", "one_by_one", 100000, 10000),
            V("concur_as_completed", "bench_gather", "as_completed", 100000, 10000),
        ],
    },
    {
        "name": "pipeline",
        "what": "3-stage pipeline of 10^5 items: unwrapped tasks (then/spawn_after) vs a condvar pool",
        "variants": [
            V("concur unwrapped tasks", "bench_pipeline", "unwrapped", 100000, 10000),
            V("mutex+condvar pool", "bench_pipeline", "condvar_pool", 100000, 10000,
              target=("<=", 1.0)),
        ],
    },
    {
        "name": "fib",
        "what": "fib(27), every call n >= 2 spawns both children and waits (nested waits)",
        "variants": [
            V("concur", "bench_fib", "concur", 27, 20),
            V("OpenMP tasks+taskwait", "bench_omp", "fib", 27, 20, target=("<=", 1.0)),
        ],
    },
]



def tasks_workload():
    """tasks/1M: a million suspended tasks at once, beside Go and Boost.Fiber (bench_tasks.c)."""
    def concur(label, stack):
        return V(label, "bench_tasks", "concur", 1_000_000, 100_000, ["-b", str(stack)])
    return {
        "name": "tasks/1M",
        "what": "10^6 tasks each suspended on its own promise (Go: goroutine on a channel), "
                "then all set and joined: peak RSS per suspended task; extra: time to park "
                "all / to wake all",
        "variants": [
            concur("concur, 1 KiB stacks (spawn_ex)", 1024),
            V("Go goroutines", "peer_go_tasks", "go", 1_000_000, 100_000, target=("<=", 1.0),
              note="target: memory per suspended task <= Go's per parked goroutine"),
            V("Boost.Fiber, 16 KiB pooled stacks", "peer_boost_tasks", "boost", 1_000_000,
              100_000, ["-b", "16384"]),
            concur("concur, 2 KiB stacks", 2048),
            concur("concur, default 256 KiB stacks", 0),
        ],
    }


WORKLOADS += [tasks_workload()]

# Why a binary may be missing: told to the reader instead of a number.
MISSING_REASON = {
    "peer_go_tasks": "go (golang-go) not found by CMake, so peer_go_tasks was not built",
    "peer_boost_tasks": "a C++ compiler or Boost.Fiber (libboost-fiber-dev) not found by CMake, "
                        "so peer_boost_tasks was not built",
    "bench_omp": "OpenMP (libgomp) not found by CMake, so bench_omp was not built",
    "bench_uv": "libuv (libuv1-dev) not found by pkg-config, so bench_uv was not built",
}


# --------------------------------------------------------------------------------------------
# Peers a user would pick (issue 9): Go and Boost on switch and spawn/one, and the echo workload.
# --------------------------------------------------------------------------------------------

MISSING_REASON.update({
    "bench_boost": "Boost.Context/Boost.Fiber (libboost-context-dev, libboost-fiber-dev) or a C++ "
                   "compiler not found by CMake at configure time, so bench_boost was not built",
    "bench_go_hotpath": "go (golang-go) not found by CMake at configure time, so "
                        "bench_go_hotpath was not built",
})

USER_PEERS = {
    "switch": [
        V("Boost.Context fiber resume", "bench_boost", "context_switch", 20_000_000, 1_000_000),
        V("Boost.Fiber yield", "bench_boost", "fiber_switch", 2_000_000, 100_000),
        V("Go runtime.Gosched, GOMAXPROCS=1", "bench_go_hotpath", "switch", 2_000_000, 100_000),
    ],
    "spawn/one": [
        V("Boost.Fiber async().get()", "bench_boost", "fiber_spawn_one", 500_000, 20_000),
        V("Go goroutine + channel, GOMAXPROCS=1", "bench_go_hotpath", "spawn_one", 1_000_000,
          20_000),
    ],
}
for _w in WORKLOADS:
    _w["variants"] += USER_PEERS.get(_w["name"], [])


def echo_workload(size, label):
    return {
        "name": "echo/" + label,
        "what": "echo ping-pong of %d-byte messages on 64 connections (echo_load, 1 thread); "
                "every server on 1 thread; value: server CPU time per message" % size,
        # a second ratio, from each run's extra: the messages per second the load got through
        "also": [("msg_s", "msgs/s", "higher")],
        "variants": [
            E("concur (1 loop)", servers.echo_variant("concur_echo", size)),
            E("raw liburing (1 thread)", servers.echo_variant("uring_echo", size)),
            E("epoll (1 thread)", servers.echo_variant("epoll_echo", size)),
            E("libuv (1 loop)", servers.echo_variant("uv_echo", size)),
            E("Go goroutine per connection, GOMAXPROCS=1", servers.echo_variant("go_echo", size)),
        ],
    }


WORKLOADS += [echo_workload(64, "64"), echo_workload(4096, "4k")]

# Issue 11: 100,000 idle connections, each served by its own task (goroutine, epoll registration).
WORKLOADS.append({
    "name": "conns/100k",
    "what": "100,000 TCP connections on loopback (fewer if this machine's fd limit or memory "
            "says so, with the reason) opened, held idle, then one 64-byte echo each "
            "(conns_load); every server on 1 thread; value: server RSS per idle connection",
    # the connect rate and the CPU per message of the echo round, concur / peer run by run too
    "also": [("conn_s", "conns/s", "higher"), ("cpu_us_per_msg", "CPU/msg", "lower")],
    "runs": 5,  # a run holds 100,000 connections for seconds: 5 rounds unless --runs says
    "variants": [
        E("concur (1 loop)", servers.conns_variant("concur_echo")),
        E("epoll (1 thread)", servers.conns_variant("epoll_echo")),
        E("libuv (1 loop)", servers.conns_variant("uv_echo")),
        E("Go goroutine per connection, GOMAXPROCS=1", servers.conns_variant("go_echo")),
    ],
})


def also_ratios(w, concur, peer):
    """The workload's second figures (w["also"]: extra key, label, better), concur / peer run by
    run like the main ratio, oriented so that < 1 means concur is better."""
    out = []
    for key, label, better in w.get("also", ()):
        pairs = [ratio_of(c[key], p[key], better)
                 for c, p in zip(concur.get("extra") or [], peer.get("extra") or [])
                 if c and p and c.get(key) and p.get(key)]
        r = {"key": key, "label": label, "better": better, "per_run": pairs, "median": None,
             "min": None, "max": None}
        if pairs:
            r.update(summarize(pairs))
        out.append(r)
    return out


# --------------------------------------------------------------------------------------------
# Header
# --------------------------------------------------------------------------------------------


def sh(cmd, timeout=10):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return r.stdout.strip() if r.returncode == 0 else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def cmake_cache(build_dir):
    cache = {}
    try:
        with open(os.path.join(build_dir, "CMakeCache.txt")) as f:
            for line in f:
                m = re.match(r"^([A-Za-z0-9_]+):[A-Z]+=(.*)$", line.strip())
                if m:
                    cache[m.group(1)] = m.group(2)
    except OSError:
        pass
    return cache


def machine_header(build_dir):
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cache = cmake_cache(build_dir)
    cc = cache.get("CMAKE_C_COMPILER", "cc")
    compiler = (sh([cc, "--version"]).splitlines() or [cc])[0]
    liburing = sh(["dpkg-query", "-W", "-f", "${Version}", "liburing-dev"])
    if liburing:
        liburing = "liburing-dev " + liburing
    else:
        liburing = sh(["pkg-config", "--modversion", "liburing"]) or "unknown"
    info = {}
    exe = os.path.join(build_dir, "bench", "bench_info")
    if os.access(exe, os.X_OK):
        out = sh([exe])
        try:
            info = json.loads(out.splitlines()[-1]) if out else {}
        except (ValueError, IndexError):
            info = {}
    flags = info.get("ring_flags_names")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu": cpu or platform.processor() or "unknown",
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "liburing": liburing,
        "ring_flags": " | ".join(flags) if flags else ("none" if flags == [] else "unknown"),
        "ring_flags_value": info.get("ring_flags"),
        "loops_default": info.get("loops"),
        "compiler": compiler,
        "build_type": cache.get("CMAKE_BUILD_TYPE", ""),
        "git": sh(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]) or "unknown",
        "python": platform.python_version(),
    }


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


class Progress:
    """Progress on stderr: a redrawn bar on a terminal, one line per workload otherwise."""

    def __init__(self, total):
        self.total = total
        self.done = 0
        self.start = time.monotonic()
        self.tty = sys.stderr.isatty()

    def eta(self):
        if not self.done:
            return "?"
        left = (time.monotonic() - self.start) / self.done * (self.total - self.done)
        return "%d:%02d" % divmod(int(left + 0.5), 60)

    def show(self, workload, label):
        """Draw the bar for the invocation about to start (terminal only)."""
        if self.tty:
            width = 24
            fill = int(width * self.done / max(self.total, 1))
            line = "[%s%s] %-14s %-36s ETA %s" % ("#" * fill, "." * (width - fill), workload,
                                                  label, self.eta())
            sys.stderr.write("\r" + line[:118].ljust(118))
            sys.stderr.flush()

    def step(self):
        self.done += 1

    def workload_done(self, index, count, workload, runs, nvariants, seconds, problems):
        if self.tty:
            sys.stderr.write("\r" + " " * 118 + "\r")
        extra = ("; " + "; ".join(problems)) if problems else ""
        sys.stderr.write("[%d/%d] %s: %d run(s) x %d variant(s) in %.1f s, ETA %s%s\n" %
                         (index, count, workload, runs, nvariants, seconds, self.eta(), extra))
        sys.stderr.flush()


def run_variant(build_dir, v, quick, timeout, is_concur):
    """One invocation. Returns ("ok", record) / ("skipped", reason) / ("failed", reason)."""
    if v.get("run"):
        return v["run"](build_dir, quick, timeout, is_concur)
    exe = os.path.join(build_dir, "bench", v["binary"])
    if not os.access(exe, os.X_OK):
        if is_concur:  # concur's own binaries are always built: their absence is a failure
            return "failed", "%s not found in %s/bench" % (v["binary"], build_dir)
        return "skipped", MISSING_REASON.get(v["binary"], "%s was not built" % v["binary"])
    cmd = [exe] + [a.replace("{build}", build_dir) for a in v["args"]]
    cmd += ["-n", str(v["quick_n"] if quick else v["n"])]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "failed", "timed out after %d s" % timeout
    except OSError as e:
        return "failed", str(e)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or [""])[-1]
        return "failed", "exit status %d: %s" % (r.returncode, tail[:200])
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    if len(lines) != 1:
        return "failed", "expected one JSON line on stdout, got %d line(s)" % len(lines)
    try:
        rec = json.loads(lines[0])
    except ValueError as e:
        return "failed", "invalid JSON (%s): %s" % (e, lines[0][:120])
    if not isinstance(rec, dict):
        return "failed", "JSON is not an object"
    if "skip" in rec:
        return "skipped", str(rec["skip"])
    ok = (isinstance(rec.get("value"), (int, float)) and math.isfinite(rec["value"])
          and rec["value"] > 0 and isinstance(rec.get("unit"), str)
          and rec.get("better") in ("lower", "higher"))
    if not ok:
        return "failed", "JSON lacks a positive value, a unit or better=lower|higher"
    rec["command"] = cmd
    return "ok", rec


def ratio_of(concur, peer, better):
    """concur relative to peer, oriented so that < 1 always means concur is better."""
    return concur / peer if better == "lower" else peer / concur


def summarize(values):
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def workload_runs(w, args):
    """Counted runs of w: --runs, or the default capped by the workload's own "runs" (a long
    workload such as conns/100k)."""
    return args.runs if args.runs_given or args.quick else min(args.runs, w.get("runs", args.runs))


def run_workload(w, args, progress):
    variants = []
    for i, v in enumerate(w["variants"]):
        variants.append({
            "name": v["name"],
            "role": "concur" if i == 0 else "peer",
            "command": None,
            "status": "ok",
            "reason": "",
            "values": [],
            "stats": [],
            "extra": [],
            "params": {},
            "unit": None,
            "better": None,
            "_def": v,
        })

    def one(slot, counted, label):
        progress.show(w["name"], "%s: %s" % (label, slot["name"]))
        status, rec = run_variant(args.build_dir, slot["_def"], args.quick, args.timeout,
                                  slot["role"] == "concur")
        progress.step()
        if status != "ok":
            slot["status"], slot["reason"] = status, rec
            if counted:
                slot["values"].append(None)
                slot["extra"].append(None)
            return
        slot["command"] = " ".join(os.path.relpath(c, ROOT) if os.path.isabs(c) else c
                                   for c in rec["command"])
        slot["unit"], slot["better"] = rec["unit"], rec["better"]
        slot["params"] = rec.get("params", {})
        if counted:
            slot["values"].append(float(rec["value"]))
            slot["stats"].append(rec.get("stats", {}))
            slot["extra"].append(rec.get("extra"))

    if w.get("prepare"):
        w["prepare"](args.build_dir)
    for k in range(args.warmup):
        for slot in variants:
            one(slot, False, "warm-up")
    runs = workload_runs(w, args)
    for i in range(runs):
        for slot in variants:  # A B A B: every variant once per round
            if slot["status"] == "ok":
                one(slot, True, "run %d/%d" % (i + 1, runs))
            else:
                slot["values"].append(None)
                slot["extra"].append(None)
                progress.step()

    for slot in variants:
        slot.pop("_def")
        vals = [x for x in slot["values"] if x is not None]
        if slot["status"] == "ok" and vals:
            slot.update(summarize(vals))
            # the counters of the run whose value is the median one
            mid = min(range(len(slot["values"])),
                      key=lambda j: abs((slot["values"][j] or math.inf) - slot["median"]))
            slot["median_stats"] = slot["stats"][mid] if slot["stats"] else {}
            slot["median_extra"] = slot["extra"][mid] if slot["extra"] else None
        else:
            if slot["status"] == "ok":
                slot["status"], slot["reason"] = "failed", "no successful run"
            slot.update({"median": None, "min": None, "max": None, "median_stats": {},
                         "median_extra": None})
        if not any(slot["extra"]):
            del slot["extra"], slot["median_extra"]  # only the server workloads have them

    concur = variants[0]
    ratios = []
    for peer, vdef in zip(variants[1:], w["variants"][1:]):
        r = {"peer": peer["name"], "per_run": [], "median": None, "min": None, "max": None,
             "target": None, "met": None, "status": "ok", "reason": ""}
        if vdef["target"]:
            op, x = vdef["target"]
            r["target"] = {"op": op, "value": x, "text": target_text(vdef["target"]),
                           "note": vdef["note"]}
        if concur["status"] != "ok" or peer["status"] != "ok":
            bad = concur if concur["status"] != "ok" else peer
            r["status"] = bad["status"]
            r["reason"] = "%s %s: %s" % (bad["name"], bad["status"], bad["reason"])
        elif concur["unit"] != peer["unit"] or concur["better"] != peer["better"]:
            r["status"], r["reason"] = "failed", "units differ: %s vs %s" % (concur["unit"],
                                                                               peer["unit"])
        else:
            pairs = [ratio_of(c, p, concur["better"])
                     for c, p in zip(concur["values"], peer["values"])
                     if c is not None and p is not None]
            r["per_run"] = pairs
            if pairs:
                r.update(summarize(pairs))
                if r["target"]:
                    r["met"] = r["median"] <= r["target"]["value"]
            else:
                r["status"], r["reason"] = "failed", "no pair of successful runs"
            if w.get("also"):
                r["also"] = also_ratios(w, concur, peer)
        ratios.append(r)

    return {
        "name": w["name"],
        "description": w["what"],
        "unit": concur["unit"],
        "better": concur["better"],
        "ratio_definition": ratio_definition(concur["unit"], concur["better"]),
        "variants": variants,
        "ratios": ratios,
    }


def ratio_definition(unit, better):
    if better == "higher":
        return "peer %s / concur %s; < 1 means concur is better" % (unit, unit)
    return "concur %s / peer %s; < 1 means concur is better" % (unit or "value", unit or "value")


def target_text(t):
    op, x = t
    sym = {"<=": "≤", ">=": "≥"}.get(op, op)
    return "%s %s×" % (sym, fmt_ratio(x))


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def fmt_num(x):
    if x is None:
        return "-"
    if x >= 1000:
        return "%.0f" % x
    if x >= 100:
        return "%.1f" % x
    if x >= 10:
        return "%.2f" % x
    return "%.3g" % x


def fmt_ratio(x):
    if x is None:
        return "-"
    return "%.2f" % x if x >= 0.1 else "%.3f" % x


def fmt_count(x):
    for div, suf in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= div:
            return "%.3g%s" % (x / div, suf)
    return "%g" % x


def counters_text(stats):
    """concur's counters of its median run, compact, for the concur row of the tables."""
    keys = [("tasks_run", "tasks"), ("fibers_parked", "parked"), ("enters", "enters"),
            ("cqes_per_enter", "CQE/enter"), ("steals", "steals"), ("msg_ring", "msg_ring"),
            ("futex_wakes", "futex wakes")]
    parts = []
    for k, label in keys:
        v = stats.get(k)
        if isinstance(v, (int, float)) and (v or k in ("tasks_run", "enters")):
            parts.append("%s %s" % (fmt_count(v) if k != "cqes_per_enter" else "%.3g" % v,
                                    label))
    return "counters: " + ", ".join(parts) if parts else ""


def table_rows(result):
    """Rows shared by the terminal and markdown tables."""
    rows = []
    for w in result["workloads"]:
        ratios = {r["peer"]: r for r in w["ratios"]}
        for v in w["variants"]:
            if v["status"] == "ok":
                val = "%s %s" % (fmt_num(v["median"]), v["unit"])
                rng = "%s – %s" % (fmt_num(v["min"]), fmt_num(v["max"]))
            else:
                val, rng = v["status"].upper(), v["reason"]
            ratio = target = met = ""
            r = ratios.get(v["name"]) if v["role"] == "peer" else None
            if v["role"] == "concur" and v["status"] == "ok":
                ratio = counters_text(v.get("median_stats") or {})
            if r:
                if r["status"] == "ok":
                    ratio = "%s (%s – %s)" % (fmt_ratio(r["median"]), fmt_ratio(r["min"]),
                                              fmt_ratio(r["max"]))
                    for a in r.get("also") or []:
                        if a["median"] is not None:
                            ratio += "; %s %s (%s – %s)" % (a["label"], fmt_ratio(a["median"]),
                                                             fmt_ratio(a["min"]),
                                                             fmt_ratio(a["max"]))
                else:
                    ratio = "n/a (%s)" % r["status"]
                if r["target"]:
                    target = r["target"]["text"]
                    met = {True: "met", False: "MISSED", None: "n/a"}[r["met"]]
            rows.append([w["name"] if v["role"] == "concur" else "", v["name"], val, rng, ratio,
                         target, met, extra_text(v.get("median_extra"), v["unit"])])
    return rows


def extra_text(e, unit):
    """A server run's load figures (the median run's): req/s, p50 / p99 latency."""
    if not e:
        return ""
    parts = ["%s req/s" % fmt_count(e["req_s"])] if "req_s" in e else []
    if "conn_s" in e:  # conns/*: how many, how fast they connected, the echo round's CPU
        parts.append("%s conns, %s conns/s, %.3g µs CPU/msg" % (
            fmt_count(e["conns"]), fmt_count(e["conn_s"]), e["cpu_us_per_msg"]))
    elif "msg_s" in e:
        parts.append("%s msgs/s" % fmt_count(e["msg_s"]))
    if e.get("p50_us"):
        parts.append("p50 %s / p99 %s" % (fmt_us(e["p50_us"]),
                                          fmt_us(e["p99_us"]) if e.get("p99_us") else "n/a"))
    if "cpu_us_per_req" in e and unit != "µs CPU/req":
        parts.append("%.3g µs CPU/req" % e["cpu_us_per_req"])
    if "park_ms" in e:  # tasks/1M
        parts.append("park all %s ms, wake all %s ms" % (fmt_num(e["park_ms"]),
                                                          fmt_num(e["wake_ms"])))
    return ", ".join(parts)


def fmt_us(us):
    return "%.3g ms" % (us / 1e3) if us >= 1000 else "%.3g µs" % us


def has_extras(result):
    return any(v.get("median_extra") for w in result["workloads"] for v in w["variants"])


HEADINGS = ["workload", "variant", "median", "min – max",
            "ratio concur/peer (min – max); concur row: its counters",
            "target", "", "servers: req/s, latency p50 / p99 (median run)"]


def columns(result):
    """The table's columns: the last one only when there are server workloads."""
    return len(HEADINGS) if has_extras(result) else len(HEADINGS) - 1


def header_lines(h, cfg):
    return [
        "date: %s · git %s · %s" % (h["date"], h["git"], "quick (smoke) run" if cfg["quick"]
                                    else "%d runs + %d warm-up, alternating" %
                                    (cfg["runs"], cfg["warmup"])),
        "CPU: %s, %s cores · kernel %s" % (h["cpu"], h["cores"], h["kernel"]),
        "liburing: %s · ring flags: %s · loops by default: %s" % (h["liburing"], h["ring_flags"],
                                                                 h["loops_default"]),
        "compiler: %s (%s)" % (h["compiler"], h["build_type"] or "default build type"),
    ]


def render_terminal(result):
    ncol = columns(result)
    rows = [r[:ncol] for r in table_rows(result)]
    widths = [max(len(HEADINGS[i]), *(len(r[i]) for r in rows)) if rows else len(HEADINGS[i])
              for i in range(ncol)]
    widths[3] = min(widths[3], 56)
    out = header_lines(result["header"], result["config"])
    out.append("ratio = concur time / peer time per run i (median of the pairs); < 1: concur is "
               "faster")
    out.append("")
    line = "  ".join(h.ljust(widths[i]) for i, h in enumerate(HEADINGS[:ncol]))
    out.append(line)
    out.append("-" * len(line))
    for r in rows:
        if r[0] and out[-1] and not out[-1].startswith("-"):
            out.append("")
        cells = [c if len(c) <= widths[i] else c[:widths[i] - 1] + "…" for i, c in enumerate(r)]
        out.append("  ".join(c.ljust(widths[i]) for i, c in enumerate(cells)).rstrip())
    notes = size_notes(result)
    if notes:
        out += [""] + notes
    return "\n".join(out)


def render_markdown(result):
    out = ["**Benchmarks** — " + header_lines(result["header"], result["config"])[0], ""]
    for line in header_lines(result["header"], result["config"])[1:]:
        out.append("- " + line)
    out.append("- ratio = concur / peer, computed run by run (median, min – max); **< 1 means "
               "concur is faster**. Targets are read from the data, not asserted.")
    out.append("")
    ncol = columns(result)
    heads = HEADINGS[:6] + ["met"] + HEADINGS[7:ncol]
    out.append("| " + " | ".join(heads) + " |")
    out.append("|" + "---|" * ncol)
    for r in table_rows(result):
        r = r[:ncol]
        cells = [c.replace("|", "\\|") for c in r]
        if cells[0]:
            cells[0] = "**%s**" % cells[0]
        out.append("| " + " | ".join(cells) + " |")
    skipped = [(w["name"], v["name"], v["reason"]) for w in result["workloads"]
               for v in w["variants"] if v["status"] != "ok"]
    if skipped:
        out.append("")
        for wname, vname, reason in skipped:
            out.append("- %s / %s: not measured — %s" % (wname, vname, reason))
    notes = size_notes(result)
    if notes:
        out.append("")
        out += ["- " + n for n in notes]
    return "\n".join(out) + "\n"


def size_notes(result):
    """Workloads run smaller than their name says, and why (conns/100k where the fd limit or
    the memory is short)."""
    notes = []
    for w in result["workloads"]:
        p = next((v["params"] for v in w["variants"] if v["params"].get("conns_limited_by")),
                 None)
        if p:
            notes.append("%s: %d connections instead of %d: %s" % (
                w["name"], p["conns"], p["conns_wanted"], p["conns_limited_by"]))
    return notes


def svg_esc(t):
    return t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def svg_start(width, height, title, header):
    """The opening of a plot: white page, bold title, the run's date and CPU under it."""
    return ['<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" '
            'font-family="sans-serif" font-size="12">' % (width, height),
            '<rect width="100%" height="100%" fill="white"/>',
            '<text x="10" y="20" font-size="14" font-weight="bold">%s</text>' % title,
            '<text x="10" y="38" fill="#555">%s</text>' % svg_esc(header["date"] + " · " +
                                                                  header["cpu"])]


def log_axis(lo, hi, left, plot_w):
    """x(v) on a log axis from lo to hi, and the 1-2-5 ticks inside it."""
    llo, lhi = math.log10(lo), math.log10(hi)
    ticks = [m * 10 ** e for e in range(math.floor(llo) - 1, math.ceil(lhi) + 1)
             for m in (1, 2, 5) if lo <= m * 10 ** e <= hi]
    return (lambda v: left + (math.log10(v) - llo) / (lhi - llo) * plot_w), ticks


def render_latency_svg(result):
    """p50 and p99 latency of every server variant (median run), per workload, log axis."""
    groups = []
    for w in result["workloads"]:
        rows = [(v["name"], v.get("median_extra") or {}, v) for v in w["variants"]]
        if any(e.get("p50_us") for _, e, _ in rows):
            groups.append((w["name"], rows))
    row_h, left, plot_w, right, top = 20, 250, 480, 150, 60
    nrows = sum(len(r) for _, r in groups)
    height = top + row_h * nrows + 28 * len(groups) + 50
    vals = [e[k] for _, rows in groups for _, e, _ in rows for k in ("p50_us", "p99_us")
            if e.get(k)] or [1.0, 1000.0]
    x, ticks = log_axis(min(vals) / 1.5, max(vals) * 1.5, left, plot_w)
    esc = svg_esc
    o = svg_start(left + plot_w + right, height, "server latency under load: p50 (bar) and p99 "
                  "(whisker end), median run, log scale; lower is better", result["header"])
    base = top + row_h * nrows + 28 * len(groups)
    for t in ticks:
        o.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#ddd"/>' %
                 (x(t), top - 6, x(t), base))
        o.append('<text x="%.1f" y="%d" text-anchor="middle" fill="#555">%s</text>' %
                 (x(t), base + 16, esc(fmt_us(t))))
    y = top
    for wname, rows in groups:
        o.append('<text x="10" y="%d" font-weight="bold">%s</text>' % (y + 16, esc(wname)))
        y += 28
        for name, e, v in rows:
            o.append('<text x="%d" y="%d" text-anchor="end">%s</text>' %
                     (left - 8, y + 13, esc(name)))
            if not e.get("p50_us"):
                o.append('<text x="%d" y="%d" fill="#888">%s</text>' %
                         (left + 4, y + 13, esc((v["status"] + ": " + v["reason"])[:70])))
                y += row_h
                continue
            color = "#1565c0" if v["role"] == "concur" else "#888"
            o.append('<rect x="%d" y="%d" width="%.1f" height="12" fill="%s"/>' %
                     (left, y + 3, max(x(e["p50_us"]) - left, 1.0), color))
            if e.get("p99_us"):
                o.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="black"/>' %
                         (x(e["p50_us"]), y + 9, x(e["p99_us"]), y + 9))
                o.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="black"/>' %
                         (x(e["p99_us"]), y + 4, x(e["p99_us"]), y + 14))
            o.append('<text x="%.1f" y="%d" fill="#222">p50 %s · p99 %s</text>' %
                     (x(e.get("p99_us") or e["p50_us"]) + 6, y + 13, esc(fmt_us(e["p50_us"])),
                      esc(fmt_us(e["p99_us"])) if e.get("p99_us") else "-"))
            y += row_h
    if not groups:
        o.append('<text x="10" y="%d" fill="#888">no server workload in this run</text>' % top)
    o.append('<text x="10" y="%d" fill="#555">blue: concur · grey: peers · the load generator '
             'shares the CPUs with the server</text>' % (base + 36))
    o.append("</svg>")
    return "\n".join(o) + "\n"


def render_svg(result):
    bars = []
    for w in result["workloads"]:
        for r in w["ratios"]:
            bars.append((w["name"], r))
    row_h, left, right, top = 26, 330, 110, 56
    plot_w = 480
    height = top + row_h * max(len(bars), 1) + 50
    width = left + plot_w + right
    vals = [r["median"] for _, r in bars if r["median"]]
    vals += [r["max"] for _, r in bars if r["max"]] + [r["min"] for _, r in bars if r["min"]]
    vals += [r["target"]["value"] for _, r in bars if r["target"]]
    x, ticks = log_axis(min(vals + [0.5]) / 1.3, max(vals + [2.0]) * 1.3, left, plot_w)
    esc = svg_esc
    o = svg_start(width, height, "concur / peer, per workload (median of run-by-run ratios, "
                  "log scale; &lt; 1: concur is faster)", result["header"])
    base = top + row_h * max(len(bars), 1)
    for t in ticks:
        o.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#ddd"/>' % (x(t), top - 6,
                                                                              x(t), base))
        o.append('<text x="%.1f" y="%d" text-anchor="middle" fill="#555">%s×</text>' %
                 (x(t), base + 16, ("%g" % t)))
    for i, (wname, r) in enumerate(bars):
        y = top + i * row_h
        o.append('<text x="%d" y="%d" text-anchor="end">%s vs %s</text>' %
                 (left - 8, y + 16, esc(wname), esc(r["peer"])))
        if r["median"] is None:
            o.append('<text x="%d" y="%d" fill="#888">%s: %s</text>' %
                     (left + 4, y + 16, r["status"], esc(r["reason"][:60])))
            continue
        x1, xm = x(1.0), x(r["median"])
        color = "#2e7d32" if r["median"] <= 1.0 else "#c62828"
        o.append('<rect x="%.1f" y="%d" width="%.1f" height="16" fill="%s" opacity="0.8"/>' %
                 (min(x1, xm), y + 4, max(abs(xm - x1), 1.0), color))
        o.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="black"/>' %
                 (x(r["min"]), y + 12, x(r["max"]), y + 12))
        if r["target"]:
            xt = x(r["target"]["value"])
            o.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#1565c0" '
                     'stroke-width="2" stroke-dasharray="3,2"/>' % (xt, y + 1, xt, y + 23))
        label = "%s×" % fmt_ratio(r["median"])
        if r["met"] is not None:
            label += " (target %s: %s)" % (r["target"]["text"], "met" if r["met"] else "missed")
        o.append('<text x="%.1f" y="%d" fill="#222">%s</text>' %
                 (max(x1, xm, x(r["max"])) + 6, y + 16, esc(label)))
    o.append('<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="black" stroke-width="1.5"/>' %
             (x(1.0), top - 8, x(1.0), base))
    o.append('<text x="%.1f" y="%d" text-anchor="middle" font-weight="bold">1.0 (parity)</text>'
             % (x(1.0), top - 12))
    o.append('<text x="10" y="%d" fill="#555">green: concur faster · red: slower · whisker: '
             'min–max of the pairs · dashed blue: target</text>' % (base + 36))
    o.append("</svg>")
    return "\n".join(o) + "\n"


# --------------------------------------------------------------------------------------------


# Debian packages of the peers (libgomp comes with gcc; wrk, nginx, redis, fio join with the
# server and I/O workloads).
PEER_PACKAGES = ["libgomp1", "libuv1-dev"] + servers.PACKAGES
PEER_PACKAGES += ["g++", "golang-go", "libboost-context-dev", "libboost-fiber-dev"]  # Go, Boost peers


def install_peers():
    """apt-get install the peers' Debian packages that are missing (as root)."""
    missing = [p for p in PEER_PACKAGES
               if "install ok installed" not in sh(["dpkg-query", "-W", "-f", "${Status}", p])]
    if not missing:
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        sys.stderr.write("peers missing (%s): not root or no apt-get, they will be reported "
                         "skipped\n" % " ".join(missing))
        return
    sys.stderr.write("+ apt-get install -y %s\n" % " ".join(missing))
    cmd = ["apt-get", "install", "-y", "-q"] + missing
    if subprocess.run(cmd).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"])
        if subprocess.run(cmd).returncode != 0:
            sys.stderr.write("could not install %s: those peers will be reported skipped\n" %
                             " ".join(missing))


def build(build_dir):
    for cmd in (["cmake", "-S", ROOT, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release"],
                ["cmake", "--build", build_dir, "-j%d" % (os.cpu_count() or 2), "--target",
                 "bench"]):
        sys.stderr.write("+ %s\n" % " ".join(cmd))
        if subprocess.run(cmd).returncode != 0:
            sys.exit("build failed: %s" % " ".join(cmd))


def run_all(selected, args, progress, results):
    for k, w in enumerate(selected):
        t0 = time.monotonic()
        res = run_workload(w, args, progress)
        problems = ["%s %s (%s)" % (v["name"], v["status"], v["reason"]) for v in res["variants"]
                    if v["status"] != "ok"]
        progress.workload_done(k + 1, len(selected), w["name"], workload_runs(w, args),
                               len(w["variants"]),
                               time.monotonic() - t0, problems)
        results.append(res)


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `run.py --list | head` ends quietly
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true", help="list the workloads and their variants")
    ap.add_argument("--filter", metavar="NAME",
                    help="only workloads whose name matches (substring or regex)")
    ap.add_argument("--runs", type=int, help="counted runs per variant (default 9; quick 2)")
    ap.add_argument("--warmup", type=int, help="warm-up runs per variant (default 1; quick 0)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke mode: every workload briefly, few runs (< 2 min); exits non-zero "
                         "if a concur variant fails")
    ap.add_argument("--build-dir", default=os.path.join(ROOT, "build"),
                    help="CMake build dir holding bench/ (default: ./build)")
    ap.add_argument("--build", action="store_true",
                    help="configure (Release) and build the bench binaries first")
    ap.add_argument("--install-peers", action="store_true",
                    help="apt-get install the peers' missing Debian packages first (root)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"),
                    help="output dir (default bench/results)")
    ap.add_argument("--timeout", type=int, help="seconds per invocation (default 120; quick 30)")
    args = ap.parse_args()
    args.build_dir = os.path.abspath(args.build_dir)
    args.runs_given = args.runs is not None
    if args.runs is None:
        args.runs = 2 if args.quick else 9
    if args.warmup is None:
        args.warmup = 0 if args.quick else 1
    if args.timeout is None:
        args.timeout = 30 if args.quick else 120
    if args.runs < 1 or args.warmup < 0:
        ap.error("--runs must be >= 1 and --warmup >= 0")

    selected = WORKLOADS
    if args.filter:
        try:
            rx = re.compile(args.filter)
        except re.error as e:
            ap.error("bad --filter regex: %s" % e)
        selected = [w for w in WORKLOADS if args.filter in w["name"] or rx.search(w["name"])]
        if not selected:
            ap.error("no workload matches %r (see --list)" % args.filter)

    if args.list:
        for w in selected:
            print("%-15s %s" % (w["name"], w["what"]))
            for i, v in enumerate(w["variants"]):
                tgt = ("  target %s" % target_text(v["target"])) if v["target"] else ""
                how = (v["run"].describe if v.get("run") else "%s %s -n %s" %
                       (v["binary"], " ".join(v["args"]), v["n"]))
                print("    %-6s %-26s %s%s" % ("concur" if i == 0 else "peer", v["name"], how, tgt))
        return 0

    if args.install_peers:
        install_peers()
    if args.build:
        build(args.build_dir)
    if not os.path.isdir(os.path.join(args.build_dir, "bench")):
        sys.exit("no benchmark binaries in %s/bench: build first (cmake -S . -B build "
                 "-DCMAKE_BUILD_TYPE=Release && cmake --build build -j), or pass --build" %
                 args.build_dir)

    header = machine_header(args.build_dir)
    cfg = {"runs": args.runs, "warmup": args.warmup, "quick": args.quick, "filter": args.filter}
    for line in header_lines(header, cfg):
        sys.stderr.write(line + "\n")

    total = sum((workload_runs(w, args) + args.warmup) * len(w["variants"]) for w in selected)
    progress = Progress(total)
    results = []
    # a server under test is always stopped, even when the runner is interrupted
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        run_all(selected, args, progress, results)
    finally:
        servers.stop_all()

    result = {"schema": SCHEMA, "header": header, "config": cfg, "workloads": results}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "latest.json"), "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    with open(os.path.join(args.out, "latest.md"), "w") as f:
        f.write(render_markdown(result))
    with open(os.path.join(args.out, "ratios.svg"), "w") as f:
        f.write(render_svg(result))
    with open(os.path.join(args.out, "latency.svg"), "w") as f:
        f.write(render_latency_svg(result))
    hist = os.path.join(args.out, "history")
    os.makedirs(hist, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    shutil.copyfile(os.path.join(args.out, "latest.json"), os.path.join(hist, stamp + ".json"))

    print(render_terminal(result))
    print("\nwrote %s/{latest.json,latest.md,ratios.svg,latency.svg}" %
          os.path.relpath(args.out))

    failed = [(w["name"], v["reason"]) for w in results for v in w["variants"]
              if v["role"] == "concur" and v["status"] == "failed"]
    for name, reason in failed:
        sys.stderr.write("FAILED: %s / concur: %s\n" % (name, reason))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
