#!/usr/bin/env python3
# Server memory per idle connection, and after a flood (issue 11): start a server, read its
# VmRSS, open N connections on 127.0.0.1 that each make one request and then sit idle, read
# VmRSS again; then a flood (every connection sends a large pipelined burst at once), close
# them all and read VmRSS once more. Prints kB per idle connection and the RSS after the flood.
# Usage: idle_rss.py DIR_WITH_SERVERS [N] [http|resp|echo ...]
import os, re, resource, socket, subprocess, sys, time

bindir = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 4000
names = sys.argv[3:] or ['http', 'resp', 'echo']
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * n + 256)), hard))

REQ = {'http': (b'GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n', b'Hello, World!'),
       'resp': (b'*1\r\n$4\r\nPING\r\n', b'+PONG\r\n'),
       'echo': (b'hello', b'hello')}


def rss_kb(pid):
    with open('/proc/%d/status' % pid) as f:
        return int(re.search(r'VmRSS:\s+(\d+)', f.read()).group(1))


def recv_until(s, marker):
    d = b''
    while marker not in d:
        c = s.recv(65536)
        if not c:
            break
        d += c
    return d


def run(name):
    p = subprocess.Popen([os.path.join(bindir, 'concur_%s_server' % name), '--port', '0',
                          '--loops', '2'], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True)
    port = int(re.search(r':(\d+) with', p.stdout.readline()).group(1))
    req, ans = REQ[name]
    try:
        time.sleep(0.2)
        base = rss_kb(p.pid)
        conns = []
        for i in range(n):
            s = socket.create_connection(('127.0.0.1', port))
            s.sendall(req)
            conns.append(s)
        for s in conns:
            recv_until(s, ans)
        time.sleep(0.5)
        idle = rss_kb(p.pid)
        # the flood: 64 KiB of pipelined requests on every connection at once
        burst = req * (65536 // len(req))
        for s in conns:
            s.setblocking(False)
            try:
                s.send(burst)
            except BlockingIOError:
                pass
        time.sleep(1.0)
        peak = rss_kb(p.pid)
        for s in conns:
            s.close()
        time.sleep(1.5)
        after = rss_kb(p.pid)
        print('%-5s n=%d  base %6d kB  idle %7d kB (%.2f kB/conn)  flood %7d kB  after %7d kB'
              % (name, n, base, idle, (idle - base) / n, peak, after))
    finally:
        p.terminate()
        p.wait(10)


for name in names:
    run(name)
