"""Benchmark 7 (in-process): what one idle TLS connection costs the server, by TLS layer.

Memory per idle connection (benchmark 4) is mostly TLS, so the choice of
TLS layer on the client port is measured apart, with nothing else around
it: N connections are set up in a child process (a full TLS 1.3 handshake
with a node certificate of the cluster CA, one line each way), the client
ends are freed, and what the server ends still hold is the growth of
glibc's allocated bytes (``mallinfo2``) divided by N. Three layers, in the
same run:

- ``paxchat``: what the client port runs (``paxchat.clienttls``), an
  ``ssl.SSLSocket`` over the connected socket (a socketpair here);
- ``memory BIOs``: ``ssl.SSLObject`` over two ``ssl.MemoryBIO``, what the
  client port ran before (a BIO keeps a buffer as large as the most it ever
  held);
- ``pyOpenSSL``: ``OpenSSL.SSL.Connection`` over memory BIOs with Twisted's
  ``CertificateOptions`` context, the core of Twisted's own TLS layer.

``vs_memory_bios`` and ``vs_pyopenssl`` are the peer's bytes over ours:
above 1, paxchat's layer is smaller. ``python -m bench.tlsmemory LAYER N`` runs one measurement and
prints it as JSON (that is the child).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import socket
import ssl
import subprocess
import sys
import tempfile

from twisted.internet import threads

NAME = "tlsmemory"
LAYERS = ("paxchat", "memory BIOs", "pyOpenSSL")


def sizes(tiny):
    return {"connections": 50 if tiny else 2000}


async def run(reactor, ctx):
    if not ctx.with_paxchat:
        return
    count = sizes(ctx.tiny)["connections"]
    ctx.say(f"[{NAME}] etcd    not compared: the peers are other TLS layers (vs_* on the paxchat line)")
    directory = ctx.workdir(NAME)
    kib, openssl = {}, {}
    for layer in LAYERS:
        measured = await threads.deferToThread(_measure_in_child, directory, layer, count)
        kib[layer], openssl[layer] = measured["kib_per_connection"], measured["openssl"]
    ours = kib["paxchat"]
    ctx.record(NAME, "paxchat", f"{count} idle server connections, TLS 1.3",
               kib_per_connection=ours, memory_bios_kib=kib["memory BIOs"],
               pyopenssl_kib=kib["pyOpenSSL"],
               vs_memory_bios=kib["memory BIOs"] / ours if ours > 0 else None,
               vs_pyopenssl=kib["pyOpenSSL"] / ours if ours > 0 else None,
               openssl=openssl["paxchat"], pyopenssl_openssl=openssl["pyOpenSSL"])


def _measure_in_child(directory, layer, count):
    os.makedirs(directory, exist_ok=True)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # -m finds bench there
    done = subprocess.run([sys.executable, "-m", "bench.tlsmemory", layer, str(count), directory],
                          cwd=root, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"measuring {layer} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the child ------------------------------------------------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def _allocated():
    """Bytes glibc has handed out and not taken back (small and mmapped blocks)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def _certificates(directory):
    """A node certificate of a fresh cluster CA, made the way ``paxchat-certs`` makes them."""
    from paxchat import config as configmod
    from paxchat import tls
    ini = os.path.join(directory, "cluster.ini")
    with open(ini, "w") as f:
        f.write("[cluster]\n[node.1]\nclient = 127.0.0.1:1\npeer = 127.0.0.1:2\n")
    config = configmod.load(ini)
    tls.make_cluster_certs(config)
    return config


def _client_context(config):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(config.ca_path))
    context.check_hostname = False
    return context


def _pump(server_step, client_step, to_client, to_server):
    """Run both ends until neither has anything to do (at most 20 rounds)."""
    for _ in range(20):
        moved = to_server() + to_client()
        done = server_step() & client_step()
        if done and not moved:
            return
    raise RuntimeError("the handshake did not finish")


def _handshake_step(obj):
    try:
        obj.do_handshake()
        return True
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return False


def _socket_layer(config):
    """Server ends as the client port keeps them: an SSLSocket over the connected socket."""
    from paxchat import tls
    server_context = tls.client_server_context(config, 1)
    client_context = _client_context(config)

    def connect():
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        server = server_context.wrap_socket(a, server_side=True, do_handshake_on_connect=False)
        client = client_context.wrap_socket(b, do_handshake_on_connect=False)
        _pump(lambda: _handshake_step(server), lambda: _handshake_step(client),
              lambda: 0, lambda: 0)
        client.send(b"hello\n")
        _read_until(server.recv, b"hello\n")
        server.send(b"ok\n")
        _read_until(client.recv, b"ok\n")
        client.close()
        return server
    return connect


def _read_until(read, expected):
    got = b""
    for _ in range(20):
        try:
            got += read(1024)
        except ssl.SSLWantReadError:
            continue
        if got == expected:
            return
    raise RuntimeError(f"expected {expected!r}, got {got!r}")


def _memory_bio_layer(config):
    """Server ends as the client port kept them before: SSLObject over two MemoryBIOs."""
    from paxchat import tls
    server_context = tls.client_server_context(config, 1)
    client_context = _client_context(config)

    def connect():
        s_in, s_out, c_in, c_out = (ssl.MemoryBIO() for _ in range(4))
        server = server_context.wrap_bio(s_in, s_out, server_side=True)
        client = client_context.wrap_bio(c_in, c_out)
        to_server = _mover(c_out.read, s_in.write)
        to_client = _mover(s_out.read, c_in.write)
        _pump(lambda: _handshake_step(server), lambda: _handshake_step(client),
              to_client, to_server)
        client.write(b"hello\n")
        to_server()
        _read_until(server.read, b"hello\n")
        server.write(b"ok\n")
        to_client()
        _read_until(client.read, b"ok\n")
        return server, s_in, s_out
    return connect


def _pyopenssl_layer(config):
    """Server ends as Twisted's TLS layer keeps them: an OpenSSL.SSL.Connection, memory BIOs."""
    from OpenSSL import SSL
    from twisted.internet import ssl as twisted_ssl

    from paxchat import tls
    certificate = tls.load_node_certificate(config, 1)
    server_context = twisted_ssl.CertificateOptions(
        privateKey=certificate.privateKey.original,
        certificate=certificate.original).getContext()
    client_context = _client_context(config)

    def connect():
        server = SSL.Connection(server_context, None)
        server.set_accept_state()
        c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = client_context.wrap_bio(c_in, c_out)

        def server_step():
            try:
                server.do_handshake()
                return True
            except SSL.WantReadError:
                return False

        def to_client():
            moved = 0
            while True:
                try:
                    data = server.bio_read(65536)
                except SSL.WantReadError:
                    return moved
                c_in.write(data)
                moved += len(data)

        _pump(server_step, lambda: _handshake_step(client), to_client,
              _mover(c_out.read, server.bio_write))
        client.write(b"hello\n")
        server.bio_write(c_out.read())
        _read_until(_pyopenssl_reader(server), b"hello\n")
        server.send(b"ok\n")
        to_client()
        _read_until(client.read, b"ok\n")
        return server
    return connect


def _pyopenssl_reader(connection):
    from OpenSSL import SSL

    def read(size):
        try:
            return connection.recv(size)
        except SSL.WantReadError:
            raise ssl.SSLWantReadError() from None
    return read


def _mover(read, write):
    def move():
        data = read()
        if data:
            write(data)
        return len(data)
    return move


def child(layer, count, directory):
    from bench import procs
    procs.raise_nofile()                          # one socket per kept connection
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        config = _certificates(tmp)
        connect = {"paxchat": _socket_layer, "memory BIOs": _memory_bio_layer,
                   "pyOpenSSL": _pyopenssl_layer}[layer](config)
        warm = [connect() for _ in range(20)]     # first-use allocations out of the figure
        gc.collect()
        before = _allocated()
        kept = [connect() for _ in range(count)]
        gc.collect()
        after = _allocated()
        assert len(kept) == count and warm
    return {"kib_per_connection": round((after - before) / count / 1024, 2),
            "openssl": ssl.OPENSSL_VERSION.split()[1] if layer != "pyOpenSSL" else _pyopenssl_version()}


def _pyopenssl_version():
    from OpenSSL import SSL
    return SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode().split()[1]


if __name__ == "__main__":
    print(json.dumps(child(sys.argv[1], int(sys.argv[2]), sys.argv[3])))
