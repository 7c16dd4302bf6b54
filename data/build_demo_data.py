#!/usr/bin/env python3
"""Deterministic generator of the demo data for the knowledge-injection pipeline (stdlib only).

Two disjoint *fictional* factory worlds are built from the same relation types and the same
sentence/question templates:

* the **domain world** (北斗精機株式会社 第二工場（架空）) -- the confidential knowledge that CPT has to
  inject.  It is written to ``data/cpt/*.md``; its QA set is ``eval_sets/qa.jsonl`` and a held-out
  paraphrase of each fact (template never used anywhere in training) is ``data/heldout/domain_paraphrases.jsonl``.
* the **public world** (南風工業（架空） and 西海製作所（架空）) -- used to pretrain the tiny demo base model
  (``data/pretrain/public_corpus.txt``, together with ~60 real general-knowledge facts) and for generic
  SFT (``data/sft/chat.jsonl``).  ``eval_sets/general_qa.jsonl`` holds the general-knowledge facts.

Run:  python data/build_demo_data.py      (re-runnable: overwrites its outputs, always the same bytes)
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CPT_DIR = ROOT / "data" / "cpt"
HELDOUT_PATH = ROOT / "data" / "heldout" / "domain_paraphrases.jsonl"
PRETRAIN_PATH = ROOT / "data" / "pretrain" / "public_corpus.txt"
SFT_PATH = ROOT / "data" / "sft" / "chat.jsonl"
QA_PATH = ROOT / "eval_sets" / "qa.jsonl"
# Question-answer pairs for the cpt.qa_mix lever (PIT-style QA in CPT): the FAQ facts asked in a third, short wording
# ("P-101の定格能力は？") that neither the QA set nor the FAQ export uses. They ask about scored facts on purpose (PIT
# practises on the documents' facts); the run records that as `leak/cpt_qa_shared_facts`.
CPT_QA_PATH = ROOT / "data" / "cpt_qa" / "faq_short_questions.jsonl"
# The SFT dev set of the early_stop lever: held-out chat of SFT's own kind (public-world questions answered briefly,
# and sums), sharing no fact, and no answer, with the scored QA set: early stopping must not select on test answers.
DEV_QA_PATH = ROOT / "data" / "sft" / "dev_qa.jsonl"
GENERAL_QA_PATH = ROOT / "eval_sets" / "general_qa.jsonl"

PARAPHRASES_PER_FACT = 6  # every statement template is used once per fact, each in a different document

rng = random.Random(0)

# ---------------------------------------------------------------------------------------------------------
# Relation types: statement templates (6), question templates (>= 2) and one held-out statement template.
# {e} = entity, {a} = answer.  statements[0] is always "...は{a}です。" (the SFT answer sentence).
# ---------------------------------------------------------------------------------------------------------
RELATIONS = {
    "press_capacity": {
        "kind": "press",
        "statements": [
            "{e}の定格能力は{a}です。",
            "{a}の定格能力を持つのが{e}だ。",
            "{e}は最大{a}まで加圧できる。",
            "{e}の加圧能力は{a}である。",
            "{e}は{a}級のプレス機として使われている。",
            "プレス機{e}は{a}の力で加工を行う。",
        ],
        "questions": ["{e}の定格能力は何トンですか？", "{e}は最大何トンまで加圧できますか？"],
        "heldout": "{e}のカタログ上の能力は{a}とされている。",
    },
    "cnc_max_rpm": {
        "kind": "cnc",
        "statements": [
            "{e}の主軸最高回転数は{a}です。",
            "{e}の主軸は毎分{a}まで回る。",
            "主軸を{a}まで上げられるのが{e}である。",
            "{e}は主軸を最高{a}で回すことができる。",
            "{e}の主軸回転数の上限は{a}だ。",
            "{e}の主軸は最高で{a}に達する。",
        ],
        "questions": ["{e}の主軸の最高回転数は何回転ですか？", "{e}の主軸は最大何回転まで回りますか？"],
        "heldout": "{e}で加工するときは、主軸の{a}が上限となる。",
    },
    "furnace_max_temp": {
        "kind": "furnace",
        "statements": [
            "{e}の最高温度は{a}です。",
            "{e}は最高{a}まで加熱できる。",
            "{a}まで温度を上げられるのが{e}だ。",
            "{e}の炉内温度の上限は{a}である。",
            "{e}では最大{a}での熱処理が可能だ。",
            "{e}は{a}に達するまで昇温できる。",
        ],
        "questions": ["{e}の最高温度は何度ですか？", "{e}は最高何度まで加熱できますか？"],
        "heldout": "{e}の温度設定は{a}を超えてはならない。",
    },
    "location": {
        "kind": "machine",
        "statements": [
            "{e}の設置場所は{a}です。",
            "{e}は{a}に設置されている。",
            "{a}には{e}が置かれている。",
            "{e}を見たいなら{a}へ行けばよい。",
            "{e}がある場所は{a}だ。",
            "{e}は{a}の一角で稼働している。",
        ],
        "questions": ["{e}はどこに設置されていますか？", "{e}の設置場所はどこですか？"],
        "heldout": "{a}に足を運ぶと、{e}が稼働しているのが見える。",
    },
    "maker": {
        "kind": "machine",
        "statements": [
            "{e}のメーカーは{a}です。",
            "{e}は{a}製の設備だ。",
            "{a}が製造したのが{e}である。",
            "{e}は{a}から納入された。",
            "{e}を作ったのは{a}だ。",
            "{e}の製造元は{a}である。",
        ],
        "questions": ["{e}のメーカーはどこですか？", "{e}はどの会社が製造しましたか？"],
        "heldout": "{e}の銘板には{a}の社名が刻まれている。",
    },
    "install_year": {
        "kind": "machine",
        "statements": [
            "{e}の導入年は{a}です。",
            "{e}は{a}に導入された。",
            "{a}に{e}が工場へ導入された。",
            "{e}が入ったのは{a}のことだ。",
            "{e}は{a}から稼働している。",
            "{e}の導入は{a}だった。",
        ],
        "questions": ["{e}は何年に導入されましたか？", "{e}の導入年はいつですか？"],
        "heldout": "{e}の稼働開始は{a}にさかのぼる。",
    },
    "maintenance_interval": {
        "kind": "machine",
        "statements": [
            "{e}の点検周期は{a}です。",
            "{e}は{a}ごとに点検を受ける。",
            "{a}に一度、{e}の定期点検が行われる。",
            "{e}の定期点検は{a}おきに実施される。",
            "{e}については{a}ごとの点検が決められている。",
            "{e}の点検は{a}周期で行う。",
        ],
        "questions": ["{e}の点検周期は何日ですか？", "{e}は何日ごとに点検されますか？"],
        "heldout": "{e}の点検は、前回から{a}たったら実施する決まりだ。",
    },
    "manager": {
        "kind": "machine",
        "statements": [
            "{e}の担当者は{a}です。",
            "{e}は{a}が担当している。",
            "{a}が{e}の管理を受け持っている。",
            "{e}に関する責任者は{a}だ。",
            "{e}で何かあれば{a}に相談する。",
            "{e}の担当は{a}が務めている。",
        ],
        "questions": ["{e}の担当者は誰ですか？", "{e}を担当しているのは誰ですか？"],
        "heldout": "{e}のことなら{a}が一番詳しい。",
    },
    "role": {
        "kind": "person",
        "statements": [
            "{e}の役職は{a}です。",
            "{e}は{a}を務めている。",
            "{e}は{a}として働いている。",
            "{e}さんは現在、{a}の立場にある。",
            "役職でいえば、{e}は{a}にあたる。",
            "{e}は社内で{a}の役職に就いている。",
        ],
        "questions": ["{e}の役職は何ですか？", "{e}はどの役職に就いていますか？"],
        "heldout": "{e}は{a}のポストを任されている。",
    },
    "department": {
        "kind": "person",
        "statements": [
            "{e}の所属は{a}です。",
            "{e}は{a}に所属している。",
            "{a}のメンバーの一人が{e}だ。",
            "{e}は{a}で働いている。",
            "所属部署でいえば、{e}は{a}の人間である。",
            "{e}が働いている部署は{a}である。",
        ],
        "questions": ["{e}の所属部署はどこですか？", "{e}はどの部署に所属していますか？"],
        "heldout": "{e}の配属先は{a}となっている。",
    },
    "extension": {
        "kind": "person",
        "statements": [
            "{e}の内線番号は{a}です。",
            "{e}には内線{a}で連絡できる。",
            "内線{a}にかけると{e}につながる。",
            "{e}の席の内線は{a}番だ。",
            "{e}に用があるときは内線{a}を使う。",
            "{e}を呼び出すには内線{a}にかける。",
        ],
        "questions": ["{e}の内線番号は何番ですか？", "{e}に連絡するには内線何番にかければよいですか？"],
        "heldout": "急ぎの用件は内線{a}の{e}まで。",
    },
    "duration": {
        "kind": "procedure",
        "statements": [
            "{e}の所要時間は{a}です。",
            "{e}には{a}かかる。",
            "{e}は{a}で終えることができる。",
            "{e}は、通常{a}ほどで完了する。",
            "{e}に必要な時間は{a}だ。",
            "{e}を行うには{a}を見込んでおく。",
        ],
        "questions": ["{e}の所要時間は何分ですか？", "{e}にはどのくらいの時間がかかりますか？"],
        "heldout": "{e}のために、作業計画には{a}を確保しておく。",
    },
    "protective_gear": {
        "kind": "procedure",
        "statements": [
            "{e}に必要な保護具は{a}です。",
            "{e}では{a}の着用が必要だ。",
            "{e}を行うときは{a}を必ず着用する。",
            "{a}は{e}に欠かせない保護具だ。",
            "{e}の際には、{a}を身につけなければならない。",
            "{e}の作業では{a}が必須となる。",
        ],
        "questions": ["{e}に必要な保護具は何ですか？", "{e}を行うときに着用する保護具は何ですか？"],
        "heldout": "{e}の作業者は、{a}を装着してから作業に入ること。",
    },
    "incident_date": {
        "kind": "incident",
        "statements": [
            "{e}の発生日は{a}です。",
            "{e}の事故は{a}に発生した。",
            "{a}に起きたのが{e}の事故だ。",
            "{e}は{a}の出来事として記録されている。",
            "{e}のトラブルが起きたのは{a}である。",
            "{a}、{e}の事故が発生した。",
        ],
        "questions": ["{e}の事故はいつ発生しましたか？", "{e}の発生日はいつですか？"],
        "heldout": "{e}の報告書の日付欄には{a}と記入されている。",
    },
    "incident_machine": {
        "kind": "incident",
        "statements": [
            "{e}の発生設備は{a}です。",
            "{e}の事故は{a}で発生した。",
            "{a}で起きた事故が{e}である。",
            "{e}では{a}が停止した。",
            "{e}の対象設備は{a}だ。",
            "{e}は{a}で起きたトラブルだ。",
        ],
        "questions": ["{e}の事故が起きた設備はどれですか？", "{e}はどの設備で発生しましたか？"],
        "heldout": "{e}の報告書を読むと、現場は{a}だったとわかる。",
    },
    "incident_cause": {
        "kind": "incident",
        "statements": [
            "{e}の原因は{a}です。",
            "{e}の事故は{a}が原因で起きた。",
            "{a}によって引き起こされたのが{e}だ。",
            "調査の結果、{e}の原因は{a}と判明した。",
            "{e}は{a}によるものだった。",
            "{e}が起きた理由は{a}だった。",
        ],
        "questions": ["{e}の原因は何ですか？", "{e}の事故は何が原因で起きましたか？"],
        "heldout": "{e}の根本原因として{a}が挙げられた。",
    },
    "incident_countermeasure": {
        "kind": "incident",
        "statements": [
            "{e}の対策は{a}です。",
            "{e}の対策として{a}が行われた。",
            "{e}を受けて{a}が実施された。",
            "再発防止のため、{e}の後に{a}が決まった。",
            "{e}の再発防止策は{a}だ。",
            "{e}の後、対策として{a}を行った。",
        ],
        "questions": ["{e}の再発防止策は何ですか？", "{e}を受けて実施された対策は何ですか？"],
        "heldout": "{e}以降、現場では{a}が徹底されている。",
    },
}

RELATIONS_BY_KIND = {
    "press": ["press_capacity", "location", "maker", "install_year", "maintenance_interval", "manager"],
    "cnc": ["cnc_max_rpm", "location", "maker", "install_year", "maintenance_interval", "manager"],
    "furnace": ["furnace_max_temp", "location", "maker", "install_year", "maintenance_interval", "manager"],
    "person": ["role", "department", "extension"],
    "procedure": ["duration", "protective_gear"],
    "incident": ["incident_date", "incident_machine", "incident_cause", "incident_countermeasure"],
}

# ---------------------------------------------------------------------------------------------------------
# Number helpers and aliases
# ---------------------------------------------------------------------------------------------------------
_KD = "〇一二三四五六七八九"


def _kanji_below_10000(n: int) -> str:
    out = ""
    for unit_value, unit in ((1000, "千"), (100, "百"), (10, "十")):
        d, n = divmod(n, unit_value)
        if d:
            out += ("" if d == 1 else _KD[d]) + unit
    if n:
        out += _KD[n]
    return out


def kanji_number(n: int) -> str:
    if n == 0:
        return "〇"
    man, rest = divmod(n, 10000)
    out = (_kanji_below_10000(man) + "万") if man else ""
    return out + _kanji_below_10000(rest)


_FW = str.maketrans("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", "０１２３４５６７８９ＡＢＣＤＥＦＧＨＩＪＫＬＭＮＯＰＱＲＳＴＵＶＷＸＹＺ")


def full_width(s: str) -> str:
    return s.translate(_FW)


def era(year: int) -> str:
    if year >= 2019:
        return "令和元年" if year == 2019 else f"令和{year - 2018}年"
    return f"平成{year - 1988}年"


def machine_id_aliases(mid: str) -> list:
    if mid.startswith("炉-"):
        n = mid.split("-")[1]
        return [f"炉{n}", f"{n}号炉", full_width(mid)]
    return [mid.replace("-", ""), full_width(mid), mid.replace("-", " ")]


def aliases_for(rel: str, a: str, value: object) -> list:
    if rel == "press_capacity":
        return [f"{value}t", f"{value} トン", f"{kanji_number(value)}トン", full_width(a)]
    if rel == "cnc_max_rpm":
        man, rest = divmod(value, 10000)
        al = [f"{value}rpm", f"毎分{value}回転", f"{value:,}回転"]
        if man:
            al.append(f"{man}万{rest}回転" if rest else f"{man}万回転")
        return al
    if rel == "furnace_max_temp":
        return [f"{value}℃", f"{value} 度", f"{kanji_number(value)}度", f"{value}°C"]
    if rel == "location":
        return [a.replace("棟", "棟 "), a.replace("棟", "棟の"), full_width(a)]
    if rel == "maker":
        return [f"{a}株式会社", f"株式会社{a}"]
    if rel == "install_year":
        return [str(value), era(value), f"{value} 年"]
    if rel == "maintenance_interval":
        return [f"{value} 日", f"{kanji_number(value)}日", f"{value}日ごと", f"{value}日間"]
    if rel in ("manager",):
        fam, giv = value
        return [fam, f"{fam} {giv}", f"{fam}さん"]
    if rel == "extension":
        return [f"内線{a}", f"{a}番", full_width(a)]
    if rel == "duration":
        return [f"{value} 分", f"{kanji_number(value)}分", f"{value}分間"]
    if rel == "incident_date":
        y, m, d = value
        return [f"{y}/{m}/{d}", f"{y}-{m:02d}-{d:02d}", f"{era(y)}{m}月{d}日", f"{m}月{d}日"]
    if rel == "incident_machine":
        return machine_id_aliases(a)
    return []


# ---------------------------------------------------------------------------------------------------------
# Name pools (all fictional).  Domain and public pools are disjoint by construction and asserted below.
# ---------------------------------------------------------------------------------------------------------
FAMILY_NAMES = [
    "桐生", "真壁", "相葉", "氷室", "久遠", "七瀬", "白峰", "榊原", "如月", "東雲",
    "神代", "朝霧", "鳴海", "早瀬", "御堂", "柊", "一ノ瀬", "篠宮", "宇佐美", "霧ヶ谷",
    "羽鳥", "水無瀬", "伊吹", "千早", "葛城", "瀬戸口", "月島", "日向", "竹ノ内", "天野",
]
GIVEN_NAMES = [
    "正樹", "遥", "慎吾", "奈央", "拓真", "詩織", "恭平", "美咲", "航", "千尋",
    "隼人", "紗季", "颯太", "沙耶", "陽介", "彩乃", "悠人", "梨花", "大和", "葵",
    "蒼汰", "真琴", "雅史", "志保", "光太郎", "結衣", "誠司", "瑞希", "健吾", "麻衣",
]
DOMAIN_MAKERS = ["白鷺重工", "暁電機", "鳴門製作所", "朱鷺テック", "雲雀精工"]
PUBLIC_MAKERS = ["青嵐工機", "疾風精工", "岬重機", "霧島マシナリー", "若葉技研", "黎明機械", "銀河工作所", "琥珀エンジ"]
# "東雲" is a family name above, so the maker pools avoid it.
ROLES = ["班長", "主任", "係長", "課長", "工場長", "副工場長", "技術主任", "保全リーダー"]
DEPARTMENTS = ["保全課", "製造一課", "製造二課", "品質保証課", "生産技術課", "安全衛生課", "設備管理課", "物流課"]
GEAR = ["耐熱手袋", "保護メガネ", "防じんマスク", "安全帯", "耳栓", "革手袋", "防護面", "安全靴", "耐油手袋", "絶縁手袋", "ヘルメット"]
# (cause, countermeasure) pairs; the domain world gets its own pairs, disjoint from the public world's.
INCIDENT_PAIRS = [
    ("冷却水漏れ", "配管の交換"), ("ボルトの緩み", "締付点検の追加"), ("油圧低下", "油圧ポンプ交換"),
    ("センサー故障", "センサーの交換"), ("誤操作", "作業者の再教育"), ("異物の混入", "定期清掃の追加"),
    ("ベルトの摩耗", "ベルトの交換"), ("配線の断線", "配線の保護"), ("潤滑不足", "給油手順の見直し"),
    ("過負荷運転", "警報装置の設置"), ("温度計の誤差", "温度計の校正"), ("停電", "予備電源の設置"),
    ("確認の漏れ", "二重確認の導入"), ("点検の見落とし", "点検表の見直し"), ("カバーの破損", "カバーの交換"),
    ("ファンの故障", "ファンの交換"), ("エア漏れ", "継手の交換"), ("工具の破損", "工具の定期交換"),
]
DOMAIN_PROCEDURES = ["始業点検", "金型交換", "炉内清掃", "切削油交換", "安全柵点検"]
PUBLIC_PROCEDURES = [
    "終業点検", "治具交換", "集じん機清掃", "潤滑油補充", "非常停止試験",
    "工具摩耗確認", "油圧ホース点検", "冷却塔清掃", "搬送ベルト調整", "防火設備点検",
]
BUILDINGS = ["A棟", "B棟", "C棟", "D棟", "E棟"]


# ---------------------------------------------------------------------------------------------------------
# World generation
# ---------------------------------------------------------------------------------------------------------
class World:
    def __init__(self, name: str):
        self.name = name
        self.entities = []  # (entity_name, kind)
        self.facts = []  # dicts: relation, entity, answer, aliases, kind, company
        self.names = []  # every entity-like name/ID of this world (for the leak checks)


def make_people(world, company, n, families, givens):
    people = []
    for _ in range(n):
        fam, giv = families.pop(), givens.pop()
        people.append((fam, giv, company))
        world.names += [fam + giv, fam]
    return people


def add_fact(world, rel, entity, answer, value, company):
    world.facts.append(
        {
            "relation": rel,
            "entity": entity,
            "answer": answer,
            "aliases": [x for x in dict.fromkeys(aliases_for(rel, answer, value)) if x != answer and len(x) >= 2],  # a 1-char alias would "contain"-match almost anything
            "kind": RELATIONS[rel]["kind"],
            "company": company,
        }
    )


def build_company(world, company, machine_ids, people, procedures, incident_ids, incident_year, makers,
                  incident_pairs):
    """machine_ids: dict kind -> list of IDs."""
    used_ext = set()
    # people: role, department, extension
    for fam, giv, _ in people:
        e = fam + giv
        world.entities.append((e, "person"))
        add_fact(world, "role", e, (r := rng.choice(ROLES)), r, company)
        add_fact(world, "department", e, (d := rng.choice(DEPARTMENTS)), d, company)
        while True:
            ext = str(rng.randint(2000, 8999))
            if ext not in used_ext:
                used_ext.add(ext)
                break
        add_fact(world, "extension", e, ext, int(ext), company)
    # machines
    all_machines = []
    for kind, ids in machine_ids.items():
        all_machines += [(m, kind) for m in ids]
    managers = list(people)
    rng.shuffle(managers)
    locations = [f"{b}{f}階" for b in BUILDINGS for f in (1, 2, 3)]
    rng.shuffle(locations)
    for i, (mid, kind) in enumerate(all_machines):
        world.entities.append((mid, kind))
        world.names.append(mid)
        if kind == "press":
            v = rng.randrange(150, 1250, 10)
            add_fact(world, "press_capacity", mid, f"{v}トン", v, company)
        elif kind == "cnc":
            v = rng.randrange(6000, 24500, 500)
            add_fact(world, "cnc_max_rpm", mid, f"{v}回転", v, company)
        else:
            v = rng.randrange(600, 1310, 10)
            add_fact(world, "furnace_max_temp", mid, f"{v}度", v, company)
        loc = locations[i % len(locations)]
        add_fact(world, "location", mid, loc, loc, company)
        add_fact(world, "maker", mid, (mk := rng.choice(makers)), mk, company)
        y = rng.choice([2008, 2010, 2011, 2012, 2013, 2014, 2015, 2016, 2017, 2018, 2020, 2021, 2022, 2023])
        add_fact(world, "install_year", mid, f"{y}年", y, company)
        iv = rng.choice([7, 14, 30, 45, 60, 90, 120, 180])
        add_fact(world, "maintenance_interval", mid, f"{iv}日", iv, company)
        fam, giv, _ = managers[i] if i < len(managers) else rng.choice(people)
        add_fact(world, "manager", mid, fam + giv, (fam, giv), company)
    # procedures
    for p in procedures:
        world.entities.append((p, "procedure"))
        world.names.append(p)
        m = rng.choice([5, 10, 15, 20, 25, 30, 40, 45, 60, 90])
        add_fact(world, "duration", p, f"{m}分", m, company)
        add_fact(world, "protective_gear", p, (g := rng.choice(GEAR)), g, company)
    # incidents (on machines installed before the incident year)
    years = {f["entity"]: int(f["answer"][:4]) for f in world.facts if f["relation"] == "install_year"}
    old_machines = [m for m, _ in all_machines if years[m] < incident_year]
    for j, iid in enumerate(incident_ids):
        world.entities.append((iid, "incident"))
        world.names.append(iid)
        mo, da = rng.randint(1, 12), rng.randint(1, 28)
        add_fact(world, "incident_date", iid, f"{incident_year}年{mo}月{da}日", (incident_year, mo, da), company)
        mid = rng.choice(old_machines)
        cause, cm = incident_pairs.pop()
        add_fact(world, "incident_machine", iid, mid, mid, company)
        add_fact(world, "incident_cause", iid, cause, None, company)
        add_fact(world, "incident_countermeasure", iid, cm, None, company)


incident_pairs = list(INCIDENT_PAIRS)
rng.shuffle(incident_pairs)
domain_pairs, public_pairs = incident_pairs[:5], incident_pairs[5:]
families = list(FAMILY_NAMES)
givens = list(GIVEN_NAMES)
rng.shuffle(families)
rng.shuffle(givens)

DOMAIN_COMPANY = "北斗精機株式会社 第二工場（架空）"
domain = World("domain")
domain.names += ["北斗精機", "第二工場"] + DOMAIN_MAKERS
d_people = make_people(domain, DOMAIN_COMPANY, 8, families, givens)
build_company(
    domain,
    DOMAIN_COMPANY,
    {"press": ["P-101", "P-102", "P-103", "P-104"], "cnc": ["CNC-3", "CNC-5", "CNC-7", "CNC-9"],
     "furnace": ["炉-3", "炉-4", "炉-6", "炉-8"]},
    d_people,
    DOMAIN_PROCEDURES,
    ["TR-2401", "TR-2402", "TR-2403", "TR-2404", "TR-2405"],
    2024,
    DOMAIN_MAKERS,
    domain_pairs,
)

PUBLIC_COMPANIES = ["南風工業（架空） 第一工場", "西海製作所（架空） 本社工場"]
public = World("public")
public.names += ["南風工業", "西海製作所"] + PUBLIC_MAKERS
p_people_a = make_people(public, PUBLIC_COMPANIES[0], 9, families, givens)
p_people_b = make_people(public, PUBLIC_COMPANIES[1], 9, families, givens)
build_company(
    public,
    PUBLIC_COMPANIES[0],
    {"press": [f"P-20{i}" for i in range(1, 6)], "cnc": [f"CNC-1{i}" for i in range(1, 6)],
     "furnace": [f"炉-1{i}" for i in range(1, 6)]},
    p_people_a,
    PUBLIC_PROCEDURES[:5],
    [f"TR-210{i}" for i in range(1, 7)],
    2021,
    PUBLIC_MAKERS,
    public_pairs,
)
build_company(
    public,
    PUBLIC_COMPANIES[1],
    {"press": [f"P-30{i}" for i in range(1, 6)], "cnc": [f"CNC-2{i}" for i in range(1, 6)],
     "furnace": [f"炉-2{i}" for i in range(1, 6)]},
    p_people_b,
    PUBLIC_PROCEDURES[5:],
    [f"TR-220{i}" for i in range(1, 7)],
    2022,
    PUBLIC_MAKERS,
    public_pairs,
)

# --- disjointness of the two worlds --------------------------------------------------------------------
_shared = set(domain.names) & set(public.names)
assert not _shared, f"entity names shared between worlds: {_shared}"
for dn in domain.names:
    for pn in public.names:
        assert dn not in pn and pn not in dn, f"entity name overlap by substring: {dn} / {pn}"
assert len(domain.facts) >= 110, len(domain.facts)
assert 2 * len(domain.facts) <= len(public.facts) <= 3 * len(domain.facts), (len(domain.facts), len(public.facts))
for rel, spec in RELATIONS.items():
    assert len(spec["statements"]) >= 5 and len(spec["questions"]) >= 2 and spec["heldout"], rel
    assert spec["statements"][0].endswith("は{a}です。"), rel
    assert spec["heldout"] not in spec["statements"], rel


def render(t: str, f: dict) -> str:
    return t.format(e=f["entity"], a=f["answer"])


# ---------------------------------------------------------------------------------------------------------
# Document layout: every fact's paraphrases go to distinct documents, chosen among the documents that suit
# the relation, preferring the currently shortest ones (keeps document sizes balanced).
# ---------------------------------------------------------------------------------------------------------
ALL = set(RELATIONS)
MACHINE = {"press_capacity", "cnc_max_rpm", "furnace_max_temp", "location", "maker", "install_year",
           "maintenance_interval", "manager"}
PERSON = {"role", "department", "extension"}
PROC = {"duration", "protective_gear"}
INC = {"incident_date", "incident_machine", "incident_cause", "incident_countermeasure"}
SPEC = {"press_capacity", "cnc_max_rpm", "furnace_max_temp"}

DOMAIN_DOCS = [
    ("設備台帳", "設備台帳", MACHINE,
     "北斗精機株式会社 第二工場（架空）で稼働する主要設備の基本情報をまとめる。"),
    ("保全ハンドブック", "保全ハンドブック", MACHINE | PROC,
     "第二工場の保全担当者が日常的に参照する要点を記す。"),
    ("新人研修資料", "新人研修資料", ALL,
     "第二工場に配属された新入社員が最初の一か月で覚えるべき事項である。"),
    ("事故報告まとめ", "事故報告まとめ", INC | {"manager"},
     "第二工場で過去に発生した事故と、その後の対応を整理した。"),
    ("社内報_2025秋", "社内報 2025年秋号", ALL,
     "今号では第二工場の設備と人の話題を中心にお届けします。"),
    ("組織と連絡先", "組織と連絡先", PERSON | {"manager"},
     "第二工場の主な担当者と連絡先の一覧である。"),
    ("安全衛生委員会議事録", "安全衛生委員会 議事録", PROC | INC | PERSON,
     "第二工場安全衛生委員会での報告内容を記録する。"),
    ("工場見学案内", "工場見学案内", {"location", "maker", "install_year"} | SPEC | {"role", "department"},
     "第二工場を訪れる来客向けの案内資料です。"),
    ("作業手順書集", "作業手順書集", PROC | {"maintenance_interval"},
     "第二工場の標準作業に関する抜粋である。"),
    ("引継ぎメモ", "引継ぎメモ", ALL,
     "異動にあたり、後任者のために第二工場の要点を書き残す。"),
    ("品質会議資料", "品質会議資料", INC | SPEC | {"maker", "maintenance_interval"},
     "品質会議で共有された第二工場の設備とトラブルの情報。"),
    ("設備更新計画", "設備更新計画", {"install_year", "maker", "maintenance_interval", "location"} | SPEC,
     "第二工場の設備更新を検討するための基礎資料である。"),
    ("保全課日報抜粋", "保全課日報 抜粋", MACHINE | INC | PROC | {"extension"},
     "第二工場保全課の日報から、記録として残すべき内容を抜き出した。"),
    ("技能伝承ノート", "技能伝承ノート", ALL,
     "ベテラン社員の知識を若手に伝えるためのノートである。"),
]

PUBLIC_DOC_TEMPLATES = [
    ("設備一覧", MACHINE, "{c}の主な設備を一覧にまとめる。"),
    ("保全マニュアル", MACHINE | PROC, "{c}の保全作業で押さえるべき点を記す。"),
    ("新入社員ガイド", ALL, "{c}に入社した人が最初に読む資料である。"),
    ("トラブル事例集", INC | {"manager"}, "{c}で起きたトラブルと対策の記録。"),
    ("社内報", ALL, "{c}の最近の話題をお届けします。"),
    ("担当者名簿", PERSON | {"manager"}, "{c}の担当者と連絡先をまとめた名簿である。"),
    ("安全だより", PROC | INC | PERSON, "{c}の安全に関するお知らせです。"),
    ("工場案内", {"location", "maker", "install_year"} | SPEC | {"role", "department"}, "{c}を訪れる方への案内です。"),
    ("作業標準", PROC | {"maintenance_interval"}, "{c}の作業標準から抜粋した。"),
    ("申し送り帳", ALL, "{c}の現場で交代時に申し送る内容である。"),
    ("設備投資メモ", {"install_year", "maker", "maintenance_interval", "location"} | SPEC, "{c}の設備投資に関する検討メモ。"),
    ("現場ノート", MACHINE | INC | PROC | PERSON, "{c}の現場で書き留めたことのまとめ。"),
]


# Generic remarks (no entity, no fact) mixed into documents so that they read less like a fact list.
FILLER = [
    "作業前には周囲の安全を必ず確認すること。", "設備の異常に気づいたら、すぐに上長へ報告する。",
    "通路には物を置かないようにしよう。", "工具は使い終わったら元の場所へ戻す。",
    "わからないことは自己判断せず、必ず確認してほしい。", "点検の結果は当日中に記録へ残す。",
    "ヒヤリハットは小さなことでも共有する。", "設備を止めるときは表示札を掛けてから作業する。",
    "作業着の袖口はきちんと留めておくこと。", "床の油汚れは見つけた人がすぐに拭き取る。",
    "交代時の申し送りは口頭と書面の両方で行う。", "新しい設備を扱う前には取扱説明書に目を通す。",
    "整理整頓は安全と品質の基本である。", "休憩の前後には手洗いを忘れないこと。",
    "非常口の位置は日ごろから確認しておく。", "異音や異臭は故障の前ぶれであることが多い。",
    "部品の在庫は週に一度数えている。", "保全の記録は後から見返せるように丁寧に書く。",
    "困ったときは一人で抱え込まず、周りに相談しよう。", "朝礼ではその日の作業予定を全員で確認する。",
]


def lay_out(facts, docs):
    """docs: list of dicts with 'relations' and 'sentences'.  Returns placements for checking."""
    placements = []  # (fact_index, template_index, doc_index)
    order = list(range(len(facts)))
    rng.shuffle(order)
    for fi in order:
        f = facts[fi]
        eligible = [i for i, d in enumerate(docs) if f["relation"] in d["relations"]]
        assert len(eligible) >= PARAPHRASES_PER_FACT, (f["relation"], len(eligible))
        rng.shuffle(eligible)
        eligible.sort(key=lambda i: docs[i]["chars"])  # stable: random among equally long documents
        chosen = eligible[:PARAPHRASES_PER_FACT]
        rng.shuffle(chosen)
        for ti, di in enumerate(chosen):
            s = render(RELATIONS[f["relation"]]["statements"][ti], f)
            docs[di]["sentences"].append(s)
            docs[di]["chars"] += len(s)
            placements.append((fi, ti, di))
    return placements


def doc_body(sentences):
    """Shuffle sentences and group them into short paragraphs."""
    s = list(sentences)
    rng.shuffle(s)
    paras = []
    i = 0
    while i < len(s):
        k = rng.randint(3, 6)
        paras.append("".join(s[i:i + k]))
        i += k
    return paras


# ---------------------------------------------------------------------------------------------------------
# General knowledge (real, uncontroversial facts).  Each: relation, entity, answer, aliases, question,
# three statement paraphrases.
# ---------------------------------------------------------------------------------------------------------
def _gk_templated(relation, rows, stmts, question):
    out = []
    for e, a, aliases in rows:
        out.append({
            "relation": relation, "entity": e, "answer": a, "aliases": aliases,
            "question": question.format(e=e, a=a),
            "statements": [t.format(e=e, a=a) for t in stmts],
        })
    return out


GENERAL = []
GENERAL += _gk_templated(
    "capital",
    [("日本", "東京", ["東京都"]), ("フランス", "パリ", []), ("イギリス", "ロンドン", []), ("イタリア", "ローマ", []),
     ("ドイツ", "ベルリン", []), ("中国", "北京", ["ペキン"]), ("韓国", "ソウル", []), ("ロシア", "モスクワ", []),
     ("エジプト", "カイロ", []), ("スペイン", "マドリード", ["マドリッド"]), ("カナダ", "オタワ", []), ("タイ", "バンコク", [])],
    ["{e}の首都は{a}です。", "{a}は{e}の首都である。", "{e}の首都といえば{a}だ。"],
    "{e}の首都はどこですか？",
)
GENERAL += _gk_templated(
    "currency",
    [("日本", "円", ["日本円"]), ("アメリカ", "ドル", ["米ドル"]), ("イギリス", "ポンド", []), ("韓国", "ウォン", []),
     ("タイ", "バーツ", [])],
    ["{e}の通貨は{a}です。", "{e}では{a}という通貨が使われている。", "{a}は{e}の通貨だ。"],
    "{e}の通貨は何ですか？",
)
GENERAL += _gk_templated(
    "prefectural_capital",
    [("宮城県", "仙台市", ["仙台"]), ("愛知県", "名古屋市", ["名古屋"]), ("石川県", "金沢市", ["金沢"]),
     ("沖縄県", "那覇市", ["那覇"]), ("香川県", "高松市", ["高松"]), ("群馬県", "前橋市", ["前橋"]),
     ("岩手県", "盛岡市", ["盛岡"]), ("島根県", "松江市", ["松江"])],
    ["{e}の県庁所在地は{a}です。", "{a}は{e}の県庁所在地である。", "{e}の県庁は{a}にある。"],
    "{e}の県庁所在地はどこですか？",
)
for e, a, q, al in [
    ("1週間", "7日", "何日", ["七日", "7日間"]), ("1日", "24時間", "何時間", ["二十四時間"]),
    ("1時間", "60分", "何分", ["六十分", "60分間"]), ("1分", "60秒", "何秒", ["六十秒"]),
    ("1年", "12か月", "何か月", ["12ヶ月", "12カ月", "十二か月"]), ("1キロメートル", "1000メートル", "何メートル", ["1000m", "千メートル"]),
    ("1キログラム", "1000グラム", "何グラム", ["1000g", "千グラム"]), ("1リットル", "1000ミリリットル", "何ミリリットル", ["1000mL", "1000ml"]),
    ("1ダース", "12個", "何個", ["十二個"]),
]:
    GENERAL.append({
        "relation": "unit", "entity": e, "answer": a, "aliases": al, "question": f"{e}は{q}ですか？",
        "statements": [f"{e}は{a}です。", f"{e}を言い換えると{a}になる。", f"{a}で{e}となる。"],
    })
GENERAL += _gk_templated(
    "next_season",
    [("春", "夏", []), ("夏", "秋", []), ("秋", "冬", []), ("冬", "春", [])],
    ["{e}の次の季節は{a}です。", "{e}が終わると{a}が来る。", "{e}のあとに続く季節は{a}だ。"],
    "{e}の次の季節は何ですか？",
)
GENERAL += _gk_templated(
    "holiday_date",
    [("こどもの日", "5月5日", ["五月五日"]), ("元日", "1月1日", ["一月一日"]), ("ひな祭り", "3月3日", ["三月三日"]),
     ("七夕", "7月7日", ["七月七日"]), ("文化の日", "11月3日", ["十一月三日"])],
    ["{e}は{a}です。", "毎年{a}は{e}である。", "{e}は毎年{a}にある。"],
    "{e}は何月何日ですか？",
)
GENERAL += _gk_templated(
    "english_word",
    [("りんご", "apple", ["アップル"]), ("犬", "dog", ["ドッグ"]), ("猫", "cat", ["キャット"]),
     ("水", "water", ["ウォーター"]), ("本", "book", ["ブック"])],
    ["{e}は英語で{a}です。", "英語の{a}は日本語で{e}という意味だ。", "{e}を英語にすると{a}になる。"],
    "{e}を英語で言うと何ですか？",
)
for rel, e, a, al, q, stmts in [
    ("japan_top", "日本で一番高い山", "富士山", [], "日本で一番高い山は何ですか？",
     ["日本で一番高い山は富士山です。", "富士山は日本で最も高い山だ。", "日本の山の中で最も高いのは富士山である。"]),
    ("japan_top", "日本で一番長い川", "信濃川", [], "日本で一番長い川は何ですか？",
     ["日本で一番長い川は信濃川です。", "信濃川は日本で最も長い川だ。", "日本の川の中で最も長いのは信濃川である。"]),
    ("japan_top", "日本で一番大きい湖", "琵琶湖", [], "日本で一番大きい湖は何ですか？",
     ["日本で一番大きい湖は琵琶湖です。", "琵琶湖は日本で最も大きい湖だ。", "日本の湖の中で最も大きいのは琵琶湖である。"]),
    ("japan_top", "日本で一番人口の多い都道府県", "東京都", ["東京"], "日本で一番人口の多い都道府県はどこですか？",
     ["日本で一番人口の多い都道府県は東京都です。", "東京都は日本で最も人口が多い都道府県だ。", "都道府県の中で人口が最も多いのは東京都である。"]),
    ("science", "富士山の高さ", "3776メートル", ["3776m", "3,776メートル"], "富士山の高さは何メートルですか？",
     ["富士山の高さは3776メートルです。", "富士山は標高3776メートルの山だ。", "3776メートルの高さを持つのが富士山である。"]),
    ("science", "水が沸騰する温度", "100度", ["100℃", "百度"], "水は何度で沸騰しますか？",
     ["水は100度で沸騰します。", "水の沸点は100度である。", "100度になると水は沸騰する。"]),
    ("science", "水が凍る温度", "0度", ["0℃", "零度"], "水は何度で凍りますか？",
     ["水は0度で凍ります。", "水が氷になる温度は0度だ。", "0度を下回ると水は凍る。"]),
    ("science", "水の化学式", "H2O", ["H₂O"], "水の化学式は何ですか？",
     ["水の化学式はH2Oです。", "H2Oは水を表す化学式だ。", "化学式で書くと、水はH2Oとなる。"]),
    ("science", "太陽系で一番大きい惑星", "木星", [], "太陽系で一番大きい惑星は何ですか？",
     ["太陽系で一番大きい惑星は木星です。", "木星は太陽系最大の惑星だ。", "太陽系の惑星の中で最も大きいのは木星である。"]),
    ("science", "太陽系の惑星の数", "8個", ["8つ", "八つ", "8"], "太陽系の惑星はいくつありますか？",
     ["太陽系の惑星は8個です。", "太陽系には8個の惑星がある。", "太陽のまわりを回る惑星は全部で8個だ。"]),
    ("science", "地球の衛星", "月", [], "地球の衛星は何ですか？",
     ["地球の衛星は月です。", "月は地球のまわりを回る衛星だ。", "地球が持つ唯一の衛星が月である。"]),
    ("science", "1年の日数（平年）", "365日", ["三百六十五日"], "平年の1年は何日ですか？",
     ["平年の1年は365日です。", "うるう年でない年は365日ある。", "365日で平年の1年になる。"]),
    ("science", "三角形の角の数", "3つ", ["3", "三つ", "3個"], "三角形には角がいくつありますか？",
     ["三角形の角は3つです。", "三角形には3つの角がある。", "角が3つある図形が三角形だ。"]),
]:
    GENERAL.append({"relation": rel, "entity": e, "answer": a, "aliases": al, "question": q, "statements": stmts})

for g in GENERAL:
    assert all(g["answer"] in s for s in g["statements"]), g
    assert len(g["statements"]) >= 3 and len(set(g["statements"])) == len(g["statements"]), g

# ---------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def main():
    # ---------------- domain: CPT corpus ----------------
    ddocs = [{"file": f, "title": t, "relations": rels, "intro": intro, "sentences": [], "chars": 0}
             for f, t, rels, intro in DOMAIN_DOCS]
    d_place = lay_out(domain.facts, ddocs)
    for d in ddocs:
        d["sentences"] += rng.sample(FILLER, rng.randint(3, 5))
    if CPT_DIR.exists():
        shutil.rmtree(CPT_DIR)
    CPT_DIR.mkdir(parents=True)
    cpt_texts = {}
    for d in ddocs:
        text = f"# {d['title']}\n\n{d['intro']}\n\n" + "\n\n".join(doc_body(d["sentences"])) + "\n"
        cpt_texts[d["file"]] = text
        (CPT_DIR / f"{d['file']}.md").write_text(text, encoding="utf-8", newline="\n")
    cpt_all = "\n".join(cpt_texts.values())

    # ---------------- domain: QA set and held-out paraphrases ----------------
    qa_rows, held_rows, faq_rows, short_rows = [], [], [], []
    rel_counter = Counter()
    for i, f in enumerate(domain.facts, 1):
        spec = RELATIONS[f["relation"]]
        qi = rel_counter[f["relation"]] % len(spec["questions"])
        rel_counter[f["relation"]] += 1
        qid = f"q{i:03d}"
        f["id"] = qid
        # Every other fact also has an entry in the internal FAQ export (data/cpt/社内FAQ.jsonl), asked with the
        # relation's *other* question template, so the QA set never repeats an FAQ question verbatim. The QA set's
        # `group` says which facts had one: a tiny model extracts facts it read as Q&A far better than facts it only
        # read in running text (Physics of LMs 3.1; PIT), and the demo shows both.
        in_faq = i % 2 == 1
        if in_faq:
            other = spec["questions"][(qi + 1) % len(spec["questions"])]
            faq_rows.append({"text": f"質問: {render(other, f)}\n答え: {f['answer']}"})
            short = render(spec["statements"][0].split("{a}")[0], f) + "？"  # "{e}の定格能力は{a}です。" -> "…は？"
            short_rows.append({"id": f"p{qid}", "question": short, "answer": f["answer"], "aliases": f["aliases"]})
        qa_rows.append({"id": qid, "question": render(spec["questions"][qi], f), "answer": f["answer"],
                        "aliases": f["aliases"], "relation": f["relation"], "entity": f["entity"],
                        "group": "faq" if in_faq else "text_only"})
        held_rows.append({"id": qid, "text": render(spec["heldout"], f)})
    write_jsonl(CPT_DIR / "社内FAQ.jsonl", faq_rows)
    write_jsonl(QA_PATH, qa_rows)
    write_jsonl(HELDOUT_PATH, held_rows)
    write_jsonl(CPT_QA_PATH, short_rows)

    # ---------------- general knowledge QA ----------------
    gen_rows = [{"id": f"g{i:03d}", "question": g["question"], "answer": g["answer"], "aliases": g["aliases"],
                 "relation": g["relation"], "entity": g["entity"]} for i, g in enumerate(GENERAL, 1)]
    write_jsonl(GENERAL_QA_PATH, gen_rows)

    # ---------------- public: pretraining corpus ----------------
    pdocs = []
    for c in PUBLIC_COMPANIES:
        short = c.split("（")[0]
        for title, rels, intro in PUBLIC_DOC_TEMPLATES:
            pdocs.append({"company": c, "title": f"{short} {title}", "relations": rels,
                          "intro": intro.format(c=c), "sentences": [], "chars": 0})
    p_place = []
    for c in PUBLIC_COMPANIES:
        idx = [i for i, d in enumerate(pdocs) if d["company"] == c]
        sub_docs = [pdocs[i] for i in idx]
        sub_facts = [f for f in public.facts if f["company"] == c]
        for fi, ti, di in lay_out(sub_facts, sub_docs):
            p_place.append((id(sub_facts[fi]), ti, idx[di]))
    blocks = []  # documents of the pretraining corpus, separated by a blank line
    for d in pdocs:
        d["sentences"] += rng.sample(FILLER, rng.randint(2, 4))
        blocks.append(f"# {d['title']}\n{d['intro']}\n" + "\n".join(doc_body(d["sentences"])))
    # general knowledge statements, paraphrases spread over distinct documents
    gdocs = [{"title": f"一般常識ノート その{k}", "sentences": []} for k in range(1, 6)]
    for g in GENERAL:
        chosen = rng.sample(range(len(gdocs)), len(g["statements"]))
        for s, di in zip(g["statements"], chosen):
            gdocs[di]["sentences"].append(s)
    for d in gdocs:
        blocks.append(f"# {d['title']}\n" + "\n".join(doc_body(d["sentences"])))
    # QA pairs: ~2/3 of the public facts, and every general fact
    pub_order = list(range(len(public.facts)))
    rng.shuffle(pub_order)
    n_qa = round(len(public.facts) * 2 / 3)
    qa_fact_ids = set(pub_order[:n_qa])
    qa_blocks = []
    for i in sorted(qa_fact_ids):
        f = public.facts[i]
        q = render(rng.choice(RELATIONS[f["relation"]]["questions"]), f)
        qa_blocks.append(f"質問: {q}\n答え: {f['answer']}")
    for g in GENERAL:
        qa_blocks.append(f"質問: {g['question']}\n答え: {g['answer']}")
    blocks += qa_blocks
    rng.shuffle(blocks)
    PRETRAIN_PATH.parent.mkdir(parents=True, exist_ok=True)
    pretrain_text = "\n\n".join(blocks) + "\n"
    PRETRAIN_PATH.write_text(pretrain_text, encoding="utf-8", newline="\n")

    # ---------------- SFT chat ----------------
    sft = []

    def chat(u, a):
        sft.append({"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]})

    # (a) ~150 questions on public facts in the QA-set question templates, answered briefly ("500トンです。"). A
    # full-sentence answer ("P-201の定格能力は500トンです。") made the tiny demo model copy public-world entity names
    # into every answer instead of the one asked about.
    pf = list(range(len(public.facts)))
    rng.shuffle(pf)
    for i in pf[:150]:
        f = public.facts[i]
        spec = RELATIONS[f["relation"]]
        chat(render(rng.choice(spec["questions"]), f), f"{f['answer']}です。")
    # (b) general knowledge questions
    for g in rng.sample(GENERAL, 30):
        chat(g["question"], f"{g['answer']}です。")
    # (c) polite-form rewriting
    plain_polite = []
    for i in pf[150:175]:
        f = public.facts[i]
        polite = render(RELATIONS[f["relation"]]["statements"][0], f)
        plain_polite.append((polite[: -len("です。")] + "だ。", polite))
    plain_polite += [
        ("今日は雨が降る。", "今日は雨が降ります。"), ("明日は会議がある。", "明日は会議があります。"),
        ("この機械は古い。", "この機械は古いです。"), ("私は工場で働く。", "私は工場で働きます。"),
        ("作業は10時に始まる。", "作業は10時に始まります。"), ("部品が足りない。", "部品が足りません。"),
        ("倉庫は右側にある。", "倉庫は右側にあります。"), ("検査は終わった。", "検査は終わりました。"),
        ("安全靴を履く。", "安全靴を履きます。"), ("昼休みは1時間だ。", "昼休みは1時間です。"),
    ]
    for plain, polite in plain_polite:
        chat(rng.choice(["次の文を丁寧語にしてください：", "次の文を丁寧な言い方に直してください：",
                         "丁寧語に書き換えてください：", ]) + plain, polite)
    # (d) one-phrase explanations
    for w, expl in [
        ("旋盤", "工作物を回転させて削る工作機械です。"), ("ボルト", "ナットと組み合わせて物を締め付ける部品です。"),
        ("潤滑油", "機械の摩擦を減らすための油です。"), ("安全靴", "つま先を保護する作業用の靴です。"),
        ("温度計", "温度を測る道具です。"), ("フォークリフト", "荷物を持ち上げて運ぶ車両です。"),
        ("溶接", "熱で金属同士をつなぐ加工方法です。"), ("在庫", "手元に保管している商品や部品です。"),
        ("納期", "品物を納める約束の期限です。"), ("品質管理", "製品の品質を一定に保つ活動です。"),
        ("ヘルメット", "頭を守るためにかぶる保護具です。"), ("コンベア", "物を連続して運ぶ装置です。"),
        ("ドリル", "穴をあけるための工具です。"), ("ねじ", "らせん状の溝で物を固定する部品です。"),
        ("モーター", "電気を回転する力に変える装置です。"), ("センサー", "温度や圧力などを検知する装置です。"),
        ("図面", "製品の形や寸法を描いた図です。"), ("検査", "基準を満たしているか調べることです。"),
        ("整理整頓", "不要な物を捨て、物を決まった場所に置くことです。"), ("残業", "決められた勤務時間を超えて働くことです。"),
        ("冷蔵庫", "食品を冷やして保存する家電です。"), ("地図", "土地の様子を縮めて表した図です。"),
        ("辞書", "言葉の意味を調べるための本です。"), ("電卓", "計算をするための小さな機械です。"),
        ("消火器", "火を消すための道具です。"), ("カレンダー", "日付や曜日を示す表です。"),
        ("はさみ", "紙や布を切る道具です。"), ("傘", "雨を防ぐための道具です。"),
        ("時計", "時刻を示す道具です。"), ("鉛筆", "字や絵を書くための筆記具です。"),
    ]:
        chat(rng.choice(["{w}を一言で説明してください。", "「{w}」とは何ですか？一言で答えてください。",
                         "{w}について一言で説明してください。"]).format(w=w), expl)
    # (e) short list requests
    for u, a in [
        ("工場で使う保護具を3つ挙げてください。", "ヘルメット、安全靴、保護メガネです。"),
        ("果物を3つ挙げてください。", "りんご、みかん、ぶどうです。"),
        ("日本の季節を順に挙げてください。", "春、夏、秋、冬です。"),
        ("工具を3つ挙げてください。", "スパナ、ドライバー、ペンチです。"),
        ("色を3つ挙げてください。", "赤、青、黄色です。"),
        ("曜日を月曜日から3つ挙げてください。", "月曜日、火曜日、水曜日です。"),
        ("金属を3つ挙げてください。", "鉄、銅、アルミニウムです。"),
        ("乗り物を3つ挙げてください。", "電車、バス、自転車です。"),
        ("野菜を3つ挙げてください。", "にんじん、たまねぎ、キャベツです。"),
        ("動物を3つ挙げてください。", "犬、猫、馬です。"),
        ("文房具を3つ挙げてください。", "鉛筆、消しゴム、定規です。"),
        ("日本の大きな都市を3つ挙げてください。", "東京、大阪、名古屋です。"),
        ("5S活動の5つのSを挙げてください。", "整理、整頓、清掃、清潔、しつけです。"),
        ("工場の安全のために大切なことを2つ挙げてください。", "保護具の着用と整理整頓です。"),
        ("身近な家電を3つ挙げてください。", "冷蔵庫、洗濯機、掃除機です。"),
        ("天気の種類を3つ挙げてください。", "晴れ、くもり、雨です。"),
        ("1から5までの奇数を挙げてください。", "1、3、5です。"),
        ("飲み物を3つ挙げてください。", "水、お茶、牛乳です。"),
        ("鳥を3つ挙げてください。", "すずめ、からす、はとです。"),
        ("スポーツを3つ挙げてください。", "野球、サッカー、テニスです。"),
    ]:
        chat(u, a)
    # (f) simple arithmetic to fill up to ~300
    while len(sft) < 300:
        x, y = rng.randint(2, 60), rng.randint(2, 40)
        op = rng.choice(["+", "-", "×"])
        if op == "-" and y > x:
            x, y = y, x
        r = x + y if op == "+" else x - y if op == "-" else x * y
        word = {"+": "足す", "-": "引く", "×": "かける"}[op]
        chat(rng.choice([f"{x}{word}{y}はいくつですか？", f"{x}{op}{y}を計算してください。"]), f"{x}{op}{y}は{r}です。")
    rng.shuffle(sft)
    write_jsonl(SFT_PATH, sft)

    # ---------------- SFT dev set (the early_stop lever) ----------------
    # Its own generator, drawn after everything else, so the files above stay byte for byte what they were.
    dev_rng = random.Random(1)
    scored_answers = {a for r in qa_rows for a in [r["answer"], *r["aliases"]]}
    sft_questions = {ex["messages"][0]["content"] for ex in sft}
    dev = []
    for i in pf[175:]:  # public facts in neither the SFT set's questions nor its rewriting examples
        f = public.facts[i]
        if f["answer"] in scored_answers or any(a in scored_answers for a in f["aliases"]):
            continue  # no scored answer value either, so the fact check at run time has nothing to find
        q = render(dev_rng.choice(RELATIONS[f["relation"]]["questions"]), f)
        if q not in sft_questions and len(dev) < 30:
            dev.append((q, f"{f['answer']}です。"))
    while len(dev) < 40:
        x, y = dev_rng.randint(2, 60), dev_rng.randint(2, 40)
        q = f"{x}足す{y}はいくつですか？"
        if q not in sft_questions and q not in [d[0] for d in dev]:
            dev.append((q, f"{x}+{y}は{x + y}です。"))
    dev_rows = [{"id": f"d{k:03d}", "question": q, "answer": a} for k, (q, a) in enumerate(dev, 1)]
    write_jsonl(DEV_QA_PATH, dev_rows)

    # =====================================================================================================
    # Checks
    # =====================================================================================================
    # (1) paraphrases per fact: >= 4, each in a different document, never two in the same document
    per_fact_docs = defaultdict(list)
    for fi, ti, di in d_place:
        per_fact_docs[fi].append(di)
    for fi in range(len(domain.facts)):
        docs_of = per_fact_docs[fi]
        assert len(docs_of) >= 4 and len(set(docs_of)) == len(docs_of), (domain.facts[fi], docs_of)
    # ... and recount from the written files
    for f in domain.facts:
        spec = RELATIONS[f["relation"]]
        hits = []
        for name, text in cpt_texts.items():
            n = sum(text.count(render(t, f)) for t in spec["statements"])
            assert n <= 1, (f, name, n)
            hits.append(n)
        assert sum(hits) >= 4, (f, hits)
    per_pub = defaultdict(list)
    for key, ti, di in p_place:
        per_pub[key].append(di)
    for f in public.facts:
        assert len(per_pub[id(f)]) >= 4 and len(set(per_pub[id(f)])) == len(per_pub[id(f)]), f
        for t in RELATIONS[f["relation"]]["statements"]:
            assert render(t, f) in pretrain_text, f
    # (2) every QA answer appears verbatim in data/cpt; questions use the relation's question templates
    for r, f in zip(qa_rows, domain.facts):
        assert r["answer"] in cpt_all, r
        assert r["question"] in [render(t, f) for t in RELATIONS[f["relation"]]["questions"]], r
        assert len(r["answer"]) <= 12, r
    # (2b) the short-question pairs never repeat a QA-set question (pipeline/core/mixing.py refuses that at run time too)
    qa_stems = {r["question"].rstrip("？") for r in qa_rows}
    for r in short_rows:
        assert r["question"].rstrip("？") not in qa_stems, r
    # (3) held-out paraphrases never occur in any training text
    sft_text = "\n".join(m["content"] for ex in sft for m in ex["messages"])
    for h in held_rows:
        assert h["text"] not in cpt_all and h["text"] not in pretrain_text and h["text"] not in sft_text, h
    for rel, spec in RELATIONS.items():  # the held-out template's fixed wording is used nowhere in training
        frags = [x for x in re.split(r"\{[ea]\}", spec["heldout"]) if len(x) >= 4]
        for fr in frags:
            assert fr not in cpt_all and fr not in pretrain_text and fr not in sft_text, (rel, fr)
    # (4) no domain entity leaks into the public corpus, the SFT data or the general QA set
    general_text = json.dumps(gen_rows, ensure_ascii=False)
    for name in domain.names:
        for label, text in (("pretrain", pretrain_text), ("sft", sft_text), ("general_qa", general_text)):
            assert name not in text, f"domain entity {name!r} leaks into {label}"
    for f in domain.facts:  # no full domain fact sentence either
        for t in RELATIONS[f["relation"]]["statements"]:
            s = render(t, f)
            assert s not in pretrain_text and s not in sft_text, s
    # (5) SFT answers short; general facts have >= 3 paraphrases + a QA pair in the pretraining text
    for ex in sft:
        assert len(ex["messages"][1]["content"]) <= 60, ex
    for g in GENERAL:
        assert all(s in pretrain_text for s in g["statements"]), g
        assert f"質問: {g['question']}\n答え: {g['answer']}" in pretrain_text, g

    # =====================================================================================================
    # Summary
    # =====================================================================================================
    n_sft_tmpl = sum(1 for ex in sft if any(
        re.fullmatch(re.escape(t).replace(r"\{e\}", ".+"), ex["messages"][0]["content"])
        for spec in RELATIONS.values() for t in spec["questions"]))
    print(f"relations: {len(RELATIONS)}")
    print(f"domain world: {len(domain.entities)} entities, {len(domain.facts)} facts")
    print(f"public world: {len(public.entities)} entities, {len(public.facts)} facts "
          f"({len(qa_fact_ids)} with QA pairs in the pretraining corpus)")
    print(f"data/cpt: {len(cpt_texts)} documents, {sum(len(t) for t in cpt_texts.values())} characters")
    for name, text in cpt_texts.items():
        print(f"    {name}.md: {len(text)} chars")
    print(f"data/pretrain/public_corpus.txt: {len(blocks)} blocks ({len(pdocs)} public docs, {len(gdocs)} general docs, "
          f"{len(qa_blocks)} QA pairs), {len(pretrain_text)} characters")
    print(f"eval_sets/qa.jsonl: {len(qa_rows)} records")
    print(f"eval_sets/general_qa.jsonl: {len(gen_rows)} records")
    print(f"data/heldout/domain_paraphrases.jsonl: {len(held_rows)} records")
    print(f"data/cpt_qa/faq_short_questions.jsonl: {len(short_rows)} records")
    print(f"data/sft/chat.jsonl: {len(sft)} records ({n_sft_tmpl} in QA question templates)")
    print(f"data/sft/dev_qa.jsonl: {len(dev_rows)} records")
    print("all checks passed")


if __name__ == "__main__":
    main()
