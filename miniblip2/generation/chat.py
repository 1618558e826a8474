"""Chat-style prompting: earlier questions and answers about the image, then the new question.

BLIP-2 was not trained on dialogues, but its OPT and FlanT5 models follow a conversation written
out as a prompt. This is the format of the BLIP-2 demo in LAVIS (salesforce/LAVIS,
projects/blip2/README.md, "Ask a follow-up question", and its notebook
examples/blip2_instructed_generation.ipynb; the Hugging Face BLIP-2 blog post uses the same):

    template = "Question: {} Answer: {}."
    prompt = " ".join([template.format(q, a) for q, a in context]) + " Question: " + question + " Answer:"
"""

from ..errors import PromptError


# With no earlier turns this is the demo's single-question prompt "Question: ... Answer:" (the
# demo's join would leave a leading space there).
def chat_prompt(turns, question):
    """[(question, answer), ...] and a new question -> one prompt string for `caption`/`stream`."""
    if not isinstance(question, str):
        raise PromptError(f"question must be a str, not {type(question).__name__}")
    try:
        pairs = [(q, a) for q, a in turns]
    except (TypeError, ValueError) as err:
        raise PromptError(f"turns must be a list of (question, answer) pairs ({err})") from err
    if not all(isinstance(q, str) and isinstance(a, str) for q, a in pairs):
        raise PromptError("every earlier question and answer must be a str")
    context = [f"Question: {q} Answer: {a}." for q, a in pairs]
    return " ".join(context + [f"Question: {question} Answer:"])
