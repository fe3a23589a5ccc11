"""
An OpenAI-compatible /chat/completions server on loopback around any backend (`messages -> text`), with
the latency and the faults of a hosted API injected on purpose: for the tests, the benchmarks and
`python simulator.py serve`.

    server = serve(ScriptedUser(), latency=lognormal(median=1.0, sigma=0.8), faults=every(5, 400))
    chat = OpenAIChat(server.url, "scripted")          # ... use it, then
    server.shutdown()

latency: seconds before each answer, a number or a function of the request (a dict: its messages),
so that a benchmark can give every simulator turn the same latency under any schedule.
faults: a list consumed one per request, or a function of the request's number (1, 2, ...); a fault is
  an int       answer with that HTTP status
  a float      stall that many more seconds
  "trickle"    send the answer one byte every 0.2 s
  "huge"       answer with a 16 MB body
  None         no fault
"""

import collections
import hashlib
import json
import math
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def lognormal(median=1.0, sigma=0.8, seed=0):
    """Latency like a hosted LLM API's: log-normal with this median and log-sd, drawn from a hash of the
    request's messages and the seed, so the same request waits the same time whenever it comes."""
    from statistics import NormalDist

    def latency(request):
        digest = hashlib.sha256(json.dumps([seed, request.get("messages")], sort_keys=True).encode()).digest()
        u = (int.from_bytes(digest[:8], "big") + 0.5) / 2**64
        return median * math.exp(sigma * NormalDist().inv_cdf(u))
    return latency


def every(n, fault):
    """The fault on every n-th request (n, 2n, ...)."""
    return lambda number: fault if number % n == 0 else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive: one connection serves a client thread's calls

    def setup(self):
        super().setup()   # headers and body leave in two writes: without this, Nagle holds the body ~40 ms
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args):
        pass

    def do_GET(self):
        self._send(200, {"object": "list", "data": [{"id": "scripted", "object": "model"}]})

    def do_POST(self):
        server = self.server
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        with server.lock:
            server.requests += 1
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
            number = server.requests
            fault = server.faults(number) if callable(server.faults) else server.faults.popleft() if server.faults else None
        try:
            latency = server.latency(request) if callable(server.latency) else server.latency
            time.sleep(latency + (fault if isinstance(fault, float) else 0.0))
            if isinstance(fault, int):
                status, answer = fault, {"error": {"message": f"injected HTTP {fault}"}}
            else:
                content = "x" * 16_000_000 if fault == "huge" else server.chat(request["messages"])
                status, answer = 200, {"object": "chat.completion", "model": request.get("model"), "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}
        finally:
            with server.lock:   # before the answer leaves: the client may send its next call at once
                server.in_flight -= 1
        self._send(status, answer, trickle=fault == "trickle")

    def _send(self, status, obj, trickle=False):
        data = json.dumps(obj).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            for i in range(0, len(data), 1 if trickle else len(data)):
                self.wfile.write(data[i:i + (1 if trickle else len(data))])
                if trickle:
                    self.wfile.flush()
                    time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
            self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the default of 5 drops bursts of simultaneous connections


def serve(chat, host="127.0.0.1", port=0, latency=0.0, faults=()):
    """Serve `chat` at http://host:port/v1/chat/completions from a background thread. Returns the server
    (`.url`, `.requests`, `.max_in_flight`, `.shutdown()`)."""
    server = _Server((host, port), _Handler)
    server.chat, server.latency = chat, latency
    server.faults = faults if callable(faults) else collections.deque(faults)
    server.lock, server.requests, server.in_flight, server.max_in_flight = threading.Lock(), 0, 0, 0
    server.url = f"http://{host}:{server.server_address[1]}/v1"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
