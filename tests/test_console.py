"""The console: rlhf_ray's lines and errors on screen, every process's output in the command's log file."""
from __future__ import annotations

import logging
import sys
import time

import pytest

from rlhf_ray import console

VLLM_WARNING = ("(MainProcess pid=1) WARNING 12-02 02:51:20 [cpu_worker.py:140] CPU backend doesn't allow to use "
                "`torch.set_num_threads` after the thread binding, skip it.")
OURS = "02:50:43 INFO rlhf_ray.train: rm step 6/6 | loss 0.7654"
ERROR = "(MainProcess pid=1) ERROR 12-02 02:51:20 [core.py:1] engine core failed"


def test_worker_lines_worth_showing_are_ours_and_errors():
    assert console.worth_showing(OURS)
    assert console.worth_showing("02:50:43 WARNING rlhf_ray.generator: engine 0 failed")
    assert console.worth_showing(ERROR)
    assert console.worth_showing("Traceback (most recent call last):")
    assert not console.worth_showing(VLLM_WARNING)
    assert not console.worth_showing("Loading weights: 100%|##########| 272/272")
    assert not console.worth_showing("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
    assert not console.worth_showing("Failed to query Ray Train Controller actor state")


def _record(name: str, level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_console_filter_shows_ours_and_warnings_and_everything_at_debug():
    info = console._ConsoleFilter(logging.INFO)
    assert info.filter(_record("rlhf_ray.ppo", logging.INFO, "groups up"))
    assert not info.filter(_record("rlhf_ray.generator", logging.DEBUG, "weight sync v3"))  # file only
    assert not info.filter(_record("httpx", logging.INFO, "HTTP Request: POST"))
    assert info.filter(_record("deepspeed", logging.WARNING, "something to act on"))
    assert not info.filter(_record(console.WORKER_OUTPUT_LOGGER, logging.INFO, "(Actor pid=1) line"))
    debug = console._ConsoleFilter(logging.DEBUG)
    assert debug.filter(_record("httpx", logging.DEBUG, "anything"))
    assert debug.filter(_record("rlhf_ray.generator", logging.DEBUG, "weight sync v3"))


def _print_lines() -> None:
    print(VLLM_WARNING, flush=True)
    print(OURS, flush=True)
    print(ERROR, file=sys.stderr, flush=True)


def test_worker_output_goes_to_the_log_file_and_only_what_matters_to_the_console(ray_cluster, tmp_path, capfd):
    """A real Ray worker prints a vLLM warning, one of rlhf_ray's lines and an error: the command's log file gets
    all three (with the worker's name), the console the last two, and the closing line counts the hidden warning."""
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    opened = console.open_console("INFO", tmp_path / "logs", "test")
    try:
        console.route_worker_output()
        ray.get(ray.remote(num_cpus=0)(_print_lines).options(name="printer").remote())
        deadline = time.time() + 30
        while time.time() < deadline and ERROR not in opened.path.read_text():
            time.sleep(0.2)
        time.sleep(0.5)  # the console lines arrive in the same batches
    finally:
        opened.close()
    text = opened.path.read_text()
    assert opened.path.parent == tmp_path / "logs" and opened.path.name.startswith("test-")
    for line in (VLLM_WARNING, OURS, ERROR):
        assert line in text
    assert "pid=" in text.split(VLLM_WARNING)[0].splitlines()[-1]  # prefixed with its process
    shown = capfd.readouterr()
    screen = shown.out + shown.err
    assert OURS in screen and ERROR in screen and VLLM_WARNING not in screen
    assert "full log of every process: " + str(opened.path) in screen and "1 worker warning line(s)" in screen


def test_closing_the_console_gives_ray_its_printing_back(ray_cluster, tmp_path, capfd):
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    opened = console.open_console("INFO", tmp_path / "logs", "test")
    console.route_worker_output()
    assert opened.routed
    opened.close()
    ray.get(ray.remote(num_cpus=0)(_print_lines).remote())
    deadline, screen = time.time() + 30, ""
    while time.time() < deadline and VLLM_WARNING not in screen:
        time.sleep(0.2)
        out = capfd.readouterr()
        screen += out.out + out.err
    assert VLLM_WARNING in screen  # Ray prints every worker line again


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_ray_driver_info_lines_leave_the_console_below_debug(level):
    opened = console.open_console(level, None, "test")
    ray_logger = logging.getLogger("ray")
    try:
        console.quiet_ray_driver_logger()
        handler = ray_logger.handlers[0]
        started = handler.filter(_record("ray", logging.INFO, "Started a local Ray instance."))
        token = handler.filter(_record("ray", logging.WARNING, "Token authentication is enabled for this Ray cluster."))
        other = handler.filter(_record("ray", logging.WARNING, "a warning to act on"))
    finally:
        opened.close()
        for h in ray_logger.handlers:
            h.filters = [f for f in h.filters if not isinstance(f, console._RayDriverFilter)]
    assert other
    assert (started, token) == ((False, False) if level == "INFO" else (True, True))
