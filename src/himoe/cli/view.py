"""`himoe view`: a local web page of a trained model's routing (himoe.view.server)."""

from __future__ import annotations

import sys
from pathlib import Path

from himoe.cli.options import add_model_dir
from himoe.errors import UserError


def cmd_view(args) -> int:
    from himoe.checkpoint.card import check_is_model_dir
    from himoe.view.server import serve

    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port} is not a port; pass 1-65535 (or 0: any free one)")
    check_is_model_dir(Path(args.model_dir))

    def ready(server):
        host, port = server.server_address[:2]
        print(f"himoe view: http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"himoe view: note: listening on {args.host}, reachable from other machines",
                  file=sys.stderr)

    try:
        serve(Path(args.model_dir), args.host, args.port, args.data_file, ready)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({e.strerror}); pick another "
                        "--port") from None
    except KeyboardInterrupt:
        pass
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("view", help="a local web page: where each token goes, generation, the "
                                    "experts' load, the run's curves")
    add_model_dir(p)
    p.add_argument("--port", type=int, default=8765, help="the port (0: any free one)")
    p.add_argument("--host", default="127.0.0.1",
                   help="the address to listen on (default: this machine only)")
    p.add_argument("--data_file", "--data-file", default=None,
                   help="the corpus whose validation split the expert loads come from "
                        "(default: the one the model was trained on)")
    p.set_defaults(func=cmd_view)
