"""Sampling: our inverse-CDF sampler draws from the same distribution as torch.multinomial, our decode loop
samples what transformers' generate samples, and the decoding settings reach it as configured."""

import pytest
import torch

from rlhf.config import ModelConfig
from rlhf.generation import SampleFrom, Sampling, generate_chat
from rlhf.models import load_causal_lm, load_tokenizer, resolve_model

from families import FAMILIES, build_family_model


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


class EndRowsAt:
    """A logits processor that makes row r sample an EOS at its step `ends[r]`: tiny random models
    rarely draw one by themselves, and the decode loop's point is what happens after a row ends."""

    def __init__(self, width: int, eos_id: int, ends: dict[int, int]):
        self.width, self.eos_id, self.ends = width, eos_id, ends

    def __call__(self, input_ids, scores):
        step = input_ids.shape[1] - self.width
        for row, end in self.ends.items():
            if step == end:
                scores[row] = float("-inf")
                scores[row, self.eos_id] = 0.0
        return scores


def transformers_generate(model, chat, ids, mask, sampling: Sampling, max_new_tokens: int, first=()) -> torch.Tensor:
    """The reference: transformers' own generate, with our sampler as its only processor and the model's
    generation_config.json set aside, so only the decode loop differs from rlhf.generation.generate."""
    from transformers import GenerationConfig, LogitsProcessorList

    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(chat.eos_ids),
                              pad_token_id=chat.tokenizer.pad_token_id)
    processors = LogitsProcessorList([*first, *([] if sampling.greedy else [SampleFrom(sampling)])])
    saved, model.generation_config = model.generation_config, GenerationConfig()
    try:
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=config, logits_processor=processors)
    finally:
        model.generation_config = saved


@pytest.mark.parametrize("family", ["tiny-random-llama", *FAMILIES])
def test_our_decode_loop_samples_the_tokens_transformers_generate_samples_and_drops_finished_rows(family, tmp_path):
    from rlhf.chat_format import ChatFormat
    from rlhf.generation import generate, left_pad

    path = resolve_model(family) if family == "tiny-random-llama" else str(build_family_model(family, tmp_path / family))
    model, tokenizer = load_causal_lm(path, ModelConfig(name_or_path=path)).eval(), load_tokenizer(path)
    chat = ChatFormat.of(tokenizer, model)
    texts = ["hi", "write a short tip on tea", "name a colour", "hello there, how are you", "hi", "list two fruits"]
    ids, mask = left_pad([chat.prompt_ids([{"role": "user", "content": t}]) for t in texts], tokenizer.pad_token_id, "cpu")
    rows_per_forward = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: rows_per_forward.append(args[0].shape[0]))
    # Rows end at steps 2, 5 and 9 (one of them on a repeated prompt); the others run on, or end by themselves.
    first = (EndRowsAt(ids.shape[1], chat.eos_ids[-1], {4: 2, 1: 5, 2: 9}),)
    for sampling in (Sampling(0.0), Sampling(1.0), Sampling(0.7, top_p=0.9, top_k=20)):
        for seed in (0, 1):
            torch.manual_seed(seed)
            expected = transformers_generate(model, chat, ids, mask, sampling, 24, first)
            rows_per_forward.clear()
            torch.manual_seed(seed)
            ours = generate(model, chat, ids, mask, sampling, 24, first=first).sequences
            assert torch.equal(ours, expected), (family, sampling, seed)
            # A row that sampled an EOS is no longer in the decode forwards.
            done = torch.isin(ours[:, ids.shape[1]:], torch.tensor(chat.eos_ids)).cumsum(1).clamp(max=1)
            active_after = (1 - done).sum(0).tolist()
            assert rows_per_forward[:2] == [5, 6]  # the prefill: "hi" twice, so 5 distinct prompts, then each last token
            assert rows_per_forward[2:] == active_after[: len(rows_per_forward) - 2]
            assert active_after[9] <= len(texts) - 3
    hook.remove()


def test_reserved_cache_layer_writes_in_place_what_dynamic_layer_concatenates():
    from transformers.cache_utils import DynamicLayer

    from rlhf.generation import ReservedLayer

    torch.manual_seed(0)
    prefill = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    plain, reserved = DynamicLayer(), ReservedLayer(*prefill, room=2)
    plain.update(*prefill)
    buffer = reserved.key_buffer.data_ptr()
    for step in range(4):  # two steps within the room, then two past it
        new = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
        for ours, theirs in zip(reserved.update(*new), plain.update(*new)):
            assert torch.equal(ours, theirs)
        assert reserved.get_seq_length() == plain.get_seq_length() == 6 + step
        if step < 2:
            assert reserved.key_buffer.data_ptr() == buffer  # written in place, not copied
    keep = torch.tensor([2, 0])
    reserved.batch_select_indices(keep)
    plain.batch_select_indices(keep)
    assert torch.equal(reserved.keys, plain.keys) and torch.equal(reserved.values, plain.values)


def test_decode_steps_run_on_a_cache_with_room_reserved_for_the_new_tokens():
    from rlhf.chat_format import ChatFormat
    from rlhf.generation import ReservedLayer, generate, left_pad

    path = resolve_model("tiny-random-llama")
    model, tokenizer = load_causal_lm(path, ModelConfig(name_or_path=path)).eval(), load_tokenizer(path)
    chat = ChatFormat.of(tokenizer, model)
    ids, mask = left_pad([chat.prompt_ids([{"role": "user", "content": t}]) for t in ("hi", "name a colour")], tokenizer.pad_token_id, "cpu")
    seen = []

    def record(module, args, kwargs):
        cache = next((v for k, v in kwargs.items() if k in ("cache", "past_key_values") and v is not None), None)
        if cache is not None:
            seen.append((kwargs["input_ids"].shape[1], {type(layer) for layer in cache.layers},
                         {layer.key_buffer.shape[-2] for layer in cache.layers if isinstance(layer, ReservedLayer)}))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        generate(model, chat, ids, mask, Sampling(0.0), max_new_tokens=5)
    hook.remove()
    assert len(seen) == 4 and all(columns == 1 for columns, _, _ in seen)  # the prefill had no cache yet
    assert all(kinds == {ReservedLayer} and sizes == {ids.shape[1] + 5} for _, kinds, sizes in seen)


@pytest.mark.parametrize("candidates", [16, 1024])  # 16: most rows' nucleus is larger, so the warper itself runs
def test_nucleus_keeps_the_tokens_transformers_top_p_warper_keeps(candidates):
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    from rlhf.generation import nucleus

    torch.manual_seed(0)
    rows = [torch.randn(16, 5000) * scale for scale in (0.3, 1.0, 3.0, 8.0)]  # flat to peaked distributions
    ties = torch.randn(4, 5000)
    ties[:, :20] = 7.0  # 20 equal scores hold most of the mass: the nucleus boundary falls among them
    truncated = TopKLogitsWarper(50)(None, torch.randn(4, 5000) * 2)  # -inf outside the top 50, as after top_k
    scores = torch.cat([*rows, ties, truncated])
    for top_p in (0.3, 0.9, 0.95):
        ours, theirs = nucleus(scores, top_p, candidates), TopPLogitsWarper(top_p)(None, scores.clone())
        # Which of several equal scores make the cut is the sort's choice (neither sort is stable): compare each
        # row's kept scores as a sorted list; where they are all distinct, that is the same tokens.
        for a, b in zip(ours, theirs):
            assert torch.equal(a[~torch.isinf(a)].sort().values, b[~torch.isinf(b)].sort().values), top_p
        distinct = slice(0, 64)
        assert torch.equal(torch.isinf(ours[distinct]), torch.isinf(theirs[distinct]))
    assert ((~torch.isinf(nucleus(scores, 0.95, candidates))).sum(1) > 16).any()  # some nuclei exceed 16 tokens
