#!/usr/bin/env python3
# Smoke test of the TCP proxy (concur_proxy_server): bytes both ways in front of the echo server
# (1 MB, checked), a half-close passed on, HTTP through it with curl, the idle deadline (a silent
# connection is closed; one where only the upstream talks is not, while it talks), an upstream
# reset passed on as a reset, an upstream that refuses, bad options, and a clean stop on SIGTERM
# with a connection open.
# Usage: test_proxy.py DIR_WITH_SERVERS
import os, re, signal, socket, subprocess, sys, threading, time

bindir = sys.argv[1]

def start(exe, *args):
    p = subprocess.Popen([os.path.join(bindir, exe), '--port', '0', '--loops', '2'] + list(args),
                         stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    m = re.search(r' ([\d.]+):(\d+) with', line)
    assert m, '%s did not say where it listens: %r' % (exe, line)
    return p, m.group(1), int(m.group(2))

def stop(p):
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=10) == 0
    assert 'stopped' in p.stdout.read()

def proxy(upstream_port, *args):
    return start('concur_proxy_server', '--upstream', '127.0.0.1:%d' % upstream_port, *args)

def read_all(s, timeout=10):
    s.settimeout(timeout)
    d = b''
    while True:
        c = s.recv(65536)
        if not c:
            return d
        d += c

def test_echo_and_half_close():
    up, _, up_port = start('concur_echo_server')
    px, host, port = proxy(up_port)
    try:
        assert host == '127.0.0.1'  # --bind's default
        s = socket.create_connection(('127.0.0.1', port))
        data = bytes(range(256)) * 4096  # 1 MiB: many recv/send rounds each way
        t = threading.Thread(target=s.sendall, args=(data,))
        t.start()
        got = b''
        s.settimeout(10)
        while len(got) < len(data):
            c = s.recv(65536)
            assert c, 'EOF after %d bytes' % len(got)
            got += c
        t.join()
        assert got == data
        s.sendall(b'tail')
        s.shutdown(socket.SHUT_WR)  # passed on: the echo server ends, the proxy ends the rest
        assert read_all(s) == b'tail'
        s.close()
    finally:
        stop(px)
        stop(up)

def test_http():
    up, _, up_port = start('concur_http_server')
    px, _, port = proxy(up_port)
    try:
        for _ in range(2):
            out = subprocess.run(['curl', '-s', '-i', 'http://127.0.0.1:%d/plaintext' % port],
                                 capture_output=True, timeout=10).stdout
            assert out.startswith(b'HTTP/1.1 200 OK') and out.endswith(b'Hello, World!'), out
        s = socket.create_connection(('127.0.0.1', port))  # still open at the stop
        s.sendall(b'GET /plaintext HTTP/1.1\r\nHost: x\r\n\r\n')
        s.settimeout(10)
        assert b'Hello, World!' in s.recv(4096)
    finally:
        stop(px)  # drains for up to 2 s, then cancels the open connection
        stop(up)

def talker():
    """An upstream that, once told b's', sends a byte every 100 ms for 1.2 s, then stays silent."""
    ls = socket.socket()
    ls.bind(('127.0.0.1', 0))
    ls.listen(8)

    def one(c):
        try:
            if c.recv(1) == b's':
                for _ in range(12):
                    c.sendall(b'x')
                    time.sleep(0.1)
            time.sleep(30)
        except OSError:
            pass

    def serve():
        while True:
            c, _ = ls.accept()
            threading.Thread(target=one, args=(c,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return ls.getsockname()[1]

def test_idle():
    px, _, port = proxy(talker(), '--idle-ms', '1500')  # 15x the talker's gaps: load-proof
    try:
        s = socket.create_connection(('127.0.0.1', port))
        s.sendall(b'q')  # then nothing either way: closed after the idle time
        assert read_all(s) == b''
        s = socket.create_connection(('127.0.0.1', port))
        t0 = time.monotonic()
        s.sendall(b's')  # only the upstream talks, for 1.2 s: not idle meanwhile
        assert read_all(s) == b'x' * 12
        assert time.monotonic() - t0 >= 1.1
    finally:
        stop(px)

def resetter():
    """An upstream that sends b'partial', and resets the connection once told b'r'."""
    ls = socket.socket()
    ls.bind(('127.0.0.1', 0))
    ls.listen(8)

    def serve():
        c, _ = ls.accept()
        c.sendall(b'partial')
        if c.recv(1) == b'r':
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b'\x01\0\0\0\0\0\0\0')
        c.close()

    threading.Thread(target=serve, daemon=True).start()
    return ls.getsockname()[1]

def test_upstream_reset():
    # An upstream that resets mid-answer: the client gets a reset too, not a clean EOF that
    # would pass the cut answer off as a whole one.
    px, _, port = proxy(resetter())
    try:
        s = socket.create_connection(('127.0.0.1', port))
        s.settimeout(10)
        got = b''
        while len(got) < 7:
            c = s.recv(7 - len(got))
            assert c, 'EOF after %r' % got
            got += c
        assert got == b'partial'
        s.sendall(b'r')
        try:
            tail = s.recv(1)
        except ConnectionResetError:
            tail = None
        assert tail is None, 'a clean end of stream (%r), not a reset' % tail
    finally:
        stop(px)

def test_refused_and_options():
    ls = socket.socket()
    ls.bind(('127.0.0.1', 0))
    dead = ls.getsockname()[1]
    ls.close()  # nothing listens there
    px, _, port = proxy(dead)
    try:
        s = socket.create_connection(('127.0.0.1', port))
        assert read_all(s) == b''
    finally:
        stop(px)
    exe = os.path.join(bindir, 'concur_proxy_server')
    for bad in (['--upstream', 'nohost'], ['--upstream', '127.0.0.1:0'], ['--bind', 'x'],
                ['--idle-ms', '-1'], ['--port'], ['--what', '1']):
        r = subprocess.run([exe] + bad, capture_output=True, timeout=10)
        assert r.returncode == 2, (bad, r.returncode)

test_echo_and_half_close()
test_http()
test_idle()
test_upstream_reset()
test_refused_and_options()
print('proxy: ok')
