import os
import signal
import sys


def _interrupted_at_start(signum, frame):
    # Ctrl-C while the CLI's own modules are still importing: the same line and status
    # as later on, not a traceback from inside an import. cli.main() installs its own
    # handler once it can catch KeyboardInterrupt itself.
    # os._exit, not sys.exit: a SystemExit raised into a half-run import can be
    # replaced by an error from that import's own cleanup (seen in OmegaConf, inside
    # `import hydra`); nothing has been written yet that an exit would need to finish.
    print("nanlab: interrupted", file=sys.stderr, flush=True)
    os._exit(130)


signal.signal(signal.SIGINT, _interrupted_at_start)

from nanlab.cli import main  # noqa: E402 - after the handler, so that an early Ctrl-C is one line

main()
