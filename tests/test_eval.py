"""Eval building blocks: answer tokenisation, gold log-probability, batched greedy generation, the summary."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.eval import answer_logprobs, encode_pair, generate, is_repetitive, summarize, text_nll, transition


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
    for c, a, lp in zip(contexts, answers, got):
        ctx, ans = encode_pair(tok, c, a)
        total, ids = 0.0, list(ctx)
        with torch.no_grad():
            for t in ans:  # one token at a time, no batching, no padding
                logits = model(torch.tensor([ids])).logits[0, -1]
                total += torch.log_softmax(logits, -1)[t].item()
                ids.append(t)
        assert lp == pytest.approx(total / len(ans), abs=1e-4)


def test_batched_generation_equals_one_at_a_time(model_tok):
    model, tok = model_tok
    prompts = ["質問: P-101の定格能力は？\n答え: ", "質問: 炉-3は？\n答え: ", "日本の首都は"]
    eos = [tok.eos_token_id]
    batched = generate(model, tok, prompts, 8, batch_size=3, device=torch.device("cpu"), stop_ids=eos)
    single = [generate(model, tok, [p], 8, batch_size=1, device=torch.device("cpu"), stop_ids=eos)[0]
              for p in prompts]
    assert batched == single


def test_summary_gain_and_retention_by_hand():
    def rows(contains, logprob, **extra):
        return [{"answer": "ab", "exact_match": 0.0, "contains": c, "char_f1": 0.0, "logprob": lp, **extra}
                for c, lp in zip(contains, logprob)]

    m = summarize({
        "base": rows([0, 0, 0, 0], [-6, -6, -6, -6]),
        "cpt": rows([1, 1, 0, 0], [-2, -2, -2, -2]),
        "sft": rows([1, 0, 0, 0], [-3, -3, -3, -3], ended_with_eos=True, repetitive=False, in_format=True),
    }, headline="contains")
    assert m["cpt/contains"] == 0.5 and m["sft/contains"] == 0.25
    assert m["knowledge_gain"] == 0.5           # 0.5 - 0.0
    assert m["retention"] == 0.5                # 0.25 / 0.5
    assert m["logprob_gain"] == 4.0             # -2 - (-6)
    assert m["logprob_gain_kept"] == 0.75       # (-3 - -6) / (-2 - -6)
    assert m["sft/eos_rate"] == 1.0 and m["base/answer_chars"] == 2.0
    assert m["sft/repetition_rate"] == 0.0 and m["sft/format_rate"] == 1.0
    assert summarize({"base": rows([0], [-1]), "cpt": rows([0], [-1])}, "contains")["retention"] is None


def test_summary_per_group():
    rows = [{"answer": "", "exact_match": 0.0, "contains": c, "char_f1": 0.0, "logprob": -1.0} for c in (1, 0, 0)]
    m = summarize({"cpt": rows}, "contains", groups=["faq", "text_only", "text_only"])
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
