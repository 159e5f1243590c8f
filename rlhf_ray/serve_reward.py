"""`rlhf-ray serve-reward --path RM_FOLDER`: a trained reward model behind the HTTP protocol that
`ppo.reward_functions` already speaks (scorer.HttpRewardFunction):

    POST /score   {"prompts": [str, ...], "responses": [str, ...], <other per-row lists, ignored>}
               -> {"rewards": [float, ...]}                       one score per row, in order
    GET /health   {"status": "ok", "requests": .., "rows": .., "batches": .., "forward_passes": ..}

Requests that arrive within `batch_window_s` of each other are scored together (one forward pass per up to
`max_batch_rows` rows), so concurrent PPO runs or reward ranks share passes. With a token (from the environment
variable --token-env names), every POST needs "Authorization: Bearer <token>" (what the client sends with
ppo.reward_http_token_env). Errors answer {"error": message}: 401 wrong or missing token, 411 no Content-Length,
413 body over max_body_bytes, 400 bad JSON or fields, 404 other paths, 500 a scoring failure; the server keeps
serving after each.

Text -> tokens exactly as the data pipeline made the reward model's training rows (data/tokenization.py): the
prompt text is parsed into a conversation (HH "Human:/Assistant:" markers, else one user message) and rendered with
the chat template's generation prompt when the tokenizer has one (else the HH text), then the response's tokens and
EOS; the prompt keeps its last max_prompt_len tokens, the response its first max_answer_len. The score is the value
at the last token (ValueHeadModel.score), as the PPO reward scorer takes it.

It runs in the process that runs the command, not on a Ray cluster: a reward server is a long-lived service that
several runs share, so its lifetime must not be tied to one run's cluster or job, and one model replica in a plain
process is the simplest thing that a URL can point at. It uses the GPU when this process sees one.
"""
from __future__ import annotations

import hmac
import json
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional

log = logging.getLogger("rlhf_ray.serve_reward")

TOKEN_ENV = "RLHF_RAY_REWARD_TOKEN"  # default variable holding the bearer token
DRAIN_CAP_BYTES = 1 << 20  # a refused request's body is read (up to this) so the client sees the answer, not a reset
ScoreFn = Callable[[list[str], list[str]], list[float]]


# ------------------------------------------------------------------------------------------------ the model
class RewardModel:
    """A value-head folder (`rlhf-ray rm` output) and its tokenizer, scoring (prompt, response) texts."""

    def __init__(self, path: str, tokenizer: Optional[str] = None, dtype: str = "float32",
                 use_chat_template: bool = True, max_prompt_len: int = 256, max_answer_len: int = 256,
                 trust_remote_code: bool = False):
        import torch

        from rlhf_ray.config import ModelConfig
        from rlhf_ray.data.tokenization import uses_chat_template
        from rlhf_ray.models.loading import load_tokenizer
        from rlhf_ray.models.value_head import ValueHeadModel

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = load_tokenizer(ModelConfig(path=path, tokenizer=tokenizer,
                                                    trust_remote_code=trust_remote_code))
        self.model = ValueHeadModel.from_pretrained(path, dtype=getattr(torch, dtype),
                                                    trust_remote_code=trust_remote_code)
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        self.template = uses_chat_template(self.tokenizer, use_chat_template)
        self.max_prompt_len, self.max_answer_len = max_prompt_len, max_answer_len

    def token_ids(self, prompts: list[str], responses: list[str]) -> list[list[int]]:
        from rlhf_ray.data.adapters import parse_conversation
        from rlhf_ray.data.tokenization import encode_answers, encode_prompts

        prompt_ids = encode_prompts(self.tokenizer, [parse_conversation(p) for p in prompts], self.template)
        answer_ids = encode_answers(self.tokenizer, list(responses), self.template)
        return [p[-self.max_prompt_len:] + a[:self.max_answer_len] for p, a in zip(prompt_ids, answer_ids)]

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        import torch

        from rlhf_ray.data.tokenization import pad_batch

        ids, mask = pad_batch(self.token_ids(prompts, responses), self.tokenizer.pad_token_id)
        with torch.no_grad():
            return self.model.score(ids.to(self.device), mask.to(self.device)).float().cpu().tolist()


# ---------------------------------------------------------------------------------------------- batching
@dataclass
class _Pending:
    prompts: list[str]
    responses: list[str]
    future: Future = field(default_factory=Future)


class Batcher:
    """One thread that scores queued requests: the first one waits up to `window_s` for others to join it (until
    `max_rows` rows are collected); the merged rows go through `score_fn` in chunks of at most `max_rows`."""

    def __init__(self, score_fn: ScoreFn, window_s: float = 0.01, max_rows: int = 64):
        if window_s < 0 or max_rows < 1:
            raise ValueError("batch window must be >= 0 and max batch rows >= 1")
        self.score_fn, self.window_s, self.max_rows = score_fn, window_s, max_rows
        self.queue: queue.Queue = queue.Queue()
        self.stats = {"requests": 0, "rows": 0, "batches": 0, "forward_passes": 0}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="reward-batcher", daemon=True)
        self._thread.start()

    def submit(self, prompts: list[str], responses: list[str]) -> Future:
        pending = _Pending(prompts, responses)
        self.queue.put(pending)
        return pending.future

    def close(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=10)

    def _collect(self, first: _Pending) -> tuple[list[_Pending], bool]:
        group, rows = [first], len(first.prompts)
        deadline = time.monotonic() + self.window_s
        while rows < self.max_rows:
            try:
                nxt = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if nxt is None:
                return group, True
            group.append(nxt)
            rows += len(nxt.prompts)
        return group, False

    def _loop(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            group, closing = self._collect(first)
            self._score(group)
            if closing:
                return

    def _score(self, group: list[_Pending]) -> None:
        prompts = [p for g in group for p in g.prompts]
        responses = [r for g in group for r in g.responses]
        try:
            scores: list[float] = []
            for start in range(0, len(prompts), self.max_rows):
                scores += self.score_fn(prompts[start:start + self.max_rows], responses[start:start + self.max_rows])
                with self._lock:
                    self.stats["forward_passes"] += 1
        except Exception as e:  # every request of the batch gets the error; the thread keeps serving
            log.exception("scoring a batch of %d rows failed", len(prompts))
            for g in group:
                g.future.set_exception(e)
            return
        with self._lock:
            self.stats["requests"] += len(group)
            self.stats["rows"] += len(prompts)
            self.stats["batches"] += 1
        offset = 0
        for g in group:
            g.future.set_result(scores[offset:offset + len(g.prompts)])
            offset += len(g.prompts)

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self.stats)


# ---------------------------------------------------------------------------------------------- HTTP
def request_problem(payload) -> Optional[str]:
    """Why a decoded body is not a scoring request, or None."""
    if not isinstance(payload, dict):
        return f"the body must be a JSON object with 'prompts' and 'responses', got {type(payload).__name__}"
    for key in ("prompts", "responses"):
        value = payload.get(key)
        if not isinstance(value, list):
            return f"'{key}' must be a list of strings, got {type(value).__name__ if key in payload else 'nothing'}"
        bad = next((i for i, v in enumerate(value) if not isinstance(v, str)), None)
        if bad is not None:
            return f"'{key}'[{bad}] is {type(value[bad]).__name__}, not a string"
    if len(payload["prompts"]) != len(payload["responses"]):
        return f"{len(payload['prompts'])} prompts but {len(payload['responses'])} responses"
    return None


class RewardServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], batcher: Batcher, token: Optional[str], max_body_bytes: int,
                 result_timeout_s: float = 300.0):
        super().__init__(address, RewardHandler)
        self.batcher, self.token, self.max_body_bytes = batcher, token, max_body_bytes
        self.result_timeout_s = result_timeout_s

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/score"

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.batcher.close()


class RewardHandler(BaseHTTPRequestHandler):
    server: RewardServer
    timeout = 60  # seconds a connection may stall mid-request before its thread gives up

    def log_message(self, fmt, *args):
        log.debug("%s %s", self.address_string(), fmt % args)

    def _reply(self, code: int, body: dict) -> None:
        payload = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if code == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        self.end_headers()
        self.wfile.write(payload)

    def _refuse(self, code: int, message: str, unread: int = 0) -> None:
        """An error answer; an unread body is drained (bounded) so the client reads the answer, not a reset."""
        if code >= 500:
            log.warning("HTTP %d: %s", code, message)
        else:
            log.info("HTTP %d from %s: %s", code, self.address_string(), message)
        self.close_connection = True
        self._reply(code, {"error": message})
        try:
            self.connection.settimeout(1.0)
            while unread > 0:
                chunk = self.rfile.read(min(unread, 65536, DRAIN_CAP_BYTES))
                if not chunk:
                    break
                unread -= len(chunk)
        except OSError:
            pass

    def do_GET(self):
        if self.path.split("?")[0] == "/health":
            return self._reply(200, {"status": "ok", **self.server.batcher.snapshot()})
        self._refuse(404, f"no such path {self.path!r}: POST /score or GET /health")

    def do_POST(self):
        length_header = self.headers.get("Content-Length")
        try:
            length = int(length_header) if length_header is not None else None
        except ValueError:
            return self._refuse(400, f"Content-Length {length_header!r} is not a number")
        drain = min(length or 0, DRAIN_CAP_BYTES)
        if self.path.split("?")[0] != "/score":
            return self._refuse(404, f"no such path {self.path!r}: POST /score", drain)
        token = self.server.token
        if token is not None:
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return self._refuse(401, "missing or wrong 'Authorization: Bearer <token>'", drain)
        if length is None:
            return self._refuse(411, "a Content-Length header is required (chunked bodies are not accepted)")
        if length > self.server.max_body_bytes:
            return self._refuse(413, f"body of {length} bytes is over the limit of {self.server.max_body_bytes} "
                                     f"bytes (--max-body-bytes): send fewer rows per request", drain)
        body = self.rfile.read(length)
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            return self._refuse(400, f"the body is not valid JSON: {e}")
        problem = request_problem(payload)
        if problem:
            return self._refuse(400, problem)
        if not payload["prompts"]:
            return self._reply(200, {"rewards": []})
        future = self.server.batcher.submit(payload["prompts"], payload["responses"])
        try:
            rewards = future.result(timeout=self.server.result_timeout_s)
        except Exception as e:
            return self._refuse(500, f"scoring failed: {type(e).__name__}: {e}")
        self._reply(200, {"rewards": rewards})


def make_reward_server(score_fn: ScoreFn, host: str = "127.0.0.1", port: int = 0, token: Optional[str] = None,
                       max_body_bytes: int = 16 << 20, batch_window_s: float = 0.01, max_batch_rows: int = 64
                       ) -> RewardServer:
    """A bound (not yet serving) server; call serve_forever(), or run it in a thread, and close() it."""
    return RewardServer((host, port), Batcher(score_fn, batch_window_s, max_batch_rows), token, max_body_bytes)


# ------------------------------------------------------------------------------------------------ command
def cmd_serve_reward(args) -> int:
    import os
    import sys

    token = os.environ.get(args.token_env) or None
    if token is None and not args.no_auth:
        print(f"rlhf-ray serve-reward: set the bearer token in ${args.token_env} (clients send it with "
              f"ppo.reward_http_token_env: {args.token_env}), or pass --no-auth", file=sys.stderr)
        return 2
    model = RewardModel(args.path, tokenizer=args.tokenizer, dtype=args.dtype,
                        use_chat_template=not args.no_chat_template, max_prompt_len=args.max_prompt_len,
                        max_answer_len=args.max_answer_len, trust_remote_code=args.trust_remote_code)
    server = make_reward_server(model.score, args.host, args.port, token, args.max_body_bytes,
                                args.batch_window_ms / 1000, args.max_batch_rows)
    auth = f"ppo.reward_http_token_env: {args.token_env}" if token else "no auth (--no-auth)"
    print(f"serving reward model {args.path} on {model.device} at {server.url}\n"
          f"use it with: ppo.reward_functions: [\"{server.url}\"], {auth}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.batcher.close()
    return 0
