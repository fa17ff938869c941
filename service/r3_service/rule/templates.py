"""Chat templates: find the user's words in a templated prompt and the role prefixes to stop at,
and write a prompt in one (the trainer's rollouts), so each template's text lives only here.

Trainers such as OpenRLHF and slime hold only the templated text, but relevance must be computed
on what the user asked (spec, "Queries inside chat templates"). Besides the spec's templates:
Llama 3, GLM-4 (`[gMASK]<sop><|system|>…<|user|>…<|assistant|>`) and DeepSeek-V3/R1
(`<｜User｜>…<｜Assistant｜>`), the families RL frameworks such as slime train most.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from r3_service.rule.features import collapse_whitespace

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    detect: re.Pattern[str]  # matches when a text uses this template
    user_turn: re.Pattern[str]  # group 1 is one user turn
    assistant_marker: str  # the response starts after the last one of these
    stop_strings: tuple[str, ...]  # role prefixes: a response is cut at the first one
    exchange: str  # one user turn and its answer, for models that read templated text
    prompt_format: str  # one user turn, up to where the answer starts; {system} is `system_block`
    system_block: str = "{system}"  # how a system prompt enters the prompt
    default_system: str = ""  # the system prompt the template is usually used with
    drop: re.Pattern[str] | None = None  # removed from a user turn (e.g. a system block)

    def render(self, query: str, response: str) -> str:
        return self.exchange.format(query=query, response=response)

    def prompt(self, query: str, system: str | None = None) -> str:
        """The prompt for one user turn; `system` None takes the template's usual one, "" none."""
        system = self.default_system if system is None else system
        block = self.system_block.format(system=system) if system else ""
        return self.prompt_format.format(system=block, query=query)

    def user_text(self, text: str) -> str:
        turns = (match.group(1) for match in self.user_turn.finditer(text))
        if self.drop is not None:
            turns = (self.drop.sub(" ", turn) for turn in turns)
        return collapse_whitespace(" ".join(turns))

    def split(self, text: str) -> tuple[str, str] | None:
        """(prompt, response) at the last assistant marker, or None when there is none."""
        position = text.rfind(self.assistant_marker)
        if position < 0:
            return None
        end = position + len(self.assistant_marker)
        return text[:end], text[end:]


_S = re.DOTALL
TEMPLATES: dict[str, ChatTemplate] = {
    template.name: template
    for template in (
        ChatTemplate(
            name="chatml",
            detect=re.compile(r"<\|im_start\|>\s*user"),
            user_turn=re.compile(r"<\|im_start\|>\s*user\s*\n?(.*?)(?=<\|im_end\|>|<\|im_start\|>|$)", _S),
            assistant_marker="<|im_start|>assistant\n",
            stop_strings=("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
            exchange="<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n{response}<|im_end|>",
            prompt_format="{system}<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n",
            system_block="<|im_start|>system\n{system}<|im_end|>\n",
        ),
        ChatTemplate(
            name="llama-3",
            detect=re.compile(r"<\|start_header_id\|>\s*user\s*<\|end_header_id\|>"),
            user_turn=re.compile(r"<\|start_header_id\|>\s*user\s*<\|end_header_id\|>(.*?)"
                                 r"(?=<\|eot_id\|>|<\|start_header_id\|>|$)", _S),
            assistant_marker="<|start_header_id|>assistant<|end_header_id|>",
            stop_strings=("<|eot_id|>", "<|start_header_id|>", "<|end_of_text|>"),
            exchange="<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{query}<|eot_id|>"
                     "<|start_header_id|>assistant<|end_header_id|>\n\n{response}<|eot_id|>",
            prompt_format="<|begin_of_text|>{system}<|start_header_id|>user<|end_header_id|>\n\n{query}"
                          "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
            system_block="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
        ),
        ChatTemplate(
            name="glm-4",
            detect=re.compile(r"<\|user\|>.*<\|assistant\|>", _S),
            user_turn=re.compile(r"<\|user\|>(.*?)(?=<\|assistant\|>|<\|user\|>|<\|observation\|>|$)", _S),
            assistant_marker="<|assistant|>",
            stop_strings=("<|user|>", "<|observation|>", "<|endoftext|>", "<|assistant|>"),
            exchange="[gMASK]<sop><|user|>\n{query}<|assistant|>\n{response}",
            prompt_format="[gMASK]<sop>{system}<|user|>\n{query}<|assistant|>",
            system_block="<|system|>\n{system}",
        ),
        ChatTemplate(
            name="deepseek",
            detect=re.compile(r"<｜User｜>"),
            user_turn=re.compile(r"<｜User｜>(.*?)(?=<｜Assistant｜>|<｜User｜>|$)", _S),
            assistant_marker="<｜Assistant｜>",
            stop_strings=("<｜User｜>", "<｜end▁of▁sentence｜>", "<｜Assistant｜>"),
            exchange="<｜begin▁of▁sentence｜><｜User｜>{query}<｜Assistant｜>{response}<｜end▁of▁sentence｜>",
            prompt_format="<｜begin▁of▁sentence｜>{system}<｜User｜>{query}<｜Assistant｜>",
        ),
        ChatTemplate(
            name="llama-2",
            detect=re.compile(r"\[INST\].*?\[/INST\]", _S),
            user_turn=re.compile(r"\[INST\](.*?)\[/INST\]", _S),
            assistant_marker="[/INST]",
            stop_strings=("[INST]", "[/INST]", "</s>"),
            exchange="[INST] {query} [/INST] {response}",
            prompt_format="[INST] {system}{query} [/INST]",
            system_block="<<SYS>>\n{system}\n<</SYS>>\n\n",
            drop=re.compile(r"<<SYS>>.*?<</SYS>>", _S),
        ),
        ChatTemplate(
            name="alpaca",
            detect=re.compile(r"### Instruction:"),
            user_turn=re.compile(r"### Instruction:(.*?)(?=### Response:|### Instruction:|$)", _S),
            assistant_marker="### Response:",
            stop_strings=("### Instruction:", "### Input:", "### Response:"),
            exchange="### Instruction:\n{query}\n\n### Response:\n{response}",
            prompt_format="{system}### Instruction:\n{query}\n\n### Response:\n",
            system_block="{system}\n\n",
            default_system=ALPACA_SYSTEM,
        ),
        ChatTemplate(
            name="vicuna",
            detect=re.compile(r"(?<![^\s>])USER:.*ASSISTANT:", _S),
            user_turn=re.compile(r"(?<![^\s>])USER:(.*?)(?=ASSISTANT:|$)", _S),
            assistant_marker="ASSISTANT:",
            stop_strings=("USER:", "ASSISTANT:", "</s>"),
            exchange="USER: {query} ASSISTANT: {response}",
            prompt_format="{system}USER: {query} ASSISTANT:",
            system_block="{system} ",
            default_system=VICUNA_SYSTEM,
        ),
        ChatTemplate(
            name="anthropic-hh",
            detect=re.compile(r"(?:^|\n\n)Human:.*\n\nAssistant:", _S),
            user_turn=re.compile(r"(?:^|\n\n)Human:(.*?)(?=\n\nAssistant:|\n\nHuman:|$)", _S),
            assistant_marker="\n\nAssistant:",
            stop_strings=("\n\nHuman:", "\n\nAssistant:"),
            exchange="\n\nHuman: {query}\n\nAssistant: {response}",
            prompt_format="{system}\n\nHuman: {query}\n\nAssistant:",
        ),
    )
}


def detect_template(text: str) -> ChatTemplate | None:
    for template in TEMPLATES.values():
        if template.detect.search(text):
            return template
    return None


def extract_query(text: str) -> str:
    """The user's words of a templated prompt; a raw query passes through unchanged."""
    template = detect_template(text)
    return text if template is None else template.user_text(text)


def normalise_query(text: str) -> str:
    """The form a query is keyed by in the store: template removed, whitespace collapsed."""
    return collapse_whitespace(extract_query(text))
