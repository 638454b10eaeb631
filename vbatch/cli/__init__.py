"""The `vbatch` command line."""
def main() -> None:  # replaced below
    raise SystemExit("not yet")
