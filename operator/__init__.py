"""Cluster mode: the kopf operator that reconciles Batch resources into GPU Jobs, and pure builders of Kubernetes objects."""
