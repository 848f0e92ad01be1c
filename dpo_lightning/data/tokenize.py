"""Turning a :class:`PreferencePair` into token ids: ``prompt_ids``, ``chosen_ids``, ``rejected_ids``.

Templating follows TRL's ``DPOTrainer`` so that both train on the same tokens:

* conversational pairs go through the tokenizer's chat template: the prompt with the generation prompt, and
  prompt + response as a whole conversation (the end-of-turn tokens belong to the completion);
* standard pairs are plain text; ``eos_token`` is appended to each response unless already there;
* a response marked unfinished (``chosen_unfinished``/``rejected_unfinished``: cut off by a length budget) gets
  no end of turn: no ``eos_token``, and in a conversation nothing the template renders after its text;
* prompt + response is tokenized as one string, and the completion starts where its ids leave the tokenized
  prompt (``common prefix``), so tokens that merge across the boundary are handled the same way TRL does.

Truncation policy (every truncated or dropped pair is counted by the caller):

1. a prompt longer than ``max_prompt_length`` keeps its *last* ``max_prompt_length`` tokens (the part next to
   the answer);
2. a response that does not fit in ``max_length`` after the prompt keeps its *first* tokens;
3. a pair whose prompt alone leaves no room for a response token is dropped.

A row whose template does not split prompt and completion (the prompt's tokens are not a prefix of prompt +
response, beyond one token merged across the boundary, or the response renders to nothing) is a bad row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from jinja2.exceptions import TemplateError  # chat templates are jinja2 (a torch dependency)
from transformers import PreTrainedTokenizerBase

from .formats import PreferenceDataError, PreferencePair, common_prefix_length

# A prompt's last token may merge with the response's first (``"Answer: "`` + ``"Yes"``); the response then starts
# one token earlier, the merged token counting as response (counted as a note). A longer disagreement means the
# template renders the prompt differently inside the conversation, and is a bad row.
MAX_BOUNDARY_MERGE = 1


@dataclass
class TokenizedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_truncated: bool = False
    completion_truncated: bool = False
    boundary_mismatch: bool = False  # the template renders the prompt differently inside the conversation


def render(pair: PreferencePair, tokenizer: PreTrainedTokenizerBase,
           chat_template_kwargs: Optional[dict[str, Any]] = None) -> tuple[list[str], bool]:
    """The texts of the prompt, prompt+chosen and prompt+rejected, and whether the tokenizer adds its special
    tokens to them (plain text: yes, as TRL; a rendered chat template has them already)."""
    if pair.conversational:
        if tokenizer.chat_template is None:
            raise PreferenceDataError(f"{pair.where}: conversational data needs a tokenizer with a chat template, "
                                      f"and {tokenizer.name_or_path!r} has none")

        def text(messages: list[dict[str, str]], field: str, generation_prompt: bool = False,
                 unfinished: bool = False) -> str:
            try:
                out = tokenizer.apply_chat_template(messages, tools=pair.tools, tokenize=False,
                                                    add_generation_prompt=generation_prompt,
                                                    **(chat_template_kwargs or {}))
            except TemplateError as error:  # the template's own raise, e.g. Gemma's "System role not supported"
                raise PreferenceDataError(f"{pair.where}: field '{field}': the chat template of "
                                          f"{tokenizer.name_or_path!r} refused the conversation: {error}",
                                          "chat template refused the conversation") from error
            return _cut_end_of_turn(out, messages[-1]["content"], pair.where, field, tokenizer) if unfinished else out

        return [text(pair.prompt, "prompt", True),
                text(pair.prompt + pair.chosen, "chosen", unfinished=pair.chosen_unfinished),
                text(pair.prompt + pair.rejected, "rejected", unfinished=pair.rejected_unfinished)], False
    eos = tokenizer.eos_token or ""

    def with_eos(text: str, unfinished: bool) -> str:
        return text if unfinished or text.endswith(eos) else text + eos

    return [pair.prompt, pair.prompt + with_eos(pair.chosen, pair.chosen_unfinished),
            pair.prompt + with_eos(pair.rejected, pair.rejected_unfinished)], True


def _cut_end_of_turn(text: str, content: str, where: str, field: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The rendered conversation ``text`` up to the end of its last message's ``content``: what the template adds
    after the text (end of turn, newline) is left out. Templates that trim messages are matched on the trimmed
    text."""
    for needle in (content, content.strip()):
        end = text.rfind(needle) if needle else -1
        if end >= 0:
            return text[:end + len(needle)]
    raise PreferenceDataError(f"{where}: field '{field}_unfinished': the chat template of "
                              f"{tokenizer.name_or_path!r} does not render the {field} text as written, so its end "
                              f"of turn cannot be told apart", "template does not split prompt and completion")


def tokenize_pair(pair: PreferencePair, tokenizer: PreTrainedTokenizerBase, max_length: Optional[int] = None,
                  max_prompt_length: Optional[int] = None,
                  chat_template_kwargs: Optional[dict[str, Any]] = None) -> Optional[TokenizedPair]:
    """Tokenize one pair under the truncation policy above; ``None`` when the pair has to be dropped.
    ``chat_template_kwargs`` go to every ``apply_chat_template`` call (e.g. ``{"enable_thinking": false}``)."""
    texts, special = render(pair, tokenizer, chat_template_kwargs)
    ids = tokenizer(texts, add_special_tokens=special)["input_ids"]
    return split_pair(pair, *ids, max_length, max_prompt_length)


def split_pair(pair: PreferencePair, prompt_ids: list[int], prompt_chosen_ids: list[int],
               prompt_rejected_ids: list[int], max_length: Optional[int] = None,
               max_prompt_length: Optional[int] = None) -> Optional[TokenizedPair]:
    """The pair's prompt and response ids from the tokenized texts of :func:`render`, truncated by the policy
    above; ``None`` when the pair has to be dropped."""
    prompt_len = min(common_prefix_length(prompt_ids, prompt_chosen_ids),
                     common_prefix_length(prompt_ids, prompt_rejected_ids))
    if len(prompt_ids) - prompt_len > MAX_BOUNDARY_MERGE:
        raise PreferenceDataError(
            f"{pair.where}: field 'prompt': the {'chat template' if pair.conversational else 'tokenizer'} does not "
            f"split prompt and completion: the prompt's {len(prompt_ids)} tokens are not a prefix of prompt + "
            f"response (they agree on {prompt_len}), so the response's tokens cannot be told apart",
            "template does not split prompt and completion")
    out = TokenizedPair(prompt_ids=prompt_ids[:prompt_len], chosen_ids=prompt_chosen_ids[prompt_len:],
                        rejected_ids=prompt_rejected_ids[prompt_len:],
                        boundary_mismatch=prompt_len < len(prompt_ids))
    for field in ("chosen", "rejected"):
        if not getattr(out, f"{field}_ids"):
            raise PreferenceDataError(
                f"{pair.where}: field '{field}': empty completion after tokenization (does the "
                + ("chat template render the assistant turn?)" if pair.conversational
                   else "text survive the tokenizer?)"),
                "template does not split prompt and completion")
    if max_prompt_length is not None and len(out.prompt_ids) > max_prompt_length:
        out.prompt_ids = out.prompt_ids[len(out.prompt_ids) - max_prompt_length:]
        out.prompt_truncated = True
    if max_length is not None:
        room = max_length - len(out.prompt_ids)
        if room <= 0:
            return None
        if len(out.chosen_ids) > room or len(out.rejected_ids) > room:
            out.chosen_ids, out.rejected_ids = out.chosen_ids[:room], out.rejected_ids[:room]
            out.completion_truncated = True
    return out
