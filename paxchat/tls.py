"""The cluster CA, node certificates and the TLS options built from them.

One CA per cluster signs one certificate per node. Clients trust only that
CA; peers talk mutual TLS, so a node accepts a peer connection only from a
certificate the same CA signed, and learns which node it is from the
certificate (`node_id_of`). `paxchat-certs` makes the files.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import re
import sys
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from paxchat import clienttls
from paxchat import config as configmod

__all__ = [
    "CertificateFilesError", "CertificatesExist", "admin_name_of", "admin_server_options",
    "ClientCA", "admin_cert_path", "admin_certificate_renewal", "admin_key_path", "check_node_certificate",
    "make_admin_certificate", "node_certificate_renewal", "client_connection_options",
    "client_options_for_ca", "read_client_ca", "client_server_context", "ensure_cluster_certs",
    "load_ca", "load_node_certificate", "make_cluster_certs", "main", "node_id_of",
    "node_name", "peer_client_options", "peer_server_options",
]

ORGANIZATION = "paxchat"
NODE_UNIT = "paxchat node"
CA_UNIT = "paxchat cluster CA"
ADMIN_UNIT = "paxchat admin"
ADMIN_NAME = "paxchat-admin"
MINIMUM_TLS = ssl.TLSVersion.TLSv1_2
_NODE_CN = re.compile(r"paxchat-node-([1-9][0-9]*)\Z")
_WILDCARD_HOSTS = ("0.0.0.0", "::", "")


class CertificatesExist(Exception):
    """make_cluster_certs would overwrite files (pass force=True to replace them)."""


class CertificateFilesError(Exception):
    """A certificate or key file is missing or unreadable; the message says how to fix it."""


def node_name(node_id) -> str:
    """The DNS name in node ``node_id``'s certificate, e.g. ``paxchat-node-3``.

    Passing it as ``peer_host`` to `peer_client_options` makes TLS itself
    check that the peer is that node, not just any node of the cluster.
    """
    return f"paxchat-node-{int(node_id)}"


# -- making certificates ------------------------------------------------------

def _now():
    return datetime.datetime.now(datetime.timezone.utc)


def _new_key():
    return ec.generate_private_key(ec.SECP256R1())


def _general_name(host):
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _node_names(node):
    """subjectAltName entries: the node's listening hosts and its node name."""
    hosts = [node.client.host, node.peer.host]
    if any(h in _WILDCARD_HOSTS for h in hosts):
        hosts += ["localhost", "127.0.0.1", "::1"]
    hosts = [h for h in hosts if h not in _WILDCARD_HOSTS]
    names, seen = [], set()
    for name in [_general_name(h) for h in hosts] + [x509.DNSName(node_name(node.id))]:
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def _make_ca():
    key = _new_key()
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, CA_UNIT),
        x509.NameAttribute(NameOID.COMMON_NAME, f"paxchat CA {os.urandom(4).hex()}"),
    ])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _make_node_cert(node, ca_cert, ca_key):
    key = _new_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, NODE_UNIT),
            x509.NameAttribute(NameOID.COMMON_NAME, node_name(node.id)),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1825))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_node_names(node)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def _cert_pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int, force: bool):
    """Write atomically with ``mode`` from the start; never replace a file unless ``force``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if force:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _node_files(config):
    return [(n, config.node_cert_path(n), config.node_key_path(n)) for n in config.nodes]


def _all_files(config):
    files = [config.ca_path, config.ca_key_path]
    for _, cert, key in _node_files(config):
        files += [cert, key]
    return files


def make_cluster_certs(config, force=False) -> list[Path]:
    """Make a new cluster CA and a key and certificate per node; return the paths written.

    Refuses (CertificatesExist) if any of the files exists, unless ``force``.
    """
    existing = [p for p in _all_files(config) if p.exists()]
    if existing and not force:
        raise CertificatesExist(
            f"{existing[0]} already exists; --if-missing makes only what is missing (a node's "
            "certificate from the existing CA); --force replaces the whole cluster's: a new CA "
            f"and new certificates for every node (every node and client must then get the new "
            f"{config.ca_path.name})")
    _make_tls_dir(config)
    ca_cert, ca_key = _make_ca()
    written = []
    _write(config.ca_key_path, _key_pem(ca_key), 0o600, force)
    _write(config.ca_path, _cert_pem(ca_cert), 0o644, force)
    written += [config.ca_path, config.ca_key_path]
    for node_id in config.nodes:
        written += _write_node(config, node_id, ca_cert, ca_key, force)
    return written


def ensure_cluster_certs(config) -> list[Path]:
    """Make only what is missing: nothing if all files exist, new node files under an existing CA.

    A node added to cluster.ini gets its certificate from the existing CA, so
    the running nodes and clients keep working.
    """
    files = _all_files(config)
    if all(p.exists() for p in files):
        return []
    if not any(p.exists() for p in files):
        return make_cluster_certs(config)
    if not (config.ca_path.exists() and config.ca_key_path.exists()):
        raise CertificatesExist(
            f"{config.ca_path if not config.ca_path.exists() else config.ca_key_path} is missing "
            f"but other certificate files exist in {config.tls_dir}: run this where the "
            f"cluster's {config.ca_key_path.name} is kept (a node's machine holds only "
            f"{config.ca_path.name} and its own certificate and key, docs/deploy.md step 3); "
            "only to replace the whole cluster's certificates, --force makes a new CA and new "
            "certificates for every node")
    for node_id, cert, key in _node_files(config):
        if cert.exists() != key.exists():
            raise CertificatesExist(
                f"{key if cert.exists() else cert} is missing but {cert if cert.exists() else key} "
                f"exists; remove it and run this again to make node {node_id} a new certificate "
                "and key from the cluster CA")
    ca_cert = _load_x509(config.ca_path, config)
    ca_key = _load_key(config.ca_key_path, config)
    written = []
    for node_id, cert, key in _node_files(config):
        if not cert.exists():
            written += _write_node(config, node_id, ca_cert, ca_key, force=False)
    return written


def _write_node(config, node_id, ca_cert, ca_key, force):
    cert, key = _make_node_cert(config.node(node_id), ca_cert, ca_key)
    _write(config.node_key_path(node_id), _key_pem(key), 0o600, force)
    _write(config.node_cert_path(node_id), _cert_pem(cert), 0o644, force)
    return [config.node_cert_path(node_id), config.node_key_path(node_id)]


def _make_tls_dir(config):
    config.tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)


# -- the operator's certificate ------------------------------------------------

def admin_cert_path(config) -> Path:
    return config.tls_dir / "admin.pem"


def admin_key_path(config) -> Path:
    return config.tls_dir / "admin.key"


def _make_admin_cert(ca_cert, ca_key, name):
    key = _new_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ADMIN_UNIT),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def make_admin_certificate(config, force=False, name=ADMIN_NAME) -> list[Path]:
    """The operator's client certificate (``admin.pem``/``admin.key``) from the existing CA.

    ``paxchat-admin`` presents it to a node's ``admin`` listener, which
    accepts only certificates of this CA whose unit is ``paxchat admin``.
    Returns the paths written: none if it exists and not ``force``.
    """
    cert_path, key_path = admin_cert_path(config), admin_key_path(config)
    if cert_path.exists() and key_path.exists() and not force:
        return []
    ca_cert = _load_x509(config.ca_path, config)
    ca_key = _load_key(config.ca_key_path, config)
    cert, key = _make_admin_cert(ca_cert, ca_key, name)
    replace = force or cert_path.exists() or key_path.exists()
    _write(key_path, _key_pem(key), 0o600, replace)
    _write(cert_path, _cert_pem(cert), 0o644, replace)
    return [cert_path, key_path]


def _subject_names(certificate):
    """The (OU values, CN values) of a pyOpenSSL, Twisted or cryptography certificate."""
    if isinstance(certificate, ssl.Certificate):
        certificate = certificate.original
    if hasattr(certificate, "to_cryptography"):
        certificate = certificate.to_cryptography()
    subject = certificate.subject
    return ([a.value for a in subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)],
            [a.value for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)])


def admin_name_of(certificate) -> str | None:
    """The operator's name in an admin certificate (``OU=paxchat admin``), else None.

    Only meaningful for a certificate TLS already verified against the
    cluster CA; node certificates give None.
    """
    if certificate is None:
        return None
    units, names = _subject_names(certificate)
    if units != [ADMIN_UNIT] or len(names) != 1:
        return None
    return names[0]


# -- reading certificates -----------------------------------------------------

def how_to_fix(path, config):
    """What to do about a certificate file that is missing or unusable.

    Put the cluster's own file back: `paxchat-certs` without options makes
    a new CA, which the rest of a running cluster would not trust, so it is
    offered only for a cluster that has no certificates yet.
    """
    path = Path(path)
    if config is None:    # a client's CA: copied from the cluster, never made where the client is
        return (f"copy the cluster's own {path.name} here from one of its nodes or its operator "
                "(docs/deploy.md step 3): a client trusts only the CA that signed the nodes' "
                "certificates")
    put_back = (f"copy the cluster's own {path.name} here from where its certificates were made "
                "(docs/deploy.md step 3)")
    new_cluster = ("only a cluster with no certificates yet makes them all, with "
                   f"`paxchat-certs --config {config.path}`")
    if path == config.ca_key_path:
        return f"run this where the cluster's {path.name} is kept (docs/deploy.md step 3); {new_cluster}"
    for node_id in config.nodes:
        if path in (config.node_cert_path(node_id), config.node_key_path(node_id)):
            return f"{_own_pair_back(config, node_id)}; {new_cluster}"
    return f"{put_back}; {new_cluster}"


def _own_pair_back(config, node_id):
    """Advice for node ``node_id``'s certificate or key: its own pair, or a new pair from the
    cluster CA (`--if-missing` makes only that node's; `--force` would remake every node's)."""
    cert, key = config.node_cert_path(node_id).name, config.node_key_path(node_id).name
    return (f"put node {node_id}'s own {cert} and {key} back, or make it a new pair from the "
            f"cluster CA where {config.ca_key_path.name} is kept: remove {cert} and {key} there, "
            f"run `paxchat-certs --config {config.path} --if-missing` and copy both here "
            "(docs/operations.md, \"A node whose disk was lost\")")


def _read(path: Path, config) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CertificateFilesError(
            f"cannot read {path} ({e.strerror or e}); {how_to_fix(path, config)}") from None


def _load_x509(path, config):
    try:
        return x509.load_pem_x509_certificate(_read(path, config))
    except ValueError:
        raise CertificateFilesError(
            f"{path} is not a PEM certificate; {how_to_fix(path, config)}") from None


def _load_key(path, config):
    try:
        return serialization.load_pem_private_key(_read(path, config), password=None)
    except (ValueError, TypeError):
        raise CertificateFilesError(
            f"{path} is not an unencrypted PEM private key; {how_to_fix(path, config)}") from None


def load_ca(config) -> ssl.Certificate:
    """The cluster CA certificate, as Twisted's trust root."""
    return ssl.Certificate.loadPEM(_cert_pem(_load_x509(config.ca_path, config)))


def load_node_certificate(config, node_id) -> ssl.PrivateCertificate:
    """Node ``node_id``'s certificate with its key, checked to belong together."""
    cert_path, key_path = config.node_cert_path(node_id), config.node_key_path(node_id)
    cert = _load_x509(cert_path, config)
    key = _load_key(key_path, config)
    if cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise CertificateFilesError(
            f"{key_path} and {cert_path} do not belong together (the key is not the one the "
            f"certificate was made for); {_own_pair_back(config, node_id)}")
    return ssl.PrivateCertificate.loadPEM(_cert_pem(cert) + _key_pem(key))


def check_node_certificate(config, node_id, now=None):
    """Refuse to start node ``node_id`` on a certificate its peers and clients would
    refuse: another node's, one the cluster CA in ca.pem did not sign, or one out of
    its dates. Returns when it expires (an aware UTC datetime), for a warning ahead.

    Without this the node would start, and only the others would say, in their
    logs, that they refuse it.
    """
    cert_path = config.node_cert_path(node_id)
    cert = _load_x509(cert_path, config)
    named = node_id_of(cert)
    if named != node_id:
        whose = f"node {named}'s certificate" if named is not None else "no paxchat node's certificate"
        raise CertificateFilesError(f"{cert_path} is {whose}, not node {node_id}'s;"
                                    f" {_own_pair_back(config, node_id)}")
    ca = _load_x509(config.ca_path, config)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise CertificateFilesError(
            f"{cert_path} was not made by the cluster CA in {config.ca_path} (it was issued by"
            f" \"{_common_name(cert.issuer)}\"; ca.pem holds \"{_common_name(ca.subject)}\"): peers"
            f" and clients would refuse it; {_own_pair_back(config, node_id)}") from None
    before, after = _validity(cert)
    now = _now() if now is None else now
    if after < now:
        raise CertificateFilesError(
            f"{cert_path} expired on {after:%Y-%m-%d}: peers and clients would refuse it;"
            f" {node_certificate_renewal(config, node_id)}")
    if before > now:
        raise CertificateFilesError(
            f"{cert_path} is not valid before {before:%Y-%m-%d %H:%M} UTC: is this machine's"
            " clock right?")
    return after


def node_id_of(certificate) -> int | None:
    """The node id a certificate names (``CN=paxchat-node-N, OU=paxchat node``), or None.

    Takes a pyOpenSSL X509 (``transport.getPeerCertificate()``), a Twisted
    ``ssl.Certificate`` or a ``cryptography`` certificate. Only meaningful
    for a certificate that TLS already verified against the cluster CA.
    """
    if certificate is None:
        return None
    units, names = _subject_names(certificate)
    if units != [NODE_UNIT] or len(names) != 1:
        return None
    match = _NODE_CN.match(names[0])
    return int(match.group(1)) if match else None


# -- TLS options --------------------------------------------------------------

def client_server_context(config, node_id):
    """Server side of a node's client port (L{paxchat.clienttls}): its certificate, no client
    certificate asked; a stdlib ``ssl.SSLContext``."""
    load_node_certificate(config, node_id)  # the checks, and the errors that say how to fix them
    return clienttls.server_context(config.node_cert_path(node_id), config.node_key_path(node_id))


class ClientCA:
    """The CA a client trusts on the client port, and the file it came from.

    Kept whole, not only as a trust root, so that a node certificate TLS
    refused can be explained against it (``refusal``) without reading the
    file again. ``reload`` reads the file again if it changed: a client
    that runs for long (the prompt, the desktop app) takes the cluster's
    own ca.pem, copied in after a refusal, without a restart.
    """

    def __init__(self, path, certificate: x509.Certificate, stamp=None):
        self.path = Path(path)
        self._stamp = _file_stamp(self.path) if stamp is None else stamp
        self._take(certificate)

    def _take(self, certificate):
        self.certificate = certificate
        self._root = ssl.Certificate.loadPEM(_cert_pem(certificate))
        self._options = {}                 # host -> options, made once per CA read

    def options(self, host):
        """A TLS connection creator trusting this CA alone (as last read) and checking
        that the node is ``host``."""
        return _TrustingClientCA(self, host)

    def options_now(self, host):
        """Client TLS options trusting the CA as read now, checking that the node is ``host``."""
        options = self._options.get(host)
        if options is None:
            options = self._options[host] = ssl.optionsForClientTLS(
                host, trustRoot=self._root, extraCertificateOptions={"raiseMinimumTo": MINIMUM_TLS})
        return options

    def reload(self) -> bool:
        """Read the file again if it changed since it was read (a stat; then one small
        file read): True if another CA is trusted from now on. A file that cannot be
        read or holds no certificate raises CertificateFilesError and changes nothing."""
        stamp = _file_stamp(self.path)
        if stamp == self._stamp:
            return False
        certificate = _load_x509(self.path, None)
        self._stamp = stamp
        if certificate == self.certificate:
            return False
        self._take(certificate)
        return True

    def refusal(self, chain, host: str, hostname: bool = False, detail: str = "",
                renew: str | None = None) -> tuple[str, str, str]:
        """(problem, detail, advice): why TLS refused the certificate ``chain`` (leaf first) a node presented.

        Told apart because each has its own remedy: a certificate another CA
        signed (the client's ca.pem is not the cluster's, or the cluster's
        certificates were remade); one out of its dates; one made for
        another address than ``host`` (cluster.ini's), or for another node
        than ``host`` when it is a node's name (``paxchat-admin`` checks
        those). ``renew``: how that node gets a new certificate, for a
        reader who can make one (the operator); by default, that the
        operator has to.
        """
        if renew is None:
            renew = ("the cluster's operator has to give that node a new certificate from the cluster CA"
                     " (docs/operations.md, Certificates)")
        leaf = chain[0] if chain else None
        if hostname:
            names = _alt_names(leaf) if leaf is not None else []
            problem = f"certificate not made for {host}"
            detail = f"it is for {', '.join(names)}" if names else detail
            if _NODE_CN.match(host):
                return (problem, detail, "another node answered there: either that address in"
                        " cluster.ini is another node's, or the node has another node's certificate"
                        f" (its files swapped, or copied from another machine): put its own back, or {renew}")
            return (problem, detail,
                    f"either the node's address in cluster.ini is not the one its certificate was made"
                    f" for, or {renew}")
        wrong_ca = (f"if {self.path} is not this cluster's CA (copied from the wrong place, or the"
                    f" cluster's certificates were remade since), copy the cluster's own {self.path.name}"
                    f" there from one of its nodes or its operator (docs/deploy.md step 3)")
        if leaf is None:
            return f"certificate not accepted by the CA in {self.path}", detail, wrong_ca
        try:
            leaf.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature):
            return (f"certificate not signed by the CA in {self.path}",
                    f"it was issued by \"{_common_name(leaf.issuer)}\";"
                    f" {self.path.name} holds \"{_common_name(self.certificate.subject)}\"", wrong_ca)
        now, (before, after) = _now(), _validity(leaf)
        if after < now:
            return f"certificate expired on {after:%Y-%m-%d}", "", renew
        if before > now:
            return (f"certificate not valid before {before:%Y-%m-%d %H:%M} UTC", "",
                    "check this machine's clock")
        return f"certificate not accepted by the CA in {self.path}", detail, renew


def node_certificate_renewal(config, node_id) -> str:
    """How the operator gives node ``node_id`` a new certificate (one that expired, or that
    the cluster's clients and paxchat-admin do not accept): only that node's, from the
    cluster CA, so nothing else changes."""
    cert, key = config.node_cert_path(node_id).name, config.node_key_path(node_id).name
    return (f"make node {node_id} a new certificate where the cluster's {config.ca_key_path.name} is"
            f" kept: remove {cert} and {key} there, run `paxchat-certs --config {config.path}"
            f" --if-missing`, copy both to node {node_id}'s machine and restart the node"
            " (docs/operations.md, Certificates)")


def admin_certificate_renewal(config) -> str:
    """How the operator gets a new admin certificate from the cluster CA."""
    return (f"make a new admin certificate where the cluster's {config.ca_key_path.name} is kept:"
            f" remove admin.pem and admin.key there, run `paxchat-certs --config {config.path}"
            " --admin` and copy both here (docs/operations.md, Certificates)")


@implementer(IOpenSSLClientConnectionCreator)
class _TrustingClientCA:
    """A connection creator for one host that trusts the ClientCA as it is when each
    connection is made, so a CA read again (``ClientCA.reload``) holds from the next one."""

    def __init__(self, ca: ClientCA, host: str):
        self._ca = ca
        self._host = host

    def clientConnectionForTLS(self, tlsProtocol):
        return self._ca.options_now(self._host).clientConnectionForTLS(tlsProtocol)


def _file_stamp(path):
    """What changes when a file is replaced or rewritten; None for a file that is not there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _validity(certificate):
    """(not before, not after) as aware UTC datetimes (cryptography 41 has only naive ones)."""
    if hasattr(certificate, "not_valid_after_utc"):
        return certificate.not_valid_before_utc, certificate.not_valid_after_utc
    utc = datetime.timezone.utc
    return certificate.not_valid_before.replace(tzinfo=utc), certificate.not_valid_after.replace(tzinfo=utc)


def _alt_names(certificate) -> list[str]:
    """The hosts and names a certificate is for (its subjectAltName)."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(name.value) for name in names]


def _common_name(name: x509.Name) -> str:
    names = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else name.rfc4514_string()


def read_client_ca(ca_path) -> ClientCA:
    """The CA at ``ca_path``, for a client.

    A missing CA file is a client's: its error says to copy the cluster's,
    not to make one (`paxchat-certs` would make a CA the nodes know nothing of).
    """
    stamp = _file_stamp(ca_path)           # before the read: a change after it is seen next time
    return ClientCA(ca_path, _load_x509(ca_path, None), stamp)


def client_options_for_ca(ca_path, host):
    """Client side of the client port, trusting the CA at ``ca_path`` and checking ``host``."""
    return read_client_ca(ca_path).options_now(host)


def client_connection_options(config, host):
    """Client side of the client port: trust the cluster CA, check the node's ``host``."""
    return client_options_for_ca(config.ca_path, host)


def peer_server_options(config, node_id) -> ssl.CertificateOptions:
    """Server side of the peer port: mutual TLS, only certificates the cluster CA signed."""
    own = load_node_certificate(config, node_id)
    return ssl.CertificateOptions(
        privateKey=own.privateKey.original, certificate=own.original,
        verify=True, caCerts=[load_ca(config).original], requireCertificate=True,
        raiseMinimumTo=MINIMUM_TLS)


def admin_server_options(config, node_id) -> ssl.CertificateOptions:
    """Server side of a node's admin port: mutual TLS with the cluster CA.

    Which certificates may act is the admin service's check (`admin_name_of`).
    """
    return peer_server_options(config, node_id)


def peer_client_options(config, node_id, peer_host):
    """Client side of a peer connection: present our certificate, verify the peer's.

    ``peer_host`` is the host of the peer's address, or ``node_name(peer_id)``
    to have TLS also check which node answers.
    """
    return ssl.optionsForClientTLS(
        peer_host, trustRoot=load_ca(config),
        clientCertificate=load_node_certificate(config, node_id),
        extraCertificateOptions={"raiseMinimumTo": MINIMUM_TLS})


# -- paxchat-certs ------------------------------------------------------------

def main(argv=None):
    """``paxchat-certs --config cluster.ini [--force | --if-missing]``."""
    parser = argparse.ArgumentParser(
        prog="paxchat-certs",
        description="Make the cluster CA and one certificate per node of cluster.ini.")
    parser.add_argument("--config", default="cluster.ini", help="cluster.ini (default: %(default)s)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--force", action="store_true",
                       help="replace existing files with a new CA and node certificates")
    group.add_argument("--if-missing", action="store_true",
                       help="make only missing files; do nothing when all exist")
    parser.add_argument("--admin", action="store_true",
                        help="make the operator's certificate for paxchat-admin (admin.pem, "
                             "admin.key) from the existing cluster CA; with --force or "
                             "--if-missing, the cluster certificates too")
    args = parser.parse_args(argv)
    try:
        config = configmod.load(args.config)
        if args.if_missing:
            written = ensure_cluster_certs(config)
        elif args.admin and not args.force:
            written = []  # only the admin certificate, from the cluster CA as it is
        else:
            written = make_cluster_certs(config, force=args.force)
        if args.admin:
            written += make_admin_certificate(config, force=args.force)
    except (configmod.ConfigError, CertificatesExist, CertificateFilesError, OSError) as e:
        print(f"paxchat-certs: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"paxchat-certs: every certificate already exists in {config.tls_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
