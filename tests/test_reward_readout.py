"""One reward readout: the reward model is trained on, and every stage reads it at, the same tokens and the
same position, for finished answers (with the template's end of turn) and unfinished ones (without)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from trl import RewardConfig, RewardTrainer

from rlhf.chat_format import ChatFormat, safe_pad_token
from rlhf.cli import main
from rlhf.config import load_config
from rlhf.models import load_causal_lm, load_tokenizer, peft_lora_config
from rlhf.reward.judges import Candidate, RewardModelJudge
from rlhf.reward.readout import attach_reward_adapter, classifier_scores
from rlhf.roles import Roles, build_actor_critic
from rlhf.rollout import Rollout, in_micro_batches
from rlhf.stages.reward import load_pairs, tokenize_pairs

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")
PROMPTS = [
    [{"role": "user", "content": "Give one tip for sleeping well."}],
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a short answer to this question."}],
]
RESPONSES = ["Go to bed at the same time every day.", "Blue", "The answer is one two three four five six"]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("readout") / "run"
    assert main(["run", SMOKE, f"output_dir={run_dir}", "--only", "instructions,sft,preferences,reward"]) == 0
    return run_dir


def rollout_of(chat: ChatFormat, prompts, responses, finished, device="cpu") -> Rollout:
    """A rollout as generate_rollout builds one, from given tokens: finished responses end with EOS."""
    pad = chat.tokenizer.pad_token_id
    prompt_ids = [chat.prompt_ids(p) for p in prompts]
    response_ids = [
        chat.response_ids(p, ids, r) + ([chat.eos_ids[0]] if done else [])
        for p, ids, r, done in zip(prompts, prompt_ids, responses, finished)
    ]
    width, length = max(map(len, prompt_ids)), max(map(len, response_ids))
    input_ids = torch.tensor([[pad] * (width - len(p)) + p + r + [pad] * (length - len(r)) for p, r in zip(prompt_ids, response_ids)])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * (len(p) + len(r)) + [0] * (length - len(r)) for p, r in zip(prompt_ids, response_ids)])
    mask = torch.tensor([[1.0] * len(r) + [0.0] * (length - len(r)) for r in response_ids])
    return Rollout(
        input_ids=input_ids, attention_mask=attention, position_ids=(attention.cumsum(1) - 1).clamp(min=0),
        context_length=width, mask=mask, finished=torch.tensor(finished),
    )


def test_every_stage_reads_the_reward_model_where_the_trainer_trained_it(upstream):
    """reward/model with plain transformers on the ids the reward trainer got, the preferences judge, ppo's
    and evaluate's scores: the same within 1e-4, for finished and unfinished answers."""
    config = load_config(SMOKE, [f"output_dir={upstream}"])
    prompts = PROMPTS * 2
    responses = RESPONSES * 2
    finished = [True] * 3 + [False] * 3

    # The reward trainer's own view of these pairs: TRL takes our ids as they are (it re-tokenizes nothing).
    tokenizer = load_tokenizer(str(upstream / "sft" / "merged"))
    chat = ChatFormat.of(tokenizer)
    rows = [
        {"prompt": p, "chosen": [{"role": "assistant", "content": r}], "rejected": [{"role": "assistant", "content": "No."}],
         "chosen_finished": f, "rejected_finished": True}
        for p, r, f in zip(prompts, responses, finished)
    ]
    (upstream / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset = tokenize_pairs(load_pairs(upstream / "pairs.jsonl"), chat)
    classifier = AutoModelForSequenceClassification.from_pretrained(upstream / "reward" / "model").eval()
    trainer = RewardTrainer(model=classifier, args=RewardConfig(output_dir=str(upstream / "trl"), report_to="none", use_cpu=True),
                            train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(upstream / "reward" / "model"))
    trained_on = trainer.train_dataset["chosen_ids"]
    assert trained_on == dataset["chosen_ids"]
    eot = list(chat.end_of_turn)
    assert all(ids[-len(eot):] == eot for ids, f in zip(trained_on, finished) if f)
    assert not any(ids[-len(eot):] == eot for ids, f in zip(trained_on, finished) if not f)

    # 1. reward/model, plain transformers, one sequence at a time (no padding at all).
    with torch.no_grad():
        standalone = torch.tensor([classifier(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in trained_on])
    # 2. the preferences judge (and the external-reward-model path: the same class).
    judge = RewardModelJudge.load(str(upstream / "reward" / "model"), config.model)
    judged = torch.tensor(judge.scores([Candidate(p, r, f) for p, r, f in zip(prompts, responses, finished)]))
    # 3. ppo: the reward adapter on the shared backbone, on sampled-form tokens (finished ones end with EOS).
    backbone = load_causal_lm(str(upstream / "sft" / "merged"), config.model)
    model, value_head, reward_head = build_actor_critic(backbone, upstream / "reward", config)
    roles = Roles(model.eval(), value_head, reward_head, [], ChatFormat.of(tokenizer, backbone))
    rollout = rollout_of(roles.chat, prompts, responses, finished)
    with torch.no_grad():
        in_ppo = in_micro_batches(roles.scores, rollout, 2)
    # 4. evaluate: a policy adapter loaded, the reward adapter attached beside it.
    backbone = load_causal_lm(str(upstream / "sft" / "merged"), config.model)
    model = get_peft_model(backbone, peft_lora_config(config.lora), adapter_name="policy")
    head = attach_reward_adapter(model, upstream / "reward")
    evaluate_roles = Roles(model.eval(), None, head, [], roles.chat)
    with torch.no_grad():
        in_evaluate = evaluate_roles.scores(rollout)

    for name, scores in (("judge", judged), ("ppo", in_ppo), ("evaluate", in_evaluate)):
        assert torch.allclose(scores, standalone, atol=1e-4), (name, scores, standalone)
    # Finished and unfinished renderings of the same text are different inputs with different scores.
    assert (standalone[:3] - standalone[3:]).abs().min() > 1e-3


def test_batched_scores_equal_one_at_a_time(upstream):
    """Right padding in batches never moves the readout: the pad token is not a reply's last token."""
    config = load_config(SMOKE, [f"output_dir={upstream}"])
    judge = RewardModelJudge.load(str(upstream / "reward" / "model"), config.model, batch_size=4)
    candidates = [Candidate(p, r, f) for p, r in zip(PROMPTS, RESPONSES) for f in (True, False)]
    batched = judge.scores(candidates)
    alone = [judge.scores([c])[0] for c in candidates]
    assert batched == pytest.approx(alone, abs=1e-5)


def test_held_out_accuracy_in_the_manifest_is_the_readout_everyone_uses(upstream):
    manifest = json.loads((upstream / "reward" / "manifest.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(upstream / "reward" / "model")
    classifier = AutoModelForSequenceClassification.from_pretrained(upstream / "reward" / "model").eval()
    pairs = tokenize_pairs(load_pairs(upstream / "preferences" / "eval.jsonl"), ChatFormat.of(tokenizer))
    limit = load_config(SMOKE, [f"output_dir={upstream}"]).reward.max_length  # TRL drops longer pairs: so here
    pairs = pairs.filter(lambda pair: max(len(pair["chosen_ids"]), len(pair["rejected_ids"])) <= limit)
    assert len(pairs) == manifest["metrics"]["eval_pairs"]
    chosen = classifier_scores(classifier, tokenizer.pad_token_id, pairs["chosen_ids"])
    rejected = classifier_scores(classifier, tokenizer.pad_token_id, pairs["rejected_ids"])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)
    assert accuracy == pytest.approx(manifest["metrics"]["eval_accuracy"])


def test_generated_pairs_record_unfinished_answers(upstream):
    """The smoke config samples 16 tokens: the random model's answers run out, and the pairs say so."""
    rows = [json.loads(line) for line in (upstream / "preferences" / "train.jsonl").read_text().splitlines()]
    assert all(isinstance(r["chosen_finished"], bool) and isinstance(r["rejected_finished"], bool) for r in rows)
    assert any(not r["chosen_finished"] or not r["rejected_finished"] for r in rows)


def test_a_pad_token_that_ends_a_turn_is_replaced(tmp_path):
    """Llama 3 pads with its EOS, <|eot_id|>, which is also what ends an assistant turn: a classifier would
    read every finished reply one token early. An unused special token pads instead."""
    path = Path(shutil.copytree(ppo_tiny_model(), tmp_path / "tiny"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["pad_token"] = "<|im_end|>"  # the ChatML end of turn is <|im_end|>\n: a safe pad, kept
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(str(path)).pad_token == "<|im_end|>"
    template = path / "chat_template.jinja"
    template.write_text(template.read_text().replace("'<|im_end|>' + '\n'", "'<|im_end|>'"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert ChatFormat.of(tokenizer).end_of_turn == (tokenizer.convert_tokens_to_ids("<|im_end|>"),)
    assert safe_pad_token(tokenizer) == "<|endoftext|>" == load_tokenizer(str(path)).pad_token


def ppo_tiny_model() -> Path:
    from rlhf.models import resolve_model

    return Path(resolve_model("tiny-random-llama"))
