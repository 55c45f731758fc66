"""
Throwaway TLS certificates for tests, made with C{cryptography} at test
time: a CA, optionally an intermediate CA, and a server certificate for
C{127.0.0.1} and C{localhost}, written as PEM files into a directory.

    pki = make_pki(self.mktemp())
    start_gate(self, listen={"tcp": pki.endpoint()})
    GateClient(reactor, "tls://127.0.0.1:PORT", ..., ca_file=pki.ca_file)
"""

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.endpoints import quoteStringArgument

#: The names the server certificate is valid for.
SERVER_NAMES = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class PKI:
    """
    Paths of the PEM files made by L{make_pki}.

    @ivar ca_file: the root CA certificate: what clients pin.
    @ivar cert_file: the server certificate.
    @ivar key_file: the server's private key (PKCS#8, unencrypted).
    @ivar chain_file: the intermediate CA certificate the server must send
        along (C{extraCertChain}), or C{None} when the CA signed the server
        certificate itself.
    """

    directory: str
    ca_file: str
    cert_file: str
    key_file: str
    chain_file: str = None

    def endpoint_args(self):
        """
        The key and certificate arguments of a Twisted C{ssl:} server
        endpoint string, quoted (colons and backslashes in paths escaped).
        """
        args = (f"privateKey={quoteStringArgument(self.key_file)}"
                f":certKey={quoteStringArgument(self.cert_file)}")
        if self.chain_file is not None:
            args += f":extraCertChain={quoteStringArgument(self.chain_file)}"
        return args

    def endpoint(self, port=0, interface="127.0.0.1"):
        """
        A whole C{ssl:} server endpoint string on C{interface}.
        """
        return f"ssl:{port}:interface={interface}:{self.endpoint_args()}"


def _name(common_name):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _ca(subject, key, issuer, issuer_key, now, path_length):
    day = datetime.timedelta(days=1)
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - day).not_valid_after(now + day)
            .add_extension(x509.BasicConstraints(ca=True,
                                                 path_length=path_length),
                           critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False,
                key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(
                key.public_key()), critical=False)
            .sign(issuer_key, hashes.SHA256()))


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)
    return path


def _pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def make_pki(directory, names=SERVER_NAMES, intermediate=False):
    """
    Make a CA and a server certificate for C{names} (IP addresses and DNS
    names) in C{directory} (created if missing).

    @param intermediate: sign the server certificate with an intermediate
        CA (as public CAs do), which the server then has to send along.
    @return: a L{PKI}.
    """
    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    root_key = _key()
    root_name = _name("mmogate test root CA")
    root = _ca(root_name, root_key, root_name, root_key, now, None)
    issuer_name, issuer_key, issuer = root_name, root_key, root
    chain_file = None
    if intermediate:
        issuer_key = _key()
        issuer_name = _name("mmogate test intermediate CA")
        issuer = _ca(issuer_name, issuer_key, root_name, root_key, now, 0)
        chain_file = _write(os.path.join(directory, "chain.pem"),
                            _pem(issuer))
    alt_names = []
    for name in names:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            alt_names.append(x509.DNSName(name))
    server_key = _key()
    server = (x509.CertificateBuilder()
              .subject_name(_name(names[0])).issuer_name(issuer_name)
              .public_key(server_key.public_key())
              .serial_number(x509.random_serial_number())
              .not_valid_before(now - day).not_valid_after(now + day)
              .add_extension(x509.SubjectAlternativeName(alt_names),
                             critical=False)
              .add_extension(x509.BasicConstraints(ca=False,
                                                   path_length=None),
                             critical=True)
              .add_extension(x509.ExtendedKeyUsage(
                  [ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier
                             .from_issuer_public_key(issuer_key.public_key()),
                             critical=False)
              .sign(issuer_key, hashes.SHA256()))
    key_pem = server_key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
    return PKI(
        directory=directory,
        ca_file=_write(os.path.join(directory, "ca.pem"), _pem(root)),
        cert_file=_write(os.path.join(directory, "server.pem"), _pem(server)),
        key_file=_write(os.path.join(directory, "server.key"), key_pem),
        chain_file=chain_file)
