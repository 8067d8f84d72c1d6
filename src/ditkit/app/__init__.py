"""`ditkit serve`: a local web page to sample and edit with trained runs and to browse them (config, live
loss curve, sample grids, checkpoints), on the Pipeline API. Needs the `app` extra: pip install 'ditkit[app]'."""
from __future__ import annotations

import importlib.util
import ipaddress
import socket
import sys
from pathlib import Path

from ditkit.app.jobs import QUEUE_SIZE

MISSING = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]


def is_local(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine (a loopback address or localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(ckpt: str | Path | None = None, runs: str | Path | None = None, host: str = "127.0.0.1",
          port: int = 7860, allow_remote: bool = False, queue_size: int = QUEUE_SIZE,
          device: str | None = None) -> None:
    """Serve the page for one run (`ckpt`) or every run under `runs` until interrupted. A host other than
    a loopback address needs `allow_remote=True`: the page has no login, and anyone who reaches it can
    run the model and read the runs' pictures and configs."""
    if MISSING:
        raise ValueError(f"ditkit serve needs {', '.join(MISSING)}: pip install 'ditkit[app]'")
    if not 1 <= port <= 65535:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    if not is_local(host):
        if not allow_remote:
            raise ValueError(f"--host {host} would serve beyond this machine, to anyone who can reach it, with "
                             "no login: add --allow-remote to do that on purpose")
        print(f"WARNING: serving on {host}: anyone who can reach this machine can use the page, run the model "
              "and read the served runs' files; there is no login", file=sys.stderr)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:  # a clear line, not uvicorn's
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host.strip("[]"), port))
        except OSError as err:
            raise OSError(f"cannot listen on {host}:{port} ({err.strerror or err}): is another server there? "
                          "pick another --port") from None
    import uvicorn

    from ditkit.app.server import create_app

    app = create_app(ckpt=ckpt, runs=runs, host=host, queue_size=queue_size, device=device)
    shown = f"[{host}]" if ":" in host else host
    served = f"run {app.state.app.index.root}" if ckpt is not None else f"runs under {app.state.app.index.root}"
    print(f"ditkit serve: {served}\nopen http://{shown}:{port}/   (Ctrl+C stops)", flush=True)
    state = app.state.app

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            state.close()  # Ctrl+C: end the progress streams and stop the sampling at its next step
            super().handle_exit(sig, frame)

    try:
        Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)).run()
    except KeyboardInterrupt:  # uvicorn raises the Ctrl+C it handled once it has stopped
        pass
    finally:
        state.close()
        state.board.wait_idle(timeout=30)  # a thread killed inside torch at exit aborts the process
    print("ditkit serve: stopped", flush=True)
