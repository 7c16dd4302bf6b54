"""report.html: one self-contained page per sweep (results table, heatmaps, answers per question), on a fake sweep
whose answers are known: two SFT cells over one CPT model, four questions."""

import base64
import json
import re

import pytest

from pipeline.aggregate import aggregate
from pipeline.sweep.tables import read_jobs, results_table
from pipeline.stages.eval import transition
from pipeline.sweep.report import write_report
from test_aggregate import fake_job

# per question: base, CPT, SFT of job 0, SFT of job 1 (contains)
BASE, CPT = [0, 0, 1, 0], [1, 1, 1, 0]
SFT = {0: [1, 0, 1, 0], 1: [0, 0, 1, 1]}
IDS = ["q-kept", "q-lost", "q-known", "q-sft-only"]
# a 1x1 PNG: the report embeds whatever heatmaps it is given
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5E"
                       "rkJggg==")


@pytest.fixture
def sweep(tmp_path):
    sweep = tmp_path / "2026-01-01_00-00-00"
    for job, sft in SFT.items():
        d = fake_job(sweep, job, {"sft.lora_alpha": [8, 32][job]},
                     {"base": {"contains": BASE}, "cpt": {"contains": CPT}, "sft": {"contains": sft}}, ids=IDS)
        rows = [json.loads(line) for line in (d / "answers.jsonl").read_text().splitlines()]
        for i, r in enumerate(rows):  # as eval writes them: the transition, and answers a page must escape
            r["transition"] = transition(BASE[i], CPT[i], sft[i])
            r["question"] = f"{r['id']}: <b>P-101</b> & 炉-3?"
            r["sft"]["answer"] = f"job{job}-{r['id']} <script>alert(1)</script>"
        (d / "answers.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (sweep / "heatmap_sft_contains.png").write_bytes(PNG)
    return sweep


def external_links(html):
    """src/href values that leave the page (a report must work offline, from file://)."""
    return [v for v in re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', html) if not v.startswith(("data:", "#"))] + \
        re.findall(r"https?://", html)


def test_report_is_self_contained_and_lists_every_question(sweep):
    jobs = read_jobs(sweep)
    df, keys = results_table(jobs)
    path = write_report(sweep, jobs, df, keys, [sweep / "heatmap_sft_contains.png"])
    html = path.read_text(encoding="utf-8")
    assert path == sweep / "report.html"
    assert external_links(html) == []
    assert "<script" not in html.replace("&lt;script", "")  # answers are escaped, and the page has no script
    assert html.count("data:image/png;base64,") == 1
    for qid in IDS:
        assert f'id="q-{qid}"' in html
    # the results table: the swept key as a column, one row per SFT job
    assert "<th>sft.lora_alpha</th>" in html and html.count('<tr class="ok">') == 2


def test_report_marks_hits_and_filters_learned_then_lost(sweep):
    jobs = read_jobs(sweep)
    df, keys = results_table(jobs)
    html = write_report(sweep, jobs, df, keys, []).read_text(encoding="utf-8")
    rows = {m.group(1): m.group(0) for m in re.finditer(r'<tr id="q-([\w-]+)"[^>]*>.*?</tr>', html, re.S)}
    # q-lost: CPT taught it, both SFT jobs lost it; q-kept: lost by job 1 only; the others by none
    assert [q for q, r in rows.items() if 'class="learned-lost"' in r] == ["q-kept", "q-lost"]
    assert "2 of 4" in html  # the filter's label counts the questions it keeps
    # answer cells: base, one CPT model, two SFT jobs; green where the answer contains the gold answer
    cells = re.findall(r'<td class="([^"]*)">job|<td class="([^"]*)">a<', rows["q-kept"])
    classes = [a or b for a, b in cells]
    assert classes == ["", "hit", "hit", "lost"]  # base 0, CPT 1, SFT job 0 kept it (1), job 1 lost it (0)
    assert 'id="only-lost"' in html and "#only-lost:checked" in html  # the CSS-only filter
    assert "learned_lost 1" in html and "learned_lost 2" in html  # per job, in the column headers


def test_aggregate_writes_the_report(sweep):
    aggregate(sweep)
    html = (sweep / "report.html").read_text(encoding="utf-8")
    assert all(f'id="q-{qid}"' in html for qid in IDS) and external_links(html) == []
