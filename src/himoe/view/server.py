"""`himoe view`: a local page that shows where a trained model sends each token.

The server reads the model once at start (the last complete save: a run training in the
same directory does not disturb it), never writes anything, and answers:

    GET  /                   the page (every file it needs ships in himoe/view/static)
    GET  /static/NAME        app.js, style.css
    GET  /api/model          shape, step, the run's curves (metrics.jsonl), analysis tables
    GET  /api/experts        per layer: each expert's share of the validation sample, the
                             dead ones, the tokens each reads most (what `experts list` counts)
    POST /api/route          {"text": ...} -> the tokens and their routing (view.routing)
    GET  /api/generate?prompt=&max_new_tokens=&temperature=&top_k=&seed=
                             server-sent events, one per generated token with its routing
Anything else is 404. The text and the tokens to generate are capped, requests beyond
MAX_CLIENTS at once get 503, and the model computes one request at a time (a lock): its
layers keep the last forward's choices, which a second request would overwrite.
"""

from __future__ import annotations

import json
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import torch

MAX_TEXT_CHARS = 20_000
MAX_NEW_TOKENS = 500
MAX_CLIENTS = 8
STATIC = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}


class Viewer:
    """The model and everything the page asks of it, computed under one lock."""

    def __init__(self, model_dir: Path, data_file: str | None = None):
        from himoe.checkpoint.card import load_model, read_metrics
        from himoe.data.tokenizers import tokenizer_for

        self.model_dir = Path(model_dir)
        self.model, self.cfg, self.vocab, self.step = load_model(self.model_dir, settle=False)
        self.model.eval()
        self.tokenizer = tokenizer_for(self.cfg, self.vocab, self.model_dir)
        self.metrics = [json.loads(line) for line in read_metrics(self.model_dir, self.step)]
        self.data_file = data_file
        self.lock = threading.Lock()
        self.clients = threading.BoundedSemaphore(MAX_CLIENTS)
        self._experts: dict | None = None

    def summary(self) -> dict:
        cfg = self.cfg
        curves = [{"step": e["step"], "val_loss": e["val_loss"],
                   "load_cv": [x.get("expert_cv") for x in e.get("layers", [])],
                   "maxvio": [x.get("expert_maxvio") for x in e.get("layers", [])]}
                  for e in self.metrics if "val_loss" in e]
        return {"model_dir": str(self.model_dir), "step": self.step, "router": cfg.router,
                "n_layer": cfg.n_layer, "num_moes": cfg.num_moes, "num_experts": cfg.num_experts,
                "moe_layers": sorted(self.model.moe_layers), "tokenizer": cfg.tokenizer,
                "block_size": cfg.block_size, "max_text_chars": MAX_TEXT_CHARS,
                "max_new_tokens": MAX_NEW_TOKENS, "curves": curves,
                "analysis": self.analysis()}

    def analysis(self) -> dict | None:
        """The domain x group and domain x expert tables `himoe analyze` wrote, if any."""
        path = self.model_dir / "analysis" / "analysis.json"
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return {"domains": [d["name"] for d in report.get("domains", [])],
                "layers": [{"layer": x["layer"], "group_share": x["group_share"],
                            "expert_share": x["expert_share"], "nmi_group": x.get("nmi_group"),
                            "nmi_expert": x.get("nmi_expert")}
                           for x in report.get("layers", [])]}

    def experts(self) -> dict:
        """Per layer, as `himoe experts list` counts them: each expert's share of the routed
        validation assignments, the dead ones and the tokens each reads most."""
        if self._experts is None:
            from himoe.analysis.domains import route_counts, top_tokens, windows
            from himoe.data.validation import validation_split
            from himoe.training.evaluation import evaluate

            with self.lock:
                val, path, _ = validation_split(self.cfg, self.tokenizer, self.data_file)
                device = next(self.model.parameters()).device
                ev = evaluate(self.model, val, self.cfg, device, torch.float32)
                ids = (val if torch.is_tensor(val) else val.tensor()).tolist()
                _, tokens_LEV = route_counts(self.model, windows(ids, self.cfg.block_size,
                                                                  4096))
            M = self.cfg.num_experts
            layers = []
            for i, fig in enumerate(ev["layers"]):
                share = fig["expert_share"]
                layers.append({"layer": i + 1, "sizes": self.cfg.group_sizes(i),
                               "share": [share[g * M:(g + 1) * M]
                                         for g in range(self.cfg.num_moes)],
                               "dead": fig["dead_experts"],
                               "top_tokens": top_tokens(tokens_LEV[i], self.tokenizer.decode)})
            self._experts = {"corpus": str(path), "val_loss": ev["val_loss"], "layers": layers}
        return self._experts

    def route(self, text: str) -> dict:
        from himoe.view.routing import route_text

        with self.lock:
            return route_text(self.model, self.tokenizer, text)

    def generate(self, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
                 seed: int, send) -> None:
        """Generate, calling send(event) for each token with its group and expert per layer;
        send raising (the client went away) stops the generation."""
        ids = self.tokenizer.encode(self.tokenizer.drop_unknown(prompt)[0]) or [0]
        M = self.cfg.num_experts
        # A token is routed when it is read: the forward after it was sampled. So each token
        # is sent one step later, with the choices of the forward that read it.
        pending: list[int] = []

        def last_routing() -> list:
            return [[{"group": int(e) // M + 1, "expert": int(e) % M + 1}
                     for e in moe.last_ids_TK[-1].tolist() if e >= 0]
                    for moe in self.model.moe_layers.values()]

        def on_token(next_B1):
            if pending:
                send({"token": self.tokenizer.decode(pending), "layers": last_routing()})
            pending[:] = next_B1[0].tolist()

        with self.lock, torch.no_grad():
            gen = torch.Generator().manual_seed(seed)
            out_BT = self.model.generate(torch.tensor([ids]), max_new_tokens,
                                         temperature=temperature, top_k=top_k, generator=gen,
                                         on_token=on_token)
            self.model(out_BT[:, -self.cfg.block_size:])  # reads the last token too
            send({"token": self.tokenizer.decode(pending), "layers": last_routing()})


class ClientGone(Exception):
    """The browser closed the connection mid-stream."""


def handler_for(viewer: Viewer):
    class Handler(BaseHTTPRequestHandler):
        server_version = "himoe-view"

        def log_message(self, fmt, *args):  # one line per request, on stderr
            sys.stderr.write(f"himoe view: {fmt % args}\n")

        def send_json(self, status: int, obj) -> None:
            body = json.dumps(obj).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def error(self, status: int, message: str) -> None:
            self.send_json(status, {"error": message})

        def do_GET(self):
            self.serve("GET")

        def do_POST(self):
            self.serve("POST")

        def serve(self, method: str) -> None:
            if not viewer.clients.acquire(blocking=False):
                return self.error(HTTPStatus.SERVICE_UNAVAILABLE,
                                  f"more than {MAX_CLIENTS} requests at once; try again")
            try:
                self.dispatch(method, urlparse(self.path))
            except (BrokenPipeError, ConnectionResetError, ClientGone):
                pass  # the page went away: nothing more to send
            finally:
                viewer.clients.release()

        def dispatch(self, method: str, url) -> None:
            route = (method, url.path)
            if route == ("GET", "/"):
                return self.static("index.html")
            if method == "GET" and url.path.startswith("/static/"):
                return self.static(url.path.removeprefix("/static/"))
            if route == ("GET", "/api/model"):
                return self.send_json(200, viewer.summary())
            if route == ("GET", "/api/experts"):
                return self.send_json(200, viewer.experts())
            if route == ("POST", "/api/route"):
                return self.route_text()
            if route == ("GET", "/api/generate"):
                return self.generate(parse_qs(url.query))
            self.error(HTTPStatus.NOT_FOUND, f"{url.path} is not a page or an API of himoe view")

        def static(self, name: str) -> None:
            if name not in STATIC:  # a fixed list: no path ever reaches the file system
                return self.error(HTTPStatus.NOT_FOUND, f"/static/{name} does not exist")
            body = resources.files("himoe.view").joinpath("static", name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", f"{STATIC[name]}; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def route_text(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length > 8 * MAX_TEXT_CHARS:
                return self.error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                  f"the text is longer than {MAX_TEXT_CHARS:,} characters; "
                                  "route a shorter part of it")
            try:
                text = json.loads(self.rfile.read(length) or b"{}").get("text", "")
            except (ValueError, AttributeError):
                return self.error(HTTPStatus.BAD_REQUEST, 'send {"text": "..."} as JSON')
            if not isinstance(text, str):
                return self.error(HTTPStatus.BAD_REQUEST, '"text" must be a string')
            if len(text) > MAX_TEXT_CHARS:
                return self.error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                                  f"the text has {len(text):,} characters, more than the "
                                  f"{MAX_TEXT_CHARS:,} the page routes at once; route a "
                                  "shorter part of it")
            self.send_json(200, viewer.route(text))

        def generate(self, query: dict) -> None:
            def one(name, kind, default):
                try:
                    return kind(query.get(name, [default])[0])
                except ValueError:
                    raise ValueError(f"{name} must be a {kind.__name__}") from None
            try:
                n = one("max_new_tokens", int, 100)
                temperature = one("temperature", float, 0.8)
                top_k = one("top_k", int, 40)
                seed = one("seed", int, 1)
            except ValueError as e:
                return self.error(HTTPStatus.BAD_REQUEST, str(e))
            if not 1 <= n <= MAX_NEW_TOKENS:
                return self.error(HTTPStatus.BAD_REQUEST, f"max_new_tokens must be 1-"
                                  f"{MAX_NEW_TOKENS}; generate longer texts with himoe generate")
            prompt = query.get("prompt", ["\n"])[0][:MAX_TEXT_CHARS]
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()

            def send(event: dict) -> None:
                try:
                    self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
                except OSError:
                    raise ClientGone from None  # stops model.generate at once

            viewer.generate(prompt, n, max(temperature, 0.0), top_k if top_k > 0 else None,
                            seed, send)
            send({"done": True})

    return Handler


def serve(model_dir: Path, host: str, port: int, data_file: str | None = None,
          ready=None) -> None:
    """Serve until interrupted; ready(server), if given, is called once it listens."""
    viewer = Viewer(model_dir, data_file)
    server = ThreadingHTTPServer((host, port), handler_for(viewer))
    server.daemon_threads = True
    server.viewer = viewer
    if ready is not None:
        ready(server)
    try:
        server.serve_forever()
    finally:
        server.server_close()
