"""HTTP plumbing shared by the registry client and the token client: the session (TLS settings),
the translation of aiohttp errors into blobflow's tree, and registry error bodies.
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import ipaddress
import json
import os
import ssl
import time
import urllib.request
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import aiohttp

from ..errors import AuthError, BadInputError, BlobflowError, ConnectError, NotFoundError, RegistryError, TransferError

__all__ = ["MAX_ERROR_BODY", "mapped", "open_session", "proxy_for", "raise_for", "retry_after", "tls_context"]

MAX_ERROR_BODY = 64 * 1024
_WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})
Redact = Callable[[str], str]


async def read_body(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, or its first ``limit + 1`` bytes when it is longer (callers check the size).

    ``StreamReader.read(n)`` returns what is buffered at that moment, not ``n`` bytes: loop.
    """
    parts: list[bytes] = []
    have = 0
    while have <= limit:
        piece = await resp.content.read(limit + 1 - have)
        if not piece:
            break
        parts.append(piece)
        have += len(piece)
    return b"".join(parts)


def tls_context(*, ca_file: str | None = None, insecure: bool = False) -> ssl.SSLContext | bool:
    """System CAs, plus ``ca_file`` when given (a private registry's CA must not cost the public
    ones: a mirror job talks to both); ``insecure`` turns verification off (aiohttp's ``ssl=False``).
    """
    if insecure:
        return False
    if not ca_file:
        return True  # aiohttp's verified default context, built once per process, not per job
    ctx = ssl.create_default_context()
    if ca_file:
        try:
            ctx.load_verify_locations(cafile=ca_file)
        except FileNotFoundError:
            raise BadInputError(f"--ca-file {ca_file}: no such file") from None
        except (OSError, ssl.SSLError) as e:
            reason = getattr(e, "strerror", None) or getattr(e, "reason", None) or type(e).__name__
            raise BadInputError(f"--ca-file {ca_file}: not a readable PEM bundle of CA certificates "
                                f"({reason})") from None
    return ctx


_PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "REQUEST_METHOD")


def proxy_for(url: str) -> str | None:
    """The proxy a request to ``url`` goes through, from the environment as docker, skopeo and
    crane read it: ``HTTPS_PROXY`` for https, ``HTTP_PROXY`` for http (either case, lowercase
    first), ``NO_PROXY`` (hosts and their subdomains, ``.domain``, ``host:port``, CIDR blocks,
    ``*``) to go direct; never for localhost or a loopback address. aiohttp's ``trust_env`` is not used: it also sends
    ~/.netrc credentials and clashes with the registry's own Authorization header."""
    env = tuple(os.environ.get(name) for name in _PROXY_VARS)
    if not any(env[:6]):
        return None
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return _proxy_for(parts.scheme, parts.hostname or "", port, env)


@functools.lru_cache(maxsize=256)
def _proxy_for(scheme: str, host: str, port: int, env: tuple[str | None, ...]) -> str | None:
    if host == "localhost" or host.endswith(".localhost"):
        return None
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            return None
    proxies = urllib.request.getproxies_environment()  # case rules, and no HTTP_PROXY under CGI
    proxy = proxies.get(scheme)
    if not proxy:
        return None
    if _bypassed(host.lower(), port, proxies.get("no", "")):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def _bypassed(host: str, port: int, no_proxy: str) -> bool:
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if entry == "*":
            return True
        name, sep, entry_port = entry.rpartition(":")
        if not sep or not entry_port.isdigit() or (name.count(":") and not name.endswith("]")):
            name, entry_port = entry, ""  # no port (an IPv6 address has colons of its own)
        if entry_port and int(entry_port) != port:
            continue
        name = name.strip("[]").removeprefix("*").lstrip(".")
        if not name:
            continue
        if host == name or host.endswith("." + name):
            return True
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(host) in ipaddress.ip_network(name, strict=False):
                return True
    return False


def open_session(*, connections_per_host: int, connect_timeout: float, read_timeout: float,
                 ca_file: str | None = None, insecure: bool = False) -> aiohttp.ClientSession:
    """One HTTP session for a whole job. No total timeout: multi-GB bodies must not be killed."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=connections_per_host,
                                     ssl=tls_context(ca_file=ca_file, insecure=insecure),
                                     enable_cleanup_closed=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, sock_read=read_timeout)
    return aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                 headers={"User-Agent": "blobflow/0.1"})


# what OpenSSL says when the answer to its ClientHello is not TLS at all (an HTTP response)
_PLAIN_HTTP_ANSWERS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG")


def _verify_reason(err: BaseException) -> str:
    return str(getattr(err, "verify_message", None) or getattr(err, "reason", None) or err)


@contextlib.contextmanager
def mapped(what: str) -> Iterator[None]:
    """Translate aiohttp and socket errors into blobflow errors. No aiohttp exception (whose
    request info carries headers) escapes: each is replaced, ``from None``.

    An error that blobflow raised inside a request body (a digest mismatch, a deadline) comes
    back from aiohttp wrapped in a connection error; it is raised as itself, not as a reset.
    """
    try:
        yield
    except BlobflowError:
        raise
    except Exception as e:
        if isinstance(e.__cause__, BlobflowError):
            raise e.__cause__ from None
        with _translated(what):
            raise


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except aiohttp.ClientConnectorCertificateError as e:
        raise TransferError(f"{what}: TLS certificate of {e.host}:{e.port} is not trusted "
                            f"({_verify_reason(e.certificate_error)}); if the registry uses a private CA, "
                            "pass its certificate with --ca-file FILE") from None
    except aiohttp.ClientConnectorSSLError as e:
        why = _verify_reason(e.os_error)
        if any(s in why.upper() for s in _PLAIN_HTTP_ANSWERS):
            why += "; the registry seems to speak plain HTTP: if it does, pass --plain-http"
        raise TransferError(f"{what}: TLS handshake with {e.host}:{e.port} failed ({why})") from None
    except aiohttp.ClientProxyConnectionError as e:
        reason = e.os_error.strerror or e.os_error
        raise ConnectError(f"{what}: cannot connect to the proxy {e.host}:{e.port} ({reason}; set by HTTPS_PROXY "
                           "or HTTP_PROXY, bypassed by NO_PROXY)", retryable=True) from None
    except aiohttp.ClientConnectorError as e:
        raise ConnectError(f"{what}: cannot connect to {e.host}:{e.port} ({e.os_error.strerror or e.os_error})",
                           retryable=True) from None
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
            ConnectionError) as e:
        raise TransferError(f"{what}: connection broken ({type(e).__name__}: {e})", retryable=True) from None
    except (TimeoutError, aiohttp.ServerTimeoutError):
        raise TransferError(f"{what}: timed out", retryable=True) from None
    except aiohttp.InvalidURL as e:
        # only scheme and host: a signed storage URL's query string is a credential
        parts = urlsplit(str(e.url))
        raise RegistryError(f"{what}: registry sent an invalid URL ({parts.scheme}://{parts.netloc}/...)") from None
    except aiohttp.ClientHttpProxyError as e:  # the proxy refused the tunnel (407: it wants credentials)
        raise RegistryError(f"{what}: the proxy answered {e.status} {e.message}", status=e.status) from None
    except aiohttp.ClientResponseError as e:
        raise RegistryError(f"{what}: {e.message}", status=e.status) from None
    except aiohttp.ClientError as e:
        raise TransferError(f"{what}: {type(e).__name__}: {e}", retryable=True) from None


def retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


async def read_error(resp: aiohttp.ClientResponse) -> tuple[str, str, str]:
    """The distribution-spec error body's first (code, message, detail), each possibly empty."""
    body = b""
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        body = await read_body(resp, MAX_ERROR_BODY)
    code, message, detail = "", "", ""
    try:
        doc = json.loads(body)
        errors = doc.get("errors") or []
        if errors:
            code = str(errors[0].get("code", ""))
            message = str(errors[0].get("message", ""))
            d = errors[0].get("detail")
            detail = json.dumps(d)[:300] if d else ""
        elif isinstance(doc.get("details"), str):  # docker token services: {"details": "..."}
            message = doc["details"][:300]
    except (ValueError, AttributeError, TypeError):
        pass
    return code, message, detail


async def raise_for(resp: aiohttp.ClientResponse, what: str, *, redact: Redact | None = None) -> None:
    """Raise a typed error carrying the registry's code and message (passed through ``redact``)."""
    code, message, detail = await read_error(resp)
    text = f"{what}: {resp.status} {code or resp.reason}" + (f": {message}" if message else "")
    if detail and detail not in ("null", '""', "{}"):
        text += f" ({detail})"
    if resp.status == 405 and resp.method in _WRITES:
        # Distribution answers so in read-only mode (with Allow) and as a pull-through cache
        allow = resp.headers.get("Allow")
        text += (f"; the registry takes no {resp.method} here{f' (it allows {allow})' if allow else ''}: "
                 "it may be read-only, or a pull-through cache, which takes no pushes")
    if redact is not None:
        text, detail = redact(text), redact(detail)
    cls = RegistryError
    if resp.status in (401, 403):
        cls = AuthError
    elif resp.status == 404:
        cls = NotFoundError
    err = cls(text, status=resp.status, code=code, detail=detail)
    err.retry_after = retry_after(resp.headers.get("Retry-After"))
    resp.release()
    raise err
