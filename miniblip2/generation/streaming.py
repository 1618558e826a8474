"""Streaming: hand out the generated text while it is being generated, one stable piece at a time.

Mirrors transformers' `TextStreamer` / `TextIteratorStreamer` (generation/streamers.py): every
time a token arrives, decode all the new tokens so far and hand out only what was not handed out
before. The text must never be taken back, so what might still change waits:

- a trailing U+FFFD: the byte-level tokenizer splits a character such as "é" (2 bytes) or an
  emoji (4 bytes) over several tokens, and until the last byte arrives the decoder shows the
  incomplete bytes as U+FFFD;
- trailing whitespace: the caption is `.strip()`ped, so a space shows only once text follows it
  (and the "\\n" that ends a blip2-opt caption never shows). Leading whitespace never shows.

transformers' streamer also holds back the last word (it cannot know how other tokenizers clean
up spaces); OPT's decoder does no clean-up, so a finished character is final and this streamer
hands it out at once. The pieces joined are exactly `caption`'s text.
"""

import numpy as np

from ..errors import PromptError


# The part of the decoded text that no later token can change, as `caption` will show it.
def stable_text(text):
    text = text.lstrip()
    end = len(text)
    while end and (text[end - 1].isspace() or text[end - 1] == "\ufffd"):
        end -= 1
    return text[:end]


# TextStreamer(tokenizer, skip_prompt=True), with put/end returning the new piece ("" if none)
# and passing it to `on_text` too, so it serves as `generate(..., streamer=...)`'s callback.
class TextStreamer:
    def __init__(self, tokenizer, on_text=None, skip_prompt=True):
        self.tokenizer, self.on_text, self.skip_prompt = tokenizer, on_text, skip_prompt
        self.token_ids, self.sent, self.next_is_prompt = [], 0, True

    def put(self, value):  # the prompt [1, T] first, then each step's new id [1]
        value = np.asarray(value)
        if value.ndim > 1 and value.shape[0] > 1 or value.ndim == 1 and value.size > 1 and not self.next_is_prompt:
            raise PromptError("TextStreamer only supports batch size 1")
        if self.skip_prompt and self.next_is_prompt:
            self.next_is_prompt = False
            return ""
        self.next_is_prompt = False
        self.token_ids.extend(int(i) for i in value.reshape(-1))
        return self._hand_out(stable_text(self.tokenizer.decode(self.token_ids)))

    def end(self):  # everything that is left, then ready for the next generation
        piece = self._hand_out(self.tokenizer.decode(self.token_ids).strip())
        self.token_ids, self.sent, self.next_is_prompt = [], 0, True
        return piece

    def _hand_out(self, text):
        piece = text[self.sent:]
        self.sent = max(self.sent, len(text))
        if piece and self.on_text is not None:
            self.on_text(piece)
        return piece
