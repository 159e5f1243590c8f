"""The built-in data set: generated in code (seeded), no hub, covering SFT, RM, PPO and PTX.

Task: every prompt has one checkable answer, the `reference`.

* Echo (85% of rows): "I see the moon, the city and the bird. Now say the word dog." -> "dog". The three
  random context nouns only make every prompt unique; the word is always ECHO_WORDS[0].
* Addition (15%): "What is 12 plus 30?" -> "The answer is 42." (operands 1..50).

Rows have the columns `prompt`, `chosen` (the right answer), `rejected` (a wrong one: another word, or a sum
off by 1..10) and `reference` (the bare answer: "dog", "42"), so the "pairwise" adapter reads them: SFT
learns `chosen`, the RM ranks chosen over rejected, PPO scores with `rule_reward`.

`rule_reward` is 1.0 when the response contains the reference as a whole word (case-insensitive), else 0.0.

Why one echo word: the data must let PPO lift a tiny random-weight model (rlhf_ray/models/tiny.py) from a
reward < 0.2 to >= 0.6 within a few dozen iterations. Such a model samples "dog" in ~1-3% of 16-token
responses, so the signal is rare but present. With a policy-gradient proxy (REINFORCE, Adam lr 3e-3, 64
samples of 16 tokens per iteration, tiny Llama) the mean reward went from <= 0.02 to >= 0.75 within 24
iterations for two seeds; with two or four echo words (where the model must read the word from the prompt)
it stayed near 0.3-0.4 after 30-40 iterations. Addition is out of a tiny model's reach, so ~0.85 is its ceiling.
SmolLM2-135M-Instruct (greedy, 20 new tokens) said the word for 10 of 12 echo prompts and got 1 of 10 sums
right, with arithmetic-shaped answers ("15 + 48 = 62."): room for PPO to improve.

`builtin:text` is plain text in the same domain for the PTX loss.

`builtin:demo` is the main command's task (launchers/cpu_demo.yaml), built so that a real chat model has room to
learn and a degenerate policy cannot score: the word to say is read from the prompt (one of DEMO_WORDS, never one
of the context nouns), sums have operands 1..DEMO_MAX_OPERAND, and `strict_reward` checks the whole answer.
`builtin:demo-eval` is DEMO_EVAL_ROWS more rows of the same kind whose prompts are not in `builtin:demo`: held-out
prompts for `rlhf-ray eval policy`.
"""
from __future__ import annotations

import random
import re

BUILTIN_SEED = 0  # the data set itself is fixed; data.seed only decides how it is split
NUM_ROWS = 4000
ECHO_SHARE = 0.85
ECHO_WORDS = ("dog",)
WRONG_WORDS = ("cat", "red", "blue", "bird")
# Each names three context nouns (they make prompts unique). Phrasings that SmolLM2-135M-Instruct answers with
# the word under greedy decoding; it ignores "Please say dog." or "Reply with the word dog." ones.
ECHO_TEMPLATES = ("I see the {x}, the {y} and the {z}. Now say the word {word}.",
                  "{X}, {y}, {z}. Say the word {word}.",
                  "Say the word {word}. Do not say {x}, {y} or {z}.")
_CONTEXT_NOUNS = ("apple", "orange", "water", "fire", "earth", "wind", "sun", "moon", "star", "river",
                  "mountain", "city", "country", "bird")


def _echo_row(rng: random.Random) -> dict:
    word = rng.choice(ECHO_WORDS)
    x, y, z = rng.sample(_CONTEXT_NOUNS, 3)
    prompt = rng.choice(ECHO_TEMPLATES).format(word=word, x=x, X=x.capitalize(), y=y, z=z)
    wrong = rng.choice([w for w in WRONG_WORDS if w != word])
    return {"prompt": prompt, "chosen": word, "rejected": wrong, "reference": word}


def _addition_row(rng: random.Random) -> dict:
    a, b = rng.randint(1, 50), rng.randint(1, 50)
    wrong = a + b + rng.choice([d for d in range(-10, 11) if d != 0])
    return {"prompt": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.",
            "rejected": f"The answer is {wrong}.", "reference": str(a + b)}


def _unique_rows(rng: random.Random, kinds: list, exclude: frozenset = frozenset()) -> list[dict]:
    """`count` rows from each (make, count) of `kinds`, no prompt twice (nor one in `exclude`), in a seeded order."""
    rows, seen = [], set(exclude)
    for make, count in kinds:
        made = 0
        while made < count:
            row = make(rng)
            if row["prompt"] not in seen:
                seen.add(row["prompt"])
                rows.append(row)
                made += 1
    rng.shuffle(rows)
    return rows


def task_rows(n: int = NUM_ROWS, seed: int = BUILTIN_SEED) -> list[dict]:
    """`n` rows with unique prompts, ~ECHO_SHARE echo and the rest addition, in a seeded order."""
    n_echo = round(n * ECHO_SHARE)
    return _unique_rows(random.Random(seed), [(_echo_row, n_echo), (_addition_row, n - n_echo)])


def text_rows(n: int = 1000, seed: int = BUILTIN_SEED) -> list[dict]:
    """Plain sentences in the task's domain (a `text` column) for the PTX loss."""
    rng = random.Random(seed + 1)
    rows = []
    for i in range(n):
        if i % 2:
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            rows.append({"text": f"What is {a} plus {b}? The answer is {a + b}."})
        else:
            word = rng.choice(ECHO_WORDS)
            rows.append({"text": f"Say the word {word}. {word.capitalize()}."})
    return rows


# ---------------------------------------------------------------------------------------------- the demo task
DEMO_ROWS = 2000
DEMO_EVAL_ROWS = 50
DEMO_ECHO_SHARE = 0.6
DEMO_WORDS = ("dog", "cat", "red", "blue", "tree", "fish", "book", "car", "house", "green")
DEMO_MAX_OPERAND = 30


def _demo_echo_row(rng: random.Random) -> dict:
    word = rng.choice(DEMO_WORDS)
    x, y, z = rng.sample(_CONTEXT_NOUNS, 3)
    prompt = rng.choice(ECHO_TEMPLATES).format(word=word, x=x, X=x.capitalize(), y=y, z=z)
    wrong = rng.choice([w for w in (x, y, z) + DEMO_WORDS if w != word])  # a context noun or another word
    return {"prompt": prompt, "chosen": word.capitalize() + ".", "rejected": wrong.capitalize() + ".",
            "reference": word}


def _demo_addition_row(rng: random.Random) -> dict:
    a, b = rng.randint(1, DEMO_MAX_OPERAND), rng.randint(1, DEMO_MAX_OPERAND)
    wrong = a + b + rng.choice([d for d in range(-5, 6) if d != 0])
    return {"prompt": f"What is {a} plus {b}?", "chosen": f"The answer is {a + b}.",
            "rejected": f"The answer is {wrong}.", "reference": str(a + b)}


def demo_rows(n: int = DEMO_ROWS, seed: int = BUILTIN_SEED, exclude: frozenset = frozenset()) -> list[dict]:
    """`n` demo rows with unique prompts (none in `exclude`), ~DEMO_ECHO_SHARE echo, in a seeded order."""
    n_echo = round(n * DEMO_ECHO_SHARE)
    return _unique_rows(random.Random(seed), [(_demo_echo_row, n_echo), (_demo_addition_row, n - n_echo)], exclude)


def demo_eval_rows(n: int = DEMO_EVAL_ROWS) -> list[dict]:
    """Held-out demo rows: none of their prompts is in `builtin:demo`."""
    return demo_rows(n, seed=BUILTIN_SEED + 1, exclude=frozenset(r["prompt"] for r in demo_rows()))


_ANSWER_FRAME = re.compile(r"^the answer is\s+", flags=re.IGNORECASE)
_EDGE = " \t\n.!\"'`*"


def _bare_answer(text: str) -> str:
    """The answer without its frame: edge whitespace, quotes and end punctuation, and a leading "The answer is"."""
    return _ANSWER_FRAME.sub("", text.strip(_EDGE)).strip(_EDGE).lower()


def strict_reward(prompts: list[str], responses: list[str], references: list[str]) -> list[float]:
    """1.0 where the whole response is the reference (case-insensitive; "The answer is ", quotes and end
    punctuation aside: "Dog.", "42", "The answer is 42." score for "dog" / "42"), else 0.0. Unlike `rule_reward`, a
    sentence or a word list that merely contains the answer scores 0. Usable as `ppo.reward_functions:
    ["rlhf_ray.data.builtin.strict_reward"]`."""
    if not len(prompts) == len(responses) == len(references):
        raise ValueError(f"strict_reward: got {len(prompts)} prompts, {len(responses)} responses and "
                         f"{len(references)} references; they must match one to one")
    return [1.0 if reference.strip() and _bare_answer(response) == reference.strip().lower() else 0.0
            for response, reference in zip(responses, references)]


BUILTIN_DATASETS = {"tasks": task_rows, "text": text_rows, "demo": demo_rows, "demo-eval": demo_eval_rows}


def builtin_dataset(name: str):
    """`builtin:tasks`, `builtin:text`, `builtin:demo` or `builtin:demo-eval` as an in-memory datasets.Dataset."""
    import datasets

    if name not in BUILTIN_DATASETS:
        raise ValueError(f"unknown built-in data set 'builtin:{name}'; choose one of "
                         f"{', '.join('builtin:' + k for k in BUILTIN_DATASETS)}")
    return datasets.Dataset.from_list(BUILTIN_DATASETS[name]())


def rule_reward(prompts: list[str], responses: list[str], references: list[str]) -> list[float]:
    """1.0 where the response contains the reference as a whole word (case-insensitive), else 0.0.

    An empty reference scores 0.0 (nothing to check). Usable as `ppo.reward_functions:
    ["rlhf_ray.data.builtin.rule_reward"]`.
    """
    if not len(prompts) == len(responses) == len(references):
        raise ValueError(f"rule_reward: got {len(prompts)} prompts, {len(responses)} responses and "
                         f"{len(references)} references; they must match one to one")
    scores = []
    for response, reference in zip(responses, references):
        reference = reference.strip()
        hit = bool(reference) and re.search(rf"(?<![0-9A-Za-z]){re.escape(reference)}(?![0-9A-Za-z])",
                                            response, flags=re.IGNORECASE)
        scores.append(1.0 if hit else 0.0)
    return scores
