"""What a command prints, and where everything else goes.

Console (default, INFO): rlhf_ray's own lines (one per stage and its result, the PPO progress bar, the summary),
warnings and errors from the driver's libraries, and from Ray workers only rlhf_ray's lines (training progress)
and error lines. Everything else (vLLM and DeepSpeed start-up, weight-loading bars, per-sync warnings, Ray Train's
bookkeeping) goes only to the command's log file, <run.output_dir>/logs/<command>-<time>.log (commands without a
config: <cache>/logs/), with every line of every process: the driver's log records and each worker's output,
prefixed with its actor and pid as Ray prints it. The command's last line says where the file is and how many
worker warnings it holds that the console did not show. `--log-level DEBUG` shows everything on the console too.

Worker output reaches the driver through Ray's log monitor (`log_to_driver`); `route_worker_output` replaces Ray's
printing handler with one that writes the file and forwards the lines above to Ray's own printer.
"""
from __future__ import annotations

import functools
import logging
import re
import sys
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
WORKER_DATEFMT = "%H:%M:%S"  # rlhf_ray's loggers in Ray workers: FORMAT with the time of day
# A worker line worth a place on the console: one of rlhf_ray's own records, or an error.
_OURS = re.compile(r"\d\d:\d\d:\d\d (INFO|WARNING|ERROR|CRITICAL) rlhf_ray[\w.]*: ")
_ERROR = re.compile(r"\b(ERROR|CRITICAL)\b|Traceback \(most recent call last\)")
_WARNING = re.compile(r"\bWARN(ING)?\b|Warning: ")
# Driver-side records that say nothing to a user of a private local cluster.
_DRIVER_NOISE = ("Token authentication is enabled for this Ray cluster",)


class _ConsoleFilter(logging.Filter):
    """rlhf_ray's records at the console level, everything else from WARNING up, minus known noise."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level:
            return False
        if self.level <= logging.DEBUG:
            return True
        if record.name == WORKER_OUTPUT_LOGGER:
            return False
        if record.name.startswith("rlhf_ray"):
            return True
        return record.levelno >= logging.WARNING and not any(s in record.getMessage() for s in _DRIVER_NOISE)


WORKER_OUTPUT_LOGGER = "rlhf_ray.worker_output"
RAY_PRINT_NAME, ROUTE_NAME = "ray_print_logs", "rlhf_ray_worker_output"  # handlers of Ray's log dispatcher


class _LazyFileHandler(logging.FileHandler):
    """The log file, folder included, made at the first record: a command that stops on a config error leaves
    nothing behind. A folder that cannot be made (read-only run folder) drops the file, not the command."""

    def __init__(self, path: Path):
        super().__init__(path, encoding="utf-8", delay=True)
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.failed:
            return
        if self.stream is None:
            try:
                Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                self.failed = True
                print(f"rlhf-ray: no log file at {self.baseFilename} ({e}); see the console", file=sys.stderr)
                return
        super().emit(record)


class Console:
    """The command's log file and its console filter; `close()` prints where the file is."""

    def __init__(self, level: str, log_dir: Optional[Path], command: str):
        self.level = logging.getLevelName(level)
        self.hidden_warnings = 0
        self.routed = False
        self.path: Optional[Path] = None
        root = logging.getLogger()
        self.saved_levels = {"": root.level, "rlhf_ray": logging.getLogger("rlhf_ray").level}
        self.console_handler = logging.StreamHandler(sys.stderr)
        self.console_handler.setFormatter(logging.Formatter(FORMAT))
        self.console_handler.addFilter(_ConsoleFilter(self.level))
        root.addHandler(self.console_handler)
        # The file takes every INFO record (DEBUG ones too at --log-level DEBUG), whatever the console shows.
        root.setLevel(min(self.level, logging.INFO))
        self.file_handler = None
        if log_dir is not None:
            self.path = log_dir / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
            self.file_handler = _LazyFileHandler(self.path)
        if self.file_handler is not None:
            self.file_handler.setFormatter(logging.Formatter(FORMAT))
            root.addHandler(self.file_handler)
            logging.getLogger("rlhf_ray").setLevel(logging.DEBUG)  # per-iteration detail (weight syncs): file only
            worker_output = logging.getLogger(WORKER_OUTPUT_LOGGER)
            worker_output.propagate = False
            worker_output.handlers = [self.file_handler]
            worker_output.setLevel(logging.INFO)
        if self.level > logging.DEBUG:
            _quiet_progress_bars()

    @property
    def shows_everything(self) -> bool:
        return self.level <= logging.DEBUG or self.file_handler is None

    def close(self) -> None:
        if self.routed:  # Ray's own printing back, for whatever this process does next
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
            from ray._private.worker import print_to_stdstream

            dispatcher.remove_handler(ROUTE_NAME)
            dispatcher.add_handler(RAY_PRINT_NAME, functools.partial(print_to_stdstream, ignore_prefix=False))
            self.routed = False
        if self.path is not None and self.file_handler.stream is not None:  # something was written
            hidden = (f"; {self.hidden_warnings} worker warning line(s) there are not shown above"
                      if self.hidden_warnings else "")
            log.info("full log of every process: %s%s (--log-level DEBUG prints everything)", self.path, hidden)
        if self.file_handler is not None:
            self.file_handler.close()
            logging.getLogger().removeHandler(self.file_handler)
            logging.getLogger(WORKER_OUTPUT_LOGGER).handlers = []
        logging.getLogger().removeHandler(self.console_handler)
        for name, level in self.saved_levels.items():
            logging.getLogger(name or None).setLevel(level)
        global _current
        if _current is self:
            _current = None


_current: Optional[Console] = None


def open_console(level: str, log_dir: Optional[Path], command: str) -> Console:
    global _current
    _current = Console(level, log_dir, command)
    return _current


def worth_showing(line: str) -> bool:
    """A worker's output line the console shows at INFO: rlhf_ray's own records and errors."""
    return bool(_OURS.search(line) or _ERROR.search(line))


class _RayDriverFilter(logging.Filter):
    """Ray's own driver logger (it has its own handler): warnings and errors only, minus known noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING and not any(s in record.getMessage() for s in _DRIVER_NOISE)


def quiet_ray_driver_logger() -> None:
    """Before ray.init in the driver: Ray's INFO lines ("Started a local Ray instance.") and known noise off the
    console, unless the console shows everything. Ray keeps its own handler on its "ray" logger."""
    console = _current
    if console is None or console.level <= logging.DEBUG:
        return
    for handler in logging.getLogger("ray").handlers:
        if not any(isinstance(f, _RayDriverFilter) for f in handler.filters):
            handler.addFilter(_RayDriverFilter())


def route_worker_output() -> None:
    """After ray.init in the driver: every worker line to the log file, the ones worth showing to the console too.
    Without an open Console (library use, tests) Ray's own printing stays as it is."""
    console = _current
    if console is None or console.file_handler is None:
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        from ray._private.worker import print_to_stdstream
    except ImportError as e:  # a Ray without this dispatcher: its own printing stays
        log.warning("worker output stays on the console (Ray's log dispatcher not found: %s)", e)
        return
    file_log = logging.getLogger(WORKER_OUTPUT_LOGGER)

    def handle(data: dict) -> None:
        if data.get("pid") == "autoscaler":  # its status every few seconds: Ray's printer keeps only its events
            print_to_stdstream(data, ignore_prefix=False)
            return
        source = data.get("actor_name") or data.get("task_name") or "worker"
        prefix = f"({source} pid={data.get('pid')}, ip={data.get('ip')})"
        lines = data.get("lines") or []
        for line in lines:
            file_log.info("%s %s", prefix, line)
        if console.shows_everything:
            shown = lines
        else:
            shown = [line for line in lines if worth_showing(line)]
            console.hidden_warnings += sum(1 for line in lines if _WARNING.search(line) and not worth_showing(line))
        if shown:
            print_to_stdstream({**data, "lines": shown}, ignore_prefix=False)

    dispatcher.remove_handler(RAY_PRINT_NAME)
    dispatcher.remove_handler(ROUTE_NAME)
    dispatcher.add_handler(ROUTE_NAME, handle)
    console.routed = True


def _quiet_progress_bars() -> None:
    """The driver's datasets map/save bars (the data pipeline runs in the driver) say nothing a user acts on."""
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def setup_worker_logging() -> None:
    """In a Ray worker: rlhf_ray's loggers print INFO records in the format `worth_showing` recognises."""
    ours = logging.getLogger("rlhf_ray")
    if not any(getattr(h, "_rlhf_ray_worker", False) for h in ours.handlers):
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(FORMAT, WORKER_DATEFMT))
        handler._rlhf_ray_worker = True
        ours.addHandler(handler)
        ours.setLevel(logging.INFO)
        ours.propagate = False


def setup_worker_process() -> None:
    """Ray's worker_process_setup_hook for every cluster (resources.init_ray): rlhf_ray's log format, and on private
    local clusters without DEBUG, Ray Train's State API warning dropped (env.quiet_state_api_warning)."""
    from rlhf_ray.env import quiet_state_api_warning

    setup_worker_logging()
    quiet_state_api_warning()
