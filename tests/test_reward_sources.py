"""PPO's reward as a weighted sum of sources, and the KL as a loss term: the formulas on hand-made numbers,
each kind of source on its own (a local HTTP server the test starts and stops), the one-line errors, and
the ppo stage publishing nothing when a source fails."""

import json
import math
import shutil
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from test_ppo import LEARN, SMOKE, curve, run_ppo, target_token_reward

from rlhf.config import RewardSourceConfig, load_config
from rlhf.errors import UserError
from rlhf.ppo_math import kl_loss_k3, overlong_penalty
from rlhf.reward.rubric import score_response
from rlhf.reward.sources import ScoringBatch, build_sources, function_files, score_sources


def test_overlong_penalty_ramps_from_zero_to_minus_one_over_the_buffer():
    # L = 64, C = 16: 0 up to 48 tokens; (48 − 56) / 16 = −0.5 at 56; −1 at 64; 52 -> −0.25.
    lengths = torch.tensor([10, 48, 52, 56, 64])
    assert overlong_penalty(lengths, 64, 16).tolist() == pytest.approx([0.0, 0.0, -0.25, -0.5, -1.0])


def test_kl_loss_is_k3_averaged_over_kept_tokens_with_its_gradient():
    # π = 0.5, π_ref = 0.25 on two kept tokens: r = log 0.5, k3 = 0.5 − 1 + log 2 = 0.193147 each; the
    # third token is masked. d/dlogπ = (1 − e^r) / 2 kept tokens = 0.25 each, 0 on the masked one.
    logprobs = torch.full((1, 3), math.log(0.5), requires_grad=True)
    ref = torch.full((1, 3), math.log(0.25))
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss = kl_loss_k3(logprobs, ref, mask)
    assert loss.item() == pytest.approx(0.5 - 1 + math.log(2), abs=1e-6)
    loss.backward()
    assert logprobs.grad[0].tolist() == pytest.approx([0.25, 0.25, 0.0], abs=1e-6)
    # A token top-k dropped (log π = −inf) stays finite: r is capped at 20.
    assert math.isfinite(float(kl_loss_k3(torch.tensor([[-math.inf]]), torch.tensor([[-1.0]]), torch.ones(1, 1))))


def batch(responses=("Rest well.", "Sleep and drink water every single day of the week")) -> ScoringBatch:
    prompts = [[{"role": "user", "content": "Give one tip."}] for _ in responses]
    return ScoringBatch(
        prompts=prompts,
        references=["Rest."] * len(responses),
        responses=list(responses),
        finished=[True, False][: len(responses)],
        lengths=[3, 12][: len(responses)],
        model_scores=lambda: [0.5, -0.5][: len(responses)],
    )


def sources(*configs: dict, max_new_tokens: int = 12):
    return build_sources([RewardSourceConfig(**c) for c in configs], None, max_new_tokens, 8)


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    """A module `my_rewards` in the working directory, as a user would write one."""
    (tmp_path / "my_rewards.py").write_text(
        "def word_count(prompts, responses):\n    return [float(len(r.split())) for r in responses]\n\n"
        "def broken(prompts, responses):\n    raise ValueError('no\\nscores today')\n\n"
        "def too_few(prompts, responses):\n    return [1.0]\n\n"
        "def not_numbers(prompts, responses):\n    return ['high'] * len(responses)\n"
    )
    monkeypatch.chdir(tmp_path)
    yield tmp_path / "my_rewards.py"
    sys.modules.pop("my_rewards", None)  # the next test writes its own


def test_the_score_is_the_weighted_sum_and_each_source_is_kept(reward_module):
    chosen = sources(
        {"kind": "reward_model", "weight": 2.0},
        {"kind": "function", "function": "my_rewards:word_count", "weight": 0.1},
        {"kind": "rubric", "weight": 1.0},
        {"kind": "overlong", "buffer": 4, "weight": 0.5, "name": "too_long"},
    )
    scored = score_sources(chosen, batch(), "cpu")
    rubric = [score_response("Give one tip.", "Rest well.", "Rest.").total,
              score_response("Give one tip.", "Sleep and drink water every single day of the week", "Rest.", truncated=True).total]
    assert scored.by_source == {
        "reward_model": [0.5, -0.5],
        "word_count": [2.0, 10.0],
        "rubric": pytest.approx(rubric),
        "too_long": [0.0, -1.0],  # 12 of 12 tokens with a buffer of 4
    }
    expected = [2 * 0.5 + 0.2 + rubric[0], 2 * -0.5 + 1.0 + rubric[1] - 0.5]
    assert scored.total.tolist() == pytest.approx(expected, abs=1e-6)
    assert function_files([RewardSourceConfig(kind="function", function="my_rewards:word_count")]) == [reward_module.resolve()]


@pytest.mark.parametrize(
    "function, message",
    [
        ("my_rewards:broken", r"^ppo.rewards\[0\] \(function my_rewards:broken\): raised ValueError: no scores today$"),
        ("my_rewards:too_few", r"^ppo.rewards\[0\] \(function my_rewards:too_few\): returned 1 scores for 2 responses$"),
        ("my_rewards:not_numbers", r"score 0 is 'high', expected a finite number$"),
        ("my_rewards:absent", r"^ppo.rewards\[0\] \(function my_rewards:absent\): my_rewards has no function absent$"),
        ("no_such_module:f", r"cannot import no_such_module: ModuleNotFoundError"),
    ],
)
def test_a_failing_function_source_is_named_in_one_line(reward_module, function, message):
    with pytest.raises(UserError, match=message) as error:
        score_sources(sources({"kind": "function", "function": function}), batch(), "cpu")
    assert "\n" not in str(error.value)


class ScoringServer:
    """A scoring server on localhost: `behaviour` decides each answer; requests are recorded."""

    def __init__(self, behaviour):
        self.requests, server = [], self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"body": body, "authorization": self.headers.get("Authorization")})
                status, answer = behaviour(len(server.requests), body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(json.dumps(answer).encode())

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/score"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def lengths_of_responses(count, body):
    return 200, {"rewards": [float(len(r)) for r in body["responses"]]}


def test_an_http_source_posts_the_batch_with_the_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("MY_SCORER_KEY", "s3cret-token")
    with ScoringServer(lengths_of_responses) as server:
        chosen = sources({"kind": "http", "url": server.url, "api_key_env": "MY_SCORER_KEY"})
        scored = score_sources(chosen, batch(), "cpu")
    assert scored.by_source["http"] == [10.0, 50.0]
    assert server.requests[0]["body"]["prompts"] == ["Give one tip.", "Give one tip."]
    assert server.requests[0]["authorization"] == "Bearer s3cret-token"
    assert "s3cret" not in repr(chosen)


def test_an_http_source_retries_a_server_error_and_then_succeeds():
    flaky = lambda count, body: (503, {"error": "busy"}) if count == 1 else lengths_of_responses(count, body)  # noqa: E731
    with ScoringServer(flaky) as server:
        scored = score_sources(sources({"kind": "http", "url": server.url, "max_retries": 1}), batch(), "cpu")
    assert len(server.requests) == 2 and scored.by_source["http"] == [10.0, 50.0]


@pytest.mark.parametrize(
    "behaviour, settings, message",
    [
        (lambda c, b: (time.sleep(1.0), lengths_of_responses(c, b))[1], {"timeout_s": 0.2, "max_retries": 1},
         r"\): no answer within 0.2 s \(after 2 tries\)$"),
        (lambda c, b: (200, {"rewards": [1.0]}), {}, r"\): returned 1 scores for 2 responses$"),
        (lambda c, b: (401, {"error": "bad key"}), {"max_retries": 3}, r"\): the server answered HTTP 401 Unauthorized$"),
        (lambda c, b: (200, {"scores": [1.0, 2.0]}), {}, r'expected \{"rewards": \[...\]\} or a JSON list'),
    ],
)
def test_an_http_source_that_fails_is_named_in_one_line(behaviour, settings, message):
    with ScoringServer(behaviour) as server:
        with pytest.raises(UserError, match=message) as error:
            score_sources(sources({"kind": "http", "url": server.url, **settings}), batch(), "cpu")
    assert str(error.value).startswith(f"ppo.rewards[0] (http {server.url})") and "\n" not in str(error.value)
    if "401" in message:
        assert len(server.requests) == 1  # a client error is not retried


def test_an_http_key_variable_that_is_not_set_is_named():
    with pytest.raises(UserError, match=r"the environment variable NOT_SET_ANYWHERE \(api_key_env\) is not set"):
        sources({"kind": "http", "url": "http://127.0.0.1:9/score", "api_key_env": "NOT_SET_ANYWHERE"})


@pytest.mark.parametrize(
    "override, message",
    [
        ("ppo.rewards=[{kind: http}]", "key 'ppo.rewards.0': http needs 'url'"),
        ("ppo.rewards=[{kind: rubric, url: 'http://x'}]", "key 'ppo.rewards.0': rubric takes no 'url'"),
        ("ppo.rewards=[{kind: function, function: score}]", "function 'score' is not of the form module:function"),
        ("ppo.rewards=[{kind: rubric}, {kind: rubric}]", "two reward sources are named 'rubric'"),
        ("ppo.rewards=[]", "rewards is empty"),
        ("ppo.kl_in=both", "key 'ppo.kl_in': Input should be 'reward' or 'loss'"),
    ],
)
def test_the_config_refuses_sources_that_cannot_work(override, message):
    with pytest.raises(UserError, match=message) as error:
        load_config(SMOKE, [override])
    assert "\n" not in str(error.value)


def test_a_source_that_fails_in_the_stage_stops_it_and_publishes_nothing(run_dir, reward_module, capsys):
    sources_override = "ppo.rewards=[{kind: reward_model}, {kind: function, function: 'my_rewards:too_few'}]"
    assert run_ppo(run_dir, sources_override) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("ppo.rewards[1] (function my_rewards:too_few): returned 1 scores for 4 responses"), err
    assert not (run_dir / "ppo").exists()


def test_the_stage_logs_each_source_and_editing_a_function_reruns_it(run_dir, reward_module):
    override = "ppo.rewards=[{kind: reward_model}, {kind: function, function: 'my_rewards:word_count', weight: 0.01}, {kind: overlong, buffer: 4}]"
    assert run_ppo(run_dir, override) == 0
    record = curve(run_dir)[-1]
    assert {"reward/reward_model", "reward/word_count", "reward/overlong"} <= set(record)
    combined = record["reward/reward_model"] + 0.01 * record["reward/word_count"] + record["reward/overlong"]
    assert record["objective/scores"] == pytest.approx(combined, abs=1e-4)
    manifest = json.loads((run_dir / "ppo" / "manifest.json").read_text())
    assert [s["name"] for s in manifest["metrics"]["reward_sources"]] == ["reward_model", "word_count", "overlong"]
    first = manifest["fingerprint"]
    reward_module.write_text(reward_module.read_text() + "\n# tuned\n")
    assert run_ppo(run_dir, override) == 0
    assert json.loads((run_dir / "ppo" / "manifest.json").read_text())["fingerprint"] != first


def test_with_the_kl_in_the_loss_the_policy_learns_and_a_larger_beta_holds_it_closer(run_dir, monkeypatch, tmp_path):
    base_rate = target_token_reward(monkeypatch, run_dir)
    held = Path(shutil.copytree(run_dir, tmp_path / "held"))
    settings = ["ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=4", "ppo.kl_in=loss"]
    assert run_ppo(run_dir, *LEARN, *settings, "ppo.kl_coef=0.01") == 0
    assert run_ppo(held, *LEARN, *settings, "ppo.kl_coef=1.0") == 0
    kl_free, kl_held = (sum(r["objective/kl"] for r in curve(d)[-4:]) / 4 for d in (run_dir, held))
    assert kl_held < 0.5 * kl_free, (kl_held, kl_free)
    records = curve(run_dir)
    scores = [r["objective/scores"] / 5 for r in records]
    assert sum(scores[-3:]) / 3 > max(0.9, base_rate + 0.2), (base_rate, scores)
    assert all(r["loss/kl"] >= 0 for r in records) and records[-1]["loss/kl"] > 0
    manifest = json.loads((run_dir / "ppo" / "manifest.json").read_text())["metrics"]
    assert manifest["kl_in"] == "loss"
