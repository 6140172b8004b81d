"""HTTP(S) downloads that resume, verify and never leave a torn file under the final name.

A file is fetched into ``<name>.part`` next to its final name: an interrupted download keeps the
bytes it got, and the next call asks the server for the rest (an HTTP ``Range`` request; a server
that ignores it sends the whole file again). The finished file is checked against the size and
hashes a `Remote` knows (SHA-256, and MD5 / SHA-1 where only those are published) and only then
renamed to its final name. Mirrors are tried in order; when every one fails, a single
`DownloadError` names each URL and why (DNS failure, refused connection, HTTP status, wrong hash).

Progress bars are drawn only on a terminal (`sats.progress`); otherwise one log line per file.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sats.progress import interactive

log = logging.getLogger(__name__)

__all__ = ["ChecksumError", "DownloadError", "Remote", "check_file", "download", "file_hashes", "resolve_urls"]

HASH_ALGORITHMS = ("sha256", "sha1", "md5")
CHUNK = 1 << 20
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, OSError)


class DownloadError(RuntimeError):
    """A file could not be downloaded, or a downloaded/given file is not the one expected."""


class ChecksumError(DownloadError):
    """A file's size or hash differs from the published one; the message names the file and both values."""


@dataclass(frozen=True)
class Remote:
    """A published file: its local name, where to get it, and what it must be.

    filename: name of the local file (need not be the URL's last component).
    urls: official URLs, tried in order.
    size: size in bytes, or None when unknown.
    hashes: ``{algorithm: hex digest}`` for ``sha256`` / ``sha1`` / ``md5``; a shorter value is a
        leading part of the digest (torchvision names its files after the first 8 hex digits of the
        SHA-256). Empty when no hash is published: then only the size (if known) is checked.
    source: where the size and hashes come from (for the record).
    """

    filename: str
    urls: tuple[str, ...]
    size: int | None = None
    hashes: Mapping[str, str] = field(default_factory=dict)
    source: str = ""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.hashes) - set(HASH_ALGORITHMS))
        if unknown:
            raise ValueError(f"{self.filename}: unknown hash algorithms {unknown}; known: {list(HASH_ALGORITHMS)}")

    def describe(self) -> str:
        """``"sha256 e14f7632…, md5 6cd6e144…"``, or what is checked when no hash is published."""
        known = [f"{algo} {value[:12]}{'…' if len(value) > 12 else ''}" for algo, value in self.hashes.items()]
        if known:
            return ", ".join(known)
        return f"no published hash (size {self.size:,} bytes only)" if self.size else "no published hash or size"


def resolve_urls(remote: Remote, url: str | None = None, mirrors: Sequence[str] = ()) -> list[str]:
    """URLs to try for ``remote``: ``mirrors`` (``BASE`` → ``BASE/<filename>``) first, then ``url`` if
    given, else the official URLs."""
    tried = [f"{base.rstrip('/')}/{remote.filename}" for base in mirrors]
    tried += [url] if url else list(remote.urls)
    return list(dict.fromkeys(tried))


# ------------------------------------------------------------------------------------------------ hashing

class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _byte_bar(total: int | None, initial: int, desc: str, enabled: bool) -> Any:
    if not (enabled and interactive()):
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                leave=False, dynamic_ncols=True)


def file_hashes(path: str | os.PathLike[str], algorithms: Iterable[str] = ("sha256",),
                progress: bool = True) -> dict[str, str]:
    """``{algorithm: hex digest}`` of the file at ``path``, all computed in one pass."""
    path = Path(path)
    hashers = {algo: hashlib.new(algo) for algo in dict.fromkeys(algorithms)}
    bar = _byte_bar(path.stat().st_size, 0, f"verify {path.name}", progress)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                for hasher in hashers.values():
                    hasher.update(chunk)
                bar.update(len(chunk))
    finally:
        bar.close()
    return {algo: hasher.hexdigest() for algo, hasher in hashers.items()}


def check_file(path: str | os.PathLike[str], remote: Remote, progress: bool = True) -> dict[str, Any]:
    """Check the file at ``path`` against ``remote``'s size and hashes.

    Returns ``{"size": bytes, "sha256": hex, "verified": [algorithms that matched]}`` (plus the other
    computed digests); raises `ChecksumError` naming the file, the expected and the found value.
    """
    path = Path(path)
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        raise ChecksumError(f"{path}: {size:,} bytes, expected {remote.size:,} for {remote.filename}"
                            f"{f' ({remote.source})' if remote.source else ''}: an incomplete or different file; "
                            f"delete it and download it again")
    digests = file_hashes(path, ("sha256", *remote.hashes), progress)
    for algo, expected in remote.hashes.items():
        if not digests[algo].startswith(expected.lower()):
            raise ChecksumError(f"{path}: {algo} {digests[algo]}, expected {expected} for {remote.filename}"
                                f"{f' ({remote.source})' if remote.source else ''}: a damaged or different file; "
                                f"delete it and download it again")
    return {"size": size, **digests, "verified": sorted(remote.hashes)}


# ---------------------------------------------------------------------------------------------- fetching

class _Failure(Exception):
    """One URL failed (network, HTTP status, short read); the next mirror is tried."""


def _describe(error: BaseException) -> str:
    reason = error.reason if isinstance(error, urllib.error.URLError) and not isinstance(
        error, urllib.error.HTTPError) else error
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(reason, socket.gaierror):
        return f"cannot resolve the host name ({reason.strerror or reason})"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(reason, ssl.SSLError):
        return f"TLS error ({reason})"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return f"{type(reason).__name__}: {reason}"


def _offline(errors: Sequence[str]) -> bool:
    markers = ("cannot resolve", "connection refused", "timed out", "unreachable", "no route")
    return bool(errors) and all(any(m in e.lower() for m in markers) for e in errors)


def _open(url: str, offset: int, timeout: float) -> Any:
    from sats import __version__

    request = urllib.request.Request(url, headers={"User-Agent": f"sats/{__version__}"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()
        if error.code == 416 and offset:  # the partial file is not a prefix of this file: start again
            return None
        raise _Failure(_describe(error)) from error
    except _NETWORK_ERRORS as error:
        raise _Failure(_describe(error)) from error


def _fetch(url: str, part: Path, size: int | None, timeout: float, progress: bool) -> None:
    """Append the rest of ``url`` to ``part`` (or write it from the start); `_Failure` on any problem."""
    offset = part.stat().st_size if part.is_file() else 0
    if size is not None and offset >= size:
        if offset == size:
            return  # complete: the hash check decides
        part.unlink()
        offset = 0
    response = _open(url, offset, timeout)
    if response is None:
        part.unlink()
        offset = 0
        response = _open(url, 0, timeout)
    with response:
        status = getattr(response, "status", 200)
        if offset and status == 206:
            first = (response.headers.get("Content-Range") or "").removeprefix("bytes ").split("-")[0]
            if first != str(offset):
                raise _Failure(f"answered Range bytes={offset}- with Content-Range "
                               f"{response.headers.get('Content-Range')!r}")
        elif offset:
            log.info("%s ignores Range requests: downloading %s from the start", url, part.name[:-5])
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        if size is not None and total is not None and total != size:
            raise _Failure(f"serves {total:,} bytes, expected {size:,}")
        if offset:
            log.info("resuming %s at %s bytes from %s", part.name[:-5], f"{offset:,}", url)
        else:
            log.info("downloading %s from %s", part.name[:-5], url)
        bar = _byte_bar(total if total is not None else size, offset, part.name[:-5], progress)
        try:
            with open(part, "ab" if offset else "wb") as f:
                try:
                    while chunk := response.read(CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
                except (http.client.HTTPException, OSError) as error:
                    f.flush()
                    raise _Failure(f"connection lost after {f.tell():,} bytes ({_describe(error)}); the partial "
                                   f"file {part} is kept, run again to resume") from error
                f.flush()
                os.fsync(f.fileno())
        finally:
            bar.close()
    got = part.stat().st_size
    if total is not None and got != total:
        raise _Failure(f"connection closed after {got:,} of {total:,} bytes; the partial file {part} is kept, "
                       f"run again to resume")


def download(remote: Remote, folder: str | os.PathLike[str], urls: Sequence[str] | None = None,
             progress: bool = True, timeout: float = 60.0) -> tuple[Path, dict[str, Any]]:
    """``folder/remote.filename``, downloaded if absent, and its `check_file` record.

    An existing file is only verified. ``urls`` (default: the official ones) are tried in order;
    a partial ``.part`` file is resumed. `ChecksumError` for an existing file that does not match;
    `DownloadError` naming every URL tried when none gives the expected file.
    """
    folder = Path(folder)
    target = folder / remote.filename
    if target.is_file():
        return target, check_file(target, remote, progress)
    folder.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    errors: list[str] = []
    for url in urls if urls is not None else remote.urls:
        try:
            _fetch(url, part, remote.size, timeout, progress)
        except _Failure as failure:
            errors.append(f"{url}: {failure}")
            continue
        try:
            record = check_file(part, remote, progress)
        except ChecksumError as error:
            part.unlink()
            errors.append(f"{url}: {error}")
            continue
        os.replace(part, target)
        return target, {**record, "url": url}
    if not errors:
        raise DownloadError(f"no URL to download {remote.filename} from")
    hint = (f"; no network? Download {remote.filename} yourself ({', '.join(remote.urls) or 'see the docs'}) into "
            f"{folder} and run again" if _offline(errors) else "")
    raise DownloadError(f"cannot download {remote.filename}: " + "; ".join(errors) + hint)


def with_hashes(remote: Remote, hashes: Mapping[str, str], size: int | None = None) -> Remote:
    """``remote`` with other hashes and size (a test's own archive, a new upstream release)."""
    return replace(remote, hashes=dict(hashes), size=size)
