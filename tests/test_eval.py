"""Eval building blocks: answer tokenisation, gold log-probability, batched greedy generation, the summary."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.stages.eval import (add_gain_metrics, answer_logprobs, cut_answer, encode_pair, generate, is_repetitive,
                                  summarize, text_nll, transition)


@pytest.fixture(scope="module")
def model_tok(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model).eval(), AutoTokenizer.from_pretrained(tiny_model)


def test_encode_pair_moves_trailing_space_to_the_answer(model_tok):
    _, tok = model_tok
    ctx, ans = encode_pair(tok, "質問: P-101の定格能力は？\n答え: ", "880トン")
    assert ctx == tok("質問: P-101の定格能力は？\n答え:")["input_ids"]
    assert ctx + ans == tok("質問: P-101の定格能力は？\n答え: 880トン")["input_ids"]  # as in one text
    assert tok.decode(ans) == " 880トン"


def test_answer_logprob_equals_a_hand_computed_chain_rule(model_tok):
    model, tok = model_tok
    contexts = ["質問: 炉-3の設定温度は？\n答え: ", "質問: 始業点検は何分？\n答え: "]
    answers = ["1150度", "15分かかる"]  # different lengths: exercises padding in the batch
    got = answer_logprobs(model, tok, contexts, answers, batch_size=2, device=torch.device("cpu"))
    summed = answer_logprobs(model, tok, contexts, answers, batch_size=2, device=torch.device("cpu"), reduce="sum")
    for c, a, lp, lp_sum in zip(contexts, answers, got, summed):
        ctx, ans = encode_pair(tok, c, a)
        total, ids = 0.0, list(ctx)
        with torch.no_grad():
            for t in ans:  # one token at a time, no batching, no padding
                logits = model(torch.tensor([ids])).logits[0, -1]
                total += torch.log_softmax(logits, -1)[t].item()
                ids.append(t)
        assert lp == pytest.approx(total / len(ans), abs=1e-4)
        assert lp_sum == pytest.approx(total, abs=1e-4) and len(ans) > 1  # the sum differs from the mean


def test_answer_logprobs_equal_the_full_vocabulary_computation(model_tok):
    """Normalising only the answer rows gives what log_softmax over every position of the padded batch gives."""
    model, tok = model_tok
    contexts = ["質問: 炉-3の設定温度は？\n答え: ", "P-101", "質問: 始業点検は何分かかりますか？\n答え: "]
    answers = ["1150度", "の定格能力は880トンです。", "15分"]
    got = answer_logprobs(model, tok, contexts, answers, batch_size=3, device=torch.device("cpu"))
    pairs = [encode_pair(tok, c, a) for c, a in zip(contexts, answers)]
    width = max(len(c) + len(a) for c, a in pairs)
    ids = torch.tensor([c + a + [tok.pad_token_id] * (width - len(c) - len(a)) for c, a in pairs])
    mask = torch.tensor([[1] * (len(c) + len(a)) + [0] * (width - len(c) - len(a)) for c, a in pairs])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
    for i, (c, a) in enumerate(pairs):
        want = logp[i, torch.arange(len(c) - 1, len(c) + len(a) - 1), torch.tensor(a)].mean().item()
        assert got[i] == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("text, stop, expected", [
    ("880トン\n質問: 次", "\n", "880トン"),          # the first line
    (" \n\n  880トン\nです", "\n", "880トン"),       # leading blank lines are skipped, not taken for the answer
    ("\n\n", "\n", ""),                            # nothing but blanks: an empty answer
    ("880トン。質問: 次", "質問:", "880トン。"),     # any stop string
    ("  880トン\nです ", None, "880トン\nです"),    # no stop: the whole text, stripped
    ("880ト\ufffd", "\n", "880ト"),                # a multi-byte character cut by max_new_tokens
])
def test_the_answer_cutting_rule(text, stop, expected):
    assert cut_answer(text, stop) == expected


def test_generation_stops_at_the_cut_without_changing_the_answer(model_tok):
    """Base/CPT rows stop generating once the answer is complete; the SFT model generates on (stop_at_cut=False)
    to see whether it emits EOS. Both give the answer cut_answer gives on the full, uncut generation."""
    model, tok = model_tok
    prompts = ["質問: P-101の定格能力は？\n答え: ", "質問: 炉-3は？\n答え: "]
    cpu, eos = torch.device("cpu"), [tok.eos_token_id]
    full = generate(model, tok, prompts, 12, batch_size=2, device=cpu, stop_ids=eos)  # no stop string
    first = full[0][0]  # a random model writes no newlines: stop at the last new character of the first answer
    stop = max((ch for ch in first if ch != "\ufffd"), key=first.index)
    early = generate(model, tok, prompts, 12, batch_size=2, device=cpu, stop_ids=eos, stop_string=stop)
    late = generate(model, tok, prompts, 12, batch_size=2, device=cpu, stop_ids=eos, stop_string=stop,
                    stop_at_cut=False)
    assert [a for a, _ in early] == [a for a, _ in late] == [cut_answer(a, stop) for a, _ in full]
    assert early[0][0] and len(early[0][0]) < len(first)  # cut before the stop character


def test_a_row_stops_at_the_stop_string_only_after_answer_text(model_tok):
    """A leading newline is not the end of the answer: the row generates on until text and then the newline."""
    from pipeline.stages.eval import _stop_at_cut

    _, tok = model_tok
    prompt = tok(["答え:"], return_tensors="pt")["input_ids"]
    criterion = _stop_at_cut(tok, prompt.shape[1], "\n")

    def done(generated):
        ids = torch.cat([prompt, torch.tensor([tok(generated, add_special_tokens=False)["input_ids"]])], 1)
        return criterion(ids, None).tolist()

    assert done("\n") == [False] and done("\n880") == [False] and done("\n880\n") == [True]


def test_batched_generation_equals_one_at_a_time(model_tok):
    model, tok = model_tok
    prompts = ["質問: P-101の定格能力は？\n答え: ", "質問: 炉-3は？\n答え: ", "日本の首都は"]
    eos = [tok.eos_token_id]
    batched = generate(model, tok, prompts, 8, batch_size=3, device=torch.device("cpu"), stop_ids=eos)
    single = [generate(model, tok, [p], 8, batch_size=1, device=torch.device("cpu"), stop_ids=eos)[0]
              for p in prompts]
    assert batched == single


def rows(contains, logprob, char_f1=None, **extra):
    """Per-question eval rows; exact_match is 0 throughout."""
    char_f1 = char_f1 or [0.0] * len(contains)
    return [{"answer": "ab", "exact_match": 0.0, "contains": c, "char_f1": f, "logprob": lp, **extra}
            for c, lp, f in zip(contains, logprob, char_f1)]


def test_gain_kept_by_hand():
    """4 questions: the base model knows 1, CPT 3, SFT 2; gain_kept = (2 - 1) / (3 - 1) = 0.5."""
    m = summarize({
        "base": rows([1, 0, 0, 0], [-6, -6, -6, -6], char_f1=[0.10, 0.10, 0.10, 0.10]),
        "cpt": rows([1, 1, 1, 0], [-2, -2, -2, -2], char_f1=[0.11, 0.11, 0.11, 0.11]),
        "sft": rows([1, 1, 0, 0], [-3, -3, -3, -3], char_f1=[0.30, 0.30, 0.30, 0.30],
                    ended_with_eos=True, repetitive=False, in_format=True),
    }, headline="contains")
    assert m["cpt/contains"] == 0.75 and m["sft/contains"] == 0.5
    assert m["knowledge_gain"] == m["cpt_gain/contains"] == 0.5     # 0.75 - 0.25
    assert m["gain_kept/contains"] == 0.5                            # (0.5 - 0.25) / (0.75 - 0.25)
    assert m["gain_kept_reason/contains"] is None
    assert m["sft_over_cpt/contains"] == pytest.approx(2 / 3)       # the plain ratio credits what base knew
    assert m["cpt_gain/logprob"] == 4.0                              # -2 - (-6)
    assert m["gain_kept/logprob"] == 0.75                            # (-3 - -6) / (-2 - -6)
    assert "sft_over_cpt/logprob" not in m                           # a ratio of negative numbers means nothing
    # below the thresholds: no ratio, and the reason says which threshold
    assert m["gain_kept/exact_match"] is None
    assert m["gain_kept_reason/exact_match"] == "|CPT - base| = 0 < eval.min_gain 0.02"
    assert m["gain_kept/char_f1"] is None                            # gain 0.01, SFT far above: still no ratio
    assert m["gain_kept_reason/char_f1"] == "|CPT - base| = 0.01 < eval.min_gain 0.02"
    assert m["sft/eos_rate"] == 1.0 and m["base/answer_chars"] == 2.0
    assert m["sft/repetition_rate"] == 0.0 and m["sft/format_rate"] == 1.0
    assert "retention" not in m and "logprob_gain_kept" not in m     # renamed: gain_kept/<metric>
    assert "gain_kept/contains" not in summarize({"base": rows([0], [-1]), "cpt": rows([1], [-1])}, "contains")


def test_gain_kept_thresholds():
    # a logprob gain of 0.05 nats is below eval.min_logprob_gain
    m = summarize({"base": rows([0, 0], [-2.0, -2.0]), "cpt": rows([1, 1], [-1.95, -1.95]),
                   "sft": rows([1, 0], [-1.0, -1.0], ended_with_eos=True, repetitive=False, in_format=True)},
                  "contains", min_gain=0.02, min_logprob_gain=0.1)
    assert m["gain_kept/logprob"] is None and m["gain_kept_reason/logprob"] == \
        "|CPT - base| = 0.05 < eval.min_logprob_gain 0.1"
    assert m["gain_kept/contains"] == 0.5
    # exactly at the threshold counts, although 30/100 - 28/100 is 0.019999999999999962 in floating point
    base, cpt, sft = [1] * 28 + [0] * 72, [1] * 30 + [0] * 70, [1] * 29 + [0] * 71
    m = summarize({"base": rows(base, [-1] * 100), "cpt": rows(cpt, [-1] * 100),
                   "sft": rows(sft, [-1] * 100, ended_with_eos=True, repetitive=False, in_format=True)}, "contains")
    assert m["gain_kept/contains"] == pytest.approx(0.5)
    # a higher threshold, from the config
    m = summarize({"base": rows(base, [-1] * 100), "cpt": rows(cpt, [-1] * 100),
                   "sft": rows(sft, [-1] * 100, ended_with_eos=True, repetitive=False, in_format=True)}, "contains",
                  min_gain=0.05)
    assert m["gain_kept/contains"] is None and "eval.min_gain 0.05" in m["gain_kept_reason/contains"]


def test_gain_kept_of_a_loss():
    """General knowledge: CPT loses 0.8 of it, SFT wins back 0.2; three quarters of the loss remain."""
    m = {"base/general_contains": 0.8, "cpt/general_contains": 0.0, "sft/general_contains": 0.2}
    add_gain_metrics(m, "general_contains", min_gain=0.02, min_logprob_gain=0.1)
    assert m["cpt_gain/general_contains"] == -0.8 and m["gain_kept/general_contains"] == pytest.approx(0.75)


def test_the_judge_compares_whole_words(monkeypatch):
    """はい is likelier per token but less likely as a whole word than いいえ: the whole word decides."""
    from pipeline.stages import eval as ev
    from pipeline.core.config import EvalConfig
    from pipeline.core.data import QAItem

    def fake_logprobs(model, tok, prompts, answers, batch_size, device, reduce="mean"):
        per = {("はい", "mean"): -1.0, ("いいえ", "mean"): -1.5, ("はい", "sum"): -3.0, ("いいえ", "sum"): -2.0}
        return [per[(a, reduce)] for a in answers]

    monkeypatch.setattr(ev, "answer_logprobs", fake_logprobs)
    answer_rows = [{"answer": "880トン"}]
    ev.judge_rows(None, None, [QAItem(id="q1", question="?", answer="880トン")], answer_rows, EvalConfig(), None)
    assert answer_rows[0]["judge"] == 0.0


def test_summary_per_group():
    m = summarize({"cpt": rows([1, 0, 0], [-1.0] * 3)}, "contains", groups=["faq", "text_only", "text_only"])
    assert m["cpt/contains@faq"] == 1.0 and m["cpt/contains@text_only"] == 0.0
    assert m["cpt/contains"] == pytest.approx(1 / 3)


def test_transitions_by_hand():
    assert transition(1, 0, 0) == "known_before"
    assert transition(0, 1, 1) == "learned_kept"
    assert transition(0, 1, 0) == "learned_lost"
    assert transition(0, 0, 0) == "not_learned"
    assert transition(0, 0, 1) == "sft_only"


@pytest.mark.parametrize("text, expected", [("工場工場工場", True), ("ははははは", False), ("880トンです。", False),
                                            ("P-101はP-101はP-101は", True), ("ですですです", True)])
def test_repetition(text, expected):
    # a 2-10 character piece three times in a row; "ははははは" is one character repeated: 2-char "はは" only twice
    assert is_repetitive(text) is expected


def test_text_nll_by_hand(model_tok):
    model, tok = model_tok
    texts = ["炉-3の設定温度は1150度である。", "P-101"]
    total, count = text_nll(model, tok, texts, batch_size=2, device=torch.device("cpu"))
    want, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t)["input_ids"]
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
            want -= sum(logp[i, ids[i + 1]].item() for i in range(len(ids) - 1))
            n += len(ids) - 1
    assert count == n and total == pytest.approx(want, rel=1e-4)


def test_heldout_jsonl_is_read_from_its_text_field(tiny_model, tmp_path):
    """data.heldout.text_field names the field of held-out .jsonl lines, as data.cpt.text_field does for CPT."""
    import json
    import math

    from conftest import QA, write_jsonl
    from pipeline.core.outputs import PipelineError
    from pipeline.core.config import EvalConfig, ModelConfig
    from pipeline.stages.eval import evaluate

    bodies = ["炉-3の設定温度は1150度である。", "P-101の定格能力は880トンです。"]
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"body": b} for b in bodies])
    qa = write_jsonl(tmp_path / "qa.jsonl", QA[:1])
    cfg, model_cfg = EvalConfig(models=["base"], max_new_tokens=2), ModelConfig(path=str(tiny_model))
    out = evaluate(cfg, model_cfg, str(qa), {"base": (str(tiny_model), None)}, tmp_path / "eval", "cpu",
                   heldout_path=str(heldout), heldout_text_field="body")
    got = json.loads((out / "eval_metrics.json").read_text())["base/heldout_ppl"]
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    nll, n = text_nll(model, AutoTokenizer.from_pretrained(tiny_model), bodies, 2, torch.device("cpu"))
    assert got == pytest.approx(math.exp(nll / n), rel=1e-5)
    with pytest.raises(PipelineError, match="missing string field 'text'"):  # the field is not guessed
        evaluate(cfg, model_cfg, str(qa), {"base": (str(tiny_model), None)}, tmp_path / "eval2", "cpu",
                 heldout_path=str(heldout))


@pytest.fixture
def sft_adapter(tiny_model, tmp_path):
    """A LoRA adapter on the tiny model, saved with its tokenizer as the SFT stage saves it."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "adapter")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


@pytest.mark.parametrize("recorded", [True, False])
def test_the_sft_model_is_asked_as_it_was_trained(tiny_model, sft_adapter, tmp_path, monkeypatch, caplog, recorded):
    """The prompt format recorded next to the adapter wins over the current config; without the record (an older
    adapter) the current config is used, with a warning."""
    from conftest import QA, write_jsonl
    from pipeline.stages import eval as ev
    from pipeline.core.config import EvalConfig, ModelConfig
    from pipeline.core.prompts import PROMPT_FORMAT_FILE

    if recorded:  # SFT ran with the prompt template (no chat template), although the tokenizer now has one
        (sft_adapter / PROMPT_FORMAT_FILE).write_text('{"chat_template": null, "prompt_template": "Q: {prompt}\\nA:"}')
    asked = []

    def fake_generate(model, tok, prompts, *args, **kwargs):
        asked.extend(prompts)
        return [("", True)] * len(prompts)

    monkeypatch.setattr(ev, "generate", fake_generate)
    qa = write_jsonl(tmp_path / "qa.jsonl", QA[:1])
    ev.evaluate(EvalConfig(models=["sft"]), ModelConfig(path=str(tiny_model), prompt_template="config {prompt}"),
                str(qa), {"sft": (str(tiny_model), str(sft_adapter))}, tmp_path / "eval", "cpu")
    question = QA[0]["question"]
    if recorded:
        assert asked == [f"Q: {question}\nA:"]
        assert "prompt_format.json" not in caplog.text
    else:  # the adapter's tokenizer and its chat template (the demo's 質問/答え format), as configured now
        assert asked == [f"質問: {question}\n答え:"]
        assert "no prompt_format.json" in caplog.text
