"""Finding the user's words in each chat template the spec lists, and splitting off the response."""

from __future__ import annotations

import pytest

from r3_service.rule.templates import TEMPLATES, detect_template, extract_query, normalise_query
from r3_service.store.records import query_key

CHATML = ("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
          "<|im_start|>assistant\n")
LLAMA2 = "<s>[INST] <<SYS>>\nBe nice.\n<</SYS>>\n\nWhat is 2+2? [/INST]"
VICUNA = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
          "helpful answers. USER: What is 2+2? ASSISTANT:")
ALPACA = ("Below is an instruction that describes a task. Write a response.\n\n### Instruction:\n"
          "What is 2+2?\n\n### Response:\n")
HH = "\n\nHuman: What is 2+2?\n\nAssistant:"
# As each model's own tokenizer chat template renders them (add_generation_prompt=True).
LLAMA3 = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December "
          "2023\n\nBe nice.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
          "<|start_header_id|>assistant<|end_header_id|>\n\n")
GLM4 = "[gMASK]<sop><|system|>\nBe nice.<|user|>\nWhat is 2+2?<|assistant|>"
DEEPSEEK = "<｜begin▁of▁sentence｜>Be nice.<｜User｜>What is 2+2?<｜Assistant｜>"


@pytest.mark.parametrize("prompt,name", [
    (CHATML, "chatml"), (LLAMA2, "llama-2"), (VICUNA, "vicuna"), (ALPACA, "alpaca"), (HH, "anthropic-hh"),
    (LLAMA3, "llama-3"), (GLM4, "glm-4"), (DEEPSEEK, "deepseek"), (DEEPSEEK + "<think>\n", "deepseek"),
])
def test_each_template_yields_the_user_words(prompt: str, name: str) -> None:
    template = detect_template(prompt)
    assert template is not None and template.name == name
    assert extract_query(prompt) == "What is 2+2?"  # system prompt dropped


@pytest.mark.parametrize("prompt,response_marker", [
    (CHATML, "<|im_start|>assistant\n"), (LLAMA2, "[/INST]"), (VICUNA, "ASSISTANT:"),
    (ALPACA, "### Response:"), (HH, "\n\nAssistant:"),
    (LLAMA3, "<|start_header_id|>assistant<|end_header_id|>"), (GLM4, "<|assistant|>"),
    (DEEPSEEK, "<｜Assistant｜>"),
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
    assert "<|eot_id|>" in detect_template(LLAMA3).stop_strings  # type: ignore[union-attr]
    assert "<|user|>" in detect_template(GLM4).stop_strings  # type: ignore[union-attr]
    assert "<｜end▁of▁sentence｜>" in detect_template(DEEPSEEK).stop_strings  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["llama-3", "glm-4", "deepseek"])
def test_new_templates_round_trip_their_own_prompts(name: str) -> None:
    template = TEMPLATES[name]
    prompt = template.prompt("Name a colour.", system="Be brief.")
    assert detect_template(prompt) is template and extract_query(prompt) == "Name a colour."
    two_turns = template.render("Hi.", "Hello!") + template.prompt("Name a colour.", system="")
    assert extract_query(two_turns) == "Hi. Name a colour."
    split = template.split(prompt + "Red.")
    assert split is not None and split[1].strip() == "Red."
