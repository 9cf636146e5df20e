"""The sft stage's CPU loss runs the LM head only where a label follows, with the loss and gradients of the
model's own cross-entropy (transformers' ForCausalLMLoss) on every position."""

import contextlib
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import Trainer

from rlhf.config import load_config
from rlhf.models import load_causal_lm, load_tokenizer, resolve_model
from rlhf.preemption import StopOnSigterm
from rlhf.stages import sft
from rlhf.tracking import StageHistory
from rlhf.training import SaveAndStopOnSigterm

from families import build_family_model

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")
TEXTS = ["name a colour", "write a short tip on tea and how to brew it well", "hi", "list two fruits, then a third one"]
ANSWERS = ["blue", "use water just off the boil and wait three minutes", "hello there, how can I help", "apple, pear; plum"]


def trainer_for(tmp_path, family: str):
    path = resolve_model(family) if family == "tiny-random-llama" else str(build_family_model(family, tmp_path / family))
    config = load_config(SMOKE, [f"output_dir={tmp_path}", "sft.batch_size=4", "model.dtype=float32", "lora.dropout=0"])
    config.model.name_or_path = path
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": t}], "completion": [{"role": "assistant", "content": a}]}
                                  for t, a in zip(TEXTS, ANSWERS)])
    torch.manual_seed(0)
    return sft.build_trainer(config, load_causal_lm(path, config.model), load_tokenizer(path), (data, data), tmp_path / "ckpt",
                             StageHistory(tmp_path / "history", 0), SaveAndStopOnSigterm(StopOnSigterm()), False)


def loss_and_gradients(trainer, compute_loss, batch, num_items_in_batch):
    model = trainer.model.train()
    loss = compute_loss(trainer, model, dict(batch), num_items_in_batch=num_items_in_batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("family", ["tiny-random-llama", "gemma2"])  # gemma2: softcapping after the LM head
def test_lm_head_runs_at_labelled_positions_only_with_the_models_own_loss_and_gradients(tmp_path, family):
    trainer = trainer_for(tmp_path, family)
    batch = next(iter(trainer.get_train_dataloader()))
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    rows, columns = batch["input_ids"].shape
    assert labelled < 0.8 * rows * columns  # the prompts and the padding are a good share of the positions
    head_inputs = []
    hook = trainer.model.get_output_embeddings().register_forward_hook(lambda m, args, out: head_inputs.append(tuple(args[0].shape)))
    for num_items_in_batch in (None, torch.tensor(labelled + 3)):  # a mean, or a sum over an accumulated batch's count
        head_inputs.clear()
        ours = loss_and_gradients(trainer, sft.SFTTrainerOnCPU.compute_loss, batch, num_items_in_batch)
        assert head_inputs[-1][:2] == (1, labelled)
        models = loss_and_gradients(trainer, Trainer.compute_loss, batch, num_items_in_batch)  # logits everywhere
        assert head_inputs[-1][:2] == (rows, columns)
        assert torch.allclose(ours[0], models[0], rtol=1e-5)
        assert ours[1].keys() == models[1].keys() and any("lora_A" in n for n in ours[1])
        for name, grad in ours[1].items():
            assert torch.allclose(grad, models[1][name], rtol=1e-4, atol=1e-6), name
    hook.remove()


def test_a_model_that_bypasses_its_head_module_still_gets_the_labelled_loss(tmp_path, monkeypatch):
    """If the LM head's forward hook never sees the hidden states, the loss selects the labelled logits itself."""
    trainer = trainer_for(tmp_path, "tiny-random-llama")
    batch = next(iter(trainer.get_train_dataloader()))
    expected = loss_and_gradients(trainer, Trainer.compute_loss, batch, None)[0]
    monkeypatch.setattr(sft, "lm_head_at", lambda model, positions: contextlib.nullcontext())
    assert torch.allclose(loss_and_gradients(trainer, sft.SFTTrainerOnCPU.compute_loss, batch, None)[0], expected, rtol=1e-5)
