"""Sampling: our inverse-CDF sampler draws from the same distribution as torch.multinomial, and the
decoding settings reach generate() as configured."""

import pytest
import torch

from rlhf.config import ModelConfig
from rlhf.generation import SampleFrom, Sampling, generate_chat
from rlhf.models import load_causal_lm, load_tokenizer, resolve_model


def test_inverse_cdf_sampler_draws_tokens_at_their_softmax_probabilities():
    scores = torch.tensor([[2.0, 1.0, float("-inf"), 0.0, -1.0]]).repeat(40_000, 1)
    torch.manual_seed(0)
    chosen = SampleFrom(Sampling(1.0))(None, scores.clone())
    assert ((chosen == 0) | torch.isneginf(chosen)).all() and ((chosen == 0).sum(1) == 1).all()
    counts = torch.bincount(chosen.argmax(1), minlength=5).double() / 40_000
    expected = torch.softmax(scores[0].double(), 0)  # 0.644, 0.237, 0, 0.087, 0.032
    # 4 standard errors of a frequency over 40k draws is at most 0.01; a token of probability 0 never comes.
    assert torch.allclose(counts, expected, atol=0.01)
    assert counts[2] == 0


def test_inverse_cdf_sampler_refuses_nan_scores_like_multinomial():
    with pytest.raises(ValueError, match="nan or all -inf"):
        SampleFrom(Sampling(1.0))(None, torch.tensor([[0.0, float("nan")]]))


def test_top_k_1_sampling_is_greedy_decoding_and_samples_differ_by_seed():
    path = resolve_model("tiny-random-llama")
    model, tokenizer = load_causal_lm(path, ModelConfig(name_or_path=path)).eval(), load_tokenizer(path)
    chats = [[{"role": "user", "content": text}] for text in ("write a short tip", "name a colour", "hello")]
    greedy = generate_chat(model, tokenizer, chats, max_new_tokens=12)
    top1 = generate_chat(model, tokenizer, chats, max_new_tokens=12, temperature=1.0, top_k=1, seed=5)
    assert top1 == greedy
    sampled = [generate_chat(model, tokenizer, chats, max_new_tokens=12, temperature=1.0, seed=s) for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_a_prompt_repeated_in_a_batch_is_prefilled_once_with_the_same_logits():
    from rlhf.chat_format import ChatFormat
    from rlhf.generation import generate, left_pad

    path = resolve_model("tiny-random-llama")
    model, tokenizer = load_causal_lm(path, ModelConfig(name_or_path=path)).eval(), load_tokenizer(path)
    chat = ChatFormat.of(tokenizer, model)
    short, long = (chat.prompt_ids([{"role": "user", "content": text}]) for text in ("hi", "write a short tip on tea"))
    prefills = []  # the [rows, columns] each forward sees before decoding starts
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: prefills.append(tuple(args[0].shape)))

    def run(prompts):
        prefills.clear()
        ids, mask = left_pad(prompts, tokenizer.pad_token_id, "cpu")
        with torch.no_grad():
            out = generate(model, chat, ids, mask, Sampling(0.0), max_new_tokens=6, with_logits=True)
        return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1), list(prefills)

    shared_tokens, shared_logits, shared_calls = run([short, long, short, short])
    plain_tokens, plain_logits, plain_calls = run([short, long])
    hook.remove()
    width = len(long)
    assert shared_calls[:2] == [(2, width - 1), (4, 1)]  # two distinct prompts once, then every row's last token
    assert plain_calls[0] == (2, width)  # no repeat: generate's own prefill
    for row, plain_row in ((0, 0), (1, 1), (2, 0), (3, 0)):
        assert torch.equal(shared_tokens[row], plain_tokens[plain_row])
        assert torch.allclose(shared_logits[row], plain_logits[plain_row], atol=1e-5)
