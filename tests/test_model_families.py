"""Conformance: the smoke pipeline, every stage, on tiny random models carrying the real quirks of
Qwen2.5-Instruct, Llama-3.2-Instruct, Gemma-2-it, Mistral-7B-Instruct-v0.3 and Phi-3-mini (tests/families.py):
every stage publishes, step-1 KL ≈ 0 in float32, the reward readout agrees everywhere, `rlhf chat` and the
exported model work and stop at the family's EOS ids."""

import io
import json
from pathlib import Path

import pytest
import torch
from families import FAMILIES, build_family_model
from test_reward_readout import rollout_of
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from rlhf.chat_format import ChatFormat
from rlhf.cli import main
from rlhf.config import load_config
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.reward.judges import Candidate, RewardModelJudge
from rlhf.roles import Roles, build_actor_critic

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")
STAGES = ("instructions", "sft", "preferences", "reward", "ppo", "evaluate", "export")
# What each family's files say, as this pipeline must read them (names, not ids: the vocabularies are tiny).
EXPECTED = {
    "qwen2.5": {"end_of_turn": ["<|im_end|>", "Ċ"], "eos": {"<|im_end|>", "<|endoftext|>"}, "pad": "<|endoftext|>"},
    "llama3": {"end_of_turn": ["<|eot_id|>"], "eos": {"<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"},
               "pad": "<|finetune_right_pad_id|>"},  # its pad would be its EOS, which ends a turn
    "gemma2": {"end_of_turn": ["<end_of_turn>", "\n"], "eos": {"<eos>", "<end_of_turn>"}, "pad": "<pad>"},
    "mistral": {"end_of_turn": ["</s>"], "eos": {"</s>"}, "pad": "[control_8]"},  # no pad; </s> ends a turn
    "phi3": {"end_of_turn": ["<|end|>", "<|endoftext|>"], "eos": {"<|endoftext|>", "<|assistant|>", "<|end|>"},
             "pad": "<|placeholder1|>"},  # its pad is the <|endoftext|> its template writes last
}


@pytest.fixture(scope="module", params=FAMILIES)
def family_run(request, tmp_path_factory) -> tuple[str, Path, Path]:
    family = request.param
    root = tmp_path_factory.mktemp(family.replace(".", ""))
    model_dir = build_family_model(family, root / "model")
    run_dir = root / "run"
    assert main(["run", SMOKE, f"output_dir={run_dir}", f"model.name_or_path={model_dir}"]) == 0
    return family, model_dir, run_dir


def test_the_family_is_read_as_its_files_say(family_run):
    family, model_dir, _ = family_run
    tokenizer = load_tokenizer(str(model_dir))
    chat = ChatFormat.of(tokenizer, AutoModelForCausalLM.from_pretrained(model_dir))
    expected = EXPECTED[family]
    assert tokenizer.convert_ids_to_tokens(list(chat.end_of_turn)) == expected["end_of_turn"]
    assert set(tokenizer.convert_ids_to_tokens(list(chat.eos_ids))) == expected["eos"]
    assert tokenizer.pad_token == expected["pad"]


def test_every_stage_publishes(family_run):
    _, _, run_dir = family_run
    for stage in STAGES:
        assert json.loads((run_dir / stage / "manifest.json").read_text())["stage"] == stage


def test_step_one_kl_is_zero_in_float32(family_run):
    """Step 1 samples from the reference itself: the rollout's log-probs (KV cache, the model's own
    logits) and the reference's (one forward) agree to float rounding."""
    _, _, run_dir = family_run
    first = json.loads((run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["objective/kl"]) < 1e-4, first["objective/kl"]
    assert first["policy/first_ratio_max_gap"] < 1e-3


def test_the_reward_readout_agrees_everywhere(family_run):
    _, _, run_dir = family_run
    config = load_config(SMOKE, [f"output_dir={run_dir}"])
    prompts = [[{"role": "user", "content": "give two tips"}], [{"role": "user", "content": "write a short answer"}]] * 2
    responses = ["one good tip is to rest", "yes thank you", "one good tip is to rest", "yes thank you"]
    finished = [True, True, False, False]
    tokenizer = load_tokenizer(str(run_dir / "sft" / "merged"))
    classifier = AutoModelForSequenceClassification.from_pretrained(run_dir / "reward" / "model").eval()
    chat = ChatFormat.of(tokenizer)
    with torch.no_grad():
        standalone = torch.tensor([
            classifier(input_ids=torch.tensor([chat.reward_ids(p, r, f)])).logits[0, 0].item()
            for p, r, f in zip(prompts, responses, finished)
        ])
    judged = RewardModelJudge.load(str(run_dir / "reward" / "model"), config.model).scores(
        [Candidate(p, r, f) for p, r, f in zip(prompts, responses, finished)]
    )
    backbone = load_causal_lm(str(run_dir / "sft" / "merged"), config.model)
    model, value_head, reward_head = build_actor_critic(backbone, run_dir / "reward", config)
    roles = Roles(model.eval(), value_head, reward_head, [], ChatFormat.of(tokenizer, backbone))
    with torch.no_grad():
        in_ppo = roles.scores(rollout_of(roles.chat, prompts, responses, finished))
    assert torch.allclose(torch.tensor(judged), standalone, atol=1e-4)
    assert torch.allclose(in_ppo, standalone, atol=1e-4)


def test_chat_and_the_exported_model(family_run, monkeypatch, capsys):
    family, _, run_dir = family_run
    monkeypatch.setattr("sys.stdin", io.StringIO("give two tips\n"))
    assert main(["chat", str(run_dir), "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip()  # one reply (a random model's, but a reply)
    model_dir = run_dir / "export" / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    eos = model.generation_config.eos_token_id
    assert set(tokenizer.convert_ids_to_tokens(eos)) == EXPECTED[family]["eos"]
    assert model.generation_config.repetition_penalty is None  # Qwen2.5's 1.05 was never evaluated: not shipped
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "give two tips"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    output = model.generate(**ids, max_new_tokens=8)
    assert output.shape[1] > ids["input_ids"].shape[1]
