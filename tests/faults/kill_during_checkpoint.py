"""Run the training CLI, killing the process with SIGKILL inside one checkpoint write.

Usage: python kill_during_checkpoint.py STEP OVERRIDE...
The temporary file of step STEP's checkpoint is complete on disk when the kill comes, but
it has not been renamed into place, which is the latest moment a crash can hit a save.
"""

from __future__ import annotations

import os
import signal
import sys

from mars_m_exp import checkpoint

kill_step = int(sys.argv.pop(1))
real_replace = os.replace


def replace_then_die(src, dst):
    if os.path.basename(os.fspath(dst)) == f"ckpt_{kill_step:08d}.pt":
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)


checkpoint.os.replace = replace_then_die

if __name__ == "__main__":
    from mars_m_exp.__main__ import main

    sys.argv[0] = "mars_m_exp"
    main()
