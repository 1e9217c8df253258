"""Run the real ``xdpzoot`` command line in this process and SIGKILL it at a chosen point,
without a test hook in the product: the point is a function of the product, wrapped here.

    XZ_KILL='{"target": "xdpzoot.sync:apply_plan", ...}' python killpoint.py ARGS...

The spec (JSON in $XZ_KILL):
  target  "module:attr.attr": the function to wrap (a module's function, a class's method,
          or an attribute of a loaded library such as ``kernel:_libbpf.bpf_map_update_batch``)
  when    "before" or "after" the call
  n       the call that kills (1: the first that matches)
  match   optional: only calls whose arguments, as text, hold this string count
  arm     optional: only calls made while this file exists count
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def wrap(spec: dict) -> None:
    module, _, attrs = spec["target"].partition(":")
    *path, name = attrs.split(".")
    owner = importlib.import_module(module)
    for a in path:
        owner = getattr(owner, a)
    orig = getattr(owner, name)
    seen = 0

    def wrapper(*args, **kw):
        nonlocal seen
        counts = ((spec.get("match") is None or spec["match"] in repr(args))
                  and (spec.get("arm") is None or os.path.exists(spec["arm"])))
        seen += counts
        hit = counts and seen == spec["n"]
        if hit and spec["when"] == "before":
            die()
        out = orig(*args, **kw)
        if hit:
            die()
        return out

    if isinstance(owner, type):
        wrapper = staticmethod(wrapper) if isinstance(owner.__dict__.get(name),
                                                      staticmethod) else wrapper
    setattr(owner, name, wrapper)


if __name__ == "__main__":
    wrap(json.loads(os.environ["XZ_KILL"]))
    from xdpzoot.cli import main

    main(sys.argv[1:], prog_name="xdpzoot")
