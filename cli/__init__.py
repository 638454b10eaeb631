"""The `vbatch` command line.

    vbatch serve      the gateway (+ the local executor in single-node mode)
    vbatch keys       create / revoke API keys (stores only their hashes)
    vbatch webhooks   add / list / remove a project's webhook endpoints
    vbatch worker     run one shard (what Job pods and the local executor run)
    vbatch operator   the kopf operator (cluster mode)
    vbatch models     prepare the bundled demo model
    vbatch submit     upload a JSONL, create a batch, optionally wait and download
    vbatch status     print a batch
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vbatch")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"


def _data_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=None, help="single-node data directory (default: $VBATCH_DATA_DIR or ./vbatch-data)")


def _client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default=None, help="gateway URL (default: $VBATCH_BASE_URL or http://127.0.0.1:8000)")
    parser.add_argument("--api-key", default=None, help="API key (default: $VBATCH_API_KEY)")
    parser.add_argument("--project", default=None, help="project id (default: $VBATCH_PROJECT)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vbatch", description="The OpenAI Batch API on your own GPUs, executed by vLLM.")
    parser.add_argument("--version", action="version", version=f"vbatch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway (single-node: with the local executor)")
    _data_dir_arg(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--engine", default=None, choices=["auto", "vllm", "echo"], help="'echo' is a test engine that echoes prompts: never inference")
    serve.add_argument("--slots", type=int, default=None, help="warm worker processes (engines), each running many shards of its model at once (default: GPUs, or 1)")
    serve.add_argument("--log-level", default="info")

    keys = commands.add_parser("keys", help="manage API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key for a project; prints it once")
    create.add_argument("--project", required=True)
    _data_dir_arg(create)
    revoke = key_commands.add_parser("revoke", help="revoke a key")
    revoke.add_argument("key")
    _data_dir_arg(revoke)

    from vbatch.cli.webhooks import add_parser as add_webhooks_parser

    add_webhooks_parser(commands, _data_dir_arg)

    commands.add_parser("worker", help="run one shard (see `vbatch worker --help`)", add_help=False)
    commands.add_parser("operator", help="run the kopf operator (cluster mode)", add_help=False)

    models = commands.add_parser("models", help="model management")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    prepare = model_commands.add_parser("prepare", help="convert the bundled SmolLM2 demo model for vLLM (once, cached)")
    _data_dir_arg(prepare)

    submit = commands.add_parser("submit", help="upload a JSONL and create a batch")
    submit.add_argument("input", type=Path)
    submit.add_argument("--wait", action="store_true", help="poll with a progress bar until the batch ends")
    submit.add_argument("-o", "--output", type=Path, default=None, help="with --wait: write the joined results here")
    submit.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    _client_args(submit)

    status = commands.add_parser("status", help="print a batch")
    status.add_argument("batch_id")
    _client_args(status)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Sub-programs with their own parsers get their arguments untouched.
    if argv and argv[0] == "worker":
        from vbatch.worker.main import main as worker_main

        return worker_main(argv[1:])
    if argv and argv[0] == "operator":
        from vbatch.operator.main import main as operator_main

        return operator_main(argv[1:])

    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from vbatch.cli.serve import serve

        return serve(args)
    if args.command == "keys":
        from vbatch.cli.keys import keys_command

        return keys_command(args)
    if args.command == "webhooks":
        from vbatch.cli.webhooks import webhooks_command

        return webhooks_command(args)
    if args.command == "models":
        from vbatch.cli.serve import settings_for
        from vbatch.worker.models import main_prepare

        main_prepare(settings_for(args.data_dir).data_dir)
        return 0
    if args.command in ("submit", "status"):
        from vbatch.cli import client

        return client.submit(args) if args.command == "submit" else client.status(args)
    return 2
