"""Tiny random models that carry the quirks of real instruct families, built from their published files
(tests/fixtures/families/<family>/, each with a SOURCE.md): the real chat template, special tokens (with
their strip flags), EOS lists, pad handling and generation config, and the model type with its own
logit computation (Gemma 2's softcapping), at a size that trains in seconds.

What cannot be carried: the real vocabularies (up to 256k entries). Each model gets a small tokenizer
trained here on a fixed corpus, byte-level BPE for the families that use one (Qwen2.5, Llama 3) and a
SentencePiece-style BPE (a "▁" word prefix) for the others, with every special token of the family at
the front of its vocabulary; ids in the configs are mapped through the tokens' names."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FIXTURES = Path(__file__).parent / "fixtures" / "families"
FAMILIES = ("qwen2.5", "llama3", "gemma2", "mistral", "phi3")
SIZE = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024, "initializer_range": 0.5,
}
SENTENCEPIECE_CLASSES = ("LlamaTokenizer", "GemmaTokenizer")


def tokenizer_config(family: str) -> dict:
    folder = FIXTURES / family
    path = folder / "tokenizer_config.json"
    return json.loads((path if path.exists() else folder / "tokenizer_config.partial.json").read_text())


def _name(token) -> str | None:
    return token["content"] if isinstance(token, dict) else token


def build_family_model(family: str, dest: Path) -> Path:
    """Save a tiny random model of `family` (tokenizer, config, generation config) in `dest`."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    source = tokenizer_config(family)
    tokenizer = _tokenizer(source)
    real_names = {int(i): t["content"] for i, t in source["added_tokens_decoder"].items()}

    def tiny_id(real):
        if isinstance(real, list):
            return [tiny_id(r) for r in real]
        return None if real is None else tokenizer.convert_tokens_to_ids(real_names[real])

    config = json.loads((FIXTURES / family / "config.json").read_text())
    for key in ("auto_map", "_name_or_path", "torch_dtype", "transformers_version", "quantization_config"):
        config.pop(key, None)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in config:
            config[key] = tiny_id(config[key])
    config |= SIZE | {"vocab_size": len(tokenizer)}
    if family == "gemma2":
        # A window the tests' sequences cross; a smaller initialization, since Gemma scales its embeddings by
        # sqrt(hidden size): at 0.5 every logit sits at the softcap and sampling is deterministic.
        config |= {"query_pre_attn_scalar": SIZE["head_dim"], "sliding_window": 32, "initializer_range": 0.05}
    if config.get("rope_scaling") and "original_max_position_embeddings" in config["rope_scaling"]:  # Llama 3's
        config["rope_scaling"] = config["rope_scaling"] | {"original_max_position_embeddings": 256}
    if family == "phi3":
        config |= {"sliding_window": 1023, "original_max_position_embeddings": SIZE["max_position_embeddings"]}
    model_type = config.pop("model_type")
    config.pop("architectures", None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config), dtype=torch.float32)

    generation = json.loads((FIXTURES / family / "generation_config.json").read_text())
    generation.pop("transformers_version", None)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in generation:
            generation[key] = tiny_id(generation[key])
    model.generation_config = GenerationConfig(**generation)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def _tokenizer(source: dict):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    added = [t for _, t in sorted((int(i), t) for i, t in source["added_tokens_decoder"].items())]
    sentencepiece = source.get("tokenizer_class") in SENTENCEPIECE_CLASSES
    unk = _name(source.get("unk_token"))
    bpe = Tokenizer(models.BPE(unk_token=unk if sentencepiece else None))
    if sentencepiece:
        bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        bpe.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(set("".join(_corpus())) | set("\n▁"))
    else:
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = [t["content"] for t in added]
    trainer = trainers.BpeTrainer(vocab_size=len(specials) + 400, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    # The family's strip flags: Phi-3's <|end|> eats the newline after it, which changes its end of turn.
    bpe.add_tokens([AddedToken(t["content"], lstrip=t["lstrip"], rstrip=t["rstrip"], normalized=t["normalized"],
                               single_word=t["single_word"], special=t["special"]) for t in added])
    bos = _name(source.get("bos_token"))
    if source.get("add_bos_token") and bos:  # SentencePiece families put BOS before a text tokenized alone
        bpe.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bpe.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        **{key: _name(source.get(key)) for key in ("bos_token", "eos_token", "pad_token", "unk_token") if source.get(key)},
    )
    tokenizer.chat_template = source["chat_template"]
    return tokenizer


def _corpus() -> list[str]:
    words = (
        "the a an of to in and is are was be for on with as by at from this that it you your "
        "write explain give list describe summarize rewrite classify answer question text sentence "
        "word number code python function example steps tips reasons good bad short long simple "
        "user assistant system helpful please thank yes no one two three four five six seven eight "
        "Hi Cutting Knowledge Date December 2023 Today You are Qwen created by Alibaba Cloud . , : ! ?"
    ).split()
    return [" ".join(words[i:] + words[:i]) + "\n" for i in range(len(words))] * 4
