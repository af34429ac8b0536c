# SPDX-License-Identifier: MIT
"""Server and file workloads for bench/run.py (python3 stdlib only).

A variant here is not one bench binary but a small experiment the runner drives: start a server
(concur's, a hand-written peer, nginx, redis-server) on a free 127.0.0.1 port, warm it up, load it
with wrk or redis-benchmark, read the server's CPU time (utime + stime of every thread of every
process of the server, from /proc/PID/stat, before and after), stop it (SIGTERM, waited for; then
SIGKILL if it hangs), and return the same record a bench binary prints:
{"value", "unit", "better", "params", "stats", "extra", "command"}. fio is run the same way.

Every call returns ("ok", record), ("skipped", reason) or ("failed", reason), as run_variant does.
"""

import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CLK_TCK = os.sysconf("SC_CLK_TCK")
PIPELINE_LUA = os.path.join(HERE, "wrk_pipeline.lua")
HOST = "127.0.0.1"

# Debian packages of the external peers, and what to tell the reader when one is missing.
TOOLS = {
    "wrk": ("wrk", "wrk"),
    "nginx": ("nginx", "nginx-light"),
    "redis-server": ("redis-server", "redis-server"),
    "redis-benchmark": ("redis-benchmark", "redis-tools"),
    "fio": ("fio", "fio"),
    "nginx-stream": ("/usr/lib/nginx/modules/ngx_stream_module.so", "libnginx-mod-stream"),
}
PACKAGES = ["wrk", "nginx-light", "libnginx-mod-stream", "redis-server", "redis-tools", "fio"]

# Durations (seconds) of one counted load run and of the warm-up before it.
HTTP_SECONDS, HTTP_WARM = 3, 1
QUICK_HTTP_SECONDS, QUICK_WARM = 1, 0.2
RESP_N, QUICK_RESP_N = 200_000, 20_000
FIO_SECONDS, QUICK_FIO_SECONDS = 3, 1
FILE_MB = 256

_live = set()  # servers started and not yet stopped: stop_all() ends them on the way out


def missing_tool(name):
    """None if the tool is on PATH, else the reason the variant is skipped."""
    exe, pkg = TOOLS[name]
    if shutil.which(exe) or os.path.exists(os.path.join("/usr/sbin", exe)):
        return None
    return "%s not installed (apt-get install %s, or run.py --install-peers)" % (exe, pkg)


def tool(name):
    exe = TOOLS[name][0]
    return shutil.which(exe) or os.path.join("/usr/sbin", exe)


# ------------------------------------------------------------------------------------------
# Processes: CPU time of a server (all threads of all its processes), start, stop
# ------------------------------------------------------------------------------------------


def _stat(pid):
    with open("/proc/%d/stat" % pid) as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return int(rest[1]), int(rest[11]) + int(rest[12])  # ppid, utime + stime (all threads)


def process_tree(root):
    """root and its descendants (nginx: the master and its workers)."""
    parents = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parents[int(d)] = _stat(int(d))[0]
            except (OSError, IndexError, ValueError):
                pass
    tree, grew = {root}, True
    while grew:
        grew = False
        for pid, ppid in parents.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return tree


def cpu_seconds(root):
    total = 0
    for pid in process_tree(root):
        try:
            total += _stat(pid)[1]
        except (OSError, IndexError, ValueError):
            pass  # a process that just ended
    return total / CLK_TCK


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection((HOST, port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.02)
    return False


class Server:
    """A started server: proc, port, and a temp dir to remove when it stops."""

    def __init__(self, proc, port, tmp=None, stop_signal=signal.SIGTERM):
        self.proc, self.port, self.tmp, self.stop_signal = proc, port, tmp, stop_signal
        self.upstream = None  # a proxy's upstream server: stopped after the proxy
        _live.add(self)

    def stop(self):
        """Stop and reap it; returns the exit status (None if it had to be killed)."""
        _live.discard(self)
        rc = self.proc.poll()
        if rc is None:
            self.proc.send_signal(self.stop_signal)
            try:
                rc = self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                for pid in process_tree(self.proc.pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                self.proc.wait()
                rc = None
        if self.proc.stdout:
            self.proc.stdout.close()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self.upstream:
            self.upstream.stop()
        return rc


def stop_all():
    for s in list(_live):
        s.stop()


def start_printing(cmd, timeout, preexec_fn=None):
    """A server that prints ':PORT with' on its first line (concur's and the peers)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            preexec_fn=preexec_fn)
    srv = Server(proc, None)
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    m = re.search(r":(\d+) with", line)
    if not m:
        srv.stop()
        raise RuntimeError("%s did not say where it listens (%r)" % (os.path.basename(cmd[0]),
                                                                      line.strip()))
    srv.port = int(m.group(1))
    return srv


NGINX_CONF = """\
worker_processes {workers};
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 65;
    server {{
        listen {host}:{port} reuseport;
        location /plaintext {{
            default_type text/plain;
            return 200 "Hello, World!";
        }}
    }}
}}
"""


# nginx as a TCP proxy (the stream module) in front of upstream_port; proxy_timeout is its idle
# timeout, as the concur proxy's --idle-ms.
NGINX_STREAM_CONF = """\
load_module {module};
worker_processes {workers};
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
stream {{
    server {{
        listen {host}:{port} reuseport;
        proxy_pass {host}:{upstream_port};
        proxy_connect_timeout 30s;
        proxy_timeout 30s;
    }}
}}
"""


def start_nginx(timeout, template=NGINX_CONF, **fmt):
    """nginx with a generated config: template formatted with workers (CPUs unless fmt says),
    tmp, host, port and fmt."""
    tmp = tempfile.mkdtemp(prefix="concur-nginx-")
    port = free_port()
    conf = os.path.join(tmp, "nginx.conf")
    values = dict(workers=len(os.sched_getaffinity(0)) or 1, tmp=tmp, host=HOST, port=port)
    values.update(fmt)
    with open(conf, "w") as f:
        f.write(template.format(**values))
    proc = subprocess.Popen([tool("nginx"), "-p", tmp, "-c", conf, "-e", tmp + "/error.log"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    srv = Server(proc, port, tmp, signal.SIGQUIT)  # QUIT: graceful, the master reaps workers
    if not wait_port(port, proc, timeout):
        try:
            with open(os.path.join(tmp, "error.log")) as f:
                err = f.read().strip().splitlines()[-1:]
        except OSError:
            err = []
        srv.stop()
        raise RuntimeError("nginx did not start: %s" % (err[0] if err else "no error log"))
    return srv


def start_redis(timeout):
    tmp = tempfile.mkdtemp(prefix="concur-redis-")
    port = free_port()
    proc = subprocess.Popen([tool("redis-server"), "--port", str(port), "--bind", HOST,
                             "--save", "", "--appendonly", "no", "--dir", tmp,
                             "--daemonize", "no", "--logfile", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    srv = Server(proc, port, tmp)
    if not wait_port(port, proc, timeout):
        srv.stop()
        raise RuntimeError("redis-server did not start")
    return srv


# ------------------------------------------------------------------------------------------
# Servers the workloads use: name -> (needs, start(build_dir, timeout), label for the command)
# ------------------------------------------------------------------------------------------


def _built(build_dir, rel):
    return os.path.join(build_dir, "bench", rel)


def _ours(rel, opt, n, *extra):
    """One of the servers built here (concur's or a hand-written peer): start, label."""
    args = [opt, str(n)] + list(extra)
    return (None, lambda b, t: start_printing([_built(b, rel), "--port", "0"] + args, t),
            " ".join([rel] + args))


# concur_exec_opts.idle_poll_ns of the resp/idle-poll workload, in µs (bench/README)
IDLE_POLL_US = 20

SERVERS = {
    "concur_http": _ours("servers/concur_http_server", "--loops", 2),
    "uring_http": _ours("peers/peer_uring_http", "--threads", 2),
    "epoll_http": _ours("peers/peer_epoll_http", "--threads", 2),
    "nginx": ("nginx", lambda b, t: start_nginx(t), "nginx (workers = CPUs, generated config)"),
    "concur_resp": _ours("servers/concur_resp_server", "--loops", 2),
    "concur_resp1": _ours("servers/concur_resp_server", "--loops", 1),
    "concur_resp1_poll": _ours("servers/concur_resp_server", "--loops", 1, "--idle-poll-us",
                               str(IDLE_POLL_US)),
    "redis": ("redis-server", lambda b, t: start_redis(t),
              "redis-server --save '' --appendonly no"),
}


# The proxy workload: every proxy forwards to the concur HTTP server (1 loop, its CPU is not
# counted) and runs PROXY_THREADS threads (concur loops, nginx workers).
PROXY_UPSTREAM = ("servers/concur_http_server", "--loops", 1)
PROXY_THREADS = 2


def _proxied(needs, start_proxy, label):
    """A proxy: the upstream is started first, the proxy in front of it
    (start_proxy(build_dir, timeout, upstream_port) -> Server), and stopped with it."""

    def start(b, t):
        rel, opt, n = PROXY_UPSTREAM
        up = start_printing([_built(b, rel), "--port", "0", opt, str(n)], t)
        try:
            srv = start_proxy(b, t, up.port)
        except (RuntimeError, OSError):
            up.stop()
            raise
        srv.upstream = up
        return srv

    return needs, start, "%s (upstream: %s %s %d)" % ((label,) + PROXY_UPSTREAM)


def _concur_proxy(idle_ms):
    rel = "servers/concur_proxy_server"
    args = ["--loops", str(PROXY_THREADS), "--idle-ms", str(idle_ms)]
    return _proxied(None, lambda b, t, up: start_printing(
        [_built(b, rel), "--port", "0", "--upstream", "%s:%d" % (HOST, up)] + args, t),
        " ".join([rel] + args))


SERVERS.update({
    "concur_proxy": _concur_proxy(30000),
    "concur_proxy_nodl": _concur_proxy(0),
    "nginx_stream": _proxied("nginx-stream", lambda b, t, up: start_nginx(
        t, NGINX_STREAM_CONF, module=TOOLS["nginx-stream"][0], upstream_port=up,
        workers=PROXY_THREADS), "nginx stream proxy (workers %d, proxy_timeout 30s, "
        "generated config)" % PROXY_THREADS),
})
BINARIES = {k: v[2].split()[0] for k, v in SERVERS.items() if v[0] is None}


def _with_server(server, build_dir, timeout, is_concur, load_tool, body, start=None):
    """Start server (with start(build_dir, timeout) if given), run body(srv) -> record, always
    stop it. The run's status and record."""
    needs, default_start, label = SERVERS[server]
    start = start or default_start
    for t in (load_tool, needs):
        reason = t and missing_tool(t)
        if reason:
            return "skipped", reason
    if server in BINARIES and not os.access(_built(build_dir, BINARIES[server]), os.X_OK):
        why = "%s was not built in %s/bench" % (BINARIES[server], build_dir)
        return ("failed" if is_concur else "skipped"), why
    try:
        srv = start(build_dir, 10)
    except (RuntimeError, OSError) as e:
        return "failed", str(e)
    try:
        rec = body(srv)
    except subprocess.TimeoutExpired:
        return "failed", "load generator timed out after %d s" % timeout
    except (RuntimeError, OSError, ValueError) as e:
        return "failed", str(e)
    finally:
        rc = srv.stop()
    if rc not in (0, -signal.SIGTERM, -signal.SIGQUIT) and server in BINARIES:
        return "failed", "%s did not stop cleanly (status %s)" % (label, rc)
    rec["params"]["server"] = label
    return "ok", rec


# ------------------------------------------------------------------------------------------
# HTTP: wrk
# ------------------------------------------------------------------------------------------

_UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def _dur_us(s):
    m = re.match(r"([\d.]+)(us|ms|s|m|h)$", s)
    if not m:
        raise ValueError("cannot read wrk latency %r" % s)
    return float(m.group(1)) * _UNITS_US[m.group(2)]


def parse_wrk(out):
    """requests, req/s, p50/p99 (µs), errors from wrk --latency output."""
    res = {}
    m = re.search(r"^\s*(\d+) requests in ([\d.]+)(\w+),", out, re.M)
    m2 = re.search(r"^Requests/sec:\s*([\d.]+)", out, re.M)
    if not m or not m2:
        raise ValueError("cannot read wrk's output: %r" % out[-200:])
    res["requests"] = int(m.group(1))
    res["req_s"] = float(m2.group(1))
    for pct in ("50", "75", "90", "99"):
        mp = re.search(r"^\s*%s(?:\.0+)?%%\s+(\S+)" % pct, out, re.M)
        if mp:
            res["p%s_us" % pct] = _dur_us(mp.group(1))
    # wrk's histogram loses the tail with pipelining (it prints "99%  0.00us"): no figure
    # then, rather than a wrong one
    for k in ("p75_us", "p90_us", "p99_us"):
        if k in res and res[k] < res.get("p50_us", 0):
            res[k] = None
    me = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = sum(int(x) for x in me.groups()) if me else 0
    mn = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(mn.group(1)) if mn else 0
    return res


def wrk_cmd(port, seconds, depth):
    cmd = [tool("wrk"), "-t2", "-c50", "-d%ds" % seconds, "--latency"]
    if depth > 1:
        cmd += ["-s", PIPELINE_LUA]
    cmd.append("http://%s:%d/plaintext" % (HOST, port))
    if depth > 1:
        cmd += ["--", str(depth)]
    return cmd


def http_variant(server, depth=1):
    """A variant function for run.py: one wrk run against server (pipelined when depth > 1)."""

    def run(build_dir, quick, timeout, is_concur):
        secs = QUICK_HTTP_SECONDS if quick else HTTP_SECONDS
        warm = QUICK_WARM if quick else HTTP_WARM

        def body(srv):
            if warm >= 1:
                subprocess.run(wrk_cmd(srv.port, int(warm), depth), capture_output=True,
                               timeout=timeout)
            elif warm:  # wrk takes whole seconds: a short warm-up is a keep-alive burst
                _burst(srv.port, warm)
            cmd = wrk_cmd(srv.port, secs, depth)
            c0, t0 = cpu_seconds(srv.proc.pid), time.monotonic()
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            c1, t1 = cpu_seconds(srv.proc.pid), time.monotonic()
            if r.returncode != 0:
                raise RuntimeError("wrk exit status %d: %s" % (r.returncode,
                                                              r.stderr.strip()[-200:]))
            w = parse_wrk(r.stdout)
            if w["non_2xx"]:
                raise RuntimeError("%d answers were not 200" % w["non_2xx"])
            if not w["requests"]:
                raise RuntimeError("no request was answered")
            cpu = c1 - c0
            extra = dict(w, cpu_s=round(cpu, 3), wall_s=round(t1 - t0, 3),
                         cpu_us_per_req=cpu * 1e6 / w["requests"])
            shown = [os.path.basename(cmd[0])] + cmd[1:]
            shown = [os.path.relpath(c, os.path.dirname(HERE)) if c == PIPELINE_LUA else c
                     for c in shown]
            return {"value": extra["cpu_us_per_req"], "unit": "µs CPU/req", "better": "lower",
                    "params": {"seconds": secs, "connections": 50, "wrk_threads": 2,
                               "pipeline": depth, "load": " ".join(shown)},
                    "stats": {}, "extra": extra,
                    "command": ["(start)", SERVERS[server][2], ";"] + shown}

        return _with_server(server, build_dir, timeout, is_concur, "wrk", body)

    run.describe = "%s; wrk -t2 -c50 --latency%s" % (SERVERS[server][2],
                                                     " (pipeline %d)" % depth if depth > 1 else "")
    return run


def _burst(port, seconds):
    """A short keep-alive warm-up for when wrk's whole seconds are too long (--quick)."""
    end = time.monotonic() + seconds
    req = b"GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection((HOST, port), timeout=2) as s:
        while time.monotonic() < end:
            s.sendall(req)
            buf = b""
            while not buf.endswith(b"Hello, World!"):
                chunk = s.recv(4096)
                if not chunk:
                    return
                buf += chunk


# ------------------------------------------------------------------------------------------
# RESP: redis-benchmark
# ------------------------------------------------------------------------------------------


def parse_redis_csv(out):
    rows = {}
    head = None
    for line in out.splitlines():
        cells = [c.strip('"') for c in line.strip().split('","')]
        if len(cells) < 2:
            continue
        if cells[0] == "test":
            head = cells
            continue
        if head:
            rows[cells[0]] = {k: float(v) for k, v in zip(head[1:], cells[1:])}
    if not rows:
        raise ValueError("cannot read redis-benchmark's CSV: %r" % out[-200:])
    return rows


def resp_variant(server):
    def run(build_dir, quick, timeout, is_concur):
        n = QUICK_RESP_N if quick else RESP_N

        def body(srv):
            base = [tool("redis-benchmark"), "-h", HOST, "-p", str(srv.port)]
            if not quick:  # warm-up
                subprocess.run(base + ["-t", "ping", "-n", "20000", "-c", "50", "-q"],
                               capture_output=True, timeout=timeout)
            cmd = base + ["-t", "ping,set,get", "-n", str(n), "-c", "50", "--csv"]
            c0 = cpu_seconds(srv.proc.pid)
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            c1 = cpu_seconds(srv.proc.pid)
            if r.returncode != 0:
                raise RuntimeError("redis-benchmark exit status %d: %s" %
                                   (r.returncode, r.stderr.strip()[-200:]))
            rows = parse_redis_csv(r.stdout)
            requests = n * len(rows)
            seconds = sum(n / row["rps"] for row in rows.values())
            extra = {"requests": requests, "req_s": requests / seconds,
                     "cpu_s": round(c1 - c0, 3),
                     "cpu_us_per_req": (c1 - c0) * 1e6 / requests,
                     # the worst test's percentiles (redis-benchmark reports them per test)
                     "p50_us": max(row["p50_latency_ms"] for row in rows.values()) * 1e3,
                     "p99_us": max(row["p99_latency_ms"] for row in rows.values()) * 1e3,
                     "tests": {k: {"rps": v["rps"], "p50_us": v["p50_latency_ms"] * 1e3,
                                   "p99_us": v["p99_latency_ms"] * 1e3}
                               for k, v in rows.items()}}
            shown = ["redis-benchmark"] + cmd[1:]
            return {"value": extra["req_s"], "unit": "req/s", "better": "higher",
                    "params": {"n": n, "connections": 50, "tests": sorted(rows),
                               "load": " ".join(shown)},
                    "stats": {}, "extra": extra,
                    "command": ["(start)", SERVERS[server][2], ";"] + shown}

        return _with_server(server, build_dir, timeout, is_concur, "redis-benchmark", body)

    run.describe = "%s; redis-benchmark -t ping,set,get -c 50 --csv" % SERVERS[server][2]
    return run


# ------------------------------------------------------------------------------------------
# File reads: the data file, and fio's io_uring engine
# ------------------------------------------------------------------------------------------


def data_file(build_dir):
    """A FILE_MB MiB file under the build dir, made once, then read through so it is cached."""
    path = os.path.join(build_dir, "bench", "fileread.dat")
    size = FILE_MB << 20
    try:
        ok = os.path.getsize(path) == size
    except OSError:
        ok = False
    if not ok:
        chunk = os.urandom(1 << 20)
        with open(path + ".tmp", "wb") as f:
            for _ in range(FILE_MB):
                f.write(chunk)
        os.rename(path + ".tmp", path)
    with open(path, "rb", buffering=0) as f:  # into the page cache
        while f.read(8 << 20):
            pass
    return path


def fio_variant(depth):
    def run(build_dir, quick, timeout, is_concur):
        reason = missing_tool("fio")
        if reason:
            return "skipped", reason
        path = data_file(build_dir)
        secs = QUICK_FIO_SECONDS if quick else FIO_SECONDS
        cmd = [tool("fio"), "--name=randread", "--filename=" + path, "--ioengine=io_uring",
               "--rw=randread", "--bs=4k", "--iodepth=%d" % depth, "--direct=0",
               "--invalidate=0", "--size=%dM" % FILE_MB, "--runtime=%d" % secs, "--time_based",
               "--numjobs=1", "--thread", "--output-format=json"]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "failed", "fio timed out after %d s" % timeout
        if r.returncode != 0:
            return "failed", "fio exit status %d: %s" % (r.returncode, r.stderr.strip()[-200:])
        try:
            js = json.loads(r.stdout[r.stdout.index("{"):])
            rd = js["jobs"][0]["read"]
            iops = float(rd["iops"])
        except (ValueError, KeyError, IndexError) as e:
            return "failed", "cannot read fio's JSON: %s" % e
        if iops <= 0:
            return "failed", "fio read nothing"
        shown = ["fio"] + [c.replace(path, os.path.relpath(path)) for c in cmd[1:]]
        return "ok", {"value": 1e9 / iops, "unit": "ns/op", "better": "lower",
                      "params": {"depth": depth, "bs": 4096, "seconds": secs,
                                 "ios": rd.get("total_ios"), "fio": js.get("fio version")},
                      "stats": {"iops": iops,
                                "usr_cpu": js["jobs"][0].get("usr_cpu"),
                                "sys_cpu": js["jobs"][0].get("sys_cpu")},
                      "command": shown}

    run.describe = "fio --ioengine=io_uring --rw=randread --bs=4k --iodepth=%d --direct=0" % depth
    return run


def fileread_prepare(build_dir):
    """Before the concur / raw variants: the same cached file fio reads."""
    data_file(build_dir)


# ------------------------------------------------------------------------------------------
# Echo: bench/echo_load against concur's echo server and its peers
# ------------------------------------------------------------------------------------------

# One counted load run and the warm-up before it (seconds), full and --quick.
ECHO_SECONDS, ECHO_WARM = 2, 0.5
QUICK_ECHO_SECONDS, QUICK_ECHO_WARM = 0.15, 0.05
ECHO_CONNS = 64

# name -> (binary under build/bench, its thread option, why it may be missing). Every server runs
# one thread (libuv's loop is one thread; Go gets GOMAXPROCS=1), so the figures compare the same
# thing: what one thread spends per message.
ECHO_SERVERS = {
    "concur_echo": ("servers/concur_echo_server", "--loops", None),
    "uring_echo": ("peers/peer_uring_echo", "--threads", None),
    "epoll_echo": ("peers/peer_epoll_echo", "--threads", None),
    "uv_echo": ("peers/peer_uv_echo", "--threads",
                "libuv (libuv1-dev) was not found by pkg-config at configure time, so "
                "peer_uv_echo was not built"),
    "go_echo": ("peers/peer_go_echo", "--threads",
                "go (golang-go) was not found by CMake at configure time, so peer_go_echo was "
                "not built (apt-get install golang-go, then re-run cmake)"),
}
SERVERS.update({k: _ours(rel, opt, 1) for k, (rel, opt, _) in ECHO_SERVERS.items()})
BINARIES.update({k: rel for k, (rel, _, _) in ECHO_SERVERS.items()})


def echo_variant(server, size):
    """A variant function for run.py: echo_load (64 connections, size-byte ping-pong) against
    server; value: the server's CPU µs per message (echo_load reads it from /proc/PID/stat over
    its counted window)."""

    def run(build_dir, quick, timeout, is_concur):
        rel, _, why = ECHO_SERVERS[server]
        if not is_concur and not os.access(_built(build_dir, rel), os.X_OK):
            return "skipped", why or "%s was not built in %s/bench" % (rel, build_dir)
        load = _built(build_dir, "echo_load")
        if not os.access(load, os.X_OK):
            return ("failed" if is_concur else "skipped"), "echo_load was not built"
        secs = QUICK_ECHO_SECONDS if quick else ECHO_SECONDS
        warm = QUICK_ECHO_WARM if quick else ECHO_WARM

        def body(srv):
            args = ["--conns", str(ECHO_CONNS), "--size", str(size), "--seconds", str(secs),
                    "--warmup", str(warm)]
            cmd = [load, "--port", str(srv.port), "--pid", str(srv.proc.pid)] + args
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if r.returncode != 0:
                raise RuntimeError("echo_load exit status %d: %s" %
                                   (r.returncode, r.stderr.strip()[-200:]))
            lines = r.stdout.strip().splitlines()
            rec = json.loads(lines[-1]) if lines else None
            if not isinstance(rec, dict) or "extra" not in rec:
                raise RuntimeError("echo_load printed no result: %r" % r.stdout[-200:])
            shown = ["echo_load", "--port", "PORT", "--pid", "SERVER_PID"] + args
            rec["params"]["load"] = " ".join(shown)
            rec["command"] = ["(start)", SERVERS[server][2], ";"] + shown
            return rec

        return _with_server(server, build_dir, timeout, is_concur, None, body)

    run.describe = "%s; echo_load --conns %d --size %d" % (SERVERS[server][2], ECHO_CONNS, size)
    return run


# ------------------------------------------------------------------------------------------
# Conns: bench/conns_load holds 100,000 idle connections to an echo server, then one echo each
# ------------------------------------------------------------------------------------------

CONNS_N, QUICK_CONNS_N = 100_000, 2_000
CONNS_IDLE, QUICK_CONNS_IDLE = 1.0, 0.2  # seconds every connection is held idle
CONNS_FD_MARGIN = 256  # fds a process needs besides the connections (listener, rings, stdio)
# Memory one connection may cost the machine, all told: its two sockets in the kernel, the
# server's and the client's state. Generous (a measured idle connection costs < 16 KiB): a run
# wants half the available memory at most.
CONNS_KIB_PER_CONN = 48
CONNS_SERVERS = ["concur_echo", "epoll_echo", "uv_echo", "go_echo"]
_told = set()  # reasons for a smaller run already printed


def _read_int(path, key=None):
    try:
        with open(path) as f:
            if key is None:
                return int(f.read().split()[0])
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


_plans = {}


def conns_plan(n):
    """conns_plan_once(n), computed once per run of the suite: every run of every server holds
    the same number of connections."""
    if n not in _plans:
        _plans[n] = conns_plan_once(n)
    return _plans[n]


def conns_plan_once(n):
    """How many connections this machine can hold, and why fewer than n (or "").

    Each of the two processes (server, client) needs an fd per connection: the runner raises its
    RLIMIT_NOFILE hard limit up to fs.nr_open if it may (root with CAP_SYS_RESOURCE), the server
    and conns_load then raise their soft limit to it. Never a sysctl."""
    reasons = []
    nr_open = _read_int("/proc/sys/fs/nr_open") or 1 << 20
    need = n + CONNS_FD_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, min(need, nr_open)))
        except (ValueError, OSError):
            pass
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fd_cap = min(nr_open if hard == resource.RLIM_INFINITY else hard, nr_open) - CONNS_FD_MARGIN
    if fd_cap < n:
        if fd_cap == nr_open - CONNS_FD_MARGIN:
            reasons.append("fs.nr_open is %d" % nr_open)
        else:
            reasons.append("RLIMIT_NOFILE's hard limit is %d and cannot be raised here (no "
                           "CAP_SYS_RESOURCE)" % hard)
        n = fd_cap
    avail = _read_int("/proc/meminfo", "MemAvailable:")
    if avail is not None and avail // 2 // CONNS_KIB_PER_CONN < n:
        n = avail // 2 // CONNS_KIB_PER_CONN
        reasons.append("MemAvailable is %d MiB (a run takes at most half, at %d KiB a "
                       "connection)" % (avail // 1024, CONNS_KIB_PER_CONN))
    return max(n, 0), "; ".join(reasons)


def conns_variant(server):
    """A variant function for run.py: conns_load against an echo server (1 thread); value: the
    server's RSS per idle connection (KiB); extra: connect rate, CPU per echoed message."""

    def run(build_dir, quick, timeout, is_concur):
        rel, opt, why = ECHO_SERVERS[server]
        exe = _built(build_dir, rel)
        if not is_concur and not os.access(exe, os.X_OK):
            return "skipped", why or "%s was not built in %s/bench" % (rel, build_dir)
        load = _built(build_dir, "conns_load")
        if not os.access(load, os.X_OK):
            return ("failed" if is_concur else "skipped"), "conns_load was not built"
        want = QUICK_CONNS_N if quick else CONNS_N
        n, reason = conns_plan(want)
        if n < 100:
            return "skipped", "cannot hold even 100 connections here: " + reason
        if reason and reason not in _told:
            _told.add(reason)
            sys.stderr.write("conns: %d connections instead of %d: %s\n" % (n, want, reason))
        nofile = n + CONNS_FD_MARGIN

        def raise_nofile():  # in the server, before exec: the fds its connections need
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            if hard != resource.RLIM_INFINITY and hard < nofile:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            else:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

        def start(b, t):
            return start_printing([exe, "--port", "0", opt, "1"], t, preexec_fn=raise_nofile)

        idle = QUICK_CONNS_IDLE if quick else CONNS_IDLE

        def body(srv):
            args = ["--conns", str(n), "--idle", str(idle), "--time-limit",
                    str(max(timeout - 5, 5))]
            cmd = [load, "--port", str(srv.port), "--pid", str(srv.proc.pid)] + args
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            if r.returncode != 0:
                raise RuntimeError("conns_load exit status %d: %s" %
                                   (r.returncode, r.stderr.strip()[-300:]))
            lines = r.stdout.strip().splitlines()
            rec = json.loads(lines[-1]) if lines else None
            if not isinstance(rec, dict) or "extra" not in rec:
                raise RuntimeError("conns_load printed no result: %r" % r.stdout[-200:])
            shown = ["conns_load", "--port", "PORT", "--pid", "SERVER_PID"] + args
            rec["params"].update({"load": " ".join(shown), "conns_wanted": want,
                                  "conns_limited_by": reason})
            rec["command"] = ["(start)", SERVERS[server][2], ";"] + shown
            return rec

        return _with_server(server, build_dir, timeout, is_concur, None, body, start)

    run.describe = "%s; conns_load --conns %d (fewer if the fd limit or memory says so)" % (
        SERVERS[server][2], CONNS_N)
    return run
