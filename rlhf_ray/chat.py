"""`rlhf-ray chat --path CHECKPOINT`: multi-turn chat in the terminal through vLLM (DeepSpeed-Chat's chat.py).

The model is served by one vLLM engine actor on the Ray cluster (rlhf_ray.generator, in its own placement group;
`init_ray` attaches to the configured cluster or starts a local one), never by vLLM in this process: the driver
only renders the model's chat template into token ids every turn and decodes the answer. Type `clear` to start
over and `quit` (or end the input) to leave. `--message` turns run a scripted conversation instead of reading the
terminal; `--transcript FILE` writes the conversation to a file as well.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Iterable, Optional, TextIO

from rlhf_ray.config import Config

CLEAR, QUIT = "clear", "quit"


class ChatSession:
    """A conversation with `path` served by a one-engine GeneratorGroup on the Ray cluster (generation.* of `cfg`:
    tensor_parallel_size, kv_cache_gib, ...; engine dtype as models.actor.dtype resolves). Use it as a context manager
    (or call close()): the engine actor and its placement group are released afterwards, also on errors."""

    def __init__(self, path: str, max_new_tokens: int = 128, temperature: float = 0.0, cfg: Optional[Config] = None):
        from rlhf_ray.config import load_config
        from rlhf_ray.generator import GeneratorGroup, Sampling
        from rlhf_ray.models.loading import load_tokenizer, resolve_model_path
        from rlhf_ray.resources import init_ray

        cfg = cfg or load_config(None, {})
        path = resolve_model_path(path)
        actor = replace(cfg.models.actor, path=path, tokenizer=None, gguf_file=None)
        cfg = replace(cfg, models=replace(cfg.models, actor=actor), generation=replace(cfg.generation, num_engines=1))
        self.tokenizer = load_tokenizer(actor)
        if self.tokenizer.chat_template is None:
            raise ValueError(f"{path}: the tokenizer has no chat template; chat needs one")
        self.sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature)
        self.messages: list[dict[str, str]] = []
        init_ray(cfg)
        self.generators = GeneratorGroup(cfg, path)

    def reply(self, text: str) -> str:
        messages = self.messages + [{"role": "user", "content": text}]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        [sample] = self.generators.generate([ids], self.sampling).samples
        out = self.tokenizer.decode(sample.token_ids, skip_special_tokens=True).strip()
        self.messages = messages + [{"role": "assistant", "content": out}]
        return out

    def clear(self) -> None:
        self.messages = []

    def close(self) -> None:
        self.generators.shutdown()  # the engine actor and its placement group

    def __enter__(self) -> "ChatSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def chat_loop(session: ChatSession, turns: Iterable[str], out: TextIO, transcript: Optional[Path] = None,
              interactive: bool = False) -> list[dict[str, str]]:
    lines: list[str] = []
    for text in turns:
        text = text.strip()
        if not text:
            continue
        if text == QUIT:
            break
        if text == CLEAR:
            session.clear()
            lines.append("--- conversation cleared ---")
            print(lines[-1], file=out)
            continue
        answer = session.reply(text)
        lines.append(f"User: {text}")
        if not interactive:  # a typed turn is already on the screen
            print(lines[-1], file=out)
        lines.append(f"Assistant: {answer}")
        print(lines[-1] + "\n", file=out, flush=True)
    if transcript is not None:
        transcript.parent.mkdir(parents=True, exist_ok=True)
        transcript.write_text("\n".join(lines) + "\n")
    return session.messages


def _terminal_turns() -> Iterable[str]:
    while True:
        try:
            yield input("User: ")
        except EOFError:
            return


def cmd_chat(args) -> int:
    with ChatSession(args.path, max_new_tokens=args.max_new_tokens, temperature=args.temperature) as session:
        turns = args.message if args.message else _terminal_turns()
        if not args.message:
            print(f"Chatting with {args.path}. '{CLEAR}' starts over, '{QUIT}' leaves.", flush=True)
        chat_loop(session, turns, sys.stdout, Path(args.transcript) if args.transcript else None,
                  interactive=not args.message)
    return 0
