"""Downloads that verify, retry, resume, and say what to do when the machine is offline.

`download(url, dest, sha256)` streams `url` into `dest.part`, then renames it to `dest`:

- An existing `dest` with the expected sha256 (or any existing `dest` when no hash is
  given) is reused without touching the network; one with the wrong hash is replaced.
- A leftover `dest.part` is resumed with an HTTP `Range: bytes=N-` request. A server that
  ignores Range (answers 200 instead of 206) restarts the file from byte 0; one that answers
  416 (the part is already as long as the file, or longer) restarts it too.
- Connection errors, timeouts, short reads and HTTP 5xx/429 are retried up to `retries`
  more times with exponential backoff (`backoff * 2**attempt` seconds); the partial file is
  kept between attempts so the next one resumes. Other HTTP errors (404, 403) fail at once.
- When every attempt fails to connect (refused connection, no route, timeout) or the host
  name does not resolve (not retried), the RereError says the machine seems offline and
  names the exact path to place the file at.
- The sha256 of the finished file is checked before the rename: a mismatch deletes the file
  and raises a RereError naming the URL and both hashes.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from rere import RereError

log = logging.getLogger(__name__)

CHUNK = 1 << 16  # bytes per read


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _Retryable(Exception):
    """One attempt failed in a way that another attempt may fix."""

    def __init__(self, reason: str, connect: bool = False, final: bool = False):
        super().__init__(reason)
        self.connect = connect  # True: we never reached the server
        self.final = final  # True: retrying cannot help (the host name does not resolve)


def _offline_error(url: str, dest: Path, reason: str) -> RereError:
    return RereError(
        f"could not reach {url} ({reason}). This machine seems offline or cannot reach that host. "
        f"Download the file on a machine with network access and place it at {dest.resolve()} "
        "(that exact path; keep the file name), then run the command again."
    )


def _attempt(url: str, part: Path, timeout: float) -> None:
    """Fetch the rest of `url` into `part` (resuming from its current size)."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "rere-download/1"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:  # the part is complete or longer than the file: start over
            log.warning("%s: server refused to resume at byte %d (416); restarting the download", url, offset)
            part.unlink(missing_ok=True)
            raise _Retryable("HTTP 416 on resume") from None
        if exc.code >= 500 or exc.code == 429:
            raise _Retryable(f"HTTP {exc.code} {exc.reason}") from None
        raise RereError(
            f"{url}: HTTP {exc.code} {exc.reason}; check the URL (config key 'url' or 'base_url')."
        ) from None
    except urllib.error.URLError as exc:
        dns = isinstance(exc.reason, socket.gaierror)
        raise _Retryable(
            f"name lookup failed: {exc.reason}" if dns else str(exc.reason), connect=True, final=dns
        ) from None
    except (TimeoutError, ConnectionError, OSError) as exc:
        raise _Retryable(f"{type(exc).__name__}: {exc}", connect=True) from None

    with response:
        if offset and response.status == 206:
            mode, done = "ab", offset
        else:
            if offset:
                log.warning("%s: server ignored the Range request; restarting from byte 0", url)
            mode, done = "wb", 0
        length = response.headers.get("Content-Length")
        expected = done + int(length) if length is not None else None
        with (
            open(part, mode) as f,
            tqdm(
                total=expected, initial=done, unit="B", unit_scale=True, desc=part.name[:-5], disable=None, leave=False
            ) as bar,
        ):
            try:
                while True:
                    chunk = response.read(CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                    done += len(chunk)
                    bar.update(len(chunk))
            except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as exc:
                raise _Retryable(f"connection lost after {done} bytes ({type(exc).__name__})") from None
    # urllib returns b"" rather than raising when the server closes early: compare lengths.
    if expected is not None and done < expected:
        raise _Retryable(f"connection closed after {done} of {expected} bytes")


def download(
    url: str,
    dest: str | Path,
    sha256: str | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    backoff: float = 2.0,
) -> Path:
    """Download `url` to `dest` (see the module docstring); return `dest`.

    `retries`: attempts after the first; `timeout`: seconds per connect/read;
    `backoff`: seconds before the first retry, doubled each time.
    """
    dest = Path(dest)
    sha256 = sha256.lower() if sha256 else None
    if dest.exists():
        if sha256 is None:
            log.info("%s exists; not downloading again (no sha256 to check)", dest)
            return dest
        actual = sha256_of(dest)
        if actual == sha256:
            log.info("%s exists with the expected sha256; not downloading again", dest)
            return dest
        log.warning("%s exists but its sha256 is %s, not %s; downloading it again", dest, actual, sha256)
        dest.unlink()
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    if part.exists():
        log.info("resuming %s from byte %d", url, part.stat().st_size)
    else:
        log.info("downloading %s -> %s", url, dest)

    last: _Retryable | None = None
    ever_connected = False
    attempts = 0
    while True:
        try:
            attempts += 1
            _attempt(url, part, timeout)
            break
        except _Retryable as exc:
            last = exc
            ever_connected |= not exc.connect
            if exc.final or attempts > retries:
                if not ever_connected:
                    raise _offline_error(url, dest, str(last)) from None
                raise RereError(
                    f"{url}: download failed after {attempts} attempts ({last}); the partial file "
                    f"{part} is kept and the next run resumes it. Or place the file at {dest.resolve()} by hand."
                ) from None
        wait = backoff * 2 ** (attempts - 1)
        log.warning("%s: %s; retry %d/%d in %.1fs", url, last, attempts, retries, wait)
        time.sleep(wait)

    actual = sha256_of(part)
    if sha256 is None:
        log.warning("%s: no sha256 to check against; got %s (set 'sha256' in the config to pin it)", url, actual)
    elif actual != sha256:
        part.unlink()
        raise RereError(
            f"{url}: sha256 mismatch: expected {sha256}, got {actual}. The file was deleted; "
            "check the URL and the 'sha256' config key (a mirror may serve a different file)."
        )
    os.replace(part, dest)
    log.info("saved %s (sha256 %s)", dest, actual)
    return dest
