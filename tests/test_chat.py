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
