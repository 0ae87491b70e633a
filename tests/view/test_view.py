"""`himoe view`: the server's answers against the model itself, its limits and safety, and
the page in a real browser (headless Chromium, where installed)."""

import http.client
import io
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse

import pytest
import torch

from himoe.checkpoint import card as checkpoint
from himoe.data.tokenizers import tokenizer_for
from himoe.edit.prune import expert_shares
from himoe.training.evaluation import evaluate
from himoe.training.trainer import Trainer
from himoe.view import server as view_server
from tests.conftest import tiny_config

TEXT = "To be, or not to be, that is the question: whether 'tis nobler in the mind.\n" * 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("view")
    (root / "corpus.txt").write_text(TEXT * 4)
    cfg = tiny_config(n_embd=16, block_size=16, num_moes=3, num_experts=4, batch_size=4,
                      max_iters=6, eval_interval=3, eval_iters=2,
                      data_file=str(root / "corpus.txt"), model_dir=str(root / "model"))
    Trainer(cfg, out=io.StringIO()).train()
    return root / "model"


@pytest.fixture(scope="module")
def server(model_dir):
    started = threading.Event()
    holder = {}

    def ready(srv):
        holder["srv"] = srv
        started.set()

    thread = threading.Thread(target=view_server.serve, args=(model_dir, "127.0.0.1", 0),
                              kwargs={"ready": ready}, daemon=True)
    thread.start()
    assert started.wait(60)
    yield holder["srv"]
    holder["srv"].shutdown()


def request(server, method, path, body=None):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, data


def tree(root):
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def test_routing_is_the_models_own_forward(server, model_dir):
    text = "whether 'tis no"  # one window of block_size 16
    status, data = request(server, "POST", "/api/route", {"text": text})
    assert status == 200
    routed = json.loads(data)
    model, cfg, vocab, _ = checkpoint.load_model(model_dir)
    tok = tokenizer_for(cfg, vocab, model_dir)
    ids = tok.encode(text)
    assert routed["tokens"] == [tok.decode([i]) for i in ids]
    model.eval()
    with torch.no_grad():
        model(torch.tensor([ids]))
    M = cfg.num_experts
    for layer, moe in model.moe_layers.items():
        for t, entry in enumerate(routed["layers"][layer]):
            want = [(int(e) // M + 1, int(e) % M + 1) for e in moe.last_ids_TK[t]]
            assert [(c["group"], c["expert"]) for c in entry["choices"]] == want
            weights = [c["weight"] for c in entry["choices"]]
            assert weights == pytest.approx(moe.last_weights_TK[t].tolist(), abs=1e-4)
            # The combine weight is the product of the two levels' probabilities.
            assert [entry["p1"] * p2 for p2 in entry["p2"]] == pytest.approx(weights, abs=2e-4)
            assert entry["runner_up_groups"][0]["group"] != entry["choices"][0]["group"]


def test_the_experts_loads_are_what_experts_list_counts(server, model_dir):
    status, data = request(server, "GET", "/api/experts")
    assert status == 200
    got = json.loads(data)
    model, cfg, vocab, _ = checkpoint.load_model(model_dir)
    from himoe.cli.experts import validation_data

    val, _ = validation_data(model_dir, cfg, vocab, None)
    shares = expert_shares(evaluate(model, val, cfg, "cpu", torch.float32)["layers"], cfg)
    for (L, g, j), share in shares.items():
        assert got["layers"][L]["share"][g][j] == pytest.approx(share)


def test_generation_streams_one_event_per_token(server):
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=60)
    conn.request("GET", "/api/generate?prompt=To&max_new_tokens=7&seed=3")
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type") == "text/event-stream"
    events = [json.loads(line[6:]) for line in r.read().decode().splitlines()
              if line.startswith("data: ")]
    conn.close()
    assert len(events) == 8 and events[-1] == {"done": True}
    assert all(len(e["layers"]) == 2 and e["layers"][0][0]["group"] >= 1 for e in events[:-1])


def test_a_client_that_leaves_mid_stream_costs_nothing(server):
    sock = socket.create_connection(server.server_address[:2], timeout=60)
    sock.sendall(b"GET /api/generate?prompt=To&max_new_tokens=500 HTTP/1.1\r\n"
                 b"Host: localhost\r\n\r\n")
    received = b""
    while b"data: " not in received:  # the first event, then the page goes away
        received += sock.recv(4096)
    sock.close()
    start = time.perf_counter()
    status, _ = request(server, "POST", "/api/route", {"text": "to be"})
    assert status == 200  # the model's lock was released: generation stopped
    assert time.perf_counter() - start < 30


@pytest.mark.parametrize("method, path, body, status, needle", [
    ("GET", "/../config.json", None, 404, "is not a page"),
    ("GET", "/static/../server.py", None, 404, "does not exist"),
    ("GET", "/static/%2e%2e%2fserver.py", None, 404, "does not exist"),
    ("GET", "/api/generate?max_new_tokens=100000", None, 400, "max_new_tokens must be"),
    ("GET", "/api/generate?temperature=hot", None, 400, "temperature must be"),
    ("POST", "/api/route", {"text": "x" * 20_001}, 413, "more than the 20,000"),
    ("POST", "/api/route", {"text": 3}, 400, "must be a string"),
])
def test_bad_requests_get_a_clear_answer(server, method, path, body, status, needle):
    got, data = request(server, method, path, body)
    assert got == status and needle in json.loads(data)["error"]


def test_the_server_never_writes_the_model_directory(server, model_dir):
    before = tree(model_dir)
    for path in ("/", "/static/app.js", "/api/model", "/api/experts"):
        assert request(server, "GET", path)[0] == 200
    request(server, "POST", "/api/route", {"text": "to be"})
    assert tree(model_dir) == before


def test_requests_beyond_the_limit_are_turned_away(server):
    taken = 0  # as many requests as allowed (one may still be ending: wait for it)
    while taken < view_server.MAX_CLIENTS and server.viewer.clients.acquire(timeout=30):
        taken += 1
    try:
        status, data = request(server, "GET", "/api/model")
        assert status == 503 and "requests at once" in json.loads(data)["error"]
    finally:
        for _ in range(taken):
            server.viewer.clients.release()
    assert taken == view_server.MAX_CLIENTS
    assert request(server, "GET", "/api/model")[0] == 200


BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(BROWSER is None, reason="no chromium (scripts/setup.sh dev installs it)")
def test_the_page_in_a_real_browser(server, model_dir):
    """Headless Chromium loads the page from a link that routes a text and opens the
    details of one token, measures the loads and generates: the DOM it leaves shows one
    coloured token per model token per layer, the experts the forward pass chose, the
    shares `experts list` prints, and the streamed tokens."""
    text = "to be, or not"
    query = urllib.parse.urlencode({"text": text, "token": 3, "experts": 1, "generate": 6,
                                    "prompt": "To"})
    host, port = server.server_address[:2]
    started = time.perf_counter()
    dom = subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu",
                          "--virtual-time-budget=20000", "--dump-dom",
                          f"http://{host}:{port}/?{query}"],
                         capture_output=True, text=True, timeout=120).stdout
    assert 'data-ready="1"' in dom, dom[-2000:]
    _, routed = request(server, "POST", "/api/route", {"text": text})
    routed = json.loads(routed)
    rows = re.findall(r'<div class="layer-row" data-layer="(\d+)">(.*?)</div></div>', dom, re.S)
    assert len(rows) == 2
    for (_, row), per_token in zip(rows, routed["layers"]):
        spans = re.findall(r'class="tok" data-t="(\d+)" data-group="(\d+)" '
                           r'data-experts="([\d,]+)" style="background:hsl', row)
        assert len(spans) == len(routed["tokens"])
        for (_, group, experts), entry in zip(spans, per_token):
            assert int(group) == entry["choices"][0]["group"]
            assert experts == ",".join(str(c["expert"]) for c in entry["choices"])
    tip = re.search(r'<div id="tip"[^>]*>(.*?)</div>\s*<script', dom, re.S)
    assert tip and "(token 4)" in tip[1] and "layer 1" in tip[1]
    first = routed["layers"][0][3]["choices"][0]
    assert f"group {first['group']} expert {first['expert']}" in tip[1]
    cells = re.findall(r'data-layer="(\d)" data-group="(\d)" data-expert="(\d)" '
                       r'data-share="([\d.e-]+)"', dom)
    _, experts = request(server, "GET", "/api/experts")
    experts = json.loads(experts)
    assert len(cells) == sum(sum(x["sizes"]) for x in experts["layers"])
    for layer, group, expert, share in cells:
        want = experts["layers"][int(layer) - 1]["share"][int(group) - 1][int(expert) - 1]
        assert float(share) == pytest.approx(want)
    generated = re.search(r'<div id="generated" class="tokens">(.*?)</div>', dom, re.S)
    assert generated and generated[1].count('class="tok"') == 6
    assert time.perf_counter() - started < 120


def test_a_save_into_the_directory_does_not_disturb_the_page(tmp_path):
    """The page serves the save it loaded: a run saving into the same directory meanwhile
    (here a newer save of the same model) changes nothing it answers."""
    cfg = tiny_config(n_embd=16, block_size=16, num_moes=3, num_experts=4, batch_size=4,
                      max_iters=4, eval_interval=2, eval_iters=1,
                      model_dir=str(tmp_path / "model"))
    Trainer(cfg, out=io.StringIO()).train(stop_at=2)
    viewer = view_server.Viewer(tmp_path / "model")
    before = viewer.route("to be")
    Trainer(cfg, out=io.StringIO(), resume=True).train()  # saves step 4 into the directory
    assert checkpoint.read_config(tmp_path / "model")[2] == 4
    assert viewer.summary()["step"] == 2 and viewer.route("to be") == before


def test_the_analysis_tables_are_served_where_analyze_wrote_them(model_dir, tmp_path, capsys):
    from tests.cli.test_bad_input import himoe

    work = tmp_path / "model"
    shutil.copytree(model_dir, work)
    assert view_server.Viewer(work).summary()["analysis"] is None
    (tmp_path / "a.txt").write_text("to be or not to be " * 20)
    (tmp_path / "b.txt").write_text("the question whether " * 20)
    code, _, err = himoe(["analyze", "--model_dir", work, "--domain", f"a={tmp_path / 'a.txt'}",
                          "--domain", f"b={tmp_path / 'b.txt'}", "--no_plots"], capsys)
    assert code == 0, err
    analysis = view_server.Viewer(work).summary()["analysis"]
    report = json.loads((work / "analysis" / "analysis.json").read_text())
    assert analysis["domains"] == ["a", "b"]
    assert analysis["layers"][0]["group_share"] == report["layers"][0]["group_share"]
