"""The web app: a Starlette (ASGI) application with a JSON API, server-sent events for progress, and one
static page. Every handler answers bad input with {"error": one line} and a 4xx status; nothing a request
does can end the server."""
from __future__ import annotations

import asyncio
import functools
import json
import sys
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ditkit.app import params
from ditkit.app.engine import PipelineCache, facts, weigh
from ditkit.app.jobs import QUEUE_SIZE, TERMINAL, JobBoard, QueueFull, one_line
from ditkit.app.pictures import Result, grid_png
from ditkit.app.runs import READABLE, RunIndex, adapter_record, describe, read_metrics

STATIC = Path(__file__).parent / "static"
PAGE_FILES = {"app.js": "text/javascript", "style.css": "text/css"}
# a request body holds at most an image and a mask as base64 (4/3 of their size) and a few fields
MAX_BODY = 2 * (params.MAX_UPLOAD_BYTES * 4 // 3) + 64 * 1024
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
}


def error(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def api(handler: Callable[..., Awaitable[Response]]) -> Callable[..., Awaitable[Response]]:
    """Bad input -> 400 with its message; a missing thing -> 404; a full queue -> 503; a bug -> 500 with one
    line (the traceback goes to the server's log only)."""
    @functools.wraps(handler)
    async def wrapped(*args: Any) -> Response:  # (request) or (self, request)
        try:
            response = await handler(*args)
        except QueueFull as err:
            response = error(str(err), 503)
        except FileNotFoundError as err:
            response = error(one_line(err), 404)
        except ValueError as err:
            response = error(one_line(err), 400)
        except Exception as err:
            traceback.print_exc(file=sys.stderr)
            response = error(f"internal error ({type(err).__name__}): {one_line(err)}", 500)
        response.headers.update(SECURITY_HEADERS)
        return response

    return wrapped


async def read_json(request: Request) -> dict[str, Any]:
    """The request's JSON object, refused beyond MAX_BODY bytes (counted as they arrive, whatever the
    Content-Length says). JSON only: a cross-site form cannot post it without the browser asking first."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise ValueError("send the request as application/json")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY:
        raise ValueError(f"the request is too large: at most {MAX_BODY // 2**20} MB")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise ValueError(f"the request is too large: at most {MAX_BODY // 2**20} MB")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks) or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError("the request is not valid JSON") from None
    if not isinstance(body, dict):
        raise ValueError("the request must be a JSON object")
    return body


class App:
    """The served runs, the loaded pipelines and the job queue, and the handlers over them."""

    def __init__(self, index: RunIndex, queue_size: int = QUEUE_SIZE, device: str | None = None):
        self.index = index
        self.pipes = PipelineCache(device=device)
        self.board = JobBoard(queue_size=queue_size)
        self.closing = False

    def close(self) -> None:
        """The server is stopping: end the event streams, cancel every job (each stops at its next step)."""
        self.closing = True
        self.board.cancel_all()

    # -------------------------------------------------------------------------------- run browser
    @api
    async def page(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @api
    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in PAGE_FILES:
            raise FileNotFoundError(f"no page file {name!r}")
        return FileResponse(STATIC / name, media_type=PAGE_FILES[name])

    @api
    async def runs(self, request: Request) -> Response:
        runs = await run_in_threadpool(lambda: [describe(r) for r in self.index.runs()])
        return JSONResponse({"runs": runs, "single": self.index.single})

    @api
    async def metrics(self, request: Request) -> Response:
        run = self.index.get(request.query_params.get("run", ""))
        columns = await run_in_threadpool(read_metrics, run.path / "metrics.csv")
        return JSONResponse({"run": run.id, "columns": columns})

    @api
    async def file(self, request: Request) -> Response:
        path = self.index.file(request.query_params.get("run", ""), request.query_params.get("path", ""))
        # never cached: sample grids and metrics change while a run trains
        return FileResponse(path, media_type=READABLE[path.suffix.lower()], headers={"Cache-Control": "no-store"})

    def _pipe(self, body: dict[str, Any], compose: bool = False) -> tuple[Path, Any, dict[str, float]]:
        """(checkpoint, pipeline, further adapters {run id: weight} in the order composed) for a request;
        `compose`: with the served adapter runs the request ticks composed on the loaded adapter run."""
        run = self.index.get(str(body.get("run") or ""))
        checkpoint = run.checkpoint(str(body.get("checkpoint") or ""))
        ema = params.flag(body.get("ema", True), "ema")
        pipe = self.pipes.get(checkpoint, ema)
        wanted = params.adapter_weights(body.get("adapters"), facts(pipe)) if compose else {}
        if not wanted:
            return checkpoint, pipe, {}
        base = pipe.info["adapter"]["base"]
        chosen = []
        for run_id in sorted(wanted):  # sorted: the same set is the same cached pipeline
            other = self.index.get(run_id)
            if other.id == run.id:
                raise ValueError(f"adapter {run_id} is the run loaded: its own adapter's weight is the LoRA scale")
            record = adapter_record(other)
            if record is None:
                raise ValueError(f"adapter {run_id} is not an adapter run (it was not trained with lora_rank)")
            if record["base"].get("sha256") != base["sha256"]:
                raise ValueError(f"adapter {run_id} was trained on another base ({record['base'].get('path')}) than "
                                 f"run {run.id} ({base['path']}): adapters combine only on the same base")
            chosen.append(other.checkpoint(None))
        return checkpoint, self.pipes.get(checkpoint, ema, chosen), {k: wanted[k] for k in sorted(wanted)}

    def _adapter_choices(self, run_id: str, pipe: Any) -> list[dict[str, Any]]:
        """The served adapter runs that share the loaded adapter run's base (the same recorded sha256)."""
        if "adapter" not in pipe.info:
            return []
        sha = pipe.info["adapter"]["base"]["sha256"]
        choices = []
        for other in self.index.runs():
            record = adapter_record(other)
            if other.id == run_id or record is None or record["base"].get("sha256") != sha:
                continue
            adds = (record.get("lora") or {}).get("token_rows")
            choices.append({"run": other.id, "why": "it adds classes of its own: choose it as the run to sample "
                                                    "with it" if adds else None})
        return choices

    @api
    async def model(self, request: Request) -> Response:
        query = dict(request.query_params)
        checkpoint, pipe, _ = await run_in_threadpool(self._pipe, query)
        choices = await run_in_threadpool(self._adapter_choices, str(query.get("run") or ""), pipe)
        return JSONResponse({"checkpoint": checkpoint.name, **facts(pipe), "adapter_choices": choices})

    # -------------------------------------------------------------------------------- sampling
    async def _submit(self, request: Request, edit: bool) -> Response:
        body = await read_json(request)
        checkpoint, pipe, adapters = await run_in_threadpool(self._pipe, body, not edit)
        run_facts = facts(pipe)
        args = (params.edit_args if edit else params.generate_args)(body, run_facts)
        # the Pipeline's own checks of the settings, before queueing
        pipe.settings(**{k: args[k] for k in ("sampler", "steps", "cfg", "cfg_interval") if k in args})

        ncol = args.get("n", 1) if edit else len(args.get("prompts") or args.get("classes") or [0])
        composed = ", ".join(f"{name} {weight:g}" for name, weight in adapters.items())
        run = pipe.edit if edit else pipe.generate

        def work(job) -> Result:
            def callback(step: int, total: int, preview) -> None:
                job.progress(step, total, preview, lambda x: grid_png(x, ncol))

            # jobs on one checkpoint run one at a time: these weights hold until this one ends
            weigh(pipe, list(adapters.values()))
            if edit:  # generate() sets the run's own adapter scale; an edit uses it as trained
                pipe.scale_adapter(None)
            result = Result.of(run(**args, progress=False, callback=callback))
            if composed:
                result.settings["adapters"] = composed
            return result

        # one worker per checkpoint, whatever adapters are composed on it
        job = self.board.submit(str(checkpoint), work)
        return JSONResponse({"job": job.id, **job.state()}, status_code=202)

    @api
    async def generate(self, request: Request) -> Response:
        return await self._submit(request, edit=False)

    @api
    async def edit(self, request: Request) -> Response:
        return await self._submit(request, edit=True)

    @api
    async def cancel(self, request: Request) -> Response:
        job = self.board.cancel(request.path_params["job"])
        return JSONResponse(job.state())

    @api
    async def job(self, request: Request) -> Response:
        return JSONResponse(self._state(self.board.get(request.path_params["job"])))

    def _state(self, job) -> dict[str, Any]:
        state = job.state()
        if job.status == "done":
            base = f"/api/jobs/{job.id}"
            state.update(media=job.result.media, labels=job.result.labels, settings=job.result.settings,
                         ncol=job.result.ncol, notes=job.result.notes,
                         images=[f"{base}/image/{i}" for i in range(len(job.result.images))], grid=f"{base}/grid")
        return state

    @api
    async def events(self, request: Request) -> Response:
        """Server-sent events: the job's state each time it changes, until it ends."""
        job = self.board.get(request.path_params["job"])

        async def stream():
            seen = -1
            while True:
                if job.version != seen:
                    seen = job.version
                    yield f"data: {json.dumps(self._state(job))}\n\n"
                    if job.status in TERMINAL:
                        return
                if self.closing or await request.is_disconnected():
                    return
                await asyncio.sleep(0.1)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @api
    async def picture(self, request: Request) -> Response:
        job = self.board.get(request.path_params["job"])
        which = request.path_params["which"]
        if which == "preview":
            if job.preview is None:
                raise FileNotFoundError("no preview yet")
            return Response(job.preview, media_type="image/png", headers={"Cache-Control": "no-store"})
        if job.status != "done":
            raise FileNotFoundError(f"job {job.id} has no pictures: it is {job.status}")
        result: Result = job.result
        if which == "grid":
            data = result.grid
        else:
            index = params.whole(which.removeprefix("image/"), "image number", 0, len(result.images) - 1)
            data = result.images[index]
        ext = "gif" if result.media == "image/gif" else "png"
        name = f"ditkit-{job.id}-{which.replace('/', '-')}.{ext}"
        return Response(data, media_type=result.media, headers={"Content-Disposition": f'inline; filename="{name}"'})


async def not_found(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 404)
    return error("no such page" if status == 404 else str(getattr(exc, "detail", "bad request")), status)


async def server_error(request: Request, exc: Exception) -> Response:
    return error(f"internal error ({type(exc).__name__})", 500)


def create_app(ckpt: str | Path | None = None, runs: str | Path | None = None, host: str = "127.0.0.1",
               queue_size: int = QUEUE_SIZE, device: str | None = None) -> Starlette:
    """The ASGI app serving one run (`ckpt`) or every run under `runs`. A local `host` makes the app
    answer only requests addressed to a local name (a page elsewhere cannot reach it by DNS rebinding)."""
    app = App(RunIndex(ckpt=ckpt, runs=runs), queue_size=queue_size, device=device)
    routes = [
        Route("/", app.page),
        Route("/static/{name}", app.static),
        Route("/api/runs", app.runs),
        Route("/api/metrics", app.metrics),
        Route("/api/file", app.file),
        Route("/api/model", app.model),
        Route("/api/generate", app.generate, methods=["POST"]),
        Route("/api/edit", app.edit, methods=["POST"]),
        Route("/api/jobs/{job}", app.job),
        Route("/api/jobs/{job}/events", app.events),
        Route("/api/jobs/{job}/cancel", app.cancel, methods=["POST"]),
        Route("/api/jobs/{job}/{which:path}", app.picture),
    ]
    middleware = []
    if host in LOCAL_HOSTS:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "[::1]"]))
    starlette = Starlette(routes=routes, middleware=middleware,
                          exception_handlers={404: not_found, 405: not_found, 500: server_error})
    starlette.state.app = app
    return starlette
