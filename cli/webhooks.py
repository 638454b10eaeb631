"""`vbatch webhooks add|list|remove`: a project's webhook endpoints.

Single node keeps them in <data_dir>/webhooks.json (or $VBATCH_WEBHOOK_ENDPOINTS_FILE);
a cluster mounts the same file from a Secret (see docs/install.md). `add` prints
the signing secret last, alone on its line, for scripts.
"""

from __future__ import annotations

import argparse
import sys

from vbatch.cli.serve import settings_for
from vbatch.core.projects import InvalidProjectId, check_project_id
from vbatch.core.operations import endpoints_path
from vbatch.core.webhooks import EndpointStore, WebhookURLRefused


def webhooks_command(args: argparse.Namespace) -> int:
    settings = settings_for(args.data_dir)
    store = EndpointStore(endpoints_path(settings))
    if args.webhooks_command == "add":
        try:
            check_project_id(args.project)
            endpoint = store.add(args.project, args.url, allow_private=settings.webhook_allow_private)
        except (InvalidProjectId, WebhookURLRefused) as exc:
            print(f"refused: {exc}", file=sys.stderr)
            return 2
        print(f"Added webhook {endpoint.id} for project {args.project!r}: {endpoint.url}", file=sys.stderr)
        print("Events: batch.completed, batch.failed, batch.expired, batch.cancelled. Signing secret:", file=sys.stderr)
        print(endpoint.secret)
        return 0
    if args.webhooks_command == "list":
        for endpoint in store.all():
            if args.project is None or endpoint.project == args.project:
                print(f"{endpoint.id}\t{endpoint.project}\t{endpoint.url}")
        return 0
    if store.remove(args.endpoint_id):
        print("removed", file=sys.stderr)
        return 0
    print("no such webhook endpoint", file=sys.stderr)
    return 1


def add_parser(commands, data_dir_arg) -> None:
    hooks = commands.add_parser("webhooks", help="manage webhook endpoints (batch events)")
    sub = hooks.add_subparsers(dest="webhooks_command", required=True)
    add = sub.add_parser("add", help="add an endpoint for a project; prints its signing secret")
    add.add_argument("--project", required=True)
    add.add_argument("--url", required=True, help="http(s) URL receiving the events")
    data_dir_arg(add)
    listing = sub.add_parser("list", help="list endpoints")
    listing.add_argument("--project", default=None)
    data_dir_arg(listing)
    remove = sub.add_parser("remove", help="remove an endpoint")
    remove.add_argument("endpoint_id")
    data_dir_arg(remove)
