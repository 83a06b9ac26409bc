"""Run the CLI, but SIGKILL this process at the N-th call of a function: a crash at a chosen point.

python -m tests.die_at MODULE:QUALNAME N  -- search ...      (before the N-th call)
"""

import importlib
import os
import signal
import sys


def main() -> int:
    target, count, rest = sys.argv[1], int(sys.argv[2]), sys.argv[sys.argv.index("--") + 1 :]
    module_name, qualname = target.split(":")
    owner = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == count:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, dying)
    from search.cli import main as cli

    return cli(rest)


if __name__ == "__main__":
    sys.exit(main())
