"""`fewstep serve`'s options, its start-up line and per-request log lines, and fewstep without FastAPI."""

import argparse
import logging
import re
import subprocess
import sys

import pytest

from fewstep.errors import FewstepError
from fewstep.serve import cli


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fewstep")
    cli.add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_defaults_bind_loopback_on_a1111s_port():
    a = parse()
    assert (a.host, a.port, a.queue, a.model, a.models_dir, a.api_auth) == ("127.0.0.1", 7860, 4, None, None, None)


def test_start_up_line_and_uvicorn_settings(monkeypatch, capsys):
    ran = {}
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: ran.update(kw, app=app))
    cli.cmd_serve(parse("--port", "7861", "--api-auth", "ann:pw", "--queue", "2"))
    assert capsys.readouterr().out == ("fewstep serve: shapes-turbo at http://127.0.0.1:7861/ (API: /sdapi/v1, its "
                                       "docs: /docs; basic auth on)\n")
    assert (ran["host"], ran["port"], ran["access_log"]) == ("127.0.0.1", 7861, False)
    assert ran["app"].state.serve.worker.slots._initial_value == 3  # the running request and 2 waiting


@pytest.mark.parametrize("argv, message", [
    (("--queue", "99"), "queue=99 must be from 0 to 32"),
    (("--port", "0"), "--port 0 must be from 1 to 65535"),
    (("--api-auth", "nopassword"), "--api-auth must be user:password (several separated by commas)"),
    (("--model", "/no/such/model"), "no such file or folder: /no/such/model"),
])
def test_mistakes_are_one_line(monkeypatch, argv, message):
    monkeypatch.setattr("uvicorn.run", lambda app, **kw: None)
    with pytest.raises(FewstepError, match=re.escape(message)):
        cli.cmd_serve(parse(*argv))


def test_one_log_line_per_request(client, caplog):
    with caplog.at_level(logging.INFO, logger="fewstep.serve"):
        client.post("/sdapi/v1/txt2img", json={"prompt": "a", "steps": 1, "width": 64, "height": 64, "n_iter": 2})
        client.get("/sdapi/v1/progress")
    lines = [r.getMessage() for r in caplog.records if r.name == "fewstep.serve"]
    assert len(lines) == 2
    assert re.fullmatch(r"#\d+ POST /sdapi/v1/txt2img 200 64x64 x2, 1 steps, \d+\.\d\d s", lines[0]), lines[0]
    assert re.fullmatch(r"#\d+ GET /sdapi/v1/progress 200 \d+\.\d\d s", lines[1]), lines[1]


def test_fewstep_imports_and_says_what_to_install_without_fastapi():
    code = ("import sys\n"
            "for name in ('fastapi', 'pydantic', 'starlette', 'uvicorn'): sys.modules[name] = None\n"
            "import fewstep, fewstep.cli\n"
            "sys.exit(fewstep.cli.main(['serve']))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1] == "error: " + cli.INSTALL
