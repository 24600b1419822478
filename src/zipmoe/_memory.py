"""Peak memory of this process, for pack's report and the pack benchmark."""

from __future__ import annotations

import resource


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident memory.

    Reads ``VmHWM`` from /proc on Linux: unlike ``ru_maxrss``, it is not inherited from the parent across
    fork and exec, so a child process measures only itself.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux; bytes on macOS
