"""Drivers that carry batches through the core state machine: the kopf operator
(cluster mode: Batch resources, Indexed Jobs) and the local executor (single-node
mode: worker subprocesses on this machine), plus pure builders of Kubernetes objects."""
