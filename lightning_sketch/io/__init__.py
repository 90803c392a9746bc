"""Safe file I/O for run directories: confined paths, atomic writes, checksummed JSON, the
directory lock and the pickle-free torch loader (layer 0; pure Python + torch).

Every reader of a run directory treats its files as untrusted input; every writer publishes
atomically under its directory's lock. :mod:`~lightning_sketch.io.safeio` is the entry point and
re-exports the pieces of :mod:`~lightning_sketch.io.paths`, :mod:`~lightning_sketch.io.dirlock` and
:mod:`~lightning_sketch.io.torchload` that other layers use.
"""
