"""Birdsnap downloader against a local HTTP server (127.0.0.1 only)."""

import collections
import hashlib
import http.server
import os
import threading
import time

import pytest

from keras_cwsn.data import birdsnap

SLOW_SECONDS = 1.5
TIMEOUT = 0.5  # First request of the slow file times out; its retry is answered at once.


def _md5(data):
    return hashlib.md5(data).hexdigest()


class _Server:
    """Serves `files` (url path -> bytes); counts hits; `/wrong/...` serves other bytes."""

    def __init__(self, files):
        self.files = files
        self.hits = collections.Counter()
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with server.lock:
                    server.hits[self.path] += 1
                    first = server.hits[self.path] == 1
                try:
                    if self.path.startswith("/slow/") and first:
                        time.sleep(SLOW_SECONDS)
                    if self.path.startswith("/wrong/"):
                        body = b"not the image you are looking for"
                    elif self.path in server.files:
                        body = server.files[self.path]
                    else:
                        self.send_error(404, "Not Found")
                        return
                    self.send_response(200)
                    self.send_header("Content-Type", "image/jpeg")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # Client gave up (timeout).
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    contents = {
        "/good/Golden_Eagle/1.jpg": b"\xff\xd8eagle one",
        "/good/Golden_Eagle/2.jpg": b"\xff\xd8eagle two",
        "/good/Brant/1.jpg": b"\xff\xd8brant",
        "/slow/Brant/slow.jpg": b"\xff\xd8slow brant",
        "/wrong/Bald_Eagle/bad.jpg": b"\xff\xd8what images.txt promises",
        "/good/Acadian_Flycatcher/1.jpg": b"\xff\xd8not in birdsnap34",
        "/good/evil.jpg": b"\xff\xd8evil",
    }
    s = _Server(contents)
    s.contents = contents
    yield s
    s.close()


def _write_images_file(path, server, absolute_target):
    c = server.contents
    rows = [
        (f"{server.url}/good/Golden_Eagle/1.jpg", _md5(c["/good/Golden_Eagle/1.jpg"]), "Golden_Eagle/1.jpg", "4"),
        (f"{server.url}/good/Golden_Eagle/2.jpg", _md5(c["/good/Golden_Eagle/2.jpg"]), "Golden_Eagle/2.jpg", "4"),
        (f"{server.url}/good/Brant/1.jpg", _md5(c["/good/Brant/1.jpg"]), "Brant/1.jpg", "57"),
        (f"{server.url}/slow/Brant/slow.jpg", _md5(c["/slow/Brant/slow.jpg"]), "Brant/slow.jpg", "57"),
        (f"{server.url}/wrong/Bald_Eagle/bad.jpg", _md5(c["/wrong/Bald_Eagle/bad.jpg"]), "Bald_Eagle/bad.jpg", "17"),
        (f"{server.url}/good/Brant/gone.jpg", "0" * 32, "Brant/gone.jpg", "57"),
        (f"{server.url}/good/Acadian_Flycatcher/1.jpg", _md5(c["/good/Acadian_Flycatcher/1.jpg"]), "Acadian_Flycatcher/1.jpg", "1"),
        (f"{server.url}/good/evil.jpg", _md5(c["/good/evil.jpg"]), "../evil.jpg", "4"),
        (f"{server.url}/good/evil.jpg", _md5(c["/good/evil.jpg"]), absolute_target, "4"),
    ]
    with open(path, "w") as f:
        f.write("url\tmd5\tpath\tspecies_id\tbb_x1\tbb_y1\tbb_x2\tbb_y2\n")
        for row in rows:
            f.write("\t".join(row) + "\t1\t2\t3\t4\n")


def _all_files(root):
    return sorted(
        os.path.relpath(os.path.join(d, name), root) for d, _, names in os.walk(root) for name in names
    )


def _read_failed(out):
    with open(os.path.join(out, "failed.tsv")) as f:
        lines = f.read().splitlines()
    assert lines[0] == "url\tpath\treason"
    return {line.split("\t")[1]: line.split("\t")[2] for line in lines[1:]}


def test_download_retry_md5_and_resume(server, tmp_path, capsys):
    meta = tmp_path / "meta"
    meta.mkdir()
    absolute_target = str(tmp_path / "abs_evil.jpg")
    images_file = meta / "images.txt"
    _write_images_file(images_file, server, absolute_target)
    (meta / "species.txt").write_text("id\tcommon\tscientific\tdir\n4\tGolden Eagle\tAquila chrysaetos\tGolden_Eagle\n")
    (meta / "test_images.txt").write_text("path\nGolden_Eagle/2.jpg\n")
    out = tmp_path / "out"
    argv = [
        "download", "--images-file", str(images_file), "--out", str(out), "--subset", "birdsnap34",
        "--workers", "4", "--retries", "1", "--timeout", str(TIMEOUT), "--backoff-base", "0.01",
        "--no-progress",
    ]

    rc = birdsnap.main(argv)
    stdout = capsys.readouterr().out
    assert rc == 1
    assert "4 downloaded, 0 already ok, 4 failed" in stdout

    # Good files (and the slow one, after a timed-out first try) are there with the right md5.
    c = server.contents
    for rel, key in [
        ("Golden_Eagle/1.jpg", "/good/Golden_Eagle/1.jpg"),
        ("Golden_Eagle/2.jpg", "/good/Golden_Eagle/2.jpg"),
        ("Brant/1.jpg", "/good/Brant/1.jpg"),
        ("Brant/slow.jpg", "/slow/Brant/slow.jpg"),
    ]:
        assert _md5((out / "images" / rel).read_bytes()) == _md5(c[key])
    assert server.hits["/slow/Brant/slow.jpg"] == 2
    # Wrong md5: tried 1 + retries times, nothing kept. 404: not retried.
    assert server.hits["/wrong/Bald_Eagle/bad.jpg"] == 2
    assert server.hits["/good/Brant/gone.jpg"] == 1
    # Outside the subset: never requested. Escaping paths: refused before any request.
    assert server.hits["/good/Acadian_Flycatcher/1.jpg"] == 0
    assert server.hits["/good/evil.jpg"] == 0

    failed = _read_failed(out)
    assert set(failed) == {"Bald_Eagle/bad.jpg", "Brant/gone.jpg", "../evil.jpg", absolute_target}
    assert "md5 mismatch" in failed["Bald_Eagle/bad.jpg"]
    assert "404" in failed["Brant/gone.jpg"]
    assert ".." in failed["../evil.jpg"] and "absolute" in failed[absolute_target]

    # Nothing outside --out (and no half-written temp files inside it).
    assert sorted(os.listdir(tmp_path)) == ["meta", "out"]
    assert _all_files(out) == [
        "failed.tsv",
        "images.txt",
        "images/Brant/1.jpg",
        "images/Brant/slow.jpg",
        "images/Golden_Eagle/1.jpg",
        "images/Golden_Eagle/2.jpg",
        "species.txt",
        "test_images.txt",
    ]
    assert (out / "images.txt").read_bytes() == images_file.read_bytes()

    # A rerun fetches nothing that is already there.
    before = dict(server.hits)
    rc = birdsnap.main(argv)
    stdout = capsys.readouterr().out
    assert rc == 1
    assert "0 downloaded, 4 already ok, 4 failed" in stdout
    for path in ["/good/Golden_Eagle/1.jpg", "/good/Golden_Eagle/2.jpg", "/good/Brant/1.jpg", "/slow/Brant/slow.jpg"]:
        assert server.hits[path] == before[path]
    assert set(_read_failed(out)) == set(failed)


def test_download_all_ok_without_subset(server, tmp_path, capsys):
    c = server.contents
    images_file = tmp_path / "images.txt"
    images_file.write_text(
        "url\tmd5\tpath\tspecies_id\n"
        f"{server.url}/good/Acadian_Flycatcher/1.jpg\t{_md5(c['/good/Acadian_Flycatcher/1.jpg'])}\tAcadian_Flycatcher/1.jpg\t1\n"
        f"{server.url}/good/Brant/1.jpg\t{_md5(c['/good/Brant/1.jpg'])}\tBrant/1.jpg\t57\n"
    )
    out = tmp_path / "out"
    rc = birdsnap.main(["download", "--images-file", str(images_file), "--out", str(out), "--no-progress"])
    assert rc == 0
    assert "2 downloaded, 0 already ok, 0 failed" in capsys.readouterr().out
    assert (out / "images" / "Acadian_Flycatcher" / "1.jpg").read_bytes() == c["/good/Acadian_Flycatcher/1.jpg"]
    assert _read_failed(out) == {}


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"--images-file": "/nonexistent/birdsnap/images.txt"}, "images file not found"),
        ({"--workers": "0"}, "workers must be >= 1"),
        ({"--subset": "birdsnap35"}, "birdsnap35"),
        ({"--timeout": "0"}, "timeout must be > 0"),
    ],
)
def test_bad_arguments_exit_2(tmp_path, capsys, change, needle):
    images_file = tmp_path / "images.txt"
    images_file.write_text("url\tmd5\tpath\tspecies_id\n")
    options = {"--images-file": str(images_file), "--out": str(tmp_path / "out")}
    options.update(change)
    argv = ["download", "--no-progress"] + [x for item in options.items() for x in item]
    assert birdsnap.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in captured.err


def test_images_file_without_needed_columns_exit_2(tmp_path, capsys):
    images_file = tmp_path / "images.txt"
    images_file.write_text("address\tchecksum\n")
    assert birdsnap.main(["download", "--images-file", str(images_file), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no column" in err[0]
