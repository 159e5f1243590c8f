"""`rlhf-ray chat`: a scripted multi-turn conversation through vLLM with the model's chat template."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_chat_keeps_the_conversation_and_clear_resets_it(smollm2_dir, tmp_path):
    transcript = tmp_path / "chat.txt"
    cli = str(Path(sys.executable).parent / "rlhf-ray")
    proc = subprocess.run([cli, "chat", "--path", smollm2_dir, "--max-new-tokens", "24",
                           "--message", "What is the capital of France?", "--message", "And of Italy?",
                           "--message", "clear", "--message", "quit", "--message", "never sent",
                           "--transcript", str(transcript)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = transcript.read_text().splitlines()
    assert lines[0] == "User: What is the capital of France?" and "Paris" in lines[1]
    # the second turn only makes sense with the first in context: the template carried the history
    assert lines[2] == "User: And of Italy?" and "Rome" in lines[3]
    assert lines[4] == "--- conversation cleared ---"
    assert "never sent" not in transcript.read_text()  # quit ended the session


def hf_greedy_reply(model, tokenizer, messages: list[dict], max_new_tokens: int) -> str:
    """What the chat should answer: transformers' greedy continuation of the rendered conversation, up to EOS."""
    import torch

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt == tokenizer.eos_token_id:
                break
            out.append(nxt)
    return tokenizer.decode(out, skip_special_tokens=True).strip()


def test_chat_runs_on_a_cluster_engine_never_in_the_driver(ray_cluster, tiny_llama, monkeypatch, tmp_path):
    """vLLM in this (driver) process is made to fail: the conversation must still work, served by an engine actor,
    and the actor and its placement group are gone afterwards, also when a turn fails."""
    import io

    import pytest
    import ray
    import vllm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_ray.chat import ChatSession, chat_loop
    from rlhf_ray.generator import PromptTooLongError

    def no_vllm_in_the_driver(*args, **kwargs):
        raise AssertionError("vLLM was started in the driver process")

    monkeypatch.setattr(vllm, "LLM", no_vllm_in_the_driver)
    from rlhf_ray.config import load_config

    # fp32: the replies are compared with transformers' fp32 greedy ones
    cfg = load_config(None, {"ray.address": "local", "models.actor.dtype": "float32"})
    session = ChatSession(tiny_llama, max_new_tokens=6, cfg=cfg)
    transcript = tmp_path / "chat.txt"
    with pytest.raises(PromptTooLongError):
        with session:
            messages = chat_loop(session, ["hello world", "what is the capital city", "clear", "one two three"],
                                 io.StringIO(), transcript)
            model = AutoModelForCausalLM.from_pretrained(tiny_llama).float().eval()
            tok = AutoTokenizer.from_pretrained(tiny_llama)
            lines = transcript.read_text().splitlines()
            assert lines[0] == "User: hello world" and lines[4] == "--- conversation cleared ---"
            first = hf_greedy_reply(model, tok, [{"role": "user", "content": "hello world"}], 6)
            second = hf_greedy_reply(model, tok, [{"role": "user", "content": "hello world"},
                                                  {"role": "assistant", "content": first},
                                                  {"role": "user", "content": "what is the capital city"}], 6)
            assert lines[1] == f"Assistant: {first}" and lines[3] == f"Assistant: {second}"  # history carried
            assert [m["role"] for m in messages] == ["user", "assistant"]  # clear started over
            pgs = list(session.generators.placements)
            engines = list(session.generators.engines)
            session.reply("word " * 600)  # longer than the engine holds (512): the turn fails inside the session
    assert ray.util.placement_group_table(pgs[0])["state"] == "REMOVED"
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(engines[0].ready.remote(), timeout=30)
