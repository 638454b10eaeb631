"""A Kubernetes API emulator for tests: kmock's scaffold plus the semantics kopf and clients rely on."""
