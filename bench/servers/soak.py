#!/usr/bin/env python3
# Soak (issue 10): the HTTP server under wrk, then the RESP server under redis-benchmark, each for
# N minutes, in rotating phases (keep-alive at a few connection counts, pipelined, and connection
# churn: a new connection per request), while the server's memory and fds are sampled every 10 s
# from /proc. Prints the samples, the growth of each series from the end of the first minute to
# the end (a leak shows as steady growth, a working set as a plateau), and exits non-zero if the
# server died, stopped answering, or its RSS or fds grew past a generous bound. The server gets
# nothing added: everything is read from outside. A missing tool (wrk, redis-benchmark from
# Debian's redis-tools) makes its server SKIPPED with the reason. Loopback only (127.0.0.1);
# every wait is bounded. Long by design: not in CI (see bench/README.md, "Soak").
#
# What the memory columns measure (kB, from /proc/PID/status and /proc/PID/smaps):
#   rss   VmRSS: resident memory of the whole process.
#   hwm   VmHWM: the peak of VmRSS so far.
#   data  VmData: private writable virtual memory (reserved, not necessarily touched).
#   heap  Private_Dirty of malloc's arenas: the main arena ([heap], brk) plus glibc's thread
#         arenas (anonymous rw mappings at a 64 MiB-aligned address, the rest of their 64 MiB
#         reserved PROT_NONE). It is the heap pages ever written and not given back: an upper
#         bound of the live heap that grows with it (glibc rarely returns arena pages, so it
#         plateaus at the peak working set). Large blocks malloc maps on their own (>= its mmap
#         threshold, 128 KiB and up) are not in it; they are in anon.
#   anon  Anonymous (smaps_rollup): all private anonymous memory resident (heap, large blocks,
#         fiber stacks, provided buffers, thread stacks).
#   maps  the number of mappings (/proc/PID/maps): a leak of stack reservations or big blocks.
#   fds   open fds (/proc/PID/fd): connections, rings, the listener.
# Usage: soak.py DIR_WITH_SERVERS [--minutes N (default 10)] [--quick (30 s)]
#                [--servers http,resp] [--interval S (default 10)]
import argparse, os, re, resource, shutil, signal, socket, subprocess, sys, threading, time

HOST = '127.0.0.1'
HERE = os.path.dirname(os.path.abspath(__file__))
PIPELINE_LUA = os.path.join(os.path.dirname(HERE), 'wrk_pipeline.lua')
MAXCONN = 512  # the most connections a phase opens
# bounds (generous: a leak of a few bytes per request over 10 minutes of load crosses them)
RSS_GROWTH_KB = 64 * 1024  # RSS at the end - RSS after the first minute, and ...
RSS_GROWTH_REL = 1.0       # ... more than this fraction of it too
FD_SLACK = 4               # fds once the load stopped - fds before it
HEALTH_TIMEOUT = 10        # a request on a fresh connection must be answered within this

PROTO = {'http': (b'GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n', b'Hello, World!'),
         'resp': (b'*1\r\n$4\r\nPING\r\n', b'+PONG\r\n')}


def kb_fields(path, names):
    with open(path) as f:
        text = f.read()
    return {n: int(re.search(r'^%s:\s+(\d+)' % n, text, re.M).group(1)) for n in names}


def arena_dirty_kb(pid):
    """Private_Dirty of [heap] and of glibc's thread arenas (see the header)."""
    total = 0
    with open('/proc/%d/smaps' % pid) as f:
        lines = f.read().splitlines()
    maps = []  # (start, end, perms, name, private_dirty)
    for line in lines:
        m = re.match(r'([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ (\d+)\s*(.*)$', line)
        if m:
            maps.append([int(m.group(1), 16), int(m.group(2), 16), m.group(3),
                         m.group(5), 0, m.group(4) == '0'])
        elif line.startswith('Private_Dirty:') and maps:
            maps[-1][4] = int(line.split()[1])
    arena = 64 << 20
    for i, (start, end, perms, name, dirty, anon) in enumerate(maps):
        if name == '[heap]':
            total += dirty
        elif (anon and not name and perms == 'rw-p' and start % arena == 0 and
              (end - start == arena or (i + 1 < len(maps) and maps[i + 1][0] == end and
                                        maps[i + 1][2] == '---p' and
                                        maps[i + 1][1] == start + arena))):
            total += dirty
    return total, len(maps)


def cpu_seconds(pid):
    with open('/proc/%d/stat' % pid) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def sample(pid):
    st = kb_fields('/proc/%d/status' % pid, ['VmRSS', 'VmHWM', 'VmData'])
    roll = kb_fields('/proc/%d/smaps_rollup' % pid, ['Anonymous'])
    heap, nmaps = arena_dirty_kb(pid)
    return {'rss': st['VmRSS'], 'hwm': st['VmHWM'], 'data': st['VmData'], 'heap': heap,
            'anon': roll['Anonymous'], 'maps': nmaps,
            'fds': len(os.listdir('/proc/%d/fd' % pid)), 'cpu': cpu_seconds(pid)}


def healthy(name, port):
    """ms to answer one request on a fresh connection, or None."""
    req, ans = PROTO[name]
    t = time.time()
    try:
        with socket.create_connection((HOST, port), timeout=HEALTH_TIMEOUT) as s:
            s.sendall(req)
            d = b''
            while ans not in d and len(d) < 65536 and time.time() - t < HEALTH_TIMEOUT:
                c = s.recv(65536)
                if not c:
                    break
                d += c
            return (time.time() - t) * 1e3 if ans in d else None
    except OSError:
        return None


def start(bindir, name):
    p = subprocess.Popen([os.path.join(bindir, 'concur_%s_server' % name), '--port', '0',
                          '--loops', '2'], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)
    m = re.search(r':(\d+) with', p.stdout.readline())
    if not m:
        p.kill()
        raise RuntimeError(name + ' did not start')
    return p, int(m.group(1))


def stop(p):
    """SIGTERM; the exit status, or None if it had to be killed."""
    p.stdout.close()
    if p.poll() is not None:
        return p.returncode
    p.send_signal(signal.SIGTERM)
    try:
        return p.wait(timeout=15)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return None


# ---- load ---------------------------------------------------------------------------------


def parse_wrk(out):
    n = re.search(r'(\d+) requests in', out)
    errs = sum(int(x) for x in re.findall(r'(?:connect|read|write|timeout) (\d+)', out))
    bad = re.search(r'Non-2xx or 3xx responses: (\d+)', out)
    return (int(n.group(1)) if n else 0), errs + (int(bad.group(1)) if bad else 0)


def wrk_phase(args, extra):
    def run(port, secs):
        cmd = (['wrk'] + args + ['-d%ds' % max(1, int(secs)), '--timeout', '5s'] +
               ['http://%s:%d/plaintext' % (HOST, port)] + extra)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 60)
        if r.returncode != 0:
            raise RuntimeError('wrk exit %d: %s' % (r.returncode, r.stderr.strip()[-200:]))
        return parse_wrk(r.stdout)
    return run


HTTP_PHASES = [
    ('keep-alive c16', wrk_phase(['-t1', '-c16'], [])),
    ('keep-alive c128', wrk_phase(['-t2', '-c128'], [])),
    ('keep-alive c%d' % MAXCONN, wrk_phase(['-t2', '-c%d' % MAXCONN], [])),
    ('pipelined c64 x16', wrk_phase(['-t2', '-c64', '-s', PIPELINE_LUA], ['--', '16'])),
    # the server answers "Connection: close" and closes: wrk reconnects for every request
    ('churn c32', wrk_phase(['-t2', '-c32', '-H', 'Connection: close'], [])),
]


def redis_phase(args, tests):
    state = {'n': 20000}

    def run(port, secs):
        """redis-benchmark runs of about 5 s (n adapted run by run) until secs are up."""
        total = errs = 0
        end = time.time() + secs
        while time.time() < end - 0.5:
            n = state['n']
            cmd = (['redis-benchmark', '-h', HOST, '-p', str(port), '-t', tests, '-n', str(n),
                    '-r', '10000', '-d', '64', '--csv'] + args)
            t = time.time()
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=secs + 60)
            took = time.time() - t
            rows = [l for l in r.stdout.splitlines() if l.startswith('"') and
                    not l.startswith('"test"')]
            if r.returncode != 0 or not rows:
                errs += 1
            else:
                total += n * len(rows)
            state['n'] = max(1000, min(int(n * min(5.0, end - time.time()) / max(took, 0.1)),
                                       n * 4))
        return total, errs
    return run


RESP_PHASES = [
    ('keep-alive c16', redis_phase(['-c', '16'], 'ping,set,get')),
    ('keep-alive c128', redis_phase(['-c', '128'], 'ping,set,get')),
    ('keep-alive c%d' % MAXCONN, redis_phase(['-c', str(MAXCONN)], 'set,get')),
    ('pipelined c64 x16', redis_phase(['-c', '64', '-P', '16'], 'ping,set,get')),
    # -k 0: redis-benchmark closes and reopens its connection after every request
    ('churn c32', redis_phase(['-c', '32', '-k', '0'], 'ping,get')),
]

SERVERS = {'http': ('wrk', 'wrk', HTTP_PHASES),
           'resp': ('redis-benchmark', 'redis-tools', RESP_PHASES)}


# ---- one soak ---------------------------------------------------------------------------------


class Sampler(threading.Thread):
    """Every interval: a sample, and a health request; stops at the first failure to read."""

    def __init__(self, name, p, port, interval, t0):
        super().__init__(daemon=True)
        self.name_, self.p, self.port, self.interval, self.t0 = name, p, port, interval, t0
        self.samples, self.phase, self.cycle = [], '-', 0
        self.halt = threading.Event()

    def take(self, phase):
        if self.p.poll() is not None:
            return None
        try:
            s = sample(self.p.pid)
        except (OSError, AttributeError, ValueError):
            return None
        s['t'] = time.time() - self.t0
        s['phase'] = phase
        s['cycle'] = self.cycle
        s['ms'] = healthy(self.name_, self.port)
        self.samples.append(s)
        return s

    def run(self):
        nxt = self.t0 + self.interval
        while not self.halt.wait(max(0, nxt - time.time())):
            nxt += self.interval
            if self.take(self.phase) is None:
                return


def fmt_ms(ms):
    return 'NO ANSWER' if ms is None else '%.1f' % ms


COLS = ['rss', 'hwm', 'data', 'heap', 'anon', 'maps', 'fds']


def table(samples):
    print('  %6s  %-18s %8s %8s %8s %8s %8s %5s %5s %6s %9s' %
          (('t s', 'phase') + tuple(COLS) + ('cpu%', 'ans ms')))
    prev = None
    for s in samples:
        cpu = '' if prev is None or s['t'] <= prev['t'] else \
            '%.0f' % (100 * (s['cpu'] - prev['cpu']) / (s['t'] - prev['t']))
        print('  %6.0f  %-18s %8d %8d %8d %8d %8d %5d %5d %6s %9s' %
              ((s['t'], s['phase']) + tuple(s[c] for c in COLS) + (cpu, fmt_ms(s['ms']))))
        prev = s


def slope_per_min(pts):
    """Least-squares slope of (t s, value) per minute."""
    if len(pts) < 2:
        return 0.0
    n = len(pts)
    mt = sum(t for t, _ in pts) / n
    mv = sum(v for _, v in pts) / n
    den = sum((t - mt) ** 2 for t, _ in pts)
    return 60 * sum((t - mt) * (v - mv) for t, v in pts) / den if den else 0.0


def soak(bindir, name, seconds, interval, phase_secs):
    tool, pkg, phases = SERVERS[name]
    if not shutil.which(tool):
        print('%s: SKIPPED (%s not installed: apt-get install %s)' % (name, tool, pkg))
        return []
    failures = []
    p, port = start(bindir, name)
    try:
        time.sleep(0.3)
        if healthy(name, port) is None:
            return ['%s: no answer before the load' % name]
        t0 = time.time()
        smp = Sampler(name, p, port, interval, t0)
        smp.take('idle (before)')
        idle_fds = smp.samples[0]['fds']
        smp.start()
        end = t0 + seconds
        done = {}
        i = 0
        while time.time() < end - 1 and p.poll() is None:
            what, run = phases[i % len(phases)]
            smp.cycle = i // len(phases) + 1
            i += 1
            secs = min(phase_secs, end - time.time())
            smp.phase = what
            try:
                n, errs = run(port, secs)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                n, errs = 0, 1
                failures.append('%s: %s: %s' % (name, what, e))
            tot = done.setdefault(what, [0, 0, 0.0])
            tot[0] += n
            tot[1] += errs
            tot[2] += secs
            if n == 0 and p.poll() is None:
                failures.append('%s: %s: no request answered' % (name, what))
        smp.halt.set()
        smp.join(HEALTH_TIMEOUT + 5)
        died = p.poll() is not None
        if not died:  # the load stopped: the fds must come back (bounded wait)
            deadline = time.time() + 10
            while len(os.listdir('/proc/%d/fd' % p.pid)) > idle_fds and time.time() < deadline:
                time.sleep(0.1)
            smp.take('idle (after)')
        print('%s: %d phases in %.0f s' % (name, i, time.time() - t0))
        for what, _ in phases:
            if what in done:
                n, errs, secs = done[what]
                print('  %-18s %11d requests %9.0f req/s %6d errors' %
                      (what, n, n / max(secs, 1e-9), errs))
        table(smp.samples)
        failures += judge(name, smp.samples, died, p.returncode, idle_fds, seconds)
    finally:
        rc = stop(p)
        if rc is None:
            failures.append('%s: did not stop on SIGTERM' % name)
        elif rc != 0 and not any('died' in f for f in failures):
            failures.append('%s: exit status %d' % (name, rc))
    return failures


def judge(name, samples, died, rc, idle_fds, seconds):
    fails = []
    if died:
        fails.append('%s died during the soak (exit status %s)' % (name, rc))
    for s in samples:
        if s['ms'] is None:
            fails.append('%s stopped answering at t=%.0f s (%s)' % (name, s['t'], s['phase']))
    loaded = [s for s in samples if not s['phase'].startswith('idle')]
    if not loaded:
        return fails + ['%s: no sample under load' % name]
    # the base: the last sample in the first minute (in a run of under 2 minutes: in its
    # first half), after warm-up and the store's growth
    cut = min(60, seconds / 2)
    base = ([s for s in loaded if s['t'] <= cut + 1] or loaded[:1])[-1]
    last = loaded[-1]
    print('  growth from t=%.0f s to t=%.0f s (end - base, and the least-squares slope of the '
          'samples from the base on):' % (base['t'], last['t']))
    tail = [s for s in loaded if s['t'] >= base['t']]
    for c in COLS:
        print('    %-5s %8d -> %8d  %+8d  (%+.1f/min)' %
              (c, base[c], last[c], last[c] - base[c],
               slope_per_min([(s['t'], s[c]) for s in tail])))
    cycles = sorted(set(s['cycle'] for s in loaded))
    if len(cycles) > 1:  # the phases differ: compare whole passes over them
        print('  peak of each series in each pass over the %d phases:' %
              len(SERVERS[name][2]))
        print('    %-5s ' % 'pass' + ''.join('%9s' % c for c in COLS))
        for c in cycles:
            row = [s for s in loaded if s['cycle'] == c]
            print('    %-5d ' % c + ''.join('%9d' % max(s[k] for s in row) for k in COLS))
    grow = last['rss'] - base['rss']
    if grow > RSS_GROWTH_KB and grow > RSS_GROWTH_REL * base['rss']:
        fails.append('%s: RSS grew %d kB under load (from %d kB)' % (name, grow, base['rss']))
    peak = max(s['fds'] for s in samples)
    if peak > 2 * MAXCONN + 64:
        fails.append('%s: %d fds under load, with at most %d connections' %
                     (name, peak, MAXCONN + 1))
    after = samples[-1]
    if after['phase'] == 'idle (after)':
        print('  idle fds: %d before the load, %d after' % (idle_fds, after['fds']))
        if after['fds'] > idle_fds + FD_SLACK:
            fails.append('%s: %d fds once the load stopped, %d before' %
                         (name, after['fds'], idle_fds))
    elif not died:
        fails.append('%s: no sample after the load' % name)
    return fails


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument('bindir')
    ap.add_argument('--minutes', type=float, default=10.0, help='per server (default 10)')
    ap.add_argument('--quick', action='store_true', help='30 s per server')
    ap.add_argument('--servers', default='http,resp')
    ap.add_argument('--interval', type=float, default=10.0, help='seconds between samples')
    a = ap.parse_args()
    for n in a.servers.split(','):
        if n not in SERVERS:
            ap.error('unknown server %r (http, resp)' % n)
    seconds = 30.0 if a.quick else a.minutes * 60
    # at least three passes over the phases (phases of 6 to 30 s): a pass is the unit in which
    # the load repeats itself, so a leak shows as pass-to-pass growth
    nph = max(len(SERVERS[n][2]) for n in a.servers.split(','))
    phase_secs = max(6, min(30, seconds / (3 * nph)))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * MAXCONN + 256)), hard))
    failures, ran = [], 0
    t0 = time.time()
    for name in a.servers.split(','):
        if shutil.which(SERVERS[name][0]):
            ran += 1
        failures += soak(a.bindir, name, seconds, a.interval, phase_secs)
    for f in failures:
        print('FAIL: ' + f)
    print('soak: %s (%.0f s)' % ('FAILED' if failures else 'every server held' if ran else
                                 'nothing ran (every server SKIPPED)', time.time() - t0))
    return 1 if failures else 0


if __name__ == '__main__':
    sys.exit(main())
