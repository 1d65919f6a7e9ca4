"""The operator's channel: each node's ``admin`` listener and ``paxchat-admin``.

A node with ``[node.N] admin = host:port`` serves a small JSON-over-HTTPS
API there, over mutual TLS with the cluster CA. Only a certificate whose
unit is ``paxchat admin`` may use it (``paxchat-certs --admin`` makes one);
a node's own certificate is refused, so a stolen node key cannot steer
the cluster from this port. Every action is logged with the operator's name.

    GET  /status                  the node's status (as ``metrics.node_status``)
    GET  /backup                  a consistent copy of the node's state (a snapshot)
    POST /snapshot                snapshot the state and compact the log now
    POST /transfer-leadership     {"target": N}: the leader hands over to N

``paxchat-admin --config cluster.ini status|snapshot N|transfer-leadership N|backup FILE``
talks to every node's admin address (blocking sockets; no reactor needed).
``paxchat-admin restore FILE|DIR --node N`` needs no node: it makes a stopped
node's data directory from a backup (a file, or a copy of a stopped node's
data directory), on that node's machine. ``paxchat-admin rebuild --node N``
needs none either: it marks a node's new, empty data directory (its disk
was lost) so that the node rebuilds from its peers while they keep serving
(paxchat/lineage.py).
"""

import argparse
import concurrent.futures
import contextlib
import functools
import hashlib
import http.client
import json
import os
import shutil
import socket
import ssl
import sys
import time
from pathlib import Path

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IPullProducer
from twisted.logger import Logger
from twisted.web import resource, server
from zope.interface import implementer

from paxchat import closedpipe, tls
from paxchat import config as configmod
from paxchat.httpsite import listen_http
from paxchat.lineage import IDENTITY_FILE, LINEAGE_FILE, MEMBERS_FILE, PEER_IDENTITIES_FILE
from paxchat.metrics import node_status

__all__ = ["AdminResource", "AdminService", "AdminError", "CertificateProblem", "main"]

log = Logger()

MAX_BODY_BYTES = 4096
# A node reads its whole state before the first byte of a backup goes out.
BACKUP_TIMEOUT = 300.0
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


# -- the node's side ------------------------------------------------------------

class _Refusal(Exception):
    def __init__(self, code, error, message, **extra):
        super().__init__(message)
        self.code, self.error, self.extra = code, error, extra


def _operator(request):
    """The admin name of the verified client certificate, or None."""
    transport = getattr(request.channel, "transport", None)
    get = getattr(transport, "getPeerCertificate", None)
    try:
        return tls.admin_name_of(get() if get is not None else None)
    except Exception:
        return None


class _Pieces:
    """An answer of ``size`` bytes sent as these pieces (bytes, or Deferreds firing
    with bytes), one at a time as the connection takes them, so a large one is
    never held whole in memory."""

    def __init__(self, pieces, size):
        self.pieces = pieces
        self.size = size


@implementer(IPullProducer)
class _PiecesProducer:
    def __init__(self, request, pieces):
        self._request = request
        self._pieces = iter(pieces)
        self._waiting = False            # a piece being read: the connection waits for it

    def resumeProducing(self):
        request = self._request
        if request is None or self._waiting:
            return
        piece = next(self._pieces, None)
        if piece is None:
            self._request = None
            request.unregisterProducer()
            request.finish()
            return
        if isinstance(piece, defer.Deferred):
            self._waiting = True
            piece.addCallbacks(self._write, self._failed)
        else:
            self._write(piece)

    def _write(self, piece):
        self._waiting = False
        if self._request is not None:
            self._request.write(bytes(piece))    # the connection asks for the next when sent

    def _failed(self, failure):
        request, self._request = self._request, None
        log.failure("reading a backup failed; its connection is closed", failure)
        if request is not None:
            request.unregisterProducer()
            request.loseConnection()             # short of its length: the client sees it

    def stopProducing(self):
        self._request = None            # the client went away; the pieces are let go
        self._pieces = iter(())


class AdminResource(resource.Resource):
    """The admin API of one node (see the module docstring)."""

    isLeaf = True

    def __init__(self, node):
        super().__init__()
        self.node = node

    def render(self, request):
        operator = _operator(request)
        route = (request.method, request.path.rstrip(b"/") or b"/")
        try:
            if operator is None:
                raise _Refusal(403, "forbidden", "an admin certificate of the cluster CA is needed "
                               "(paxchat-certs --admin makes one)")
            handler = {(b"GET", b"/status"): self.status,
                       (b"GET", b"/backup"): self.backup,
                       (b"POST", b"/snapshot"): self.snapshot,
                       (b"POST", b"/transfer-leadership"): self.transfer}.get(route)
            if handler is None:
                raise _Refusal(404, "not_found", "no such admin call: GET /status, GET /backup, "
                               "POST /snapshot, POST /transfer-leadership")
            result = handler(request, operator)
        except _Refusal as refusal:
            return self._refuse(request, refusal)
        except Exception:
            log.failure("admin call {path} failed", path=route[1].decode("ascii", "replace"))
            return self._refuse(request, _Refusal(500, "internal", "internal error; it is logged"))
        if not isinstance(result, defer.Deferred):
            return self._json(request, 200, result)

        def answered(value):
            if not request.finished and not getattr(request, "_disconnected", False):
                if isinstance(value, _Pieces):
                    request.setResponseCode(200)
                    request.setHeader(b"content-type", b"application/octet-stream")
                    request.setHeader(b"content-length", str(value.size).encode())
                    request.registerProducer(_PiecesProducer(request, value.pieces), False)
                    return
                request.write(self._json(request, 200, value))
                request.finish()

        def failed(failure):
            if failure.check(_Refusal):
                body = self._refuse(request, failure.value)
            else:
                log.failure("admin call {path} failed", failure,
                            path=route[1].decode("ascii", "replace"))
                body = self._refuse(request, _Refusal(500, "internal", failure.getErrorMessage()))
            if not request.finished and not getattr(request, "_disconnected", False):
                request.write(body)
                request.finish()

        result.addCallbacks(answered, failed)
        return server.NOT_DONE_YET

    @staticmethod
    def _json(request, code, value):
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(value, default=str).encode("utf-8") + b"\n"

    def _refuse(self, request, refusal):
        body = {"error": refusal.error, "message": str(refusal), **refusal.extra}
        return self._json(request, refusal.code, body)

    def _log_ready(self):
        log_ = self.node.log
        if log_ is None:
            raise _Refusal(503, "unavailable", f"node {self.node.node_id} is not running")
        return log_

    def status(self, request, operator):
        return node_status(self.node)

    def backup(self, request, operator):
        """The state as one snapshot, read in one read transaction beside the
        apply worker, so applies go on meanwhile, into a file (kv.SnapshotFile)
        that is sent 1 MiB at a time, each piece read beside the worker as the
        connection takes the one before."""
        self._log_ready()
        worker = getattr(self.node, "worker", None)
        if worker is None:
            raise _Refusal(503, "unavailable", f"node {self.node.node_id} is not running")
        log.info("admin {operator} took a backup of node {node}'s state", operator=operator,
                 node=self.node.node_id)
        d = worker.call("snapshot")
        d.addCallback(lambda taken: worker.call_aside(taken[1].as_file))

        def pieces(snapshot, step=1 << 20):
            reads = (worker.call_aside(snapshot[at:at + step].read)
                     for at in range(0, len(snapshot), step))
            return _Pieces(reads, len(snapshot))
        return d.addCallback(pieces)

    def snapshot(self, request, operator):
        take = getattr(self._log_ready(), "snapshot_now", None)
        if take is None:
            raise _Refusal(501, "not_supported", f"node {self.node.node_id}'s command log "
                           "cannot take a snapshot on demand (it has no snapshot_now)")
        log.info("admin {operator} asked node {node} for a snapshot now", operator=operator,
                 node=self.node.node_id)
        return defer.maybeDeferred(take).addCallback(lambda index: {"snapshot_index": index})

    def transfer(self, request, operator):
        try:
            body = json.loads(request.content.read(MAX_BODY_BYTES + 1) or b"{}")
        except ValueError:
            raise _Refusal(400, "invalid_request", "the body must be JSON: {\"target\": N}")
        target = body.get("target") if isinstance(body, dict) else None
        if type(target) is not int or target not in self.node.config.nodes:
            raise _Refusal(400, "invalid_request",
                           f"target must be a node id of the cluster, not {target!r}")
        if target == self.node.node_id:
            raise _Refusal(400, "invalid_request", f"node {target} cannot hand over to itself")
        transfer = getattr(self._log_ready(), "transfer_leadership", None)
        if transfer is None:
            raise _Refusal(501, "not_supported", f"node {self.node.node_id}'s command log has no "
                           "leadership to transfer (it is not replicated)")
        log.info("admin {operator} asked node {node} to hand leadership to node {target}",
                 operator=operator, node=self.node.node_id, target=target)
        try:
            transfer(target)
        except ValueError as e:
            raise _Refusal(400, "invalid_request", str(e)) from None
        except Exception as e:
            if type(e).__name__ == "CannotTransfer":
                raise _Refusal(409, "cannot_transfer",
                               f"{e}; node {self.node.node_id} keeps leading") from None
            if type(e).__name__ != "NotLeader":
                raise
            hint = getattr(e, "leader_hint", None)
            raise _Refusal(409, "not_leader", f"node {self.node.node_id} does not lead"
                           + (f"; node {hint} does" if hint else ""), leader=hint) from None
        return {"transferring_to": target}


class AdminService(service.Service):
    """Listens on the node's ``admin`` address (mutual TLS) when it is set."""

    name = "admin"

    def __init__(self, node):
        self.node = node
        self.port = None

    @property
    def address(self):
        return self.node.node.admin

    def startService(self):
        if self.address is not None:
            options = tls.admin_server_options(self.node.config, self.node.node_id)
            self.port = listen_http(self.node.reactor, self.address, AdminResource(self.node),
                                    context_factory=options)
            log.info("node {node} serving the admin API on https://{address}/ (mutual TLS)",
                     node=self.node.node_id, address=str(self.address))
        super().startService()

    def stopService(self):
        super().stopService()
        port, self.port = self.port, None
        if port is not None:
            return port.stopListening()
        return None


# -- paxchat-admin ------------------------------------------------------------------

class AdminError(Exception):
    """A node refused or could not be reached; the message says which and why."""

    def __init__(self, message, code=None, body=None):
        super().__init__(message)
        self.code = code
        self.body = body or {}


class CertificateRefusal:
    """Why one node could not be asked: TLS refused its certificate against our ca.pem, or
    it refused the admin certificate (``ours``). ``where``, ``problem``, ``detail`` and
    ``advice`` are as the client's (paxchat.tls.ClientCA.refusal)."""

    def __init__(self, node_id, where, problem, detail, advice, ours=False, cert=None):
        self.node_id, self.where, self.problem = node_id, where, problem
        self.detail, self.advice, self.ours, self.cert = detail, advice, ours, cert


class CertificateProblem(AdminError):
    """Nodes that are up could not be asked because of certificates: a wrong ca.pem or
    admin certificate here, or a node's certificate that expired or is another's. No
    retry mends it, and the node is not down: the message says which file and what to do."""

    def __init__(self, refusals, code=None, body=None):
        self.refusals = list(refusals)
        super().__init__(describe_refusals(self.refusals), code, body)


def describe_refusals(refusals) -> str:
    """The sentences for certificate refusals, nodes with the same fault together, as
    the paxchat CLI says them (paxchat.client.explain)."""
    from paxchat.client.errors import UntrustedNodes
    from paxchat.client.explain import explain
    sentences = []
    theirs = [r for r in refusals if not r.ours]
    if theirs:
        sentences.append(explain(UntrustedNodes(
            [(r.where, r.problem, r.detail) for r in theirs],
            "; ".join(dict.fromkeys(r.advice for r in theirs if r.advice)))))
    ours = [r for r in refusals if r.ours]
    for cert in dict.fromkeys(r.cert for r in ours):
        same = [r for r in ours if r.cert == cert]
        summary = UntrustedNodes([(r.where, r.problem, r.detail) for r in same]).summary()
        advice = "; ".join(dict.fromkeys(r.advice for r in same if r.advice))
        sentences.append(f"The admin certificate {cert} was refused: {summary}."
                         + (f" To fix it: {advice}." if advice else ""))
    return " ".join(sentences)


# What OpenSSL reports when the node refused the certificate we presented.
_REFUSED_OURS = frozenset({
    "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE", "SSLV3_ALERT_CERTIFICATE_EXPIRED",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN", "SSLV3_ALERT_CERTIFICATE_REVOKED",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE", "TLSV13_ALERT_CERTIFICATE_REQUIRED",
})
# A connection ended under a request, before any answer: perhaps the node's
# refusal of our certificate, its alert lost in a reset.
_CUT_SHORT = (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected)
# X509_V_ERR_HOSTNAME_MISMATCH: signed by our CA, but not the node we asked for.
_HOSTNAME_MISMATCH = 62


def _load_admin_certificate(context, config, cert, key):
    """The operator's certificate and key into ``context``; a
    CertificateFilesError (exit 2) names the file that is wrong."""
    how = f"run `paxchat-certs --config {config.path} --admin` to make them"
    for path in (cert, key):
        try:
            open(path, "rb").close()
        except OSError as e:
            raise tls.CertificateFilesError(
                f"cannot read the admin certificate file {path} ({e.strerror or e}); {how}") from None
    try:
        context.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise tls.CertificateFilesError(f"{key} is not the key of {cert}; {how}") from None
        raise tls.CertificateFilesError(
            f"{cert} and {key} are not a PEM certificate and its unencrypted key; {how}") from None


class AdminClient:
    """Blocking calls to the nodes' admin listeners with the operator's certificate."""

    def __init__(self, config, cert=None, key=None, timeout=5.0):
        self.config = config
        self.timeout = timeout
        cert = cert or tls.admin_cert_path(config)
        key = key or tls.admin_key_path(config)
        self.cert, self.key = Path(cert), Path(key)
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                                 cafile=str(config.ca_path))
        except ssl.SSLError:
            raise tls.CertificateFilesError(
                f"{config.ca_path} holds no PEM certificate; "
                f"{tls.how_to_fix(config.ca_path, config)}") from None
        except OSError as e:
            raise tls.CertificateFilesError(
                f"cannot read the cluster CA certificate {config.ca_path} ({e.strerror or e}); "
                f"{tls.how_to_fix(config.ca_path, config)}") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        _load_admin_certificate(context, config, cert, key)
        self.context = context

    def address(self, node_id):
        node = self.config.node(node_id)
        if node.admin is None:
            raise AdminError(f"node {node_id} has no admin address in {self.config.path} "
                             f"([node.{node_id}] admin = host:port)")
        host = node.admin.host
        if host in _WILDCARD_HOSTS:
            host = node.client.host if node.client.host not in _WILDCARD_HOSTS else "127.0.0.1"
        return host, node.admin.port

    def call(self, node_id, method, path, body=None):
        """The JSON answer of one call; L{AdminError} for a refusal or an unreachable node."""
        return self._exchange(node_id, method, path, body, None)

    def download(self, node_id, path, sink, timeout=None):
        """GET ``path`` and write its body to the binary file ``sink``; the byte count.

        ``timeout``: how long the node may take to answer, if not ``self.timeout``."""
        return self._exchange(node_id, "GET", path, None, sink, timeout)

    def _exchange(self, node_id, method, path, body, sink, timeout=None):
        timeout = self.timeout if timeout is None else timeout
        host, port = self.address(node_id)
        where = f"node {node_id} ({host}:{port})"
        try:
            raw = socket.create_connection((host, port), timeout=self.timeout)
            raw.settimeout(timeout)
        except OSError as e:
            raise AdminError(f"{where} is down: {e.strerror or e}") from None
        try:
            sock = self.context.wrap_socket(raw, server_hostname=tls.node_name(node_id))
        except ssl.SSLCertVerificationError as e:
            raw.close()
            raise self._untrusted(node_id, host, port, where, e) from None
        except (OSError, ssl.SSLError) as e:
            raw.close()
            if getattr(e, "reason", None) in _REFUSED_OURS:
                raise self._refused(node_id, where, e.reason) from None
            raise AdminError(f"{where}: TLS failed: {e}") from None
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
        connection.sock = sock
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if data is not None else {}
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
            status = response.status
            if status == 200 and sink is not None:
                written = 0
                while chunk := response.read(1 << 20):
                    sink.write(chunk)
                    written += len(chunk)
                return written
            text = response.read(1 << 20)
        except (OSError, http.client.HTTPException) as e:
            # Under TLS 1.3 the node judges the admin certificate after our side of the
            # handshake is done: its refusal arrives as the first read, or is lost
            # when the node closes on the request it did not read (a reset).
            alert = getattr(e, "reason", None)
            if alert not in _REFUSED_OURS and isinstance(e, _CUT_SHORT):
                alert = self._refusal_alert(node_id, host, port)
            if alert in _REFUSED_OURS:
                raise self._refused(node_id, where, alert) from None
            raise AdminError(f"{where}: {e}") from None
        finally:
            connection.close()
        try:
            answer = json.loads(text)
        except ValueError:
            raise AdminError(f"{where} answered {status} with no JSON") from None
        if status == 403:
            raise self._refused(node_id, where, None, status, answer)
        if status != 200:
            raise AdminError(f"{where}: {answer.get('message', status)}", status, answer)
        return answer

    def _untrusted(self, node_id, host, port, where, error):
        """TLS refused the node's certificate: say why, against our ca.pem, as the paxchat
        CLI does (paxchat.tls.ClientCA.refusal), from the certificate the node presents."""
        ca = tls.read_client_ca(self.config.ca_path)
        chain = self._presented(node_id, host, port)
        problem, detail, advice = ca.refusal(
            chain, tls.node_name(node_id), hostname=error.verify_code == _HOSTNAME_MISMATCH,
            detail=error.verify_message or "", renew=tls.node_certificate_renewal(self.config, node_id))
        return CertificateProblem([CertificateRefusal(node_id, where, problem, detail, advice)])

    def _refusal_alert(self, node_id, host, port):
        """The alert the node sends about the admin certificate on a connection where we
        send nothing (so nothing unread makes it reset the connection over its alert),
        or None if it sends none within a second: it took the certificate."""
        try:
            with socket.create_connection((host, port), timeout=self.timeout) as raw:
                with self.context.wrap_socket(raw, server_hostname=tls.node_name(node_id)) as sock:
                    sock.settimeout(min(self.timeout, 1.0))
                    sock.recv(1)
        except ssl.SSLError as e:
            return e.reason
        except OSError:
            return None
        return None

    def _presented(self, node_id, host, port):
        """The certificate node ``node_id`` presents, taken without checking it (only to say
        why it was refused); [] if it cannot be had. The admin certificate is not shown to
        a node we do not trust: under TLS 1.3 its certificate comes before it asks for ours."""
        from cryptography import x509
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            with socket.create_connection((host, port), timeout=self.timeout) as raw:
                with context.wrap_socket(raw, server_hostname=tls.node_name(node_id)) as sock:
                    der = sock.getpeercert(binary_form=True)
            return [x509.load_der_x509_certificate(der)] if der else []
        except (OSError, ValueError):
            return []

    def _refused(self, node_id, where, alert, code=None, body=None):
        """The node refused the admin certificate: a TLS alert, or 403 (a certificate of the
        cluster CA that is not an admin's). Say what is wrong with it against our ca.pem."""
        advice = tls.admin_certificate_renewal(self.config)
        if code == 403:
            problem, detail = "not an admin certificate (a node's own is refused there)", ""
            advice = ("give paxchat-admin the admin certificate, not a node's: admin.pem and admin.key,"
                      f" which `paxchat-certs --config {self.config.path} --admin` makes where the"
                      f" cluster's {self.config.ca_key_path.name} is kept")
        else:
            from cryptography import x509
            try:
                leaf = [x509.load_pem_x509_certificate(self.cert.read_bytes())]
            except (OSError, ValueError):
                leaf = []
            ca = tls.read_client_ca(self.config.ca_path)
            problem, detail, _ = ca.refusal(leaf, "", detail=f"TLS alert: {alert}")
        refusal = CertificateRefusal(node_id, where, problem, detail, advice, ours=True,
                                     cert=self.cert)
        return CertificateProblem([refusal], code, body)

    def statuses(self):
        """{node id: status dict | AdminError}, asking every node at once."""
        ids = list(self.config.nodes)
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(ids))) as pool:
            futures = {n: pool.submit(self.call, n, "GET", "/status") for n in ids}
        results = {}
        for n, future in futures.items():
            try:
                results[n] = future.result()
            except AdminError as e:
                results[n] = e
        return results


def _show(value, default="-"):
    return default if value is None else str(value)


def _ballot(ballot):
    """A ballot as ``round.node`` (5.1), as the status table shows it."""
    return ".".join(str(b) for b in ballot) if isinstance(ballot, list) else ballot


def status_table(statuses):
    """The ``status`` table: one row per node, then the reasons of the nodes that are down,
    of the peers refused for their data (paxchat/lineage.py), and of client connections
    a node sent away."""
    up = {n: s for n, s in statuses.items() if not isinstance(s, Exception)}
    reference = max([s.get("commit_index") or 0 for s in up.values()]
                    + [s.get("applied_index") or 0 for s in up.values()] or [0])
    header = ["NODE", "STATE", "ROLE", "LEADER", "BALLOT", "COMMIT", "APPLIED", "LAG",
              "CLIENTS", "PEERS"]
    rows = [header]
    notes = []
    refusals = []
    for n, s in sorted(statuses.items()):
        if isinstance(s, Exception):
            # A node that answered with a refusal (a certificate that is no
            # admin's), or whose own certificate TLS refused, is up: saying
            # "down" would send the operator the wrong way.
            rows.append([str(n), _error_state(s)] + ["-"] * (len(header) - 2))
            if isinstance(s, CertificateProblem):
                refusals += s.refusals
            else:
                notes.append(f"node {n}: {s}")
            continue
        # The ballot of the leader in LEADER, as the node knows it from its
        # heartbeats: the same on every node that follows it, at once after a
        # restart. A node of an earlier build gives only its promise.
        ballot = _ballot(s["leader_ballot"] if "leader_ballot" in s else s.get("ballot"))
        applied = s.get("applied_index")
        lag = reference - applied if isinstance(applied, int) else None
        peers = s.get("peers") or {}
        connected = sum(1 for v in peers.values() if v == "connected")
        for peer, why in sorted((s.get("refused_peers") or {}).items()):
            notes.append(f"node {n} refuses node {peer}: {why}")
        for peer, why in sorted((s.get("refused_by_peers") or {}).items()):
            notes.append(f"node {n} is refused by node {peer}: {why}")
        rebuilding = s.get("rebuilding")
        if rebuilding:
            notes.append(f"node {n} rebuilds on new data and votes for nothing yet: "
                         + _rebuild_note(rebuilding))
        # Why clients may not get in: counted since the node started.
        if s.get("clients_turned_away"):
            notes.append(f"node {n} turned away {s['clients_turned_away']} client connections"
                         " since it started: it held max_clients")
        if s.get("clients_refused"):
            notes.append(f"node {n} closed {s['clients_refused']} new client connections since it"
                         " started: they came faster than connections_per_address from one address")
        rows.append([str(n), "up" if s.get("running", True) else "stopping",
                     "rebuilding" if rebuilding else _show(s.get("role")),
                     _show(s.get("leader")), _show(ballot),
                     _show(s.get("commit_index")), _show(applied), _show(lag),
                     _show(s.get("clients")), f"{connected}/{len(peers)}" if peers else "-"])
    if refusals:
        notes.append(describe_refusals(refusals))
    notes += _apply_version_notes(up)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines + notes)


def _rebuild_note(rebuilding):
    waiting = rebuilding.get("waiting_for") or []
    if waiting:
        return ("waiting for " + ", ".join(f"node {p}" for p in waiting)
                + " to answer (every other node must)")
    upto = rebuilding.get("catch_up_to")
    if upto is None:
        return "starting"
    return f"catching up to index {upto}, then it votes"


def _apply_version_notes(up):
    """A line while the nodes' builds and the cluster's apply version differ (an upgrade
    under way, see paxchat/upgrades.py); none once they agree."""
    versions = {n: s.get("apply_version") for n, s in up.items()}
    versions = {n: v for n, v in versions.items() if isinstance(v, dict)}
    builds = {n: v.get("build") for n, v in versions.items()}
    known = [v["cluster"] for v in versions.values() if isinstance(v.get("cluster"), int)]
    if not builds:
        return []
    cluster = max(known) if known else None
    if len(set(builds.values())) == 1 and cluster == next(iter(builds.values())):
        return []
    runs = ", ".join(f"node {n} {b}" for n, b in sorted(builds.items()))
    return [f"apply version: the cluster's is {_show(cluster, 'not known yet')}; the nodes'"
            f" builds know {runs}. It rises once every node runs a build that knows a higher"
            " one and is linked to the leader."]


def _refused_us(error):
    """The node answered, refusing our certificate (not an admin's): it is up."""
    if isinstance(error, CertificateProblem):
        return all(r.ours for r in error.refusals)
    return getattr(error, "code", None) == 403


def _error_state(error):
    """The STATE of a node that could not be asked: ``refused`` (it refused the admin
    certificate), ``untrusted`` (TLS refused its certificate) or ``down``."""
    if _refused_us(error):
        return "refused"
    return "untrusted" if isinstance(error, CertificateProblem) else "down"


def _answering(statuses):
    """The statuses of the nodes that answered. When none did and certificates are why
    (the nodes refused, or were refused, rather than down), that CertificateProblem (exit
    2): a wrong ca.pem or admin certificate here is the usual cause, not nodes that are down."""
    up = {n: s for n, s in statuses.items() if not isinstance(s, Exception)}
    if not up:
        refusals = [r for e in statuses.values() if isinstance(e, CertificateProblem) for r in e.refusals]
        if refusals:
            raise CertificateProblem(refusals)
    return up


def _leader(statuses):
    for n, s in statuses.items():
        if not isinstance(s, Exception) and s.get("role") == "leader":
            return n
    named = [s.get("leader") for s in statuses.values() if not isinstance(s, Exception)]
    named = [n for n in named if n is not None]
    return max(set(named), key=named.count) if named else None


def _status(client, args, out):
    statuses = client.statuses()
    if args.json:
        print(json.dumps({str(n): (s if not isinstance(s, Exception)
                                   else {_error_state(s): str(s)})
                          for n, s in statuses.items()}, indent=2, sort_keys=True), file=out)
    else:
        print(status_table(statuses), file=out)
    try:
        _answering(statuses)
    except AdminError:
        return 2          # no node could be asked, for certificates: the check itself is broken
    return 1 if _in_trouble(statuses) else 0


def _in_trouble(statuses):
    """A node down, or one whose data a peer refuses or that refuses a peer's: that node
    is shut out until the operator acts (rebuild or restore it). Peer links not up yet
    do not count: a node that has just started shows them down for a moment."""
    return any(isinstance(s, Exception) or s.get("refused_peers") or s.get("refused_by_peers")
               for s in statuses.values())


def _snapshot(client, args, out):
    client.config.node(args.node, asked_as=f"snapshot {args.node}")
    answer = client.call(args.node, "POST", "/snapshot", {})
    print(f"node {args.node} took a snapshot at index {answer.get('snapshot_index')}", file=out)
    return 0


def _backup(client, args, out):
    """Write a consistent copy of a node's state to FILE (the most current node by default)."""
    from paxchat.state.kv import SnapshotError, check_snapshot, file_chunks
    node = args.node
    if node is None:
        up = _answering(client.statuses())
        if not up:
            raise AdminError("no node answers; there is nothing to back up")
        node = max(sorted(up), key=lambda n: up[n].get("applied_index") or 0)
    target = Path(args.file)
    if target.is_dir():
        raise AdminError(f"{target} is a directory; name the file to write")
    part = target.with_name(target.name + ".part")
    try:
        # Private from its first byte, as a node's data: it holds every message
        # and password hash. A stale .part may have any mode, so it goes first.
        part.unlink(missing_ok=True)
        with open(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as sink:
            size = client.download(node, "/backup", sink,
                                   BACKUP_TIMEOUT if args.timeout is None else args.timeout)
            sink.flush()
            os.fsync(sink.fileno())
        # Read back from the disk: what is checked is what was kept.
        index = check_snapshot(file_chunks(part))
        os.replace(part, target)
    except BaseException as e:
        part.unlink(missing_ok=True)
        if isinstance(e, SnapshotError):
            raise AdminError(f"node {node} sent a backup that does not check out: {e}") from None
        if isinstance(e, OSError):
            raise AdminError(f"cannot write {e.filename or target}: {e.strerror or e}") from None
        raise
    print(f"backup of node {node}'s state at index {index} ({size} bytes) written to {target}",
          file=out)
    return 0


def _restore(config, args, out):
    """Make a stopped node's (empty) data directory hold a backup: a file, or a stopped
    node's data directory copied whole."""
    from paxchat.lineage import describe
    node = args.node
    config.node(node)
    directory = config.node_data_dir(node)
    source = Path(args.file)
    try:
        from_directory = source.is_dir()
        occupied = directory.exists() and (not directory.is_dir() or any(directory.iterdir()))
    except OSError as e:
        raise AdminError(f"cannot look into {e.filename}: {e.strerror or e}") from None
    if occupied:
        raise AdminError(f"node {node}'s data directory {directory} is not empty; stop the node "
                         "and move the directory aside first (a restore never overwrites)")
    if from_directory:
        what, lineage = _restore_directory(config, source, directory)
    else:
        what, lineage = _restore_file(config, source, directory)
    print(f"node {node}'s data directory {directory} holds {what}, {describe(lineage)}; start "
          "the node once every node is restored from this same backup (a node restored from "
          "another is refused by it)", file=out)
    return 0


def _rebuild(config, args, out):
    """Mark node N's new, empty data directory: it rebuilds from the running others."""
    from paxchat.lineage import mark_rebuilding, write_members
    node = args.node
    config.node(node)
    if len(config.nodes) < 2:
        raise AdminError("a cluster of one node cannot rebuild it: no other node holds what it"
                         " lost; restore it from a backup instead")
    directory = config.node_data_dir(node)
    try:
        occupied = directory.exists() and (not directory.is_dir() or any(directory.iterdir()))
        if occupied:
            raise AdminError(f"node {node}'s data directory {directory} is not empty; a rebuild is"
                             " for a node whose data is gone (stop it and move the directory aside"
                             " first, if that is so)")
        config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.mkdir(mode=0o700, exist_ok=True)
        write_members(directory, config.nodes)
        mark_rebuilding(directory)
    except OSError as e:
        raise AdminError(f"cannot make {e.filename or directory}: {e.strerror or e}") from None
    print(f"node {node}'s data directory {directory} is marked to rebuild; start the node: it "
          "copies the state from the others and votes again once every other node has answered "
          "(paxchat-admin status shows it meanwhile)", file=out)
    return 0


def _restore_file(config, source, directory):
    """A backup file: the state at its index, and a Paxos log that starts after it."""
    from paxchat.node import STATE_FILE
    from paxchat.paxos import messages as M
    from paxchat.paxos.store import StorageError, rewrite_log
    from paxchat.state.chat import ChatState
    from paxchat.state.kv import SnapshotError, StoreError, check_snapshot, file_chunks
    digest = hashlib.sha256()

    def hashed():
        for chunk in file_chunks(source):
            digest.update(chunk)
            yield chunk
    try:
        index = check_snapshot(hashed())
    except OSError as e:
        raise AdminError(f"cannot read {source}: {e.strerror or e}") from None
    except SnapshotError as e:
        raise AdminError(f"{source} is not a paxchat backup: {e}") from None
    lineage = digest.hexdigest().encode("ascii")

    def make():
        state = ChatState.open(str(directory / STATE_FILE))
        try:
            state.restore(index, file_chunks(source))
        finally:
            state.close()
        # The log starts after the backup's index, as after a compaction there.
        rewrite_log(str(directory / "paxos"), [M.encode(M.CompactRecord(index))])
    _make_data_directory(config, directory, make, lineage,
                         (SnapshotError, StoreError, StorageError))
    return f"the backup's state at index {index}", lineage


# Not part of a copied data directory's content: the lock, the stamp and
# identities (a restored node is a new one to its peers, paxchat/lineage.py),
# the members (those of the cluster.ini the restore runs with), the
# wal-index (SQLite rebuilds it), files left half written.
_NOT_COPIED = ("lock", LINEAGE_FILE, IDENTITY_FILE, PEER_IDENTITIES_FILE, MEMBERS_FILE,
               "state.sqlite3-shm")


def _restore_directory(config, source, directory):
    """A stopped node's data directory copied whole (its state and its Paxos log), then
    checked where it now is: a damaged copy is refused and nothing is kept. A source
    whose node runs (its log's lock is held) is refused: its files change as they are read."""
    from paxchat.paxos.store import StorageError, locked
    with contextlib.ExitStack() as held:
        try:     # held until the copy is made: no node starts on the source meanwhile
            held.enter_context(locked(source / "paxos"))
        except StorageError:
            raise AdminError(f"{source} is in use by a running node; stop it first (a copy of "
                             "a running node's directory is not a backup)") from None
        except OSError as e:
            raise AdminError(f"cannot read {e.filename}: {e.strerror or e}") from None
        return _copy_directory(config, source, directory)


def _copy_directory(config, source, directory):
    from paxchat.node import STATE_FILE
    from paxchat.paxos.store import StorageError, recover_log
    from paxchat.state.chat import ChatState
    from paxchat.state.kv import StoreError
    try:
        files = sorted(p.relative_to(source) for p in source.rglob("*")
                       if p.is_file() and p.name not in _NOT_COPIED
                       and not p.name.endswith(".part"))
    except OSError as e:
        raise AdminError(f"cannot read {e.filename}: {e.strerror or e}") from None
    names = {str(f) for f in files}
    if STATE_FILE not in names or not any(n.startswith("paxos/") for n in names):
        raise AdminError(f"{source} is not a paxchat data directory (it has no {STATE_FILE} "
                         "and paxos/ log)")
    digest = hashlib.sha256()

    def make():
        for relative in files:
            target = directory / relative
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            with open(source / relative, "rb") as src, open(target, "wb") as dst:
                digest.update(str(relative).encode() + b"\0"
                              + os.fstat(src.fileno()).st_size.to_bytes(8, "big"))
                while chunk := src.read(1 << 20):      # a state of any size, 1 MiB at a time
                    digest.update(chunk)
                    dst.write(chunk)
                dst.flush()
                os.fsync(dst.fileno())
        recover_log(str(directory / "paxos"))
        ChatState.open(str(directory / STATE_FILE), check=True).close()
        return digest.hexdigest().encode("ascii")
    lineage = _make_data_directory(config, directory, make, None, (StoreError, StorageError))
    return f"a copy of {source}", lineage


def _make_data_directory(config, directory, make, lineage, errors):
    """Run ``make`` in a new data directory, stamp it last; on failure keep nothing."""
    from paxchat.lineage import write_lineage, write_members
    try:
        config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        directory.mkdir(mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)         # one made empty beforehand may be open to others
        made = make()
        lineage = lineage or made
        # Restoring every node is how a cluster's nodes change: the data
        # joins the cluster this cluster.ini describes.
        write_members(directory, config.nodes)
        # Last: a directory with its stamp is a complete restore. Nodes
        # restored from this backup speak to each other and to no other.
        write_lineage(directory, lineage)
        _make_private(directory)
    except (*errors, OSError) as e:
        shutil.rmtree(directory, ignore_errors=True)   # it was empty: nothing of value goes
        raise AdminError(f"restoring into {directory} failed, nothing was kept: {e}") from None
    return lineage


def _make_private(directory):
    """Directories 0700 and files 0600, as a node makes its own under systemd's UMask=0077,
    whatever this command's umask: they hold every message and password hash."""
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o700)
        for name in files:
            os.chmod(os.path.join(root, name), 0o600)


def _transfer(client, args, out):
    target = args.target
    client.config.node(target, asked_as=f"transfer-leadership {target}")
    statuses = client.statuses()
    _answering(statuses)
    if isinstance(statuses.get(target), CertificateProblem):
        raise statuses[target]       # it could not be watched taking over
    leader = _leader(statuses)
    if leader is None:
        raise AdminError("no node reports a leader; nothing to transfer")
    if leader == target:
        print(f"node {target} already leads", file=out)
        return 0
    if isinstance(statuses.get(target), dict) and statuses[target].get("rebuilding"):
        raise AdminError(f"node {target} rebuilds on new data and votes for nothing yet, so it"
                         " cannot lead; ask again once status no longer shows it rebuilding")
    client.call(leader, "POST", "/transfer-leadership", {"target": target})
    print(f"node {leader} is handing leadership to node {target}...", file=out)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        try:
            status = client.call(target, "GET", "/status")
        except AdminError:
            status = {}
        if status.get("role") == "leader":
            print(f"node {target} leads now (ballot {_ballot(status.get('ballot'))})", file=out)
            return 0
        time.sleep(0.1)
    # Who leads now, as the nodes say: the leader keeps leading if the target never
    # answered, but steps down if the target was told to run and did not win.
    statuses = client.statuses()
    leading = sorted(n for n, s in statuses.items()
                     if not isinstance(s, Exception) and s.get("role") == "leader")
    if target in leading:
        print(f"node {target} leads now (ballot {_ballot(statuses[target].get('ballot'))})",
              file=out)
        return 0
    late = f"node {target} did not take over within {args.wait:g} s"
    if leading == [leader]:
        raise AdminError(f"{late}; node {leader} still leads")
    if leading:
        raise AdminError(f"{late}; node {leading[0]} leads now")
    raise AdminError(f"{late}, and no node leads now: node {leader} stepped down and the nodes "
                     "elect a leader (status shows which)")


def _seconds(text):
    """A finite number of seconds above 0, for --timeout and --wait: no node answers
    or takes over in no time."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds above 0, not {text}")
    return value


def _add_global_options(parser, after_command=False):
    """--config, --cert, --key and --timeout, before the command or after it. After it
    they default to nothing (SUPPRESS), so one given before the command is kept."""
    def default(value):
        return argparse.SUPPRESS if after_command else value
    parser.add_argument("--config", default=default("cluster.ini"),
                        help="cluster.ini (default: cluster.ini)")
    parser.add_argument("--cert", default=default(None),
                        help="admin certificate (default: <tls_dir>/admin.pem)")
    parser.add_argument("--key", default=default(None), help="its key (default: <tls_dir>/admin.key)")
    parser.add_argument("--timeout", type=_seconds, default=default(None),
                        help="seconds a node may take to answer (default 5; for the backup "
                             f"itself {BACKUP_TIMEOUT:g}, as the node reads the whole state first)")


def _node_either_way(command, dest):
    """N or --node N: backup, restore and rebuild name their node with --node."""
    command.add_argument(dest, type=int, nargs="?", metavar="N")
    command.add_argument("--node", type=int, dest=f"{dest}_option", metavar="N",
                         help="the same, named as backup, restore and rebuild name theirs")


def _one_node(command, args, dest):
    """The node of ``_node_either_way``'s two spellings, or a usage error (exit 2)."""
    given, option = getattr(args, dest), getattr(args, f"{dest}_option")
    if given is None and option is None:
        command.error("which node? give N or --node N")
    if None not in (given, option) and given != option:
        command.error(f"two nodes named ({given} and --node {option}); give one")
    setattr(args, dest, option if given is None else given)


def main(argv=None, out=None, err=None):
    """``paxchat-admin --config cluster.ini status|snapshot N|transfer-leadership N|backup|restore|rebuild``."""
    out = closedpipe.ReaderMayLeave(out or sys.stdout)
    err = err or sys.stderr
    parser = argparse.ArgumentParser(
        prog="paxchat-admin",
        description="Look at and steer the nodes of a paxchat cluster through their admin "
                    "listeners (mutual TLS with the admin certificate).")
    _add_global_options(parser)
    after = argparse.ArgumentParser(add_help=False)
    _add_global_options(after, after_command=True)
    commands = parser.add_subparsers(dest="command", required=True)
    add_command = functools.partial(commands.add_parser, parents=[after])
    status = add_command("status", help="a table of every node: up/down, role, indexes, lag, "
                         "clients; exit 1 if any node is down or refused by a peer")
    status.add_argument("--json", action="store_true", help="the raw statuses as JSON")
    status.set_defaults(run=_status)
    snapshot = add_command("snapshot", help="have node N snapshot its state now")
    _node_either_way(snapshot, "node")
    snapshot.set_defaults(run=_snapshot)
    transfer = add_command("transfer-leadership", help="have the leader hand over to N")
    _node_either_way(transfer, "target")
    transfer.add_argument("--wait", type=_seconds, default=10.0,
                          help="seconds to wait for N to lead (default 10)")
    transfer.set_defaults(run=_transfer)
    backup = add_command("backup", help="write a consistent copy of a node's state to FILE "
                         "(docs/operations.md, Backups)")
    backup.add_argument("file", metavar="FILE")
    backup.add_argument("--node", type=int,
                        help="the node to copy (default: the one that has applied the most)")
    backup.set_defaults(run=_backup)
    restore = add_command("restore", help="make node N's empty data directory hold a backup "
                          "(a file, or a stopped node's directory copied); run on its machine "
                          "with every node stopped")
    restore.add_argument("file", metavar="FILE|DIR")
    restore.add_argument("--node", type=int, required=True)
    restore.set_defaults(run=_restore, offline=True)
    rebuild = add_command("rebuild", help="mark node N's new, empty data directory (its disk "
                          "was lost) so it rebuilds from the others while they serve; run on "
                          "its machine, then start the node")
    rebuild.add_argument("--node", type=int, required=True)
    rebuild.set_defaults(run=_rebuild, offline=True)
    args = parser.parse_args(argv)
    if args.command == "snapshot":
        _one_node(snapshot, args, "node")
    elif args.command == "transfer-leadership":
        _one_node(transfer, args, "target")
    try:
        config = configmod.load(args.config)
        if getattr(args, "offline", False):
            code = args.run(config, args, out)
        else:
            client = AdminClient(config, args.cert, args.key,
                                 5.0 if args.timeout is None else args.timeout)
            code = args.run(client, args, out)
        out.flush()
        return code
    except (configmod.ConfigError, tls.CertificateFilesError, CertificateProblem) as e:
        # 2, as for a mistake on the command line: 1 says a node is down or refused
        # for its data. A certificate refused, ours or a node's, is a file to mend.
        print(f"paxchat-admin: {e}", file=err)
        return 2
    except AdminError as e:
        print(f"paxchat-admin: {e}", file=err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
