"""`rlhf-ray chat --path CHECKPOINT`: multi-turn chat in the terminal through vLLM (DeepSpeed-Chat's chat.py).

The conversation is rendered with the model's own chat template every turn. Type `clear` to start over and
`quit` (or end the input) to leave. `--message` turns run a scripted conversation instead of reading the
terminal; `--transcript FILE` writes the conversation to a file as well.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Optional, TextIO

CLEAR, QUIT = "clear", "quit"


class ChatSession:
    def __init__(self, path: str, max_new_tokens: int = 128, temperature: float = 0.0, kv_cache_gib: int = 1,
                 dtype: str = "float32"):
        import os

        from vllm import LLM, SamplingParams

        from rlhf_ray.models.loading import resolve_model_path

        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
        path = resolve_model_path(path)
        self.llm = LLM(model=path, dtype=dtype, enforce_eager=True)
        if self.llm.get_tokenizer().chat_template is None:
            raise ValueError(f"{path}: the tokenizer has no chat template; chat needs one")
        self.params = SamplingParams(temperature=temperature, max_tokens=max_new_tokens)
        self.messages: list[dict[str, str]] = []

    def reply(self, text: str) -> str:
        self.messages.append({"role": "user", "content": text})
        out = self.llm.chat(self.messages, self.params, use_tqdm=False)[0].outputs[0].text.strip()
        self.messages.append({"role": "assistant", "content": out})
        return out

    def clear(self) -> None:
        self.messages = []


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
    session = ChatSession(args.path, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    turns = args.message if args.message else _terminal_turns()
    if not args.message:
        print(f"Chatting with {args.path}. '{CLEAR}' starts over, '{QUIT}' leaves.", flush=True)
    chat_loop(session, turns, sys.stdout, Path(args.transcript) if args.transcript else None,
              interactive=not args.message)
    return 0
