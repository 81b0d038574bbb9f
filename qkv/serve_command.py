"""``qkv serve``: the OpenAI-compatible server (qkv/server.py) on uvicorn, with continuous batching over
``--slots`` (inference/engine.py). SIGTERM or Ctrl-C drains: no new requests (503), those in flight finish."""
from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

from qkv.errors import UserError

API_KEY_ENV = "QKV_API_KEY"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port), bound before the model loads, so a taken port is
    refused at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}): pass another --port (0: any free "
                        "port) or --host") from None
    sock.listen(128)
    return sock


def cmd_serve(ns: argparse.Namespace) -> int:
    api_key = ns.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(ns.host) and not api_key:
        raise UserError(f"--host {ns.host} listens beyond this machine: pass --api-key KEY (or set {API_KEY_ENV}); "
                        "clients then send 'Authorization: Bearer KEY'")
    if ns.slots < 1 or ns.max_waiting < 0:
        raise UserError("--slots must be >= 1 and --max-waiting >= 0")
    if not Path(ns.checkpoint).expanduser().is_dir():
        raise FileNotFoundError(f"checkpoint directory {ns.checkpoint!r} does not exist: pass the train.run_dir of a "
                                "run (qkv pretrain, qkv finetune or qkv convert import)")
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("qkv serve needs FastAPI and uvicorn: pip install 'qkv[serve]'") from None
    sock = bind(ns.host, ns.port)
    from qkv.api import load
    from qkv.inference.engine import Engine, Request

    lm = load(ns.checkpoint, ns.step)
    if lm.kind != "decoder":
        raise UserError(f"model.kind={lm.kind!r}: qkv serve needs a decoder checkpoint (one that continues text)")
    if lm.tokenizer is None:
        raise UserError("this checkpoint has no tokenizer: convert it again with --tokenizer PATH")
    from qkv.server import Outbox, Server

    outbox = Outbox()
    engine = Engine(lm.config.model, lm.graphdef, lm.params, slots=ns.slots, max_waiting=ns.max_waiting,
                    vocab_limit=lm.tokenizer.vocab_size, pad_id=lm.tokenizer.pad_id, after_step=outbox.send)
    engine.start()
    import threading
    warm = threading.Event()  # compile the step and the first prompt bucket before taking requests
    engine.submit(Request([lm.tokenizer.bos_id], 2, lambda t: False, lambda reason: warm.set()))
    warm.wait()
    engine.served = engine.tokens = 0
    name = ns.model_name or Path(ns.checkpoint).expanduser().resolve().name
    app = Server(lm, engine, name, outbox, api_key).app()

    class Draining(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / Ctrl-C: new requests get 503, those in flight finish
            engine.drain()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level=ns.log_level, access_log=ns.log_level in ("info", "debug"),
                            timeout_graceful_shutdown=ns.drain_timeout, lifespan="off")
    host, port = sock.getsockname()[:2]
    print(f"qkv: serving {name} on http://{host if ':' not in host else f'[{host}]'}:{port}/v1 with {ns.slots} "
          f"slots ({lm.config.model.max_seq_len}-token context){', API key required' if api_key else ''}; "
          "SIGTERM or Ctrl-C drains and stops", file=sys.stderr, flush=True)
    import signal
    sys.setswitchinterval(0.0005)  # the engine thread and the event loop hand the interpreter lock over often
    for sig in (signal.SIGTERM, signal.SIGINT):  # uvicorn raises the signal again once drained: let it pass
        signal.signal(sig, lambda *_: None)
    Draining(config).run(sockets=[sock])
    engine.stop(timeout=ns.drain_timeout)
    stats = engine.stats()
    print(f"qkv: stopped after {stats['served']} requests, {stats['tokens']} tokens", file=sys.stderr, flush=True)
    return 0


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching (docs/serving.md)")
    p.add_argument("--checkpoint", required=True, help="run directory of a decoder")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (beyond loopback needs --api-key)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port; the address is printed)")
    p.add_argument("--slots", type=int, default=8, help="requests decoded together over one KV cache")
    p.add_argument("--max-waiting", type=int, default=64, help="requests queued for a slot before 429")
    p.add_argument("--api-key", default=None, help=f"bearer token clients must send (or set {API_KEY_ENV})")
    p.add_argument("--model-name", default=None, help="the model id clients name (default: the run folder's name)")
    p.add_argument("--drain-timeout", type=float, default=60.0, help="seconds in-flight requests get on SIGTERM")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
