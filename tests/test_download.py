"""The IWSLT'14 download against a local HTTP server serving a generated archive: resume with
Range, 416 re-checked, MD5 enforced (unless --allow-md5-mismatch), an archive on disk verified."""

import hashlib
import http.client
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fairseq_asam.errors import FairseqAsamError
from fairseq_asam.experiments import prepare, synthetic_data
from fairseq_asam.experiments.cli import prepare_main

RANGE = re.compile(r"^bytes=(\d+)-$")


class ArchiveHandler(BaseHTTPRequestHandler):
    """Serves `server.payload` at any path, with `Range: bytes=N-` (206, or 416 with
    `Content-Range: bytes */SIZE` past the end).  `server.cut_first` sends only that many bytes
    of the first whole-file reply and closes the connection (a dropped download)."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        payload = server.payload
        requested = self.headers.get("Range")
        server.requests.append(requested)
        start = 0
        if requested:
            match = RANGE.match(requested)
            start = int(match.group(1))
            if start >= len(payload):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(payload)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        else:
            self.send_response(200)
        body = payload[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if server.cut_first is not None and not requested:
            self.wfile.write(body[: server.cut_first])
            server.cut_first = None
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def archive_bytes(tmp_path_factory):
    path = synthetic_data.build_sample_archive(
        str(tmp_path_factory.mktemp("archive") / "de-en.tgz"), n_train=200, n_dev=4
    )
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture
def server(archive_bytes, monkeypatch):
    monkeypatch.setattr(prepare, "DOWNLOAD_RETRY_SECONDS", 0.0)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ArchiveHandler)
    httpd.payload, httpd.requests, httpd.cut_first = archive_bytes, [], None
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/fairseq/data/iwslt14/de-en.tgz"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_the_default_mirror_is_https():
    assert prepare.DOWNLOAD_URL.startswith("https://dl.fbaipublicfiles.com/")


def test_a_dropped_download_resumes_with_a_range_request(server, archive_bytes, tmp_path):
    server.cut_first = len(archive_bytes) // 3
    destination = tmp_path / "orig" / "de-en.tgz"
    prepare.download_archive(server.url, str(destination), md5=md5(archive_bytes))
    assert destination.read_bytes() == archive_bytes
    assert server.requests == [None, f"bytes={len(archive_bytes) // 3}-"]
    assert not (tmp_path / "orig" / "de-en.tgz.download").exists()


def test_a_416_reply_accepts_a_whole_part_file_after_checking_size_and_md5(
    server, archive_bytes, tmp_path
):
    destination = tmp_path / "de-en.tgz"
    (tmp_path / "de-en.tgz.download").write_bytes(archive_bytes)  # interrupted before the rename
    prepare.download_archive(server.url, str(destination), md5=md5(archive_bytes))
    assert destination.read_bytes() == archive_bytes
    assert server.requests == [f"bytes={len(archive_bytes)}-"]  # 416: nothing left to fetch


def test_a_416_reply_with_another_size_downloads_again(server, archive_bytes, tmp_path):
    destination = tmp_path / "de-en.tgz"
    # Longer than the file (e.g. a part file of another file): the server answers 416.
    (tmp_path / "de-en.tgz.download").write_bytes(archive_bytes + b"junk")
    prepare.download_archive(server.url, str(destination), md5=md5(archive_bytes))
    assert destination.read_bytes() == archive_bytes
    assert server.requests == [f"bytes={len(archive_bytes) + 4}-", None]


def test_a_416_reply_with_a_corrupt_part_file_of_the_right_size_fails_the_md5(
    server, archive_bytes, tmp_path
):
    destination = tmp_path / "de-en.tgz"
    corrupt = bytes([archive_bytes[0] ^ 0xFF]) + archive_bytes[1:]
    (tmp_path / "de-en.tgz.download").write_bytes(corrupt)
    with pytest.raises(FairseqAsamError, match=f"MD5 {md5(corrupt)} differs from the expected"):
        prepare.download_archive(server.url, str(destination), md5=md5(archive_bytes))
    assert not destination.exists()
    assert not (tmp_path / "de-en.tgz.download").exists()  # removed: the next try starts afresh
    prepare.download_archive(server.url, str(destination), md5=md5(archive_bytes))
    assert destination.read_bytes() == archive_bytes


def test_an_md5_mismatch_is_an_error_unless_allowed(server, archive_bytes, tmp_path, caplog):
    destination = tmp_path / "de-en.tgz"
    expected = "0" * 32
    with pytest.raises(FairseqAsamError) as error:
        prepare.download_archive(server.url, str(destination), md5=expected)
    message = str(error.value)
    assert f"downloaded from {server.url}:" in message and md5(archive_bytes) in message
    assert f"differs from the expected {expected}" in message and "--allow-md5-mismatch" in message
    assert not destination.exists()
    prepare.download_archive(server.url, str(destination), md5=expected, allow_md5_mismatch=True)
    assert destination.read_bytes() == archive_bytes
    assert "--allow-md5-mismatch: used anyway" in caplog.text


def test_an_archive_already_present_is_verified(server, archive_bytes, tmp_path):
    destination = tmp_path / "de-en.tgz"
    destination.write_bytes(archive_bytes)
    assert prepare.download_archive(server.url, str(destination), md5=md5(archive_bytes))
    assert server.requests == []  # verified, not downloaded again
    destination.write_bytes(archive_bytes[:-10])  # truncated on disk
    with pytest.raises(
        FairseqAsamError, match=f"archive already present: {destination}: MD5 .* delete it"
    ):
        prepare.download_archive(server.url, str(destination), md5=md5(archive_bytes))
    assert destination.read_bytes() == archive_bytes[:-10]  # the user's file is left alone
    assert server.requests == []


def test_the_mirrors_md5_is_the_default(server, tmp_path):
    with pytest.raises(FairseqAsamError, match=f"differs from the expected {prepare.ARCHIVE_MD5}"):
        prepare.download_archive(server.url, str(tmp_path / "de-en.tgz"))


def test_prepare_cli_downloads_checks_and_prepares(server, archive_bytes, tmp_path, capsys):
    argv = ["--workdir", str(tmp_path), "--download-url", server.url, "--workers", "1"]
    assert prepare_main(argv + ["--download-md5", "not-a-hash"]) == 1
    assert (
        capsys.readouterr().err.strip()
        == "fairseq-asam-prepare: error: --download-md5 must be 32 hexadecimal digits, "
        "got 'not-a-hash'"
    )
    assert server.requests == [] and not (tmp_path / "orig").exists()  # before any work
    assert prepare_main(argv) == 1  # the sample is not the mirror's file
    assert "differs from the expected" in capsys.readouterr().err
    assert prepare_main(argv + ["--download-md5", md5(archive_bytes).upper()]) == 0
    data_bin = capsys.readouterr().out.strip().splitlines()[-1]
    assert os.path.isfile(os.path.join(data_bin, "dict.en.txt"))
    assert (tmp_path / "orig" / "de-en.tgz").read_bytes() == archive_bytes


def test_an_incomplete_read_is_retried(monkeypatch, tmp_path):
    """http.client's IncompleteRead (not an OSError) counts as a failed attempt too."""
    calls = []

    def failing(url, partial):
        calls.append(url)
        raise http.client.IncompleteRead(b"", 10)

    monkeypatch.setattr(prepare, "_download_resuming", failing)
    monkeypatch.setattr(prepare, "DOWNLOAD_RETRY_SECONDS", 0.0)
    with pytest.raises(FairseqAsamError, match="download failed 2 times"):
        prepare.download_archive("http://x/de-en.tgz", str(tmp_path / "a.tgz"), attempts=2)
    assert len(calls) == 2
