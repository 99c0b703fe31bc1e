"""Prompt formatting and the tokens that end an answer."""

from __future__ import annotations

from pipeline.errors import UserError

INSTRUCT_TEMPLATE = "Instruct: {question}\nOutput:"


def resolve_template(template: str, tokenizer) -> str:
    """``chat`` or a format string containing ``{question}``."""
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else INSTRUCT_TEMPLATE
    if template == "instruct":
        return INSTRUCT_TEMPLATE
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("template 'chat' asked for, but the tokenizer has no chat template")
        return "chat"
    if "{question}" not in template:
        raise UserError("a custom template must contain {question}")
    return template


def prompt_ids(tokenizer, template: str, question: str) -> list[int]:
    if template == "chat":
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(template.format(question=question))["input_ids"]


def stop_token_ids(tokenizer, model) -> list[int]:
    """End-of-sequence ids: the tokenizer's (the end-of-turn token for chat models) and the model's."""
    ids = set()
    for source in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None),
                   model.config.get_text_config().eos_token_id):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(source)
    return sorted(ids)


def answer_length(tokenizer, reference: str | None, cap: int) -> int:
    """T: the reference answer's length in tokens (docs/protocol.md §3), capped; ``cap`` without a reference."""
    if not reference:
        return cap
    return max(1, min(cap, len(tokenizer(reference, add_special_tokens=False)["input_ids"])))
