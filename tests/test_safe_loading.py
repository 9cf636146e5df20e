"""Safe loading: model code from the hub runs only when the config says so (model.trust_remote_code), and
nothing the pipeline loads is unpickled unless it wrote it itself. (That the weights it writes are
safetensors only is checked on a finished smoke run in test_end_to_end.py.)"""

import ast
from pathlib import Path

import pytest
import transformers

from rlhf.config import ModelConfig
from rlhf.models import load_causal_lm, load_reward_model, load_tokenizer

REPO = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = ("pipeline", "stages", "data_builders", "reward")


class Recorded(Exception):
    pass


@pytest.fixture
def calls(monkeypatch) -> list[tuple[str, object]]:
    """Every Auto*.from_pretrained call: (class name, the trust_remote_code it was given). The call stops there."""
    seen: list[tuple[str, object]] = []
    for name in ("AutoTokenizer", "AutoModelForCausalLM", "AutoModelForSequenceClassification"):

        def record(path, *args, _name=name, **kwargs):
            seen.append((_name, kwargs.get("trust_remote_code", "not given")))
            raise Recorded

        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", record)
    return seen


@pytest.mark.parametrize("trust", [False, True])
def test_loaders_pass_the_config_value(calls, trust):
    model_config = ModelConfig(device="cpu", trust_remote_code=trust)
    for load in (
        lambda: load_tokenizer("some/model", model_config.trust_remote_code),
        lambda: load_causal_lm("some/model", model_config),
        lambda: load_reward_model("some/model", model_config, tokenizer=None),
    ):
        with pytest.raises(Recorded):
            load()
    assert calls == [("AutoTokenizer", trust), ("AutoModelForCausalLM", trust), ("AutoModelForSequenceClassification", trust)]


def test_trust_remote_code_is_off_by_default(calls):
    assert ModelConfig().trust_remote_code is False
    with pytest.raises(Recorded):
        load_tokenizer("some/model")
    assert calls == [("AutoTokenizer", False)]


def package_calls():
    """(file, function, owner, name, call node) for every call in the package's source."""
    for folder in PACKAGE_DIRS:
        for path in sorted((REPO / folder).glob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
            enclosing = {id(call): f.name for f in functions for call in ast.walk(f)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    func = node.func
                    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                    owner = ast.unparse(func.value) if isinstance(func, ast.Attribute) else ""
                    yield f"{folder}/{path.name}", enclosing.get(id(node), ""), owner, name, node


def keyword(node: ast.Call, name: str) -> str | None:
    return next((ast.unparse(k.value) for k in node.keywords if k.arg == name), None)


def test_every_load_in_the_package_passes_the_config_value():
    """No hard-coded trust_remote_code=True; load_tokenizer and Auto*.from_pretrained get the config's value
    (the embedded GGUF model aside: a Llama read and rebuilt with transformers' own code)."""
    problems = []
    for where, function, owner, name, node in package_calls():
        trust = keyword(node, "trust_remote_code")
        if trust == "True":
            problems.append(f"{where}:{node.lineno}: trust_remote_code=True")
        if name == "load_tokenizer" and owner in ("", "rlhf.models"):
            given = ast.unparse(node.args[1]) if len(node.args) > 1 else trust
            if not given or "trust_remote_code" not in given:
                problems.append(f"{where}:{node.lineno}: load_tokenizer without the config's trust_remote_code")
        if name in ("from_pretrained", "from_config") and owner.startswith("Auto") and function != "materialize_embedded_model":
            if trust is None:
                problems.append(f"{where}:{node.lineno}: {owner}.{name} without trust_remote_code")
    assert not problems, problems


# Every torch.load in the package passes weights_only=True: transformers' Trainer reads its own checkpoint
# state (optimizer.pt, scheduler.pt, rng_state.pth) that way too, and ppo's resume state (optimizer,
# scheduler, KL controller, RNG) holds only tensors and plain Python values.


def test_torch_load_only_of_own_files_or_weights_only():
    unsafe = {
        where
        for where, function, owner, name, node in package_calls()
        if owner == "torch" and name == "load" and keyword(node, "weights_only") != "True"
    }
    assert not unsafe, unsafe
