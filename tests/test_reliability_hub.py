"""`push` without a usable network (issue 14): offline, unreachable endpoint, HTTP errors, dropped
connections — each one `error:` line naming the repo, exit 2, no traceback."""

from __future__ import annotations

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from reliab_helpers import assert_one_error, write_peft
from typer.testing import CliRunner

from mergekit_lora.cli.main import app


@pytest.fixture
def folder(tmp_path, monkeypatch):
    import huggingface_hub.constants as c

    out = tmp_path / "out"
    assert CliRunner().invoke(app, ["merge", str(write_peft(tmp_path / "a")), "-o", str(out)]).exit_code == 0
    monkeypatch.setenv("HF_TOKEN", "hf_TESTsecret0123456789")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    return out


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class _Server:
    """A local endpoint answering every request with ``status`` (or dropping the connection when 0)."""

    def __init__(self, status: int) -> None:
        status_ = status

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _any(self):
                if status_ == 0:
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                body = b'{"error": "boom"}'
                self.send_response(status_)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_HEAD = do_PUT = _any

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *a):
        self.httpd.shutdown()
        self.httpd.server_close()


def push(folder):
    result = CliRunner().invoke(app, ["push", str(folder), "org/merged"])
    assert "hf_TESTsecret" not in result.output
    assert len(result.output.strip().splitlines()) <= 3, result.output
    return result


def test_push_offline(folder, monkeypatch):
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    assert_one_error(push(folder), ["pushing to org/merged needs the network but HF_HUB_OFFLINE is set"])


def test_push_unreachable_endpoint(folder, monkeypatch):
    url = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("HF_ENDPOINT", url)
    assert_one_error(push(folder), ["pushing to org/merged failed", f"the Hub at {url} cannot be reached"])


@pytest.mark.parametrize("status,fragments", [
    (500, ["the Hub answered HTTP 500", "try again later"]),
    (403, ["the Hub answered HTTP 403", "write access"]),
    (0, ["pushing to org/merged failed"]),  # the server drops the connection
])
def test_push_http_errors(folder, monkeypatch, status, fragments):
    with _Server(status) as srv:
        monkeypatch.setenv("HF_ENDPOINT", srv.url)
        assert_one_error(push(folder), ["pushing to org/merged failed", *fragments])
