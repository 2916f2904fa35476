#!/usr/bin/env python3
"""How long one group commit of the local event log takes on this disk, two ways.

The local log's writer appends a group of framed events to a segment file and calls
fdatasync before any of them is acknowledged (eventlog/src/local/writer.rs). Appending
grows the file, so each fdatasync also has to write the inode's new size; a segment
written over space allocated and zero-filled beforehand does not. This probe times both
with groups of the size single-event ingest makes here (about ten events of about 240
bytes), for PROBE_SECONDS (3) each, twice, in a scratch directory on the filesystem of
DIR (default: target/, where the tests' logs live). It changes nothing in Marsad.

The space is zeroed by writing it, not by fallocate: an allocated but unwritten extent is
converted on its first write, which is again an inode update. The zeroed space (PREALLOCATED
bytes) is never outrun: a run stops at its end and says how many groups it made, so every
group timed over it is an overwrite.

    python3 benches/fsync_probe.py [DIR]
"""
import os
import sys
import tempfile
import time

SECONDS = float(os.environ.get("PROBE_SECONDS", "3"))
GROUP = b"x" * 2400
# more than 3 s of groups at the rates seen here (under 10k a second)
PREALLOCATED = 128 << 20


def probe(directory, name, preallocate):
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, 0o600)
    try:
        if preallocate:
            os.write(fd, b"\0" * PREALLOCATED)
            os.fsync(fd)
            os.lseek(fd, 0, os.SEEK_SET)
        room = PREALLOCATED // len(GROUP) if preallocate else None
        took = []
        start = time.perf_counter()
        while time.perf_counter() - start < SECONDS and (room is None or len(took) < room):
            before = time.perf_counter()
            os.write(fd, GROUP)
            os.fdatasync(fd)
            took.append(time.perf_counter() - before)
        elapsed = time.perf_counter() - start
    finally:
        os.close(fd)
        os.unlink(path)
    took.sort()
    print(
        f"  {name:34} {len(took) / elapsed:7.0f} groups/s ({len(took)} in {elapsed:.1f} s)"
        f"  p50 {took[len(took) // 2] * 1e6:5.0f} µs  p99 {took[int(len(took) * 0.99)] * 1e6:5.0f} µs"
    )


def main():
    if not SECONDS > 0:
        sys.exit("PROBE_SECONDS must be a positive number of seconds")
    base = sys.argv[1] if len(sys.argv) > 1 else "target"
    os.makedirs(base, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base, prefix="fsync-probe-") as directory:
        print(f"write + fdatasync of {len(GROUP)} bytes, {SECONDS:g} s each, in {os.path.abspath(directory)}:")
        for _ in range(2):
            probe(directory, "appended (the file grows)", False)
            probe(directory, "over preallocated, zeroed space", True)


if __name__ == "__main__":
    main()
