#!/usr/bin/env python3
# Smoke test of the example servers: a real curl request, keep-alive and pipelining, 400 on a
# malformed request, 431 on oversized headers, a half request and a hang-up, RESP commands and
# bad input, echo; then a clean stop on SIGTERM; the graceful stop (idle connections closed at
# once, a request under way answered, one that never completes cut at --drain-ms, exit 0).
# Usage: test_servers.py DIR_WITH_SERVERS
import os, re, signal, socket, subprocess, sys, time

bindir = sys.argv[1]

def start(name, *args, stderr=None):
    p = subprocess.Popen([os.path.join(bindir, 'concur_%s_server' % name), '--port', '0',
                          '--loops', '2'] + list(args), stdout=subprocess.PIPE, stderr=stderr,
                         text=True)
    line = p.stdout.readline()
    m = re.search(r':(\d+) with', line)
    assert m, name + ' did not say where it listens'
    if '--bind' not in args:
        assert 'on 127.0.0.1:' in line, line  # loopback unless told otherwise
    return p, int(m.group(1))

def stop(p):
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=10) == 0
    assert 'stopped' in p.stdout.read()

def recv_until(s, n, marker=None):
    d = b''
    s.settimeout(5)
    while len(d) < n and (marker is None or marker not in d):
        c = s.recv(65536)
        if not c:
            break
        d += c
    return d

def test_http():
    p, port = start('http')
    try:
        out = subprocess.run(['curl', '-s', '-i', 'http://127.0.0.1:%d/plaintext' % port],
                             capture_output=True, timeout=10).stdout
        assert out.startswith(b'HTTP/1.1 200 OK'), out
        assert b'\r\nDate: ' in out and b'\r\nServer: ' in out and out.endswith(b'Hello, World!')
        s = socket.create_connection(('127.0.0.1', port))
        s.sendall(b'GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n' * 16)  # pipelined
        d = b''
        while d.count(b'Hello, World!') < 16:
            d += recv_until(s, 1)
        s.sendall(b'GET /plaintext HTTP/1.1\r\n\r\n')  # still open: keep-alive
        assert b'200 OK' in recv_until(s, 1, b'Hello, World!')
        # a head cut anywhere (after a CR, inside the blank line) waits for the rest
        req = b'GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n'
        for cut in [1, req.index(b'\r') + 1, req.index(b'x') + 2, len(req) - 2, len(req) - 1]:
            s.sendall(req[:cut])
            time.sleep(0.02)
            s.sendall(req[cut:])
            d = recv_until(s, 1, b'Hello, World!')
            assert d.startswith(b'HTTP/1.1 200 OK') and d.endswith(b'Hello, World!'), (cut, d)
        for bad in [b'BAD\r\n\r\n', b'GET  /plaintext HTTP/1.1\r\n\r\n', b'GET / HTTP/2.0\r\n\r\n',
                    b'GET / HTTP/1.1\r\nno colon\r\n\r\n',
                    b'GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab']:
            s = socket.create_connection(('127.0.0.1', port))
            s.sendall(bad)
            d = recv_until(s, 1 << 20)
            assert d.startswith(b'HTTP/1.1 400'), (bad, d)
        s = socket.create_connection(('127.0.0.1', port))
        s.sendall(b'GET /plaintext HTTP/1.1\r\nX-Big: ' + b'a' * 20000 + b'\r\n\r\n')
        assert recv_until(s, 1 << 20, b'\r\n\r\n').startswith(b'HTTP/1.1 431')
        s = socket.create_connection(('127.0.0.1', port))
        s.sendall(b'GET /plain')  # half a request, then hang up
        s.close()
        s = socket.create_connection(('127.0.0.1', port))  # an idle connection at stop
    finally:
        stop(p)

def test_resp():
    p, port = start('resp')
    try:
        s = socket.create_connection(('127.0.0.1', port))
        s.sendall(b'*1\r\n$4\r\nPING\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nvv\r\n'
                  b'*2\r\n$3\r\nGET\r\n$1\r\nk\r\n*2\r\n$3\r\nDEL\r\n$1\r\nk\r\n'
                  b'*2\r\n$3\r\nGET\r\n$1\r\nk\r\nPING\r\n')
        want = b'+PONG\r\n+OK\r\n$2\r\nvv\r\n:1\r\n$-1\r\n+PONG\r\n'
        assert recv_until(s, len(want)) == want
        # requests larger than a receive buffer (4 KiB) and a pipeline of many: pieced together
        big = bytes(range(65, 91)) * 1000
        s.sendall(b'*3\r\n$3\r\nSET\r\n$3\r\nbig\r\n$%d\r\n%s\r\n' % (len(big), big) +
                  b'*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n' + b'PING\r\n' * 3000)
        want = b'+OK\r\n$%d\r\n%s\r\n' % (len(big), big) + b'+PONG\r\n' * 3000
        assert recv_until(s, len(want)) == want
        s.sendall(b'*1\r\n$4\r\nPI')  # half, then the rest
        time.sleep(0.05)
        s.sendall(b'NG\r\n')
        assert recv_until(s, 7) == b'+PONG\r\n'
        s.sendall(b'*1\r\n$x\r\n')
        assert recv_until(s, 1 << 20).startswith(b'-ERR Protocol error')
        # -2 as a count or a bulk length is malformed (it once collided with the parser's
        # "incomplete" sentinel: no answer, and the pipelined PING behind it never answered)
        for bad in [b'*-2\r\n', b'*1\r\n$-2\r\n', b'*-1\r\n', b'*1\r\n$-1\r\n',
                    b'*99999999999999999999\r\n',
                    b'DEL' + b''.join(b' k%d' % i for i in range(70)) + b'\r\n']:
            s = socket.create_connection(('127.0.0.1', port))
            s.sendall(bad + b'*1\r\n$4\r\nPING\r\n')
            d = recv_until(s, 1 << 20)
            assert d.startswith(b'-ERR Protocol error'), (bad, d)
        s = socket.create_connection(('127.0.0.1', port))
        s.sendall(b'*2\r\n$3\r\nGET')
        s.close()
    finally:
        stop(p)

def test_echo():
    p, port = start('echo')
    try:
        s = socket.create_connection(('127.0.0.1', port))
        data = bytes(range(256)) * 4000
        s.sendall(data)
        assert recv_until(s, len(data)) == data
    finally:
        stop(p)

def test_bind():
    bad = subprocess.run([os.path.join(bindir, 'concur_echo_server'), '--bind', 'nowhere'],
                         capture_output=True, timeout=10)
    assert bad.returncode == 2, bad
    if socket.has_ipv6:
        try:
            socket.socket(socket.AF_INET6).bind(('::1', 0))
        except OSError:
            return  # no IPv6 loopback here
        p, port = start('echo', '--bind', '::1')
        try:
            s = socket.create_connection(('::1', port))
            s.sendall(b'six')
            assert recv_until(s, 3) == b'six'
        finally:
            stop(p)

def sigterm(p):
    """SIGTERM, then wait until the server says it is stopping (its stderr must be a pipe)."""
    p.send_signal(signal.SIGTERM)
    while 'stopping' not in p.stderr.readline():
        assert p.poll() is None, 'the server ended before saying it stops'

def closed(s):
    """The server closed s: EOF (or a reset) before 10 s."""
    s.settimeout(10)
    try:
        return s.recv(65536) == b''
    except ConnectionResetError:
        return True

def exits_0(p, within):
    assert p.wait(timeout=within) == 0
    out = p.stdout.read()
    assert 'stopped' in out, out
    return out

HALF = b'GET /plaintext HTTP/1.1\r\nHost: x\r\n'

def test_stop():
    # Idle keep-alive connections (one answered, one that never sent a byte) do not hold the
    # drain: with a 60 s bound the server still exits 0 at once, and both are closed.
    p, port = start('http', '--drain-ms', '60000', stderr=subprocess.PIPE)
    a = socket.create_connection(('127.0.0.1', port))
    a.sendall(b'GET /plaintext HTTP/1.1\r\n\r\n')
    assert b'200 OK' in recv_until(a, 1, b'Hello, World!')
    b = socket.create_connection(('127.0.0.1', port))
    sigterm(p)
    assert closed(a) and closed(b)
    assert 'drained' in exits_0(p, 10)

    # A request under way when the stop comes is finished and answered with Connection: close,
    # then its connection is closed; the idle one next to it is closed at once.
    p, port = start('http', '--drain-ms', '60000', stderr=subprocess.PIPE)
    m = socket.create_connection(('127.0.0.1', port))
    m.sendall(HALF)
    idle = socket.create_connection(('127.0.0.1', port))
    idle.sendall(b'GET /plaintext HTTP/1.1\r\n\r\n')
    assert b'200 OK' in recv_until(idle, 1, b'Hello, World!')
    time.sleep(0.2)  # the half request reached the server (it is mid-request, not idle)
    sigterm(p)
    assert closed(idle)
    assert p.poll() is None  # still draining: the request is not complete
    m.sendall(b'\r\n')
    d = recv_until(m, 1 << 20, b'Hello, World!')
    assert d.startswith(b'HTTP/1.1 200 OK') and b'\r\nConnection: close\r\n' in d, d
    assert closed(m)
    assert 'drained' in exits_0(p, 10)

    # A request that never completes is cut at the drain bound: the server exits 0 after about
    # --drain-ms (not before: it waited for the request), and the connection is closed.
    p, port = start('http', '--drain-ms', '1000', stderr=subprocess.PIPE)
    m = socket.create_connection(('127.0.0.1', port))
    m.sendall(HALF)
    time.sleep(0.2)
    t0 = time.monotonic()
    sigterm(p)
    assert 'cancelled' in exits_0(p, 10)
    assert time.monotonic() - t0 >= 0.9
    assert closed(m)

    # A second SIGTERM during the drain ends it at once: the request still open is cancelled
    # (the server waited out its 60 s bound before).
    p, port = start('http', '--drain-ms', '60000', stderr=subprocess.PIPE)
    m = socket.create_connection(('127.0.0.1', port))
    m.sendall(HALF)
    time.sleep(0.2)
    sigterm(p)
    time.sleep(0.3)
    assert p.poll() is None  # draining: the request is not complete
    p.send_signal(signal.SIGTERM)
    assert 'cancelled' in exits_0(p, 10)
    assert closed(m)

    # Echo: a connection whose server task is blocked sending to a client that does not read is
    # cancelled at the bound; an idle one is closed at once.
    p, port = start('echo', '--drain-ms', '1000', stderr=subprocess.PIPE)
    idle = socket.create_connection(('127.0.0.1', port))
    stuck = socket.create_connection(('127.0.0.1', port))
    stuck.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # fill both socket buffers: the echo's send blocks
        try:
            sent += stuck.send(b'x' * 65536)
        except BlockingIOError:
            time.sleep(0.05)
            try:
                sent += stuck.send(b'x' * 65536)
            except BlockingIOError:
                break
    assert sent > 0
    stuck.setblocking(True)
    sigterm(p)
    assert closed(idle)
    assert 'cancelled' in exits_0(p, 10)

    # RESP: half a command finishes during the drain and is answered, then the connection closes.
    p, port = start('resp', '--drain-ms', '60000', stderr=subprocess.PIPE)
    m = socket.create_connection(('127.0.0.1', port))
    m.sendall(b'*1\r\n$4\r\nPI')
    time.sleep(0.2)
    sigterm(p)
    m.sendall(b'NG\r\n')
    assert recv_until(m, 7) == b'+PONG\r\n'
    assert closed(m)
    assert 'drained' in exits_0(p, 10)

    bad = subprocess.run([os.path.join(bindir, 'concur_echo_server'), '--drain-ms', 'x'],
                         capture_output=True, timeout=10)
    assert bad.returncode == 2, bad

test_bind()
test_stop()
test_http()
test_resp()
test_echo()
print('servers: ok')
