"""Running a plan: the engine that sums chunks, the streaming writer and its atomic commit, direct
I/O, the writer thread, and how signals and a crash of the work are handled."""
