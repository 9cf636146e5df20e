"""The reward stage runs the tokens a pair's two rows share (its prompt) once: TRL's loss, logits and
gradients, for fewer tokens through the model."""

import random
from pathlib import Path

import pytest
import torch
from trl import RewardTrainer

from rlhf.chat_format import ChatFormat
from rlhf.config import load_config
from rlhf.models import load_reward_model, load_tokenizer, resolve_model
from rlhf.preemption import StopOnSigterm
from rlhf.stages import reward
from rlhf.tracking import StageHistory
from rlhf.training import SaveAndStopOnSigterm

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")
WORDS = "tea water sleep walk bread light music river stone garden".split()


def pairs(rng: random.Random, count: int) -> list[reward.PreferencePair]:
    """Prompts and answers of varied lengths; some answers start alike, one is a prefix of the other, some unfinished."""
    say = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    made = []
    for i in range(count):
        prompt = [{"role": "user", "content": say(rng.choice([2, 6, 12]))}]
        chosen = say(rng.choice([1, 3, 9]))
        rejected = [say(rng.choice([2, 5])), chosen + " " + say(2), chosen][i % 3]
        made.append(reward.PreferencePair(prompt, [{"role": "assistant", "content": chosen}],
                                          [{"role": "assistant", "content": rejected}], i % 4 != 1, i % 5 != 2))
    return made


def trainer_for(tmp_path, checkpointing: bool):
    path = resolve_model("tiny-random-llama")
    tokenizer = load_tokenizer(path)
    config = load_config(SMOKE, [f"output_dir={tmp_path}", "reward.batch_size=6", "model.dtype=float32"])
    data = reward.tokenize_pairs(pairs(random.Random(0), 12), ChatFormat.of(tokenizer))
    torch.manual_seed(0)
    trainer = reward.build_trainer(config, load_reward_model(path, config.model, tokenizer), tokenizer, (data, data),
                                   tmp_path / "ckpt", StageHistory(tmp_path / "history", 0), SaveAndStopOnSigterm(StopOnSigterm()), False)
    if checkpointing:
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return trainer


def loss_logits_gradients(trainer, compute_loss, batch):
    model = trainer.model.train()
    loss, outputs = compute_loss(trainer, model, dict(batch), return_outputs=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), outputs.logits.detach(), grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_pairs_prompt_runs_once_with_trls_loss_logits_and_gradients(tmp_path, checkpointing):
    trainer = trainer_for(tmp_path, checkpointing)
    batch = next(iter(trainer.get_train_dataloader()))
    rows, columns = batch["input_ids"].shape
    shapes = []
    embeddings = trainer.model.get_input_embeddings()
    hook = embeddings.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    ours = loss_logits_gradients(trainer, reward.GuardedRewardTrainer.compute_loss, batch)
    hook.remove()
    trls = loss_logits_gradients(trainer, RewardTrainer.compute_loss, batch)  # TRL's own: every row whole

    if checkpointing:  # checkpointed layers would drop the prompt's cache: every row runs whole
        assert shapes == [(rows, columns)]
    else:
        (prompts, prefix), (tails, rest) = shapes
        assert (prompts, tails) == (rows // 2, rows)  # each pair's prompt once, then each row's own tokens
        assert prompts * prefix + tails * rest < 0.8 * rows * columns
    loss, logits, grads = ours
    assert torch.allclose(loss, trls[0], rtol=1e-5)
    assert torch.allclose(logits, trls[1], atol=1e-5)
    assert grads.keys() == trls[2].keys() and any("lora_A" in n for n in grads) and any("score" in n for n in grads)
    for name, grad in grads.items():  # float32 sums in another order: measured up to 5.1e-6 on gradients of magnitude 1.7
        assert torch.allclose(grad, trls[2][name], rtol=1e-4, atol=2e-5), name


def test_prefix_layout_aligns_each_pairs_shared_tokens():
    """Rows [1 2 3 4] / [1 2 5] share 2 tokens, [7 8] / [7 8 9] share 2: prefixes right-aligned in the first W
    columns, each row's own tokens after them, right-padded with the pad id."""
    ids = torch.tensor([[1, 2, 3, 4], [7, 8, 0, 0], [1, 2, 5, 0], [7, 8, 9, 0]])
    mask = (ids != 0).long()
    laid, laid_mask, width = reward.prefix_layout(ids, mask, pad_id=0)
    assert width == 2
    assert laid.tolist() == [[1, 2, 3, 4], [7, 8, 0, 0], [1, 2, 5, 0], [7, 8, 9, 0]]
    ids = torch.tensor([[1, 2, 3, 0], [6, 7, 8, 9], [1, 2, 4, 0], [6, 7, 8, 5]])
    laid, laid_mask, width = reward.prefix_layout(ids, (ids != 0).long(), pad_id=0)
    assert width == 3
    assert laid.tolist() == [[0, 1, 2, 3], [6, 7, 8, 9], [0, 1, 2, 4], [6, 7, 8, 5]]
    assert laid_mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]]


def test_a_batch_that_sharing_would_make_longer_runs_whole():
    """A pair with a long shared prompt beside one with long answers: prefixes and tails padded to their
    longest would be 2 × 5 + 4 × 7 = 38 tokens against the rows' 4 × 7 = 28: no layout (every row whole)."""
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7], [8, 9, 9, 9, 9, 9, 0], [1, 2, 3, 4, 5, 6, 0], [8, 7, 7, 7, 7, 7, 7]])
    assert reward.prefix_layout(ids, (ids != 0).long(), pad_id=0) is None


def test_the_trainers_own_training_step_runs_each_prompt_once(tmp_path):
    """Through Trainer.train (the model as the trainer hands it to compute_loss, unwrapped in one process)."""
    trainer = trainer_for(tmp_path, checkpointing=False)
    trainer.args.max_steps = 1
    shapes = []
    hook = trainer.model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    trainer.train()
    hook.remove()
    assert [rows for rows, _ in shapes] == [6, 12]  # 6 pairs: their prompts, then their 12 rows' own tokens
