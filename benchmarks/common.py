"""What the benchmark scripts share: the allocator setting a long-running server uses, running a
script under both allocators, peak-memory readings, and loading an older fusion.py side by side."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

# how a long-running server is started (demos/run.sh): freed blocks are kept for reuse, not unmapped
REUSE_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**32), "MALLOC_TRIM_THRESHOLD_": str(2**32)}


def run_under_both_allocators(script: str) -> None:
    """Run `script` again with this command line, once with glibc's defaults and once with REUSE_ENV
    (`--allocator current` in each, so the children measure in their own process)."""
    argv = [a for a in sys.argv[1:] if not a.startswith("--allocator")] + ["--allocator", "current"]
    for title, extra in (("glibc default allocator", {}), ("glibc with freed blocks reused", REUSE_ENV)):
        env = {k: v for k, v in os.environ.items() if k not in REUSE_ENV} | extra
        print(f"== {title}", flush=True)
        subprocess.run([sys.executable, script, *argv], env=env, check=True)


def status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (VmRSS, VmHWM, ...)."""
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def fusion_class(path: str | None):
    """`CrossAttentionFusion` of another fusion.py (e.g. a copy of the previous version); None: this one."""
    if not path:
        from multimodal import CrossAttentionFusion

        return CrossAttentionFusion
    spec = importlib.util.spec_from_file_location("fusion_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.CrossAttentionFusion
