"""The value-head model: any causal-LM backbone plus one scalar head. Reward model, critic and reward scorer.

Format on disk (one format, written only by `save_pretrained`):
    <folder>/config.json, model.safetensors   the backbone, loadable with transformers' AutoModel
    <folder>/value_head.safetensors            {"weight": (1, hidden)} of the scalar head
    <folder>/value_head.json                   {"format": "rlhf_ray.value_head/1", ...}
    <folder>/tokenizer*                        when a tokenizer is given
A reward model is trained from an SFT (causal-LM) folder with `from_causal_lm`; PPO's critic and reward
scorer load the reward model's folder with `from_pretrained` (DeepSpeed-Chat initialises the critic that way).
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from rlhf_ray.io import atomic_directory

FORMAT = "rlhf_ray.value_head/1"
HEAD_WEIGHTS = "value_head.safetensors"
HEAD_META = "value_head.json"


def is_value_head_folder(path: str | Path) -> bool:
    """Whether `path` is a folder in the format above (what `ValueHeadModel.from_pretrained` loads); a builtin: or
    hub name never is. Cheap: the driver checks PPO's reward and critic paths before starting anything."""
    return (Path(path).expanduser() / HEAD_META).is_file()


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row, for left and right padding alike: max_t (t * mask_t)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over real tokens, so a left-padded row sees the same positions as an unpadded one."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)


class ValueHeadModel(nn.Module):
    def __init__(self, backbone: nn.Module, head_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.backbone = backbone
        self.config = backbone.config
        hidden = getattr(self.config, "word_embed_proj_dim", None) or self.config.hidden_size  # OPT projects out
        self.v_head = nn.Linear(hidden, 1, bias=False, dtype=head_dtype or next(backbone.parameters()).dtype)
        nn.init.normal_(self.v_head.weight, std=1.0 / (hidden + 1) ** 0.5)
        self._takes_position_ids = "position_ids" in inspect.signature(backbone.forward).parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Value of every position, (batch, seq), in float32."""
        kwargs = {"position_ids": position_ids_from_mask(attention_mask)} if self._takes_position_ids else {}
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                               **kwargs).last_hidden_state
        return self.v_head(hidden).squeeze(-1).float()

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sequence score: the value at the last real (non-padding) token, (batch,)."""
        values = self(input_ids, attention_mask)
        return values.gather(1, last_token_index(attention_mask).unsqueeze(1)).squeeze(1)

    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.backbone.gradient_checkpointing_enable(**kwargs)

    # ------------------------------------------------------------------------------------------ I/O
    @classmethod
    def from_causal_lm(cls, path: str, dtype: Optional[torch.dtype] = None, **kwargs) -> "ValueHeadModel":
        """A fresh head on the backbone of a causal-LM folder or hub name (reward-model training starts here)."""
        from transformers import AutoModel

        return cls(AutoModel.from_pretrained(path, dtype=dtype or torch.float32, **kwargs))

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: Optional[torch.dtype] = None, **kwargs) -> "ValueHeadModel":
        from safetensors.torch import load_file
        from transformers import AutoModel

        path = Path(path)
        meta_file = path / HEAD_META
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"{path} is not a value-head model folder (no {HEAD_META}); a causal-LM folder needs "
                f"ValueHeadModel.from_causal_lm, or train a reward model first")
        meta = json.loads(meta_file.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
        model = cls(AutoModel.from_pretrained(path, dtype=dtype or torch.float32, **kwargs))
        head = load_file(str(path / HEAD_WEIGHTS))["weight"]
        model.v_head.weight.data.copy_(head.to(model.v_head.weight.dtype))
        return model

    def save_pretrained(self, path: str | Path, tokenizer=None, state_dict: Optional[dict] = None) -> None:
        """Write the folder atomically. `state_dict` (names as in this module) overrides the live weights,
        for ZeRO-3 where the full tensors exist only in a gathered copy."""
        from safetensors.torch import save_file

        state = state_dict if state_dict is not None else self.state_dict()
        backbone_state = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        head = state["v_head.weight"].detach().cpu().contiguous()
        with atomic_directory(path) as tmp:
            self.backbone.save_pretrained(tmp, state_dict=backbone_state)
            save_file({"weight": head}, str(tmp / HEAD_WEIGHTS))
            (tmp / HEAD_META).write_text(json.dumps(
                {"format": FORMAT, "backbone": type(self.backbone).__name__, "hidden": head.shape[1]}, indent=2))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
