"""sats.download against a local HTTP server (127.0.0.1): resume with Range, mirrors, hashes, offline
messages; and `sats data prepare voc DIR --download` end to end."""

from __future__ import annotations

import hashlib
import socket

import pytest

import sats.data.prepare as prep
from archive_helpers import TinyVoc, http_server, sha256
from sats.cli import main
from sats.data.prepare import DatasetSpec
from sats.download import ChecksumError, DownloadError, Remote, check_file, download, resolve_urls

DATA = bytes(range(256)) * 4000  # 1 MB
DIGEST = hashlib.sha256(DATA).hexdigest()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed


def test_an_interrupted_download_resumes_with_a_range_request(tmp_path):
    with http_server({"/f.bin": DATA}) as server:
        remote = Remote("f.bin", (f"{server.url}/f.bin",), size=len(DATA), hashes={"sha256": DIGEST})
        server.cut_once["/f.bin"] = 300_000
        with pytest.raises(DownloadError, match="run again to resume"):
            download(remote, tmp_path, progress=False)
        part = tmp_path / "f.bin.part"
        assert part.stat().st_size == 300_000 and not (tmp_path / "f.bin").exists()
        path, record = download(remote, tmp_path, progress=False)
        assert server.requests[-1] == ("/f.bin", "bytes=300000-")
    assert path.read_bytes() == DATA and not part.exists()
    assert record["sha256"] == DIGEST and record["verified"] == ["sha256"]


def test_a_server_that_ignores_range_sends_it_all_again(tmp_path):
    with http_server({"/f.bin": DATA}) as server:
        server.ignore_range.add("/f.bin")
        (tmp_path / "f.bin.part").write_bytes(DATA[:1000])
        path, _ = download(Remote("f.bin", (f"{server.url}/f.bin",), hashes={"sha256": DIGEST}), tmp_path,
                           progress=False)
    assert path.read_bytes() == DATA


def test_a_stale_partial_file_longer_than_the_file_starts_over(tmp_path):
    with http_server({"/f.bin": DATA}) as server:
        (tmp_path / "f.bin.part").write_bytes(DATA + b"more")  # size unknown: the server answers 416
        path, _ = download(Remote("f.bin", (f"{server.url}/f.bin",), hashes={"sha256": DIGEST}), tmp_path,
                           progress=False)
    assert path.read_bytes() == DATA


def test_mirrors_are_tried_in_order_and_every_failure_is_named(tmp_path):
    with http_server({"/mirror/f.bin": DATA, "/bad/f.bin": b"not it"}) as server:
        remote = Remote("f.bin", (f"{server.url}/official/f.bin",), hashes={"md5": hashlib.md5(DATA).hexdigest()})
        urls = resolve_urls(remote, mirrors=[f"{server.url}/bad/", f"{server.url}/mirror"])
        assert urls == [f"{server.url}/bad/f.bin", f"{server.url}/mirror/f.bin", f"{server.url}/official/f.bin"]
        path, record = download(remote, tmp_path, urls, progress=False)
        assert record["url"] == f"{server.url}/mirror/f.bin" and record["verified"] == ["md5"]
        path.unlink()
        with pytest.raises(DownloadError) as caught:
            download(remote, tmp_path, [f"{server.url}/bad/f.bin", f"{server.url}/official/f.bin"], progress=False)
    message = str(caught.value)
    assert "\n" not in message and "md5" in message and "HTTP 404" in message
    assert not list(tmp_path.iterdir())  # the wrong file's .part was removed


def test_offline_gives_one_clear_message(tmp_path, monkeypatch):
    port = closed_port()
    remote = Remote("f.bin", (f"http://127.0.0.1:{port}/f.bin",))
    with pytest.raises(DownloadError, match=r"connection refused; no network\? Download f.bin yourself"):
        download(remote, tmp_path, progress=False)

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(DownloadError, match="cannot resolve the host name"):
        download(Remote("f.bin", ("http://archive.example/f.bin",)), tmp_path, progress=False)


def test_existing_files_are_verified_with_every_known_hash(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(DATA)
    record = check_file(path, Remote("f.bin", (), size=len(DATA), hashes={"sha256": DIGEST[:8]}), progress=False)
    assert record["verified"] == ["sha256"]  # a leading part (torchvision's file names) counts
    with pytest.raises(ChecksumError, match=r"f.bin: sha1 [0-9a-f]{40}, expected 00ff"):
        download(Remote("f.bin", ("http://127.0.0.1:1/f.bin",), hashes={"sha1": "00ff"}), tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown hash algorithms"):
        Remote("f.bin", (), hashes={"crc32": "0"})


def test_sats_data_prepare_voc_download(tmp_path, monkeypatch, capsys):
    world = TinyVoc()
    built = tmp_path / "built"
    built.mkdir()
    files = {}
    table = dict(prep.ARCHIVES)
    for name, make in (("VOCtrainval_11-May-2012.tar", world.voc_tar), ("SegmentationClassAug.zip", world.aug_zip)):
        path = make(built / name)
        files[f"/mirror/{name}"] = path.read_bytes()
        table[name] = Remote(name, ("http://127.0.0.1:9/unused",), size=path.stat().st_size,
                             hashes={"sha256": sha256(path)})
    monkeypatch.setattr(prep, "ARCHIVES", table)
    monkeypatch.setitem(prep.SPECS, "voc", DatasetSpec("voc", {"train": 5, "val": 2}, 21))
    target = tmp_path / "data" / "voc"
    with http_server(files) as server:
        server.cut_once["/mirror/VOCtrainval_11-May-2012.tar"] = 5000
        args = ["data", "prepare", "voc", str(target), "--download", "--mirror", f"{server.url}/mirror"]
        assert main(args) == 7  # the first try is cut off: one message, the partial file kept
        err = capsys.readouterr().err
        assert err.count("sats: error:") == 1 and "run again to resume" in err and not target.exists()
        assert main(args) == 0
    out = capsys.readouterr().out
    assert "voc ready (train 5, val 2" in out and "(sha256 verified)" in out
    assert (tmp_path / "data" / "archives" / "VOCtrainval_11-May-2012.tar").is_file()
    assert len((target / "splits" / "train_aug.txt").read_text().splitlines()) == 5
    port = closed_port()
    assert main(["data", "prepare", "voc", str(tmp_path / "v2"), "--download", "--archives", str(tmp_path / "a2"),
                 "--mirror", f"http://127.0.0.1:{port}"]) == 7
    assert "no network?" in capsys.readouterr().err
