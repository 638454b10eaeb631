"""`vbatch operator`: run the kopf operator over Batch resources in one namespace.

    vbatch operator --namespace NS [--peering NAME | --standalone] [--liveness URL]

Two replicas of the chart share one KopfPeering (`--peering`): kopf lets only the
highest-priority live peer act, so two operators never reconcile at once.
`--standalone` skips peering (one replica, tests). Storage, catalog and worker pod
settings come from VBATCH_* variables (see core.config and operator.config).
"""

from __future__ import annotations

import argparse
import logging

from vbatch.core.config import Settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vbatch operator", description=__doc__.split("\n\n")[0])
    p.add_argument("-n", "--namespace", default=None, help="namespace of the Batches (default: $VBATCH_NAMESPACE)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--standalone", action="store_true", help="no peering: the only operator (tests, one replica)")
    mode.add_argument("--peering", default=None, metavar="NAME", help="the KopfPeering shared by the replicas")
    p.add_argument("--priority", type=int, default=None, help="peering priority (highest acts)")
    p.add_argument("--liveness", default=None, metavar="URL", help="e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("-d", "--debug", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import kopf

    settings = Settings()
    namespace = args.namespace or settings.namespace
    if namespace != settings.namespace:
        # The reconciler reads the namespace from settings: keep one source of truth.
        import os

        os.environ["VBATCH_NAMESPACE"] = namespace
    kopf.configure(verbose=args.verbose, debug=args.debug)
    logging.getLogger("vbatch").setLevel(logging.DEBUG if args.debug else logging.INFO)

    import vbatch.operator.handlers  # noqa: F401  (registers the handlers with kopf)

    priority = args.priority
    if priority is None and args.peering:
        # kopf pauses every peer that sees another with the same priority: replicas
        # need distinct ones, and then the highest acts while the others wait.
        import secrets

        priority = 1 + secrets.randbelow(2**30)

    kopf.run(
        clusterwide=False,
        namespaces=[namespace],
        standalone=True if args.standalone else None,
        peering_name=args.peering,
        priority=priority,
        liveness_endpoint=args.liveness,
    )
    return 0
