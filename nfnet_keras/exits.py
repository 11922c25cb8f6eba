"""The exit statuses of the package's commands, declared once (the README's table lists them by command)."""

OK = 0
FAILED_TRIALS = 1  # nfnet-grid: a trial crashed
SERVER_ERROR = 1  # nfnet-serve-client: the server answered with an error
BAD_INPUT = 2  # every command: bad flags or input, a one-line error, nothing written
DIVERGED = 3  # nfnet-fit: the loss became NaN/inf
NO_ANSWER = 3  # nfnet-serve-client: nothing answered at the address; nfnet-grid worker: no chief answered in time
EXPORT_FAILED = 4  # nfnet-fit: trained and saved, but the export failed
ENVIRONMENT = 5  # a file could not be written, the run folder is busy, no checkpoint could be read, or a
# grid chief cannot listen on its address
PEER_LOST = 6  # nfnet-fit with several processes: another process of the run stopped answering or failed
INTERRUPTED = 130  # Ctrl-C (128 + SIGINT); rerun the same command to resume
TERMINATED = 143  # SIGTERM (128 + 15), as a shell reports a process the signal ended
