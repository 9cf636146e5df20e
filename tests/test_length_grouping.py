"""sft and reward batch examples of similar length (`group_by_length`, on by default): the stages' own trainers,
built as the stages build them, pad far less than uniformly shuffled batches, and see every example once per epoch."""

import random
from pathlib import Path

import pytest
from datasets import Dataset

from rlhf.chat_format import ChatFormat
from rlhf.config import load_config
from rlhf.models import load_causal_lm, load_reward_model, load_tokenizer, resolve_model
from rlhf.preemption import StopOnSigterm
from rlhf.stages import reward, sft
from rlhf.tracking import StageHistory
from rlhf.training import SaveAndStopOnSigterm

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")
WORDS = "tea water sleep walk bread light music river stone garden".split()


def text(rng: random.Random, words: int | None = None) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words or rng.choice([2, 4, 8, 16, 32])))


def padding_ratio(trainer, pad_id: int) -> tuple[float, int]:
    """(tokens in the padded batches / real tokens, examples seen) over one pass of the train dataloader."""
    padded = real = rows = 0
    for batch in trainer.get_train_dataloader():
        padded += batch["input_ids"].numel()
        real += int(batch["attention_mask"].sum()) if "attention_mask" in batch else int((batch["input_ids"] != pad_id).sum())
        rows += batch["input_ids"].shape[0]
    return padded / real, rows


@pytest.mark.parametrize("stage", ["sft", "reward"])
def test_training_batches_group_examples_of_similar_length(stage, tmp_path):
    rng = random.Random(0)
    path = resolve_model("tiny-random-llama")
    tokenizer = load_tokenizer(path)
    ratios = {}
    for grouped in (True, False):
        config = load_config(SMOKE, [f"output_dir={tmp_path}", f"{stage}.group_by_length={str(grouped).lower()}",
                                     f"{stage}.batch_size=4", f"{stage}.max_length=512"])
        rng.seed(0)
        history = StageHistory(tmp_path / f"{stage}-{grouped}", 0)
        stop = SaveAndStopOnSigterm(StopOnSigterm())  # never entered: no SIGTERM
        if stage == "sft":
            rows = [{"prompt": [{"role": "user", "content": text(rng)}], "completion": [{"role": "assistant", "content": text(rng)}]}
                    for _ in range(64)]
            data = Dataset.from_list(rows)
            trainer = sft.build_trainer(config, load_causal_lm(path, config.model), tokenizer, (data, data),
                                        tmp_path / "ckpt", history, stop, False)
        else:
            lengths = [rng.choice([2, 4, 8, 16, 32]) for _ in range(64)]  # a pair's two answers of about one length
            pairs = [reward.PreferencePair([{"role": "user", "content": text(rng)}], [{"role": "assistant", "content": text(rng, n)}],
                                           [{"role": "assistant", "content": text(rng, n + 1)}]) for n in lengths]
            data = reward.tokenize_pairs(pairs, ChatFormat.of(tokenizer))
            trainer = reward.build_trainer(config, load_reward_model(path, config.model, tokenizer), tokenizer, (data, data),
                                           tmp_path / "ckpt", history, stop, False)
        ratios[grouped], seen = padding_ratio(trainer, tokenizer.pad_token_id)
        assert len(trainer.train_dataset) == 64  # none too long for max_length
        assert seen == 64 * (2 if stage == "reward" else 1)  # every example once (reward: chosen and rejected rows)
    assert ratios[True] < 1.25 < ratios[False], ratios
