"""Token-exact RULER prompts: the instruction, the context and the question, through the model's chat
template where it has one, then the start of the answer; exactly the number of tokens asked for, as
the model sees them (template tokens included).

As in `fitness.needles`, the prompt is assembled from separately tokenized pieces that each begin at a
boundary the text has anyway (the template's own markers, a space, a line break), and the context
takes whatever the fixed parts leave.
"""

from __future__ import annotations

from fitness.errors import RopeSearchError
from fitness.haystacks import encode
from fitness.needles import special_prefix
from fitness.ruler.tasks import TaskInputs, TaskSample

MARKER = "\u2063ROPESEARCH-CONTEXT\u2063"  # stands for the context while the chat template is rendered


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def frame(tokenizer, sample: TaskSample, chat: bool) -> tuple[list[int], list[int]]:
    """The tokens before and after the context. With a chat template the instruction, context and
    question are the user's message and the answer's start opens the assistant's turn (as RULER
    does); without one they follow each other as plain text."""
    if not chat:
        head = special_prefix(tokenizer) + encode(tokenizer, [sample.instruction])[0]
        return head, encode(tokenizer, ["\n" + sample.question + " " + sample.answer_prefix])[0]
    message = sample.instruction + MARKER + "\n" + sample.question
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
    )
    if rendered.count(MARKER) != 1:
        raise RopeSearchError("the tokenizer's chat template does not keep the user's message as it is")
    before, after = rendered.split(MARKER)
    return encode(tokenizer, [before])[0], encode(tokenizer, [after + sample.answer_prefix])[0]


def build_prompt(inputs: TaskInputs, sample: TaskSample, length: int, chat: bool) -> list[int]:
    """The sample's prompt in exactly `length` tokens."""
    head, tail = frame(inputs.tokenizer, sample, chat)
    budget = length - len(head) - len(tail)
    if budget < 1:
        raise RopeSearchError(
            f"{length} tokens are too short: the instruction and question alone take {length - budget}"
        )
    ids = head + [t for piece in sample.context.tokens(inputs, budget) for t in piece] + tail
    assert len(ids) == length, (len(ids), length)
    return ids
