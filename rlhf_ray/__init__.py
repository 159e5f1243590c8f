"""rlhf_ray: Ray-distributed actor/learner RLHF (SFT -> reward model -> PPO) with DeepSpeed and vLLM."""
from rlhf_ray.env import apply_process_defaults

__version__ = "0.1.0"

# Must run before deepspeed or vllm is imported anywhere in this process (driver or Ray actor).
apply_process_defaults()
