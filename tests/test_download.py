"""The IWSLT'14 download against a local HTTP server serving a generated archive: a dropped
download leaves nothing and the next starts again, the MD5 enforced, an archive on disk reused."""

import hashlib
import http.client
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from fairseq_asam_experiments import prepare, synthetic_data
from fairseq_asam_experiments.errors import ExperimentError


class ArchiveHandler(BaseHTTPRequestHandler):
    """Serves `server.payload` at any path.  `server.cut_first` sends only that many bytes of
    the first reply and closes the connection (a dropped download)."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        server = self.server
        server.requests.append(self.path)
        self.send_response(200)
        self.send_header("Content-Length", str(len(server.payload)))
        self.end_headers()
        if server.cut_first is not None:
            self.wfile.write(server.payload[: server.cut_first])
            server.cut_first = None
            self.close_connection = True
            return
        self.wfile.write(server.payload)

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


def test_a_dropped_download_starts_again(server, archive_bytes, tmp_path):
    server.cut_first = len(archive_bytes) // 3
    destination = tmp_path / "orig" / "de-en.tgz"
    with pytest.raises(ExperimentError, match=f"{server.url}: download failed .*run again"):
        prepare.download_archive(server.url, str(destination), md5=md5(archive_bytes))
    assert os.listdir(tmp_path / "orig") == []  # no partial file left
    prepare.download_archive(server.url, str(destination), md5=md5(archive_bytes))
    assert destination.read_bytes() == archive_bytes
    assert len(server.requests) == 2  # the cut one, then the whole file from its first byte
    assert os.listdir(tmp_path / "orig") == ["de-en.tgz"]


def test_an_md5_mismatch_is_an_error(server, archive_bytes, tmp_path):
    destination = tmp_path / "de-en.tgz"
    expected = "0" * 32
    with pytest.raises(ExperimentError) as error:
        prepare.download_archive(server.url, str(destination), md5=expected)
    message = str(error.value)
    assert f"downloaded from {server.url}:" in message and md5(archive_bytes) in message
    assert f"differs from the expected {expected}" in message and "--archive" in message
    assert os.listdir(tmp_path) == []  # the downloaded file is removed


def test_an_archive_already_downloaded_is_used(server, archive_bytes, tmp_path):
    destination = tmp_path / "de-en.tgz"
    prepare.download_archive(server.url, str(destination), md5=md5(archive_bytes))
    assert prepare.download_archive(server.url, str(destination), md5=md5(archive_bytes))
    assert len(server.requests) == 1  # not downloaded again


def test_the_mirrors_md5_is_the_default(server, tmp_path):
    with pytest.raises(ExperimentError, match=f"differs from the expected {prepare.ARCHIVE_MD5}"):
        prepare.download_archive(server.url, str(tmp_path / "de-en.tgz"))


def test_prepare_cli_downloads_checks_and_prepares(server, archive_bytes, tmp_path, capsys):
    argv = ["--data-root", str(tmp_path), "--download-url", server.url, "--bpe-merges", "100"]
    assert prepare.main(argv + ["--download-md5", "not-a-hash"]) == 1
    assert (
        capsys.readouterr().err.strip()
        == "fairseq-asam-prepare: error: --download-md5 must be 32 hexadecimal digits, "
        "got 'not-a-hash'"
    )
    assert server.requests == [] and not any(tmp_path.iterdir())  # before any work
    assert prepare.main(argv) == 1  # the sample is not the mirror's file
    assert "differs from the expected" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    assert prepare.main(argv + ["--download-md5", md5(archive_bytes).upper()]) == 0
    data_bin = capsys.readouterr().out.strip().splitlines()[-1]
    assert os.path.isfile(os.path.join(data_bin, "dict.en.txt"))
    assert (tmp_path / "de-en.tgz").read_bytes() == archive_bytes
    assert os.path.basename(os.path.dirname(data_bin)).startswith(
        f"iwslt14-de-en-{md5(archive_bytes)[:10]}"
    )
    assert len(server.requests) == 2  # the download of the mismatch, and this one


def test_an_incomplete_read_is_a_failed_download(monkeypatch, tmp_path):
    """http.client's IncompleteRead (not an OSError) is a failed download too, in one line."""

    def failing(url, timeout):
        raise http.client.IncompleteRead(b"", 10)

    monkeypatch.setattr(prepare.urllib.request, "urlopen", failing)
    with pytest.raises(ExperimentError, match="http://x/de-en.tgz: download failed"):
        prepare.download_archive("http://x/de-en.tgz", str(tmp_path / "a.tgz"))
    assert list(tmp_path.iterdir()) == []
