"""The vbatch domain: wire schemas, validation, storage, files, the batch state machine.

Nothing here imports web, kopf or vLLM code: both ways of running (cluster and
single-node) and every room (api, operator, worker) build on this package.
"""
