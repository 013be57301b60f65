import signal
import sys


def _interrupted_at_start(signum, frame):
    # Ctrl-C while the CLI's own modules are still importing: the same line and status
    # as later on, not a traceback from inside an import. cli.main() restores Python's
    # default handler once it can catch KeyboardInterrupt itself.
    print("nanlab: interrupted", file=sys.stderr)
    sys.exit(130)


signal.signal(signal.SIGINT, _interrupted_at_start)

from nanlab.cli import main  # noqa: E402 - after the handler, so that an early Ctrl-C is one line

main()
