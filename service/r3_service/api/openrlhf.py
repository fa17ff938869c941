"""Turn OpenRLHF's `/get_reward` batch (templated prompt + response strings) into engine items."""

from __future__ import annotations

from r3_service.api.schemas import GetRewardRequest, Label
from r3_service.engine.resolve import RawItem
from r3_service.rule.templates import detect_template


class SampleError(ValueError):
    """A sample that cannot be split into prompt and response; names the index."""


def split_sample(text: str, prompt: str | None, index: int) -> tuple[str, str]:
    """(prompt, response): the prompt prefix when given, else the template's last assistant turn."""
    if prompt is not None:
        if text.startswith(prompt):
            return prompt, text[len(prompt):]
        if text.lstrip().startswith(prompt.lstrip()):  # a decoded BOS/space may differ
            return prompt, text.lstrip()[len(prompt.lstrip()):]
    template = detect_template(prompt or text)
    parts = template.split(text) if template is not None else None
    if parts is None:
        reason = (f"prompts[{index}] is not a prefix of query[{index}]" if prompt is not None else
                  "no prompts given and no known chat template marks where the response starts")
        raise SampleError(f"query[{index}]: {reason}")
    return parts


def to_raw_items(request: GetRewardRequest) -> list[RawItem]:
    count = len(request.query)
    for name in ("prompts", "labels"):
        given = getattr(request, name)
        if given is not None and len(given) != count:
            raise SampleError(f"{name} has {len(given)} entries but query has {count}")
    items = []
    for index, text in enumerate(request.query):
        prompt = request.prompts[index] if request.prompts is not None else None
        prompt, response = split_sample(text, prompt, index)
        label = request.labels[index] if request.labels is not None else None
        items.append(templated_item(prompt, response, label))
    return items


def templated_item(prompt: str, response: str, label: str | Label | None) -> RawItem:
    """An item from a templated prompt, its response and a label (a reference string or
    {reference, query_type}): the engine removes the template, once; the response is cut at the
    template's role prefixes. Shared by `/get_reward` and `/slime`."""
    if isinstance(label, str):
        label = Label(reference=label)
    template = detect_template(prompt)
    return RawItem(
        query=prompt,
        response=response,
        reference=label.reference if label else None,
        query_type=label.query_type if label else None,
        stop_strings=template.stop_strings if template else (),
    )
