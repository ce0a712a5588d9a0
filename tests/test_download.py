"""rere.download against a real HTTP server on 127.0.0.1: checksums, resume, retry, offline."""

import hashlib
import socket

import pytest
from fixtures.loopback_http import LoopbackServer, closed_port_url

from rere import RereError
from rere.download import download

DATA = bytes(range(256)) * 40  # 10,240 bytes
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def server():
    with LoopbackServer() as s:
        s.files["file.bin"] = DATA
        yield s


def test_checksum_ok_then_skip(server, tmp_path):
    dest = tmp_path / "dl" / "file.bin"
    assert download(f"{server.url}/file.bin", dest, sha256=SHA.upper(), backoff=0) == dest
    assert dest.read_bytes() == DATA
    assert not (tmp_path / "dl" / "file.bin.part").exists()
    # Present with the right hash: no second request.
    download(f"{server.url}/file.bin", dest, sha256=SHA, backoff=0)
    assert len(server.requests) == 1


def test_existing_file_with_wrong_hash_is_replaced(server, tmp_path):
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"stale")
    download(f"{server.url}/file.bin", dest, sha256=SHA, backoff=0)
    assert dest.read_bytes() == DATA and len(server.requests) == 1


def test_checksum_mismatch_deletes_and_names_both_hashes(server, tmp_path):
    dest = tmp_path / "file.bin"
    wrong = "0" * 64
    with pytest.raises(RereError) as info:
        download(f"{server.url}/file.bin", dest, sha256=wrong, backoff=0)
    msg = str(info.value)
    assert f"{server.url}/file.bin" in msg and wrong in msg and SHA in msg
    assert list(tmp_path.iterdir()) == []


def test_resume_after_cut_connection_uses_range(server, tmp_path):
    dest = tmp_path / "file.bin"
    download(f"{server.url}/cut/file.bin", dest, sha256=SHA, retries=2, backoff=0)
    assert dest.read_bytes() == DATA
    # First request had no Range and got 5,120 bytes; the retry asked for the rest only.
    assert server.requests == [("/cut/file.bin", None), ("/cut/file.bin", "bytes=5120-")]


def test_resume_from_leftover_part_file(server, tmp_path):
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(DATA[:1000])
    download(f"{server.url}/file.bin", dest, sha256=SHA, backoff=0)
    assert dest.read_bytes() == DATA
    assert server.requests == [("/file.bin", "bytes=1000-")]


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(b"garbage-prefix")
    download(f"{server.url}/norange/file.bin", dest, sha256=SHA, backoff=0)
    assert dest.read_bytes() == DATA  # not garbage-prefix + DATA


def test_overlong_part_gets_416_then_restarts(server, tmp_path):
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(DATA + b"extra")
    download(f"{server.url}/file.bin", dest, sha256=SHA, retries=1, backoff=0)
    assert dest.read_bytes() == DATA
    assert server.requests == [("/file.bin", f"bytes={len(DATA) + 5}-"), ("/file.bin", None)]


def test_retry_after_500(server, tmp_path):
    dest = tmp_path / "file.bin"
    download(f"{server.url}/flaky/file.bin", dest, sha256=SHA, retries=1, backoff=0)
    assert dest.read_bytes() == DATA and len(server.requests) == 2


def test_500_with_no_retries_left_fails_and_keeps_nothing(server, tmp_path):
    dest = tmp_path / "file.bin"
    with pytest.raises(RereError, match="failed after 1 attempts .*HTTP 500"):
        download(f"{server.url}/flaky/file.bin", dest, sha256=SHA, retries=0, backoff=0)
    assert not dest.exists()


def test_404_fails_at_once(server, tmp_path):
    with pytest.raises(RereError, match="HTTP 404"):
        download(f"{server.url}/nothing.bin", tmp_path / "x", retries=3, backoff=0)
    assert len(server.requests) == 1


def test_offline_message_names_url_and_exact_path(tmp_path):
    url = closed_port_url()
    dest = tmp_path / "downloads" / "file.bin"
    with pytest.raises(RereError) as info:
        download(url, dest, retries=1, backoff=0, timeout=5)
    msg = str(info.value)
    assert url in msg and "seems offline" in msg and str(dest.resolve()) in msg
    assert not dest.exists()


def test_unresolvable_host_fails_at_once_as_offline(tmp_path, monkeypatch):
    def no_dns(*args, **kwargs):
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    sleeps = []
    monkeypatch.setattr("rere.download.time.sleep", sleeps.append)
    url = "https://files.example.invalid/x.zip"
    with pytest.raises(RereError, match=r"name lookup failed.*seems offline.*downloads/x\.zip"):
        download(url, tmp_path / "downloads" / "x.zip", retries=3)
    assert sleeps == []  # no backoff: a name that does not resolve will not resolve on retry
