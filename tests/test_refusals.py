"""What would fail later is refused up front (issue 22): templates, checkpoints read without loading their weights,
the top-level keys and finite floats, LoRA ranks, the kind and lineage of earlier stages' outputs, and data content.

Each case runs like tests/test_validation.py's: through `run_and_report` (what `python -m pipeline.run` calls), one
line, exit 2, no model loaded, nothing published. docs/reliability.md lists them with their messages."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from dataclasses import fields, is_dataclass, replace
from pathlib import Path

import pytest

from conftest import QA, SFT, tiny_overrides, write_jsonl
from pipeline.core.checkpoints import model_identity, safetensors_header
from pipeline.core.config import SECTIONS, RunConfig, check_ranges
from pipeline.core.content import check_qa_content, check_sft_content
from pipeline.core.data import QAItem
from pipeline.core.lineage import LINEAGE_FILE, check_input, write_lineage
from pipeline.core.outputs import COMPLETE_MARKER, PipelineError
from pipeline.core.prompts import check_format
from test_validation import _compose, _write, assert_refused_up_front, no_model_loading  # noqa: F401 (a fixture)


def _copy(model: Path, tmp: Path, name: str, edit=None) -> Path:
    """A copy of the tiny model, changed by `edit(copy)`."""
    out = tmp / name
    shutil.copytree(model, out)
    if edit:
        edit(out)
    return out


def _edit_config(**changes):
    def edit(d: Path):
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, **changes}))
    return edit


def _truncate(d: Path, by: int = 100):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-by])


def _retrained(d: Path):
    """The same architecture with other weights: one byte of the first tensor's data flipped."""
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    at = 8 + int.from_bytes(data[:8], "little") + 3
    data[at] ^= 0xFF
    f.write_bytes(bytes(data))


def _more_tokens(d: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    tok.add_tokens(["<新語1>", "<新語2>"])
    tok.save_pretrained(d)


def _output(d: Path, kind: str, base: Path, parent: Path | None = None, stats: str | None = None) -> Path:
    """A completed stage output as a stage writes it: only what the kind and lineage checks read."""
    d.mkdir(parents=True)
    (d / COMPLETE_MARKER).write_text("ok\n")
    if stats:  # an output from before lineage.json: its stage's stats file only
        (d / stats).write_text("{}")
    else:
        write_lineage(d, kind, base, parent=parent)
    return d


def cases(tmp: Path, model: Path) -> dict:
    """name -> (overrides, the one line's pattern)."""
    rows = json.loads((model / "config.json").read_text())["vocab_size"]
    raising = _write(tmp / "raising.jinja", "{{ raise_exception('roles must alternate user/assistant') }}")
    cpt_qa = write_jsonl(tmp / "cpt_qa.jsonl", [{"id": "c1", "question": "炉-3は?", "answer": "1150度"}])
    other_base = _copy(model, tmp, "other_base", _retrained)
    adapter = _output(tmp / "cpt_adapter", "cpt_adapter", model)
    cpt_model = _output(tmp / "cpt_model", "cpt_model", model, parent=adapter)
    cpt_model_b = _output(tmp / "cpt_model_b", "cpt_model", model, parent=adapter)
    return {
        # templates: format strings and chat templates
        "prompt_template with another field": ({"model.prompt_template": "'Q: {question} A:'"},
                                               r"^model\.prompt_template='Q: \{question\} A:': unknown field "
                                               r"\{question\}; it may use \{prompt\}"),
        "prompt_template without its field": ({"model.prompt_template": "'Q: A:'"},
                                              r"^model\.prompt_template='Q: A:': has no \{prompt\}, so the question "
                                              r"would never reach the model"),
        "completion_prompt with another field": ({"eval.completion_prompt": "'Q: {q}'"},
                                                 r"^eval\.completion_prompt='Q: \{q\}': unknown field \{q\}"),
        "unbalanced brace": ({"model.prompt_template": "'Q: {prompt'"},
                             r"^model\.prompt_template='Q: \{prompt': not a valid format string"),
        "judge_prompt without the answer": ({"eval.judge_path": model, "eval.judge_prompt": "'{question} {gold}'"},
                                            r"^eval\.judge_prompt='\{question\} \{gold\}': has no \{answer\}, so the answer "
                                            r"would never reach the model"),
        "qa_template without the answer": ({"cpt.qa_mix": 0.5, "data.cpt_qa.path": cpt_qa,
                                            "cpt.qa_template": "'Q: {question}'"},
                                           r"^cpt\.qa_template='Q: \{question\}': has no \{answer\}"),
        "chat template not Jinja": ({"model.chat_template": "'{% for m in messages %}{{ m.content }'"},
                                    r"^model\.chat_template: does not render a sample user/assistant conversation "
                                    r"\(TemplateSyntaxError line 1: "),
        "chat template that raises": ({"model.chat_template": raising},
                                      r"^model\.chat_template: does not render a sample .*roles must alternate"),
        # the fixture's SFT prompts are 23, 27 and 60 tokens long: at 27 the last two keep no answer token
        "prompts that fill sft.max_length": ({"sft.max_length": 27},
                                             r"^sft\.max_length=27: 2 of 3 SFT records would lose their whole answer "
                                             r"\(prompt of 27 tokens or more; the longest, 60 tokens, at "
                                             r".*sft\.jsonl:3\)"),
        # checkpoints, read without loading the weights
        "truncated weights": ({"model.path": _copy(model, tmp, "truncated", _truncate)},
                              r"^model\.path=.*truncated: model\.safetensors is \d+ bytes but its header describes "
                              r"\d+: the file is truncated"),
        "weights that are not safetensors": ({"model.path": _copy(model, tmp, "garbage", lambda d: (
            d / "model.safetensors").write_bytes(b"\xff" * 64))},
            r"^model\.path=.*garbage: model\.safetensors is truncated or not a safetensors file"),
        "config.json of another size": ({"model.path": _copy(model, tmp, "resized", _edit_config(
            vocab_size=rows + 8))}, rf"^model\.path=.*resized: tensor lm_head\.weight in model\.safetensors "
                                     rf"has shape \({rows}, 32\) but config\.json describes \({rows + 8}, 32\)"),
        "tokenizer files missing": ({"model.path": _copy(model, tmp, "no_tok", lambda d: (d / "tokenizer.json").unlink())},
                                    r"^model\.path=.*no_tok: the tokenizer does not load from its files"),
        "tokenizer corrupt": ({"model.path": _copy(model, tmp, "bad_tok", lambda d: (d / "tokenizer.json").write_text(
            "{not json"))}, r"^model\.path=.*bad_tok: the tokenizer does not load from its files .*JSONDecodeError"),
        "tokenizer beyond the embedding": ({"model.path": _copy(model, tmp, "more_tok", _more_tokens)},
                                           rf"^model\.path=.*more_tok: the tokenizer has {rows + 2} tokens but the "
                                           rf"model has only {rows} embedding rows"),
        "unknown model_type": ({"model.path": _copy(model, tmp, "future", _edit_config(model_type="llama9"))},
                               r"^model\.path=.*future: model_type 'llama9' is unknown to the installed transformers"),
        "custom code": ({"model.path": _copy(model, tmp, "custom", _edit_config(
            auto_map={"AutoModelForCausalLM": "modeling_x.XForCausalLM"}))},
            r"^model\.path=.*custom: config\.json's auto_map asks to run code shipped with the checkpoint; set "
            r"model\.trust_remote_code=true only if you trust that code"),
        "truncated judge": ({"eval.judge_path": tmp / "truncated"},
                            r"^eval\.judge_path=.*truncated: model\.safetensors is \d+ bytes"),
        "truncated instruct model": ({"stages": "[cpt,merge,chat_vector,eval]", "model.instruct_path": tmp / "truncated"},
                                     r"^model\.instruct_path=.*truncated: model\.safetensors is \d+ bytes"),
        # top-level keys, finite floats, ranks
        "negative seed": ({"seed": -1}, r"^seed=-1: must be >= 0"),
        "seed not a number": ({"seed": "abc"}, r"^config key seed: Value 'abc' of type 'str' could not be converted"),
        "unknown device": ({"device": "tpu"}, r"^device='tpu': use auto, cpu, cuda or cuda:N"),
        "unknown backend": ({"backend": "tf"}, r"^backend='tf': use one of auto, hf, unsloth"),
        "infinite epochs": ({"cpt.num_epochs": "inf"}, r"^cpt\.num_epochs=inf: must be a finite number"),
        # the tiny model's targets: q/o 32x32, k/v 32->16, gate/up 32->64, down 64->32: no module uses rank 33
        "rank above every target": ({"sft.r": 33}, r"^sft\.r=33: larger than every LoRA target can use \(min\(in, "
                                                   r"out\) is at most 32: down_proj 32, gate_proj 32, k_proj 16"),
        # earlier stages' outputs: kind and lineage
        "CPT adapter as CPT model": ({"stages": "[sft,eval]", "inputs.cpt_model": adapter},
                                     r"^inputs\.cpt_model=.*cpt_adapter: holds kind=cpt_adapter; inputs\.cpt_model "
                                     r"needs kind=cpt_model"),
        "CPT adapter as SFT adapter": ({"stages": "[eval]", "inputs.cpt_model": cpt_model, "inputs.sft_adapter": adapter},
                                       r"^inputs\.sft_adapter=.*cpt_adapter: holds kind=cpt_adapter; "
                                       r"inputs\.sft_adapter needs kind=sft_adapter"),
        "old CPT adapter as CPT model": ({"stages": "[sft,eval]", "inputs.cpt_model": _output(
            tmp / "old_adapter", "", model, stats="cpt_stats.json")},
            r"^inputs\.cpt_model=.*old_adapter: holds kind=cpt_adapter"),
        "CPT model of another base": ({"stages": "[sft,eval]", "inputs.cpt_model": _output(
            tmp / "foreign", "cpt_model", other_base)},
            r"^inputs\.cpt_model=.*foreign: built on the base model .*other_base, not on model\.path=.*model "
            r"\(other weights\)"),
        "SFT adapter of another CPT model": ({"stages": "[eval]", "inputs.cpt_model": cpt_model,
                                              "inputs.sft_adapter": _output(tmp / "sft_b", "sft_adapter", model,
                                                                            parent=cpt_model_b)},
                                             r"^inputs\.sft_adapter=.*sft_b: trained on another cpt_model \(\w+\), not "
                                             r"on .*cpt_model \(\w+\)"),
        # data content
        "SFT empty answer": ({"data.sft.path": write_jsonl(tmp / "empty.jsonl", [SFT[1], {"prompt": "q", "completion": " "}])},
                             r"empty\.jsonl:2: the answer \(last assistant message\) is empty"),
        "SFT lone surrogate": ({"data.sft.path": _write(tmp / "sur.jsonl", '{"prompt": "a\\ud800", "completion": "b"}\n')},
                               r"sur\.jsonl:1: a lone surrogate '\\ud800' at character 1"),
        "QA lone surrogate": ({"data.qa.path": _write(tmp / "qsur.jsonl", json.dumps(QA[0]) + "\n" +
                                                       '{"id": "q2", "question": "炉-3は?", "answer": "1150\\udc80度"}\n')},
            r"qsur\.jsonl:2: a lone surrogate '\\udc80' at character 4"),
        "CPT lone surrogate": ({"data.cpt.path": _write(tmp / "csur.jsonl", '{"text": "\\ud83d P-101"}\n')},
                               r"csur\.jsonl:1: a lone surrogate '\\ud83d' at character 0"),
        "QA answer of punctuation only": ({"data.qa.path": write_jsonl(tmp / "punct.jsonl", [{**QA[0], "answer": "。」"}])},
                                          r"punct\.jsonl:1: the answer '。」' normalises to nothing"),
        "dev-set answer of punctuation only": ({"sft.early_stopping_patience": 1, "data.dev_qa.path": write_jsonl(
            tmp / "dev.jsonl", [{"id": "d1", "question": "P-101は?", "answer": "…"}])},
            r"dev\.jsonl:1: the answer '…' normalises to nothing"),
        "QA question asked twice": ({"data.qa.path": write_jsonl(tmp / "twice.jsonl", [
            QA[0], {**QA[0], "id": "q9", "question": "P-101の定格能力は何トンですか?", "answer": "990トン"}])},
            r"twice\.jsonl:2: the question of .*twice\.jsonl:1 again, with another answer \('990トン' vs '880トン'\)"),
    }


CASE_NAMES = [
    "prompt_template with another field", "prompt_template without its field", "completion_prompt with another field",
    "unbalanced brace", "judge_prompt without the answer", "qa_template without the answer", "chat template not Jinja",
    "chat template that raises", "prompts that fill sft.max_length", "truncated weights",
    "weights that are not safetensors", "config.json of another size", "tokenizer files missing", "tokenizer corrupt",
    "tokenizer beyond the embedding", "unknown model_type", "custom code", "truncated judge",
    "truncated instruct model", "negative seed", "seed not a number", "unknown device", "unknown backend",
    "infinite epochs", "rank above every target", "CPT adapter as CPT model", "CPT adapter as SFT adapter",
    "old CPT adapter as CPT model", "CPT model of another base", "SFT adapter of another CPT model",
    "SFT empty answer", "SFT lone surrogate", "QA lone surrogate", "CPT lone surrogate",
    "QA answer of punctuation only", "dev-set answer of punctuation only", "QA question asked twice",
]


@pytest.fixture(scope="module")
def case_table(tiny_model, tmp_path_factory):
    """Built once: copying and editing the model takes longer than refusing it."""
    tmp = tmp_path_factory.mktemp("refusals")
    return tmp, cases(tmp, tiny_model)


def test_the_case_list_is_complete(case_table):
    assert sorted(CASE_NAMES) == sorted(case_table[1])


@pytest.mark.parametrize("case", CASE_NAMES)
def test_refused_up_front(case, case_table, tiny_model, data_files, tmp_path, capsys, no_model_loading):
    assert_refused_up_front(*case_table[1][case], tiny_model, data_files, tmp_path, capsys)


# --- the rules behind the cases, one by one --------------------------------------------------------------------

def _float_keys(obj, prefix):
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            yield from _float_keys(value, f"{prefix}.{f.name}")
        elif isinstance(value, float):
            yield obj, f.name, f"{prefix}.{f.name}"


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_every_float_key_must_be_finite(bad):
    """Generated from the schema: each float key of each section, set to inf/-inf/nan, is refused by name."""
    names = []
    for section, schema in SECTIONS.items():
        default = schema()
        for obj, name, full in list(_float_keys(default, section)):
            changed = replace(obj, **{name: bad})
            if obj is not default:  # a nested section (model.demo): the changed copy goes into its parent
                changed = replace(default, **{full.split(".")[1]: changed})
            with pytest.raises(PipelineError, match=rf"^{re.escape(full)}=(-?inf|nan): must be a finite number"):
                check_ranges(changed, section)
            names.append(full)
    assert {"cpt.num_epochs", "sft.kl_weight", "eval.min_gain", "merge.max_abs_logit_diff",
            "model.demo.num_epochs"} <= set(names)


@pytest.mark.parametrize("key, value, message", [
    ("seed", 2**32, r"^seed=4294967296: must be <= 4294967295"),
    ("device", "cuda:", r"^device='cuda:': use auto, cpu, cuda or cuda:N"),
    ("device", "CPU", r"^device='CPU': use auto"),
])
def test_top_level_keys_have_ranges(key, value, message):
    with pytest.raises(PipelineError, match=message):
        check_ranges(replace(RunConfig(), **{key: value}), "")


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_every_device_the_readme_names_is_accepted(device):
    check_ranges(replace(RunConfig(), device=device), "")


@pytest.mark.parametrize("template, key", [
    ("質問: {prompt}\n回答:\n", "model.prompt_template"),
    ("{{json}} {prompt}", "model.prompt_template"),  # a literal brace, doubled
    ("質問: {question}\n正解: {gold}\n回答: {answer}", "eval.judge_prompt"),
    ("正解: {gold}\n回答: {answer}", "eval.judge_prompt"),  # the question is optional for a judge
    ("質問: {question}\n答え: {answer}", "cpt.qa_template"),
])
def test_valid_format_strings_pass(template, key):
    check_format(template, key)


@pytest.mark.parametrize("template, message", [
    ("Q: {prompt!z}", r"not a valid format string \(Unknown conversion specifier z\)"),
    ("Q: {prompt:d}", r"not a valid format string \(Unknown format code 'd' for object of type 'str'\)"),
    ("Q: {0}", r"unknown field \{0\}; it may use \{prompt\}"),
    ("Q: {}", r"unknown field \{\}"),
])
def test_format_strings_that_would_fail_when_formatted(template, message):
    with pytest.raises(PipelineError, match=message):
        check_format(template, "model.prompt_template")


def test_safetensors_size_must_match_the_header(tiny_model, tmp_path):
    f = tmp_path / "model.safetensors"
    data = (tiny_model / "model.safetensors").read_bytes()
    f.write_bytes(data)
    assert len(safetensors_header(f, "k")) > 0
    f.write_bytes(data[:-1])  # one byte short
    with pytest.raises(PipelineError, match=rf"^k: model\.safetensors is {len(data) - 1} bytes but its header "
                                            rf"describes {len(data)}: the file is truncated"):
        safetensors_header(f, "k")
    f.write_bytes(data + b"\0")
    with pytest.raises(PipelineError, match=r"padded or corrupt"):
        safetensors_header(f, "k")


def test_rank_above_only_some_targets_is_a_warning(tiny_model, data_files, tmp_path, caplog, no_model_loading):
    """r=20: above k/v's 16, below q/o/MLP's 32: the adapter is still what was asked for elsewhere (logged)."""
    cfg = _compose(tiny_overrides(tiny_model, data_files, **{"cache.dir": tmp_path / "c", "sft.r": 20,
                                                              "stages": "[cpt,merge,sft]", "cpt.max_steps": 1}))
    from pipeline.run import validate

    with caplog.at_level(logging.WARNING):
        validate(cfg, ["cpt", "merge", "sft"])
    warned = [r.getMessage() for r in caplog.records if ".r=" in r.getMessage()]
    assert warned == ["sft.r=20 is above min(in, out) of k_proj (16), v_proj (16): there it adds parameters but "
                      "no capacity"]


def test_model_identity_follows_the_weights_not_the_path(tiny_model, tmp_path):
    copy = _copy(tiny_model, tmp_path, "copy")
    changed = _copy(tiny_model, tmp_path, "changed", _retrained)
    assert model_identity(copy) == model_identity(tiny_model) != model_identity(changed)


def test_an_output_from_before_lineage_is_accepted_with_a_warning(tiny_model, tmp_path, caplog):
    """Refusing it would throw away cached CPT runs; its kind is still read off its stats file."""
    old = _output(tmp_path / "old", "", tiny_model, stats="merge_check.json")
    with caplog.at_level(logging.WARNING):
        assert check_input(old, "cpt_model", "cpt_model", tiny_model) is None
    assert any("no lineage.json" in r.getMessage() for r in caplog.records)
    new = _output(tmp_path / "new", "cpt_model", tiny_model)
    record = json.loads((new / LINEAGE_FILE).read_text())
    assert check_input(new, "cpt_model", "cpt_model", tiny_model) == record
    assert record["base"] == {"path": str(tiny_model.resolve()), "identity": model_identity(tiny_model)}


def test_qa_content_rules():
    """A question asked again with the first one's alias as its answer, or with the answer in other units (880t is
    880トン once normalised): accepted. "%" is the one punctuation character the scorer keeps: accepted."""
    ok = [QAItem("a", "P-101の担当者は?", "佐藤健一", ["佐藤さん"], where="f:1"),
          QAItem("b", "P-101の担当者は？", "佐藤さん", where="f:2"),
          QAItem("c", "P-101は何トン?", "880トン", where="f:3"), QAItem("d", "P-101は何トン", "880t", where="f:4"),
          QAItem("e", "記号は?", "%", where="f:5")]
    check_qa_content(ok, "data.qa.path")


def test_sft_prompt_asked_twice_is_logged_not_refused(caplog):
    records = [{"where": f"s:{i}", "messages": [{"role": "user", "content": "こんにちは"},
                                                {"role": "assistant", "content": a}]}
               for i, a in enumerate(["こんにちは！", "はい、こんにちは。"], start=1)]
    with caplog.at_level(logging.WARNING):
        check_sft_content(records)
    assert [r.getMessage() for r in caplog.records] == [
        "SFT data: 2 records share their prompt with a record that answers differently (e.g. s:1, s:2); kept, as "
        "chat data may answer one prompt in several ways"]


def _word_tokenizer():
    """A tokenizer with an unknown token (the fixture's byte-level BPE has none): words it knows, [UNK] otherwise."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.WordLevel({"[UNK]": 0, "880": 1, "トン": 2}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="[UNK]")


def test_text_the_tokenizer_cannot_write_is_logged(caplog):
    from pipeline.core.content import check_tokenizable

    with caplog.at_level(logging.WARNING):
        check_tokenizable([("qa:1", "880 トン"), ("qa:2", "880 ㌧"), ("qa:3", "880")], _word_tokenizer(), "data.qa.path")
    assert [r.getMessage() for r in caplog.records] == [
        "data.qa.path: 1 texts hold characters the tokenizer maps to [UNK] (e.g. qa:2): the model can never write them"]


def test_text_the_tokenizer_raises_on_is_refused_with_its_line():
    from pipeline.core.content import check_tokenizable

    class Raising:
        unk_token_id = None

        def __call__(self, text, **kw):
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")

    with pytest.raises(PipelineError, match=r"^qa\.jsonl:7: the tokenizer cannot encode this text \(TypeError: "):
        check_tokenizable([("qa.jsonl:7", "x")], Raising(), "data.qa.path")
