"""rollout.mode one_step and bounded: batches in flight while the learners train, on a schedule fixed by numbers.

Batch b is the one iteration b trains on. With depth S (one_step: 1; bounded: rollout.max_staleness) its
generation.max_new_tokens are cut into S chunks of ceil(max_new_tokens / S) tokens, and during iteration k, while
the learners score and train batch k and the engines hold the weights of learner step k, every batch b in
k+1 .. k+S is brought to

    chunks(b, k) = min(S, S + 1 - (b - k))        (steady state: one more chunk each; batch k+S is admitted)

So batch b is admitted (its prompts taken from the stream) during iteration b - S, its j-th chunk is sampled by the
weights of step b - S + j - 1, and it is complete when iteration b - 1 ends: trained at step b, its oldest token is
S steps old (admission control: nothing older is ever scheduled), its newest 1. A weight sync interrupts every
unfinished sample: its next chunk continues from its generated prefix (prompt + prefix resubmitted; the sync reset
the engines' prefix cache) under the new weights, and every token records the version that sampled it
(Sample.token_versions). The schedule depends only on iteration numbers, never on which engine answers first, so
two runs with the same seeds generate the same tokens, and a checkpoint holding the batches in flight (prompt ids,
tokens, log-probs, versions: JSON) resumes exactly. With S = 1 this is one-step-off: batch k+1 generated whole by
the weights of step k.

The price of determinism: engines faster than the learners wait for the next sync; slower ones make the learners
wait (time/generate_wait_s).
"""
from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional


@dataclass
class Generated:
    """One batch in flight: its prompts and their samples so far."""

    iteration: int  # the iteration that trains it
    rows: list[dict]  # prompt rows (each with its prompt_id)
    samples: list  # generator.Sample, prompt_index into rows; token_versions per generated token
    chunks: int  # chunks generated so far
    counts: dict  # redispatched, skipped_prompts, generated_tokens, prompts_consumed
    engines: list[int] = field(default_factory=list)  # engines that generated any of it
    times: list[float] = field(default_factory=list)  # [admitted, last chunk done]

    def state(self) -> dict:
        return {"iteration": self.iteration, "prompt_ids": [row["prompt_id"] for row in self.rows],
                "samples": [dataclasses.asdict(s) for s in self.samples], "chunks": self.chunks,
                "counts": self.counts, "engines": self.engines, "times": self.times}

    @classmethod
    def from_state(cls, state: dict, row_at: Callable[[int], dict]) -> "Generated":
        from rlhf_ray.generator import Sample

        return cls(state["iteration"], [row_at(i) for i in state["prompt_ids"]],
                   [Sample(**s) for s in state["samples"]], state["chunks"], state["counts"], state["engines"],
                   state["times"])


def chunk_tokens(max_new_tokens: int, depth: int) -> int:
    return -(-max_new_tokens // depth)


def scheduled_chunks(batch: int, iteration: int, depth: int) -> int:
    """How many chunks batch `batch` has when iteration `iteration` ends (module docstring)."""
    return min(depth, depth + 1 - (batch - iteration))


def continued(sample, chunk):
    """`sample` with the next chunk of its tokens appended (both generator.Sample; the chunk from a later version)."""
    return dataclasses.replace(
        sample, token_ids=sample.token_ids + chunk.token_ids, logprobs=sample.logprobs + chunk.logprobs,
        finish_reason=chunk.finish_reason, token_versions=sample.token_versions + chunk.token_versions,
        extra={**sample.extra, "engines": sample.extra.get("engines", [sample.engine]) + [chunk.engine]})


def next_chunk(g: Generated, generators, gen, chunk: int, run_seed: int) -> Generated:
    """`g` with one more chunk: every sample that has not ended (cut by the chunk, not by an EOS, a stop token or
    max_model_len) continues from its prefix (prompt + its tokens so far, resubmitted to `generators`, a
    GeneratorGroup, under their current weights) with a seed of its own per (prompt id, sample, chunk); `gen`: the
    generation config."""
    from rlhf_ray.experience import continuation_seed
    from rlhf_ray.generator import Sampling

    done = g.chunks * chunk
    prompt = lambda s: g.rows[s.prompt_index]["prompt_input_ids"]  # noqa: E731
    todo = [i for i, s in enumerate(g.samples) if s.finish_reason == "length" and len(s.token_ids) == done
            < gen.max_new_tokens and len(prompt(s)) + done < generators.max_model_len]
    samples, counts, engines = list(g.samples), dict(g.counts), set(g.engines)
    if todo:
        seeds = [continuation_seed(run_seed, g.rows[samples[i].prompt_index]["prompt_id"], samples[i].sample_index,
                                   g.chunks) for i in todo]
        sampling = Sampling.from_config(gen, n=1, max_new_tokens=min(chunk, gen.max_new_tokens - done))
        rollout = generators.generate([prompt(samples[i]) + samples[i].token_ids for i in todo], sampling,
                                      seeds=seeds)
        for piece in rollout.samples:
            samples[todo[piece.prompt_index]] = continued(samples[todo[piece.prompt_index]], piece)
        counts["redispatched"] += rollout.redispatched
        counts["generated_tokens"] += sum(len(c.token_ids) for c in rollout.samples)
        engines |= {e for e, n in rollout.engine_prompts.items() if n > 0}
    return dataclasses.replace(g, samples=samples, chunks=g.chunks + 1, counts=counts, engines=sorted(engines),
                               times=[g.times[0], time.time()])


class RolloutPipeline:
    """The batches in flight, advanced in a background thread while the learners train.

    admit(b) -> Generated: batch b's first chunk, its prompts taken from the stream now.
    extend(g) -> Generated: g with one more chunk for its unfinished samples, from the engines' current weights
    (a new object: what is in flight is never changed in place, so a failed iteration keeps it for the retry)."""

    def __init__(self, depth: int, num_iterations: int, admit: Callable[[int], Generated],
                 extend: Callable[[Generated], Generated]):
        self.depth, self.num_iterations, self.admit, self.extend = depth, num_iterations, admit, extend
        self.in_flight: dict[int, Generated] = {}
        self._next: Optional[dict[int, Generated]] = None
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self.busy_s = 0.0  # how long the last background advance took (metric time/generate_background_s)

    def advance(self, batches: dict[int, Generated], iteration: int, numbers) -> dict[int, Generated]:
        """`batches` with each of `numbers` (ascending: admission in sequence order) brought to its scheduled
        chunks at the end of `iteration`."""
        out = dict(batches)
        for b in numbers:
            g = out[b] if b in out else self.admit(b)
            while g.chunks < scheduled_chunks(b, iteration, self.depth):
                g = self.extend(g)
            out[b] = g
        return out

    def take(self, iteration: int) -> Generated:
        """Batch `iteration`, complete; generated now (all its chunks from the current weights) when it is not in
        flight: the first iteration, or after a resume or recovery to a state with nothing in flight. Not kept: a
        failed iteration's retry, whose prompt stream recovery puts back, generates it again."""
        if iteration in self.in_flight:
            return self.in_flight[iteration]
        return self.advance({}, iteration, [iteration])[iteration]

    def start(self, iteration: int) -> None:
        """In the background: batches iteration+1 .. iteration+depth (those the run will train) to their schedule."""
        later = {b: g for b, g in self.in_flight.items() if b > iteration}
        numbers = range(iteration + 1, min(iteration + self.depth, self.num_iterations - 1) + 1)

        def run() -> None:
            started = time.time()
            try:
                self._next = self.advance(later, iteration, numbers)
            except BaseException as error:  # handed to the controller by finish()
                self._error = error
            self.busy_s = time.time() - started

        self._next, self._error = later, None
        self._thread = threading.Thread(target=run, name=f"rollout-{iteration + 1}", daemon=True)
        self._thread.start()

    def finish(self) -> float:
        """Wait for the background work (re-raising its error); returns the seconds waited."""
        waited = time.time()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return time.time() - waited

    def commit(self) -> None:
        """The iteration is done: what the background advanced is what is in flight now."""
        if self._next is not None:
            self.in_flight, self._next = self._next, None

    def abandon(self) -> None:
        """The iteration failed: wait for the background thread and drop its work; what was in flight when the
        iteration started (the batch it trained on included) stays for the retry."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._next, self._error = None, None

    # -- checkpoint (JSON: a checkpoint is data, never code to unpickle)
    def state(self) -> list[dict]:
        return [self.in_flight[b].state() for b in sorted(self.in_flight)]

    def load_state(self, state: Optional[list[dict]], row_at: Callable[[int], dict]) -> None:
        self.abandon()
        self.in_flight = {s["iteration"]: Generated.from_state(s, row_at) for s in state or []}
