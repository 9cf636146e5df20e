"""PPO's reward as a weighted sum of sources (`ppo.rewards`), each scored and logged on its own.

A source turns a scored batch (the prompts, the responses as text and tokens) into one float per response:
- `reward_model`: the reward stage's model (its adapter on the shared backbone, or the external model its
  `external.json` names), read as every reward model is (rlhf.reward.readout);
- `external_model`: another sequence-classification reward model, with its own tokenizer and template;
- `rubric`: the deterministic rubric (rlhf.reward.rubric) with the train split's reference answer;
- `function`: a Python function named `module:function`, called with the prompts and responses (two lists
  of str) and returning one float per response;
- `http`: a scoring server that takes {"prompts": [...], "responses": [...]} and answers {"rewards": [...]}
  (OpenRLHF's remote reward model speaks the same shape), with a bearer token from an environment variable;
- `overlong`: DAPO's soft overlong penalty on the response length (rlhf.ppo_math.overlong_penalty).

Whatever goes wrong in a source (it raises, times out, answers the wrong count or a non-number) stops the
stage with one line naming the source; nothing is published.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.config import RewardSourceConfig
from rlhf.errors import UserError
from rlhf.ppo_math import overlong_penalty
from rlhf.reward.rubric import score_response

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class ScoringBatch:
    """B responses to score. `prompts`: each conversation up to the assistant's turn; `references`: the
    split's answer to each (None when there is none); `responses`: decoded text without EOS; `finished`:
    ended with EOS; `lengths`: response tokens; `model_scores`: a callable giving the reward stage's model's
    [B] scores, computed only when a source asks for them."""

    prompts: list[Conversation]
    references: list[str | None]
    responses: list[str]
    finished: list[bool]
    lengths: list[int]
    model_scores: Callable[[], list[float]]

    @property
    def instructions(self) -> list[str]:
        return [prompt[-1]["content"] for prompt in self.prompts]


@dataclass(frozen=True)
class Source:
    """One configured source: where it is in the config, its metric name, weight, and scoring function."""

    where: str
    """ppo.rewards[i] (kind, and what it points at): how errors name it."""
    metric: str
    weight: float
    score: Callable[[ScoringBatch], list[float]]


@dataclass(frozen=True)
class SourceScores:
    total: torch.Tensor
    """[B] Σ weight · score."""
    by_source: dict[str, list[float]]


def build_sources(configs: list[RewardSourceConfig], model_config, max_new_tokens: int, batch_size: int) -> list[Source]:
    """Each configured source, ready to score: functions imported, reward models loaded, secrets read."""
    return [_build(i, c, model_config, max_new_tokens, batch_size) for i, c in enumerate(configs)]


def score_sources(sources: list[Source], batch: ScoringBatch, device) -> SourceScores:
    """Every source's scores, checked, and their weighted sum."""
    by_source = {source.metric: _checked(source, batch) for source in sources}
    total = sum(source.weight * torch.tensor(by_source[source.metric], dtype=torch.float32) for source in sources)
    return SourceScores(total.to(device), by_source)


def _checked(source: Source, batch: ScoringBatch) -> list[float]:
    count = len(batch.responses)
    try:
        values = source.score(batch)
    except UserError:
        raise
    except Exception as error:  # a user's function or server: any failure is theirs to see in one line
        detail = " ".join(str(error).split()) or "no message"
        raise UserError(f"{source.where}: raised {type(error).__name__}: {detail}") from None
    if not isinstance(values, (list, tuple)) and not (hasattr(values, "tolist") and hasattr(values, "__len__")):
        raise UserError(f"{source.where}: expected a list of {count} floats, got {type(values).__name__}")
    values = values.tolist() if hasattr(values, "tolist") else list(values)
    if len(values) != count:
        raise UserError(f"{source.where}: returned {len(values)} scores for {count} responses")
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise UserError(f"{source.where}: score {index} is {value!r}, expected a finite number")
    return [float(v) for v in values]


def _build(index: int, config: RewardSourceConfig, model_config, max_new_tokens: int, batch_size: int) -> Source:
    kind = config.kind
    target = {"external_model": config.path, "function": config.function, "http": config.url}.get(kind)
    where = f"ppo.rewards[{index}] ({kind}{' ' + target if target else ''})"
    if kind == "reward_model":
        score = lambda batch: batch.model_scores()  # noqa: E731
    elif kind == "external_model":
        from rlhf.reward.readout import RewardModel

        model = RewardModel.load(config.path, model_config, f"ppo.rewards[{index}].path", batch_size)
        score = lambda batch: model.scores(batch.prompts, batch.responses, batch.finished)  # noqa: E731
    elif kind == "rubric":
        score = _rubric
    elif kind == "function":
        function = import_function(config.function, where)
        score = lambda batch: function(batch.instructions, batch.responses)  # noqa: E731
    elif kind == "http":
        score = HttpScorer(config, where, _secret(config.api_key_env, where)).scores
    else:  # overlong
        score = lambda batch: overlong_penalty(torch.tensor(batch.lengths), max_new_tokens, config.buffer).tolist()  # noqa: E731
    return Source(where, config.metric, config.weight, score)


def _rubric(batch: ScoringBatch) -> list[float]:
    return [
        score_response(instruction, response, reference, truncated=not finished).total
        for instruction, response, reference, finished in zip(batch.instructions, batch.responses, batch.references, batch.finished)
    ]


# --- function sources ---------------------------------------------------------------------------------


def import_function(spec: str, where: str) -> Callable:
    """`module:function`, imported with the working directory on the path (as `python -m` has it)."""
    module_name, _, name = spec.partition(":")
    with _working_directory_on_path():
        try:
            module = importlib.import_module(module_name)
        except Exception as error:
            raise UserError(f"{where}: cannot import {module_name}: {type(error).__name__}: {error}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(f"{where}: {module_name} has no function {name}")
    return function


def function_files(configs: list[RewardSourceConfig]) -> list[Path]:
    """The source files of the function sources' modules, for the ppo stage's fingerprint (an edit to a
    reward function reruns ppo); a module that cannot be found is left to fail at the stage's start."""
    files = []
    for config in configs:
        if config.kind == "function":
            with _working_directory_on_path():
                try:
                    spec = importlib.util.find_spec(config.function.partition(":")[0])
                except (ImportError, ValueError):
                    spec = None
            if spec is not None and spec.origin and Path(spec.origin).is_file():
                files.append(Path(spec.origin))
    return files


class _working_directory_on_path:
    def __enter__(self):
        self.added = os.getcwd() not in sys.path
        if self.added:
            sys.path.insert(0, os.getcwd())

    def __exit__(self, *exc):
        if self.added and os.getcwd() in sys.path:
            sys.path.remove(os.getcwd())


# --- http sources -------------------------------------------------------------------------------------


def _secret(variable: str | None, where: str) -> str | None:
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise UserError(f"{where}: the environment variable {variable} (api_key_env) is not set")
    return value


@dataclass(frozen=True)
class HttpScorer:
    config: RewardSourceConfig
    where: str
    token: str | None

    def __repr__(self) -> str:  # never show the token
        return f"HttpScorer({self.config.url})"

    def scores(self, batch: ScoringBatch) -> list[float]:
        body = json.dumps({"prompts": batch.instructions, "responses": batch.responses}).encode()
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.token}"} if self.token else {})}
        tries, last = self.config.max_retries + 1, ""
        for attempt in range(tries):
            if attempt:
                time.sleep(min(0.5 * 2 ** (attempt - 1), 8.0))
            request = urllib.request.Request(self.config.url, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                    return self._rewards(response.read())
            except urllib.error.HTTPError as error:
                last = f"HTTP {error.code} {error.reason}"
                if error.code != 429 and error.code < 500:
                    raise UserError(f"{self.where}: the server answered {last}") from None
            except TimeoutError:
                last = f"no answer within {self.config.timeout_s:g} s"
            except urllib.error.URLError as error:
                reason = error.reason
                last = f"no answer within {self.config.timeout_s:g} s" if isinstance(reason, TimeoutError) else f"{reason}"
        raise UserError(f"{self.where}: {last} (after {tries} tries)")

    def _rewards(self, raw: bytes) -> list:
        try:
            answer = json.loads(raw)
        except ValueError:
            raise UserError(f"{self.where}: the answer is not JSON: {raw[:80]!r}") from None
        rewards = answer.get("rewards") if isinstance(answer, dict) else answer
        if not isinstance(rewards, list):
            raise UserError(f'{self.where}: expected {{"rewards": [...]}} or a JSON list, got {raw[:80]!r}')
        return rewards
