"""
The gate's long-term Ed25519 key (C{encrypt.key_file}), which signs every
encrypted-channel handshake (PROTOCOL.md section 8).

A missing file is created with mode 0600 (written to a private temporary
file, then linked into place, so no process ever reads half a key and two
gates starting together end up with the same one); an unusable file stops
start-up with an error naming C{encrypt.key_file}.
"""

import os
import stat
import tempfile

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import \
    Ed25519PrivateKey
from twisted.logger import Logger

from gate.channel import b64, raw_public
from gate.config import ConfigError

log = Logger()

KEY = "encrypt.key_file"


class KeyFileError(ConfigError):
    """
    The key file cannot be read, created or used; the message names
    C{encrypt.key_file} and the path.
    """


def public_key_b64(private_key):
    """
    The base64 public key clients pin (C{--gate-key}, C{gate_key=}).
    """
    return b64(raw_public(private_key))


def parse_key(data):
    """
    An L{Ed25519PrivateKey} from PEM bytes (PKCS#8, unencrypted).

    @raise ValueError: for anything else.
    """
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ValueError("it is encrypted; the gate needs it unencrypted") \
            from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("no PEM private key in it") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"holds a {type(key).__name__.lstrip('_')}, not an "
                         f"Ed25519 private key")
    return key


def _pem(key):
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _create(path):
    """
    Write a new key to C{path} unless a file appeared there meanwhile.

    @return: whether this call created it.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".mmogate-key-", dir=directory)
    try:
        # mkstemp makes the file 0600 whatever the umask.
        with os.fdopen(fd, "wb") as f:
            f.write(_pem(Ed25519PrivateKey.generate()))
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if the path exists: never replaces
        except FileExistsError:
            return False
        except OSError:
            # No hard links here (some network or FUSE file systems):
            # create in place, exclusively, 0600.
            return _create_in_place(path)
        return True
    finally:
        os.unlink(tmp)


def _create_in_place(path):
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(_pem(Ed25519PrivateKey.generate()))
        f.flush()
        os.fsync(f.fileno())
    return True


def load_or_create(path):
    """
    The gate's signing key from C{path}, created there when missing; its
    public key is logged.

    @raise KeyFileError: naming C{encrypt.key_file}.
    """
    created = False
    if not os.path.lexists(path):
        try:
            created = _create(path)
        except OSError as e:
            raise KeyFileError(f"{KEY}: cannot create {path}: "
                               f"{e.strerror or e}") from None
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            data = f.read(64 * 1024)
    except OSError as e:
        raise KeyFileError(f"{KEY}: cannot read {path}: "
                           f"{e.strerror or e}") from None
    try:
        key = parse_key(data)
    except ValueError as e:
        raise KeyFileError(f"{KEY}: {path} is not a usable Ed25519 private "
                           f"key (PEM): {e}") from None
    if stat.S_IMODE(mode) & 0o077:
        log.warn("{key} {path} can be read by other users (mode {mode:o}); "
                 "chmod 600 it", key=KEY, path=path, mode=stat.S_IMODE(mode))
    log.info("encrypted channel key {public_key} ({how} {path})",
             public_key=public_key_b64(key),
             how="created" if created else "loaded from", path=path)
    return key
