"""`fewstep serve`: the A1111-compatible HTTP API on uvicorn (docs/serving.md).

FastAPI, pydantic and uvicorn are optional: this module imports without them (the rest of the command
line imports it), and `fewstep serve` then says what to install. So `fewstep.serve.app`, which needs them
from its first line, is loaded by name when the command runs.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ..errors import FewstepError
from .limits import MAX_BODY, MAX_QUEUE, MAX_WORK, OPTIONAL

INSTALL = "fewstep serve needs FastAPI and uvicorn: pip install 'fewstep[serve]'"


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="an AUTOMATIC1111-compatible HTTP API (/sdapi/v1/txt2img ...) and web page",
                              description="Serve the AUTOMATIC1111 web UI's API, and a web page at / "
                              "(docs/serving.md). One generation at a time; requests beyond --queue get 503 with "
                              "Retry-After.")
    p.add_argument("--model", default=None, help="a name from --models-dir, a diffusers folder, .safetensors file or "
                   "hub id (default: the built-in shapes-turbo)")
    p.add_argument("--models-dir", default=None, metavar="DIR", help="the .safetensors files and diffusers folders "
                   "clients may switch to (sd_model_checkpoint); the built-in models are always listed")
    p.add_argument("--lora-dir", default=None, metavar="DIR", help="where <lora:name:scale> finds name.safetensors")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; "
                   "0.0.0.0 exposes the server to the network: use --api-auth)")
    p.add_argument("--port", type=int, default=7860, help="default 7860, A1111's")
    p.add_argument("--api-auth", default=None, metavar="USER:PASS", help="HTTP basic auth on every route "
                   "(several pairs separated by commas), as A1111's --api-auth")
    p.add_argument("--queue", type=int, default=4, metavar="N", help=f"requests that may wait behind the running "
                   f"one, 0 to {MAX_QUEUE} (default 4); more get 503")
    p.add_argument("--batch", type=int, default=8, metavar="N", help="txt2img requests of the same settings that "
                   "wait together run as one batch of up to N images (default 8; 1: one request at a time)")
    p.add_argument("--max-work", type=int, default=MAX_WORK, metavar="N", help="largest width x height x images x "
                   f"steps of one request (default {MAX_WORK})")
    p.add_argument("--max-body", type=int, default=MAX_BODY, metavar="BYTES", help=f"largest request body "
                   f"(default {MAX_BODY})")
    p.add_argument("--outdir", default=None, metavar="DIR", help="where requests with save_images write their "
                   "images (default: nowhere; save_images is then ignored)")
    return p


def server_modules():
    """(fewstep.serve.app, uvicorn), or a one-line error saying what to install."""
    try:
        import uvicorn  # lazy: optional (pip install 'fewstep[serve]')
        return importlib.import_module("fewstep.serve.app"), uvicorn
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in OPTIONAL:
            raise
        raise FewstepError(INSTALL) from None


def cmd_serve(a: argparse.Namespace) -> None:
    app_module, uvicorn = server_modules()
    if not 1 <= a.port <= 65535:
        raise FewstepError(f"--port {a.port} must be from 1 to 65535")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    app = app_module.create_app(a.model, a.models_dir, a.lora_dir, a.api_auth, a.queue, a.max_work, a.max_body,
                                a.outdir, a.batch)
    host = f"[{a.host}]" if ":" in a.host else a.host
    print(f"fewstep serve: {app.state.serve.worker.title} at http://{host}:{a.port}/ (API: /sdapi/v1, its docs: "
          f"/docs{'; basic auth on' if a.api_auth else ''})", flush=True)
    uvicorn.run(app, host=a.host, port=a.port, access_log=False, log_level="warning")
