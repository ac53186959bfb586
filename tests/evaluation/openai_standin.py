"""A local stand-in for OpenAI's chat-completions endpoint, for testing the alpaca_eval API judge without a key.

It answers alpaca_eval's weighted GPT-4-turbo prompt the way the real model is asked to: one token,
``m`` or ``M``, with its top log-probabilities. The "model" prefers the answer that contains the marker
``[good]``. It records every request (headers and JSON body), fails the first ``failures`` requests with
the given HTTP statuses (429 rate limit, 500 server error), and reports ``usage.total_tokens`` = TOKENS
so that cost accounting has a known value. Bound to 127.0.0.1 on a free port; use it as a context manager.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKENS = 1000  # usage.total_tokens of every answer
GOOD = "[good]"
_OUTPUT = re.compile(r'"model_identifier": "(m|M)",\s*"output": """(.*?)"""', re.S)


def preferred_label(user_prompt: str) -> str:
    """'m' or 'M': the identifier whose output contains the marker (the first one when neither or both do)."""
    outputs = dict(_OUTPUT.findall(user_prompt))
    if set(outputs) != {"m", "M"}:
        raise ValueError("the prompt does not show two outputs labelled m and M")
    return "M" if GOOD in outputs["M"] and GOOD not in outputs["m"] else "m"


def _completion(model: str, label: str) -> dict:
    other = "m" if label == "M" else "M"
    top = [{"token": label, "bytes": list(label.encode()), "logprob": -0.05},
           {"token": other, "bytes": list(other.encode()), "logprob": -3.0},
           {"token": "Both", "bytes": list(b"Both"), "logprob": -12.0}]
    return {
        "id": "chatcmpl-standin", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "finish_reason": "length",
                     "message": {"role": "assistant", "content": label},
                     "logprobs": {"content": [{**top[0], "top_logprobs": top}]}}],
        "usage": {"prompt_tokens": TOKENS - 1, "completion_tokens": 1, "total_tokens": TOKENS},
    }


class OpenAIStandIn:
    """``with OpenAIStandIn(failures=(500, 429)) as server:`` then point a client at ``server.base_url``."""

    def __init__(self, failures: tuple[int, ...] = ()):
        self.failures = list(failures)
        self.requests: list[dict] = []  # {"path", "headers", "body"} of every request, failed ones included
        self.answered = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> OpenAIStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with standin._lock:
                    standin.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    failure = standin.failures.pop(0) if standin.failures else None
                if failure is not None:
                    kind = "rate_limit_error" if failure == 429 else "server_error"
                    message = "Rate limit reached for requests" if failure == 429 else "The server had an error"
                    # retry-after-ms: the openai client waits this long (10 ms) instead of its backoff
                    self._send(failure, {"error": {"message": message, "type": kind, "code": kind}},
                               {"retry-after-ms": "10"})
                    return
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
                    return
                user = next(m["content"] for m in body["messages"] if m["role"] == "user")
                self._send(200, _completion(body["model"], preferred_label(user)))
                with standin._lock:
                    standin.answered += 1

        return Handler
