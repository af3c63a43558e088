"""Downloaded files land only verified, in one rename; failures leave nothing and say what to do; cached copies
are checked again. Nothing here leaves the machine: files come from file:// URLs or a server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.server
import re
import threading
import urllib.request

import pytest

from brickwork import assets
from brickwork.errors import BrickworkError

DATA = bytes(range(256)) * 4099  # a little over 1 MiB: more than one block
PIN = assets.Pin(hashlib.sha256(DATA).hexdigest(), len(DATA))
HINT = "Put the file there by hand."


@pytest.fixture
def source(tmp_path):
    """A file:// URL serving DATA."""
    path = tmp_path / "served" / "thing-1.0.tar.gz"
    path.parent.mkdir()
    path.write_bytes(DATA)
    return path.as_uri()


@pytest.fixture
def cache(isolated_home):
    return assets.cache_folder("archives")


def test_a_download_lands_verified_under_brickwork_home(source, cache, isolated_home):
    assert cache == isolated_home / "archives"
    target = assets.download(source, cache / "thing-1.0.tar.gz", PIN, HINT, progress=False)
    assert target.read_bytes() == DATA
    assert [p.name for p in cache.iterdir()] == ["thing-1.0.tar.gz"]  # no temporary left beside it
    assert assets.file_digest(target) == (len(DATA), PIN.sha256)
    assert assets.sha256_of(target) == PIN.sha256


def test_the_file_appears_only_once_written_and_verified(cache):
    target = cache / "joined.gguf"
    with assets.verified_file(target, PIN, "the joined file has", HINT, progress=False) as out:
        out.write(DATA[:1000])
        out.describe("part 2/2")
        out.write(DATA[1000:])
        assert not target.exists()
        [partial] = cache.iterdir()  # written beside the target under a temporary name
        assert partial.name.startswith(".joined.gguf.brickwork-tmp-")
    assert target.read_bytes() == DATA and [p.name for p in cache.iterdir()] == ["joined.gguf"]


def test_an_error_while_writing_leaves_nothing(cache):
    with (
        pytest.raises(RuntimeError, match="a part failed"),
        assets.verified_file(cache / "joined.gguf", PIN, "the joined file has", HINT, progress=False) as out,
    ):
        out.write(DATA[:10])
        raise RuntimeError("a part failed")
    assert list(cache.iterdir()) == []


def test_a_checksum_mismatch_is_refused_and_leaves_nothing(source, cache):
    wrong = assets.Pin("0" * 64)
    with pytest.raises(BrickworkError) as raised:
        assets.download(source, cache / "thing-1.0.tar.gz", wrong, HINT, progress=False)
    message = str(raised.value)
    assert f"{source} downloaded with sha256 {PIN.sha256}, not the pinned {'0' * 64}" in message
    assert message.endswith(f"not using it. {HINT}")
    assert list(cache.iterdir()) == []
    short = assets.Pin(PIN.sha256, len(DATA) - 1)  # the right bytes, but not the pinned size
    with pytest.raises(BrickworkError, match=f"\\({len(DATA):,} bytes; pinned: {len(DATA) - 1:,}\\)"):
        assets.download(source, cache / "thing-1.0.tar.gz", short, HINT, progress=False)
    assert list(cache.iterdir()) == []


class _CutShort(http.server.BaseHTTPRequestHandler):
    """Announces DATA's length, sends part of it, and closes the connection."""

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(DATA)))
        self.end_headers()
        self.wfile.write(DATA[:5000])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def cut_short_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CutShort)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/thing-1.0.tar.gz"
    server.shutdown()
    server.server_close()


def test_a_truncated_download_is_a_network_failure_and_leaves_nothing(cut_short_url, cache):
    with pytest.raises(BrickworkError) as raised:
        assets.download(cut_short_url, cache / "thing-1.0.tar.gz", PIN, HINT, progress=False)
    message = str(raised.value)
    assert message.startswith(f"Downloading {cut_short_url} failed (")
    assert assets.NETWORK_NOTE in message and message.endswith(HINT)
    assert "not the pinned" not in message  # said as a cut connection, not as a wrong file
    assert list(cache.iterdir()) == []


def test_an_unreachable_url_names_itself_and_the_way_out(tmp_path, cache):
    url = (tmp_path / "absent.tar.gz").as_uri()
    with pytest.raises(BrickworkError) as raised:
        assets.fetch(url, cache / "absent.tar.gz", PIN, HINT, progress=False)
    message = str(raised.value)
    assert message.startswith(f"Downloading {url} failed (") and assets.NETWORK_NOTE in message
    assert message.endswith(HINT)
    assert list(cache.iterdir()) == []  # the folder is there, for a copy put there by hand, and empty


def test_a_cached_file_is_checked_and_reused_without_downloading(source, cache, monkeypatch):
    target = assets.fetch(source, cache / "thing-1.0.tar.gz", PIN, HINT, progress=False)

    def no_network(*args, **kwargs):
        raise AssertionError("downloaded although the cached copy is good")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    assert assets.fetch(source, target, PIN, HINT, progress=False) == target
    assert target.read_bytes() == DATA


def test_a_corrupted_cached_file_is_detected(source, cache, monkeypatch):
    target = cache / "thing-1.0.tar.gz"
    cache.mkdir(parents=True)
    target.write_bytes(DATA[:-1] + b"x")  # same size, one byte changed
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("downloaded over it"))
    with pytest.raises(BrickworkError) as raised:
        assets.fetch(source, target, PIN, HINT, progress=False)
    message = str(raised.value)
    assert re.match(
        rf"{re.escape(str(target))} has sha256 [0-9a-f]{{64}}, not the pinned {PIN.sha256}", message
    )
    assert f"delete it (brickwork then downloads {source} again)" in message and message.endswith(HINT)
    assert target.read_bytes() == DATA[:-1] + b"x"  # reported, not deleted: it may be the user's copy


def test_verify_file_refuses_a_missing_or_wrong_file(tmp_path):
    with pytest.raises(BrickworkError, match=f"absent.bin does not exist. {HINT}"):
        assets.verify_file(tmp_path / "absent.bin", PIN, HINT)
    (tmp_path / "mine.bin").write_bytes(b"mine")
    with pytest.raises(
        BrickworkError, match="the file from MY_VAR has sha256 .*\\(4 bytes; pinned: .*it is not it"
    ):
        assets.verify_file(
            tmp_path / "mine.bin", PIN, HINT, "it is not it", subject="the file from MY_VAR has"
        )
    (tmp_path / "mine.bin").write_bytes(DATA)
    assert assets.verify_file(tmp_path / "mine.bin", PIN, HINT) == tmp_path / "mine.bin"


def test_a_pin_is_validated():
    with pytest.raises(ValueError, match="64 lower-case hex"):
        assets.Pin("ABC")
    with pytest.raises(ValueError, match="at least 0"):
        assets.Pin("0" * 64, -1)
