"""The pipeline's typed config: one section per stage plus `model`, `lora`, `wandb`.

A config is a YAML file plus `key.sub=value` overrides from the command line. Unknown keys and
wrong types are errors that name the file and the key (with a close-match suggestion).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlhf.errors import UserError

EMBEDDED_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-random-llama"


BOOKKEEPING = {"bookkeeping": True}
"""Marks a key that changes how a stage logs or checkpoints, not what it computes: left out of the
fingerprint of a stage that reads its whole section (rlhf.fingerprint.stage_parts), so that editing it after a
crash resumes the stage instead of retraining it."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    name_or_path: str = EMBEDDED_MODEL
    """A hub id, a local directory, or a reserved name: smollm2-135m-instruct (embedded), tiny-random-llama."""
    quantization: Literal["none", "8bit", "4bit"] = "none"
    """bitsandbytes quantization of the frozen backbone; 4bit = NF4 + double quant (QLoRA)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """auto: bfloat16 on GPUs that support it, float32 otherwise."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    trust_remote_code: bool = False


class LoraConfig(Section):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class WandbConfig(Section):
    project: str = "rlhf-pipeline"
    entity: str | None = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto: online when logged in (WANDB_API_KEY or ~/.netrc), offline otherwise. Never prompts."""


class LaunchConfig(Section):
    """How `rlhf run` starts the training stages (sft, reward, ppo). With num_processes > 1 or an
    accelerate config file, each runs as a child `accelerate launch ... -m rlhf.cli run CONFIG --only
    STAGE`; the data stages run once, in the `rlhf run` process itself."""

    num_processes: int = Field(1, ge=1)
    """Data-parallel processes, one per GPU (passed as `accelerate launch --num_processes`, overriding the
    file's own). Each process takes its own batches: the effective batch grows with it, so changing it
    reruns the training stages."""
    accelerate_config: str | None = None
    """An `accelerate launch --config_file` YAML (configs/accelerate/: ddp, deepspeed_zero2, deepspeed_zero3).
    Precision stays model.dtype's; ppo takes only the process count from it (it averages gradients itself)."""


class TeacherConfig(Section):
    kind: Literal["local", "openai"] = "local"
    model: str | None = None
    """local: a hub id / directory / reserved name (default: model.name_or_path). openai: the served model's name."""
    base_url: str | None = None
    """openai: e.g. http://127.0.0.1:8000/v1 (vLLM, Ollama, llama.cpp server, OpenAI)."""
    api_key_env: str | None = None
    """openai: the NAME of the environment variable holding the API key; the key itself never goes in a config."""
    temperature: float = Field(0.8, ge=0)
    top_p: float = Field(0.95, gt=0, le=1)
    max_new_tokens: int = Field(192, gt=0)
    batch_size: int = Field(16, gt=0)
    timeout_s: float = Field(60, gt=0)
    max_retries: int = Field(3, ge=0)


class GenerationConfig(Section):
    """Which engine samples, in every stage that samples with a local model: instructions' local teacher,
    preferences, ppo and evaluate (the judges' short greedy verdicts stay on transformers)."""

    engine: Literal["hf", "vllm"] = "hf"
    """hf: transformers' generate in the training process (the default, the tested path). vllm: one vLLM
    engine in the training process (`pip install -e ".[vllm]"`), the policy served as a LoRA adapter on
    the merged SFT backbone and synced after every PPO update (rlhf.vllm_engine)."""
    gpu_memory_utilization: float = Field(0.3, gt=0, lt=1, json_schema_extra=BOOKKEEPING)
    """vllm on a GPU: the share of GPU memory the engine takes (weights + KV cache); the trainer keeps the
    rest. Ignored on CPU, where the KV cache is `cpu_kv_cache_gib`."""
    cpu_kv_cache_gib: float = Field(1.0, gt=0, json_schema_extra=BOOKKEEPING)
    """vllm on CPU: the KV cache's size (vLLM's VLLM_CPU_KVCACHE_SPACE; an environment value wins)."""
    max_lora_rank: int | None = Field(None, gt=0, json_schema_extra=BOOKKEEPING)
    """vllm: the engine's largest LoRA rank; None: the smallest vLLM size that holds lora.r."""
    enforce_eager: bool = Field(False, json_schema_extra=BOOKKEEPING)
    """vllm on a GPU: no CUDA graphs (starts faster, decodes slower)."""
    sleep_between_rollouts: bool = Field(True, json_schema_extra=BOOKKEEPING)
    """vllm on a GPU: the engine sleeps (weights to CPU, KV cache freed) while ppo updates, and wakes for the
    next rollout. CPU runs never sleep (vLLM's sleep mode is CUDA only)."""
    vllm_importance_correction: float | None = Field(None, gt=0)
    """vllm in ppo: truncated importance sampling (TRL's vllm_importance_sampling_cap): each token's policy
    loss is weighted by min(exp(trainer log-prob − vLLM's), cap), correcting for sampling from vLLM's
    numerics rather than the trainer's. None: no correction (the gap is logged either way)."""


class InstructionsConfig(Section):
    seeds: str | None = None
    """Seed file (.txt, .json, .jsonl); None = the seed set shipped with the package."""
    expand: bool = True
    """False: seeds pass straight through (outputs are generated only where a seed has none)."""
    num_instructions: int = Field(200, gt=0)
    """Target dataset size, seeds included."""
    num_eval: int = Field(16, ge=1)
    """Held-out instructions: the eval split, never trained on."""
    examples_per_prompt: int = Field(4, ge=1)
    max_rounds: int = Field(10, ge=1)
    min_words: int = Field(3, ge=1)
    max_words: int = Field(150, ge=1)
    max_rouge: float = Field(0.7, gt=0, le=1)
    teacher: TeacherConfig = TeacherConfig()


class TrainingSection(Section):
    """Settings every training stage shares."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int = -1
    """> 0 overrides epochs."""
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    max_length: int = Field(512, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    lr_scheduler: str = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    logging_steps: int = Field(5, gt=0, json_schema_extra=BOOKKEEPING)
    save_steps: int = Field(50, gt=0, json_schema_extra=BOOKKEEPING)
    gradient_checkpointing: bool = False
    group_by_length: bool = True
    """Batch examples of similar length together (transformers' LengthGroupedSampler: sorted within random
    groups of 4 batches or fewer), so a batch pads little; false: uniformly shuffled batches."""


class SFTConfig(TrainingSection):
    pass


class PreferencesConfig(Section):
    source: Literal["import", "generate"] = "generate"
    path: str | None = None
    """import: a .json/.jsonl/.parquet file, a dataset directory, or a hub dataset id."""
    num_eval: int = Field(32, ge=1)
    """Held-out pairs for the reward model's accuracy."""
    # generate: sample K responses per instruction from the SFT model, judge them, keep (best, worst).
    num_prompts: int = Field(128, gt=0)
    """Instructions from the instruction dataset's train split (all of them when fewer)."""
    samples_per_prompt: int = Field(4, ge=2)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    max_new_tokens: int = Field(128, gt=0)
    batch_size: int = Field(16, gt=0)
    judge: Literal["rubric", "reward_model", "llm"] = "rubric"
    judge_model: str | None = None
    """reward_model judge: a sequence-classification reward model (local directory or hub id)."""
    judge_teacher: TeacherConfig = TeacherConfig(temperature=0.0, max_new_tokens=8)
    """llm judge: a local model or an OpenAI-compatible endpoint asked for pairwise verdicts."""
    min_margin: float = Field(0.1, ge=0)
    """Keep a pair only when best − worst judge score reaches this (rubric scores are in [0, 1])."""


class RewardConfig(TrainingSection):
    model: str | None = None
    """An existing reward model (local directory or hub id): used as is, no training."""
    learning_rate: float = Field(1e-4, gt=0)
    center_rewards_coefficient: float | None = Field(0.01, ge=0)
    """Keeps rewards near zero (Eisenstein et al. 2023), which steadies PPO's reward scale."""


_SOURCE_KEYS = {
    "reward_model": set(),
    "external_model": {"path"},
    "rubric": set(),
    "function": {"function"},
    "http": {"url", "api_key_env", "timeout_s", "max_retries"},
    "overlong": {"buffer"},
}
_SOURCE_REQUIRED = {"external_model": {"path"}, "function": {"function"}, "http": {"url"}, "overlong": {"buffer"}}


class RewardSourceConfig(Section):
    """One term of PPO's reward (rlhf.reward.sources): the step's score is the weighted sum of every
    source's, and each is logged as `reward/<name>`."""

    kind: Literal["reward_model", "external_model", "rubric", "function", "http", "overlong"]
    """reward_model: the reward stage's model. external_model: a sequence-classification reward model
    (`path`). rubric: the deterministic rubric with the train split's reference answer. function: a Python
    function (`function: module:function`). http: a scoring server (`url`). overlong: DAPO's soft overlong
    penalty, 0 up to ppo.max_new_tokens − `buffer` tokens, then falling linearly to −1 at the limit."""
    weight: float = 1.0
    name: str | None = None
    """Its metric name, `reward/<name>`; default: the kind (a function's: its function name)."""
    path: str | None = None
    """external_model: a hub id or a directory."""
    function: str | None = None
    """function: `module:function`, importable from the working directory; called with the batch's prompts
    (the user's instructions) and responses, two lists of str, it returns one float per response."""
    url: str | None = None
    """http: POST {"prompts": [...], "responses": [...]} as JSON; the answer is {"rewards": [...]} or a list."""
    api_key_env: str | None = None
    """http: the NAME of the environment variable holding a bearer token; the token never goes in a config."""
    timeout_s: float = Field(30.0, gt=0)
    max_retries: int = Field(2, ge=0)
    """http: retries after a timeout, a refused connection or a 5xx/429 answer (other 4xx fail at once)."""
    buffer: int | None = Field(None, gt=0)
    """overlong: tokens before ppo.max_new_tokens where the penalty starts."""

    @model_validator(mode="after")
    def _keys_fit_kind(self):
        # Keys set away from their defaults (a saved config lists every key, at its default when unused).
        given = {k for k in self.model_fields_set - {"kind", "weight", "name"} if getattr(self, k) != type(self).model_fields[k].default}
        if extra := sorted(given - _SOURCE_KEYS[self.kind]):
            raise ValueError(f"{self.kind} takes no '{extra[0]}'")
        if missing := sorted(_SOURCE_REQUIRED.get(self.kind, set()) - given):
            raise ValueError(f"{self.kind} needs '{missing[0]}'")
        if self.kind == "function" and not re.fullmatch(r"[\w.]+:\w+", self.function):
            raise ValueError(f"function '{self.function}' is not of the form module:function")
        return self

    @property
    def metric(self) -> str:
        if self.name:
            return self.name
        return self.function.rpartition(":")[2] if self.kind == "function" else self.kind


class PPOConfig(Section):
    num_prompts: int = Field(256, gt=0)
    """Instructions from the instruction dataset's train split (the eval split stays held out)."""
    steps: int = Field(20, gt=0)
    """PPO iterations: each samples `rollout_batch_size` responses, then updates on them."""
    rollout_batch_size: int = Field(16, gt=0)
    mini_batch_size: int = Field(8, gt=0)
    micro_batch_size: int = Field(4, gt=0)
    """Gradient accumulation splits each minibatch into micro-batches of this size."""
    ppo_epochs: int = Field(2, gt=0)
    learning_rate: float = Field(5e-5, gt=0)
    max_grad_norm: float = Field(1.0, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    """AdamW's decoupled decay. 0: decay pulls the policy adapter toward zero, i.e. toward the reference, a
    second KL-like pull that no metric shows, and shrinks the value head (torch's default is 0.01)."""
    adam_epsilon: float = Field(1e-5, gt=0)
    """1e-5 as in OpenAI's lm-human-preferences and the PPO implementation studies (torch's default is 1e-8):
    it bounds the step of parameters whose gradients are tiny, as LoRA B matrices at step 0 are."""
    # Sampling.
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    missing_eos_penalty: float | None = Field(None, ge=0)
    """Subtracted from the score of a response that hit max_new_tokens without ending. None: the reward
    model's own score, which has seen unfinished answers when the preferences were generated; set it for
    a reward model that never saw one (imported pairs, an external model)."""
    # Rewards and the KL penalty.
    rewards: list[RewardSourceConfig] = [RewardSourceConfig(kind="reward_model")]
    """The reward: a weighted sum of these sources (default: the reward stage's model alone)."""
    kl_coef: float = Field(0.05, ge=0)
    target_kl: float | None = Field(None, gt=0)
    """Adaptive KL (Ziegler et al. 2019): steer kl_coef so the per-sequence KL approaches this."""
    kl_horizon: int = Field(10000, gt=0)
    kl_in: Literal["reward", "loss"] = "reward"
    """reward: −β·(log π − log π_ref) on every token's reward (InstructGPT). loss: rewards without it and
    β times the k3 estimate of the KL, averaged over tokens, added to the policy loss (GRPO)."""
    kl_budget: float = Field(8.0, gt=0, json_schema_extra=BOOKKEEPING)
    """The per-sequence KL the run is expected to stay under (checked in tests and evaluation)."""
    score_clip: float | None = Field(None, gt=0)
    whiten_rewards: bool = False
    # Advantages and losses.
    advantage_estimator: Literal["gae", "rloo", "grpo", "reinforce_baseline"] = "gae"
    """gae: PPO with a learned critic (a value adapter and head on the backbone). rloo, grpo and
    reinforce_baseline are critic-free (rlhf.ppo_math.group_advantages): each prompt's
    `samples_per_prompt` responses are each other's baseline, and no value adapter, head or forward exists."""
    samples_per_prompt: int = Field(1, gt=0)
    """Responses per prompt in a rollout: rollout_batch_size / samples_per_prompt prompts, each sampled this
    many times."""
    grpo_scale_by_std: bool = True
    """grpo divides by the group's std (GRPO); false leaves it out (Dr. GRPO)."""
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_range: float = Field(0.2, gt=0)
    clip_range_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    # Bookkeeping.
    sample_every: int = Field(5, gt=0, json_schema_extra=BOOKKEEPING)
    """Log a table of prompts, responses and scores every N steps."""
    save_every: int = Field(10, gt=0, json_schema_extra=BOOKKEEPING)
    """Checkpoint every N steps, so a killed run resumes where it stopped."""
    # Memory.
    gradient_checkpointing: bool = False
    """Recompute the backbone's activations in the backward pass of the update instead of keeping them."""

    @model_validator(mode="after")
    def _groups_fit(self):
        k = self.samples_per_prompt
        if self.advantage_estimator != "gae" and k < 2:
            raise ValueError(
                f"advantage_estimator {self.advantage_estimator} needs samples_per_prompt >= 2 (its baseline is the other "
                f"responses to the same prompt), got {k}"
            )
        if not self.rewards:
            raise ValueError("rewards is empty: name at least one source (default: [{kind: reward_model}])")
        names = [source.metric for source in self.rewards]
        if duplicate := next((n for n in names if names.count(n) > 1), None):
            raise ValueError(f"two reward sources are named '{duplicate}': give one a `name`")
        if self.rollout_batch_size % k:
            raise ValueError(f"rollout_batch_size {self.rollout_batch_size} is not a multiple of samples_per_prompt {k}")
        return self


class EvaluateConfig(Section):
    num_prompts: int = Field(64, gt=0)
    """Held-out prompts from the instruction dataset's eval split (all of them when fewer): never trained on."""
    max_new_tokens: int = Field(64, gt=0)
    """Set it to ppo.max_new_tokens to judge the policy at the length it was trained to answer in."""
    temperature: float = Field(1.0, ge=0)
    """0: greedy. The KL is measured at this temperature: keep it at ppo.temperature to compare with ppo.kl_budget."""
    top_p: float = Field(1.0, gt=0, le=1)
    samples_per_prompt: int = Field(4, gt=0)
    """Responses per prompt and model. Means are over every response; the win rate compares each prompt's
    mean gold score: with one sample at temperature > 0 it swings with the draw."""
    batch_size: int = Field(16, gt=0)
    """Responses generated at once."""
    micro_batch_size: int = Field(16, gt=0)
    """Responses per forward when measuring them (KL to SFT, proxy reward): the stage's peak memory holds
    one micro-batch's [responses, tokens, vocabulary] logits, whatever batch_size is."""
    judge: Literal["rubric", "llm"] = "rubric"
    """The gold judge: the rubric (with the eval split's reference answer), or a teacher's pairwise verdicts."""
    judge_teacher: TeacherConfig = TeacherConfig(temperature=0.0, max_new_tokens=8)
    """llm judge: a local model or an OpenAI-compatible endpoint (same keys as instructions.teacher)."""
    num_samples: int = Field(12, ge=0)
    """Side-by-side samples shown in report.md (every prompt's are in samples.jsonl)."""


class BenchmarkTaskConfig(Section):
    """One lm-evaluation-harness task of the benchmark stage."""

    name: str = Field(min_length=1)
    """Any lm-eval task (hellaswag, gsm8k, mmlu_anatomy, arc_easy, ...), one of the project's own local tasks
    (rlhf_word_relations, rlhf_arithmetic), or one from benchmark.include_path."""
    data_files: str | None = None
    """A local .jsonl, .json or .parquet copy of the task's data, in the task's original fields (GSM8K's
    question / answer, ...): the task's own prompt and metric run on it instead of its hub dataset."""
    limit: int | None = Field(None, gt=0)
    """The first N items (None: all)."""
    num_fewshot: int | None = Field(None, ge=0)
    """Few-shot examples per item (None: the task's own default)."""


class BenchmarkConfig(Section):
    """The benchmark stage: lm-evaluation-harness tasks on the base, SFT and PPO models (rlhf.stages.benchmark)."""

    tasks: list[BenchmarkTaskConfig] = []
    """Empty: the stage publishes an empty report and loads no model."""
    include_path: str | None = None
    """A folder of lm-eval task YAMLs (and their Python helpers) whose tasks `tasks` may name."""
    batch_size: int = Field(16, gt=0)
    """Requests per forward in lm-eval (loglikelihoods and generations)."""

    @model_validator(mode="after")
    def _names_differ(self):
        names = [task.name for task in self.tasks]
        if duplicate := next((n for n in names if names.count(n) > 1), None):
            raise ValueError(f"task '{duplicate}' is listed twice")
        return self


class ExportConfig(Section):
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights of the exported model. The merge is done in float32 either way; bfloat16 halves the size but
    rounds away weight updates smaller than its precision, and PPO's are small."""
    name: str | None = None
    """The model's name in its model card; default: the base model's name + "-rlhf-ppo"."""


class PipelineConfig(Section):
    output_dir: str = "runs/default"
    run_name: str | None = None
    """wandb group; default: the config file's name."""
    seed: int = 42
    model: ModelConfig = ModelConfig()
    lora: LoraConfig = LoraConfig()
    wandb: WandbConfig = WandbConfig()
    launch: LaunchConfig = LaunchConfig()
    generation: GenerationConfig = GenerationConfig()
    instructions: InstructionsConfig = InstructionsConfig()
    sft: SFTConfig = SFTConfig()
    preferences: PreferencesConfig = PreferencesConfig()
    reward: RewardConfig = RewardConfig()
    ppo: PPOConfig = PPOConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    export: ExportConfig = ExportConfig()


_SECTIONS = {
    name
    for name, field in PipelineConfig.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
}


def load_config(path: str | Path, overrides: list[str] = ()) -> PipelineConfig:
    """Read a YAML config, apply `key.sub=value` overrides, validate, and fill defaults."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}:{line}: expected UTF-8 text, found byte 0x{data[e.start]:02x}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path}{_yaml_line(e)}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if raw is None:
        raise UserError(f"{path}: expected a mapping of config sections, found an empty file (write {{}} for all defaults)")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of config sections at the top level")
    for key, value in list(raw.items()):
        if value is None and key in _SECTIONS:
            raw[key] = {}  # a section whose keys are all commented out
    for override in overrides:
        _apply_override(raw, override)
    raw.setdefault("run_name", path.stem)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as e:
        error = e.errors()[0]
        # A bad value given on the command line is the override's fault, not the file's.
        key = ".".join(str(p) for p in error["loc"])
        given = [o for o in overrides if key == o.partition("=")[0] or key.startswith(o.partition("=")[0] + ".")]
        raise UserError(f"{f'override {given[-1]!r}' if given else path}: {_describe(error)}") from None


def _yaml_line(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    return f":{mark.line + 1}" if mark else ""


def _apply_override(raw: dict, override: str) -> None:
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise UserError(f"override '{override}': expected key.sub=value")
    _check_key_path(key)
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise UserError(f"override '{override}': '{part}' is not a section")
    try:
        node[leaf] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"override '{override}': expected a YAML value after '=' ({problem})") from None


def _check_key_path(key: str) -> None:
    """Fail on an override naming a key that does not exist, with a close-match suggestion."""
    model: type[BaseModel] = PipelineConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            raise UserError(f"override: {_unknown_key(key, parts[:i], part, fields)}")
        annotation = fields[part].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif i < len(parts) - 1:
            raise UserError(f"override: '{'.'.join(parts[: i + 1])}' is a value, not a section")


MOVED = {
    "evaluate.lm_eval_tasks": "benchmark.tasks (a list of {name, data_files?, limit?, num_fewshot?})",
    "evaluate.lm_eval_limit": "benchmark.tasks[].limit (one per task)",
}
"""Keys that left a section: the unknown-key error says where they went."""


def _unknown_key(key: str, parent: list[str], name: str, choices) -> str:
    if key in MOVED:
        return f"unknown key '{key}': lm-eval runs in the benchmark stage now, set {MOVED[key]}"
    return f"unknown key '{key}'{_suggest(parent, name, choices)}"


def _suggest(parent: list[str], name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{'.'.join([*parent, close[0]])}'?)" if close else ""


def _describe(error: dict[str, Any]) -> str:
    loc = [str(p) for p in error["loc"]]
    key = ".".join(loc)
    if error["type"] == "extra_forbidden":
        return _unknown_key(key, loc[:-1], loc[-1], _fields_at(loc[:-1]))
    given = error.get("input")
    if isinstance(given, dict):  # a section's own check: its message names the keys
        return f"key '{key}': {error['msg'].removeprefix('Value error, ')}"
    return f"key '{key}': {error['msg']} (got {given!r})"


def _fields_at(loc: list[str]) -> list[str]:
    model: type[BaseModel] = PipelineConfig
    for part in loc:
        if part.isdigit():  # an item of a list of sections (ppo.rewards.0)
            continue
        annotation = model.model_fields[part].annotation
        if getattr(annotation, "__origin__", None) is list:
            annotation = annotation.__args__[0]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def get_key(config: PipelineConfig, key: str) -> Any:
    """`get_key(cfg, "sft.learning_rate")` → the value, as plain data (sections become dicts)."""
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def fingerprint_value(config: PipelineConfig, key: str) -> Any:
    """`get_key`, less the bookkeeping keys of the sections it returns (a key named itself is kept)."""
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return _without_bookkeeping(value) if isinstance(value, BaseModel) else get_key(config, key)


def _without_bookkeeping(section: BaseModel) -> dict:
    dumped = section.model_dump(mode="json")
    kept = {}
    for name, field in type(section).model_fields.items():
        if not (field.json_schema_extra or {}).get("bookkeeping"):
            value = getattr(section, name)
            kept[name] = _without_bookkeeping(value) if isinstance(value, BaseModel) else dumped[name]
    return kept


def to_yaml(config: PipelineConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
