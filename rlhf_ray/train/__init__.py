"""Steps 1 and 2 (SFT, reward model) as Ray Train jobs with DeepSpeed ZeRO; the DeepSpeed config PPO shares."""
from rlhf_ray.train.common import StageResult, read_metrics, run_stage
from rlhf_ray.train.deepspeed_config import deepspeed_config
from rlhf_ray.train.rm import run_rm
from rlhf_ray.train.sft import run_sft

__all__ = ["StageResult", "deepspeed_config", "read_metrics", "run_rm", "run_sft", "run_stage"]
