"""The plan: everything a run will do, decided from headers before any tensor byte is read."""
