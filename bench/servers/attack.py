#!/usr/bin/env python3
# Servers under attack (issue 10): each example server (http, resp, echo) gets, one after the
# other, random bytes, malformed and oversized requests, pipelined garbage, half-closed and
# reset sockets, clients that never read, thousands of idle connections, a connection flood,
# (a second instance under prlimit --nofile=64) the fd limit reached and released, (a third with
# one loop) more never-reading clients than the loop has receive buffers, and (a fourth with 1 s
# limits) slow clients: idle, slowloris, never reading. After
# each attack the server must still answer a well-formed request and its fd count
# (/proc/PID/fd) must come back to where it was. Loopback only (127.0.0.1); every wait is
# bounded. Exit status 0 if every server held. Usage: attack.py DIR_WITH_SERVERS [--quick]
import os, random, re, resource, signal, socket, struct, subprocess, sys, time

bindir = sys.argv[1]
quick = '--quick' in sys.argv[2:]
rng = random.Random(int(os.environ.get('ATTACK_SEED', '12345')))
IDLE = 1000 if quick else 5000       # idle connections held at once
FLOOD = 2000 if quick else 20000     # connections opened and dropped in a burst
NOREAD = 8 if quick else 32          # clients that never read
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, IDLE + 1024)), hard))
HOST = '127.0.0.1'

PROTO = {
    'http': dict(ok=(b'GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n', b'Hello, World!'),
                 malformed=[b'\r\n\r\n', b'GET\r\n\r\n', b'GET / HTTP/9.9\r\n\r\n',
                            b'G\x00T / HTTP/1.1\r\n\r\n', b'GET / HTTP/1.1\r\n: x\r\n\r\n',
                            b'GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n',
                            b'GET / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n',
                            b'GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n',
                            b'GET / HTTP/1.1\n\n', b'\xff' * 100 + b'\r\n\r\n'],
                 oversized=[b'GET /' + b'a' * 100000 + b' HTTP/1.1\r\n\r\n',
                            b'GET / HTTP/1.1\r\n' + b'X: y\r\n' * 20000 + b'\r\n',
                            b'GET / HTTP/1.1\r\nContent-Length: 1000000\r\n\r\n' +
                            b'b' * 1000000]),
    'resp': dict(ok=(b'*1\r\n$4\r\nPING\r\n', b'+PONG\r\n'),
                 malformed=[b'*-2\r\n', b'*1\r\n$-2\r\n', b'*0\r\n', b'*1\r\n$x\r\n',
                            b'*1\r\n$4\r\nPINGXX', b'*2\r\n$3\r\nGET\r\n:1\r\n', b'*\r\n',
                            b'*65\r\n' + b'$1\r\na\r\n' * 65, b'$4\r\nPING\r\n',
                            b'*1\r\n$99999999999999999999\r\n', b'\x00\r\n'],
                 oversized=[b'*1\r\n$1000000\r\n' + b'a' * 1000000 + b'\r\n',
                            b'*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$60000\r\n' + b'v' * 60000 + b'\r\n',
                            b'PING ' * 200000 + b'\r\n', b'A' * 200000]),
    'echo': dict(ok=(b'ping-echo', b'ping-echo'), malformed=[], oversized=[b'e' * 4000000]),
}


def fd_count(pid):
    return len(os.listdir('/proc/%d/fd' % pid))


def start(name, prefix=(), loops=2, extra=()):
    p = subprocess.Popen(list(prefix) + [os.path.join(bindir, 'concur_%s_server' % name),
                                         '--port', '0', '--loops', str(loops)] + list(extra),
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    m = re.search(r':(\d+) with', p.stdout.readline())
    assert m, name + ' did not start'
    return p, int(m.group(1))


def connect(port, timeout=5):
    s = socket.create_connection((HOST, port), timeout=timeout)
    return s


def recv_until(s, marker, limit=1 << 22):
    d = b''
    while marker not in d and len(d) < limit:
        c = s.recv(65536)
        if not c:
            break
        d += c
    return d


def healthy(name, port):
    req, ans = PROTO[name]['ok']
    s = connect(port)
    try:
        s.sendall(req)
        d = recv_until(s, ans)
        assert ans in d, (name, 'no answer after attack', d[:200])
    finally:
        s.close()


def drain_close(socks):
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


def accept_backlog(port):
    """Connections waiting in the server's listen queues (rx_queue of its LISTEN sockets)."""
    n = 0
    with open('/proc/net/tcp') as f:
        for line in f.readlines()[1:]:
            a = line.split()
            if a[3] == '0A' and int(a[1].split(':')[1], 16) == port:
                n += int(a[4].split(':')[1], 16)
    return n


def check(name, p, port, base, what, t0):
    """The server answers and its fds come back to the baseline (bounded wait).

    Settled means nothing is left in the listen queues and the fd count is at the baseline,
    twice in a row, each count read after the queues: a count read alone can be at the
    baseline while a loop that ran late has still to accept (and then close) connections of the
    attack, so a count read after it may be above (a burst of accepts, not a leak)."""
    assert p.poll() is None, '%s died during: %s' % (name, what)
    healthy(name, port)
    deadline = time.time() + 10
    settled = 0
    while settled < 2 and time.time() < deadline:
        backlog = accept_backlog(port)
        n = fd_count(p.pid)
        settled = settled + 1 if backlog == 0 and n <= base else 0
        if settled < 2:
            time.sleep(0.05)
    assert settled == 2, '%s: %d fds after %s, %d before (%d in the listen queues)' % (
        name, n, what, base, backlog)
    print('  %-28s ok (fds %d, %.1f s)' % (what, n, time.time() - t0))


def send_quiet(s, data):
    try:
        s.sendall(data)
    except OSError:
        pass  # the server may close on us: that is its right


def attack_random(name, port):
    socks = []
    for i in range(50):
        s = connect(port)
        send_quiet(s, bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 4096))))
        socks.append(s)
    time.sleep(0.2)
    drain_close(socks)


def attack_list(name, port, key):
    for bad in PROTO[name][key]:
        s = connect(port)
        send_quiet(s, bad)
        s.settimeout(1)  # an incomplete request may rightly keep the server waiting
        try:
            recv_until(s, b'\x00never', limit=1 << 16)  # an answer, or the server closes
        except (socket.timeout, OSError):
            pass
        s.close()


def attack_pipelined_garbage(name, port):
    req = PROTO[name]['ok'][0]
    for i in range(20):
        parts = []
        for j in range(50):
            parts.append(req if rng.random() < 0.7 else
                         bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64))))
        s = connect(port)
        send_quiet(s, b''.join(parts))
        time.sleep(0.01)
        s.close()


def attack_half_closed(name, port):
    req, ans = PROTO[name]['ok']
    for i in range(20):
        s = connect(port)
        send_quiet(s, req[:len(req) // 2])  # half a request, then no more writes
        s.shutdown(socket.SHUT_WR)
        s.settimeout(5)
        try:
            recv_until(s, b'\x00never')  # the server ends the connection
        except OSError:
            pass
        s.close()
        s = connect(port)  # a whole request, then SHUT_WR: the answer still comes
        send_quiet(s, req)
        s.shutdown(socket.SHUT_WR)
        assert ans in recv_until(s, ans), 'no answer on a half-closed connection'
        s.close()


def attack_reset(name, port):
    req = PROTO[name]['ok'][0]
    for i in range(100):
        s = connect(port)
        send_quiet(s, req * rng.randint(0, 3) + req[:rng.randint(0, len(req))])
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
        s.close()  # RST


def attack_never_read(name, port):
    req = PROTO[name]['ok'][0]
    burst = req * (4000000 // len(req))
    socks = []
    for i in range(NOREAD):
        s = connect(port)
        s.setblocking(False)
        try:  # as much as the kernel takes: the server's answers pile up unread
            s.send(burst)
        except BlockingIOError:
            pass
        socks.append(s)
    time.sleep(0.5)
    healthy(name, port)  # the others are still served meanwhile
    drain_close(socks)


def attack_idle(name, port):
    socks = [connect(port) for _ in range(IDLE)]
    time.sleep(0.3)
    healthy(name, port)
    drain_close(socks)


def attack_flood(name, port):
    socks = []
    for i in range(FLOOD):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect((HOST, port))
        except BlockingIOError:
            pass
        except OSError:
            s.close()
            continue
        socks.append(s)
        if len(socks) >= 500:
            for t in socks:
                if rng.random() < 0.5:
                    t.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack('ii', 1, 0))
                t.close()
            socks = []
    drain_close(socks)


def attack_fd_limit(name):
    """A second server under prlimit --nofile=64: more clients than it has fds, then released."""
    p, port = start(name, ['prlimit', '--nofile=64'])
    try:
        healthy(name, port)
        time.sleep(0.1)
        base = fd_count(p.pid)
        t0 = time.time()
        socks = []
        for i in range(100):  # connects succeed into the backlog even when accept cannot
            socks.append(connect(port))
        time.sleep(0.5)
        drain_close(socks)
        time.sleep(0.1)
        check(name, p, port, base, 'fd limit reached, released', t0)
    finally:
        stop(p, name)


PINNERS = 300  # never-reading clients on one loop: more than its 256 receive buffers


def answer_flood(name, port):
    """Requests whose answers are far larger than they are (so answers pile up unread)."""
    if name == 'http':
        return b'GET / HTTP/1.1\r\n\r\n' * (400000 // 18)  # 404s
    if name == 'resp':
        s = connect(port)
        s.sendall(b'*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$50000\r\n' + b'v' * 50000 + b'\r\n')
        assert recv_until(s, b'\r\n') == b'+OK\r\n'
        s.close()
        return b'GET k\r\n' * 300  # 50 KB back per 7 bytes
    return b'e' * 400000


def stuck_sends(port):
    """The server's connections with answers queued unread (tx_queue of its sockets)."""
    n = 0
    with open('/proc/net/tcp') as f:
        for line in f.readlines()[1:]:
            a = line.split()
            if a[3] == '01' and int(a[1].split(':')[1], 16) == port and \
                    int(a[4].split(':')[0], 16) > 0:
                n += 1
    return n


def attack_pinned_buffers(name):
    """A server with one loop, and more clients that send requests and never read than the
    loop has receive buffers: a send waiting for such a client held its chunk, so the loop's
    buffer ring ran dry and no other connection got an answer. (Not echo: an echo answer is no
    larger than its request, so filling a socket's buffers would take megabytes per client.)"""
    p, port = start(name, ['prlimit', '--nofile=%d' % (PINNERS + 256)], loops=1)
    try:
        healthy(name, port)
        time.sleep(0.1)
        base = fd_count(p.pid)
        t0 = time.time()
        burst = answer_flood(name, port)
        socks = []
        for i in range(PINNERS):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect((HOST, port))
            s.setblocking(False)
            try:
                s.send(burst)
            except BlockingIOError:
                pass
            socks.append(s)
        deadline = time.time() + 20  # until every one has answers queued unread: stuck
        while stuck_sends(port) < PINNERS and time.time() < deadline:
            time.sleep(0.2)
        healthy(name, port)  # within 5 s, with every one of them stuck
        drain_close(socks)
        check(name, p, port, base, '%d clients pinning one loop' % PINNERS, t0)
    finally:
        stop(p, name)


def straddle(name, port):
    """A busy client the limits must not close: every request whole within 0.25 s, but each
    send ends with the start of the next (pipelining), for 2.5 s against a 1 s --request-ms.
    One limit for the whole run of requests closed it after 1 s."""
    req, ans = PROTO[name]['ok']
    s = connect(port)
    try:
        half = len(req) // 2
        s.sendall(req[:half])
        for i in range(10):
            time.sleep(0.25)
            s.sendall(req[half:] + req[:half])  # ends request i, begins request i + 1
            d = recv_until(s, ans)
            assert ans in d, (name, 'a pipelining client closed after %d requests' % i)
    finally:
        s.close()


def attack_slow_clients(name):
    """Slow clients against short limits (1 s): an idle keep-alive connection, a request that
    never completes (a byte now and then: slowloris), a client that never reads. The server
    closes each (its fd count comes back while the clients still hold theirs open)."""
    p, port = start(name, [], extra=['--idle-ms', '1000', '--request-ms', '1000',
                                     '--send-ms', '1000'])
    try:
        healthy(name, port)
        time.sleep(0.1)
        base = fd_count(p.pid)
        t0 = time.time()
        idle = connect(port)
        partial = connect(port)
        head = {'http': b'GET /plaintext HTTP/1.1\r\nX: ', 'resp': b'*2\r\n$3\r\nGET\r\n$1',
                'echo': b''}[name]
        noread = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        noread.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        noread.connect((HOST, port))
        noread.setblocking(False)
        try:
            noread.send(answer_flood(name, port))
        except BlockingIOError:
            pass
        deadline = time.time() + 8
        for b in head:  # slowloris: one byte every 0.2 s (past the 1 s limit), never the end
            send_quiet(partial, bytes([b]))
            time.sleep(0.2)
            if time.time() > t0 + 2:
                break
        while fd_count(p.pid) > base and time.time() < deadline:
            time.sleep(0.1)
        n = fd_count(p.pid)
        assert n <= base, '%s: %d fds with slow clients after %.1f s, %d before' % (
            name, n, time.time() - t0, base)
        drain_close([idle, partial, noread])
        if name != 'echo':
            straddle(name, port)
        check(name, p, port, base, 'slow clients closed', t0)
    finally:
        stop(p, name)


def stop(p, name):
    p.send_signal(signal.SIGTERM)
    try:
        rc = p.wait(timeout=15)
    except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError(name + ' did not stop on SIGTERM')
    assert rc == 0, '%s exited with %d' % (name, rc)


ATTACKS = [
    ('random bytes', attack_random),
    ('malformed requests', lambda n, port: attack_list(n, port, 'malformed')),
    ('oversized requests', lambda n, port: attack_list(n, port, 'oversized')),
    ('pipelined garbage', attack_pipelined_garbage),
    ('half-closed sockets', attack_half_closed),
    ('reset sockets', attack_reset),
    ('clients that never read', attack_never_read),
    ('%d idle connections' % IDLE, attack_idle),
    ('a flood of %d connections' % FLOOD, attack_flood),
]


def main():
    t0 = time.time()
    for name in ['http', 'resp', 'echo']:
        print(name)
        p, port = start(name, ['prlimit', '--nofile=%d' % (IDLE + 1024)])
        try:
            healthy(name, port)
            time.sleep(0.1)
            base = fd_count(p.pid)
            for what, fn in ATTACKS:
                t = time.time()
                fn(name, port)
                check(name, p, port, base, what, t)
        finally:
            stop(p, name)
        attack_fd_limit(name)
        if name != 'echo':
            attack_pinned_buffers(name)
        attack_slow_clients(name)
    print('attack: every server held (%.1f s)' % (time.time() - t0))


main()
