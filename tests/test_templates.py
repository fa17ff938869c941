"""Finding the user's words in each chat template the spec lists, and splitting off the response."""

from __future__ import annotations

import pytest

from r3_service.rule.templates import detect_template, extract_query, normalise_query
from r3_service.store.records import query_key

CHATML = ("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
          "<|im_start|>assistant\n")
LLAMA2 = "<s>[INST] <<SYS>>\nBe nice.\n<</SYS>>\n\nWhat is 2+2? [/INST]"
VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
          "helpful answers. USER: What is 2+2? ASSISTANT:")
ALPACA = ("Below is an instruction that describes a task. Write a response.\n\n### Instruction:\n"
          "What is 2+2?\n\n### Response:\n")
HH = "\n\nHuman: What is 2+2?\n\nAssistant:"


@pytest.mark.parametrize("prompt,name", [
    (CHATML, "chatml"), (LLAMA2, "llama-2"), (VICUNA, "vicuna"), (ALPACA, "alpaca"), (HH, "anthropic-hh"),
])
def test_each_template_yields_the_user_words(prompt: str, name: str) -> None:
    template = detect_template(prompt)
    assert template is not None and template.name == name
    assert extract_query(prompt) == "What is 2+2?"  # system prompt dropped


@pytest.mark.parametrize("prompt,response_marker", [
    (CHATML, "<|im_start|>assistant\n"), (LLAMA2, "[/INST]"), (VICUNA, "ASSISTANT:"),
    (ALPACA, "### Response:"), (HH, "\n\nAssistant:"),
])
def test_split_at_the_last_assistant_turn(prompt: str, response_marker: str) -> None:
    template = detect_template(prompt)
    assert template is not None
    text = prompt.rstrip("\n") + ("\n" if prompt.endswith("\n") else "") + " Four."
    split = template.split(text)
    assert split is not None
    assert split[0].endswith(response_marker)
    assert split[1].strip() == "Four."


def test_multi_turn_joins_user_turns_with_spaces() -> None:
    chatml = ("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
              "<|im_start|>user\nTell me   a joke.<|im_end|>\n<|im_start|>assistant\n")
    assert extract_query(chatml) == "Hi there Tell me a joke."
    llama = "<s>[INST] Hi there [/INST] Hello! </s><s>[INST] Tell me a joke. [/INST]"
    assert extract_query(llama) == "Hi there Tell me a joke."
    vicuna = "System line. USER: Hi there ASSISTANT: Hello!</s>USER: Tell me a joke. ASSISTANT:"
    assert extract_query(vicuna) == "Hi there Tell me a joke."
    hh = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Tell me a joke.\n\nAssistant:"
    assert extract_query(hh) == "Hi there Tell me a joke."


def test_alpaca_input_section_is_kept_as_alpacafarm_writes_it() -> None:
    prompt = ("### Instruction:\nGiven the following input, construct a creative story.\n\n"
              "### Input:\nA magic bow and arrow\n\n### Response:\n")
    dataset_input = ("Given the following input, construct a creative story.\n\n"
                     "### Input:\nA magic bow and arrow")
    assert extract_query(prompt) == normalise_query(dataset_input)
    assert query_key(prompt) == query_key(dataset_input)  # templated prompt finds the dataset record


def test_raw_queries_pass_through_unchanged() -> None:
    for raw in ("What is 2+2?", "  spaced\n\nout  ", "USER: alone without an assistant turn",
                "Human: hello"):
        assert detect_template(raw) is None
        assert extract_query(raw) == raw


def test_query_key_ignores_whitespace_and_template() -> None:
    assert query_key("What  is\n2+2?") == query_key("What is 2+2?") == query_key(VICUNA)
    assert query_key("What is 2+3?") != query_key("What is 2+2?")


def test_stop_strings_are_the_role_prefixes() -> None:
    assert "USER:" in detect_template(VICUNA).stop_strings  # type: ignore[union-attr]
    assert "<|im_start|>" in detect_template(CHATML).stop_strings  # type: ignore[union-attr]
    assert "[INST]" in detect_template(LLAMA2).stop_strings  # type: ignore[union-attr]
    assert "### Instruction:" in detect_template(ALPACA).stop_strings  # type: ignore[union-attr]
    assert "\n\nHuman:" in detect_template(HH).stop_strings  # type: ignore[union-attr]
