"""One shard of a batch: read it, run the engine, write result parts and progress, resumably."""
