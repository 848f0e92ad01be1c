"""What TRL hands the chat template besides the messages: ``chat_template_kwargs`` per data set and a row's
``tools``. Checked against the template rendered by hand with the same arguments."""

import json

import pytest

from dpo_lightning.data.datamodule import PreferenceDataModule, tokenize_rows
from dpo_lightning.data.formats import PreferenceDataError, normalize_row
from dpo_lightning.data.tokenize import tokenize_pair
from dpo_lightning.model.loading import load_tokenizer

from conftest import CHAT_TEMPLATE, write_jsonl

# CHAT_TEMPLATE with a system-level tools line and a switch, as thinking models' templates have
TEMPLATE = ("{% if enable_thinking is defined and not enable_thinking %}no\n{% endif %}"
            "{% if tools %}<|im_start|>system\ntools {{ tools | map(attribute='name') | join(' ') }}<|im_end|>\n"
            "{% endif %}" + CHAT_TEMPLATE)
TOOLS = [{"name": "sky", "description": "the sky's color", "parameters": {"type": "object", "properties": {}}}]
ROW = {"prompt": [{"role": "user", "content": "what color is the sky ?"}],
       "chosen": [{"role": "assistant", "content": "the sky is blue ."}],
       "rejected": [{"role": "assistant", "content": "the sky is green ."}]}


@pytest.fixture
def tok(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def _ids(tok, messages, **kwargs):
    return tok(tok.apply_chat_template(messages, tokenize=False, **kwargs), add_special_tokens=False)["input_ids"]


def test_chat_template_kwargs_and_tools_reach_the_template(tok):
    pair = normalize_row({**ROW, "tools": TOOLS}, "f line 1")
    plain = tokenize_pair(normalize_row(ROW, "f line 1"), tok)
    out = tokenize_pair(pair, tok, chat_template_kwargs={"enable_thinking": False})
    assert out.prompt_ids == _ids(tok, ROW["prompt"], tools=TOOLS, add_generation_prompt=True, enable_thinking=False)
    full = _ids(tok, ROW["prompt"] + ROW["chosen"], tools=TOOLS, enable_thinking=False)
    assert out.prompt_ids + out.chosen_ids == full
    assert len(out.prompt_ids) > len(plain.prompt_ids)  # the tools line and the switch's token are in the prompt
    assert out.chosen_ids == plain.chosen_ids and out.rejected_ids == plain.rejected_ids


def test_tools_as_json_text_and_bad_tools_name_the_row():
    assert normalize_row({**ROW, "tools": json.dumps(TOOLS)}, "f row 2").tools == TOOLS
    assert normalize_row({**ROW, "tools": None}, "f row 2").tools is None
    for bad, fragment in (("{not json", "not valid JSON"), ({"name": "sky"}, "expected a list of tool schemas")):
        with pytest.raises(PreferenceDataError, match=f"f row 2: field 'tools': {fragment}"):
            normalize_row({**ROW, "tools": bad}, "f row 2")
    with pytest.raises(PreferenceDataError, match="tools need conversational rows"):
        normalize_row({"prompt": "a", "chosen": "b", "rejected": "c", "tools": TOOLS}, "f row 3")


def test_the_data_module_passes_its_kwargs_and_keys_its_cache_by_them(tmp_path, tiny_model_dir, tok):
    path = write_jsonl(tmp_path / "tools.jsonl", [{**ROW, "tools": TOOLS}])
    tok.save_pretrained(tmp_path / "model")
    expected, _ = tokenize_rows(path, "train", tok, 128, 64, chat_template_kwargs={"enable_thinking": False})
    caches = []
    for kwargs in ({"enable_thinking": False}, None):
        dm = PreferenceDataModule(train_path=path, tokenizer_name_or_path=str(tmp_path / "model"), batch_size=1,
                                  cache_dir=str(tmp_path / "cache"), chat_template_kwargs=kwargs)
        dm.setup("fit")
        caches.append(dm.written[-1])
        if kwargs:
            assert dm.train_pairs == expected
        else:
            assert dm.train_pairs[0]["prompt_ids"] != expected[0]["prompt_ids"]
    assert caches[0] != caches[1]


# CHAT_TEMPLATE that also writes an assistant turn's tool calls, as tool-calling models' templates do
CALLS_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                  "{% for c in m.get('tool_calls') or [] %}the {{ c['function']['name'] }}{% endfor %}"
                  "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_message_keys_besides_role_and_content_reach_the_template(tok):
    tok.chat_template = CALLS_TEMPLATE
    call = {"type": "function", "function": {"name": "sky", "arguments": {}}}
    row = {**ROW, "tools": TOOLS, "chosen": [{"role": "assistant", "content": None, "tool_calls": [call]}]}
    pair = normalize_row(row, "f line 1")
    assert pair.chosen == [{"role": "assistant", "content": "", "tool_calls": [call]}]  # nothing dropped
    out = tokenize_pair(pair, tok)
    assert tok.decode(out.chosen_ids).strip().startswith("the sky")  # the call, rendered
    assert out.prompt_ids + out.chosen_ids == _ids(tok, ROW["prompt"] + pair.chosen, tools=TOOLS)
    # the same words, one turn calling the tool: a pair, not an identical one
    said = [{"role": "assistant", "content": "let me look ."}]
    pair = normalize_row({**ROW, "chosen": [{**said[0], "tool_calls": [call]}], "rejected": said}, "f line 2")
    assert pair.chosen != pair.rejected and "tool_calls" in pair.chosen[0]
    for message, fragment in (({"role": "assistant", "content": None}, "must be strings"),
                              ({"role": "assistant"}, r"chosen\[0\]\.content': missing"),
                              ({"role": "assistant", "content": " ", "reasoning_content": ""}, "empty completion"),
                              ({"role": "gpt", "content": "hi ."}, "starts with a 'gpt' message")):
        with pytest.raises(PreferenceDataError, match=fragment):
            normalize_row({**ROW, "chosen": [message]}, "f line 3")
