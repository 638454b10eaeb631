"""`vbatch keys create|revoke`: the key is printed once, only its hash is stored."""

from __future__ import annotations

import argparse
import sys

from vbatch.cli.serve import settings_for
from vbatch.core.keys import KeyStore


def key_file(args: argparse.Namespace):
    settings = settings_for(args.data_dir)
    return settings.api_keys_file or settings.data_dir / "api_keys"


def keys_command(args: argparse.Namespace) -> int:
    store = KeyStore(key_file(args))
    if args.keys_command == "create":
        try:
            api_key = store.create(args.project)
        except ValueError as exc:
            print(f"vbatch keys create: {exc}", file=sys.stderr)
            return 2
        print(f"Created an API key for project {args.project!r}. It is shown only this once:", file=sys.stderr)
        print(api_key)  # alone on the last line of stdout, for scripts
        return 0
    if store.revoke(args.key):
        print("revoked", file=sys.stderr)
        return 0
    print("no such key", file=sys.stderr)
    return 1
